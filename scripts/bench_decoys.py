"""The share of the demo's RL problems PMI-shift can score: gold and decoy of equal token length (rewards.decoys).

Generates the demo world (configs/demo.yaml `world`), trains its tokenizer the way the base_model stage does
(worlds.tokenizer.train_tokenizer on worlds.arith.world_texts of base, sft1, sft2, rl prompts and val; the
spec's vocab size), makes the decoys of the RL prompts' golds under the default grader, and prints
rewards.decoys.decoy_facts for the decoys chosen without the tokenizer (the first surviving candidate) and with it
(a candidate of the gold's token length first).

    .venv/bin/python scripts/bench_decoys.py [--spec configs/demo.yaml]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from infra.spec import ArithWorldSpec, GraderSpec, ModelSpec  # noqa: E402
from rewards import decoys  # noqa: E402
from rewards.grader import Grader  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(REPO / "configs" / "demo.yaml"))
    args = ap.parse_args(argv)
    from worlds.arith import generate_world, world_texts
    from worlds.tokenizer import train_tokenizer

    base = yaml.safe_load(Path(args.spec).read_text())["base"]
    world_spec = ArithWorldSpec(**base.get("world", {}))
    toy = ModelSpec(**base.get("model", {})).toy
    t0 = time.monotonic()
    world = generate_world(world_spec)
    corpus = world_texts({role: world[role] for role in ("base", "sft1", "sft2", "rl", "val")})
    tokenizer = train_tokenizer(corpus, toy.vocab_size)
    print(f"world + tokenizer ({len(tokenizer)} tokens): {time.monotonic() - t0:.1f}s")
    golds = [str(row["answer"]) for row in world["rl"]]
    grader = Grader(GraderSpec(**base.get("grader", {})))
    try:
        for name, tok in (("first surviving candidate (no tokenizer)", None), ("equal token length first", tokenizer)):
            t0 = time.monotonic()
            chosen = decoys.make_decoys(golds, grader, tokenizer=tok)
            facts = decoys.decoy_facts(golds, chosen, tokenizer)
            print(f"{name}: {json.dumps(facts)} ({time.monotonic() - t0:.1f}s)")
    finally:
        grader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
