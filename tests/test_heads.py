"""Heads, per-head group centring, region routing, and the two executors' paths against verl's GRPO."""
from __future__ import annotations

import numpy as np
import pytest
from verl.trainer.ppo import core_algos as verl_algos  # ~7 s, once

from infra.spec import HEADS, REGIONS, HeadsSpec, RLSpec
from rewards.heads import FORMAT_VALUES, centre_heads, gain_matrix, head_weights, rollout_heads, token_advantages, \
    token_offsets, token_regions
from rewards.grader import Grade
from rewards.signals import Rollout

EPS = 1e-6


def heads_row(**kw) -> dict:
    return {**dict.fromkeys(HEADS), **kw}


def test_rollout_heads_values():
    ok = Rollout(prompt="", response="x<|meta|>confidence 0.78, looks right<|/meta|>\\boxed{16}", gold="16",
                 correct=True, format_class="wellformed")
    # calibration −(0.78 − 1)² = −0.0484
    assert rollout_heads(ok, 2.5) == pytest.approx(
        {"correctness": 1.0, "meta": 2.5, "calibration": -0.0484, "format": 0.0, "emission": 1.0})
    drift = Rollout(prompt="", response="x<|meta|>hmm", gold="16", correct=False, format_class="drift")
    assert rollout_heads(drift, None) == {"correctness": -1.0, "meta": None, "calibration": None, "format": -0.5,
                                          "emission": 0.0}
    # the last stated confidence counts: −(0.9 − 0)² = −0.81
    two = Rollout(prompt="", response="<|meta|>confidence 0.2<|/meta|><|meta|>confidence 90%<|/meta|>", gold="1",
                  format_class="discard")
    assert rollout_heads(two, None)["calibration"] == pytest.approx(-0.81)
    assert rollout_heads(two, None)["format"] == FORMAT_VALUES["discard"] == -1.0
    pred = Rollout(prompt="", response="{}", gold="1", role="meta_prediction")
    assert rollout_heads(pred, 0.7) == heads_row(meta=0.7)


def test_centring_with_none_rows_and_std_switch():
    values = [heads_row(correctness=1.0, meta=1.0), heads_row(correctness=-1.0), heads_row(correctness=1.0, meta=3.0),
              heads_row(correctness=1.0, meta=2.0),                           # group 0
              heads_row(correctness=1.0, meta=5.0), heads_row(correctness=-1.0, meta=5.0),  # group 1: meta std 0
              heads_row(correctness=-1.0), heads_row(correctness=-1.0, meta=4.0)]           # group 2: meta singleton
    groups = [0, 0, 0, 0, 1, 1, 2, 2]
    adv, facts = centre_heads(values, groups, adv_norm_std=False)
    # meta, group 0: mean of (1, 3, 2) = 2 → (−1, 0 [None], 1, 0); group 1: 0, 0; group 2: singleton → 0
    assert [a["meta"] for a in adv] == pytest.approx([-1, 0, 1, 0, 0, 0, 0, 0])
    # correctness, group 0: mean 0.5 → (0.5, −1.5, 0.5, 0.5); group 1: ±1; group 2: 0
    assert [a["correctness"] for a in adv] == pytest.approx([0.5, -1.5, 0.5, 0.5, 1, -1, 0, 0])
    assert facts["adv_norm_std_applied"] is False and facts["adv_groups"] == 3
    assert (facts["adv/meta/rows"], facts["adv/meta/groups"], facts["adv/meta/groups_singleton"],
            facts["adv/meta/groups_zero_std"]) == (6, 3, 1, 1)
    assert facts["adv/correctness/groups_zero_std"] == 1 and facts["adv/calibration/rows"] == 0

    adv, facts = centre_heads(values, groups, adv_norm_std=True)
    # group 0 meta: unbiased std of (1, 3, 2) = sqrt(2/2) = 1; correctness: sqrt(3/3) = 1; group 1 correctness:
    # std of (1, −1) = sqrt(2) → ±1/1.41421
    assert [a["meta"] for a in adv][:4] == pytest.approx([-1 / (1 + EPS), 0, 1 / (1 + EPS), 0], abs=1e-12)
    assert [a["correctness"] for a in adv] == pytest.approx(
        [0.5 / (1 + EPS), -1.5 / (1 + EPS), 0.5 / (1 + EPS), 0.5 / (1 + EPS), 1 / (2 ** 0.5 + EPS),
         -1 / (2 ** 0.5 + EPS), 0, 0], abs=1e-12)
    assert facts["adv_norm_std_applied"] is True
    with pytest.raises(ValueError, match="non-finite"):
        centre_heads([heads_row(meta=float("nan")), heads_row(meta=1.0)], [0, 0], False)


def test_head_weights_warmup():
    spec = HeadsSpec(weights={"correctness": 1.0, "meta": 2.0}, warmup_steps={"meta": 10})
    assert head_weights(spec, 0) == {"correctness": 1.0, "meta": 0.0, "calibration": 0.0, "format": 0.0,
                                     "emission": 0.0}
    assert head_weights(spec, 5)["meta"] == 1.0 and head_weights(spec, 10)["meta"] == 2.0
    assert head_weights(spec, 50)["meta"] == 2.0


# "ab<|meta|>ok confidence 0.8<|/meta|>c": answer [0,2) · format [2,10) · meta [10,13) · confidence [13,27) ·
# format [27,36) · answer [36,37)
TEXT = "ab<|meta|>ok confidence 0.8<|/meta|>c"


def test_token_regions_hand_tokenised():
    toks = [(0, 2), (2, 10), (10, 12), (12, 23), (23, 27), (27, 36), (36, 37)]
    assert [TEXT[s:e] for s, e in toks] == ["ab", "<|meta|>", "ok", " confidence", " 0.8", "<|/meta|>", "c"]
    # " confidence" straddles meta (1 char) and confidence (10 chars) → confidence
    assert [REGIONS[i] for i in token_regions(TEXT, toks)] == \
        ["answer", "format", "meta", "confidence", "confidence", "format", "answer"]
    # ties go to the more specific region: "b<" is 1 answer + 1 format char → format; "|meta|>ok" 7 format +
    # 2 meta → format; zero-width tokens take the region at their position, past the end → answer
    odd = [(0, 1), (1, 3), (3, 12), (12, 37), (5, 5), (37, 37)]
    assert [REGIONS[i] for i in token_regions(TEXT, odd)] == \
        ["answer", "format", "format", "confidence", "format", "answer"]


def test_token_advantages_routing():
    regions = token_regions(TEXT, [(0, 2), (2, 10), (10, 12), (12, 23), (23, 27), (27, 36), (36, 37)])
    head_adv = {"correctness": 0.5, "meta": 2.0, "calibration": -0.1, "format": 0.3, "emission": 0.25}
    weights = {"correctness": 1.0, "meta": 0.5, "calibration": 1.0, "format": 0.0, "emission": 2.0}
    gain = gain_matrix(weights, HeadsSpec().routing)
    # default routing: correctness → all; meta → meta + format; calibration → confidence; format, emission → format
    # answer 0.5 · meta 0.5 + 0.5·2 = 1.5 · confidence 0.5 − 0.1 = 0.4 · format 0.5 + 1 + 0·0.3 + 2·0.25 = 2.0
    assert token_advantages(head_adv, gain, regions).tolist() == pytest.approx([0.5, 2.0, 1.5, 0.4, 0.4, 2.0, 0.5])


def byte_level_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["ok confidence 0.8 looks right"] * 3, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<|meta|>", "<|/meta|>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", [TEXT, "é ok<|meta|>confidence 0.8 ≈ right<|/meta|>\\boxed{16}"])
def test_token_offsets_byte_level(text):
    # the second text has multi-byte characters split over byte tokens: the decoded-prefix fallback
    tok = byte_level_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    decoded, offsets = token_offsets(tok, ids)
    assert decoded == text and offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(offsets, offsets[1:]))
    regions = token_regions(decoded, offsets)
    meta_tok = ids.index(tok.convert_tokens_to_ids("<|meta|>"))
    assert REGIONS[regions[meta_tok]] == "format" and REGIONS[regions[meta_tok + 1]] in ("meta", "confidence")


# ---------------------------------------------------------------- against verl

def grpo_batch():
    """11 rollouts in groups of 4, 4, 3 with responses of different lengths (right-padded to 7)."""
    import torch

    correct = [1, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]
    lengths = [7, 3, 5, 1, 6, 2, 7, 4, 5, 5, 3]
    uid = np.array(["p0"] * 4 + ["p1"] * 4 + ["p2"] * 3, dtype=object)
    mask = torch.zeros(11, 7)
    rewards = torch.zeros(11, 7)
    for b, (ok, n) in enumerate(zip(correct, lengths)):
        mask[b, :n] = 1
        rewards[b, n - 1] = 1.0 if ok else -1.0
    rng = np.random.default_rng(0)
    regions = [rng.integers(0, len(REGIONS), n).tolist() for n in lengths]  # any regions: correctness reaches all
    blocks = ["<|meta|>check<|/meta|>", ""]
    rollouts = [Rollout(prompt="", response=f"{blocks[b % 2]}\\boxed{{{b}}}", gold="1", correct=bool(ok),
                        format_class="wellformed" if b % 2 == 0 else "none") for b, ok in enumerate(correct)]
    return rollouts, uid, mask, rewards, regions


def local_token_advantages(values, uid, regions, heads: HeadsSpec, norm: bool, step: int = 0):
    adv, facts = centre_heads(values, list(uid), norm)
    gain = gain_matrix(head_weights(heads, step), heads.routing)
    return [token_advantages(a, gain, reg) for a, reg in zip(adv, regions)], facts


def padded(rows, width):
    out = np.zeros((len(rows), width))
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_control_arm_is_plain_grpo(norm):
    """Vanilla: the meta head has no values, so with the default weights (correctness 1, meta 1) and the default
    routing the shared path must give verl's GRPO outcome advantage on every token."""
    rollouts, uid, mask, rewards, regions = grpo_batch()
    values = [rollout_heads(r, None) for r in rollouts]
    ours, facts = local_token_advantages(values, uid, regions, HeadsSpec(), norm)
    theirs, _ = verl_algos.compute_grpo_outcome_advantage(rewards, mask, uid, norm_adv_by_std_in_grpo=norm)
    assert padded(ours, 7) == pytest.approx(theirs.numpy(), abs=1e-6)
    assert facts["adv_norm_std_applied"] is norm
    assert np.abs(theirs.numpy()).sum() > 1  # the comparison is not between zeros


def verl_data(rollouts, uid, mask, values, regions, heads: HeadsSpec, step: int = 0):
    import torch
    from verl import DataProto

    from rewards.verl_adapter import attach

    data = DataProto.from_dict(tensors={"response_mask": mask, "token_level_rewards": torch.zeros_like(mask)},
                               non_tensors={"uid": uid})
    attach(data, values, regions, head_weights(heads, step), heads.routing)
    return data


@pytest.mark.parametrize("norm", [True, False])
def test_verl_adapter_control_equals_grpo(norm):
    from rewards.verl_adapter import compute_advantage

    rollouts, uid, mask, rewards, regions = grpo_batch()
    values = [rollout_heads(r, None) for r in rollouts]
    data = verl_data(rollouts, uid, mask, values, regions, HeadsSpec())
    facts = compute_advantage(data, norm_adv_by_std_in_grpo=norm)
    theirs, _ = verl_algos.compute_grpo_outcome_advantage(rewards, mask, uid, norm_adv_by_std_in_grpo=norm)
    assert data.batch["advantages"].numpy() == pytest.approx(theirs.numpy(), abs=1e-6)
    assert facts["adv_norm_std_applied"] is norm and data.meta_info["twinarm_adv_facts"] == facts


def test_verl_adapter_matches_local_path_with_meta_head():
    import torch
    from verl.trainer.config import AlgoConfig

    from rewards.verl_adapter import ESTIMATOR

    rollouts, uid, mask, _, regions = grpo_batch()
    meta = [3.0, None, -3.2, 0.0, None, None, 1.0, 2.0, 0.5, None, -1.0]
    values = [rollout_heads(r, m) for r, m in zip(rollouts, meta)]
    heads = HeadsSpec(weights={"correctness": 1.0, "meta": 0.5, "emission": 0.2, "format": 1.0},
                      warmup_steps={"meta": 4})
    ours, _ = local_token_advantages(values, uid, regions, heads, norm=False, step=2)
    data = verl_data(rollouts, uid, mask, values, regions, heads, step=2)
    fn = verl_algos.get_adv_estimator_fn(ESTIMATOR)
    adv, ret = fn(token_level_rewards=data.batch["token_level_rewards"], response_mask=mask, index=uid,
                  config=AlgoConfig(norm_adv_by_std_in_grpo=False), non_tensor_batch=data.non_tensor_batch,
                  batch=data.batch)
    assert adv.numpy() == pytest.approx(padded(ours, 7), abs=1e-6) and torch.equal(adv, ret)
    # the meta head moved some tokens away from the correctness-only advantage
    control, _ = local_token_advantages([rollout_heads(r, None) for r in rollouts], uid, regions, heads, False, 2)
    assert not np.allclose(padded(ours, 7), padded(control, 7))
    # the fields survive verl's row reordering
    perm = [3, 0, 10, 5, 1, 2, 9, 4, 8, 7, 6]
    shuffled = data.select_idxs(perm)
    adv2, _ = fn(token_level_rewards=shuffled.batch["token_level_rewards"],
                 response_mask=shuffled.batch["response_mask"], index=shuffled.non_tensor_batch["uid"],
                 norm_adv_by_std_in_grpo=False,
                 non_tensor_batch=shuffled.non_tensor_batch, batch=shuffled.batch)
    assert adv2.numpy() == pytest.approx(adv.numpy()[perm], abs=1e-7)
    # verl's generic call passes neither batch nor the std switch: refuse rather than guess
    with pytest.raises(ValueError, match="lacks the head/region fields"):
        fn(token_level_rewards=data.batch["token_level_rewards"], response_mask=mask, index=uid,
           config=AlgoConfig(norm_adv_by_std_in_grpo=True))
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo"):
        fn(token_level_rewards=mask, response_mask=mask, index=uid, non_tensor_batch=data.non_tensor_batch,
           batch=data.batch)


def test_pipeline_routes_meta_advantage_to_block_tokens():
    from rewards.pipeline import Sample, score_batch
    from rewards.scorer import PieceTokenizer, TableScorer

    tok = PieceTokenizer()

    class Grader:
        def grade(self, responses, golds):
            from types import SimpleNamespace
            return [SimpleNamespace(correct="16" in r, extracted=None, timed_out=False) for r in responses]

    x = "Q: "
    texts = ["a<|meta|>b<|/meta|>\\boxed{16}", "c<|meta|>d<|/meta|>\\boxed{16}", "\\boxed{3}"]
    # \boxed{16} vs \boxed{15} differ at "6"/"5" only; lp(6) = 0 against the default −1 makes B = 1 there.
    # Rollout 1: o = B(x∘a) = 0, c = B(x∘a∘m) = 1. Rollout 2: o = B(x∘c) = 1, c = 0.
    table = {(x + "a<|meta|>b<|/meta|>", "\\boxed{1"): {"6": 0.0}, (x + "c", "\\boxed{1"): {"6": 0.0}}
    groups = [[Sample(x, t, tok.encode(t), "16") for t in texts]]
    out = score_batch(groups, rl=RLSpec(reward="pmishift"), step=0, grader=Grader(), tokenizer=tok,
                      scorer=TableScorer(tok, table), make_decoys=lambda golds: ["15"] * len(golds))
    # meta values: c − o = +1 (no SAVE: o = 0 is not < 0), −1 (no DERAIL: c = 0), no block → None
    # meta advantage: ±1 around their mean 0. correctness: (1, 1, −1) − 1/3 → (2/3, 2/3, −4/3);
    # emission (weight 0 by default) does not reach the tokens
    adv = out.token_advantages[0]
    regions = [REGIONS[i] for i in out.region_ids[0]]
    assert regions[:5] == ["answer", "format", "meta", "format", "answer"]
    assert adv[:5] == pytest.approx([2 / 3, 2 / 3 + 1, 2 / 3 + 1, 2 / 3 + 1, 2 / 3])
    assert out.token_advantages[1][2] == pytest.approx(2 / 3 - 1)
    assert out.token_advantages[2] == pytest.approx([-4 / 3] * 3)  # [\\boxed{, 3, }]


# ---------------------------------------------------------------- one stated confidence for evaluation and the head

TWO_STATED = ["<|meta|>confidence 0.2, redo<|/meta|> x <|meta|>confidence: 90%<|/meta|> \\boxed{1}",  # last: 0.9
              "<|meta|>confidence 0.3<|/meta|> y <|meta|>no number here<|/meta|> \\boxed{2}",  # last stating: 0.3
              "<|meta|>confidence 0.4 ... confidence 0.6<|/meta|> \\boxed{3}",  # within a block its last: 0.6
              "<|meta|>check<|/meta|> \\boxed{4}"]  # none


def test_stated_confidence_is_the_last_stated_one():
    from meta.grammar import find_blocks, stated_confidence

    assert [stated_confidence(find_blocks(t)) for t in TWO_STATED] == [0.9, 0.3, 0.6, None]


def test_evaluation_and_the_calibration_head_read_the_same_confidence():
    from evals.engine import Generation
    from evals.evaluate import sample_and_grade

    class Engine:
        def generate(self, prompts, n=1, **kw):
            return [[Generation(TWO_STATED[i], (1, 2), False)] for i in range(len(prompts))]

    class Tok:
        def apply_chat_template(self, messages, **kw):
            return messages[0]["content"]

    class Grades:
        def grade(self, responses, golds):
            return [Grade(True, "1") for _ in responses]

    rows = [{"id": f"p{i}", "prompt": f"q{i}", "answer": "1"} for i in range(len(TWO_STATED))]
    records = sample_and_grade(Engine(), Tok(), Grades(), "s", rows, 1, 0.0, 1.0, 8, 0)
    evaluation = [r["confidence"] for r in records]
    head = [rollout_heads(Rollout(prompt="", response=t, gold="1", correct=True), None)["calibration"]
            for t in TWO_STATED]
    assert evaluation == [0.9, 0.3, 0.6, None]
    assert head == [pytest.approx(-(c - 1.0) ** 2) if c is not None else None for c in evaluation]
