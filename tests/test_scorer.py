"""The scorer contract: HF implementation against an unbatched reference, batching invariance, the text layer."""
from __future__ import annotations

import pytest

from rewards.scorer import HFScorer, PieceTokenizer, TableScorer, encode, text_logprobs

TOK = PieceTokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(TOK.vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


REQUESTS = [("Q: 7-3*(2-5)=?\nA: 2-5=3, 7-9=-2.\n", "\\boxed{16}"),
            ("Q: 7-3*(2-5)=?\nA: 2-5=3, 7-9=-2.\n<|meta|>sign slip<|/meta|>", "\\boxed{-2}"),
            ("x", "\\boxed{16} and a longer target to pad against"),
            ("a much longer context " * 4, "}")]


def reference(model, ctx: list[int], tgt: list[int]) -> list[float]:
    """One unpadded full forward; log-softmax over the whole vocabulary at each target position."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ctx + tgt])).logits[0].float()
    logp = logits.log_softmax(-1)
    return [logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(tgt)]


def test_hf_scorer_matches_unbatched_reference(tiny_model):
    scorer = HFScorer(tiny_model, token_budget=4096)
    ctxs = [encode(TOK, c) for c, _ in REQUESTS]
    tgts = [encode(TOK, t) for _, t in REQUESTS]
    got = scorer.target_logprobs(ctxs, tgts)
    assert scorer.calls == 4 and scorer.forwards == 1
    for c, t, row in zip(ctxs, tgts, got):
        assert len(row) == len(t)
        assert row == pytest.approx(reference(tiny_model, c, t), abs=1e-5)
        assert all(v < 0 for v in row)


def test_hf_scorer_batching_invariance(tiny_model):
    ctxs = [encode(TOK, c) for c, _ in REQUESTS]
    tgts = [encode(TOK, t) for _, t in REQUESTS]
    together = HFScorer(tiny_model).target_logprobs(ctxs, tgts)
    small = HFScorer(tiny_model, token_budget=100)  # forces several batches
    split = small.target_logprobs(ctxs, tgts)
    assert small.forwards > 1 and small.calls == 4
    alone = [HFScorer(tiny_model).target_logprobs([c], [t])[0] for c, t in zip(ctxs, tgts)]
    for a, b, c in zip(together, split, alone):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)
    # the order of requests does not matter either
    rev = HFScorer(tiny_model).target_logprobs(ctxs[::-1], tgts[::-1])[::-1]
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(together, rev))


def test_shared_contexts_give_the_unbatched_beliefs(tiny_model):
    """PMI-shift's requests: per rollout, gold and decoy after a before-context and after an after-context. Shared
    contexts run once, and a before-context rides on its after-context's forward (a prefix of it: 4 requests → 1
    context row); every belief B = Σ_D [lp(gold) − lp(decoy)] equals the one from unpadded single forwards to 1e-5,
    with one forward for the whole call."""
    prefix = "Q: 7-3*(2-5)=?\nA: 2-5=3, 7-9=-2."
    befores = [prefix + "\n", prefix + " so", prefix[:20] + "\n"]
    afters = [c + "<|meta|>sign slip<|/meta|>" for c in befores]
    gold, decoy = encode(TOK, "\\boxed{16}"), encode(TOK, "\\boxed{-2}")  # same length, two tokens differ
    assert len(gold) == len(decoy)
    diff = [t for t, (g, d) in enumerate(zip(gold, decoy)) if g != d]
    ctxs = [encode(TOK, c) for pair in zip(befores, afters) for c in pair for _ in (0, 1)]
    tgts = [t for _ in range(2 * len(befores)) for t in (gold, decoy)]
    scorer = HFScorer(tiny_model)
    got = scorer.target_logprobs(ctxs, tgts)
    assert scorer.forwards == 1 and scorer.calls == len(ctxs)
    widths = []
    real = scorer.decoder.forward
    scorer.decoder.forward = lambda *a, **k: widths.append(k["input_ids"].shape) or real(*a, **k)
    scorer.target_logprobs(ctxs, tgts)
    # each before-context is a prefix of its after-context, whose forward serves it: 3 host contexts, whose
    # shared start runs once (1 row), then their 3 suffixes, then 12 target rows
    assert [w[0] for w in widths] == [1, len(befores), len(ctxs)]
    for k in range(0, len(ctxs), 2):
        ours = sum(got[k][t] - got[k + 1][t] for t in diff)
        alone = [reference(tiny_model, ctxs[k + j], tgts[k + j]) for j in (0, 1)]
        assert ours == pytest.approx(sum(alone[0][t] - alone[1][t] for t in diff), abs=1e-5)
        assert got[k] == pytest.approx(alone[0], abs=1e-5) and got[k + 1] == pytest.approx(alone[1], abs=1e-5)


def test_prefix_contexts_ride_on_their_longest_extension(tiny_model):
    """Contexts A ⊂ A∘x ⊂ A∘x∘y, A∘z and an unrelated B: A and A∘x are served by A∘x∘y's forward (3 context rows,
    not 5); every request, one-token targets included, equals its own unpadded forward to 1e-5."""
    a = encode(TOK, "Q: 7-3*(2-5)=?\nA: 2-5=")
    ax, axy, az = a + encode(TOK, "-3"), a + encode(TOK, "-3, 3*(-3)=-9"), a + encode(TOK, "3?")
    b = encode(TOK, "Compute 1+2.")
    ctxs = [a, ax, axy, az, b, a, axy]
    tgts = [encode(TOK, t) for t in ("-3", "\\boxed{16}", "7", "\\boxed{-2}", "3", "x", "\\boxed{16}")]
    scorer = HFScorer(tiny_model)
    widths = []
    real = scorer.decoder.forward
    scorer.decoder.forward = lambda *args, **k: widths.append(k["input_ids"].shape) or real(*args, **k)
    got = scorer.target_logprobs(ctxs, tgts)
    # hosts A∘x∘y, A∘z, B: A runs once for the two that start with it, then the 3 hosts' suffixes
    assert widths[:2] == [(1, len(a)), (3, max(len(axy) - len(a), len(b)))] and scorer.forwards == 1
    for ctx, tgt, ours in zip(ctxs, tgts, got):
        assert ours == pytest.approx(reference(tiny_model, ctx, tgt), abs=1e-5)


def test_rollouts_of_one_prompt_share_its_forward(tiny_model):
    """An RL group: 8 rollouts of one prompt, each scored before its own block; another prompt's 8 beside them.
    Each prompt runs once (2 prefix rows), then only the responses; every request equals its own unpadded forward
    to 1e-5, and a request whose context ends inside the shared prompt (a block at the very start) too."""
    prompts = [encode(TOK, "Q: 7-3*(2-5)=?\nA: "), encode(TOK, "Q: 12/(2+1)=?\nA: ")]
    responses = [encode(TOK, r) for r in ("2-5=3", "2-5=-3, 3*(-3)=-9", "7-3=4", "x", "2-5=3, 7-9=-2.", "16",
                                          "a much longer response " * 2, "-9")]
    ctxs = [p + r for p in prompts for r in responses] + [prompts[0][:-2]]
    tgts = [encode(TOK, "\\boxed{16}")] * len(ctxs)
    scorer = HFScorer(tiny_model)
    widths = []
    real = scorer.decoder.forward
    scorer.decoder.forward = lambda *args, **k: widths.append(k["input_ids"].shape) or real(*args, **k)
    got = scorer.target_logprobs(ctxs, tgts)
    # 14 hosts: per prompt, "2-5=3" rides on "2-5=3, 7-9=-2." (its prefix), and the cut prompt on any of them
    assert widths[0] == (2, max(len(p) for p in prompts)) and widths[1][0] == 14
    for ctx, tgt, ours in zip(ctxs, tgts, got):
        assert ours == pytest.approx(reference(tiny_model, ctx, tgt), abs=1e-5)


def test_shared_prefixes_groups_runs_of_a_common_start():
    from rewards.scorer import shared_prefixes

    a, b = [1, 2, 3, 4], [9, 9, 9]
    contexts = [a + [5], b + [1], a + [6, 7], [4, 4], a[:3] + [8], b + [2, 2]]
    group, length = shared_prefixes(contexts, min_shared=3)
    # a∘5, a∘6∘7 and a[:3]∘8 share a[:3] (the run's least common start); b∘1, b∘2∘2 share b; [4, 4] is alone
    assert length == [3, 3, 3, 0, 3, 3]
    assert group[0] == group[2] == group[4] != group[1] == group[5]
    assert shared_prefixes(contexts, min_shared=4)[1] == [4, 0, 4, 0, 0, 0]  # a∘8 shares only 3 with them
    assert shared_prefixes(contexts, min_shared=5)[1] == [0] * 6  # no neighbours share 5
    assert shared_prefixes([[1, 2], [1, 2, 3]], 1)[1] == [1, 2]  # each keeps at least one id past its prefix


def test_hf_scorer_edges(tiny_model):
    scorer = HFScorer(tiny_model)
    assert scorer.target_logprobs([[1, 2], [3]], [[], [4]])[0] == []
    with pytest.raises(ValueError, match="empty context"):
        scorer.target_logprobs([[]], [[1]])
    with pytest.raises(ValueError, match="2 contexts but 1 targets"):
        scorer.target_logprobs([[1], [2]], [[3]])


class Recorder:
    calls = forwards = 0

    def __init__(self):
        self.seen = []

    def target_logprobs(self, contexts, targets):
        self.seen.append((contexts, targets))
        return [[0.0] * len(t) for t in targets]


def test_text_layer_tokenises_target_separately():
    # "ab" is one token, so "xa" + "b" tokenised jointly would be [x, ab]: the target token would vanish
    tok = PieceTokenizer(pieces=("ab",))
    rec = Recorder()
    text_logprobs(rec, tok, ["xa", "yy"], ["b", "b"])
    (contexts, targets), = rec.seen
    assert targets == [tok.encode("b")] * 2 and contexts[0] == tok.encode("xa")
    assert tok.encode("xab") != tok.encode("xa") + tok.encode("b")


def test_table_scorer_lookup_and_default():
    s = TableScorer(TOK, {("ctx", ""): {"\\boxed{": -0.5}, ("ctx", "\\boxed{"): {"1": -2.0}}, default=-7.0)
    out = text_logprobs(s, TOK, ["ctx", "other"], ["\\boxed{1}", "\\boxed{1}"])
    assert out == [[-0.5, -2.0, -7.0], [-7.0, -7.0, -7.0]]
    assert s.calls == 2 and s.log == [("ctx", "\\boxed{1}"), ("other", "\\boxed{1}")]


def test_from_pretrained_loads_model_and_tokenizer(tmp_path):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["7-3*(2-5)=16"], trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="!")
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = HFScorer.from_pretrained(str(tmp_path), dtype="float32")
    assert scorer.pad_id == tok.pad_token_id and not any(p.requires_grad for p in scorer.model.parameters())
    got = text_logprobs(scorer, scorer.tokenizer, ["7-3*(2-5)=", "7-3"], ["16", "*(2-5)"])
    for (c, t), row in zip([("7-3*(2-5)=", "16"), ("7-3", "*(2-5)")], got):
        ids = scorer.tokenizer.encode  # (the reload may pick the model type's tokenizer class: compare its ids)
        assert row == pytest.approx(reference(model, ids(c), ids(t)), abs=1e-5)
