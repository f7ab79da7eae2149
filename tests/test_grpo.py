"""GRPO as verl computes it: log-probs under the sampling temperature, and the loss/advantage path fed the same
fixed batch as verl 0.9.1's core_algos (policy loss with clip-higher and dual-clip, token-mean aggregation,
GRPO outcome advantage with and without std normalisation, low_var_kl KL loss)."""
from __future__ import annotations

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


@pytest.mark.parametrize("norm", [True, False])
def test_loss_and_advantage_parity_with_verl(norm):
    import torch
    from verl.trainer.ppo import core_algos

    from rl.grpo import _actor_config, grpo_loss

    index, mask, rewards, correct, old, new, ref = fixed_batch()
    rl = RLSpec(clip_low=0.2, clip_high=0.28, loss_agg="token-mean", batch_size=3, mini_batch_size=3, n=3)
    cfg = _actor_config(rl)

    ours_adv = twinarm_advantages(correct, index, mask, norm)
    theirs_adv, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)

    ours_new = new.clone().requires_grad_(True)
    ours_loss, ours_metrics = grpo_loss(old, ours_new, ours_adv, mask, cfg)
    ours_loss.backward()

    theirs_new = new.clone().requires_grad_(True)
    pg, pg_metrics = core_algos.compute_policy_loss_vanilla(old, theirs_new, theirs_adv, mask,
                                                            loss_agg_mode="token-mean", config=cfg)
    pg.backward()

    diffs = {"advantage": (ours_adv - theirs_adv).abs().max().item(), "loss": abs(ours_loss.item() - pg.item()),
             "grad": (ours_new.grad - theirs_new.grad).abs().max().item(),
             **{k: abs(ours_metrics[k] - v) for k, v in pg_metrics.items()}}
    print(f"norm={norm} max abs diffs vs verl: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < 1e-6
    # the batch exercises every branch: both clips and the dual clip
    assert pg_metrics["actor/pg_clipfrac"] > 0 and pg_metrics["actor/pg_clipfrac_lower"] > 0
    assert theirs_adv.abs().sum() > 1 and ours_new.grad.abs().sum() > 0
