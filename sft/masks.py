"""THE loss-mask rule, shared by both twins and every trainer (base model, SFT arms).

Render the whole chat with the tokenizer's template as text, tokenise it once with character offsets, and train
exactly the tokens that lie inside [start of the trained part, end of the final assistant turn's end-of-turn
token]. The trained part starts after the prompt and after `wrong_prefix` (a slipped or given prefix the model
must not learn to write). Environment output (meta.grammar.env_char_spans: a tool's value after the marker the
model wrote, up to and including the close marker) is never trained: the model learns to call the tool and to use
its value, never to write it. Pieces are never tokenised separately, so the ids are the ids the model sees at
generation time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from infra.errors import DataError
from meta.grammar import env_char_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

IGNORE = -100  # label of an untrained position (torch's cross_entropy ignore_index)


def _trained_span(tokenizer: "PreTrainedTokenizerFast", messages: list[dict[str, str]],
                  wrong_prefix: str | None) -> tuple[str, int, int]:
    """(rendered text, first trained char, end of trained chars): after the prompt and the wrong prefix, up to
    and including the end-of-turn token that closes the assistant's content."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    content = messages[-1]["content"]
    if not text.startswith(prompt):
        raise DataError("chat template: the rendered conversation does not start with its rendered prompt")
    content_at = text.find(content, len(prompt))
    eos = tokenizer.eos_token
    end = text.find(eos, content_at + len(content)) if content_at >= 0 else -1
    if content_at < 0 or end < 0:
        raise DataError("chat template: the assistant content (followed by the eos token) is not in the rendering")
    # the assistant header the template adds is never trained, with or without a wrong prefix
    return text, content_at + len(wrong_prefix or ""), end + len(eos)


def _labels(ids: list[int], offsets: list[tuple[int, int]], start: int, end: int,
            env: list[tuple[int, int]] = ()) -> list[int]:
    # a token is trained only if all its characters are; one that straddles a boundary is masked, as is one that
    # touches environment output
    return [t if start <= a and b <= end and b > a and not any(a < e and s < b for s, e in env) else IGNORE
            for t, (a, b) in zip(ids, offsets)]


def loss_mask(tokenizer: "PreTrainedTokenizerFast", messages: list[dict[str, str]], wrong_prefix: str | None,
              max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are IGNORE (-100) on the prompt, on the wrong prefix and
    after the assistant's end-of-turn token. Raises DataError when it is longer than max_length."""
    return encode_rows(tokenizer, [{"id": "row", "messages": messages, "wrong_prefix": wrong_prefix}],
                       max_length)[0]


def encode_rows(tokenizer: "PreTrainedTokenizerFast", rows: list[dict[str, Any]], max_length: int,
                where: str = "rows") -> list[tuple[list[int], list[int]]]:
    """`loss_mask` for many rows with one batched tokenizer call."""
    spans = []
    for i, row in enumerate(rows):
        try:
            spans.append(_trained_span(tokenizer, row["messages"], row.get("wrong_prefix")))
        except DataError as exc:
            raise DataError(f"{where}: row {i} (id {row.get('id')!r}): {exc}") from None
    enc = tokenizer([s[0] for s in spans], return_offsets_mapping=True, add_special_tokens=False)
    out = []
    for i, (row, (_, start, end)) in enumerate(zip(rows, spans)):
        ids = enc["input_ids"][i]
        if len(ids) > max_length:
            raise DataError(f"{where}: row {i} (id {row.get('id')!r}): {len(ids)} tokens > max_length "
                            f"{max_length}; raise the max_length or shorten the row")
        labels = _labels(ids, enc["offset_mapping"][i], start, end, env_char_spans(spans[i][0]))
        if all(t == IGNORE for t in labels):
            raise DataError(f"{where}: row {i} (id {row.get('id')!r}): no token left to train after masking")
        out.append((ids, labels))
    return out
