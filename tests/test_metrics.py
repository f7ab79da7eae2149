"""evals.metrics: exact values on hand-checkable cases, and the failure modes the report must not fall into."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from evals.metrics import (aggregate, avg_at_k, calibration, ece_brier, interval_reading, minimum_detectable_delta,
                           paired_bootstrap, paired_grid, pass_at_k, problem_difficulty, quartile_simpson,
                           quartile_table, regrade_stripped, simpson, simpson_check)
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
    plain = paired_bootstrap(rows, "t", "c", resamples=500, stratum=None)
    assert plain["lo"] < 0.5 < plain["hi"]


def test_bootstrap_reports_unshared_problems_and_refuses_mixed_steps():
    rows = sample_rows("t", [1, 1, 1], 1) + sample_rows("c", [0, 0], 1)
    result = paired_bootstrap(rows, "t", "c", resamples=50)
    assert (result["problems"], result["only_treatment"], result["only_control"]) == (2, 1, 0)
    with pytest.raises(DataError, match="arm 't' has rows from steps"):
        paired_bootstrap(rows + sample_rows("t", [1], 1, step=5), "t", "c")


def seeded_rows(arm: str, per_seed: dict[int, list[int]], n: int, **kw) -> list[dict]:
    return [dict(r, seed=s) for s, counts in per_seed.items() for r in sample_rows(arm, counts, n, **kw)]


def test_one_seed_bootstrap_is_the_problem_bootstrap_and_seed_field_changes_nothing():
    rows = planted(1, problems=60)
    plain = paired_bootstrap(rows, "t", "c", resamples=500, seed=3)
    seeded = paired_bootstrap([dict(r, seed=0) for r in rows], "t", "c", resamples=500, seed=3)
    assert {k: seeded[k] for k in ("delta", "lo", "hi", "p_le_0")} == {k: plain[k] for k in ("delta", "lo", "hi",
                                                                                           "p_le_0")}
    assert seeded["seeds"] == [0] and seeded["per_seed"] == [{"seed": 0, "delta": plain["delta"]}]


def test_seed_bootstrap_reports_per_seed_deltas_and_widens_with_seed_variance():
    rng = np.random.default_rng(0)
    control = {s: rng.integers(2, 7, size=80).tolist() for s in (0, 1, 2)}
    # seed effects: the treatment is +2/8 in seed 0, 0 in seed 1, +4/8 in seed 2 (mean +2/8), problems vary too
    shift = {0: 2, 1: 0, 2: 4}
    treatment = {s: np.clip(np.array(c) + shift[s] + rng.integers(-1, 2, size=80), 0, 8).tolist()
                 for s, c in control.items()}
    rows = seeded_rows("t", treatment, 8) + seeded_rows("c", control, 8)
    result = paired_bootstrap(rows, "t", "c", resamples=2000, seed=1)
    grid = paired_grid(rows, "t", "c")
    assert result["seeds"] == [0, 1, 2] and grid.diff.shape == (3, 80) and grid.samples == 8
    assert [p["delta"] for p in result["per_seed"]] == pytest.approx(grid.diff.mean(axis=1).tolist())
    assert result["delta"] == pytest.approx(grid.diff.mean())
    # pooling the seeds as samples (problems only) ignores the seed-to-seed spread: a much narrower CI
    pooled = paired_bootstrap([dict(r, seed=None, sample=(r["seed"], r["sample"])) for r in rows], "t", "c",
                              resamples=2000, seed=1)
    assert pooled["delta"] == pytest.approx(result["delta"])
    assert (result["hi"] - result["lo"]) > 3 * (pooled["hi"] - pooled["lo"])
    with pytest.raises(DataError, match=r"arms ran different seeds \(t: \[0, 1, 2\], c: \[0, 1\]\)"):
        paired_bootstrap([r for r in rows if not (r["arm"] == "c" and r["seed"] == 2)], "t", "c")


def test_macro_over_domains_weighs_each_domain_the_same():
    # domain x (6 problems): +1 each; domain y (2 problems): 0 each -> pooled 6/8, macro (1 + 0) / 2
    rows = (sample_rows("t", [1] * 6, 1, domain="x") + sample_rows("c", [0] * 6, 1, domain="x")
            + [dict(r, problem_id="y" + r["problem_id"]) for r in sample_rows("t", [0, 0], 1, domain="y")
               + sample_rows("c", [0, 0], 1, domain="y")])
    pooled = paired_bootstrap(rows, "t", "c", resamples=300, stratum="domain")
    macro = paired_bootstrap(rows, "t", "c", resamples=300, stratum="domain", macro=True)
    assert pooled["delta"] == 0.75 and pooled["weighting"] == "pooled"
    assert macro["delta"] == pytest.approx(0.5) and macro["weighting"] == "macro over domain"
    assert macro["lo"] == pytest.approx(0.5) and macro["hi"] == pytest.approx(0.5)  # constant within domains
    with pytest.raises(DataError, match="macro average needs a stratum"):
        paired_bootstrap(rows, "t", "c", stratum=None, macro=True)


def test_minimum_detectable_delta_standard_error_matches_simulation():
    """Simulate the design (seeds x problems x samples) with seed, problem and sampling variance; the SE the
    function estimates must match the spread of Δ over repeated experiments, and a z-test at the true MDE
    (computed from that spread) must reject in about 80 % of them."""
    rng = np.random.default_rng(5)
    seeds, problems, k = 3, 60, 4
    base = rng.uniform(0.2, 0.8, size=problems)

    def experiment(true_delta: float) -> tuple[float, dict]:
        seed_fx = rng.normal(0, 0.04, size=seeds)
        rows = []
        for s in range(seeds):
            p_t = np.clip(base + true_delta + seed_fx[s] + rng.normal(0, 0.05, size=problems), 0, 1)
            rows += [dict(r, seed=s) for r in sample_rows("c", rng.binomial(k, base).tolist(), k)]
            rows += [dict(r, seed=s) for r in sample_rows("t", rng.binomial(k, p_t).tolist(), k)]
        grid = paired_grid(rows, "t", "c")
        return float(grid.diff.mean()), minimum_detectable_delta(grid)

    runs = [experiment(0.1) for _ in range(120)]
    estimates = np.array([est for est, _ in runs])
    first = runs[0][1]
    assert first["z"] == pytest.approx(1.959964 + 0.841621, abs=1e-5) and first["seed_variance_estimated"]
    assert (first["seeds"], first["problems"], first["samples"]) == (3, 60, 4) and first["sampling"] > 0
    mean_se = math.sqrt(np.mean([p["se"] ** 2 for _, p in runs]))
    assert mean_se == pytest.approx(estimates.std(ddof=1), rel=0.2)
    true_mde = first["z"] * estimates.std(ddof=1)
    assert np.mean(np.abs(estimates - 0.1 + true_mde) / estimates.std(ddof=1) > 1.959964) == pytest.approx(0.8,
                                                                                                          abs=0.1)


def test_minimum_detectable_delta_with_one_seed_is_the_paired_standard_error():
    rows = planted(1, problems=50)
    grid = paired_grid(rows, "t", "c")
    result = minimum_detectable_delta(grid)
    assert result["se"] == pytest.approx(grid.diff[0].std(ddof=1) / math.sqrt(50))
    assert result["mde"] == pytest.approx(result["z"] * result["se"]) and result["sigma2_seed"] is None
    assert not result["seed_variance_estimated"] and result["se_source"] == "components"
    sized = minimum_detectable_delta(grid, se=0.05)  # sized by the test the reader decides by (the bootstrap's se)
    assert sized["mde"] == pytest.approx(sized["z"] * 0.05) and sized["se_source"] == "bootstrap"
    assert sized["se_components"] == pytest.approx(result["se"])


@pytest.mark.parametrize("lo,hi,margin,reading", [
    (0.01, 0.05, 0.02, "better"), (-0.05, -0.01, None, "worse"), (-0.015, 0.012, 0.02, "equivalent"),
    (-0.015, 0.025, 0.02, "inconclusive"), (-0.01, 0.01, None, "inconclusive"), (-0.02, 0.01, 0.02, "inconclusive")])
def test_interval_reading_never_stays_silent(lo, hi, margin, reading):
    assert interval_reading(lo, hi, margin) == reading


def test_interval_reading_refuses_nonsense():
    with pytest.raises(ValueError, match="lo > hi"):
        interval_reading(0.1, 0.0, 0.02)
    with pytest.raises(ValueError, match="margin must be > 0"):
        interval_reading(-0.1, 0.1, 0.0)


# ---------------------------------------------------------------- Simpson

KIDNEY = [  # Charig et al. 1986: A (open surgery) beats B (PCNL) on small and on large stones, loses pooled
    {"stratum": "small", "n_t": 87, "acc_t_sum": 81, "n_c": 270, "acc_c_sum": 234},
    {"stratum": "large", "n_t": 263, "acc_t_sum": 192, "n_c": 80, "acc_c_sum": 55},
]


def test_simpson_flags_the_kidney_stone_reversal():
    result = simpson(KIDNEY)
    assert result["headline"] == pytest.approx(273 / 350 - 289 / 350)
    assert [s["delta"] > 0 for s in result["strata"]] == [True, True]
    assert result["flag"] and result["kind"] == "reversal" and "every stratum" in result["reason"]


def test_simpson_quiet_when_strata_agree_and_flags_any_stratum_against_the_headline():
    consistent = [{"stratum": "small", "n_t": 100, "acc_t_sum": 93, "n_c": 100, "acc_c_sum": 87},
                  {"stratum": "large", "n_t": 100, "acc_t_sum": 73, "n_c": 100, "acc_c_sum": 69}]
    result = simpson(consistent)
    assert not result["flag"] and result["kind"] is None and result["reason"] == "" and result["headline"] > 0
    mixed = [{"stratum": "a", "n_t": 50, "acc_t_sum": 40, "n_c": 50, "acc_c_sum": 30},
             {"stratum": "b", "n_t": 50, "acc_t_sum": 20, "n_c": 50, "acc_c_sum": 25}]
    flagged = simpson(mixed)  # headline +5 pp, stratum b -10 pp: the headline hides a stratum going the other way
    assert flagged["flag"] and flagged["kind"] == "disagreement" and "1 of 2 strata (b -0.1000)" in flagged["reason"]
    zero = [{"stratum": "a", "n_t": 10, "acc_t_sum": 5, "n_c": 10, "acc_c_sum": 4},
            {"stratum": "b", "n_t": 10, "acc_t_sum": 5, "n_c": 10, "acc_c_sum": 5}]
    assert not simpson(zero)["flag"]  # a stratum at exactly 0 opposes nothing


def rows_from_counts(table: list[dict]) -> list[dict]:
    """One problem per patient (one sample each), so per-problem accuracies are the outcomes."""
    rows = []
    for s in table:
        for arm, n, c in (("A", s["n_t"], s["acc_t_sum"]), ("B", s["n_c"], s["acc_c_sum"])):
            rows += [{"arm": arm, "step": 0, "suite": s["stratum"], "problem_id": f"{arm}{i}", "domain": "d",
                      "sample": 0, "correct": i < c} for i in range(n)]
    return rows


def test_simpson_check_from_sample_rows():
    result = simpson_check(rows_from_counts(KIDNEY), "A", "B", stratum="suite")
    assert result["flag"] and result["kind"] == "reversal"
    assert {s["stratum"] for s in result["strata"]} == {"small", "large"}
    consistent = [dict(s, n_c=s["n_t"], acc_c_sum=round(s["acc_c_sum"] / s["n_c"] * s["n_t"])) for s in KIDNEY]
    assert not simpson_check(rows_from_counts(consistent), "A", "B")["flag"]  # same mix per arm: no reversal
    with pytest.raises(DataError, match="compares an arm with itself"):
        simpson_check(rows_from_counts(KIDNEY), "A", "A")


# The constructed case: one AIME problem (16 samples) and one GSM8K problem (8 samples) per difficulty
# level; (aime control, aime treatment, gsm8k control, gsm8k treatment) correct samples per level.
CONSTRUCTED = [(12, 15, 7, 6), (8, 11, 6, 4), (4, 7, 4, 2), (0, 3, 2, 0)]


def constructed_rows() -> list[dict]:
    rows = []
    for level, (ac, at, gc, gt) in enumerate(CONSTRUCTED):
        for arm, aime, gsm in (("t", at, gt), ("c", ac, gc)):
            rows += [dict(r, problem_id=f"aime-{level}") for r in sample_rows(arm, [aime], 16, suite="aime24",
                                                                               domain="aime")]
            rows += [dict(r, problem_id=f"gsm-{level}") for r in sample_rows(arm, [gsm], 8, suite="gsm8k",
                                                                              domain="gsm8k")]
    return rows


def test_constructed_case_simpson_uses_the_headline_weighting():
    rows = constructed_rows()
    headline = paired_bootstrap(rows, "t", "c", resamples=200)["delta"]
    assert headline == pytest.approx(-1 / 64)  # -1.6 pp: each problem weighs the same
    quartile = {d["problem_id"]: d["quartile"] for d in problem_difficulty(rows)}
    assert quartile == {f"{s}-{lvl}": lvl + 1 for s in ("aime", "gsm") for lvl in range(4)}  # one of each per Q
    result = quartile_simpson(rows, "t", "c")
    assert result["headline"] == pytest.approx(headline)  # the same number the verdict shows
    assert [round(100 * s["delta"], 1) for s in result["strata"]] == [3.1, -3.1, -3.1, -3.1]
    assert result["flag"] and result["kind"] == "disagreement" and "1 of 4 strata (1 +0.0312)" in result["reason"]
    table = {(r["arm"], r["quartile"]): r["accuracy"] for r in quartile_table(rows)}
    assert [table["t", q] - table["c", q] for q in (1, 2, 3, 4)] == pytest.approx(
        [s["delta"] for s in result["strata"]])  # the Simpson line and the quartile table agree


def test_a_quartile_within_the_equivalence_margin_opposes_nothing():
    # The constructed case: headline -1.6 pp, Q1 +3.1 pp against it. With the 5 pp margin of the sensitivity run
    # Q1 is equivalent to 0 (no flag: the false alarm of a -0.5 pp quartile under a +34 pp headline); with a
    # 3 pp margin +3.125 pp is beyond it and still flags, naming the margin.
    rows = constructed_rows()
    loose = quartile_simpson(rows, "t", "c", margin=0.05)
    assert not loose["flag"] and loose["kind"] is None and loose["reason"] == "" and loose["margin"] == 0.05
    assert [round(100 * s["delta"], 1) for s in loose["strata"]] == [3.1, -3.1, -3.1, -3.1]  # strata unchanged
    tight = quartile_simpson(rows, "t", "c", margin=0.03)
    assert tight["flag"] and tight["kind"] == "disagreement"
    assert tight["reason"].endswith("(1 +0.0312) beyond the margin ±0.03")
    assert quartile_simpson(rows, "t", "c")["flag"]  # no margin: the strict sign rule, as before
    with pytest.raises(ValueError, match="margin must be ≥ 0"):
        quartile_simpson(rows, "t", "c", margin=-0.01)


def test_simpson_reversal_under_per_problem_weighting_when_problem_mixes_differ():
    # The treatment answered 1 easy + 4 hard problems, the control 4 easy + 1 hard (e.g. failed generations):
    # within each quartile the treatment is better, over its own problems it looks worse.
    def problems(arm: str, level: str, count: int, correct: int) -> list[dict]:
        return [dict(r, problem_id=f"{level}{i}", level=level) for i in range(count)
                for r in sample_rows(arm, [correct], 4)]

    rows = (problems("t", "easy", 1, 4) + problems("t", "hard", 4, 1)    # t: 1.0 on easy, 0.25 on hard
            + problems("c", "easy", 4, 3) + problems("c", "hard", 1, 0))  # c: 0.75 on easy, 0 on hard
    result = simpson_check(rows, "t", "c", stratum="level")
    assert {s["stratum"]: s["delta"] for s in result["strata"]} == pytest.approx({"easy": 0.25, "hard": 0.25})
    assert result["headline"] == pytest.approx((1 + 4 * 0.25) / 5 - (4 * 0.75) / 5)
    assert result["headline"] < 0 and result["flag"] and result["kind"] == "reversal"
    # every stratum +25 pp against the headline: beyond a 20 pp margin still a reversal, within 30 pp none
    assert simpson_check(rows, "t", "c", stratum="level", margin=0.2)["kind"] == "reversal"
    assert not simpson_check(rows, "t", "c", stratum="level", margin=0.3)["flag"]


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


@pytest.mark.parametrize("n", [4, 5, 7, 9, 30])
def test_quartiles_have_equal_counts_even_when_every_problem_ties(n):
    rows = sample_rows("A", [2] * n, 2) + sample_rows("B", [2] * n, 2)  # every problem solved: one difficulty
    sizes = np.bincount([d["quartile"] for d in problem_difficulty(rows)], minlength=5)[1:]
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    # the tie-break is a hash of the problem id: the same assignment whatever the row order
    shuffled = list(reversed(rows))
    assert ({d["problem_id"]: d["quartile"] for d in problem_difficulty(shuffled)}
            == {d["problem_id"]: d["quartile"] for d in problem_difficulty(rows)})


def test_quartiles_rank_by_difficulty_before_the_tie_break():
    rows = sample_rows("A", [4, 4, 4, 4, 0, 0, 0, 0], 4)  # p0-p3 solved, p4-p7 never
    quartile = {d["problem_id"]: d["quartile"] for d in problem_difficulty(rows)}
    assert {quartile[f"p{i}"] for i in range(4)} == {1, 2} and {quartile[f"p{i}"] for i in range(4, 8)} == {3, 4}


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


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), 1.0, 1.5, True, "0.05", -0.01])
def test_a_margin_that_would_decide_every_comparison_alike_is_refused(margin):
    # NaN made `|delta| > margin` false for every stratum (the check never flags) and `-margin < lo` false (never
    # equivalent); a margin ≥ 1 (or True, read as 1) holds every possible difference of accuracies
    rows = constructed_rows()
    with pytest.raises(ValueError, match=r"Simpson check: margin must be (a number )?≥ 0 and < 1"):
        quartile_simpson(rows, "t", "c", margin=margin)
    with pytest.raises(ValueError, match=r"equivalence margin must be (a number )?> 0 and < 1"):
        interval_reading(-0.01, 0.01, margin)


def test_a_margin_inside_the_unit_interval_is_read():
    rows = constructed_rows()
    assert quartile_simpson(rows, "t", "c", margin=0)["flag"]  # 0: the strict sign rule
    assert not quartile_simpson(rows, "t", "c", margin=np.float32(0.05))["flag"]  # numpy scalars are numbers
    assert interval_reading(-0.01, 0.01, np.float64(0.02)) == "equivalent"
    assert interval_reading(-0.01, 0.01, None) == "inconclusive"
