"""evals.metrics: exact values on hand-checkable cases, and the failure modes the report must not fall into."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from evals.metrics import (aggregate, avg_at_k, calibration, ece_brier, paired_bootstrap, pass_at_k,
                           problem_difficulty, quartile_table, regrade_stripped, simpson, simpson_check)
from infra.errors import DataError
from meta.grammar import last_boxed


def sample_rows(arm: str, correct_counts: list[int], n: int, suite: str = "s", step: int = 0,
                domain: str = "d", **extra) -> list[dict]:
    """n samples per problem i, the first correct_counts[i] of them correct."""
    return [{"arm": arm, "step": step, "suite": suite, "problem_id": f"p{i}", "domain": domain, "sample": j,
             "correct": j < c, "length": 10, "n_blocks": 0, "categories": [], "confidence": None, **extra}
            for i, c in enumerate(correct_counts) for j in range(n)]


# ---------------------------------------------------------------- pass@k

def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                exact = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 400, 3, 150
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(400, 0, 10) == 0.0 and pass_at_k(16, 1, 16) == 1.0


@pytest.mark.parametrize("n,c,k", [(8, 9, 1), (8, -1, 1), (8, 2, 0), (8, 2, 9)])
def test_pass_at_k_refuses_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_aggregate_per_suite_and_domain():
    rows = (sample_rows("a", [8, 4, 0], 8, suite="gsm8k", domain="gsm8k")
            + sample_rows("a", [16, 0], 16, suite="aime24", domain="aime"))
    by_suite = {r["suite"]: r for r in aggregate(rows, by=("suite",), ks=(1, 8, 16))}
    assert by_suite["gsm8k"]["avg_at_k"] == pytest.approx(0.5)
    assert by_suite["gsm8k"]["k"] == 8 and by_suite["gsm8k"]["problems"] == 3
    assert by_suite["gsm8k"]["pass_at_1"] == pytest.approx(0.5)
    assert by_suite["gsm8k"]["pass_at_8"] == pytest.approx(2 / 3)
    assert by_suite["gsm8k"]["pass_at_16"] is None  # k above the samples drawn: not estimable
    assert by_suite["aime24"]["pass_at_16"] == pytest.approx(0.5)
    (overall,) = aggregate(rows, by=(), ks=(1,))
    assert overall["problems"] == 5 and overall["k"] is None  # mixed n: no single k
    assert overall["avg_at_k"] == pytest.approx((1 + 0.5 + 0 + 1 + 0) / 5)  # problem-weighted
    assert avg_at_k([1, 0, 1, 1]) == 0.75


def test_sample_rows_are_checked():
    rows = sample_rows("a", [1], 2)
    with pytest.raises(DataError, match="row 2: field 'sample': duplicate sample 0"):
        aggregate(rows + [dict(rows[0])])
    with pytest.raises(DataError, match="row 0: field 'correct'"):
        aggregate([dict(rows[0], correct="yes")])
    bad = dict(rows[0])
    del bad["suite"]
    with pytest.raises(DataError, match="row 0: field 'suite': missing"):
        aggregate([bad])


# ---------------------------------------------------------------- calibration

def test_ece_and_brier_hand_computed():
    # bins of width 1/15: 0.9 -> bin 13 (acc 0.5, conf 0.9), 0.2 -> bin 3 (acc 0, conf 0.2)
    result = ece_brier([0.9, 0.9, 0.2, 0.2], [1, 0, 0, 0], bins=15)
    assert result["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.2)
    assert result["brier"] == pytest.approx((0.01 + 0.81 + 0.04 + 0.04) / 4)
    assert [b["bin"] for b in result["bins"]] == [3, 13]
    perfect = ece_brier([1.0, 1.0, 0.0], [1, 1, 0])  # 1.0 falls in the last (closed) bin
    assert perfect["ece"] == 0 and perfect["brier"] == 0 and perfect["bins"][-1]["bin"] == 14


def test_calibration_uses_stated_confidence_only_and_reports_coverage():
    rows = sample_rows("a", [1], 4)
    for row, conf in zip(rows, [0.9, None, 0.5, float("nan")]):
        row["confidence"] = conf
    (result,) = calibration(rows)
    assert result["stated"] == 2 and result["coverage"] == 0.5
    assert result["brier"] == pytest.approx((0.1 ** 2 + 0.5 ** 2) / 2)
    rows[1]["confidence"] = 1.5
    with pytest.raises(DataError, match="row 1: field 'confidence'"):
        calibration(rows)
    (none,) = calibration(sample_rows("a", [1], 2))
    assert none["coverage"] == 0 and none["ece"] is None


# ---------------------------------------------------------------- paired bootstrap

def planted(delta_eighths: int, problems: int = 300, seed: int = 1) -> list[dict]:
    """Control solves c_i of 8; treatment c_i + delta + noise(-1, 0, +1): a true mean difference of delta/8."""
    rng = np.random.default_rng(seed)
    control = rng.integers(1, 7, size=problems)
    treatment = np.clip(control + delta_eighths + rng.integers(-1, 2, size=problems), 0, 8)
    return sample_rows("t", treatment.tolist(), 8) + sample_rows("c", control.tolist(), 8)


def test_bootstrap_covers_a_planted_difference_and_is_seeded():
    rows = planted(1)
    result = paired_bootstrap(rows, "t", "c", resamples=2000, seed=7)
    assert result["lo"] < 0.125 < result["hi"]
    assert result["lo"] > 0 and result["p_le_0"] == 0
    assert result["lo"] <= result["delta"] <= result["hi"] and result["problems"] == 300
    assert paired_bootstrap(rows, "t", "c", resamples=2000, seed=7) == result
    other_seeds = {tuple(paired_bootstrap(rows, "t", "c", resamples=200, seed=s)[f] for f in ("lo", "hi"))
                   for s in range(4)}
    assert len(other_seeds) > 1  # the seed is what makes it repeatable, not a constant resample set
    null = paired_bootstrap(planted(0), "t", "c", resamples=2000, seed=7)
    assert null["lo"] < 0 < null["hi"] and 0.05 < null["p_le_0"] < 0.95


def test_bootstrap_resamples_problems_within_suites():
    # suite x: every problem +1, suite y: every problem 0 -> stratified resamples always give exactly 0.5
    rows = (sample_rows("t", [1] * 10, 1, suite="x") + sample_rows("c", [0] * 10, 1, suite="x")
            + sample_rows("t", [0] * 10, 1, suite="y") + sample_rows("c", [0] * 10, 1, suite="y"))
    strat = paired_bootstrap(rows, "t", "c", resamples=500)
    assert strat["lo"] == strat["hi"] == strat["delta"] == 0.5
    plain = paired_bootstrap(rows, "t", "c", resamples=500, stratify=False)
    assert plain["lo"] < 0.5 < plain["hi"]


def test_bootstrap_reports_unshared_problems_and_refuses_mixed_steps():
    rows = sample_rows("t", [1, 1, 1], 1) + sample_rows("c", [0, 0], 1)
    result = paired_bootstrap(rows, "t", "c", resamples=50)
    assert (result["problems"], result["only_treatment"], result["only_control"]) == (2, 1, 0)
    with pytest.raises(DataError, match="arm 't' has rows from steps"):
        paired_bootstrap(rows + sample_rows("t", [1], 1, step=5), "t", "c")


# ---------------------------------------------------------------- Simpson

KIDNEY = [  # Charig et al. 1986: A (open surgery) beats B (PCNL) on small and on large stones, loses pooled
    {"stratum": "small", "n_t": 87, "c_t": 81, "n_c": 270, "c_c": 234},
    {"stratum": "large", "n_t": 263, "c_t": 192, "n_c": 80, "c_c": 55},
]


def test_simpson_flags_the_kidney_stone_paradox():
    result = simpson(KIDNEY)
    assert result["pooled"] == pytest.approx(273 / 350 - 289 / 350)
    assert result["shared_sign"] == 1 and result["standardised"] > 0
    assert result["flag"] and "contradicts" in result["reason"]


def test_simpson_quiet_on_a_consistent_comparison():
    consistent = [{"stratum": "small", "n_t": 100, "c_t": 93, "n_c": 100, "c_c": 87},
                  {"stratum": "large", "n_t": 100, "c_t": 73, "n_c": 100, "c_c": 69}]
    result = simpson(consistent)
    assert not result["flag"] and result["reason"] == "" and result["pooled"] > 0
    mixed = [{"stratum": "a", "n_t": 50, "c_t": 40, "n_c": 50, "c_c": 30},
             {"stratum": "b", "n_t": 50, "c_t": 20, "n_c": 50, "c_c": 25}]
    assert not simpson(mixed)["flag"]  # strata disagree, pooled agrees with the common-weight estimate


def rows_from_counts(table: list[dict]) -> list[dict]:
    rows = []
    for s in table:
        rows += [{"arm": "A", "suite": s["stratum"], "correct": i < s["c_t"]} for i in range(s["n_t"])]
        rows += [{"arm": "B", "suite": s["stratum"], "correct": i < s["c_c"]} for i in range(s["n_c"])]
    return rows


def test_simpson_check_from_sample_rows():
    result = simpson_check(rows_from_counts(KIDNEY), "A", "B", stratum="suite")
    assert result["flag"] and {s["stratum"] for s in result["strata"]} == {"small", "large"}
    consistent = [dict(s, n_c=s["n_t"], c_c=round(s["c_c"] / s["n_c"] * s["n_t"])) for s in KIDNEY]
    assert not simpson_check(rows_from_counts(consistent), "A", "B")["flag"]  # same mix per arm: no reversal
    with pytest.raises(DataError, match="compares an arm with itself"):
        simpson_check(rows_from_counts(KIDNEY), "A", "A")


# ---------------------------------------------------------------- difficulty quartiles

def test_quartiles_are_pooled_over_all_arms():
    # Problem i is solved a_i/4 times by arm A and b_i/4 by arm B; pooled it is (a_i + b_i)/8 = (i + 1)/8, so the
    # pooled quartiles are Q4 = {p0, p1}, Q3 = {p2, p3}, Q2 = {p4, p5}, Q1 = {p6, p7}. Quartiles from one arm
    # alone would rank the problems differently for each arm.
    a = [0, 0, 0, 0, 1, 2, 3, 4]
    b = [1, 2, 3, 4, 4, 4, 4, 4]
    rows = sample_rows("A", a, 4) + sample_rows("B", b, 4)
    for row in rows:
        if row["arm"] == "A" and row["sample"] == 0:
            row.update(n_blocks=1, categories=["verify"])
    quartile = {d["problem_id"]: d["quartile"] for d in problem_difficulty(rows)}
    assert quartile == {"p0": 4, "p1": 4, "p2": 3, "p3": 3, "p4": 2, "p5": 2, "p6": 1, "p7": 1}
    table = {(r["arm"], r["quartile"]): r for r in quartile_table(rows)}
    assert all(r["problems"] == 2 for r in table.values()) and len(table) == 8
    assert [table[("A", q)]["accuracy"] for q in (1, 2, 3, 4)] == [0.875, 0.375, 0.0, 0.0]
    assert [table[("B", q)]["accuracy"] for q in (1, 2, 3, 4)] == [1.0, 1.0, 0.875, 0.375]
    assert table[("A", 4)]["meta_emission"] == 0.25 and table[("A", 4)]["cue_verify"] == 0.25
    assert table[("B", 4)]["meta_emission"] == 0.0 and table[("B", 4)]["cue_redirect"] == 0.0


def test_quartile_table_refuses_categories_as_a_string():
    rows = sample_rows("A", [1], 2)
    rows[0]["categories"] = "verify"
    with pytest.raises(DataError, match="field 'categories'"):
        quartile_table(rows)


# ---------------------------------------------------------------- meta-strip regrade

def test_regrade_stripped_finds_answers_carried_by_meta_blocks():
    calls = []

    def grade(response: str, gold: str) -> bool:
        calls.append(response)
        return last_boxed(response) == gold

    rows = [
        {"arm": "m", "sample": 0, "gold": "5", "correct": True,
         "response": "x <|meta|>so \\boxed{5}<|/meta|> done"},                       # answer lives in the block
        {"arm": "m", "sample": 1, "gold": "5", "correct": True,
         "response": "<|meta|>check: fine<|/meta|> so \\boxed{5}"},                  # block is commentary
        {"arm": "m", "sample": 2, "gold": "5", "correct": False, "response": "\\boxed{4}"},  # no block
    ]
    n_flips, flips = regrade_stripped(rows, grade)
    assert n_flips == 1 and flips[0]["sample"] == 0
    assert flips[0]["correct"] is True and flips[0]["correct_stripped"] is False
    assert calls == ["x  done", " so \\boxed{5}"]  # the unchanged response is not regraded
