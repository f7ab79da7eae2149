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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from infra.hashing import hash_json

if TYPE_CHECKING:
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


def seed_for(*parts: Any) -> int:
    """A 31-bit seed derived from any parts (stable across processes and machines, unlike hash())."""
    return int(hash_json(list(parts), 8), 16) & 0x7FFFFFFF


def render_prompt(tokenizer: "PreTrainedTokenizerFast", prompt_text: str) -> str:
    """A user prompt rendered with the chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], tokenize=False,
                                         add_generation_prompt=True)


def stop_ids(tokenizer: "PreTrainedTokenizerFast") -> list[int]:
    """Every special token ends a turn: eos, pad, and added tokens flagged special (like <|im_start|>, which
    decoding drops but transformers' all_special_ids may not list)."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted(added | set(tokenizer.all_special_ids))


class HFEngine:
    """Batched HF `generate` with left padding. Sampling is seeded per call: the same call (prompts, n,
    settings, seed, batch_size) gives the same generations."""

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", device: str = "cpu",
                 precision: str = "fp32", batch_size: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.device, self.precision, self.batch_size = device, precision, batch_size

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, banned_tokens: list[int] | None = None,
                 logprobs: bool = False, stop_tokens: list[int] | None = None) -> list[list[Generation]]:
        import torch

        from worlds.model import autocast, seeded

        tok = self.tokenizer
        pad = tok.pad_token_id
        stop = sorted(set(stop_ids(tok)) | set(stop_tokens or ()))
        flat = [p for p in prompts for _ in range(n)]
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad,
                      return_dict_in_generate=True, output_logits=logprobs)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if banned_tokens:
            kwargs["bad_words_ids"] = [[t] for t in banned_tokens]
        try:
            with seeded(seed):
                for lo in range(0, len(flat), self.batch_size):
                    chunk = flat[lo:lo + self.batch_size]
                    enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
                    enc = {k: v.to(self.device) for k, v in enc.items()}
                    with torch.no_grad(), autocast(self.device, self.precision):
                        res = self.model.generate(**enc, **kwargs)
                    new = res.sequences[:, enc["input_ids"].shape[1]:]
                    lps = [None] * len(new)
                    if logprobs:  # raw logits (before processors) -> log-softmax at the generated token
                        logits = torch.stack(res.logits, dim=1).float()
                        lps = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1).tolist()
                    out += [finished(tok, row, stop, lp) for row, lp in zip(new.tolist(), lps)]
        finally:
            self.model.train(was_training)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def facts(self) -> dict[str, Any]:
        from infra.code import package_versions

        return {"engine": "hf", "versions": package_versions(("transformers", "torch")),
                "precision": self.precision}

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""
