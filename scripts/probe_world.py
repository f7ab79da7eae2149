"""Measure the arith world on this machine: tokenizer, base model, meta SFT vs its stripped twin, and whether a
meta block can help (rollouts at T=0.7: block rates, slips, accuracy with and without a block, slips a block
corrected, counterfactual continuations with the meta tag banned, and forced blocks after real slips).

    .venv/bin/python scripts/probe_world.py [--spec configs/demo.yaml] [--out .twinarm/probe] [--threads 2]

Stages reuse what an earlier run left in --out (base model, SFT checkpoints), so the SFT or rollout settings can
be iterated on without retraining the base. Prints one JSON report and writes it to <out>/report.json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.artifacts import atomic_path, atomic_write_json  # noqa: E402
from infra.spec import load_spec  # noqa: E402
from meta.grammar import META_CLOSE, META_OPEN, find_blocks, format_class, strip_meta  # noqa: E402
from worlds.arith import audit_lines, evaluate, expr_of, parse, well_formed  # noqa: E402


def stripped_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The no-meta twin as DESIGN §7 defines it (strip_meta on every message; the wrong prefix precedes the
    block, so it stays an exact prefix)."""
    return [{**r, "messages": [{**m, "content": strip_meta(m["content"])} for m in r["messages"]]} for r in rows]


# 'check 44-7: 14-7=7, 4-1=3, so 37' (a check of the step about to be written) or '…, so 37, not 36' (of the
# step just written): the step, its recomputed value, the verdict if any
_CHECK = re.compile(r"check (?P<lhs>[^:]+): (?:.*?(?:so |=))?(?P<value>-?\d+)(?:, (?P<verdict>same|not)\b|\.|$)")


def says_wrong(content: str) -> bool:
    return re.search(r", not\b", content) is not None


def _parses(expr: str) -> bool:
    try:
        return len(parse(expr)) == 3 and well_formed(parse(expr))
    except ValueError:
        return False


def solution_lines(text: str) -> list[str]:
    return [line for line in strip_meta(text).split("\n") if line and not line.startswith("\\boxed")]


def block_line(text: str) -> int | None:
    """Index (in solution_lines) of the first line after the first closed block: the lines before it are what
    the block could check."""
    blocks = find_blocks(text)
    if not blocks:
        return None
    return len(solution_lines(text[:blocks[0].start]))


def analyse(rows: list[dict[str, Any]], gens: list[list[Any]], grades: list[bool]) -> dict[str, Any]:
    """Block and slip statistics of sampled rollouts (grades flat, in rollout order)."""
    flat = [(row, g) for row, group in zip(rows, gens) for g in group]
    stats: Counter = Counter()
    formats: Counter = Counter()
    slip_kinds: Counter = Counter()
    verdicts: Counter = Counter()
    for (row, g), correct in zip(flat, grades):
        expr = expr_of(row["prompt"])
        checks = audit_lines(expr, solution_lines(g.text), word=row["domain"] == "word")
        bad = [c.index for c in checks if c.errors]
        for c in checks:
            slip_kinds.update(c.errors)
        formats[format_class(g.text, g.truncated)] += 1
        at = block_line(g.text)
        stats["n"] += 1
        stats["correct"] += correct
        stats["slip"] += bool(bad)
        stats["slip_correct"] += bool(bad) and correct
        if at is None:
            stats["no_block"] += 1
            stats["no_block_correct"] += correct
            continue
        block = find_blocks(g.text)[0]
        stats["block"] += 1
        stats["block_correct"] += correct
        check = _CHECK.match(block.content)
        if check and _parses(check["lhs"]):
            true = evaluate(parse(check["lhs"]))
            stats["checks"] += 1
            stats["recompute_right"] += check["value"] == str(true)
            following = g.text[block.end:].split("\n")[0]
            if check["verdict"] is None:  # a pre-check: does the next line write that step with its value?
                stats["prechecks"] += 1
                stats["precheck_used"] += following.startswith(f"{check['lhs']}={check['value']}|")
            else:
                written = solution_lines(g.text[:block.start])[-1:] or [""]
                written_value = written[0].split("=")[1].split("|")[0] if "=" in written[0] else None
                stats["postchecks"] += 1
                stats["verdict_right"] += (check["verdict"] == "same") == (written_value == str(true))
        before = [k for k in bad if k < at]
        just_before = at - 1 in bad
        verdicts[("slip_before" if just_before else "clean_before",
                  "wrong" if says_wrong(block.content) else "right")] += 1
        if before:
            stats["block_after_slip"] += 1
            stats["block_after_slip_correct"] += correct
        if just_before:
            stats["block_right_after_slip"] += 1
            stats["slip_corrected"] += correct
    n = max(stats["n"], 1)
    rate = lambda a, b: round(stats[a] / stats[b], 3) if stats[b] else None  # noqa: E731
    return {
        "rollouts": stats["n"], "accuracy": round(stats["correct"] / n, 3),
        "closed_block_rate": round(stats["block"] / n, 3), "format_classes": dict(formats),
        "slip_rate": round(stats["slip"] / n, 3), "acc_given_slip": rate("slip_correct", "slip"),
        "acc_with_block": rate("block_correct", "block"), "acc_without_block": rate("no_block_correct", "no_block"),
        "blocks_after_a_slip": stats["block_after_slip"], "acc_block_after_slip": rate("block_after_slip_correct",
                                                                                        "block_after_slip"),
        "blocks_right_after_slip_line": stats["block_right_after_slip"],
        "slips_corrected_by_block": stats["slip_corrected"],
        "block_verdicts": {f"{a}/{b}": v for (a, b), v in sorted(verdicts.items())},
        "check_blocks": stats["checks"], "check_recompute_right": rate("recompute_right", "checks"),
        "prechecks": stats["prechecks"], "precheck_value_used_by_next_line": rate("precheck_used", "prechecks"),
        "postchecks": stats["postchecks"], "postcheck_verdict_right": rate("verdict_right", "postchecks"),
        "line_errors": dict(slip_kinds),
    }


def probe_arguments(doc: str | None, out: str) -> argparse.ArgumentParser:
    """The options every probe takes: spec, output folder, threads, sampling (n, temperature, max new tokens) and
    the SFT epochs override."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="configs/demo.yaml")
    ap.add_argument("--out", default=out)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4, help="rollouts per val prompt")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--sft-epochs", type=int, help="override the spec's sft.epochs")
    return ap


def probe_setup(args: argparse.Namespace) -> tuple[Any, Path, str, str, dict[str, Any]]:
    """What every probe starts from: the spec's base config (sft.epochs overridden by --sft-epochs), the output
    folder, torch threads and seed set, the resolved device and precision, and the report's first entries."""
    import torch

    from worlds.model import resolve_device, resolve_precision, set_threads

    spec = load_spec(args.spec).base
    if args.sft_epochs is not None:
        spec.sft.epochs = args.sft_epochs
    set_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(spec.executor.compute)
    precision = resolve_precision(spec.executor.compute, device)
    return spec, Path(args.out), device, precision, {"threads": args.threads, "device": device, "precision": precision}


def main() -> None:
    ap = probe_arguments(__doc__, ".twinarm/probe")
    ap.add_argument("--sft-lr", type=float, help="override the spec's sft.lr")
    args = ap.parse_args()

    from evals.engine import HFEngine, render_prompt
    from rewards.grader import get_grader
    from sft.base import train_base_model, val_accuracy
    from sft.train import TrainConfig, train_lm
    from worlds.arith import generate_world, world_texts
    from worlds.model import load_model, save_model
    from worlds.tokenizer import load_tokenizer, save_tokenizer

    spec, out, device, precision, report = probe_setup(args)
    if args.sft_lr is not None:
        spec.sft.lr = args.sft_lr

    t = time.perf_counter()
    world = generate_world(spec.world)
    report["world"] = {"seconds": round(time.perf_counter() - t, 2),
                       "rows": {k: len(v) for k, v in world.items()},
                       "sft_kinds": dict(Counter(r["kind"] for r in world["sft1"] + world["sft2"]))}

    base = train_base_model(world["base"], world["val"], world_texts(world), spec.model.toy,
                            spec.model.base_training, spec.executor.compute, spec.grader, out / "base", threads=args.threads,
                            max_new_tokens=args.max_new_tokens)
    report["base"] = {k: base[k] for k in ("val_accuracy", "val_accuracy_by_domain", "params", "vocab_size",
                                           "steps", "stopped", "train_seconds", "tokenizer_seconds", "seconds")}
    report["base"]["curve"] = [{"step": e["step"], "train_seconds": e["train_seconds"],
                                "accuracy": round(e["accuracy"], 3)} for e in base["evals"]]
    tokenizer = load_tokenizer(Path(base["model_dir"]))
    grader = get_grader(spec.grader)
    engine_rows = world["val"]
    prompts = [render_prompt(tokenizer, r["prompt"]) for r in engine_rows]
    meta_ids = [tokenizer.convert_tokens_to_ids(META_OPEN)]

    meta_rows = world["sft1"] + world["sft2"]
    for arm, rows in (("meta", meta_rows), ("twin", stripped_rows(meta_rows))):
        arm_dir = out / f"sft-{arm}"
        model = load_model(Path(base["model_dir"]), device)
        config = TrainConfig.from_sft(spec.sft, len(rows), checkpoint_every=10**9)
        run = train_lm(model, tokenizer, rows, config, arm_dir / "train", spec.seeds[0], spec.executor.compute)
        if not (arm_dir / "model").is_dir():
            with atomic_path(arm_dir / "model") as tmp:
                save_model(model, tmp)
                save_tokenizer(tokenizer, tmp)
        engine = HFEngine(model, tokenizer, device=device, precision=precision)
        t = time.perf_counter()
        greedy = val_accuracy(model, tokenizer, engine_rows, spec.grader, device, precision, args.max_new_tokens)
        t_greedy = time.perf_counter() - t
        t = time.perf_counter()
        gens = engine.generate(prompts, n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                               seed=0)
        t_sample = time.perf_counter() - t
        flat = [(r, g) for r, group in zip(engine_rows, gens) for g in group]
        grades = [x.correct for x in grader.grade([g.text for _, g in flat], [r["answer"] for r, _ in flat])]
        stats = analyse(engine_rows, gens, grades)
        stats.update(sft_steps=run["steps"], sft_seconds=run["seconds"], sft_final_loss=round(run["final_loss"], 4),
                     greedy_accuracy=round(greedy["accuracy"], 3), greedy_by_domain=greedy["by_domain"],
                     greedy_seconds=round(t_greedy, 2), sample_seconds=round(t_sample, 2),
                     mean_response_tokens=round(sum(len(g.token_ids) for _, g in flat) / len(flat), 1))
        if arm == "meta":
            stats["counterfactual"] = counterfactual(engine, tokenizer, grader, flat, grades, meta_ids, args)
            stats["forced_block"] = forced_block(engine, grader, flat, meta_ids, args)
        report[arm] = stats
        print(json.dumps({arm: stats}, indent=1), flush=True)
    atomic_write_json(out / "report.json", report)
    print(json.dumps(report, indent=1))


def counterfactual(engine, tokenizer, grader, flat, grades, meta_ids, args) -> dict[str, Any]:
    """For each rollout with a block: regenerate from the prefix before the block with the meta tag banned.
    Usefulness = accuracy with the block − accuracy of the same prefixes continued without one."""
    picks = [(r, g, c) for (r, g), c in zip(flat, grades) if find_blocks(g.text)]
    if not picks:
        return {"n": 0}
    prefixes = [render_prompt_of(engine, r) + g.text[:find_blocks(g.text)[0].start] for r, g, _ in picks]
    cf = engine.generate(prefixes, n=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=1,
                         banned_tokens=meta_ids)
    texts = [g.text[:find_blocks(g.text)[0].start] + c[0].text for (_, g, _), c in zip(picks, cf)]
    cf_correct = [x.correct for x in grader.grade(texts, [r["answer"] for r, _, _ in picks])]
    with_block = sum(c for _, _, c in picks) / len(picks)
    without = sum(cf_correct) / len(picks)
    return {"n": len(picks), "acc_with_block": round(with_block, 3), "acc_same_prefix_no_block": round(without, 3),
            "usefulness": round(with_block - without, 3),
            "block_saved": sum(c and not k for (_, _, c), k in zip(picks, cf_correct)),
            "block_derailed": sum(k and not c for (_, _, c), k in zip(picks, cf_correct))}


def forced_block(engine, grader, flat, meta_ids, args) -> dict[str, Any]:
    """After the first slipped line of rollouts that have no block: continue once with a forced `<|meta|>` and
    once with the tag banned. Shows whether a block *can* rescue a real slip of this model."""
    prefixes, golds = [], []
    for r, g in flat:
        if find_blocks(g.text):
            continue
        lines = solution_lines(g.text)
        checks = audit_lines(expr_of(r["prompt"]), lines, word=r["domain"] == "word")
        bad = [c.index for c in checks if c.errors and c.errors <= {"value", "sign", "order", "copy"}]
        if not bad:
            continue
        prefixes.append(render_prompt_of(engine, r) + "\n".join(lines[:bad[0] + 1]) + "\n")
        golds.append(r["answer"])
    if not prefixes:
        return {"n": 0}
    forced = engine.generate([p + META_OPEN for p in prefixes], n=1, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, seed=2)
    plain = engine.generate(prefixes, n=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            seed=2, banned_tokens=meta_ids)
    acc_forced = [x.correct for x in grader.grade([META_OPEN + f[0].text for f in forced], golds)]
    acc_plain = [x.correct for x in grader.grade([p[0].text for p in plain], golds)]
    said_wrong = sum(says_wrong(f[0].text.split(META_CLOSE)[0]) for f in forced)
    return {"n": len(prefixes), "acc_forced_block": round(sum(acc_forced) / len(prefixes), 3),
            "acc_no_block": round(sum(acc_plain) / len(prefixes), 3), "forced_block_said_wrong": said_wrong,
            "example": (prefixes[0].split("assistant\n", 1)[-1] + META_OPEN + forced[0][0].text)[:400]}


def render_prompt_of(engine, row) -> str:
    from evals.engine import render_prompt

    return render_prompt(engine.tokenizer, row["prompt"])


if __name__ == "__main__":
    main()
