"""Reward signals on hand-built log-prob tables, every expected value computed by hand in the comments.

The problem: 7 − 3·(2 − 5) = 16 (gold); the sign slip 2 − 5 = 3 gives 7 − 9 = −2 (decoy). With the test tokenizer
`\\boxed{16}` = [\\boxed{, 1, 6, }] and `\\boxed{-2}` = [\\boxed{, -, 2, }]: equal lengths, differing positions
D = {1, 2}, so B(ctx) = [lp(1|\\boxed{) + lp(6|\\boxed{1)] − [lp(-|\\boxed{) + lp(2|\\boxed{-)].
"""
from __future__ import annotations

import math

import pytest

from infra.spec import RLSpec, SignalParams
from rewards import masa
from rewards.pipeline import Sample, score_batch
from rewards.scorer import PieceTokenizer, TableScorer
from rewards.signals import PLACEBO_CONTENT, SIGNALS, Rollout, SignalContext, asym_cf_value, score_group
from meta.grammar import last_boxed

TOK = PieceTokenizer()
X = "Q: 7-3*(2-5)=?\nA: "
PLACEBO = "<|meta|>" + PLACEBO_CONTENT + "<|/meta|>"

# SAVE: the prefix slips (2-5=3), the block catches it, the continuation answers 16.
P_SAVE, M_SAVE, C_SAVE = "2-5=3, 3*3=9, 7-9=-2.\n", "<|meta|>check: 2-5=-3, not 3. Sign slip.<|/meta|>", \
    "\nSo \\boxed{16}"
# DERAIL: the prefix is right, the block talks the model into the slip, the answer is -2.
P_DER, M_DER, C_DER = "2-5=-3, 3*(-3)=-9, 7+9=16.\n", "<|meta|>maybe the sign is wrong: 7-9=-2<|/meta|>", \
    "\n\\boxed{-2}"
# Decorative: right prefix, a block that only states a confidence.
P_DEC, M_DEC, C_DEC = "2-5=-3, 7-3*(-3)=7+9=16.\n", "<|meta|>confidence 0.78, looks right<|/meta|>", "\n\\boxed{16}"
NO_BLOCK = "7-3*(-3)=16\n\\boxed{16}"


def belief(ctx: str, g1: float, g2: float, d1: float, d2: float) -> dict:
    """Table entries for lp(1), lp(6|1) of the gold and lp(-), lp(2|-) of the decoy after ctx."""
    return {(ctx, "\\boxed{"): {"1": g1, "-": d1}, (ctx, "\\boxed{1"): {"6": g2}, (ctx, "\\boxed{-"): {"2": d2}}


TABLE = {
    # SAVE. o: gold −2.5−0.5 = −3.0, decoy −0.4−0.3 = −0.7 → o = −2.3 (drifting to −2)
    **belief(X + P_SAVE, -2.5, -0.5, -0.4, -0.3),
    #       c: gold −0.2−0.1 = −0.3, decoy −3.0−0.6 = −3.6 → c = +3.3 (gold dominates after the block)
    **belief(X + P_SAVE + M_SAVE, -0.2, -0.1, -3.0, -0.6),
    #       placebo: gold −2.0−0.5 = −2.5, decoy −0.5−0.3 = −0.8 → B = −1.7
    **belief(X + P_SAVE + PLACEBO, -2.0, -0.5, -0.5, -0.3),
    # DERAIL. o: gold −0.5−0.2 = −0.7, decoy −0.9−0.3 = −1.2 → o = +0.5
    **belief(X + P_DER, -0.5, -0.2, -0.9, -0.3),
    #       c: gold −1.5−0.3 = −1.8, decoy −0.8−0.3 = −1.1 → c = −0.7
    **belief(X + P_DER + M_DER, -1.5, -0.3, -0.8, -0.3),
    #       placebo: gold −0.6−0.2 = −0.8, decoy −0.9−0.3 = −1.2 → B = +0.4
    **belief(X + P_DER + PLACEBO, -0.6, -0.2, -0.9, -0.3),
    # Decorative: gold and decoy move together. o: −0.6 − (−2.4) = 1.8; c: −0.4 − (−2.2) = 1.8
    **belief(X + P_DEC, -0.5, -0.1, -2.0, -0.4),
    **belief(X + P_DEC + M_DEC, -0.3, -0.1, -1.8, -0.4),
    #       placebo: −0.5 − (−2.3) = 1.8
    **belief(X + P_DEC + PLACEBO, -0.4, -0.1, -1.9, -0.4),
    # PMI entries on the continuations (every other token takes the default −1.0 under both contexts → 0)
    (X + P_SAVE + M_SAVE, "\nSo \\boxed{"): {"1": -0.1}, (X + P_SAVE + M_SAVE, "\nSo \\boxed{1"): {"6": -0.1},
    (X + P_SAVE, "\nSo \\boxed{"): {"1": -1.5}, (X + P_SAVE, "\nSo \\boxed{1"): {"6": -0.2},
    (X + P_DER + M_DER, "\n\\boxed{"): {"-": -0.2}, (X + P_DER, "\n\\boxed{"): {"-": -2.5},
    (X + P_DEC + M_DEC, "\n\\boxed{"): {"1": -0.2}, (X + P_DEC, "\n\\boxed{"): {"1": -0.6},
    (X + P_DEC + PLACEBO, "\n\\boxed{"): {"1": -0.3},
}


def rollout(response: str, correct: bool, decoy: str | None = "-2", gold: str = "16") -> Rollout:
    return Rollout(prompt=X, response=response, gold=gold, decoy=decoy, correct=correct)


def group() -> list[Rollout]:
    return [rollout(P_SAVE + M_SAVE + C_SAVE, True), rollout(P_DER + M_DER + C_DER, False),
            rollout(P_DEC + M_DEC + C_DEC, True), rollout(NO_BLOCK, True)]


def ctx(params: SignalParams | None = None, table: dict | None = None, **kw) -> SignalContext:
    return SignalContext(params=params or SignalParams(), scorer=TableScorer(TOK, TABLE if table is None else table),
                         tokenizer=TOK, **kw)


def values(results) -> list:
    return [r.value for r in results]


def test_registry_names():
    assert {"vanilla", "pmishift", "pmi", "gm", "cf", "asym_cf", "masa"} <= set(SIGNALS)
    with pytest.raises(KeyError, match="unknown reward signal 'pmishfit'"):
        score_group("pmishfit", group(), ctx())


def test_vanilla_makes_no_scorer_call():
    c = ctx()
    res = score_group("vanilla", group(), c)
    assert values(res) == [None] * 4 and {r.extras["skip"] for r in res} == {"vanilla"}
    assert c.scorer.calls == 0 and c.scorer.forwards == 0


def test_pmishift_save_derail_decorative():
    c = ctx()
    res = score_group("pmishift", group(), c)
    save, derail, deco, none = res
    # SAVE: c − o = 3.3 − (−2.3) = 5.6 → clip(5.6, ±2) = 2; o < 0 < c → +a = 1.  R = 1·2 + 1 = 3.0
    assert save.extras["o"] == pytest.approx(-2.3) and save.extras["c"] == pytest.approx(3.3)
    assert save.extras["save"] and not save.extras["derail"]
    assert save.value == pytest.approx(3.0)
    # DERAIL: c − o = −0.7 − 0.5 = −1.2 (inside ±2); o > 0 > c → −b = −2.  R = −1.2 − 2 = −3.2
    assert derail.extras["derail"] and not derail.extras["save"]
    assert derail.value == pytest.approx(-3.2)
    # decorative: o = c = 1.8 → shift 0, no flag → R = 0
    assert deco.extras["shift"] == pytest.approx(0.0, abs=1e-12) and deco.value == pytest.approx(0.0, abs=1e-12)
    assert not deco.extras["save"] and not deco.extras["derail"]
    assert none.value is None and none.extras["skip"] == "no_block"
    # one batched call: 3 scored rollouts × 2 contexts × (gold, decoy)
    assert c.scorer.calls == 12


def test_pmishift_params_and_matched_position():
    p = SignalParams(pmishift={"scale": 0.5, "kappa": 1.0, "save_bonus": 2.0, "derail_penalty": 1.0})
    # SAVE: 0.5·clip(5.6, ±1) + 2 = 2.5; DERAIL: 0.5·clip(−1.2, ±1) − 1 = −1.5
    assert values(score_group("pmishift", group()[:2], ctx(p))) == pytest.approx([2.5, -1.5])
    # eps = 0.6 switches both flags off (|o| = 0.5 for DERAIL, and c = 3.3, o = −2.3 keeps SAVE on)
    p = SignalParams(pmishift={"eps": 0.6})
    assert values(score_group("pmishift", group()[:2], ctx(p))) == pytest.approx([3.0, -1.2])
    # matched: o = B(x∘p∘placebo). SAVE: o = −1.7, c − o = 5.0 → 2 + 1 = 3.0.
    # DERAIL: o = 0.4, c − o = −1.1 → −1.1 − 2 = −3.1. Decorative: 1.8 − 1.8 = 0.
    c = ctx(SignalParams(pmishift={"position": "matched"}))
    res = score_group("pmishift", group()[:3], c)
    assert values(res) == pytest.approx([3.0, -3.1, 0.0], abs=1e-9)
    assert res[1].extras["o"] == pytest.approx(0.4) and res[1].extras["position"] == "matched"
    assert (X + P_DER + PLACEBO, "\\boxed{-2}") in c.scorer.log


def test_pmishift_skips():
    # "-12" is [-, 1, 2]: 5 tokens in \boxed{-12} against 4 in \boxed{16} → skipped before any scorer call
    c = ctx()
    res = score_group("pmishift", [rollout(P_SAVE + M_SAVE + C_SAVE, True, decoy="-12")], c)
    assert res[0].value is None and res[0].extras["skip"] == "token_length_mismatch" and c.scorer.calls == 0
    res = score_group("pmishift", [rollout(P_SAVE + M_SAVE + C_SAVE, True, decoy=None)], c)
    assert res[0].extras["skip"] == "no_decoy"
    boxed = "<|meta|>so \\boxed{16}?<|/meta|>"
    assert score_group("pmishift", [rollout(P_SAVE + boxed + C_SAVE, True)], c)[0].extras["skip"] == "boxed_in_block"
    nan_table = {**TABLE, **belief(X + P_SAVE, math.nan, -0.5, -0.4, -0.3)}
    res = score_group("pmishift", [rollout(P_SAVE + M_SAVE + C_SAVE, True)], ctx(table=nan_table))
    assert res[0].value is None and res[0].extras["skip"] == "nan"


def test_pmi_sum_mean_placebo():
    res = score_group("pmi", group(), ctx())
    # SAVE: lp(1) −0.1 vs −1.5 → 1.4, lp(6) −0.1 vs −0.2 → 0.1; sum 1.5, correct → +1.5
    # DERAIL: lp(-) −0.2 vs −2.5 → 2.3; sum clipped to 2, wrong → −2.0
    # decorative: lp(1) −0.2 vs −0.6 → 0.4 > 0, correct → +0.4 (the block makes its continuation likelier)
    assert values(res) == pytest.approx([1.5, -2.0, 0.4, None])
    assert res[3].extras["skip"] == "no_block" and res[1].extras["gate"] == -1
    # mean: decorative continuation "\n\boxed{16}" has 5 tokens → 0.4 / 5 = 0.08
    mean = score_group("pmi", group()[2:3], ctx(SignalParams(pmi={"aggregate": "mean"})))
    assert values(mean) == pytest.approx([0.08])
    # placebo baseline x∘p∘placebo: lp(1) −0.2 vs −0.3 → 0.1: barely more than a neutral block
    plac = score_group("pmi", group()[2:3], ctx(SignalParams(pmi={"placebo": True})))
    assert values(plac) == pytest.approx([0.1])
    boxed = rollout(P_DEC + "<|meta|>\\boxed{16}<|/meta|>" + C_DEC, True)
    assert score_group("pmi", [boxed], ctx())[0].extras["skip"] == "boxed_in_block"
    assert score_group("pmi", [rollout(P_DEC + M_DEC, True)], ctx())[0].extras["skip"] == "empty_continuation"


def test_gm_difference_in_differences():
    res = score_group("gm", group(), ctx())
    # SAVE (correct): δ1 = (−0.2 − −2.0) − (−3.0 − −0.5) = 1.8 + 2.5 = 4.3 → clip 2; δ2 = (−0.1 − −0.5) − (−0.6 − −0.3)
    #   = 0.4 + 0.3 = 0.7. mean 1.35 + min 0.7 = 2.05
    #   gate: +clip(2.05, 0, 2) = 2.0
    # DERAIL (wrong): δ1 = (−1.5 − −0.6) − (−0.8 − −0.9) = −0.9 − 0.1 = −1.0; δ2 = (−0.3 − −0.2) − 0 = −0.1;
    #   mean −0.55 + min −1.0 = −1.55; gate: −clip(−1.55, 0, 2) = 0 (the old ±agg gate rewarded it +1.55)
    # decorative (correct): δ1 = 0.1 − 0.1 = 0, δ2 = 0 − 0 = 0 → gm ≈ 0
    assert values(res)[:3] == pytest.approx([2.0, 0.0, 0.0], abs=1e-9)
    assert res[0].extras["gm"] == pytest.approx(2.05) and res[1].extras["gm"] == pytest.approx(-1.55)
    assert res[0].extras["deltas"] == pytest.approx([2.0, 0.7])
    assert res[3].value is None
    # G is gm.gate: 2.05 clipped to [0, 1.5]
    assert values(score_group("gm", group()[:1], ctx(SignalParams(gm={"gate": 1.5})))) == pytest.approx([1.5])


@pytest.mark.parametrize("correct, agg, value", [
    (True, 1.5, 1.5), (True, 2.5, 2.0), (True, -1.0, 0.0), (True, -3.0, 0.0),
    (False, 2.3, -2.0), (False, 1.0, -1.0), (False, -2.5, 0.0), (False, -0.1, 0.0),
])
def test_the_gate_is_plus_or_minus_clip_agg_0_g(correct, agg, value):
    from rewards.signals import _gated

    assert _gated(rollout("", correct), agg, 2.0) == pytest.approx(value)
    assert math.isnan(_gated(rollout("", correct), math.nan, 2.0))


def test_pmi_gate_gives_a_wrong_rollout_with_a_negative_pmi_zero():
    # DERAIL with the block making "-" LESS likely: lp(-) −2.5 after the block vs −0.2 without → agg −2.3, wrong:
    # −clip(−2.3, 0, 2) = 0 (the old gate gave −1·clip(−2.3, ±2) = +2)
    table = {**TABLE, (X + P_DER + M_DER, "\n\\boxed{"): {"-": -2.5}, (X + P_DER, "\n\\boxed{"): {"-": -0.2}}
    res = score_group("pmi", group()[1:2], ctx(table=table))
    assert values(res) == [0.0] and res[0].extras["pmi"] == pytest.approx(-2.3)


def test_pmi_skips_a_block_copied_into_the_continuation():
    block = "<|meta|>7-3*(-3) is 7+9 which is 16<|/meta|>"
    # content: 27 characters (one token each) → 20 8-grams; the continuation repeats its last 16 characters
    # " 7+9 which is 16" → 9 of the 20 reappear = 45 % ≥ 25 %: a copy, not scored
    cont = " so 7+9 which is 16, \\boxed{16}"
    res = score_group("pmi", [rollout(P_DEC + block + cont, True)], ctx())
    assert res[0].value is None and res[0].extras["skip"] == "copied_block"
    assert res[0].extras["copied_share"] == pytest.approx(9 / 20)
    # a higher threshold scores it; a continuation sharing less than 25 % is scored
    assert score_group("pmi", [rollout(P_DEC + block + cont, True)],
                       ctx(SignalParams(pmi={"copy_share": 0.5})))[0].value is not None
    assert score_group("pmi", [rollout(P_DEC + block + " \\boxed{16}", True)], ctx())[0].value is not None


@pytest.mark.parametrize("block", ["<|meta|>so \\boxed{16}?<|/meta|>", "<|meta|>so \\boxed 16<|/meta|>",
                                   "<|meta|>so \\boxed{1<|/meta|>", "<|meta|>\\fbox{16}<|/meta|>"])
@pytest.mark.parametrize("signal", ["pmi", "pmishift", "gm"])
def test_a_block_holding_any_box_is_not_scored(block, signal):
    res = score_group(signal, [rollout(P_SAVE + block + C_SAVE, True)], ctx())
    assert res[0].value is None and res[0].extras["skip"] == "boxed_in_block"


def fake_grade(responses: list[str], golds: list[str]) -> list[bool]:
    return [last_boxed(r) == g for r, g in zip(responses, golds)]


def test_cf_and_asym_cf_with_fake_callbacks():
    # counterfactual continuations regenerated from x∘p (keyed by prefix)
    regen = {X + "A.": "\\boxed{-2}", X + "B.": "\\boxed{16}", X + "C.": "\\boxed{16}", X + "D.": "\\boxed{-2}"}
    asked = []

    def regenerate(contexts: list[str]) -> list[str]:
        asked.extend(contexts)
        return [regen[c] for c in contexts]

    blk = "<|meta|>check<|/meta|>"
    grp = [rollout("A." + blk + "\\boxed{16}", True),   # 1 − 0 = +1 (the block mattered)
           rollout("B." + blk + "\\boxed{16}", True),   # 1 − 1 = 0
           rollout("C." + blk + "\\boxed{-2}", False),  # 0 − 1 = −1 (the block hurt)
           rollout("D." + blk + "\\boxed{16}", True),   # 1 − 0 = +1
           rollout("\\boxed{16}", True)]                 # no block → None
    c = SignalContext(regenerate=regenerate, grade=fake_grade)
    res = score_group("cf", grp, c)
    assert values(res) == [1, 0, -1, 1, None] and c.counters["regenerations"] == 4
    assert asked == [X + p for p in ("A.", "B.", "C.", "D.")]
    # asym_cf: c1 = 3/4 = 0.75, c0 = 2/4 = 0.5 → α·0.25 = 0.25 for block rows; 0 for the row without a block
    res = score_group("asym_cf", grp, SignalContext(regenerate=regenerate, grade=fake_grade))
    assert values(res) == pytest.approx([0.25] * 4 + [0.0])
    assert res[0].extras["c1"] == 0.75 and res[0].extras["c0"] == 0.5 and res[4].extras["baseline"]
    assert values(score_group("asym_cf", [rollout("\\boxed{16}", True)], c)) == [None]
    with pytest.raises(ValueError, match="needs regenerate"):
        score_group("cf", grp, SignalContext(grade=fake_grade))


def test_asym_cf_formula():
    p = SignalParams().asym_cf  # α 1, β 2.5, cap 1, γ 0.5, margin 0.1, saturated 0.99
    assert asym_cf_value(0.75, 0.25, p) == pytest.approx(0.5)     # α·0.5
    assert asym_cf_value(0.5, 0.7, p) == pytest.approx(-0.5)      # −min(2.5·0.2, 1) = −0.5
    assert asym_cf_value(0.5, 1.0, p) == pytest.approx(-1.0)      # −min(1.25, cap 1)
    assert asym_cf_value(0.5, 0.55, p) == pytest.approx(0.0)      # c0 − c1 = 0.05 ≤ margin: no penalty
    assert asym_cf_value(1.0, 1.0, p) == pytest.approx(-0.5)      # saturated: −γ


# ---------------------------------------------------------------- MASA

def test_masa_parse():
    good = masa.parse_prediction('Plan: {"notions": ["Sign", "distributive law"], "pass_rate": 6, '
                                 '"solution_length": 40} done')
    assert good == masa.MetaPrediction(("Sign", "distributive law"), 6.0, 40.0)
    fenced = masa.parse_prediction('```json\n{"notions": [], "pass_rate": "3", "solution_length": 12.5}\n```')
    assert fenced is not None and fenced.pass_rate == 3.0
    for bad in ('{"notions": ["a"], "pass_rate": 9, "solution_length": 10}',
                '{"notions": ["a"], "pass_rate": true, "solution_length": 10}',
                '{"notions": "a", "pass_rate": 4, "solution_length": 10}',
                '{"notions": ["a"], "pass_rate": 4, "solution_length": 0}',
                '{"notions": ["a"], "pass_rate": 4}', "no json here", '{"notions": [1], "pass_rate": 4, '
                '"solution_length": 10}', "{broken"):
        assert masa.parse_prediction(bad) is None, bad


def test_masa_rewards():
    assert masa.r_length(40, [30, 50]) == 1.0 and masa.r_length(60, [30, 50]) == 0.0 and masa.r_length(40, []) == 0.0
    # |6/8 − 0.5| = 0.25 → 0.01^0.25 = 0.316227766…
    assert masa.r_difficulty(6, 0.5) == pytest.approx(0.31622776601683794)
    assert masa.r_difficulty(4, 0.5) == 1.0
    problem = "Compute 7-3*(2-5)."
    correct = ["Use the sign rule: 2-5=-3, then the Distributive law.", "sign rule gives 16"]
    wrong = ["no rule, 7-9=-2", "distributive law gives -2"]
    # "compute" is in the problem → dropped; "sign rule": 2/2 correct vs 0/2 wrong ✓;
    # "distributive law": 1/2 vs 1/2 ✗ → 1/2
    assert masa.r_notion(["Sign rule", "distributive law", "Compute"], problem, correct, wrong) == 0.5
    pred = masa.MetaPrediction(("sign rule", "distributive law"), 6, 40)
    out = masa.meta_reward(pred, problem, correct + wrong, [True, True, False, False], [30, 50, 20, 60])
    # r_length 1 (30 ≤ 40 ≤ 50), r_difficulty 0.316228, r_notion 0.5 → mean 0.605409
    assert out["reward"] == pytest.approx((1 + 0.31622776601683794 + 0.5) / 3)


def test_masa_gate_and_cutoff():
    p = lambda rate, n=100: masa.MetaPrediction((), rate, n)  # noqa: E731
    assert masa.gate([p(8), p(8), p(7.5)])          # fractions 1, 1, .9375: std .029 < .1, mean rounds to 8
    assert masa.gate([p(0), p(0), p(0)])
    assert not masa.gate([p(8), p(8), p(4)])        # disagree: std .19
    assert not masa.gate([p(4), p(4), p(4)])        # agree on a middling rate: worth solving
    assert not masa.gate([p(8), None])              # an invalid prediction never gates
    assert masa.cutoff_length([p(4, 100), p(4, 150), None]) == 250  # 2 × mean 125
    assert masa.cutoff_length([p(4, 100)], max_length=150) == 150 and masa.cutoff_length([None]) is None


def test_masa_signal_group():
    sol = lambda resp, ok, n: Rollout(prompt=X, response=resp, gold="16", correct=ok, n_tokens=n)  # noqa: E731
    meta = lambda resp: Rollout(prompt="predict: " + X, response=resp, gold="16", role="meta_prediction")  # noqa
    grp = [sol("sign rule: \\boxed{16}", True, 30), sol("\\boxed{-2}", False, 10),
           meta('{"notions": ["sign rule"], "pass_rate": 4, "solution_length": 30}'), meta("not json")]
    res = score_group("masa", grp, SignalContext())
    # prediction: r_length 1 (30 in [30, 30]), r_difficulty 0.01^|4/8 − 1/2| = 1, r_notion 1 → 1.0
    assert values(res) == [None, None, 1.0, 0.0]
    assert res[0].extras["skip"] == "solution_rollout" and res[3].extras["invalid_prediction"]


# ---------------------------------------------------------------- the pipeline

class FakeGrade:
    def __init__(self, correct: bool, extracted: str | None):
        self.correct, self.extracted, self.timed_out = correct, extracted, False


class FakeGrader:
    def __init__(self):
        self.calls = 0

    def grade(self, responses, golds):
        self.calls += 1
        return [FakeGrade(last_boxed(r) == g, last_boxed(r)) for r, g in zip(responses, golds)]


def samples(responses: list[str]) -> list[Sample]:
    return [Sample(prompt=X, response=r, response_ids=TOK.encode(r), gold="16") for r in responses]


def test_pipeline_pmishift_facts():
    scorer = TableScorer(TOK, TABLE)
    grp = samples([P_SAVE + M_SAVE + C_SAVE, P_DER + M_DER + C_DER, P_DEC + M_DEC + C_DEC, NO_BLOCK])
    out = score_batch([grp], rl=RLSpec(reward="pmishift"), step=0, grader=FakeGrader(), tokenizer=TOK,
                      scorer=scorer, make_decoys=lambda golds: ["-2" for _ in golds])
    f = out.facts
    assert f["scorer/calls"] == 12 and f["signal/scored"] == 3 and f["signal/skip/no_block"] == 1
    assert f["signal/save"] == 1 and f["signal/derail"] == 1 and f["accuracy/pure"] == 0.75
    assert f["adv_norm_std_applied"] is False and f["grader/graded"] == 4
    assert [r["signal_value"] for r in out.records] == pytest.approx([3.0, -3.2, 0.0, None], abs=1e-9)
    assert [r["decoy"] for r in out.records] == ["-2"] * 4
    # meta head centred over the 3 scored rows: mean (3.0 − 3.2 + 0) / 3 = −0.0667
    assert out.records[0]["adv"]["meta"] == pytest.approx(3.0 + 0.2 / 3)
    assert out.records[3]["adv"]["meta"] == 0.0
    assert [len(a) for a in out.token_advantages] == [len(s.response_ids) for s in grp]


def test_pipeline_vanilla_no_scorer_calls():
    scorer = TableScorer(TOK, TABLE)
    decoys_asked = []
    grp = samples([P_SAVE + M_SAVE + C_SAVE, NO_BLOCK])
    out = score_batch([grp], rl=RLSpec(reward="vanilla"), step=3, grader=FakeGrader(), tokenizer=TOK, scorer=scorer,
                      make_decoys=lambda golds: decoys_asked.extend(golds) or [None] * len(golds))
    assert scorer.calls == 0 and out.facts["scorer/calls"] == 0 and decoys_asked == []
    assert out.facts["signal/skip/vanilla"] == 2 and out.facts["accuracy/pure"] == 1.0
    # both correct → correctness advantage 0 on every token
    assert all(a == 0.0 for row in out.token_advantages for a in row)


class CountingScorer(TableScorer):
    """A TableScorer that also counts target_logprobs invocations."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.invocations = 0

    def target_logprobs(self, contexts, targets):
        self.invocations += 1
        return super().target_logprobs(contexts, targets)


@pytest.mark.parametrize("reward", ["pmishift", "pmi", "gm"])
def test_pipeline_scores_every_group_in_one_scorer_call(reward):
    """Three groups (the pipeline's batch): one target_logprobs call for all of them (record, score, replay), the
    same values and scorer/calls as scoring group by group."""
    responses = [P_SAVE + M_SAVE + C_SAVE, P_DER + M_DER + C_DER, P_DEC + M_DEC + C_DEC, NO_BLOCK]
    groups = [samples(responses), samples(responses[::-1]), samples(responses[1:3])]
    rl = RLSpec(reward=reward)
    scorer = CountingScorer(TOK, TABLE)
    out = score_batch(groups, rl=rl, step=0, grader=FakeGrader(), tokenizer=TOK, scorer=scorer,
                      make_decoys=lambda golds: ["-2" for _ in golds])
    assert scorer.invocations == 1
    per_group, c = [], ctx()
    for grp in groups:
        per_group += score_group(reward, [rollout(s.response, last_boxed(s.response) == "16") for s in grp], c)
    assert [r["signal_value"] for r in out.records] == pytest.approx(values(per_group), abs=1e-12)
    assert out.facts["scorer/calls"] == c.scorer.calls > 0


def test_batched_requests_replay_and_fall_back_to_the_scorer():
    """Replay answers recorded requests from the one batched call; a request first seen at replay (a signal whose
    later requests depend on earlier answers) is asked of the real scorer then, not answered with a stale 0."""
    from rewards.scorer import BatchedRequests, encode

    scorer = CountingScorer(TOK, TABLE)
    batched = BatchedRequests()
    ids = lambda text: encode(TOK, text)  # noqa: E731
    seen = batched.recording.target_logprobs([ids(X + P_SAVE)], [ids("\\boxed{16}")])
    assert seen == [[0.0] * len(ids("\\boxed{16}"))] and scorer.invocations == 0
    replaying = batched.run(scorer)
    assert scorer.invocations == 1 and scorer.calls == 1
    direct = TableScorer(TOK, TABLE).target_logprobs([ids(X + P_SAVE)], [ids("\\boxed{16}")])
    assert replaying.target_logprobs([ids(X + P_SAVE)], [ids("\\boxed{16}")]) == direct
    assert scorer.invocations == 1  # served from the batch
    late = replaying.target_logprobs([ids(X + P_DER)], [ids("\\boxed{-2}")])
    assert late == TableScorer(TOK, TABLE).target_logprobs([ids(X + P_DER)], [ids("\\boxed{-2}")])
    assert scorer.invocations == 2 and replaying.calls == 2
