"""Calibrating the MASA meta-prediction demonstrations to a model (`sft.meta_prediction_fit`): the per-risk-class
slip fit of worlds.arith on constructed cases with known answers, the calibration table, `calibrate_slips` on a
stand-in engine whose correct counts are known, the demonstrations it produces, and the spec's refusals."""
from __future__ import annotations

import math
import random

import pytest

from infra.spec import BaseSpec, MetaPredictionFitSpec, SFTSpec, mechanism_of
from rewards.masa import PASS_MAX, parse_prediction
from sft.masa_demos import calibrate_slips, calibration_table, with_meta_predictions
from worlds import arith


def test_fit_of_one_class_is_the_pooled_accuracy():
    # 3 problems of one class-2 step each, 8 samples: 6 + 2 + 4 = 12 of 24 right → p = 0.5 → slip 0.5 exactly;
    # two class-0 steps per problem with 18 of 32 right: (1 − s)² = 18/32 → s = 1 − 0.75 = 0.25
    fit = arith.fit_slip_by_risk([(0, 0, 1, 0)] * 3, [6, 2, 4], 8)
    assert fit.slips[2] == pytest.approx(0.5, abs=1e-5)
    assert fit.slips[0] is None and fit.slips[1] is None and fit.slips[3] is None  # no step: not identified
    assert fit.steps == (0, 0, 3, 0)
    # se of p̂ for a binomial: sqrt(p(1−p)/N) = sqrt(0.25/24); slip = 1 − p, so the same
    assert fit.se[2] == pytest.approx(math.sqrt(0.25 / 24), rel=1e-3)
    assert fit.filled() == (arith.SLIP_BY_RISK[0], arith.SLIP_BY_RISK[1], pytest.approx(0.5, abs=1e-5),
                            arith.SLIP_BY_RISK[3])
    two = arith.fit_slip_by_risk([(2, 0, 0, 0)] * 4, [8, 2, 4, 4], 8)
    assert two.slips[0] == pytest.approx(0.25, abs=1e-5)
    # log-likelihood at the fit: Σ k log p + (S − k) log(1 − p) with p = 0.5 → 24 · log 0.5
    assert fit.log_lik == pytest.approx(24 * math.log(0.5), abs=1e-6)


def test_fit_recovers_known_slips_from_simulated_solutions():
    truth = (0.02, 0.1, 0.3, 0.5)
    rng = random.Random(0)
    counts = [tuple(rng.randint(0, 2) for _ in range(4)) for _ in range(3000)]
    counts = [c if sum(c) else (1, 0, 0, 0) for c in counts]
    correct = []
    for c in counts:
        p = math.prod((1 - s) ** n for s, n in zip(truth, c))
        correct.append(sum(rng.random() < p for _ in range(8)))
    fit = arith.fit_slip_by_risk(counts, correct, 8)
    for s, se, t in zip(fit.slips, fit.se, truth):
        assert abs(s - t) < 4 * se and se < 0.02  # within 4 standard errors, which are small at this size
    # the fit beats the declared rates on these samples (it maximises the same likelihood)
    assert fit.log_lik > arith.binomial_log_lik(counts, correct, 8, arith.SLIP_BY_RISK)


def test_fit_at_the_bounds_and_bad_input():
    # every sample right: slip 0 (θ on its bound, no se); every sample wrong: slip ~1
    assert arith.fit_slip_by_risk([(1, 0, 0, 0)] * 2, [8, 8], 8).slips[0] == pytest.approx(0.0, abs=1e-6)
    assert arith.fit_slip_by_risk([(1, 0, 0, 0)] * 2, [8, 8], 8).se[0] is None
    assert arith.fit_slip_by_risk([(0, 0, 0, 1)] * 2, [0, 0], 8).slips[3] > 0.999
    with pytest.raises(ValueError, match=r"problem 1: expected 4 step counts ≥ 0 and a correct count in 0..8, "
                                         r"got \[1, 0, 0, 0\] and 9"):
        arith.fit_slip_by_risk([(1, 0, 0, 0)] * 2, [8, 9], 8)
    with pytest.raises(ValueError, match="problem 0: expected 4 step counts"):
        arith.fit_slip_by_risk([(1, 0, 0)], [1], 8)
    with pytest.raises(ValueError, match="need samples ≥ 1 and one correct count per problem"):
        arith.fit_slip_by_risk([], [], 8)


def test_binomial_log_lik_by_hand():
    # one problem with one class-1 step at slip 0.2: 6 of 8 right → 6 log 0.8 + 2 log 0.2
    assert arith.binomial_log_lik([(0, 1, 0, 0)], [6], 8, (0, 0.2, 0, 0)) == pytest.approx(
        6 * math.log(0.8) + 2 * math.log(0.2))
    assert arith.binomial_log_lik([(1, 0, 0, 0)], [7], 8, (0, 0, 0, 0)) == -math.inf  # a wrong sample at p = 1


def test_pass_rate_under_given_slips():
    problem = arith.Problem("paren", 1, "Compute 7-3*(2-5).", "7-3*(2-5)",
                            tuple(arith.solve(arith.parse("7-3*(2-5)"))))
    assert arith.risk_counts(problem) == (0, 3, 0, 0)
    assert arith.pass_probability(problem, (0, 0.5, 0, 0)) == pytest.approx(0.125)
    assert arith.pass_rate_proxy(problem, PASS_MAX, (0, 0.5, 0, 0)) == 1  # round(8 × 0.125)
    assert arith.pass_rate_proxy(problem, PASS_MAX, (0, 0.7, 0, 0)) == 0  # round(8 × 0.027)
    assert arith.pass_rate_proxy(problem, PASS_MAX) == 7  # the declared default, unchanged
    assert '"pass_rate": 0' in arith.meta_prediction_demo(problem, 31, PASS_MAX, (0, 0.7, 0, 0))


def test_calibration_table_groups_by_predicted_rate():
    # slips (0, 0, 0.5, 0.9): (0,0,0,0)-like problems → 8; one class-2 step → round(4) = 4; one class-3 → round(0.8) = 1
    slips = (0.0, 0.0, 0.5, 0.9)
    counts = [(1, 0, 0, 0), (2, 0, 0, 0), (0, 0, 1, 0), (0, 0, 1, 0), (0, 0, 0, 1)]
    table = calibration_table(counts, [8, 6, 0, 4, 0], 8, slips, PASS_MAX)
    assert table == [
        {"pass_rate": 1, "problems": 1, "accuracy": 0.0, "all_wrong": 1.0, "all_right": 0.0},
        {"pass_rate": 4, "problems": 2, "accuracy": 0.25, "all_wrong": 0.5, "all_right": 0.0},
        {"pass_rate": 8, "problems": 2, "accuracy": 14 / 16, "all_wrong": 0.0, "all_right": 0.5},
    ]


class _Gen:
    def __init__(self, text):
        self.text, self.token_ids = text, [1]


class _Model:
    training = True

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self


def _stand_in_engine(per_problem_correct, calls):
    """An HFEngine stand-in: for the prompt of problem p, per_problem_correct(p) of n samples box the right answer,
    the rest a wrong one; records the generate calls and whether the model was in eval mode then."""

    class Engine:
        def __init__(self, model, tokenizer, device="cpu", precision="fp32"):
            self.model = model

        def generate(self, prompts, n, temperature, max_new_tokens, seed, **_):
            calls.append({"prompts": len(prompts), "n": n, "temperature": temperature,
                          "max_new_tokens": max_new_tokens, "eval": not self.model.training})
            out = []
            for prompt in prompts:
                problem = next(p for p in per_problem_correct if p.prompt in prompt)
                k = per_problem_correct[problem]
                out.append([_Gen(f"\\boxed{{{problem.answer if i < k else int(problem.answer) + 1}}}")
                            for i in range(n)])
            return out

    return Engine


class _Tok:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}<assistant>"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(range(len(t))) for t in texts]}


def _world_rows():
    from infra.spec import ArithWorldSpec

    world = arith.generate_world(ArithWorldSpec(n_base=10, n_sft1=60, n_sft2=20, n_rl=1, n_val_per_domain=1,
                                                n_heldout=1))
    return world["sft1"] + world["sft2"]


def test_calibrate_slips_on_a_stand_in_model_with_known_correct_counts(monkeypatch):
    """A 'model' that solves a problem right 8 times if it has no step of risk ≥ 2 and never otherwise: the fit
    gives classes 0–1 slip ~0 and classes 2–3 slip ~1, the demonstrations then say 8 or 0, and the facts hold the
    measured accuracy and calibration exactly."""
    from infra.spec import ComputeSpec
    import evals.engine

    rows = _world_rows()
    problems = [arith.problem_of(r["messages"][0]["content"], r["domain"], r["level"]) for r in rows]
    problems = [p for p in problems if p is not None]
    known = {p: 8 if max(arith.risk(s) for s in p.steps) < 2 else 0 for p in problems}
    calls: list = []
    monkeypatch.setattr(evals.engine, "HFEngine", _stand_in_engine(known, calls))
    model = _Model()
    fit = MetaPredictionFitSpec(problems=20, samples=4, temperature=0.7, max_new_tokens=160)
    slips, facts = calibrate_slips(model, _Tok(), problems, fit, 0, ComputeSpec(device="cpu", precision="fp32"))
    f = facts["meta_prediction_fit"]
    assert calls == [{"prompts": 20, "n": 4, "temperature": 0.7, "max_new_tokens": 160, "eval": True}]
    assert model.training  # restored
    assert f["problems"] == 20 and f["samples"] == 4
    picked_right = f["accuracy"] * 20 * 4
    assert picked_right == pytest.approx(round(picked_right))  # whole samples
    assert slips[0] < 1e-4 and slips[1] < 1e-4 and slips[2] > 0.99 and slips[3] > 0.99
    assert f["log_lik"] > f["log_lik_declared"]
    # every problem the fit predicts 8 for was all right, every 0 all wrong: the calibration is exact here
    assert {row["pass_rate"]: (row["accuracy"], row["all_wrong"], row["all_right"]) for row in f["calibration"]} == \
        {0: (0.0, 1.0, 0.0), 8: (1.0, 0.0, 1.0)}
    assert f["mean_pass_fitted"] == pytest.approx(f["accuracy"], abs=1e-3)


def test_with_meta_predictions_fitted_pass_rates_and_default_unchanged(monkeypatch):
    from infra.spec import ComputeSpec
    import evals.engine

    rows = _world_rows()
    problems = {p.prompt: p for r in rows if (p := arith.problem_of(r["messages"][0]["content"]))}
    known = {p: 8 if max(arith.risk(s) for s in p.steps) < 2 else 0 for p in problems.values()}
    monkeypatch.setattr(evals.engine, "HFEngine", _stand_in_engine(known, []))
    fit = MetaPredictionFitSpec(problems=500, samples=2, temperature=0.7, max_new_tokens=160)
    compute = ComputeSpec(device="cpu", precision="fp32")
    out, facts = with_meta_predictions(rows, 1.0, 0, _Tok(), fit, _Model(), compute)
    plain, plain_facts = with_meta_predictions(rows, 1.0, 0, _Tok())
    assert plain_facts["meta_prediction_slips"] == list(arith.SLIP_BY_RISK) and "meta_prediction_fit" not in \
        plain_facts
    assert facts["meta_prediction_fit"]["problems"] == len(problems)  # fewer than 500: all of them
    fitted, declared = {}, {}
    for demos, into in ((out, fitted), (plain, declared)):
        for r in demos:
            if r["kind"] == "meta_prediction":
                into[r["id"]] = parse_prediction(r["messages"][1]["content"]).pass_rate
    assert fitted.keys() == declared.keys()
    for rid, rate in fitted.items():
        problem = problems[next(r for r in rows if f"{r['id']}:meta-prediction" == rid)["messages"][0]["content"]]
        assert rate == (8 if max(arith.risk(s) for s in problem.steps) < 2 else 0)
        assert declared[rid] == arith.pass_rate_proxy(problem, PASS_MAX)
    assert set(facts["meta_prediction_pass_rates"]) <= {"0", "8"}
    with pytest.raises(ValueError, match="needs the init model and its compute"):
        with_meta_predictions(rows, 1.0, 0, _Tok(), fit)


def test_fit_spec_refusals_and_mechanism():
    fit = MetaPredictionFitSpec()
    assert SFTSpec(meta_predictions=0.3, meta_prediction_fit=fit).meta_prediction_fit == fit
    with pytest.raises(ValueError, match="meta_prediction_fit calibrates .* but meta_predictions is 0"):
        SFTSpec(meta_prediction_fit=fit)
    sft = {"meta_predictions": 0.3, "meta_prediction_fit": {"temperature": 0.7, "max_new_tokens": 160}}
    ok = BaseSpec(sft=sft, rl={"temperature": 0.7, "max_response_length": 160})
    assert ok.sft.meta_prediction_fit.samples == 8
    with pytest.raises(ValueError, match=r"samples at temperature 0.7 with at most 160 tokens, but .* "
                                         r"rl.temperature 0.6 and rl.max_response_length 160"):
        BaseSpec(sft=sft, rl={"temperature": 0.6, "max_response_length": 160})
    with pytest.raises(ValueError, match="tool is 'arith_check'"):
        BaseSpec(sft=sft, rl={"temperature": 0.7, "max_response_length": 160}, tool="arith_check")
    with pytest.raises(ValueError):
        SFTSpec(meta_predictions=0.3, meta_prediction_fit={"problems": 0})
    with pytest.raises(ValueError):
        SFTSpec(meta_predictions=0.3, meta_prediction_fit={"sample": 8})  # a typo is refused, not ignored
    assert mechanism_of("sft.meta_prediction_fit") == "masa_prediction_sft"
    assert mechanism_of("sft.meta_prediction_fit.problems") == "masa_prediction_sft"
