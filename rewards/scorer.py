"""Teacher-forced log-probs of target spans given contexts, scored by the frozen reference model (DESIGN §6).

The contract is at the token-id level (`Scorer.target_logprobs`): for each (context, target) pair, the list of
log π(t_i | context, t_<i) at temperature 1. Implementations:
- `HFScorer`: a transformers causal LM on CPU or one GPU, batched by token budget.
- `TableScorer`: hand-built tables keyed by text, for unit tests with hand-computed expectations.
- later a vLLM scorer: `prompt_logprobs=0, max_tokens=1` on context + target gives the log-prob of every prompt
  token; the last len(target) entries are the answer. Nothing else in rewards/ depends on the backend.

`text_logprobs` is the text layer the signals use: it tokenises contexts and targets SEPARATELY and concatenates
the ids. Tokenising context + target as one string would let BPE merge across the boundary (a trailing space or
digit of the context fusing with the first target token), so `\\boxed{16}` could become different token sequences
after x∘p and after x∘p∘m, or split differently from `\\boxed{-2}`; the gold/decoy comparison and the o/c shift
need the same target tokens under every context. The price is a possibly non-canonical split at the seam, the
same for every context and both targets.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    import torch


class Scorer(Protocol):
    """calls: (context, target) requests served so far; forwards: model forward passes (batches) so far."""

    calls: int
    forwards: int

    def target_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                        ) -> list[list[float]]: ...


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text piece without BOS/EOS (the rendered prompt already carries the template)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def text_logprobs(scorer: Scorer, tokenizer: Any, contexts: Sequence[str], targets: Sequence[str]
                  ) -> list[list[float]]:
    """Per-token log-probs of each target text after its context text (tokenised separately, see module doc)."""
    cache: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in cache:
            cache[text] = encode(tokenizer, text)
        return cache[text]

    return scorer.target_logprobs([ids(c) for c in contexts], [ids(t) for t in targets])


class BatchedRequests:
    """One scorer call for many signal calls (a batch's groups), by record and replay.

    `recording` is a Scorer that serves nothing real: it notes each (context, target) request and answers 0.0 per
    target token. `run(scorer)` then sends every noted request to the real scorer in ONE target_logprobs call (so
    contexts of all groups share forward passes, packed by its token budget) and returns the replaying Scorer,
    which answers each request from those results, and asks the real scorer itself for a request it has not seen (a signal whose later requests
    depend on earlier answers stays correct, only unbatched). A request's log-probs do not depend on its batch mates
    (HFScorer: to fp rounding), so replayed values are what a per-group call returns. Counts: the real scorer's
    `calls` grow by every request sent, as with per-group calls; `forwards` by the batches it needed."""

    def __init__(self) -> None:
        self.requests: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.answers: dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = {}
        self.recording = _Recording(self)

    def run(self, scorer: Scorer) -> Scorer:
        if self.requests:
            got = scorer.target_logprobs([c for c, _ in self.requests], [t for _, t in self.requests])
            self.answers = dict(zip(self.requests, got))
        return _Replaying(self, scorer)


class _Recording:
    calls = forwards = 0

    def __init__(self, owner: BatchedRequests) -> None:
        self.owner = owner

    def target_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                        ) -> list[list[float]]:
        _check(contexts, targets)
        self.owner.requests += [(tuple(c), tuple(t)) for c, t in zip(contexts, targets)]
        return [[0.0] * len(t) for t in targets]


class _Replaying:
    def __init__(self, owner: BatchedRequests, scorer: Scorer) -> None:
        self.owner, self.scorer = owner, scorer

    @property
    def calls(self) -> int:
        return self.scorer.calls

    @property
    def forwards(self) -> int:
        return self.scorer.forwards

    def target_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                        ) -> list[list[float]]:
        keys = [(tuple(c), tuple(t)) for c, t in zip(contexts, targets)]
        missing = [k for k in keys if k not in self.owner.answers]
        if missing:
            got = self.scorer.target_logprobs([c for c, _ in missing], [t for _, t in missing])
            self.owner.answers.update(zip(missing, got))
        return [list(self.owner.answers[k]) for k in keys]


def _check(contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> None:
    if len(contexts) != len(targets):
        raise ValueError(f"{len(contexts)} contexts but {len(targets)} targets")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("an empty context has no position to predict the first target token from")


class HFScorer:
    """A transformers causal LM (model.eval(), frozen) as a scorer.

    Requests that share a context share its forward pass: the distinct contexts of a call are right-padded into
    batches, run once through the decoder with a KV cache, and every target of a context then runs as one short
    continuation on a copy of that context's cache. PMI-shift's four requests per rollout (gold and decoy after
    the before-context, gold and decoy after the after-context) are one context pass, not four (the before-context
    is a prefix of the after-context), and contexts that start alike (an RL group's rollouts after one prompt) run
    that start once per batch (`shared_prefixes`), then their own suffixes on its cache. A whole call (a group, or
    a batch) packs into as few forwards as the token budget allows: a batch holds contexts sorted by suffix length
    whose padded size (rows × longest suffix, one row per context and per target) stays within `token_budget`.
    Padding is masked and every real token keeps its unpadded position, so a request's log-probs
    do not depend on its batch mates (to fp rounding). The LM head and an fp32 log-softmax are applied to the
    gathered target positions alone (a full-vocabulary logit tensor over every position would dominate memory
    for a 150k vocabulary). Models whose logits are not lm_head(hidden) (final soft-capping, logit scaling) are
    refused rather than scored wrongly. `forwards` counts batches (a shared-start pass, a context pass and a target
    pass at most each).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, token_budget: int | None = None, max_rows: int = 256,
                 min_shared: int = 8) -> None:
        cfg = model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
            raise NotImplementedError(f"{type(model).__name__}: logits are not lm_head(hidden); not supported")
        self.model = model.eval()
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.tokenizer = tokenizer
        # padded tokens per batch: on CPU small batches stay in cache (a demo RL batch's PMI-shift scoring, 1 thread:
        # 0.33 s at 4096 vs 0.44 s at 16384); a GPU wants them large
        self.token_budget = token_budget or (4096 if self.device.type == "cpu" else 16384)
        self.max_rows = max_rows
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0  # any id: padded positions are masked
        self.min_shared = min_shared
        self.calls = 0
        self.forwards = 0

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: str = "auto", **kw: Any) -> "HFScorer":
        """The frozen reference model (an arm's SFT checkpoint in HF format) and its tokenizer, with twinarm's
        attention (worlds.model.ATTENTION: the continuation passes attend per key/value head)."""
        import torch
        from transformers import AutoModelForCausalLM

        from worlds.model import register_attention
        from worlds.tokenizer import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                     attn_implementation=register_attention())
        model.to(device).requires_grad_(False)
        return cls(model, load_tokenizer(path), **kw)

    @property
    def device(self) -> "torch.device":
        return next(self.model.parameters()).device

    def _batches(self, lengths: list[int], rows: list[int]) -> list[list[int]]:
        """Items (longest first) packed while (rows in the batch) × (the batch's longest) ≤ token_budget."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        used = 0
        for i in order:
            # sorted longest first, so a batch's first item sets its padded width
            if batches and used + rows[i] <= self.max_rows and \
                    (used + rows[i]) * lengths[batches[-1][0]] <= self.token_budget:
                batches[-1].append(i)
                used += rows[i]
            else:
                batches.append([i])
                used = rows[i]
        return batches

    def target_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                        ) -> list[list[float]]:
        _check(contexts, targets)
        out: list[list[float]] = [[] for _ in contexts]
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(targets):
            if len(t):
                by_context.setdefault(tuple(contexts[i]), []).append(i)
        # a context that is a prefix of another (PMI-shift's x∘p of x∘p∘m) is served by the longer one's forward:
        # causal attention makes its hidden states at the prefix's positions the prefix's own. In sorted order a
        # prefix of any context is a prefix of the next one, so each context's host is found by walking forward
        ordered = sorted(by_context)
        host = {c: c for c in ordered}
        for a, b in zip(reversed(ordered[:-1]), reversed(ordered[1:])):
            if len(a) < len(b) and b[:len(a)] == a:
                host[a] = host[b]
        hosted: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # host -> (request, its context length)
        for ctx, members in by_context.items():
            hosted.setdefault(host[ctx], []).extend((i, len(ctx)) for i in members)
        groups = list(hosted.items())
        # the hosts' shared starts (an RL group's prompt) run once per batch; batches are packed by what is left
        row, plen = shared_prefixes([c for c, _ in groups], self.min_shared)
        for batch in self._batches([len(c) - plen[j] for j, (c, _) in enumerate(groups)],
                                   [1 + len(reqs) for _, reqs in groups]):
            self._score([groups[j] for j in batch], [(row[j], plen[j]) for j in batch], targets, out)
        self.calls += len(contexts)
        return out

    def _score(self, groups: list[tuple[tuple[int, ...], list[tuple[int, int]]]], shared: list[tuple[int, int]],
               targets: Sequence[Sequence[int]], out: list[list[float]]) -> None:
        """One batch: the shared prefixes' forward (`shared`: per host, its prefix's id and length, from
        shared_prefixes), the host contexts' suffixes on their prefix's cache, then every target's continuation on
        its context's cache (its own context: the host's first `n` positions; the last target token is never an
        input). Each pass keeps a real token's unpadded position and masks everything that is not its own context,
        so no request sees a batch mate's tokens."""
        import torch

        dev = self.device
        hosts = [c for c, _ in groups]
        plen = [p for _, p in shared]
        prefixes = {key: hosts[b][:key[1]] for b, key in enumerate(shared) if key[1]}  # (run, length) -> its ids
        p_rows = {key: r for r, key in enumerate(prefixes)}
        p_width = max((p for _, p in prefixes), default=0)
        s_width = max(len(c) - plen[b] for b, c in enumerate(hosts))
        reqs = [(b, i, n) for b, (_, members) in enumerate(groups) for i, n in members]
        t_width = max(len(targets[i]) - 1 for _, i, _ in reqs)

        def padded(rows: list[Sequence[int]], width: int) -> tuple["torch.Tensor", "torch.Tensor"]:
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, tokens in enumerate(rows):
                ids[r, :len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
                mask[r, :len(tokens)] = 1
            return ids, mask

        with torch.inference_mode():
            cache, first = None, None
            if prefixes:  # pass 1: each shared prefix once
                ids, mask = padded(list(prefixes.values()), p_width)
                first = self.decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=True)
                cache = first.past_key_values
                cache.batch_select_indices(torch.tensor([p_rows.get(key, 0) for key in shared], device=dev))
            # pass 2: every host's suffix after its own prefix (positions continue from it; other prefixes masked)
            p_len = torch.tensor(plen, dtype=torch.long)
            s_ids, s_mask = padded([c[plen[b]:] for b, c in enumerate(hosts)], s_width)
            own_prefix = (torch.arange(p_width)[None, :] < p_len[:, None]).long()
            second = self.decoder(input_ids=s_ids.to(dev), attention_mask=torch.cat([own_prefix, s_mask], 1).to(dev),
                                  position_ids=(p_len[:, None] + torch.arange(s_width)[None, :]).to(dev),
                                  past_key_values=cache, use_cache=t_width > 0)
            # the hidden state at each request's last context position predicts its target's first token
            last = torch.stack([first.last_hidden_state[p_rows[shared[b]], n - 1] if n <= plen[b] else
                                second.last_hidden_state[b, n - 1 - plen[b]] for b, _, n in reqs])
            rest = None
            if t_width > 0:
                cache = second.past_key_values
                row_ctx = torch.tensor([b for b, _, _ in reqs], dtype=torch.long)
                cache.batch_select_indices(row_ctx.to(dev))  # one copy of the host's cache per target
                t_ids, t_mask = padded([targets[i][:-1] for _, i, _ in reqs], t_width)
                ctx_len = torch.tensor([n for _, _, n in reqs], dtype=torch.long)
                req_p = p_len[row_ctx]
                own = torch.cat([torch.arange(p_width)[None, :] < torch.minimum(ctx_len, req_p)[:, None],
                                 torch.arange(s_width)[None, :] < (ctx_len - req_p)[:, None]], 1).long()
                rest = self.decoder(input_ids=t_ids.to(dev), attention_mask=torch.cat([own, t_mask], 1).to(dev),
                                    position_ids=(ctx_len[:, None] + torch.arange(t_width)[None, :]).to(dev),
                                    past_key_values=cache, use_cache=True).last_hidden_state
            picked = []
            for r, (_, i, _) in enumerate(reqs):
                picked.append(last[r:r + 1])
                if len(targets[i]) > 1:
                    picked.append(rest[r, :len(targets[i]) - 1])
            t_ids_all = torch.tensor([t for _, i, _ in reqs for t in targets[i]], device=dev)
            logp = self.head(torch.cat(picked)).float().log_softmax(-1)
            lp = logp.gather(-1, t_ids_all[:, None])[:, 0].tolist()
        self.forwards += 1
        k = 0
        for _, i, _ in reqs:
            out[i] = lp[k:k + len(targets[i])]
            k += len(targets[i])


def shared_prefixes(contexts: Sequence[Sequence[int]], min_shared: int) -> tuple[list[int], list[int]]:
    """(group, prefix length) per context: contexts sorted by their ids fall into runs whose neighbours share at
    least `min_shared` leading ids (an RL group's rollouts share their rendered prompt); a run's prefix is what all
    its members share. A context in no run gets length 0. No context is a prefix of another (HFScorer hosts those on
    their extension), so every context keeps at least one id past its prefix."""
    from os.path import commonprefix  # any sequences, not only paths

    order = sorted(range(len(contexts)), key=lambda i: tuple(contexts[i]))
    group, length = [0] * len(contexts), [0] * len(contexts)
    run: list[int] = []
    shared = 0
    for i in order + [None]:  # type: ignore[list-item]
        k = len(commonprefix([contexts[run[-1]], contexts[i]])) if run and i is not None else 0
        if run and k >= min_shared:
            run.append(i)
            shared = min(shared, k)
            continue
        if len(run) > 1:
            for j in run:
                group[j], length[j] = run[0], min(shared, len(contexts[j]) - 1)
        run, shared = ([i], len(contexts[i])) if i is not None else ([], 0)
    return group, length


class PieceTokenizer:
    """A transparent tokenizer for hand-built tests: greedy longest match over `pieces` (multi-character tokens
    such as the meta tags or `\\boxed{`), otherwise one character per token, over a fixed vocabulary (pieces,
    then printable ASCII, then `extra` characters). encode/decode follow the transformers call signatures."""

    def __init__(self, pieces: Sequence[str] = ("<|meta|>", "<|/meta|>", "\\boxed{"), extra: str = "") -> None:
        import string

        chars = [c for c in dict.fromkeys(string.printable + extra) if c not in pieces]
        self.vocab = list(dict.fromkeys([*pieces, *chars]))
        self.ids = {p: i for i, p in enumerate(self.vocab)}
        self._pieces = sorted((p for p in pieces if len(p) > 1), key=len, reverse=True)

    def tokens(self, text: str) -> list[str]:
        out, i = [], 0
        while i < len(text):
            piece = next((p for p in self._pieces if text.startswith(p, i)), text[i])
            if piece not in self.ids:
                raise ValueError(f"character {piece!r} is not in the vocabulary")
            out.append(piece)
            i += len(piece)
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.ids[t] for t in self.tokens(text)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s) for s in sequences]


class TableScorer:
    """Log-probs from a hand-built table: table[(context text, target prefix text)][next token text] = log-prob.

    Ids are decoded back to text with `tokenizer` (a PieceTokenizer keeps that exact). Entries not in the table
    get `default`, the same under every context, so a test lists only the tokens whose log-probs it compares.
    `log` keeps every (context, target) text pair served, for tests that check what was asked.
    """

    def __init__(self, tokenizer: Any, table: Mapping[tuple[str, str], Mapping[str, float]],
                 default: float = -1.0) -> None:
        self.tokenizer = tokenizer
        self.table = table
        self.default = default
        self.calls = 0
        self.forwards = 0
        self.log: list[tuple[str, str]] = []

    def target_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                        ) -> list[list[float]]:
        _check(contexts, targets)
        dec = self.tokenizer.decode
        out = []
        for ctx, tgt in zip(contexts, targets):
            ctx_text = dec(list(ctx))
            self.log.append((ctx_text, dec(list(tgt))))
            out.append([self.table.get((ctx_text, dec(list(tgt[:i]))), {}).get(dec([tgt[i]]), self.default)
                        for i in range(len(tgt))])
        self.calls += len(contexts)
        self.forwards += len(contexts)
        return out
