"""MASA meta-prediction demonstrations in the SFT data (`sft.meta_predictions`).

MASA (arXiv 2510.03259) prompts the policy with a meta-prediction template (rewards.masa.meta_prompt) and parses a
JSON object from its answer. A hub model follows the instruction; the 1 M-parameter toy model follows nothing it
was not shown, so without demonstrations every prediction is malformed and MASA is inert. With
`sft.meta_predictions: s`, a share s of the SFT rows whose problem a world can analyse gets a second row right
after it: the template for the same problem, answered by the world (worlds.arith.meta_prediction_demo: its own
notions, the length in tokens of the solution the row teaches, and its declared pass-rate proxy).

The pass rate demonstrated is worlds.arith.pass_rate_proxy under per-risk-class slip rates: by default the
world's declared SLIP_BY_RISK; with `sft.meta_prediction_fit` the rates are fitted by maximum likelihood to the
model SFT starts from (the init checkpoint the stage loads: the only model that exists when the SFT data is
built), from its sampled solutions to a seeded sample of the demonstrated problems (`calibrate_slips`). The fit
and its calibration check are SFT facts.

The demonstrations are an SFT-data mechanism of their own (infra.spec mechanism `masa_prediction_sft`): an arm
pair that differs in it must declare it; configs/masa.yaml sets it for every arm, so the GRPO control starts from
the very same SFT checkpoint as the MASA arms.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from infra.errors import DataError
from rewards.masa import PASS_MAX, meta_prompt

if TYPE_CHECKING:
    from infra.spec import ComputeSpec, MetaPredictionFitSpec
    from worlds.arith import Problem


def with_meta_predictions(rows: list[dict[str, Any]], share: float, seed: int, tokenizer: Any,
                          fit: "MetaPredictionFitSpec | None" = None, model: Any = None,
                          compute: "ComputeSpec | None" = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows with the demonstration rows inserted, facts). The rows demonstrated are a seeded sample of round(share ×
    candidates) of the candidates (arith rows whose prompt worlds.arith.problem_of solves; check drills and other
    worlds' rows are none); each demonstration row follows its row, with id '<id>:meta-prediction', kind
    'meta_prediction', no wrong prefix and the row's other metadata. solution_length = the tokens of the row's
    assistant response plus its end-of-turn token (as rollouts count n_tokens).
    Pass rates: worlds.arith.pass_rate_proxy under the declared SLIP_BY_RISK, or with `fit` under the slip rates
    `calibrate_slips` fits to `model` (the init model; `compute` its device and precision).
    Facts: meta_prediction_rows, meta_prediction_candidates, meta_prediction_pass_rates (count per value),
    meta_prediction_slips (the slip rates used), and with `fit` meta_prediction_fit (see `calibrate_slips`).
    Raises ValueError when `fit` is given without `model` and `compute`; DataError when share > 0 and no row can be
    demonstrated, or the share rounds to no row (the key would not act)."""
    from worlds import arith

    if fit is not None and (model is None or compute is None):
        raise ValueError("with_meta_predictions: a meta_prediction_fit needs the init model and its compute")
    empty = {"meta_prediction_rows": 0, "meta_prediction_candidates": 0, "meta_prediction_pass_rates": {}}
    if share == 0:
        return rows, empty
    problems = {}
    for i, row in enumerate(rows):
        if row.get("source") == arith.SOURCE and row.get("domain") != arith.CHECK_DOMAIN:
            problem = arith.problem_of(row["messages"][-2]["content"], row.get("domain") or "", row.get("level") or 0)
            if problem is not None:
                problems[i] = problem
    if not problems:
        raise DataError(f"sft.meta_predictions {share}: none of the {len(rows)} SFT rows is a problem a world can "
                        f"write a meta-prediction demonstration for (arith rows only); set it to 0")
    k = round(share * len(problems))
    if k == 0:
        n = len(problems)
        raise DataError(f"sft.meta_predictions {share}: round({share} × {n} demonstrable SFT rows) = 0 "
                        f"demonstrations (the key would not act); set it to at least 1/{n} = {1 / n:.3g}, or 0")
    chosen = sorted(random.Random(f"masa-demos:{seed}").sample(sorted(problems), k))
    lengths = tokenizer([rows[i]["messages"][-1]["content"] for i in chosen], add_special_tokens=False)["input_ids"]
    slips, fit_facts = tuple(arith.SLIP_BY_RISK), {}
    if fit is not None:
        slips, fit_facts = calibrate_slips(model, tokenizer, [problems[i] for i in chosen], fit, seed, compute)
    demos: dict[int, dict[str, Any]] = {}
    rates: dict[str, int] = {}
    for i, ids in zip(chosen, lengths):
        row, problem = rows[i], problems[i]
        answer = arith.meta_prediction_demo(problem, len(ids) + 1, PASS_MAX, slips)
        rate = str(arith.pass_rate_proxy(problem, PASS_MAX, slips))
        rates[rate] = rates.get(rate, 0) + 1
        demos[i] = {**row, "id": f"{row['id']}:meta-prediction", "wrong_prefix": None, "kind": "meta_prediction",
                    "messages": [{"role": "user", "content": meta_prompt(problem.prompt, list(arith.NOTIONS))},
                                 {"role": "assistant", "content": answer}]}
    out = [r for i, row in enumerate(rows) for r in ((row, demos[i]) if i in demos else (row,))]
    return out, {"meta_prediction_rows": len(demos), "meta_prediction_candidates": len(problems),
                 "meta_prediction_pass_rates": dict(sorted(rates.items(), key=lambda kv: int(kv[0]))),
                 "meta_prediction_slips": list(slips), **fit_facts}


def calibration_table(counts: list[tuple[int, ...]], correct: list[int], samples: int, slips: tuple[float, ...],
                      out_of: int) -> list[dict[str, Any]]:
    """Calibration check of a pass model: problems grouped by the pass rate the model predicts,
    round(out_of × p), with per group the problems, the measured accuracy (correct samples / samples) and the
    share of problems whose samples were all wrong or all right (zero variance, what MASA's gating predicts);
    sorted by predicted pass rate."""
    from worlds.arith import pass_probability_of

    groups: dict[int, list[int]] = {}
    for n_c, k in zip(counts, correct, strict=True):
        groups.setdefault(round(out_of * pass_probability_of(n_c, slips)), []).append(k)
    return [{"pass_rate": r, "problems": len(ks), "accuracy": sum(ks) / (samples * len(ks)),
             "all_wrong": sum(k == 0 for k in ks) / len(ks), "all_right": sum(k == samples for k in ks) / len(ks)}
            for r, ks in sorted(groups.items())]


def calibrate_slips(model: Any, tokenizer: Any, problems: list["Problem"], fit: "MetaPredictionFitSpec",
                    seed: int, compute: "ComputeSpec") -> tuple[tuple[float, ...], dict[str, Any]]:
    """Slip rates per risk class fitted to `model`: a seeded sample of fit.problems of `problems` (all when fewer),
    fit.samples solutions each (evals.engine.HFEngine, fit.temperature, at most fit.max_new_tokens), graded by
    rewards.grader at GraderSpec's defaults (the SFT stage reads no grader.* key; the world's golds are
    integers, where the conventions agree), then worlds.arith.fit_slip_by_risk. A class no sampled problem has
    a step of keeps its declared SLIP_BY_RISK value. The model is left as it was (eval mode only while sampling,
    torch's global RNG untouched: HFEngine seeds each call).
    Returns (slips, {"meta_prediction_fit": facts}): problems, samples, accuracy (mean over all samples), slips,
    se, steps per class, identified (per class), log_lik and log_lik_declared (the declared SLIP_BY_RISK on the
    same samples), mean_pass_fitted / mean_pass_declared (mean predicted pass probability), calibration
    (`calibration_table` of the fit) and seconds."""
    import time

    from evals.engine import HFEngine, render_prompt, seed_for
    from infra.spec import GraderSpec
    from rewards.grader import get_grader
    from worlds import arith
    from worlds.model import resolve_device, resolve_precision

    t0 = time.perf_counter()
    picked = problems if len(problems) <= fit.problems else \
        random.Random(f"masa-fit:{seed}").sample(problems, fit.problems)
    device = resolve_device(compute)
    engine = HFEngine(model, tokenizer, device=device, precision=resolve_precision(compute, device))
    was_training = model.training
    model.eval()
    try:
        gens = engine.generate([render_prompt(tokenizer, p.prompt) for p in picked], n=fit.samples,
                               temperature=fit.temperature, max_new_tokens=fit.max_new_tokens,
                               seed=seed_for("masa-fit", seed))
    finally:
        model.train(was_training)
    grades = iter(get_grader(GraderSpec()).grade([g.text for gs in gens for g in gs],
                                                 [p.answer for p, gs in zip(picked, gens) for _ in gs]))
    correct = [sum(next(grades).correct for _ in gs) for gs in gens]
    counts = [arith.risk_counts(p) for p in picked]
    result = arith.fit_slip_by_risk(counts, correct, fit.samples)
    slips = result.filled()
    declared = tuple(arith.SLIP_BY_RISK)
    return slips, {"meta_prediction_fit": {
        "problems": len(picked), "samples": fit.samples, "accuracy": sum(correct) / (fit.samples * len(picked)),
        "slips": list(result.slips), "se": list(result.se), "steps": list(result.steps),
        "identified": [s is not None for s in result.slips], "log_lik": result.log_lik,
        "log_lik_declared": arith.binomial_log_lik(counts, correct, fit.samples, declared),
        "mean_pass_fitted": sum(arith.pass_probability(p, slips) for p in picked) / len(picked),
        "mean_pass_declared": sum(arith.pass_probability(p, declared) for p in picked) / len(picked),
        "calibration": calibration_table(counts, correct, fit.samples, slips, PASS_MAX),
        "seconds": time.perf_counter() - t0}}

