"""Benchmark the grader: throughput, per-item latency and hard timeouts on real and adversarial inputs.

8,240 (prediction, gold) pairs: the held-out 1030 (GSM8K test first 500 + MATH-500 + AIME-2024) × 8 predictions,
each with the label it must get (correct; two equivalent renderings; the decoy; another problem's gold; the gold
stated without a box; the right box followed by a wrong one; a long chain of thought ending in the right box).
They are graded in RL-sized batches through a fresh Grader, then adversarial inputs (deep nesting, a 10^6-character
answer, towers of exponents, huge factorials) one per call, then all adversarial items inside one normal batch to
show that a hung item stalls nothing else. Exit code 1 if an item outlived its timeout or a label disagrees.

    .venv/bin/python scripts/bench_grader.py [BENCHMARK_DIR] [--workers 2] [--timeout 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.errors import DataError  # noqa: E402
from infra.spec import GraderSpec  # noqa: E402
from rewards.decoys import make_decoys  # noqa: E402
from rewards.golds import equivalent_renderings, extract_gold  # noqa: E402
import rewards.grader as grader_module  # noqa: E402
from rewards.grader import Grader  # noqa: E402

HELDOUT = (("gsm8k", 500), ("math500", 500), ("aime24", 30))  # DESIGN §8: 1030 problems
SLACK_S = 0.5  # scheduler wake-up allowance on a loaded machine when checking "within its timeout"
COT = ("Let me work through this carefully. First we restate the problem and name the unknowns. "
       "Then we set up the relation $a_{n+1} = a_n + d$ and simplify step by step, checking each line. ") * 20

ADVERSARIAL = {
    "tower 10^{10^{10}}": ("10^{10^{10}}", "1"),
    "tower 9^{9^{9}}": ("9^{9^{9}}", "2"),
    "power 2^{300000000}": ("2^{300000000}", "1"),
    "factorial (10^{7})!": ("(10^{7})!", "1"),
    "factorial 1000000!": ("1000000!", "1"),
    "nested \\frac x200": ("\\frac{" * 200 + "1" + "}{2}" * 200, "1"),
    "nested parens x2000": ("(" * 2000 + "1" + ")" * 2000, "1"),
    "nested \\sqrt x300": ("\\sqrt{" * 300 + "2" + "}" * 300, "2"),
    "10^6-char number": ("1" * 10**6, "1"),
    "10^6-char sum": ("+".join(["x"] * 333_333), "1"),
    "20000-term polynomial": ("+".join(f"{i}x^{{{i}}}" for i in range(1, 20001)), "1"),
    "sum to 10^{9}": ("\\sum_{k=1}^{10^{9}} k^{k}", "1"),
    "symbolic integral": ("\\int_0^1 e^{x^{x^{x}}}\\sin(x^{x})\\,dx", "1"),
    "equation chain": ("x=" + "=".join(["y"] * 2000), "1"),
    "matrix 40x40": ("\\begin{pmatrix}" + "\\\\".join(["&".join(["x"] * 40)] * 40) + "\\end{pmatrix}", "1"),
    "unbalanced braces": ("\\frac{1}{" * 1000, "1"),
}


def load_heldout(bench_dir: Path) -> list[tuple[str, str, str]]:
    """(suite, problem id, gold) for the held-out 1030, in dataset order."""
    out = []
    for source, n in HELDOUT:
        path = bench_dir / f"{source}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: benchmark file not found (pass the benchmark directory)")
        lines = path.read_text().splitlines()[:n]
        if len(lines) < n:
            raise DataError(f"{path}: expected at least {n} rows, found {len(lines)}")
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i + 1}: not valid JSON: {exc}") from None
            out.append((source, f"{source}/{i}", extract_gold(source, row, index=i)))
    return out


def build_pairs(problems: list[tuple[str, str, str]]) -> list[dict]:
    """8 predictions per problem with the label each must get."""
    golds = [gold for _, _, gold in problems]
    decoys = make_decoys(golds)
    pairs = []
    for k, ((suite, pid, gold), decoy) in enumerate(zip(problems, decoys)):
        other = next(golds[(k + j) % len(golds)] for j in range(1, len(golds)) if golds[(k + j) % len(golds)] != gold)
        wrong = decoy if decoy is not None else other
        (name_a, text_a), (name_b, text_b) = equivalent_renderings(gold)
        for kind, response, expected in (
            ("correct", f"So the answer is $\\boxed{{{gold}}}$.", True),
            (f"rendering: {name_a}", f"Hence $\\boxed{{{text_a}}}$", True),
            (f"rendering: {name_b}", f"Final answer: \\boxed{{{text_b}}}", True),
            ("decoy" if decoy is not None else "other gold", f"The answer is \\boxed{{{wrong}}}.", False),
            ("other gold", f"I think it is $\\boxed{{{other}}}$.", None),  # may coincide in value: no label
            ("unboxed", f"The answer is {gold}.", False),
            ("right box then wrong box", f"\\boxed{{{gold}}}? Wait, no: \\boxed{{{wrong}}}", False),
            ("long chain of thought", f"{COT}\nTherefore the answer is $\\boxed{{{gold}}}$.", True),
        ):
            pairs.append({"suite": suite, "id": pid, "kind": kind, "gold": gold, "response": response,
                          "expected": expected})
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_dir", nargs="?", default=str(REPO.parent / "shared" / "data" / "benchmarks"),
                    help="directory with gsm8k/math500/aime24 .jsonl (default: ../shared/data/benchmarks)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=GraderSpec().timeout_s, help="per-item timeout, seconds")
    ap.add_argument("--batch", type=int, default=512, help="pairs per grade() call (RL step: 64 prompts x 8)")
    ap.add_argument("--hard-only", action="store_true",
                    help="no in-worker soft timer: every timeout takes the kill-and-replace path (work stuck in C)")
    ap.add_argument("--json", dest="json_out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.hard_only:
        grader_module._soft_budget = lambda timeout_s: None

    problems = load_heldout(Path(args.bench_dir))
    t0 = time.monotonic()
    pairs = build_pairs(problems)
    build_s = time.monotonic() - t0
    cfg = GraderSpec(workers=args.workers, timeout_s=args.timeout)
    grader = Grader(cfg)
    try:
        t0 = time.monotonic()
        grader.grade(["\\boxed{1}"], ["1"])
        startup_s = time.monotonic() - t0

        t0 = time.monotonic()
        grades = []
        for lo in range(0, len(pairs), args.batch):
            batch = pairs[lo:lo + args.batch]
            grades += grader.grade([p["response"] for p in batch], [p["gold"] for p in batch])
        main_s = time.monotonic() - t0
        main_counts = grader.facts()["counts"]

        adversarial = []
        for name, (answer, gold) in ADVERSARIAL.items():
            t0 = time.monotonic()
            [g] = grader.grade([f"The answer is \\boxed{{{answer}}}."], [gold])
            adversarial.append({"name": name, "chars": len(answer), "latency_s": round(time.monotonic() - t0, 3),
                                "correct": g.correct, "timed_out": g.timed_out, "error": g.error})

        # All adversarial items inside one batch of labelled pairs, which a space inside the box keeps out of the
        # cache: the labelled pairs must still be graded right.
        normal = [p for p in pairs if p["expected"] is not None and "\\boxed{" in p["response"]][:256]
        mixed = [(f"\\boxed{{{a}}}", g) for a, g in ADVERSARIAL.values()]
        mixed += [(p["response"].replace("\\boxed{", "\\boxed{ "), p["gold"]) for p in normal]
        t0 = time.monotonic()
        mixed_grades = grader.grade([r for r, _ in mixed], [g for _, g in mixed])
        mixed_s = time.monotonic() - t0
        facts = grader.facts()
    finally:
        grader.close()

    disagreements = [{**{k: p[k] for k in ("id", "kind", "gold")}, "response": p["response"][-200:],
                      "expected": p["expected"], "graded": g.correct, "timed_out": g.timed_out, "error": g.error}
                     for p, g in zip(pairs, grades) if p["expected"] is not None and g.correct != p["expected"]]
    mixed_wrong = sum(g.correct != p["expected"] for p, g in zip(normal, mixed_grades[len(ADVERSARIAL):]))
    limit = cfg.timeout_s + SLACK_S
    max_item_s = facts["counts"]["max_item_s"]
    within = max_item_s <= limit and all(a["latency_s"] <= limit for a in adversarial)
    result = {
        "hard_only": args.hard_only, "config": facts["config"], "grader_version": facts["grader_version"],
        "call_path": facts["call_path"], "pairs": len(pairs), "build_pairs_s": round(build_s, 2),
        "worker_startup_s": round(startup_s, 2), "main_s": round(main_s, 2),
        "throughput_pairs_per_s": round(len(pairs) / main_s, 1), "main_distinct_graded": main_counts["graded"],
        "distinct_graded_per_s": round(main_counts["graded"] / main_s, 1), "main_max_item_s": main_counts["max_item_s"],
        "main_timeouts": main_counts["timeouts"], "main_cache_hits": main_counts["cache_hits"],
        "adversarial": adversarial, "mixed_batch": {"items": len(mixed), "wall_s": round(mixed_s, 2),
                                                    "labelled_items_misgraded": mixed_wrong},
        "max_item_s": max_item_s, "timeout_s": cfg.timeout_s, "all_within_timeout": within,
        "counts": facts["counts"], "label_disagreements": disagreements,
    }

    print(f"grader {facts['grader_version']}  workers={args.workers} timeout={cfg.timeout_s}s batch={args.batch}"
          f"{'  hard-only' if args.hard_only else ''}")
    print(f"pairs built: {len(pairs)} from {len(problems)} held-out problems in {build_s:.1f}s (decoys included)")
    print(f"worker startup: {startup_s:.2f}s")
    print(f"main: {len(pairs)} pairs in {main_s:.2f}s = {len(pairs) / main_s:.0f} pairs/s; "
          f"max item {main_counts['max_item_s']:.3f}s; timeouts {main_counts['timeouts']}")
    print(f"      {main_counts['graded']} distinct pairs reached a worker ({main_counts['graded'] / main_s:.0f}/s); "
          f"{main_counts['cache_hits']} answered by the cache or a duplicate in the batch, "
          f"{main_counts['unboxed']} had no box")
    print("adversarial (one per call):")
    for a in adversarial:
        status = "TIMEOUT" if a["timed_out"] else ("error: " + a["error"] if a["error"] else f"correct={a['correct']}")
        print(f"  {a['name']:<24} {a['chars']:>8} chars  {a['latency_s']:6.2f}s  {status}")
    print(f"mixed batch: {len(mixed)} items ({len(ADVERSARIAL)} adversarial) in {mixed_s:.2f}s; "
          f"labelled items graded against their label: {mixed_wrong}")
    print(f"max per-item latency {max_item_s:.3f}s vs timeout {cfg.timeout_s}s: "
          f"{'every item finished within its timeout' if within else 'AN ITEM OUTLIVED ITS TIMEOUT'}")
    print(f"totals: {facts['counts']}")
    print(f"label disagreements: {len(disagreements)}")
    for d in disagreements[:20]:
        print(f"  {d['id']} [{d['kind']}] gold={d['gold']!r} expected={d['expected']} graded={d['graded']}"
              f"{' (timeout)' if d['timed_out'] else ''}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json_out}")
    return 0 if within and not disagreements and not mixed_wrong else 1


if __name__ == "__main__":
    sys.exit(main())
