"""Tokenizer and tiny model: exact save/load round trips, digits as single tokens, precision detection, engine."""
from __future__ import annotations

import unicodedata

import pytest

from infra.spec import ArithWorldSpec, ComputeSpec, ToyModelSpec
from meta.grammar import META_CLOSE, META_OPEN
from worlds.arith import generate_world, world_texts

TINY = ToyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    max_position=256)
SAMPLE = ("<|im_start|>user\nCompute 7-3*(2-5).<|im_end|>\n<|im_start|>assistant\n2-5=-3|7-3*-3\n"
          "<|meta|>check 7--9: 7+9=16, ok. confidence: 0.9<|/meta|>7--9=16|16\n\\boxed{16}<|im_end|>\n")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def texts():
    world = generate_world(ArithWorldSpec(n_base=300, n_sft1=200, n_sft2=60, n_rl=20, n_val_per_domain=2,
                                          n_heldout=18))
    return world_texts(world)


@pytest.fixture(scope="module")
def tokenizer(texts):
    from worlds.tokenizer import train_tokenizer

    return train_tokenizer(texts, vocab_size=400)


def test_tokenizer_trains_deterministically(texts, tokenizer):
    from worlds.tokenizer import train_tokenizer

    assert train_tokenizer(texts, vocab_size=400).get_vocab() == tokenizer.get_vocab()
    assert 300 < len(tokenizer) <= 400 + 5


def test_tokenizer_round_trip_exact(tokenizer, tmp_path):
    from worlds.model import save_model, toy_model
    from worlds.tokenizer import load_tokenizer, save_tokenizer

    # saved next to a qwen2 config.json, as every checkpoint is: AutoTokenizer alone would pick Qwen2Tokenizer
    save_model(toy_model(TINY, tokenizer, seed=0), tmp_path)
    save_tokenizer(tokenizer, tmp_path)
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tokenizer)
    text = "<|im_start|>user\n12 + -3 =<|im_end|>"
    assert again(text, return_offsets_mapping=True).offset_mapping == \
        tokenizer(text, return_offsets_mapping=True).offset_mapping
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()  # pre-tokenizer etc. kept
    for text in (SAMPLE, "Ann has 12 apples, buys 3 bags of 4.", "é e\u0301 ∑ 😀 \t\n  x"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert again(text, add_special_tokens=False).input_ids == ids
        assert again.decode(ids) == tokenizer.decode(ids)
    assert (again.eos_token, again.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert again.eos_token_id == tokenizer.eos_token_id != again.pad_token_id
    assert again.all_special_tokens == tokenizer.all_special_tokens
    assert again.chat_template == tokenizer.chat_template


def test_special_and_meta_tokens(tokenizer):
    ids = tokenizer(SAMPLE, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == SAMPLE  # byte-level: lossless
    meta = [tokenizer.convert_tokens_to_ids(t) for t in (META_OPEN, META_CLOSE)]
    assert all(m in ids for m in meta)  # each tag is one token, never split
    kept = tokenizer.decode(ids, skip_special_tokens=True)
    assert META_OPEN in kept and META_CLOSE in kept and "<|im_end|>" not in kept and "<|im_start|>" not in kept
    assert META_OPEN not in tokenizer.all_special_tokens
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Compute 1+2."}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"


def test_digits_are_single_tokens_and_nfc(tokenizer):
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(digit_ids)) == 10
    for text in ("1234567890", "x=-98|7*65", "boxed{42}"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert [i for i in ids if i in digit_ids] == [digit_ids[int(c)] for c in text if c.isdigit()]
    decomposed = unicodedata.normalize("NFD", "café")
    assert tokenizer(decomposed).input_ids == tokenizer("café").input_ids


def test_model_size_and_round_trip(tokenizer, tmp_path):
    import torch

    from worlds.model import load_model, n_params, save_model, toy_model

    model = toy_model(ToyModelSpec(), tokenizer, seed=0)
    assert 0.9e6 < n_params(model) < 1.2e6  # ~1M with the default spec
    assert model.lm_head.weight is model.model.embed_tokens.weight
    small = toy_model(TINY, tokenizer, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(small.parameters(), toy_model(TINY, tokenizer, 0).parameters()))
    assert not torch.equal(small.model.embed_tokens.weight, toy_model(TINY, tokenizer, 1).model.embed_tokens.weight)
    save_model(small, tmp_path)
    again = load_model(tmp_path)
    assert type(again) is type(small) and again.config.tie_word_embeddings
    sd, sd2 = small.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.tensor([tokenizer(SAMPLE).input_ids])
    with torch.no_grad():
        assert torch.equal(small(x).logits, again(x).logits)


def test_precision_is_detected_not_assumed(monkeypatch):
    import worlds.model as wm

    assert wm.resolve_precision(ComputeSpec(precision="fp32"), "cpu") == "fp32"
    assert wm.resolve_precision(ComputeSpec(precision="bf16"), "cpu") == "bf16"
    monkeypatch.setattr(wm, "cpu_has_bf16", lambda: False)
    assert wm.resolve_precision(ComputeSpec(), "cpu") == "fp32"
    monkeypatch.setattr(wm, "cpu_has_bf16", lambda: True)
    assert wm.resolve_precision(ComputeSpec(), "cpu") == "bf16"
    assert wm.resolve_device(ComputeSpec(device="cpu")) == "cpu"


def test_engine_generates_deterministically(tokenizer):
    from evals.engine import HFEngine, render_prompt
    from worlds.model import toy_model

    model = toy_model(TINY, tokenizer, seed=0)
    engine = HFEngine(model, tokenizer, batch_size=4)
    prompts = [render_prompt(tokenizer, p) for p in ("Compute 1+2.", "What is 3*4-5?", "Evaluate 9-8.")]
    greedy = engine.generate(prompts, n=2, temperature=0, max_new_tokens=6)
    assert [len(g) for g in greedy] == [2, 2, 2]
    assert greedy[0][0] == greedy[0][1]  # greedy: the n copies agree
    sampled = engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=6, seed=5)
    assert sampled == engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=6, seed=5)
    assert sampled != engine.generate(prompts, n=3, temperature=1.0, max_new_tokens=6, seed=6)
    for group in sampled:
        for g in group:
            assert g.truncated == (tokenizer.eos_token_id not in g.token_ids)
            assert len(g.token_ids) <= 6
            assert g.text == tokenizer.decode(list(g.token_ids), skip_special_tokens=True)
    # a banned token never appears, even when it is the most likely one
    top = greedy[0][0].token_ids[0]
    banned = engine.generate(prompts[:1], n=4, temperature=1.0, max_new_tokens=6, seed=0, banned_tokens=[top])
    assert all(top not in g.token_ids for g in banned[0])
    assert model.training  # the engine restores the caller's mode


def test_grouped_attention_matches_eager():
    """Queries continuing a cache (a decoding step, a scored continuation) under grouped attention compute eager's
    values (up to summation order); a pass over the whole sequence (training, a prompt) is eager's own."""
    import torch

    from worlds.model import autocast, grouped_attention

    class Attn(torch.nn.Module):  # what the attention functions read of a Qwen2Attention
        num_key_value_groups = 3
    Attn.__module__ = "transformers.models.qwen2.modeling_qwen2"
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward as eager

    module = Attn().eval()
    gen = torch.Generator().manual_seed(0)
    neg = torch.finfo(torch.float32).min
    for length in (1, 3, 9):  # a decoding step, a 3-token continuation of a 6-token cache, a whole 9-token pass
        q = torch.randn(4, 6, length, 8, generator=gen)
        k, v = torch.randn(4, 2, 9, 8, generator=gen), torch.randn(4, 2, 9, 8, generator=gen)
        mask = torch.zeros(4, 1, length, 9)
        mask[..., 9 - length:] = torch.full((length, length), neg).triu(1)  # causal among the new queries
        mask[1, ..., :3] = neg  # a left-padded row
        mask[2, ..., 1] = neg  # a masked hole (another context's padding in the scorer's cache)
        for precision in ("fp32", "bf16"):
            with autocast("cpu", precision):
                want, want_w = eager(module, q, k, v, mask, scaling=0.3)
                got, got_w = grouped_attention(module, q, k, v, mask, scaling=0.3)
            assert got.shape == want.shape == (4, length, 6, 8) and got_w.shape == want_w.shape == (4, 6, length, 9)
            tol = 1e-6 if precision == "fp32" else 1e-2
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(got_w.float(), want_w.float(), atol=tol, rtol=tol)
            if length == 9:  # not a continuation: eager's own function ran
                assert torch.equal(got, want)
    # a one-token query without a mask (a batch without padding)
    q = torch.randn(2, 6, 1, 8, generator=gen)
    k, v = torch.randn(2, 2, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    torch.testing.assert_close(grouped_attention(module, q, k, v, None, scaling=1.0)[0],
                               eager(module, q, k, v, None, scaling=1.0)[0])


def test_models_decode_the_same_with_grouped_attention(tokenizer):
    import copy

    from evals.engine import HFEngine, render_prompt
    from worlds.model import ATTENTION, toy_model

    model = toy_model(TINY, tokenizer, seed=0)
    assert model.config._attn_implementation == ATTENTION
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("eager")
    prompts = [render_prompt(tokenizer, p) for p in ("Compute 1+2.", "What is 3*4-5?", "Evaluate 19-8*2.")]
    for precision in ("fp32", "bf16"):
        a, b = (HFEngine(m, tokenizer, precision=precision).generate(prompts, n=3, temperature=1.0, max_new_tokens=12,
                                                                     seed=3, logprobs=True) for m in (model, stock))
        assert [[g.token_ids for g in gs] for gs in a] == [[g.token_ids for g in gs] for gs in b]
        diffs = [abs(x - y) for ga, gb in zip(a, b) for g, h in zip(ga, gb) for x, y in zip(g.logprobs, h.logprobs)]
        assert diffs and max(diffs) < 1e-3
