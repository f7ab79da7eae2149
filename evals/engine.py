"""Generation engines: one interface; HF transformers `generate` in process (CPU or one GPU) here, vLLM in its
own environment and process in evals/vllm_engine.py; `eval.engine` picks one (evals/engines.py).

Prompts arrive rendered with the chat template (`render_prompt`), so every engine sees the same text. A
response's `text` keeps the meta tags (ordinary added tokens) and drops special tokens (eos, pad);
`token_ids` are the generated ids up to and including the first special token (eos, or any other special token:
generation stops there, as Qwen's does on <|endoftext|>), so the ids always decode to the text. With
`logprobs=True`, `logprobs[i]` is the natural-log probability of `token_ids[i]` under the model's raw
distribution (log-softmax of the logits, before temperature, top-p and banning), as vLLM reports it.
`stop_tokens` adds ordinary token ids that end a generation like a special token does (kept as its last id): the
environment's tool loop (evals/tools.py) stops at its marker this way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from infra.hashing import hash_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    truncated: bool  # reached max_new_tokens without a stop token
    logprobs: tuple[float, ...] | None = None  # one per token id, when asked for
    # through a tool loop (evals/tools.py): True for each token id the environment appended (tool output, never
    # trained nor in a log-prob ratio); None when no environment ran. Tool calls made and those that failed.
    env_mask: tuple[bool, ...] | None = None
    tool_calls: int = 0
    tool_errors: int = 0


class GenerationEngine(Protocol):
    tokenizer: "PreTrainedTokenizerFast"

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, banned_tokens: list[int] | None = None,
                 logprobs: bool = False, stop_tokens: list[int] | None = None) -> list[list[Generation]]:
        """n generations per rendered prompt; temperature 0 = greedy; top_k 0 = no top-k filtering (top_p and
        top_k apply only when sampling); banned token ids are never sampled; a generation also ends on (and keeps)
        any id of `stop_tokens`."""
        ...

    def facts(self) -> dict[str, Any]:
        """Runtime facts for the stage record: engine name, versions it ran with, precision."""
        ...

    def close(self) -> None:
        """Release the engine (its process, for out-of-process engines)."""
        ...


def finished(tokenizer: "PreTrainedTokenizerFast", row: Iterable[int], stop: list[int],
             logprobs: Iterable[float] | None = None) -> Generation:
    """A generated row cut after its first stop token (truncated when there is none), decoded without specials:
    the one rule every engine's raw output goes through."""
    row = list(row)
    end = next((i for i, t in enumerate(row) if t in stop), None)
    ids = row[:end + 1] if end is not None else row
    lps = tuple(list(logprobs)[:len(ids)]) if logprobs is not None else None
    return Generation(text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=tuple(ids),
                      truncated=end is None, logprobs=lps)


def check_request(prompts: list[str], n: int, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                  banned_tokens: list[int] | None, stop_tokens: list[int] | None, vocab_size: int | None = None
                  ) -> None:
    """Raises ValueError, naming the argument and what was expected, for a generate() request an engine cannot
    serve as asked: a prompt that is not a non-empty string (an empty one has no position to continue from); n or
    max_new_tokens < 1 (nothing would be generated, silently); a temperature that is negative or not finite (read
    as greedy); top_p outside (0, 1]; top_k < 0 (0 is off here; verl's -1 converts through rl.schedule.hf_top_k);
    with `vocab_size` (the logits' width), a banned or stop id outside [0, vocab_size) (never matched, silently),
    or banned ids covering the whole vocabulary (nothing left to sample)."""
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts: expected a list of rendered prompt strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"prompts[{i}]: expected a non-empty rendered prompt string, got {p!r}")
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer ≥ 1, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature: expected a finite number ≥ 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer ≥ 0 (0 = no top-k; verl's -1 converts through "
                         f"rl.schedule.hf_top_k), got {top_k!r}")
    for name, ids in (("banned_tokens", banned_tokens), ("stop_tokens", stop_tokens)):
        bad = [t for t in ids or () if isinstance(t, bool) or not isinstance(t, int) or t < 0
               or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"{name}: expected token ids in [0, {vocab_size if vocab_size is not None else 'vocab'})"
                             f", got {bad[:5]}")
    if vocab_size is not None and banned_tokens and len(set(banned_tokens)) >= vocab_size:
        raise ValueError(f"banned_tokens: all {vocab_size} token ids are banned; nothing is left to generate")


def seed_for(*parts: Any) -> int:
    """A 31-bit seed derived from any parts (stable across processes and machines, unlike hash())."""
    return int(hash_json(list(parts), 8), 16) & 0x7FFFFFFF


def render_prompt(tokenizer: "PreTrainedTokenizerFast", prompt_text: str) -> str:
    """A user prompt rendered with the chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], tokenize=False,
                                         add_generation_prompt=True)


def _processors(temperature: float, top_p: float, top_k: int, banned_tokens: list[int] | None,
                device: str = "cpu") -> Any:
    """HF's logits processors in `generate`'s order: banned ids first, then (sampling only) temperature, top-k,
    top-p."""
    from transformers import (LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if banned_tokens:
        procs.append(SuppressTokensLogitsProcessor(sorted(set(banned_tokens)), device=device))
    if temperature > 0:
        procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def stop_ids(tokenizer: "PreTrainedTokenizerFast") -> list[int]:
    """Every special token ends a turn: eos, pad, and added tokens flagged special (like <|im_start|>, which
    decoding drops but transformers' all_special_ids may not list)."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted(added | set(tokenizer.all_special_ids))


# the HF engine's own decoding loop (below): part of the evaluation protocol (evals.engines.engine_identity), so
# samples it drew never share a stored result with those of another loop (HF generate's, before it). /3: its models
# attend per key/value head when decoding (worlds.model.grouped_attention): eager's values to fp32 rounding, the
# same samples in bf16 on the demo box, about a third less decoding time than /2 on a demo RL batch
HF_DECODE = "hf-engine-decode/3: stopped rows leave the batch; grouped-query decoding attention"


class HFEngine:
    """Batched generation in process with HF transformers (left padding, the model's KV cache, HF's logits
    processors). Sampling is seeded per call: the same call (prompts, n, settings, seed, batch_size) gives the same
    generations.

    Deviation from `model.generate`: rows that have stopped leave the batch (`DynamicCache.batch_select_indices`),
    so each decoding step costs what the rows still generating cost. HF `generate` keeps every row to the end
    (it has no such option), so the batch's longest response set the price of all of them: on a demo SFT model's
    RL batch (16 prompts × 8, ~62 tokens mean, longest 132–151, bf16, 1 thread) this loop took 3.0 s of CPU where
    `generate` took 8.1 s (medians of 3, `scripts/bench_engines.py --decode DIR`). The rules are `generate`'s:
    fp32 logits of the last position, then banned tokens, temperature, top-k, top-p (HF's own processors, in
    `generate`'s order), then a multinomial draw (argmax when greedy). Greedy output equals vLLM's in fp32 (tests/test_engine_contract.py); sampled
    output is a different draw from the same distribution than `generate` would make.
    """

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", device: str = "cpu",
                 precision: str = "fp32", batch_size: int = 256):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer ≥ 1 (sequences per forward pass), got {batch_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.device, self.precision, self.batch_size = device, precision, batch_size

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, banned_tokens: list[int] | None = None,
                 logprobs: bool = False, stop_tokens: list[int] | None = None) -> list[list[Generation]]:
        """n generations per rendered prompt (GenerationEngine.generate); raises ValueError for a request
        check_request refuses (ids checked against the model's vocabulary)."""
        from worlds.model import seeded

        check_request(prompts, n, temperature, top_p, top_k, max_new_tokens, banned_tokens, stop_tokens,
                      self.model.config.vocab_size)
        tok = self.tokenizer
        stop = sorted(set(stop_ids(tok)) | set(stop_tokens or ()))
        flat = [p for p in prompts for _ in range(n)]
        processors = _processors(temperature, top_p, top_k, banned_tokens, self.device)
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with seeded(seed):
                for lo in range(0, len(flat), self.batch_size):
                    enc = tok(flat[lo:lo + self.batch_size], return_tensors="pt", padding=True, padding_side="left",
                              add_special_tokens=False)
                    rows, lps = self._decode(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
                                             processors, temperature > 0, max_new_tokens, stop, logprobs)
                    out += [finished(tok, row, stop, lp) for row, lp in zip(rows, lps)]
        finally:
            self.model.train(was_training)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _decode(self, ids: "torch.Tensor", mask: "torch.Tensor", processors: Any, sample: bool,
                max_new_tokens: int, stop: list[int], logprobs: bool
                ) -> tuple[list[list[int]], list[list[float] | None]]:
        """Decode a left-padded batch [B, T]; returns B generated id lists (each ends at its first stop id or at
        max_new_tokens) and, with `logprobs`, the raw log-probability of each generated id."""
        import torch
        from transformers import DynamicCache

        from worlds.model import autocast

        n_rows = ids.shape[0]
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        lps: list[list[float] | None] = [[] if logprobs else None for _ in range(n_rows)]
        alive = torch.arange(n_rows, device=ids.device)  # batch position -> row
        stop_t = torch.tensor(stop, device=ids.device)
        cache = DynamicCache(config=self.model.config)
        position = (mask.long().cumsum(-1) - 1).clamp(min=0)  # what generate() uses under left padding
        with torch.no_grad(), autocast(self.device, self.precision):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                                use_cache=True).logits[:, -1].float()
            position = position[:, -1:]
            for step in range(max_new_tokens):
                scores = processors(ids, logits)
                nxt = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0] if sample else scores.argmax(-1)
                if logprobs:
                    chosen = torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0].tolist()
                for j, (r, t) in enumerate(zip(alive.tolist(), nxt.tolist())):
                    rows[r].append(t)
                    if logprobs:
                        lps[r].append(chosen[j])
                keep = ~torch.isin(nxt, stop_t)
                if step == max_new_tokens - 1 or not keep.any():
                    break
                if not keep.all():  # stopped rows leave the batch and the cache
                    idx = keep.nonzero()[:, 0]
                    cache.batch_select_indices(idx)
                    alive, mask, nxt, position = alive[idx], mask[idx], nxt[idx], position[idx]
                ids = nxt[:, None]
                mask = torch.cat([mask, mask.new_ones((len(ids), 1))], 1)
                position = position + 1
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position,
                                    past_key_values=cache, use_cache=True).logits[:, -1].float()
        return rows, lps

    def facts(self) -> dict[str, Any]:
        from infra.code import package_versions

        return {"engine": "hf", "versions": package_versions(("transformers", "torch")),
                "precision": self.precision, "decode": HF_DECODE}

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""
