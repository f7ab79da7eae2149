"""Generation engines: one interface, an HF transformers implementation (CPU or one GPU); vLLM later.

Prompts arrive rendered with the chat template (`render_prompt`), so every engine sees the same text. A
response's `text` keeps the meta tags (ordinary added tokens) and drops special tokens (eos, pad);
`token_ids` are the generated ids up to and including the first special token (eos, or any other special token:
generation stops there, as Qwen's does on <|endoftext|>), so the ids always decode to the text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    truncated: bool  # reached max_new_tokens without a stop token


class GenerationEngine(Protocol):
    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 128, seed: int = 0, banned_tokens: list[int] | None = None
                 ) -> list[list[Generation]]:
        """n generations per rendered prompt; temperature 0 = greedy; banned token ids are never sampled."""
        ...


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
                 max_new_tokens: int = 128, seed: int = 0, banned_tokens: list[int] | None = None
                 ) -> list[list[Generation]]:
        import torch

        from worlds.model import autocast, seeded

        tok = self.tokenizer
        pad = tok.pad_token_id
        stop = stop_ids(tok)
        flat = [p for p in prompts for _ in range(n)]
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
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
                        seqs = self.model.generate(**enc, **kwargs)
                    for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
                        end = next((i for i, t in enumerate(row) if t in stop), None)
                        ids = row[:end + 1] if end is not None else row
                        out.append(Generation(text=tok.decode(ids, skip_special_tokens=True), token_ids=tuple(ids),
                                              truncated=end is None))
        finally:
            self.model.train(was_training)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]
