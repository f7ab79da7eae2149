"""GRPO as verl computes it: log-probs under the sampling temperature, and the loss/advantage path fed the same
fixed batch as verl 0.9.1's core_algos (policy loss with clip-higher and dual-clip, token-mean aggregation,
GRPO outcome advantage with and without std normalisation, low_var_kl KL loss)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from infra.spec import HEADS, HeadsSpec, RLSpec
from rewards.heads import centre_heads, gain_matrix, head_weights, token_advantages

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 61


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="eager")
    model = Qwen2ForCausalLM(cfg).eval()
    model.lm_head.weight.data *= 12  # peaked distributions, so the temperature visibly matters
    return model


ROWS = [([3, 4, 5, 6], [7, 8, 9]), ([10, 11], [12, 13, 14, 15, 16]), ([17, 18, 19, 20, 21, 22], [23])]


def _batch(rows=ROWS):
    from rl.grpo import _collate

    return _collate([(p, r, [0.0] * len(r)) for p, r in rows], pad_id=0, device="cpu")


def test_logprobs_are_taken_at_the_sampling_temperature(tiny_lm):
    """verl's own logprobs_from_logits(logits / T) on the same forward; and each row equal to its unpadded
    forward (left padding with position ids changes nothing beyond fp32 rounding)."""
    import torch
    from verl.utils.torch_functional import logprobs_from_logits

    from rl.grpo import response_logprobs

    batch = _batch()
    p_len, r_len = int(batch["p_len"]), batch["resp_mask"].shape[1]
    with torch.no_grad():
        got = {t: response_logprobs(tiny_lm, batch, "cpu", "fp32", t) for t in (0.7, 1.0)}
        logits = tiny_lm(input_ids=batch["ids"], attention_mask=batch["attn"], position_ids=batch["pos"]).logits
    theirs = logprobs_from_logits(logits[:, p_len - 1:p_len - 1 + r_len] / 0.7, batch["ids"][:, p_len:])
    diff = ((got[0.7] - theirs) * batch["resp_mask"]).abs().max().item()
    print(f"log-prob max abs diff vs verl: {diff:.2e}")
    assert diff < 1e-6
    for b, (p, r) in enumerate(ROWS):
        with torch.no_grad():
            alone = tiny_lm(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) - 1 + len(r)]
        assert got[0.7][b, :len(r)].tolist() == pytest.approx(
            logprobs_from_logits(alone / 0.7, torch.tensor(r)).tolist(), abs=1e-5)
        assert (got[0.7][b, :len(r)] - got[1.0][b, :len(r)]).abs().max() > 1e-2  # T really changes them


def fixed_batch():
    """9 rollouts in groups of 4, 3, 2; right-padded responses; new/old/ref log-probs spread so that ratios fall
    below 1 − 0.2, above 1 + 0.28, and above the dual-clip bound 3 on negative advantages."""
    import torch

    gen = torch.Generator().manual_seed(7)
    lengths = [6, 2, 4, 5, 3, 6, 1, 4, 5]
    correct = [1, 0, 0, 1, 1, 1, 0, 0, 1]
    index = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 2, dtype=object)
    width = max(lengths)
    mask = torch.zeros(len(lengths), width)
    rewards = torch.zeros(len(lengths), width)
    for b, (n, ok) in enumerate(zip(lengths, correct)):
        mask[b, :n] = 1
        rewards[b, n - 1] = 1.0 if ok else -1.0  # the correctness head's value, at the last token as verl puts it
    old = -torch.rand(len(lengths), width, generator=gen) * 3
    new = old + (torch.rand(len(lengths), width, generator=gen) - 0.5) * 1.2
    new[1, 0] = old[1, 0] + 1.5  # ratio e^1.5 ≈ 4.5 > clip_ratio_c 3 on a negative advantage (dual clip)
    ref = old + (torch.rand(len(lengths), width, generator=gen) - 0.5) * 0.6
    return index, mask, rewards, correct, old, new, ref


def twinarm_advantages(correct, index, mask, norm):
    import torch

    values = [{**dict.fromkeys(HEADS), "correctness": 1.0 if ok else -1.0} for ok in correct]
    adv, _ = centre_heads(values, list(index), norm)
    heads = HeadsSpec()
    gain = gain_matrix(head_weights(heads, 0), heads.routing)
    out = torch.zeros_like(mask)
    for b, a in enumerate(adv):
        n = int(mask[b].sum())
        out[b, :n] = torch.tensor(token_advantages(a, gain, [0] * n))
    return out


@pytest.mark.parametrize("norm,kl_coef", [(True, 0.0), (False, 0.0), (False, 0.3), (True, 0.3)])
def test_loss_and_advantage_parity_with_verl(norm, kl_coef):
    import torch
    from verl.trainer.ppo import core_algos

    from rl.grpo import _actor_config, grpo_loss

    index, mask, rewards, correct, old, new, ref = fixed_batch()
    rl = RLSpec(clip_low=0.2, clip_high=0.28, loss_agg="token-mean", batch_size=3, mini_batch_size=3, n=3,
                kl_loss=kl_coef > 0, kl_coef=kl_coef)
    cfg = _actor_config(rl)
    assert cfg.use_kl_loss is (kl_coef > 0) and cfg.kl_loss_type == "low_var_kl"

    ours_adv = twinarm_advantages(correct, index, mask, norm)
    theirs_adv, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)

    ours_new = new.clone().requires_grad_(True)
    ours_loss, ours_metrics = grpo_loss(old, ours_new, ours_adv, mask, cfg, ref_lp=ref)
    ours_loss.backward()

    theirs_new = new.clone().requires_grad_(True)
    pg, pg_metrics = core_algos.compute_policy_loss_vanilla(old, theirs_new, theirs_adv, mask,
                                                            loss_agg_mode="token-mean", config=cfg)
    theirs_loss = pg
    if kl_coef:  # as verl.workers.utils.losses.ppo_loss adds it
        kld = core_algos.kl_penalty(logprob=theirs_new, ref_logprob=ref, kl_penalty="low_var_kl")
        kl_loss = core_algos.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode="token-mean")
        theirs_loss = pg + kl_loss * kl_coef
        pg_metrics["actor/kl_loss"] = kl_loss.item()
        assert kl_loss.item() > 1e-3  # a KL term that really moves the loss
    else:
        assert "actor/kl_loss" not in ours_metrics
    theirs_loss.backward()

    diffs = {"advantage": (ours_adv - theirs_adv).abs().max().item(),
             "loss": abs(ours_loss.item() - theirs_loss.item()),
             "grad": (ours_new.grad - theirs_new.grad).abs().max().item(),
             **{k: abs(ours_metrics[k] - v) for k, v in pg_metrics.items()}}
    print(f"norm={norm} kl_coef={kl_coef} max abs diffs vs verl: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < 1e-6
    # the batch exercises every branch: both clips and the dual clip
    assert pg_metrics["actor/pg_clipfrac"] > 0 and pg_metrics["actor/pg_clipfrac_lower"] > 0
    assert theirs_adv.abs().sum() > 1 and ours_new.grad.abs().sum() > 0


def test_kl_on_needs_reference_log_probs():
    from rl.grpo import _actor_config, grpo_loss

    index, mask, rewards, correct, old, new, ref = fixed_batch()
    cfg = _actor_config(RLSpec(kl_loss=True, kl_coef=0.1, batch_size=8, mini_batch_size=8))
    with pytest.raises(ValueError, match="reference log-probs"):
        grpo_loss(old, new, rewards, mask, cfg)


class _Forbidden:
    def __call__(self, *args, **kwargs):
        raise AssertionError("the reference model ran although kl_coef is 0")


def _rows(n_rows=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, VOCAB, int(rng.integers(2, 6))).tolist(),
             rng.integers(1, VOCAB, int(rng.integers(1, 7))).tolist()) for _ in range(n_rows)]


def _update_rows(rows, seed=1):
    rng = np.random.default_rng(seed)
    return [(p, r, [float(a)] * len(r)) for (p, r), a in zip(rows, rng.normal(size=len(rows)))]


def test_ppo_update_kl_reference(tiny_lm):
    """kl_coef 0: the reference never runs. kl_coef > 0: needs a reference; against a copy of the start weights the
    KL of the first mini-batch is 0 (same weights) and positive once the policy has moved."""
    import copy

    import torch

    from rl.grpo import _actor_config, ppo_update

    rows = _update_rows(_rows(4))
    rl0 = RLSpec(batch_size=2, mini_batch_size=1, n=2, temperature=0.7, lr=1e-2)
    model = copy.deepcopy(tiny_lm).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = ppo_update(model, opt, rows, rl0, _actor_config(rl0), 0, "cpu", "fp32", ref_model=_Forbidden())
    assert "actor/kl_loss" not in stats

    rl1 = RLSpec(**{**rl0.model_dump(), "kl_loss": True, "kl_coef": 0.5})
    with pytest.raises(ValueError, match="reference model"):
        ppo_update(model, opt, rows, rl1, _actor_config(rl1), 0, "cpu", "fp32")
    model = copy.deepcopy(tiny_lm).train()
    ref = copy.deepcopy(tiny_lm).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kls = []
    import rl.grpo as grpo

    real = grpo.grpo_loss

    def spy(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        kls.append(metrics["actor/kl_loss"])
        return loss, metrics

    grpo.grpo_loss = spy
    try:
        stats = ppo_update(model, opt, rows, rl1, _actor_config(rl1), 0, "cpu", "fp32", ref_model=ref)
    finally:
        grpo.grpo_loss = real
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[1] > 1e-6
    assert stats["actor/kl_loss"] == pytest.approx(sum(kls) / 2) and stats["actor/kl_coef"] == 0.5



def test_param_norm_change_is_exactly_zero_without_a_gradient_and_bounds_the_update(tiny_lm):
    """All advantages 0 and no entropy bonus: no gradient, AdamW (no weight decay) leaves every weight as it was and
    actor/param_norm_change is exactly 0. With rl.entropy_coeff > 0 the same batch moves the weights, and the
    metric is ‖θ'‖ − ‖θ‖, a non-zero lower bound of ‖θ' − θ‖."""
    import copy

    import torch

    from rl.grpo import _actor_config, ppo_update

    rows = [(p, r, [0.0] * len(r)) for p, r in _rows(4)]
    for coeff in (0.0, 1e-3):
        rl = RLSpec(batch_size=2, mini_batch_size=1, n=2, temperature=0.7, lr=1e-2, entropy_coeff=coeff)
        model = copy.deepcopy(tiny_lm).train()
        start = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        change = ppo_update(model, opt, rows, rl, _actor_config(rl), 0, "cpu", "fp32")["actor/param_norm_change"]
        delta = math.sqrt(sum(float((p.detach().double() - s.double()).pow(2).sum())
                              for p, s in zip(model.parameters(), start)))
        norms = [math.sqrt(sum(float(x.detach().double().pow(2).sum()) for x in ps))
                 for ps in (start, model.parameters())]
        if coeff == 0:
            assert change == 0.0 and delta == 0.0
        else:
            assert change != 0 and change == pytest.approx(norms[1] - norms[0], rel=1e-6)
            assert 0 < abs(change) <= delta


# ---------------------------------------------------------------- the local executor end to end (tiny)

@pytest.fixture(scope="module")
def arm_init(tmp_path_factory):
    """A tiny SFT-result directory (toy model + trained tokenizer), RL prompts and val rows of the arith world."""
    from infra.spec import ArithWorldSpec, ToyModelSpec
    from worlds.arith import generate_world, world_texts
    from worlds.model import toy_model
    from worlds.tokenizer import train_tokenizer

    world = generate_world(ArithWorldSpec(n_base=200, n_sft1=120, n_sft2=60, n_rl=9, n_val_per_domain=1,
                                          n_heldout=9))
    tok = train_tokenizer(world_texts(world), vocab_size=400)
    model = toy_model(ToyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                   max_position=256), tok, seed=0)
    path = tmp_path_factory.mktemp("init")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, world["rl"], world["val"][:2]


def _run(arm_init, tmp_path, monkeypatch, **rl_kw):
    import worlds.model
    from infra.spec import ComputeSpec, GraderSpec
    from rewards.scorer import HFScorer
    from rl.grpo import train_grpo

    loads = []
    real_load, real_scorer = worlds.model.load_model, HFScorer.from_pretrained.__func__
    monkeypatch.setattr(worlds.model, "load_model", lambda *a, **k: loads.append("model") or real_load(*a, **k))
    monkeypatch.setattr(HFScorer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append("scorer") or real_scorer(cls, *a, **k)))
    init, prompts, val = arm_init
    rl = RLSpec(**{"steps": 1, "batch_size": 2, "mini_batch_size": 1, "n": 2, "max_response_length": 8,
                   "save_freq": 1, "test_freq": 1, "temperature": 0.7, **rl_kw})
    out = train_grpo(init, prompts, val, rl, GraderSpec(workers=1), ComputeSpec(device="cpu", precision="fp32"), 0,
                     tmp_path / "run")
    return out, loads


@pytest.mark.parametrize("reward,kl_coef,loads", [("vanilla", 0.0, ["model"]), ("vanilla", 0.2, ["model", "model"]),
                                                  ("pmishift", 0.2, ["model", "scorer"])])
def test_train_grpo_kl_reference_is_loaded_once(arm_init, tmp_path, monkeypatch, reward, kl_coef, loads):
    out, seen = _run(arm_init, tmp_path, monkeypatch, reward=reward, kl_loss=kl_coef > 0, kl_coef=kl_coef)
    assert seen == loads  # the PMI-shift scorer doubles as the KL reference; no reference without KL
    kl = out["facts"]["kl"]
    assert kl["applied"] is (kl_coef > 0) and kl["coef"] == kl_coef
    assert kl["reference"] == {("vanilla", 0.0): None, ("vanilla", 0.2): "loaded",
                               ("pmishift", 0.2): "scorer (shared)"}[(reward, kl_coef)]
    keys = {k for k, _, step in out["metrics"] if step == 1}
    assert ("actor/kl_loss" in keys) is (kl_coef > 0)


def test_train_grpo_refuses_prompts_over_max_prompt_length(arm_init, tmp_path, monkeypatch):
    from infra.errors import DataError

    with pytest.raises(DataError, match=r"rl prompts: 9 prompt\(s\) longer than rl.max_prompt_length 8 "
                                        r"\(id 'arith-rl-000000': \d+ tokens"):
        _run(arm_init, tmp_path, monkeypatch, max_prompt_length=8)
    assert not (tmp_path / "run").exists()  # refused before any training


# ---------------------------------------------------------------- speed changes that must not change numbers

def _full_vocab_logprobs(logits, targets, temperature):
    """The previous path: fp32 full-vocabulary log-softmax, then gather."""
    import torch

    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampled_token_logprobs_equal_the_full_vocabulary_path(dtype):
    import torch

    from rl.grpo import sampled_token_logprobs

    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(3, 5, VOCAB, generator=gen) * 4).to(getattr(torch, dtype))
    targets = torch.randint(0, VOCAB, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    ours = sampled_token_logprobs(a, targets, 0.7, chunk_rows=4)  # 15 rows in chunks of 4: a ragged last chunk
    theirs = _full_vocab_logprobs(b, targets, 0.7)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert ours.dtype == torch.float32 and a.grad.dtype == a.dtype
    assert (ours - theirs).abs().max().item() < 2e-6
    tol = 1e-6 if dtype == "float32" else 1e-2  # bf16 gradients: one bf16 rounding of the same fp32 value
    assert (a.grad.float() - b.grad.float()).abs().max().item() < tol * max(1.0, b.grad.abs().max().item())


def test_sampled_token_logprobs_gradcheck():
    import torch

    from rl.grpo import sampled_token_logprobs

    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda x: sampled_token_logprobs(x, targets, 0.6, chunk_rows=2), (logits,))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_response_logprobs_equal_the_full_logits_path(tiny_lm, precision):
    """logits_to_keep + chunked log-softmax vs the full forward's fp32 log-softmax: values and parameter grads."""
    import copy

    import torch

    from rl.grpo import response_logprobs
    from worlds.model import autocast

    batch = _batch()
    p_len, r_len = int(batch["p_len"]), batch["resp_mask"].shape[1]
    m1, m2 = copy.deepcopy(tiny_lm), copy.deepcopy(tiny_lm)
    ours = response_logprobs(m1, batch, "cpu", precision, 0.7)
    with autocast("cpu", precision):
        logits = m2(input_ids=batch["ids"], attention_mask=batch["attn"], position_ids=batch["pos"]).logits
    theirs = _full_vocab_logprobs(logits[:, p_len - 1:p_len - 1 + r_len], batch["ids"][:, p_len:], 0.7)
    mask = batch["resp_mask"]
    assert ((ours - theirs) * mask).abs().max().item() < (2e-6 if precision == "fp32" else 1e-5)
    (ours * mask).sum().backward()
    (theirs * mask).sum().backward()
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        scale = max(1.0, p2.grad.abs().max().item())
        assert (p1.grad - p2.grad).abs().max().item() < (1e-5 if precision == "fp32" else 2e-2) * scale, name


def test_first_mini_batch_skips_the_old_log_prob_pass(tiny_lm, monkeypatch):
    """Two mini-batches: one old-log-prob forward (the second mini-batch's) instead of two, and the same update
    as computing the first mini-batch's old log-probs with a separate no-grad pass."""
    import copy

    import torch

    import rl.grpo as grpo

    rows = _update_rows(_rows(4, seed=5), seed=6)
    rl = RLSpec(batch_size=2, mini_batch_size=1, n=2, temperature=0.7)
    cfg = grpo._actor_config(rl)

    def run(skip: bool):
        model = copy.deepcopy(tiny_lm).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        calls, real = [], grpo.response_logprobs

        def counted(m, mb, *a):
            calls.append(torch.is_grad_enabled())
            return real(m, mb, *a)

        monkeypatch.setattr(grpo, "response_logprobs", counted)
        if not skip:  # the previous behaviour: every mini-batch's old log-probs from a no-grad pass up front
            real_loss = grpo.grpo_loss
            minis = [grpo._collate(rows[i:i + 2], 0, "cpu") for i in (0, 2)]
            with torch.no_grad():
                first_old = real(model, minis[0], "cpu", "fp32", 0.7)
            seen = []

            def with_old(old_lp, new_lp, *a):
                seen.append(1)
                return real_loss(first_old if len(seen) == 1 else old_lp, new_lp, *a)

            monkeypatch.setattr(grpo, "grpo_loss", with_old)
        stats = grpo.ppo_update(model, opt, rows, rl, cfg, 0, "cpu", "fp32")
        monkeypatch.undo()
        return model, stats, calls

    fast, fast_stats, calls = run(skip=True)
    slow, slow_stats, _ = run(skip=False)
    assert calls == [False, True, True]  # one no-grad pass (mini-batch 2), then a grad pass per mini-batch
    for p1, p2 in zip(fast.parameters(), slow.parameters()):
        assert torch.equal(p1, p2)  # bit-identical: the grad and no-grad forwards give the same log-probs
    assert fast_stats == slow_stats
