"""The sensitivity benchmark (`make sensitivity`): run configs/sensitivity.yaml (control, positive, placebo; three
seeds) through the normal pipeline — `twinarm run`, the flow `make demo` runs — then print, per contrast, the
held-out verdict with its CI and reading, whether it is what the control expects, and the wall time.

    .venv/bin/python scripts/sensitivity.py [--spec configs/sensitivity.yaml] [--home DIR]
    .venv/bin/python scripts/sensitivity.py --verdicts-only --home DIR   # print the verdicts of a finished run

--home: the TWINARM_HOME to run in (default: a fresh directory under /tmp, so nothing comes from cache). The
verdicts are the report's own (audit.report.findings on what the flow recorded: Δ at the final checkpoints, the
seeds × problems bootstrap CI, the TOST reading with eval.equivalence_margin); the report is written as usual.

Expectations, by the mechanisms a contrast declares: a contrast that declares `placebo_blocks` is a placebo and
must come out null (equivalent within the margin: "null ✓"; a CI that holds 0 but is wider: "null, weakly ✓"; a CI
off 0: "✗"); any other contrast is a positive control and must come out ahead (CI above 0: "ahead ✓", else "✗").
Exit 0 when every contrast is as expected, 1 otherwise (2 when the run itself failed).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PLACEBO_MECHANISM = "placebo_blocks"


def expectation(mechanisms: list[str]) -> str:
    """'null' for a placebo contrast (it declares placebo_blocks), 'ahead' for a positive control."""
    return "null" if PLACEBO_MECHANISM in mechanisms else "ahead"


def judge(expected: str, lo: float, hi: float, margin: float | None) -> str:
    """Whether a CI [lo, hi] of Δ (fractions) is what the control expects: ✓ or ✗ with the reason in words."""
    from evals.metrics import interval_reading

    word = interval_reading(lo, hi, margin)
    if expected == "ahead":
        return "ahead ✓" if word == "better" else f"✗ expected ahead, CI {word}"
    if word == "equivalent":
        return "null ✓ (equivalent within the margin)"
    if word == "inconclusive":
        return "null, weakly ✓ (CI holds 0, wider than the margin)"
    return f"✗ expected null, CI {word}"


def verdicts(home: Path, ablation: str) -> tuple[list[dict[str, Any]], float | None]:
    """Per contrast over all suites (the report's verdicts): name, arms, Δ, CI, n, reading and judgement; and the
    declared equivalence margin. Raises UsageError when lineage has no run of the ablation."""
    from audit.report import ALL_SUITES, findings, gather
    from audit.stats import reading
    from infra.home import Home
    from infra.lineage import Lineage

    inp = gather(Lineage(Home(home).lineage_db), ablation)
    found = findings(inp)
    margin = inp.eval.equivalence_margin
    suites = {v.suite for v in found.verdicts}
    overall = [v for v in found.verdicts if v.suite == (ALL_SUITES if len(suites) > 1 else next(iter(suites)))]
    out = []
    for v in overall:
        d, expected = v.delta, expectation(v.spec.mechanisms)
        row = {"contrast": v.contrast, "treatment": v.spec.treatment, "control": v.spec.control,
               "expected": expected, "reading": reading(d, margin)}
        if "error" in d:
            row["judgement"] = f"✗ {d['error']}"
        else:
            row.update(acc_t=d["acc_t"], acc_c=d["acc_c"], delta=d["delta"], lo=d["lo"], hi=d["hi"],
                       problems=d["problems"], seeds=len(d["seeds"]),
                       judgement=judge(expected, d["lo"], d["hi"], margin))
        out.append(row)
    return out, margin


def table(rows: list[dict[str, Any]], margin: float | None) -> str:
    """The verdicts as a Markdown table (percent, pp), one row per contrast."""
    lines = ["| contrast | treatment | control | Δ | 95% CI (pp) | problems × seeds | reading | expected | as "
             "expected? |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "delta" not in r:
            lines.append(f"| {r['contrast']} | {r['treatment']} | {r['control']} | — | — | — | {r['reading']} | "
                         f"{r['expected']} | {r['judgement']} |")
            continue
        lines.append(f"| {r['contrast']} | {r['treatment']} {100 * r['acc_t']:.1f}% | {r['control']} "
                     f"{100 * r['acc_c']:.1f}% | {100 * r['delta']:+.1f} pp | [{100 * r['lo']:.1f}, "
                     f"{100 * r['hi']:.1f}] | {r['problems']} × {r['seeds']} | {r['reading']} | {r['expected']} | "
                     f"{r['judgement']} |")
    lines.append("")
    lines.append("equivalence margin: " + (f"±{100 * margin:g} pp (eval.equivalence_margin)" if margin is not None
                                           else "not declared"))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=REPO / "configs" / "sensitivity.yaml",
                    help="the spec run (default: configs/sensitivity.yaml)")
    ap.add_argument("--home", type=Path, help="TWINARM_HOME to run in (default: a fresh one under /tmp)")
    ap.add_argument("--verdicts-only", action="store_true", help="print the verdicts of a finished run in --home")
    args = ap.parse_args()

    from infra.spec import load_spec

    ablation = load_spec(args.spec).name
    home = args.home or Path(tempfile.mkdtemp(prefix="twinarm-sensitivity-"))
    wall = None
    if not args.verdicts_only:
        print(f"running {args.spec} in TWINARM_HOME={home}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(args.spec)], cwd=REPO,
                              env={**os.environ, "TWINARM_HOME": str(home)})
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(f"twinarm run exited {done.returncode} after {wall:.0f} s", file=sys.stderr)
            return 2
    elif args.home is None:
        ap.error("--verdicts-only needs --home")
    os.environ["TWINARM_HOME"] = str(home)
    rows, margin = verdicts(home, ablation)
    print(table(rows, margin))
    if wall is not None:
        print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min), twinarm run of {args.spec.name} in {home}")
    return 0 if rows and all("✓" in r["judgement"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
