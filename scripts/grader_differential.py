"""The grader vs verl's shipped math rewards on the held-out 1030 golds × renderings and decoys (rewards.differential).

Prints the pass counts (cases graded as their label says) of twinarm and of each verl function, and the
disagreements by (verl function, rendering kind). With --table, writes the disagreement table that
tests/test_grader_differential.py checks (on the same deterministic sample, rewards.differential.SAMPLE).

    .venv/bin/python scripts/grader_differential.py [--all] [--table tests/data/grader_differential.csv]
        [--data-dir ../shared/data/benchmarks]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evals.suites import load_heldout  # noqa: E402
from infra.spec import GraderSpec  # noqa: E402
from rewards import differential  # noqa: E402
from rewards.grader import Grader  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "benchmarks"))
    ap.add_argument("--all", action="store_true", help="every held-out gold, not the test's sample")
    ap.add_argument("--table", help="write the disagreement table (CSV) here (not with --all)")
    args = ap.parse_args(argv)
    if args.all and args.table:
        ap.error("--table is the test's sample: not with --all")
    suites = load_heldout(REPO / "datasets" / "heldout-1030.yaml", args.data_dir)
    problems = [(row["id"], str(row["answer"])) for suite in suites for row in suite.rows]
    if not args.all:
        problems = differential.sample(problems, *differential.SAMPLE)
    grader = Grader(GraderSpec())
    t0 = time.monotonic()
    try:
        cases, ours, verl = differential.run(problems, grader)
    finally:
        grader.close()
    wall = time.monotonic() - t0
    rows = differential.table_rows(cases, ours, verl)
    print(f"{len(problems)} problems, {len(cases)} cases ({sum(c.expected for c in cases)} must grade correct), "
          f"{wall:.1f}s")
    print(f"pass counts: twinarm {sum(o == c.expected for o, c in zip(ours, cases))}/{len(cases)}; " + "; ".join(
        f"{fn} {sum(v[fn] == c.expected for v, c in zip(verl, cases))}/{len(cases)}"
        for fn in differential.VERL_FUNCTIONS))
    for (fn, kind), n in sorted(Counter((r["verl_fn"], r["kind"]) for r in rows).items()):
        print(f"  {n:5d}  {fn:<17} {kind:<42} {differential.REASONS.get((fn, kind), 'NO REASON')}")
    wrong = [c for o, c in zip(ours, cases) if o != c.expected]
    for c in wrong:
        print(f"twinarm WRONG: {c.id} [{c.kind}] gold={c.gold!r} response={c.response!r}")
    if args.table:
        differential.write_table(rows, Path(args.table))
        print(f"wrote {len(rows)} rows to {args.table}")
    return 1 if wrong or any(not r["reason"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
