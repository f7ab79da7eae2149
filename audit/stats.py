"""The report's statistics: what each contrast's numbers are, computed from the per-sample rows the flow recorded
(evals.evaluate rows: arm, seed, step, suite, problem_id, domain, sample, correct, ...). Plain functions over
rows; the formulas are evals.metrics' (their docstrings cite the sources). Accuracies and Δs are fractions
(0.01 = 1 pp); Δ is always treatment - control on the problems both arms answered in every seed.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from evals.metrics import (PairedGrid, aggregate, interval_reading, minimum_detectable_delta, paired_bootstrap,
                           paired_grid, quartile_simpson)
from infra.errors import DataError
from infra.spec import ContrastSpec

Row = dict[str, Any]


def final_steps(rows: Sequence[Row]) -> dict[str, int]:
    """arm -> the last step it has rows for."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["arm"]] = max(out.get(r["arm"], r["step"]), r["step"])
    return out


def at_steps(rows: Sequence[Row], steps: dict[str, int]) -> list[Row]:
    """The rows of each arm at its given step (arms not named are dropped)."""
    return [r for r in rows if steps.get(r["arm"]) == r["step"]]


def shared_rows(rows: Sequence[Row], contrast: ContrastSpec, steps: dict[str, int]) -> tuple[list[Row], PairedGrid]:
    """The rows a contrast's Δ is computed on: both arms at their steps, on the problems both answered in every
    seed; with the PairedGrid of all their rows at those steps (its only_treatment/only_control count the problems
    left out). Raises DataError when an arm has no step given, the arms ran different seeds or share no problem."""
    t, c = contrast.treatment, contrast.control
    missing = [a for a in (t, c) if a not in steps]
    if missing:
        raise DataError(f"no rows of arm(s) {', '.join(missing)}")
    picked = at_steps(rows, {t: steps[t], c: steps[c]})
    if not picked:
        raise DataError(f"arms '{t}' and '{c}' share no problems")
    grid = paired_grid(picked, t, c)
    problems = set(grid.problems)
    return [r for r in picked if (r["suite"], r["problem_id"]) in problems], grid


def contrast_delta(rows: Sequence[Row], contrast: ContrastSpec, steps: dict[str, int], resamples: int, seed: int,
                   stratum: str = "suite", macro: bool = False) -> Row:
    """paired_bootstrap of treatment - control at the given steps (seeds x problems), with each arm's accuracy on
    the shared problems (acc_t, acc_c: avg@k, seeds pooled; Δ = acc_t - acc_c when every seed drew the same
    number of samples). Never raises for data the arms disagree on: returns {"error": why} instead (arms with
    different seeds or no shared problem), so the report still shows the ledger that explains it."""
    try:
        shared, grid = shared_rows(rows, contrast, steps)
        result = paired_bootstrap(shared, contrast.treatment, contrast.control, resamples=resamples, seed=seed,
                                  stratum=stratum, macro=macro)
    except DataError as exc:
        return {"error": str(exc)}
    acc = {g["arm"]: g["avg_at_k"] for g in aggregate(shared, by=())}
    return {**result, "acc_t": acc[contrast.treatment], "acc_c": acc[contrast.control],
            "only_treatment": grid.only_treatment, "only_control": grid.only_control}


def step_deltas(rows: Sequence[Row], contrast: ContrastSpec, resamples: int, seed: int) -> list[Row]:
    """At every step both arms have rows for: {step, pooled, macro}, the Δ pooled over problems and the Δ
    macro-averaged over domains (each with its CI, resampling problems within domains and seeds)."""
    steps_of: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        steps_of[r["arm"]].add(r["step"])
    out = []
    for step in sorted(steps_of[contrast.treatment] & steps_of[contrast.control]):
        at = {contrast.treatment: step, contrast.control: step}
        out.append({"step": step, **{name: contrast_delta(rows, contrast, at, resamples, seed, "domain", macro)
                                     for name, macro in (("pooled", False), ("macro", True))}})
    return out


READINGS = {
    "better": "treatment better (CI above 0)",
    "worse": "treatment worse (CI below 0)",
    "equivalent": "equivalent within ±{m} (CI holds 0 and lies inside the margin: TOST)",
    "inconclusive": "inconclusive: the CI holds 0 but reaches beyond ±{m}",
    "no margin": "inconclusive: the CI holds 0 and no equivalence margin is declared (eval.equivalence_margin)",
}


def reading(d: Row, margin: float | None) -> str:
    """The verdict in words for a contrast_delta row (evals.metrics.interval_reading: better, worse,
    equivalent within ±margin, inconclusive); the error text for an error row. margin: a fraction."""
    if "error" in d:
        return d["error"]
    word = interval_reading(d["lo"], d["hi"], margin)
    if word == "inconclusive" and margin is None:
        word = "no margin"
    return READINGS[word].format(m=f"{100 * margin:g} pp" if margin is not None else "")


def contrast_power(rows: Sequence[Row], contrast: ContrastSpec, steps: dict[str, int], se: float | None = None,
                   alpha: float = 0.05, power: float = 0.8) -> Row:
    """minimum_detectable_delta of the contrast's design (its shared problems x samples x seeds at the steps),
    sized by `se` when given (the verdict's bootstrap se); {"error": why} when the arms cannot be paired or share
    fewer than 2 problems."""
    try:
        return minimum_detectable_delta(shared_rows(rows, contrast, steps)[1], alpha=alpha, power=power, se=se)
    except DataError as exc:
        return {"error": str(exc)}


def contrast_simpson(rows: Sequence[Row], contrast: ContrastSpec, steps: dict[str, int],
                     margin: float | None = None) -> Row:
    """quartile_simpson on the rows of the contrast's headline Δ (shared problems, the steps), with difficulty
    quartiles cut on every arm's rows at those steps (the quartile table's cut); a quartile within ±margin (the
    verdict's eval.equivalence_margin) opposes nothing; {"error": why} as above."""
    try:
        shared, _ = shared_rows(rows, contrast, steps)
    except DataError as exc:
        return {"error": str(exc)}
    return quartile_simpson(shared, contrast.treatment, contrast.control, difficulty_rows=at_steps(rows, steps),
                            margin=margin)
