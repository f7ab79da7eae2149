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
            minis = [grpo._collate(grpo.update_micro_batches(rows[i:i + 2])[0], 0, "cpu") for i in (0, 2)]
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


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("kl_coef, entropy_coeff", [(0.0, 0.0), (0.1, 0.01)])
def test_micro_batched_update_is_the_one_pass_update(tiny_lm, monkeypatch, loss_agg, kl_coef, entropy_coeff):
    """Mini-batches of 10 rollouts of very different lengths (one with every response token masked: environment
    output only) run as micro-batches of 3 (rl.grpo.UPDATE_MICRO_ROWS): the weights after two mini-batch steps and
    the losses equal one padded pass per mini-batch (fp32, up to summation order), for every loss aggregation, with
    the KL and entropy terms on. Normalising each micro-batch by its own tokens instead (the mistake this guards)
    moves the weights."""
    import copy

    import torch

    import rl.grpo as grpo

    rng = np.random.default_rng(3)
    rows = [(rng.integers(1, VOCAB, int(rng.integers(2, 9))).tolist(), rng.integers(1, VOCAB, n).tolist(),
             rng.normal(size=n).tolist()) for n in rng.integers(1, 30, 20)]
    rows[4] = (*rows[4], [0.0] * len(rows[4][1]))  # environment output only: in no loss term
    rl = RLSpec(batch_size=4, mini_batch_size=2, n=5, temperature=0.7, loss_agg=loss_agg, kl_loss=kl_coef > 0,
                kl_coef=kl_coef, entropy_coeff=entropy_coeff)

    def run(micro_rows):
        monkeypatch.setattr(grpo, "UPDATE_MICRO_ROWS", micro_rows)
        model = copy.deepcopy(tiny_lm).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # moves with the gradient's scale (Adam would not)
        stats = grpo.ppo_update(model, opt, rows, rl, grpo._actor_config(rl), 0, "cpu", "fp32",
                                ref_model=copy.deepcopy(tiny_lm) if kl_coef else None)
        return model, stats

    (one, one_stats), (micro, micro_stats) = run(10 ** 6), run(3)
    assert len(grpo.update_micro_batches(rows[:10], 3)) == 4
    for p1, p2 in zip(one.parameters(), micro.parameters()):
        assert torch.allclose(p1, p2, rtol=1e-4, atol=1e-6)
    for key in ("actor/pg_loss", *(["actor/kl_loss"] if kl_coef else []),
                *(["actor/entropy_loss"] if entropy_coeff else [])):
        assert micro_stats[key] == pytest.approx(one_stats[key], rel=1e-4, abs=1e-7), key
    assert grpo._actor_config(rl).global_batch_info == {}  # the normalisation never leaks past the update

    real_loss = grpo.grpo_loss

    def local(old_lp, new_lp, adv, mask, cfg, *a):  # each micro-batch normalised by its own tokens and sequences
        cfg.global_batch_info.clear()
        return real_loss(old_lp, new_lp, adv, mask, cfg, *a)

    monkeypatch.setattr(grpo, "grpo_loss", local)
    wrong, _ = run(3)
    assert not all(torch.allclose(p1, p2, rtol=1e-4, atol=1e-6) for p1, p2 in zip(one.parameters(),
                                                                                  wrong.parameters()))


# ---------------------------------------------------------------- DAPO dynamic sampling, end to end (tiny)

class CoinGrader:
    """The real grader, with verdicts replaced by a fixed coin per response text (crc32 parity), so an untrained
    tiny model yields both all-same and mixed groups; facts() and the call path stay the real grader's. With
    `wrong_odd_golds`, every response to a prompt whose gold has odd crc32 parity is wrong: those groups are
    zero-variance whatever the model writes, so dynamic sampling must generate extra rounds (a property of the
    data, not of the tiny model's outputs)."""

    def __init__(self, real, wrong_odd_golds: bool = False):
        self.real, self.wrong_odd_golds = real, wrong_odd_golds

    def grade(self, responses, golds):
        import zlib

        from rewards.grader import Grade

        return [Grade(correct=zlib.crc32(r.encode()) % 2 == 0
                      and not (self.wrong_odd_golds and zlib.crc32(str(g).encode()) % 2), extracted=None)
                for r, g in zip(responses, golds)]

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("coin", [True, False], ids=["mixed-groups", "all-wrong"])
def test_train_grpo_dynamic_sampling_records_its_counts(arm_init, tmp_path, monkeypatch, coin):
    """A real run with rl.filter_groups on: every group trained on has mixed accuracy (read back from the rollout
    parquet), the step's counts add up, and with an all-wrong model the cap stops each step."""
    import rewards.grader
    from infra.artifacts import read_parquet

    if coin:
        real = rewards.grader.get_grader
        monkeypatch.setattr(rewards.grader, "get_grader", lambda spec: CoinGrader(real(spec)))
    out, _ = _run(arm_init, tmp_path, monkeypatch, steps=2, n=3, temperature=1.0,
                  filter_groups={"enable": True, "max_num_gen_batches": 4})
    ds = out["facts"]["dynamic_sampling"]
    per_step = {s: {k.split("/", 1)[1]: v for k, v, st in out["metrics"] if st == s and k.startswith("dynamic_")}
                for s in (1, 2)}
    for step, m in per_step.items():
        rollouts = read_parquet(tmp_path / "run" / "rollouts" / f"step-{step:07d}.parquet")
        by_prompt = {}
        for r in rollouts:
            by_prompt.setdefault(r["prompt_id"], []).append(r["correct"])
        assert m["generated_groups"] == 2 * m["rounds"]
        assert m["generated_groups"] >= m["filtered_all_correct"] + m["filtered_all_wrong"] + m["kept_groups"]
        assert len(by_prompt) == m["train_groups"] and len(rollouts) == 3 * m["train_groups"]
        if coin:
            assert m["kept_groups"] == 2 and m["cap_hit"] == 0
            assert all(0 < sum(c) < 3 for c in by_prompt.values())  # no zero-variance group was trained on
        else:  # the untrained model never answers: every group filtered, the cap stops the step
            assert (m["rounds"], m["filtered_all_wrong"], m["kept_groups"], m["cap_hit"], m["unfiltered"]) == \
                (4, 8, 0, 1, 1)
            assert all(sum(c) == 0 for c in by_prompt.values())
    assert ds["enable"] is True and ds["max_num_gen_batches"] == 4
    assert ds["rounds"] == sum(m["rounds"] for m in per_step.values())
    assert ds["filtered_all_wrong"] == sum(m["filtered_all_wrong"] for m in per_step.values())
    assert ds["cap_hit"] == (0 if coin else 2)
    print(f"dynamic sampling facts ({'coin' if coin else 'real'} grader): {ds}")


def test_train_grpo_without_dynamic_sampling_is_unchanged(arm_init, tmp_path, monkeypatch):
    """Off (the default), the step generates its batch once and records no dynamic-sampling counts."""
    out, _ = _run(arm_init, tmp_path, monkeypatch)
    assert not any(k.startswith("dynamic_sampling/") for k, _, _ in out["metrics"])
    assert out["facts"]["dynamic_sampling"] == {"enable": False, "max_num_gen_batches": 10}
    assert out["facts"]["overlong_buffer"]["penalised"] == 0


def test_dynamic_sampling_resumes_where_it_left_off(arm_init, tmp_path, monkeypatch):
    """The generation-batch cursor is checkpointed: a run resumed from step 1 generates step 2 exactly as the
    uninterrupted run did (same prompts, same rollouts, same counts)."""
    import shutil

    import rewards.grader
    from infra.artifacts import read_parquet
    from infra.checkpoints import complete_checkpoints, step_of

    real = rewards.grader.get_grader
    monkeypatch.setattr(rewards.grader, "get_grader", lambda spec: CoinGrader(real(spec), wrong_odd_golds=True))
    kw = dict(steps=2, n=3, temperature=1.0, filter_groups={"enable": True, "max_num_gen_batches": 4})
    first, _ = _run(arm_init, tmp_path, monkeypatch, **kw)
    step2 = tmp_path / "run" / "rollouts" / "step-0000002.parquet"
    before = [(r["prompt_id"], r["response"], r["correct"]) for r in read_parquet(step2)]
    shutil.rmtree(next(p for p in complete_checkpoints(tmp_path / "run") if step_of(p) == 2))
    step2.unlink()
    again, _ = _run(arm_init, tmp_path, monkeypatch, **kw)
    assert [(r["prompt_id"], r["response"], r["correct"]) for r in read_parquet(step2)] == before
    assert again["facts"]["dynamic_sampling"] == first["facts"]["dynamic_sampling"]
    assert first["facts"]["dynamic_sampling"]["rounds"] > 2  # the cursor moved past the plain one-batch-per-step


# ---------------------------------------------------------------- MASA, end to end (tiny)

def test_train_grpo_masa_records_meta_rollouts_and_grpo_records_none(arm_init, tmp_path, monkeypatch):
    """A 2-step GRPO+MASA run generates m meta rollouts per prompt per step, counts every unparsable one as
    malformed (the untrained tiny model writes no JSON), trains on them in the same update (meta_trained), fills
    the expert buffer only from valid predictions; the vanilla run records zero meta rollouts."""
    out, _ = _run(arm_init, tmp_path / "masa", monkeypatch, steps=2, n=2, max_response_length=8,
                  masa={"enable": True, "m": 3, "max_meta_length": 8, "expert": {"enable": True, "buffer_size": 2}})
    m = out["facts"]["masa"]
    per_step = {s: {k: v for k, v, st in out["metrics"] if st == s and k.startswith("masa/")} for s in (1, 2)}
    for s in (1, 2):
        assert per_step[s]["masa/meta_rollouts"] == 2 * 3  # batch_size 2 × m 3
        assert per_step[s]["masa/meta_trained"] == 6
        assert per_step[s]["masa/malformed"] + per_step[s]["masa/expert_items"] <= 6
        assert per_step[s]["masa/gated_prompts"] == 0  # no efficiency configured
    assert m["enable"] is True and m["m"] == 3
    assert m["meta_rollouts"] == 12 and m["meta_trained"] == 12
    assert m["malformed"] == sum(per_step[s]["masa/malformed"] for s in (1, 2))
    assert m["decision_prompts"] == 4  # shadow decisions on every prompt (all solved at full length)
    assert len(m["buffer_size_per_step"]) == 2
    base, _ = _run(arm_init, tmp_path / "grpo", monkeypatch, steps=2, n=2, max_response_length=8)
    assert base["facts"]["masa"]["enable"] is False and base["facts"]["masa"]["meta_rollouts"] == 0
    assert not any(k.startswith("masa/") for k, _, _ in base["metrics"])
    print(f"masa facts: {m}")


class ScriptedMeta:
    """The real engine, except that meta-prediction prompts get fixed JSON predictions: the first prompt of each
    call predicts all-wrong (pass_rate 0, so every M agree and it is gated after start_step), the others 4 of 8
    with solution_length 2 (cutoff 2 × 2 = 4 tokens). A solution the tiny model ends early is replaced by a
    filler of digits ('1' × max_new_tokens, truncated, never correct), so every rollout runs to its max_new_tokens
    whatever the model writes. Records max_new_tokens of every solution call."""

    def __init__(self, real):
        self.real, self.solution_limits, self.solution_prompts = real, [], []

    def generate(self, prompts, n=1, max_new_tokens=128, **kw):
        from evals.engine import Generation

        if "Predict, do not solve" not in prompts[0]:
            self.solution_limits.append((len(prompts), max_new_tokens))
            self.solution_prompts += prompts
            filler = "1" * max_new_tokens  # digits are single tokens
            ids = tuple(self.real.tokenizer(filler, add_special_tokens=False)["input_ids"])
            assert len(ids) == max_new_tokens
            return [[g if g.truncated else Generation(text=filler, token_ids=ids, truncated=True) for g in gs]
                    for gs in self.real.generate(prompts, n=n, max_new_tokens=max_new_tokens, **kw)]
        tok = self.real.tokenizer
        out = []
        for i, _ in enumerate(prompts):
            text = ('<|meta|>plan</|meta|> {"notions": ["carry"], "pass_rate": 0, "solution_length": 3}' if i == 0
                    else '{"notions": ["borrow", "two-digit"], "pass_rate": 4, "solution_length": 2}')
            ids = tuple(tok(text, add_special_tokens=False)["input_ids"]) + (tok.eos_token_id,)
            out.append([Generation(text=text, token_ids=ids, truncated=False) for _ in range(n)])
        return out

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_train_grpo_masa_efficient_gates_cuts_audits_and_clones(arm_init, tmp_path, monkeypatch):
    """MASA-efficient with k = 1 on scripted predictions over the real tiny model (which never answers right, so
    every prompt is truly zero-variance and every rollout truly incorrect): step 1 gates nothing and records
    shadow decisions on both prompts; step 2 gates prompt 0 (its rollouts skipped, its meta rollouts untrained),
    solves prompt 1 with max_new_tokens 4 and the notion hint, audits both prompts at full length; the expert buffer (size 2) flushes
    after step 1 with 2 BC steps and holds 1 item after step 2."""
    import evals.engine
    from infra.artifacts import read_parquet

    engines, real = [], evals.engine.HFEngine
    monkeypatch.setattr(evals.engine, "HFEngine", lambda *a, **k: engines.append(ScriptedMeta(real(*a, **k)))
                        or engines[-1])
    out, _ = _run(arm_init, tmp_path, monkeypatch, steps=2, n=2, max_response_length=8, temperature=1.0,
                  masa={"enable": True, "m": 2,
                        "expert": {"enable": True, "buffer_size": 2, "bc_updates": 2},
                        "efficient": {"gate": True, "cutoff": True, "hints": True, "start_step": 1,
                                      "audit_prompts": 2}})
    step = {s: {k: v for k, v, st in out["metrics"] if st == s and k.startswith("masa/")} for s in (1, 2)}
    one, two = step[1], step[2]
    assert (one["masa/gated_prompts"], one["masa/cut_prompts"], one["masa/meta_trained"]) == (0, 0, 4)
    assert (one["masa/gate/tp"], one["masa/gate/fn"], one["masa/cutoff/tp"], one["masa/cutoff/fp"]) == (1, 1, 4, 0)
    assert one["masa/gate/precision"] == 1.0 and one["masa/gate/f1"] == pytest.approx(2 / 3)
    assert one["masa/expert_items"] == 2 and one["masa/expert/flush"] == 1 and one["masa/expert/buffer"] == 0
    assert one["masa/meta_reward/mean"] == pytest.approx((1 / 3 + 0.01 ** 0.5 / 3) / 2)
    assert (two["masa/gated_prompts"], two["masa/skipped_rollouts"], two["masa/cut_prompts"]) == (1, 2, 1)
    assert two["masa/meta_trained"] == 2 and two["masa/token_budget_saved"] == 2 * 8 + 2 * (8 - 4)
    assert (two["masa/audit_prompts"], two["masa/gate/tp"], two["masa/gate/fn"], two["masa/cutoff/tp"]) == \
        (2, 1, 1, 4)
    assert two["masa/expert/buffer"] == 1 and "masa/expert/flush" not in two
    assert "masa/hinted_prompts" not in one and two["masa/hinted_prompts"] == 1  # the solved prompt, after k
    hinted = [p for p in engines[-1].solution_prompts if "Hint: a solution may use borrow, two-digit." in p]
    assert len(hinted) == 1  # one call of one prompt (the audit samples the plain prompts)
    limits = engines[-1].solution_limits
    assert (1, 4) in limits and (2, 8) in limits  # the cut prompt alone at 4 tokens; the audit at full length
    rollouts = read_parquet(tmp_path / "run" / "rollouts" / "step-0000002.parquet")
    assert len({r["prompt_id"] for r in rollouts}) == 1 and all(r["n_tokens"] <= 4 for r in rollouts)
    assert two["masa/cut_rollouts"] == sum(r["n_tokens"] == 4 and r["truncated"] for r in rollouts)
    meta = read_parquet(tmp_path / "run" / "meta_rollouts" / "step-0000002.parquet")
    assert len(meta) == 4 and all(r["valid"] for r in meta)  # 2 prompts × m 2, the gated prompt's included
    assert sorted(r["trained"] for r in meta) == [False, False, True, True]
    assert all(r["reward"] == pytest.approx(0.01 ** 0.5 / 3) and r["advantage"] == 0 for r in meta if r["trained"])
    facts = out["facts"]["masa"]
    assert facts["bc_updates"] == 2 and len(facts["bc_loss_per_flush"]) == 1 and facts["buffer_left"] == 1
    assert facts["gated_prompts"] == 1 and facts["gate/tp"] == 2 and facts["audit_prompts"] == 2
    print(f"masa-efficient step 2 metrics: {two}")



class AllGated(ScriptedMeta):
    """Every prompt's predictions agree on all-wrong: after start_step every prompt is gated."""

    def generate(self, prompts, n=1, max_new_tokens=128, **kw):
        out = super().generate(prompts, n=n, max_new_tokens=max_new_tokens, **kw)
        if "Predict, do not solve" in prompts[0]:
            out = [out[0] for _ in prompts]
        return out


def test_train_grpo_masa_step_with_every_prompt_gated(arm_init, tmp_path, monkeypatch):
    """A step whose prompts are all gated generates no solution rollout, trains on nothing (no update, no meta row:
    nothing to score against) and still records the step: counts, an empty rollout file, the checkpoint."""
    import evals.engine
    from infra.artifacts import read_parquet

    real = evals.engine.HFEngine
    monkeypatch.setattr(evals.engine, "HFEngine", lambda *a, **k: AllGated(real(*a, **k)))
    out, _ = _run(arm_init, tmp_path, monkeypatch, steps=2, n=2, max_response_length=8,
                  masa={"enable": True, "m": 2, "efficient": {"gate": True, "start_step": 1}})
    two = {k: v for k, v, st in out["metrics"] if st == 2}
    assert (two["masa/gated_prompts"], two["masa/skipped_rollouts"], two["masa/meta_trained"]) == (2, 4, 0)
    assert two["masa/meta_rollouts"] == 4 and "actor/pg_loss" not in two
    assert read_parquet(tmp_path / "run" / "rollouts" / "step-0000002.parquet") == []
    assert out["facts"]["masa"]["gated_prompts"] == 2 and out["facts"]["steps"] == 2


def test_masa_expert_buffer_and_counters_resume_with_the_checkpoint(arm_init, tmp_path, monkeypatch):
    """The expert buffer and MASA's totals are in the checkpointed state: resumed after step 1 (2 items waiting,
    buffer_size 3), step 2 adds 2, flushes 3 with the same BC losses and leaves 1, as the uninterrupted run did."""
    import shutil

    import evals.engine
    from infra.checkpoints import complete_checkpoints, step_of

    real = evals.engine.HFEngine
    monkeypatch.setattr(evals.engine, "HFEngine", lambda *a, **k: ScriptedMeta(real(*a, **k)))
    kw = dict(steps=2, n=2, max_response_length=8,
              masa={"enable": True, "m": 2, "expert": {"enable": True, "buffer_size": 3, "bc_updates": 2}})
    first, _ = _run(arm_init, tmp_path, monkeypatch, **kw)
    shutil.rmtree(next(p for p in complete_checkpoints(tmp_path / "run") if step_of(p) == 2))
    again, _ = _run(arm_init, tmp_path, monkeypatch, **kw)
    a, b = first["facts"]["masa"], again["facts"]["masa"]
    assert a["buffer_size_per_step"] == b["buffer_size_per_step"] == [2, 1]
    assert len(a["bc_loss_per_flush"]) == 1 and b["bc_loss_per_flush"] == pytest.approx(a["bc_loss_per_flush"])
    assert a["meta_rollouts"] == b["meta_rollouts"] == 8 and a["expert_items"] == b["expert_items"] == 4


def _vllm_env_present() -> bool:
    from evals.vllm_engine import engine_venv

    return (engine_venv() / "bin" / "python").is_file()


@pytest.fixture(scope="module")
def vllm_arm_init(arm_init, tmp_path_factory):
    """arm_init's tokenizer and prompts with a toy model vLLM's CPU attention serves (head size 32, not 16)."""
    from infra.spec import ToyModelSpec
    from worlds.model import toy_model
    from worlds.tokenizer import load_tokenizer

    init, prompts, val = arm_init
    tok = load_tokenizer(init)
    model = toy_model(ToyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                   max_position=256), tok, seed=0)
    path = tmp_path_factory.mktemp("vllm-init")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, prompts, val


@pytest.mark.skipif(not _vllm_env_present(), reason="vLLM engine environment absent (.venv-vllm or "
                                                     "$TWINARM_VLLM_VENV): run `make setup-vllm`")
def test_train_grpo_vllm_rollouts_sample_the_updated_policy(vllm_arm_init, tmp_path, monkeypatch):
    """rl.rollout_engine: vllm — after every update the engine serves exactly the policy's new weights: its greedy
    generations equal the in-process HF engine's on the updated model (fp32), step by step; the weight-sync time is
    a per-step metric and the run fact names the engine; the engine process is gone after the run; the same run
    again gives the same rollouts (the seeds-to-samples contract)."""
    import evals.vllm_engine
    from evals.engine import HFEngine, render_prompt
    from infra.artifacts import read_parquet

    checks, procs = [], []
    real_load = evals.vllm_engine.VLLMEngine.load_weights

    def load_and_compare(self, model):
        seconds = real_load(self, model)
        procs.append(self.proc)
        prompts = [render_prompt(self.tokenizer, r["prompt"]) for r in vllm_arm_init[1][:3]]
        served = self.generate(prompts, max_new_tokens=8)
        local = HFEngine(model, self.tokenizer, precision="fp32").generate(prompts, max_new_tokens=8)
        checks.append([s[0].token_ids == h[0].token_ids for s, h in zip(served, local)])
        return seconds

    monkeypatch.setattr(evals.vllm_engine.VLLMEngine, "load_weights", load_and_compare)
    out, _ = _run(vllm_arm_init, tmp_path, monkeypatch, steps=2, n=2, temperature=1.0, lr=1e-2,
                  rollout_engine="vllm")
    assert checks == [[True] * 3, [True] * 3]  # one sync per update, each serving the updated policy exactly
    checks.clear()
    sync = {step: v for k, v, step in out["metrics"] if k == "time/weight_sync_s"}
    assert sorted(sync) == [1, 2] and all(v > 0 for v in sync.values())
    facts = out["facts"]["rollout"]
    assert facts["name"] == "vllm" and facts["engine"] == "vllm" and facts["weight_sync_s"] > 0
    assert procs and all(p.poll() is not None for p in procs)  # closed at the end of the run
    # the seeds-to-samples contract: the same run again gives the same rollouts (per-request seeds in vLLM)
    again, _ = _run(vllm_arm_init, tmp_path / "again", monkeypatch, steps=2, n=2, temperature=1.0, lr=1e-2,
                    rollout_engine="vllm")
    for step in (1, 2):
        name = f"rollouts/step-{step:07d}.parquet"
        first = [(r["prompt_id"], r["response"]) for r in read_parquet(tmp_path / "run" / name)]
        assert first == [(r["prompt_id"], r["response"]) for r in read_parquet(tmp_path / "again" / "run" / name)]
    hf, _ = _run(vllm_arm_init, tmp_path / "hf", monkeypatch, steps=1)
    assert hf["facts"]["rollout"]["name"] == "hf" and hf["facts"]["rollout"]["weight_sync_s"] == 0
    assert not any(k == "time/weight_sync_s" for k, _, _ in hf["metrics"])
