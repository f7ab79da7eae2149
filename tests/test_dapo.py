"""DAPO as an algorithm option: dynamic sampling (rl.dapo), the soft overlong punishment (rewards.heads), the spec
keys that switch them on, and their translation to verl 0.9.1's keys."""
from __future__ import annotations

import pytest

from infra.spec import BaseSpec, RLSpec, mechanism_of
from rewards.heads import overlong_penalty
from rl.dapo import dynamic_sampling, zero_variance


# ---------------------------------------------------------------- the zero-variance criterion

@pytest.mark.parametrize("values, filtered", [
    ([1.0, 1.0, 1.0], True), ([0.0, 0.0], True), ([1.0, 0.0, 1.0], False), ([0.0, 1.0], False),
    ([1.0], False),  # a single rollout is never filtered (verl keeps it too)
])
def test_zero_variance_is_verls_criterion(values, filtered):
    assert zero_variance(values) is filtered


# ---------------------------------------------------------------- dynamic sampling

def scripted(accuracies: list[list[list[float]]]):
    """sample/accuracy callables replaying per-round accuracies; prompts are (round, position) tuples."""
    calls = []

    def prompts_of_round(r):
        return [{"id": f"r{r}p{i}"} for i in range(len(accuracies[r]))]

    def sample(rows, r):
        calls.append(r)
        return [[(row["id"], k) for k in range(len(accuracies[r][i]))] for i, row in enumerate(rows)]

    def accuracy(groups):
        r = calls[-1]
        return accuracies[r]

    return prompts_of_round, sample, accuracy, calls


def test_filtering_selects_exactly_the_zero_variance_groups_and_resampling_fills_the_batch():
    rounds = [
        [[1, 1], [0, 1], [0, 0], [1, 1]],  # kept: p1
        [[0, 0], [1, 0], [0, 0], [1, 0]],  # kept: p1, p3
        [[1, 0], [0, 1], [1, 1], [0, 0]],  # kept: p0 (fills the batch of 4), p1 is surplus
        [[1, 0]] * 4,  # never reached
    ]
    prompts_of_round, sample, accuracy, calls = scripted(rounds)
    ds = dynamic_sampling(prompts_of_round, sample, accuracy, batch_size=4, max_num_gen_batches=10)
    assert calls == [0, 1, 2]
    assert [r["id"] for r in ds.rows] == ["r0p1", "r1p1", "r1p3", "r2p0"]
    assert [g[0][0] for g in ds.groups] == ["r0p1", "r1p1", "r1p3", "r2p0"]
    assert ds.facts == {"dynamic_sampling/rounds": 3, "dynamic_sampling/generated_groups": 12,
                        "dynamic_sampling/filtered_all_correct": 3, "dynamic_sampling/filtered_all_wrong": 4,
                        "dynamic_sampling/kept_groups": 4, "dynamic_sampling/train_groups": 4,
                        "dynamic_sampling/cap_hit": 0, "dynamic_sampling/unfiltered": 0}


def test_the_cap_stops_it_with_a_short_batch():
    rounds = [[[1, 1], [0, 1]], [[0, 0], [0, 0]], [[1, 0], [1, 0]]]
    prompts_of_round, sample, accuracy, calls = scripted(rounds)
    ds = dynamic_sampling(prompts_of_round, sample, accuracy, batch_size=2, max_num_gen_batches=2)
    assert calls == [0, 1]  # round 2 would have filled the batch: the cap came first
    assert [r["id"] for r in ds.rows] == ["r0p1"]
    assert (ds.facts["dynamic_sampling/kept_groups"], ds.facts["dynamic_sampling/cap_hit"],
            ds.facts["dynamic_sampling/unfiltered"]) == (1, 1, 0)


def test_no_informative_group_falls_back_to_the_last_round_unfiltered():
    rounds = [[[0, 0], [1, 1]], [[0, 0], [0, 0]]]
    prompts_of_round, sample, accuracy, _ = scripted(rounds)
    ds = dynamic_sampling(prompts_of_round, sample, accuracy, batch_size=2, max_num_gen_batches=2)
    assert [r["id"] for r in ds.rows] == ["r1p0", "r1p1"]
    assert (ds.facts["dynamic_sampling/kept_groups"], ds.facts["dynamic_sampling/train_groups"],
            ds.facts["dynamic_sampling/filtered_all_wrong"], ds.facts["dynamic_sampling/filtered_all_correct"],
            ds.facts["dynamic_sampling/cap_hit"], ds.facts["dynamic_sampling/unfiltered"]) == (0, 2, 3, 1, 1, 1)


def test_a_sampler_that_loses_groups_is_an_error():
    with pytest.raises(ValueError, match="round 0: 2 prompts, 1 groups"):
        dynamic_sampling(lambda r: [{}, {}], lambda rows, r: [[1, 2]], lambda g: [[1.0, 0.0]], 2, 3)


# ---------------------------------------------------------------- the soft overlong punishment

@pytest.mark.parametrize("n_tokens, expected", [(0, 0.0), (96, 0.0), (97, -1 / 32), (112, -0.5), (128, -1.0)])
def test_overlong_penalty_is_dapos_linear_ramp(n_tokens, expected):
    # L_max 128, buffer 32: free up to 96 tokens, −1 at 128 (verl's DAPORewardManager formula)
    assert overlong_penalty(n_tokens, 128, 32, 1.0) == pytest.approx(expected)
    assert overlong_penalty(n_tokens, 128, 32, 0.5) == pytest.approx(expected / 2)


def test_overlong_penalty_reaches_exactly_the_long_rollouts_correctness_head():
    from rewards.grader import get_grader
    from rewards.pipeline import Sample, score_batch
    from infra.spec import GraderSpec
    from test_heads import byte_level_tokenizer

    tok = byte_level_tokenizer()
    texts = ["so \\boxed{4}", "so the sum is \\boxed{4}", "so \\boxed{5}", "the long wrong answer: \\boxed{5}"]
    groups = [[Sample("Q:", t, tok.encode(t, add_special_tokens=False), "4") for t in texts]]
    lengths = [len(s.response_ids) for s in groups[0]]
    rl = RLSpec(max_response_length=24, overlong_buffer={"enable": True, "len": 8, "penalty_factor": 1.0})
    on = score_batch(groups, rl=rl, step=1, grader=get_grader(GraderSpec(workers=1)), tokenizer=tok)
    off = score_batch(groups, rl=RLSpec(max_response_length=24), step=1, grader=get_grader(GraderSpec(workers=1)),
                      tokenizer=tok)
    expected = [min(-(n - 16) / 8, 0.0) for n in lengths]
    assert sum(e < 0 for e in expected) == 2 and sum(e == 0 for e in expected) == 2  # the texts straddle 16 tokens
    assert [r["heads"]["correctness"] for r in on.records] == pytest.approx(
        [r["heads"]["correctness"] + e for r, e in zip(off.records, expected)])
    assert on.facts["overlong/penalised"] == 2 and on.facts["accuracy/pure"] == off.facts["accuracy/pure"] == 0.5
    assert "overlong/penalised" not in off.facts


# ---------------------------------------------------------------- spec keys

def test_spec_keys_act_or_are_refused():
    rl = RLSpec(filter_groups={"enable": True, "max_num_gen_batches": 3},
                overlong_buffer={"enable": True, "len": 512, "penalty_factor": 0.5})
    assert rl.filter_groups.max_num_gen_batches == 3 and rl.overlong_buffer.len == 512
    with pytest.raises(ValueError, match="max_num_gen_batches is read only with filter_groups.enable"):
        RLSpec(filter_groups={"max_num_gen_batches": 3})
    with pytest.raises(ValueError, match="read only with overlong_buffer.enable"):
        RLSpec(overlong_buffer={"len": 64})
    with pytest.raises(ValueError, match="overlong_buffer.len 8192 exceeds max_response_length 4096"):
        RLSpec(overlong_buffer={"enable": True, "len": 8192})
    with pytest.raises(ValueError, match="extra"):
        RLSpec(filter_groups={"enable": True, "metric": "reward"})
    # a group of one rollout is always zero-variance: dynamic sampling could keep none (no cap: never stop)
    with pytest.raises(ValueError, match="filter_groups.enable with n 1: a group of one rollout always has zero "
                                         "variance"):
        RLSpec(n=1, batch_size=8, filter_groups={"enable": True, "max_num_gen_batches": 0})
    assert RLSpec(n=2, filter_groups={"enable": True}).n == 2 and RLSpec(n=1).n == 1  # n 1 alone is allowed
    assert mechanism_of("rl.filter_groups.enable") == "dynamic_sampling"
    assert mechanism_of("rl.overlong_buffer.len") == "overlong_punishment"


# ---------------------------------------------------------------- verl translation

def verl_cfg(**rl) -> BaseSpec:
    return BaseSpec.model_validate({"executor": {"kind": "verl", "compute": {"device": "cuda"}},
                                    "rl": rl, "grader": {"workers": 1}})


def test_verl_translation_carries_the_dapo_keys():
    from rl.verl_config import SOURCES, load, overrides_for, translate
    from test_verl import paths

    cfg = verl_cfg(filter_groups={"enable": True, "max_num_gen_batches": 0},
                   overlong_buffer={"enable": True, "len": 512, "penalty_factor": 0.5})
    ov = translate(cfg, ablation="x", arm="dapo", seed=0, paths=paths())
    assert (ov["algorithm.filter_groups.enable"], ov["algorithm.filter_groups.metric"]) == (True, "acc")
    o = "+reward.reward_kwargs.overlong_buffer_cfg."
    assert (ov[o + "enable"], ov[o + "len"], ov[o + "penalty_factor"]) == (True, 512, 0.5)
    assert ov["+reward.reward_kwargs.max_resp_len"] == 4096
    config, _ = load(overrides_for(cfg, ablation="x", arm="dapo", seed=0, paths=paths()))
    fg = config.algorithm.filter_groups
    assert (fg.enable, fg.metric, fg.max_num_gen_batches) == (True, "acc", 0)
    assert dict(config.reward.reward_kwargs.overlong_buffer_cfg) == {"enable": True, "len": 512,
                                                                    "penalty_factor": 0.5, "log": True}
    # each translated DAPO key maps back to its spec key (the plan's arm diff)
    assert SOURCES["algorithm.filter_groups.enable"] == "rl.filter_groups.enable"
    assert SOURCES["reward.reward_kwargs.overlong_buffer_cfg.len"] == "rl.overlong_buffer.len"
    off = translate(verl_cfg(), ablation="x", arm="grpo", seed=0, paths=paths())
    assert off["algorithm.filter_groups.enable"] is False and off[o + "enable"] is False


def test_verl_refuses_a_generation_cap_it_would_ignore():
    from infra.errors import SpecError
    from rl.verl_config import translate
    from test_verl import paths

    with pytest.raises(SpecError, match=r"rl.filter_groups.max_num_gen_batches 10: verl .*ignores it.*set it to 0"):
        translate(verl_cfg(filter_groups={"enable": True}), ablation="x", arm="dapo", seed=0, paths=paths())


def test_verl_reward_manager_applies_the_overlong_punishment_like_the_local_path():
    """The same rollouts through rewards.pipeline and TwinarmRewardManager with the buffer on: identical
    correctness heads (penalty included) and the accuracy verl filters groups on."""
    import numpy as np

    from infra.spec import GraderSpec
    from rewards.grader import get_grader
    from rewards.pipeline import Sample, score_batch
    from rewards.verl_adapter import HEAD_KEY, TwinarmRewardManager
    from rl.verl_config import compose, overrides_for
    from test_heads import byte_level_tokenizer
    from test_verl import GOLDS, TEXTS, paths, verl_batch

    tok = byte_level_tokenizer()
    cfg = verl_cfg(max_response_length=64, overlong_buffer={"enable": True, "len": 48, "penalty_factor": 1.0})
    groups_ids = [[tok.encode(t, add_special_tokens=False) for t in group] for group in TEXTS]
    groups = [[Sample("Q:", t, ids, GOLDS[g]) for t, ids in zip(group, groups_ids[g])]
              for g, group in enumerate(TEXTS)]
    local = score_batch(groups, rl=cfg.rl, step=1, grader=get_grader(GraderSpec(workers=1)), tokenizer=tok)
    manager = TwinarmRewardManager(compose(overrides_for(cfg, ablation="t", arm="a", seed=0, paths=paths())), tok,
                                   None)
    data = verl_batch(tok, groups_ids, GOLDS, 64)
    outs = [manager.loop.run_until_complete(manager.run_single(data[i:i + 1])) for i in range(len(data))]
    ours = [r["heads"]["correctness"] for r in local.records]
    theirs = [o["reward_extra_info"][HEAD_KEY.format("correctness")] for o in outs]
    assert theirs == pytest.approx(ours) and local.facts["overlong/penalised"] > 0
    assert any(v not in (1.0, -1.0) for v in ours)  # the penalty really moved some
    assert [o["reward_extra_info"]["acc"] for o in outs] == [float(r["correct"]) for r in local.records]
    assert np.allclose([o["reward_score"] for o in outs], ours)
