"""Block usefulness of the positive control (issue 14): from one base model, SFT the three SFT arms of the arith
world — meta rows as written, the same rows in tool form (sft.meta_blocks: tool), and their stripped twin — then
sample the val mix with the environment's tool on for every arm (tool: arith_check, as an ablation generates) and
report greedy and sampled accuracy, block and tool-call rates, accuracy with vs without a block, slips corrected
by a block, and for rollouts with a block the same prefixes continued with the meta tag banned.

    .venv/bin/python scripts/probe_tool.py --base <base model dir> [--spec configs/demo.yaml] \
        [--out .twinarm/probe-tool] [--sft-epochs N] [--max-new-tokens N]

`--base` reuses a trained base model (e.g. a demo home's runs/base_model/<id>/model); a tokenizer from before the
tool markers gets them added (embeddings resized), as a base model trained now has them. SFT checkpoints found in
--out are reused. Prints one JSON report and writes it to <out>/report.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from infra.artifacts import atomic_path, atomic_write_json  # noqa: E402
from meta.grammar import CALC_CLOSE, CALC_OPEN, META_OPEN  # noqa: E402
from probe_world import analyse, counterfactual, probe_arguments, probe_setup, stripped_rows  # noqa: E402


def base_with_markers(src: Path, out: Path, device: str) -> Path:
    """The base model of `src` with the tool markers in its tokenizer (added when missing, embeddings resized)."""
    from tokenizers import AddedToken

    from worlds.model import load_model, save_model
    from worlds.tokenizer import load_tokenizer, save_tokenizer

    if (out / "config.json").is_file():
        return out
    tokenizer, model = load_tokenizer(src), load_model(src, device)
    missing = [t for t in (CALC_OPEN, CALC_CLOSE) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
        model.resize_token_embeddings(len(tokenizer))
        model.config.vocab_size = len(tokenizer)
    with atomic_path(out) as tmp:
        save_model(model, tmp)
        save_tokenizer(tokenizer, tmp)
    return out


def main() -> None:
    ap = probe_arguments(__doc__, ".twinarm/probe-tool")
    ap.add_argument("--base", required=True, help="a trained base model directory")
    ap.add_argument("--arms", default="tool,meta,twin")
    args = ap.parse_args()

    from evals.engine import HFEngine, render_prompt
    from evals.tools import ToolEngine, get_tool
    from rewards.grader import get_grader
    from sft.meta_blocks import meta_block_form
    from sft.train import TrainConfig, train_lm
    from worlds.arith import generate_world
    from worlds.model import load_model, save_model
    from worlds.tokenizer import load_tokenizer, save_tokenizer

    spec, out, device, precision, report = probe_setup(args)
    report.update(base=str(args.base), sft_epochs=spec.sft.epochs)
    world = generate_world(spec.world)
    base = base_with_markers(Path(args.base), out / "base", device)
    tokenizer = load_tokenizer(base)
    grader = get_grader(spec.grader)
    tool = get_tool("arith_check")
    val = world["val"]
    prompts = [render_prompt(tokenizer, r["prompt"]) for r in val]
    meta_rows = world["sft1"] + world["sft2"]
    tool_rows, tool_facts = meta_block_form(meta_rows, "tool")
    arm_rows = {"meta": meta_rows, "tool": tool_rows, "twin": stripped_rows(meta_rows)}
    report["tool_form"] = tool_facts
    for arm in args.arms.split(","):
        rows = arm_rows[arm]
        arm_dir = out / f"sft-{arm}"
        model = load_model(base, device)
        config = TrainConfig.from_sft(spec.sft, len(rows), checkpoint_every=10**9)
        run = train_lm(model, tokenizer, rows, config, arm_dir / "train", spec.seeds[0], spec.executor.compute)
        if not (arm_dir / "model").is_dir():
            with atomic_path(arm_dir / "model") as tmp:
                save_model(model, tmp)
                save_tokenizer(tokenizer, tmp)
        plain = HFEngine(model, tokenizer, device=device, precision=precision)
        engine = ToolEngine(plain, tool)
        stats: dict[str, Any] = {"sft_steps": run["steps"], "sft_seconds": run["seconds"],
                                 "sft_final_loss": round(run["final_loss"], 4)}
        for label, eng, n, temp in (("greedy", engine, 1, 0.0), ("sampled", engine, args.n, args.temperature),
                                    ("greedy_no_tool", plain, 1, 0.0)):
            t = time.perf_counter()
            gens = eng.generate(prompts, n=n, temperature=temp, max_new_tokens=args.max_new_tokens, seed=0)
            flat = [(r, g) for r, group in zip(val, gens) for g in group]
            grades = [x.correct for x in grader.grade([g.text for _, g in flat], [r["answer"] for r, _ in flat])]
            res = analyse(val, gens, grades)
            res = {k: res[k] for k in ("rollouts", "accuracy", "closed_block_rate", "slip_rate", "acc_with_block",
                                       "acc_without_block", "blocks_after_a_slip", "acc_block_after_slip",
                                       "blocks_right_after_slip_line", "slips_corrected_by_block")}
            res["seconds"] = round(time.perf_counter() - t, 1)
            res["tool_call_rate"] = round(sum(g.tool_calls > 0 for _, g in flat) / len(flat), 3)
            res["tool_errors"] = sum(g.tool_errors for _, g in flat)
            if label == "sampled" and arm != "twin":
                res["counterfactual"] = counterfactual(engine, tokenizer, grader, flat, grades,
                                                       [tokenizer.convert_tokens_to_ids(META_OPEN)], args)
            if label == "sampled":
                res["example"] = next((g.text for _, g in flat if g.tool_calls), flat[0][1].text)[:300]
            stats[label] = res
        report[arm] = stats
        print(json.dumps({arm: stats}, indent=1), flush=True)
    atomic_write_json(out / "report.json", report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
