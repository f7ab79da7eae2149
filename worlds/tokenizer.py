"""A byte-level BPE tokenizer trained locally on the world's text, shaped like Qwen's.

Qwen's pre-tokenizer split regex (digits are split one by one, so every digit stays a single token) and NFC
normaliser; a byte-level alphabet so any text is encodable; specials `<|im_start|>`, `<|im_end|>` (eos) and
`<|endoftext|>` (pad); the meta tags and the tool markers (meta.grammar) as ordinary added tokens (decoding
with skip_special_tokens keeps them); a Qwen-style chat template. Saved as a plain `PreTrainedTokenizerFast` (tokenizer.json as is). `load_tokenizer`
reloads exactly that: next to a qwen2 config.json, `AutoTokenizer` would pick Qwen2Tokenizer, which rebuilds
the pre-tokenizer (trim_offsets=True) and so shifts the character offsets the loss mask is cut by.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from meta.grammar import CALC_CLOSE, CALC_OPEN, META_CLOSE, META_OPEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Qwen2's pre-tokenizer pattern (tokenizer.json of Qwen2/Qwen2.5/Qwen3).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIALS = (PAD, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                    meta_tokens: tuple[str, ...] = (META_OPEN, META_CLOSE, CALC_OPEN, CALC_CLOSE)
                    ) -> "PreTrainedTokenizerFast":
    """Train on `texts` (deterministic for the same texts in the same order). Merges stop early when the
    alphabet of the world allows no more; the vocabulary may end below vocab_size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # the meta tags are kept out of training (they are added whole below), so no merge learns their pieces
    tags = list(meta_tokens)
    roles = ["user\nassistant\n"] * 2  # the chat template's own words, so they merge like the world's
    clean = (_without(t, tags) for t in [*texts, *roles])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(clean, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False, lstrip=False,
                               rstrip=False) for t in tags])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 30)


def _without(text: str, tags: list[str]) -> str:
    for tag in tags:
        text = text.replace(tag, "\n")
    return text


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", out_dir: Path) -> Path:
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


def load_tokenizer(path: Path) -> "PreTrainedTokenizerFast":
    """The tokenizer of a model directory: our own saved class for toy tokenizers, AutoTokenizer otherwise."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    saved_class = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))

