"""HFScorer against unpadded single forwards, on random calls: contexts sharing random prompts (RL groups),
contexts that are prefixes or extensions of others, duplicates, empty and 1-token targets, tiny token budgets and
row limits, min_shared from 0 up; models with twinarm's attention (grouped continuations) and 1, 2 or 4 key/value
heads for 4 query heads."""
from __future__ import annotations

import random

import pytest

from test_scorer import reference

VOCAB = 40


@pytest.fixture(scope="module")
def models():
    """(twinarm attention model, eager twin with the same weights) per key/value head count."""
    import copy

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from worlds.model import register_attention

    out = {}
    for kv in (1, 2, 4):
        torch.manual_seed(kv)
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=256,
                          attn_implementation=register_attention())
        ours = Qwen2ForCausalLM(cfg).eval()
        eager = copy.deepcopy(ours)
        eager.set_attn_implementation("eager")
        out[kv] = (ours, eager)
    return out


def random_call(rng: random.Random, alphabet: int) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [[rng.randrange(alphabet) for _ in range(rng.randint(1, 20))] for _ in range(rng.randint(1, 3))]
    ctxs: list[list[int]] = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.5:  # a rollout of a prompt
            c = rng.choice(prompts) + [rng.randrange(alphabet) for _ in range(rng.randint(0, 10))]
        elif kind < 0.7 and ctxs:  # a prefix of an earlier context (itself, possibly)
            c = list(rng.choice(ctxs))
            c = c[:rng.randint(1, len(c))]
        elif kind < 0.8 and ctxs:  # an extension of an earlier context
            c = list(rng.choice(ctxs)) + [rng.randrange(alphabet) for _ in range(rng.randint(1, 4))]
        else:
            c = [rng.randrange(alphabet) for _ in range(rng.randint(1, 15))]
        ctxs.append(c)
    tgts = [[rng.randrange(alphabet) for _ in range(rng.choice([0, 1, 1, 2, 5, 12]))] for _ in ctxs]
    return ctxs, tgts


@pytest.mark.parametrize("alphabet", [VOCAB, 3])  # 3 ids: many accidental shared starts
def test_random_calls_equal_unpadded_forwards(models, alphabet):
    from rewards.scorer import HFScorer

    checked = 0
    for seed in range(60):
        rng = random.Random(seed)
        ctxs, tgts = random_call(rng, alphabet)
        ours, eager = models[rng.choice([1, 2, 4])]
        scorer = HFScorer(ours, token_budget=rng.choice([None, 1, 8, 30, 100]), min_shared=rng.choice([0, 1, 2, 8]),
                          max_rows=rng.choice([1, 2, 256]))
        got = scorer.target_logprobs(ctxs, tgts)
        assert scorer.calls == len(ctxs)
        for c, t, row in zip(ctxs, tgts, got):
            assert row == pytest.approx(reference(eager, c, t), abs=1e-5), (seed, c, t)
            checked += len(t)
    assert checked > 500
