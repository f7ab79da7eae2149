"""MASA's pieces (rl/masa.py, worlds/arith notions, rewards/masa substitution) on hand-built cases whose values
are worked out in the comments. The end-to-end runs are in tests/test_grpo.py (test_train_grpo_masa_*)."""
from __future__ import annotations

import math

import pytest

from infra.spec import MASAEfficientSpec
from rewards.masa import MetaPrediction, parse_prediction, prediction_span, substitute_prediction
from rl.masa import decision_counts, expert_prediction, meta_prompt, meta_scores, notion_hint, notion_views, plan, \
    precision_f1, sample_with_cutoffs
from worlds import arith

# 7-3*(2-5): 2-5=-3 (subtraction, negative), 3*-3=-9 (multiplication, negative), 7--9=16 (7+9: a carry, 16)
RIGHT = "2-5=-3|7-3*-3\n3*-3=-9|7--9\n7--9=16|16\n\\boxed{16}"
# the sign slip 2-5=3: 3*3=9, 7-9=-2 (negative; 9-7 borrows nothing): no two-digit, no carry
WRONG = "2-5=3|7-3*3\n3*3=9|7-9\n7-9=-2|-2\n\\boxed{-2}"
ROW = {"id": "p0", "prompt": "Compute 7-3*(2-5).", "answer": "16", "source": "arith"}


@pytest.mark.parametrize("a,op,b,value,expected", [
    (17, "+", 5, 22, {"addition", "two-digit", "carry"}),
    (22, "-", 5, 17, {"subtraction", "two-digit", "borrow"}),
    (7, "-", -9, 16, {"subtraction", "negative", "two-digit", "carry"}),  # 7--9 adds 7+9
    (-5, "+", 12, 7, {"addition", "negative", "two-digit", "borrow"}),  # -5+12 subtracts 12-5
    (2, "-", 5, -3, {"subtraction", "negative"}),  # 5-2: no borrow
    (6, "*", 7, 42, {"multiplication", "two-digit"}),
    (8, "/", 2, 4, {"division"}),
])
def test_step_notions(a, op, b, value, expected):
    assert arith.step_notions(a, op, b, value) == expected


def test_problem_and_solution_notions_of_a_known_problem():
    toks = arith.parse("7-3*(2-5)")
    problem = arith.Problem("paren", 1, ROW["prompt"], "7-3*(2-5)", tuple(arith.solve(toks)))
    assert problem.response() == RIGHT
    assert arith.notions(problem) == {"subtraction", "multiplication", "negative", "two-digit", "carry", "brackets"}
    assert arith.problem_notions("7-3*(2-5)") == {"subtraction", "multiplication", "brackets"}
    assert arith.solution_notions(WRONG) == {"subtraction", "multiplication", "negative"}
    assert arith.solution_notions("<|meta|>check 7+9: 7+9=16, same<|/meta|>\nno steps here") == set()
    assert arith.notions(problem) <= set(arith.NOTIONS)
    with pytest.raises(ValueError):
        arith.problem_notions("seven minus three")


def test_notion_views_and_the_template():
    problem, texts = notion_views(ROW, [RIGHT, WRONG])
    assert problem == "brackets multiplication subtraction"
    assert texts == ["carry multiplication negative subtraction two-digit", "multiplication negative subtraction"]
    other = {"id": "q", "prompt": "What is 2+2?", "source": "math"}
    assert notion_views(other, ["4"]) == ("What is 2+2?", ["4"])  # free-form: the paper's raw texts
    text = meta_prompt(ROW["prompt"], list(arith.NOTIONS))
    assert text.endswith("Problem: Compute 7-3*(2-5).") and "carry" in text and "correct of 8" in text


def test_meta_scores_of_a_hand_built_group():
    """Solutions: RIGHT (correct, 30 tokens) and WRONG (incorrect, 25 tokens): true pass rate 1/2."""
    a = MetaPrediction(("carry", "negative", "brackets"), 4, 20)
    # brackets is in the problem: dropped; carry: 1/1 correct vs 0/1 incorrect → counts; negative 1 vs 1 → not:
    # r_notion 1/2; r_difficulty 0.01^|4/8 − 1/2| = 1; r_length: 20 outside [30, 30] → 0; reward 1.5/3
    c = MetaPrediction(("two-digit",), 8, 30)
    # r_notion 1; r_difficulty 0.01^0.5 = 0.1; r_length 1 → reward 2.1/3
    got = meta_scores(ROW, [a, None, c], [RIGHT, WRONG], [True, False], [30, 25], 0.01)
    assert got[0] == pytest.approx({"r_length": 0.0, "r_difficulty": 1.0, "r_notion": 0.5, "reward": 0.5})
    assert got[1] == {"r_length": 0.0, "r_difficulty": 0.0, "r_notion": 0.0, "reward": 0.0}  # malformed
    assert got[2] == pytest.approx({"r_length": 1.0, "r_difficulty": 0.1, "r_notion": 1.0, "reward": 0.7})


def test_malformed_predictions_parse_to_none_and_substitution_keeps_the_reasoning():
    for bad in ["no json", '{"notions": "carry", "pass_rate": 3, "solution_length": 9}',
                '{"notions": [], "pass_rate": 9, "solution_length": 9}', '{"notions": [], "pass_rate": 2}',
                '{"notions": [], "pass_rate": 2, "solution_length": 0}']:
        assert parse_prediction(bad) is None and prediction_span(bad) is None, bad
    text = '<|meta|>two steps<|/meta|>\n{"notions": ["carry"], "pass_rate": 7, "solution_length": 12} done'
    start, end, pred = prediction_span(text)
    assert text[start] == "{" and text[end - 1] == "}" and pred.pass_rate == 7
    new = substitute_prediction(text, MetaPrediction(("carry",), 2.0, 30.0))
    assert new.startswith("<|meta|>two steps<|/meta|>\n{") and new.endswith("} done")
    assert parse_prediction(new) == MetaPrediction(("carry",), 2.0, 30.0)
    assert '"pass_rate": 2, "solution_length": 30}' in new  # counts as integers, as the demonstrations write them
    assert '"solution_length": 30.5}' in substitute_prediction(text, MetaPrediction(("carry",), 2.0, 30.5))
    with pytest.raises(ValueError, match="no valid prediction"):
        substitute_prediction("no json", pred)


def test_expert_prediction_substitutes_the_true_statistics():
    pred = MetaPrediction(("carry",), 1, 99)
    # 3 of 4 correct → round(8 · 0.75) = 6; correct lengths 10, 20, 30 → 20
    assert expert_prediction(pred, [True, False, True, True], [10, 50, 20, 30]) == MetaPrediction(("carry",), 6, 20)
    # none correct: pass rate 0, no true correct length → the predicted one is kept
    assert expert_prediction(pred, [False, False], [10, 50]) == MetaPrediction(("carry",), 0, 99)


def _p(rate, length=10.0):
    return MetaPrediction((), rate, length)


def test_plan_gates_and_cuts_only_after_the_start_step():
    eff = MASAEfficientSpec(gate=True, cutoff=True, start_step=2, cutoff_factor=2.0)
    preds = [[_p(0), _p(0), _p(0)],  # agree on all-wrong → gated
             [_p(8, 40), _p(8, 50), _p(8, 60)],  # agree on all-right → gated; cutoff 2 · 50 = 100 capped at 64
             [_p(0), _p(8), _p(4)],  # disagree → solved; cutoff 2 · 10
             [_p(0, 3), None, _p(0, 5)]]  # a malformed prediction never gates; cutoff from the valid ones: 8
    assert plan(preds, eff, 2, 64) == plan(preds, eff, 1, 64)
    assert plan(preds, eff, 2, 64).gated == [False] * 4 and plan(preds, eff, 2, 64).cutoffs == [None] * 4
    after = plan(preds, eff, 3, 64)
    assert after.gated == [True, True, False, False] and after.cutoffs == [20, 64, 20, 8]
    gate_only = plan(preds, MASAEfficientSpec(gate=True), 1, 64)
    assert gate_only.gated == [True, True, False, False] and gate_only.cutoffs == [None] * 4


def test_notion_hints_name_what_at_least_half_the_valid_predictions_name():
    preds = [MetaPrediction(("Carry", "borrow"), 4, 9), MetaPrediction(("carry ", "negative"), 4, 9),
             MetaPrediction(("brackets",), 4, 9), None]
    # carry: 2 of 3 valid; borrow, negative, brackets: 1 of 3 each (below half)
    assert notion_hint(preds) == "\n\nHint: a solution may use carry."
    assert notion_hint([MetaPrediction(("a", "b"), 1, 1), MetaPrediction(("b", "a"), 1, 1)]) == \
        "\n\nHint: a solution may use a, b."
    assert notion_hint([None, None]) is None and notion_hint([MetaPrediction((), 1, 1)]) is None
    eff = MASAEfficientSpec(hints=True, start_step=1)
    assert plan([preds], eff, 1, 64).hints == [None]
    assert plan([preds], eff, 2, 64).hints == ["\n\nHint: a solution may use carry."]
    assert plan([preds], eff, 2, 64).gated == [False] and plan([preds], eff, 2, 64).cutoffs == [None]


def test_decision_counts_against_the_truth():
    eff = MASAEfficientSpec(gate_std=0.1, cutoff_factor=2.0)
    preds = [[_p(0, 5), _p(0, 5)],  # gate, cutoff 10
             [_p(4, 5), _p(4, 5)],  # no gate, cutoff 10
             [_p(8, 5), _p(8, 5)]]  # gate, cutoff 10
    correct = [[False, False], [True, False], [True, False]]  # zero variance only for prompt 0
    lengths = [[12, 4], [12, 12], [9, 30]]
    got = decision_counts(preds, correct, lengths, eff, 100)
    # gating: prompt 0 gate & zero-var → tp; prompt 1 no gate & mixed → tn; prompt 2 gate & mixed → fp
    assert (got["gate/tp"], got["gate/fp"], got["gate/fn"], got["gate/tn"]) == (1, 1, 0, 1)
    # cutoff (> 10 would be cut; truth = incorrect): 12✗ tp, 4✗ fn, 12✓ fp, 12✗ tp, 9✓ tn, 30✗ tp
    assert (got["cutoff/tp"], got["cutoff/fp"], got["cutoff/fn"], got["cutoff/tn"]) == (3, 1, 1, 1)
    assert got["decision_prompts"] == 3
    assert precision_f1(1, 1, 0) == pytest.approx((0.5, 2 / 3))
    assert precision_f1(3, 1, 1) == pytest.approx((0.75, 0.75))
    assert all(math.isnan(v) for v in precision_f1(0, 0, 0))


def test_sample_with_cutoffs_calls_once_per_limit_and_keeps_the_order():
    calls = []

    def sample(rows, round_, max_new_tokens=None):
        calls.append(([r["id"] for r in rows], round_, max_new_tokens))
        return [[(r["id"], max_new_tokens)] for r in rows]

    rows = [{"id": i} for i in range(4)]
    got = sample_with_cutoffs(sample, rows, [20, None, 20, 7], 0)
    assert got == [[(0, 20)], [(1, None)], [(2, 20)], [(3, 7)]]
    assert sorted(calls, key=str) == sorted([([0, 2], 0, 20), ([1], 0, None), ([3], 0, 7)], key=str)


def test_behaviour_cloning_steps_and_loss():
    """A 5-token 'policy' of one logit vector: at zero logits every token has log-prob −log 5, so the first loss
    is beta · log 5; the loss falls with each update, one value per update."""
    import torch

    from rl.masa import behaviour_cloning

    policy = torch.nn.Module()
    policy.logits = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)

    def logprobs(model, rows):
        width = max(len(r) for _, r in rows)
        lp = torch.zeros(len(rows), width)
        mask = torch.zeros(len(rows), width)
        for i, (_, r) in enumerate(rows):
            lp[i, :len(r)] = torch.log_softmax(model.logits, -1)[torch.tensor(r)]
            mask[i, :len(r)] = 1
        return lp, mask

    items = [{"prompt_ids": [0], "response_ids": [1, 1, 2]}, {"prompt_ids": [0], "response_ids": [1]}]
    losses = behaviour_cloning(policy, opt, items, beta=0.5, updates=3, chunk_rows=1, grad_clip=10.0,
                               logprobs=logprobs)
    assert len(losses) == 3 and losses[0] == pytest.approx(0.5 * math.log(5))
    assert losses[0] > losses[1] > losses[2]
    assert int(torch.argmax(policy.logits)) == 1  # the cloned responses are mostly token 1
