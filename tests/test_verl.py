"""The verl cluster executor on CPU, against verl 0.9.1's real code: the spec → verl translation composed with
verl's shipped ppo_trainer config and validated by verl's config classes; the reward manager and estimator on a
real DataProto against the local executor's path; the parquet layout; `twinarm plan`; the RL schedule keys;
`twinarm doctor` on a machine without GPUs."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from infra.errors import SpecError
from infra.spec import BaseSpec, GraderSpec, HeadsSpec, RLSpec, load_spec, resolved_arms

QWEN = "configs/qwen3-8b.yaml"


@pytest.fixture(scope="module")
def qwen():
    spec = load_spec(QWEN)
    return spec, resolved_arms(spec)


def paths(tmp: str = "/shared/twinarm"):
    from rl.verl_config import RunPaths

    return RunPaths(f"{tmp}/rl.parquet", f"{tmp}/val.parquet", f"{tmp}/model", f"{tmp}/ckpt")


def verl_cfg(**rl) -> BaseSpec:
    return BaseSpec.model_validate({"executor": {"kind": "verl", "compute": {"device": "cuda"}},
                                    "rl": rl, "grader": {"workers": 1}})


# ---------------------------------------------------------------- translation + composition


def test_every_qwen_arm_composes_and_validates_through_verl(qwen):
    from rl.verl_config import ESTIMATOR, TRAINER_MODE, compose, overrides_for, translate, validate

    spec, arms = qwen
    for arm, cfg in arms.items():
        ov = translate(cfg, ablation=spec.name, arm=arm, seed=0, paths=paths())
        # every arm, the control arm included, runs our estimator and trainer: never verl's stock GRPO path
        assert ov["algorithm.adv_estimator"] == ESTIMATOR and ov["trainer.v1.trainer_mode"] == TRAINER_MODE
    cfg = arms["control"]
    config = compose(overrides_for(cfg, ablation=spec.name, arm="control", seed=0, paths=paths()))
    checked = validate(config)
    assert checked == {"actor_rollout_ref.actor": "FSDPActorConfig", "actor_rollout_ref.rollout": "RolloutConfig",
                       "algorithm": "AlgoConfig", "actor_rollout_ref.actor.optim": "FSDPOptimizerConfig",
                       "reward.reward_manager": "TwinarmRewardManager"}
    # the research's hyperparameters reached verl's config (read back from the composed config)
    a, r = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    assert (a.optim.lr, a.optim.weight_decay, a.optim.lr_scheduler_type, a.optim.lr_warmup_steps_ratio,
            a.optim.min_lr_ratio, a.optim.clip_grad) == (1e-6, 0.01, "cosine", 0.1, 0.1, 1.0)
    assert (a.ppo_mini_batch_size, a.loss_agg_mode, a.entropy_coeff, a.clip_ratio_low, a.clip_ratio_high,
            a.use_kl_loss, a.kl_loss_coef) == (8, "token-mean", 0.001, 0.2, 0.28, True, 0.0)
    assert (r.n, r.temperature, r.top_k, r.top_p, r.val_kwargs.do_sample) == (8, 0.6, 20, 0.95, False)
    assert (config.data.train_batch_size, config.data.max_prompt_length, config.data.max_response_length) == \
        (64, 2048, 4096)
    t = config.trainer
    assert (t.total_training_steps, t.save_freq, t.test_freq, t.resume_mode) == (300, 10, 25, "auto")
    assert config.twinarm.rl.reward == "vanilla" and "model" not in config.twinarm  # meta tags: the grammar's


def test_unknown_key_and_refused_value_are_one_clear_error(qwen):
    from rl.verl_config import VerlConfigError, check, overrides_for

    spec, arms = qwen
    cfg = arms["control"].model_copy(deep=True)
    cfg.executor.verl.extra_overrides = ["actor_rollout_ref.actor.clip_ratio_hgih=0.3"]
    ov = overrides_for(cfg, ablation=spec.name, arm="control", seed=0, paths=paths())
    with pytest.raises(VerlConfigError, match=r"verl override 'actor_rollout_ref.actor.clip_ratio_hgih' \(from "
                                              r"executor.verl.extra_overrides.*no such key"):
        check(ov)
    base = overrides_for(arms["control"], ablation=spec.name, arm="control", seed=0, paths=paths())
    with pytest.raises(VerlConfigError, match=r"verl override 'actor_rollout_ref.actor.ppo_epochs'.*expected a "
                                              r"number like verl's default 1, got 'abc'"):
        check(base + ["actor_rollout_ref.actor.ppo_epochs=abc"])
    with pytest.raises(VerlConfigError, match=r"verl config actor_rollout_ref.actor: ValueError: Invalid "
                                              r"loss_agg_mode: bogus"):
        check(base + ["actor_rollout_ref.actor.loss_agg_mode=bogus"])  # refused by verl's ActorConfig
    # an extra override cannot swap verl's stock GRPO in for our estimator
    with pytest.raises(VerlConfigError, match="not twinarm_heads / twinarm_sync"):
        check(base + ["algorithm.adv_estimator=grpo"])


def test_translation_refuses_what_verl_cannot_run():
    from rl.verl_config import translate

    with pytest.raises(SpecError, match="executor.kind is 'local'"):
        translate(BaseSpec(), ablation="x", arm="a", seed=0, paths=paths())
    cpu = BaseSpec.model_validate({"executor": {"kind": "verl", "compute": {"device": "cpu"}}})
    with pytest.raises(SpecError, match="no CPU training path"):
        translate(cpu, ablation="x", arm="a", seed=0, paths=paths())
    with pytest.raises(SpecError, match="rl.masa.enable: MASA .* local executor only"):
        translate(verl_cfg(masa={"enable": True}), ablation="x", arm="a", seed=0, paths=paths())


def test_spec_refuses_keys_that_would_not_act():
    with pytest.raises(ValueError, match="without kl_loss"):
        RLSpec(kl_coef=0.1)
    with pytest.raises(ValueError, match="top_k: 0"):
        RLSpec(top_k=0)


# ---------------------------------------------------------------- plan


def test_plan_diff_equals_declared_diff_for_qwen(qwen):
    from flows.plan import arm_diffs, plan_arms

    spec, _ = qwen
    plans = plan_arms(spec, "/mnt/shared", "http://head:8265")
    assert [p.arm for p in plans] == ["control", "meta_sft", "pmishift"]
    assert len({p.job.submission_id for p in plans}) == 3
    assert all(p.submit.startswith("ray job submit --address http://head:8265 --submission-id twinarm-rl-")
               and " -- python -m rl.verl_main " in p.submit for p in plans)
    assert all(p.blocked is None for p in plans)  # pmishift runs (rewards.verl_adapter.VERL_SIGNALS)
    assert plans[2].note and "without GPUs" in plans[2].note and plans[0].note is None
    diffs = {(d.a, d.b): d for d in arm_diffs(spec, plans)}
    rq1, rq2 = diffs["meta_sft", "control"], diffs["pmishift", "meta_sft"]
    # each RL computation writes its own copy of the data (the flow's layout, rl.verl_run): the paths differ, the
    # spec keys behind them (the data stage's) do not
    paths_ = ["data.train_files", "data.val_files"]
    assert list(rq1.verl) == ["actor_rollout_ref.model.path", *paths_] and rq1.mapped == rq1.declared == \
        {"sft.strip_meta"}
    assert list(rq2.verl) == ["+twinarm.rl.reward", *paths_] and rq2.verl["+twinarm.rl.reward"] == \
        ("pmishift", "vanilla") and rq2.mapped == rq2.declared == {"rl.reward"}
    # the plan is deterministic: the same spec gives the same job ids
    assert [p.job.submission_id for p in plan_arms(spec, "/mnt/shared", "x")] == [p.job.submission_id for p in plans]


def test_plan_catches_a_leaked_difference(qwen):
    from flows.plan import arm_diffs, plan_arms

    spec, _ = qwen
    plans = plan_arms(spec, "/mnt/shared", "http://head:8265")
    plans[1].overrides["actor_rollout_ref.rollout.top_k"] = 50  # a difference nobody declared
    d = {(x.a, x.b): x for x in arm_diffs(spec, plans)}["meta_sft", "control"]
    assert not d.equal and d.mapped == {"sft.strip_meta", "rl.top_k"}


def test_plan_command(qwen, home):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["plan", QWEN, "--root", "/mnt/shared", "--address", "http://head:8265"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert res.output.count("ray job submit --address http://head:8265") == 3
    assert res.output.count("equals the declared diff") == 2


def test_plan_refuses_what_validate_refuses(home, tmp_path):
    # an unregistered rl.reward was a bare KeyError from the signal registry (traceback saved), not the spec error
    # naming the file, the line and the arm that `twinarm validate` gives
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    doc = yaml.safe_load(open(QWEN))
    doc["arms"]["pmishift"]["overrides"]["rl.reward"] = "pmishfit"
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = CliRunner().invoke(app, ["plan", str(bad)], env={"COLUMNS": "250"})
    assert res.exit_code == 2, res.output
    assert "KeyError" not in res.output and "traceback" not in res.output
    assert f"{bad}:" in res.output and "arm pmishift: rl.reward 'pmishfit' is not a registered reward signal" \
        in " ".join(res.output.split())


# ---------------------------------------------------------------- data layout


def test_prompts_in_verl_parquet_layout(tmp_path):
    import pyarrow.parquet as pq

    from infra.errors import DataError
    from rl.verl_data import write_verl_parquet

    rows = [{"id": "a1", "prompt": "What is 2+3?", "answer": "5", "domain": "add", "level": None, "source": "arith"},
            {"id": "a2", "prompt": "What is 7*6?", "answer": "42", "domain": "mul", "level": 2, "source": "arith"}]
    digest = write_verl_parquet(rows, tmp_path / "rl.parquet", "train", "rl_prompts")
    table = pq.read_table(tmp_path / "rl.parquet")
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    got = table.to_pylist()
    assert got[1] == {"data_source": "arith", "prompt": [{"role": "user", "content": "What is 7*6?"}],
                      "ability": "mul", "reward_model": {"style": "rule", "ground_truth": "42"},
                      "extra_info": {"id": "a2", "domain": "mul", "level": 2, "split": "train", "index": 1}}
    assert write_verl_parquet(rows, tmp_path / "again.parquet", "train", "rl_prompts") == digest  # deterministic
    with pytest.raises(DataError, match=r"rl_prompts: row 1 \(id 'a2'\): field 'answer'"):
        write_verl_parquet([rows[0], {**rows[1], "answer": " "}], tmp_path / "bad.parquet", "train", "rl_prompts")


def test_verl_reads_our_parquet(tmp_path):
    """verl's own RL dataset reads the file, applies the chat template to `prompt`, keeps the ground truth."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from rl.verl_data import write_verl_parquet
    from test_heads import byte_level_tokenizer

    tok = byte_level_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    tok.pad_token = tok.eos_token = "<|/meta|>"
    rows = [{"id": "a1", "prompt": "What is 2+3?", "answer": "5", "domain": "add", "source": "arith"}]
    write_verl_parquet(rows, tmp_path / "rl.parquet", "train", "rl_prompts")
    data_cfg = OmegaConf.create({"max_prompt_length": 64, "prompt_key": "prompt", "truncation": "error",
                                 "filter_overlong_prompts": False, "return_raw_chat": True})
    ds = RLHFDataset(data_files=str(tmp_path / "rl.parquet"), tokenizer=tok, config=data_cfg)
    item = ds[0]
    assert item["reward_model"]["ground_truth"] == "5" and item["data_source"] == "arith"
    assert list(item["raw_prompt"]) == [{"role": "user", "content": "What is 2+3?"}]


# ---------------------------------------------------------------- schedule keys (both executors)


def test_lr_schedule_is_verls():
    import torch
    from verl.utils.torch_functional import get_cosine_schedule_with_warmup

    from rl.schedule import lr_at, warmup_steps

    rl = RLSpec(lr=1e-6, lr_schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.1, steps=300)
    assert warmup_steps(rl) == 30
    lrs = [lr_at(s, rl) for s in range(1, 301)]
    # verl's actor: a LambdaLR stepped after each update, so step s trains at the multiplier of s − 1
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-6)
    sched = get_cosine_schedule_with_warmup(opt, 30, 300, min_lr_ratio=0.1)
    theirs = []
    for _ in range(300):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(theirs, rel=0, abs=1e-18)
    assert lrs[0] == 0 and lrs[30] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-7, rel=1e-3)
    assert lrs[15] == pytest.approx(0.5e-6)  # halfway through the warm-up
    assert [lr_at(s, RLSpec(lr=2e-5, steps=10)) for s in (1, 10)] == [2e-5, 2e-5]  # constant, no warm-up
    with pytest.raises(ValueError, match="outside 1..10"):
        lr_at(11, RLSpec(steps=10))


def test_entropy_and_kl_terms_are_verls():
    """The local loss's entropy bonus and KL term (rl.grpo.grpo_loss) are verl's agg_loss/kl_penalty terms."""
    import torch
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty
    from verl.utils.torch_functional import entropy_from_logits

    from rl.grpo import _actor_config, grpo_loss
    from rl.schedule import hf_top_k

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    lp, ref, adv = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g), torch.randn(3, 5, generator=g)
    ent = entropy_from_logits(logits)
    rl = RLSpec(entropy_coeff=0.001, kl_loss=True, kl_coef=0.05, batch_size=3, mini_batch_size=3, n=1)
    cfg = _actor_config(rl)
    loss, metrics = grpo_loss(lp, lp, adv, mask, cfg, ref, ent)
    pg, _ = compute_policy_loss_vanilla(lp, lp, adv, mask, loss_agg_mode="token-mean", config=cfg)
    want_ent = agg_loss(ent, mask.bool(), "token-mean")
    want_kl = agg_loss(kl_penalty(lp, ref, "low_var_kl"), mask.bool(), "token-mean")
    assert float(loss) == pytest.approx(float(pg) - 0.001 * float(want_ent) + 0.05 * float(want_kl), abs=1e-7)
    assert metrics["actor/entropy_loss"] == pytest.approx(float(want_ent))
    assert metrics["actor/kl_loss"] == pytest.approx(float(want_kl))
    assert float(want_ent) > 1 and float(want_kl) > 0  # the terms are not zeros
    # KL on with coefficient 0 (the research's setting): logged, no change to the loss
    cfg0 = _actor_config(RLSpec(kl_loss=True, batch_size=3, mini_batch_size=3, n=1))
    loss0, m0 = grpo_loss(lp, lp, adv, mask, cfg0, ref)
    assert float(loss0) == pytest.approx(float(pg)) and m0["actor/kl_loss"] == pytest.approx(float(want_kl))
    with pytest.raises(ValueError, match="per-token entropy"):
        grpo_loss(lp, lp, adv, mask, cfg, ref, None)
    with pytest.raises(ValueError, match="reference log-probs"):
        grpo_loss(lp, lp, adv, mask, cfg0, None)
    assert (hf_top_k(RLSpec()), hf_top_k(RLSpec(top_k=20))) == (0, 20)


# ---------------------------------------------------------------- parity: local executor path vs verl path


TEXTS = [["ok<|meta|>confidence 0.8 looks right<|/meta|>\\boxed{5}", "\\boxed{5}", "ok \\boxed{4}",
          "<|meta|>confidence 0.3<|/meta|>\\boxed{4}"],
         ["\\boxed{42}", "<|meta|>hmm", "ok<|meta|>looks right<|/meta|>\\boxed{41}", "\\boxed{42}"],
         ["<|meta|>a<|/meta|><|meta|>b<|/meta|>\\boxed{7}", "\\boxed{7}", "\\boxed{8}"]]
GOLDS = ["5", "42", "7"]


def verl_batch(tok, groups_ids, golds, max_resp: int):
    """A DataProto as verl's rollout leaves it: left-padded prompts, right-padded responses, masks, uid."""
    import torch
    from verl import DataProto

    prompt = tok.encode("Q:", add_special_tokens=False)
    rows = [(g, ids) for g, group in enumerate(groups_ids) for ids in group]
    bs, p_len = len(rows), len(prompt)
    prompts = torch.tensor([prompt] * bs)
    responses = torch.zeros(bs, max_resp, dtype=torch.long)
    attn = torch.zeros(bs, p_len + max_resp, dtype=torch.long)
    attn[:, :p_len] = 1
    for b, (_, ids) in enumerate(rows):
        responses[b, :len(ids)] = torch.tensor(ids)
        attn[b, p_len:p_len + len(ids)] = 1
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attn,
                 "response_mask": attn[:, p_len:].float()},
        non_tensors={"uid": np.array([f"p{g}" for g, _ in rows], dtype=object),
                     "reward_model": np.array([{"ground_truth": golds[g]} for g, _ in rows], dtype=object),
                     "data_source": np.array(["arith"] * bs, dtype=object)})


SHAPED = {"weights": {"correctness": 1.0, "meta": 1.0, "calibration": 1.0, "format": 0.5, "emission": 0.3},
          "warmup_steps": {"emission": 4}}


def both_paths(norm: bool, heads: dict | None, step: int = 2):
    """The same rollouts through the local executor's pipeline and through our verl reward manager (as verl's
    reward loop calls it, one rollout at a time). Returns (tokenizer, local BatchResult, verl config, DataProto
    carrying the reward manager's head fields, reward manager outputs)."""
    from rewards.grader import get_grader
    from rewards.pipeline import Sample, score_batch
    from rewards.verl_adapter import TwinarmRewardManager
    from rl.verl_config import compose, overrides_for
    from test_heads import byte_level_tokenizer

    tok = byte_level_tokenizer()
    cfg = verl_cfg(reward="vanilla", adv_norm_std=norm, max_response_length=64, **({"heads": heads} if heads else {}))
    groups_ids = [[tok.encode(t, add_special_tokens=False) for t in group] for group in TEXTS]
    groups = [[Sample("Q:", t, ids, GOLDS[g]) for t, ids in zip(group, groups_ids[g])]
              for g, group in enumerate(TEXTS)]
    local = score_batch(groups, rl=cfg.rl, step=step, grader=get_grader(GraderSpec(workers=1)), tokenizer=tok)
    config = compose(overrides_for(cfg, ablation="t", arm="a", seed=0, paths=paths()))
    manager = TwinarmRewardManager(config, tok, None)
    data = verl_batch(tok, groups_ids, GOLDS, 64)
    outs = [manager.loop.run_until_complete(manager.run_single(data[i:i + 1])) for i in range(len(data))]
    return tok, local, config, data, outs


def padded_local(local, width: int = 64) -> np.ndarray:
    out = np.zeros((len(local.token_advantages), width))
    for b, adv in enumerate(local.token_advantages):
        out[b, :len(adv)] = adv
    return out


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("heads", [SHAPED, None], ids=["shaped-heads", "control"])
def test_local_and_verl_paths_give_identical_advantages_and_loss(norm, heads):
    import torch
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config.actor import ActorConfig

    from rewards.verl_adapter import HEAD_KEY, heads_advantage, read_twinarm_section

    step = 2
    tok, local, config, data, outs = both_paths(norm, heads, step)
    for key in outs[0]["reward_extra_info"]:
        data.non_tensor_batch[key] = np.array([o["reward_extra_info"][key] for o in outs])
    section = read_twinarm_section(config)
    facts = heads_advantage(data, tok, HeadsSpec.model_validate(section["rl"]["heads"]), step,
                            bool(config.algorithm.norm_adv_by_std_in_grpo))
    ours = padded_local(local)
    theirs = data.batch["advantages"].numpy()
    assert np.abs(theirs - ours).max() <= 1e-6
    assert facts["adv_norm_std_applied"] is norm
    # the comparison is not between near-zeros, and heads other than correctness moved tokens
    assert np.abs(ours).sum() > 5
    assert [o["reward_score"] for o in outs] == [1.0 if r["correct"] else -1.0 for r in local.records]
    assert [o["reward_extra_info"][HEAD_KEY.format("calibration")] for o in outs[:4]] == pytest.approx(
        [-(0.8 - 1) ** 2, math.nan, math.nan, -(0.3 - 0) ** 2], nan_ok=True)
    if heads is None:  # the control arm: our estimator with the correctness head only = verl's GRPO outcome advantage
        from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

        rewards = torch.zeros(len(data), 64)
        for b, o in enumerate(outs):
            rewards[b, int(data.batch["response_mask"][b].sum()) - 1] = o["reward_score"]
        grpo, _ = compute_grpo_outcome_advantage(rewards, data.batch["response_mask"], data.non_tensor_batch["uid"],
                                                 norm_adv_by_std_in_grpo=norm)
        assert np.abs(grpo.numpy() - theirs).max() <= 1e-6
    # and the same PPO loss (verl's policy loss, the one the local executor's ppo_update calls)
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(len(data), 64, generator=g)
    new = old + 0.1 * torch.randn(len(data), 64, generator=g)
    mask = data.batch["response_mask"]
    actor = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                        loss_agg_mode="token-mean", ppo_mini_batch_size=11, ppo_micro_batch_size_per_gpu=11, rollout_n=1)
    l_local, _ = compute_policy_loss_vanilla(old, new, torch.tensor(ours, dtype=torch.float32), mask,
                                             loss_agg_mode="token-mean", config=actor)
    l_verl, _ = compute_policy_loss_vanilla(old, new, data.batch["advantages"], mask, loss_agg_mode="token-mean",
                                            config=actor)
    assert abs(float(l_local) - float(l_verl)) <= 1e-6 and abs(float(l_verl)) > 1e-3


def test_reward_manager_refuses_a_signal_it_does_not_run():
    from rewards.verl_adapter import TwinarmRewardManager
    from rl.verl_config import compose, overrides_for
    from test_heads import byte_level_tokenizer

    config = compose(overrides_for(verl_cfg(reward="cf"), ablation="t", arm="a", seed=0, paths=paths()))
    with pytest.raises(ValueError, match=r"rl.reward 'cf': on verl the reward manager runs vanilla, pmishift, "
                                         r"pmi, gm; signals that regenerate \(cf, asym_cf\) or MASA's rollouts are "
                                         r"not built"):
        TwinarmRewardManager(config, byte_level_tokenizer(), None)


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """The frozen reference as the RL stage gets it: an SFT model directory (toy Qwen2 + the policy's tokenizer)."""
    from infra.spec import ToyModelSpec
    from test_heads import byte_level_tokenizer
    from worlds.model import save_model, toy_model
    from worlds.tokenizer import save_tokenizer

    tok = byte_level_tokenizer()
    path = tmp_path_factory.mktemp("scorer")
    save_model(toy_model(ToyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64, max_position=256), tok, seed=0), path)
    save_tokenizer(tok, path)
    return path


SCORED = [["ok<|meta|>confidence 0.8 looks right<|/meta|>\\boxed{5}", "ok<|meta|>looks<|/meta|> so \\boxed{4}",
           "\\boxed{5}", "<|meta|>hmm<|/meta|>"],
          ["ok<|meta|>right<|/meta|>\\boxed{42}", "<|meta|>confidence 0.2<|/meta|>then \\boxed{41}", "\\boxed{42}"]]


@pytest.mark.parametrize("reward", ["pmishift", "pmi", "gm"])
def test_scorer_signals_on_verl_equal_the_local_executors(reward, scorer_dir, one_torch_thread):
    """The frozen-reference scorer signals in the verl reward manager (one rollout at a time, as verl's reward loop
    calls it, the scorer loaded from actor_rollout_ref.model.path) against the local executor's score_batch (a group
    per scorer call, the same SFT directory as its frozen scorer): the same meta head on every rollout, a value on
    some, and the scorer's requests counted per rollout summing to the local count."""
    from rewards.grader import get_grader
    from rewards.pipeline import Sample, score_batch
    from rewards.scorer import HFScorer
    from rewards.verl_adapter import HEAD_KEY, SCORER_CALLS, SCORER_FORWARDS, TwinarmRewardManager, \
        scorer_totals
    from rl.verl_config import compose, overrides_for
    from test_heads import byte_level_tokenizer

    tok = byte_level_tokenizer()
    cfg = verl_cfg(reward=reward, max_response_length=64)
    groups_ids = [[tok.encode(t, add_special_tokens=False) for t in group] for group in SCORED]
    golds = ["5", "42"]
    groups = [[Sample("Q:", t, ids, golds[g]) for t, ids in zip(group, groups_ids[g])]
              for g, group in enumerate(SCORED)]
    scorer = HFScorer.from_pretrained(str(scorer_dir))
    local = score_batch(groups, rl=cfg.rl, step=1, grader=get_grader(GraderSpec(workers=1)), tokenizer=tok,
                        scorer=scorer)
    config = compose(overrides_for(cfg, ablation="t", arm="a", seed=0, paths=paths().__class__(
        "/s/rl.parquet", "/s/val.parquet", str(scorer_dir), "/s/ck")))
    manager = TwinarmRewardManager(config, tok, None)
    data = verl_batch(tok, groups_ids, golds, 64)
    outs = [manager.loop.run_until_complete(manager.run_single(data[i:i + 1])) for i in range(len(data))]

    local_meta = [r["heads"]["meta"] for r in local.records]
    verl_meta = [o["reward_extra_info"][HEAD_KEY.format("meta")] for o in outs]
    assert sum(v is not None for v in local_meta) >= 3, local_meta  # the signal scored most block rollouts
    for a, b in zip(local_meta, verl_meta):
        assert (a is None and math.isnan(b)) or abs(a - b) <= 1e-6, (local_meta, verl_meta)
    for r, o in zip(local.records, outs):  # every other head too
        for h, v in r["heads"].items():
            got = o["reward_extra_info"][HEAD_KEY.format(h)]
            assert (v is None and math.isnan(got)) or abs(v - got) <= 1e-6
    # calls count scored (context, target) requests: the same total as the local executor's, none for a skip;
    # forwards count batches, more of them one rollout at a time than a group at a time
    calls = [o["reward_extra_info"][SCORER_CALLS] for o in outs]
    assert [c > 0 for c in calls] == [v is not None for v in local_meta]
    assert sum(calls) == local.facts["scorer/calls"] > 0
    forwards = sum(o["reward_extra_info"][SCORER_FORWARDS] for o in outs)
    assert forwards >= local.facts["scorer/forwards"] > 0
    # what our trainer logs per step (rl/verl_trainer.py) and rl.verl_run reads back as the stage's facts
    assert scorer_totals([o["reward_extra_info"] for o in outs]) == {"twinarm/scorer_calls": float(sum(calls)),
                                                                    "twinarm/scorer_forwards": float(forwards)}


def test_vanilla_on_verl_loads_no_scorer_and_counts_zero_calls():
    from rewards.verl_adapter import SCORER_CALLS, SCORER_FORWARDS

    _, _, _, _, outs = both_paths(False, None)
    assert all(o["reward_extra_info"][SCORER_CALLS] == 0 == o["reward_extra_info"][SCORER_FORWARDS] for o in outs)


# ---------------------------------------------------------------- doctor


def test_doctor_reports_each_failure_in_one_line(tmp_path):
    from rl.verl_doctor import check_home, doctor, fs_type

    mounts = "overlay / overlay rw 0 0\nnfs1:/export /mnt/shared nfs4 rw 0 0\n"
    checks = {c.name: c for c in doctor(verl_cfg(), tmp_path, address="http://127.0.0.1:1", mounts=mounts)}
    assert list(checks) == ["ray", "gpus", "vllm", "torch", "transfer_queue", "home"]
    # this machine has no cluster, GPUs, vLLM, CUDA torch or shared disk
    assert {n for n, c in checks.items() if not c.ok} == {"ray", "gpus", "vllm", "torch", "home"} | \
        (set() if importlib.util.find_spec("transfer_queue") else {"transfer_queue"})
    assert all("\n" not in c.line for c in checks.values())
    assert "could not reach the Ray Jobs API at http://127.0.0.1:1" in checks["ray"].line
    assert checks["gpus"].line == "GPUs: not checked (no Ray cluster reachable)"
    assert "vLLM: not installed; verl's vllm rollout needs vllm ≥ 0.18.0 (verl[vllm] pins 0.24.0)" in \
        checks["vllm"].line
    assert "is not a CUDA build" in checks["torch"].line
    assert "is on a local overlay filesystem" in checks["home"].line
    assert fs_type(tmp_path / "x", "nfs1:/e /mnt/shared nfs4 rw 0 0\n") == "unknown"
    shared = tmp_path  # the mount table decides: a path under an nfs mount passes
    assert check_home(shared, f"overlay / overlay rw 0 0\nn:/e {shared} nfs4 rw 0 0\n").ok


def test_trainer_advantage_step_reads_transfer_queue_fields(monkeypatch):
    """Our v1 trainer's _compute_advantage on fields shaped as verl's agent loop puts them in its TransferQueue
    (jagged responses/masks, uid, per-rollout extra_fields with reward_extra_info): the advantages it writes back
    are the local executor's. Needs TransferQueue (verl's verl-core extra); skipped where it is not installed."""
    pytest.importorskip("transfer_queue")
    import torch
    from verl.utils import tensordict_utils as tu

    import rl.verl_trainer as trainer_mod

    step = 3
    tok, local, config, data, outs = both_paths(True, SHAPED, step)
    lengths = data.batch["response_mask"].sum(-1).long().tolist()
    jag = lambda t: torch.nested.as_nested_tensor([t[b, :n] for b, n in enumerate(lengths)], layout=torch.jagged)
    stored = tu.get_tensordict({
        "uid": list(data.non_tensor_batch["uid"]), "responses": jag(data.batch["responses"]),
        "response_mask": jag(data.batch["response_mask"].long()),
        "extra_fields": [{"reward_extra_info": o["reward_extra_info"]} for o in outs]})
    put = {}

    class FakeTQ:
        @staticmethod
        def kv_batch_get(keys, partition_id, select_fields):
            return stored.select(*select_fields).clone()

        @staticmethod
        def kv_batch_put(keys, partition_id, fields):
            put.update(fields=fields)
            return "meta"

    class Batch(list):
        keys, partition_id = [f"k{i}" for i in range(len(lengths))], "train"

    monkeypatch.setattr(trainer_mod, "tq", FakeTQ)
    trainer = object.__new__(trainer_mod.TwinarmTrainer)
    trainer.config, trainer.tokenizer, trainer.global_steps = config, tok, step
    metrics: dict = {}
    assert trainer._compute_advantage(Batch(range(len(lengths))), metrics) == "meta"
    adv = put["fields"]["advantages"].to_padded_tensor(0.0).numpy()
    want = padded_local(local)[:, :adv.shape[1]]
    assert np.abs(adv - want).max() <= 1e-6 and np.abs(want).sum() > 5
    assert metrics["twinarm/adv_norm_std_applied"] == 1.0 and metrics["twinarm/adv_groups"] == 3
