"""Which placebo (sft.meta_blocks fixed or shuffled) is closer to null: SFT of one base model on the meta twin with
each kind of block content, and on the stripped twin (the control), then val accuracy of each.

    .venv/bin/python scripts/placebo_probe.py --home /tmp/demo-home [--seeds 0,1] [--out /tmp/placebo-probe]

Reads a finished demo home (its base model, the twins stage's sft1/sft2 files and the world's val rows: read only),
trains with the spec's sft settings (the demo: 4 epochs, 252 steps) and the demo's compute settings, and prints one
JSON line per (kind, seed) and a summary: greedy val accuracy, avg@4 at the RL val temperature, the share of
samples with a closed block, and each kind's Δ against the stripped control of the same seed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.artifacts import read_parquet  # noqa: E402
from infra.spec import load_spec  # noqa: E402

KINDS = ("stripped", "as_written", "fixed", "empty", "line_end", "response_end", "shuffled")


def one_file(home: Path, pattern: str) -> Path:
    found = sorted(home.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{home}: expected one {pattern}, found {len(found)}")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="a finished demo TWINARM_HOME (read only)")
    ap.add_argument("--spec", default="configs/demo.yaml")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/placebo-probe"))
    ap.add_argument("--n", type=int, default=4, help="samples per val problem")
    args = ap.parse_args()

    from evals.engine import HFEngine
    from evals.evaluate import sample_and_grade
    from rewards.grader import get_grader
    from sft.base import val_accuracy
    from sft.meta_blocks import meta_block_form
    from sft.train import TrainConfig, train_lm
    from worlds.model import load_model, resolve_device, resolve_precision, set_threads
    from worlds.tokenizer import load_tokenizer

    base = load_spec(args.spec).base
    compute = base.executor.compute
    set_threads(compute.cpu_threads)
    device = resolve_device(compute)
    precision = resolve_precision(compute, device)
    init = one_file(args.home, "runs/base_model/*/model")
    twins = one_file(args.home, "runs/twins/*/sft1").parent
    val = read_parquet(one_file(args.home, "runs/data/*/world/val.parquet"))
    grader = get_grader(base.grader)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for kind in args.kinds.split(","):
            t0 = time.perf_counter()
            side = "nometa" if kind == "stripped" else "meta"
            rows = [r for role in ("sft1", "sft2") for r in read_parquet(twins / role / f"{side}.parquet")]
            rows = meta_block_form(rows, "as_written" if kind == "stripped" else kind, seed=seed)[0]  # as the stage
            tokenizer, model = load_tokenizer(init), load_model(init)
            run = train_lm(model, tokenizer, rows, TrainConfig.from_sft(base.sft, len(rows), checkpoint_every=10**9),
                           args.out / f"{kind}-{seed}", seed, compute)
            greedy = val_accuracy(model, tokenizer, val, base.grader, device, precision, base.rl.max_response_length)
            sampled = sample_and_grade(HFEngine(model, tokenizer, device=device, precision=precision), tokenizer,
                                       grader, "val", val, args.n, base.rl.temperature, base.rl.top_p,
                                       base.rl.max_response_length, seed)
            res = {"kind": kind, "seed": seed, "sft_steps": run["steps"], "final_loss": round(run["final_loss"], 4),
                   "greedy": round(greedy["accuracy"], 4),
                   "avg_at_n": round(sum(r["correct"] for r in sampled) / len(sampled), 4),
                   "block_share": round(sum(r["n_blocks"] > 0 for r in sampled) / len(sampled), 4),
                   "problems": len(val), "n": args.n, "seconds": round(time.perf_counter() - t0, 1)}
            results.append(res)
            print(json.dumps(res), flush=True)
    control = {r["seed"]: r for r in results if r["kind"] == "stripped"}
    for kind in args.kinds.split(","):
        mine = [r for r in results if r["kind"] == kind and r["seed"] in control]
        if kind == "stripped" or not mine:
            continue
        d_g = [100 * (r["greedy"] - control[r["seed"]]["greedy"]) for r in mine]
        d_s = [100 * (r["avg_at_n"] - control[r["seed"]]["avg_at_n"]) for r in mine]
        print(f"{kind:>10} − stripped: greedy Δ {', '.join(f'{d:+.1f}' for d in d_g)} pp "
              f"(mean {sum(d_g) / len(d_g):+.1f}); avg@{args.n} Δ {', '.join(f'{d:+.1f}' for d in d_s)} pp "
              f"(mean {sum(d_s) / len(d_s):+.1f})")


if __name__ == "__main__":
    main()
