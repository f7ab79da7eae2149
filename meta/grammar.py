"""The meta-block grammar (DESIGN §7): closed blocks, format classes, cue categories, stated confidence.

Only closed blocks count: `<|meta|>` … `<|/meta|>` with no other tag between them. Confidence and the decision
are parsed inside a closed block only. Character offsets are kept so that loss masks and token regions can be
derived from the text without re-tokenising pieces.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

META_OPEN = "<|meta|>"
META_CLOSE = "<|/meta|>"
# The environment's tool markers (evals/tools.py): inside a block the model writes a check and CALC_OPEN, generation
# pauses, the environment appends the exact value and CALC_CLOSE, the model goes on. Everything after CALC_OPEN up to
# and including CALC_CLOSE is environment output (never trained, never in a log-prob ratio). Ordinary added tokens
# like the meta tags, in every arm's tokenizer; to find_blocks they are block content.
CALC_OPEN = "<|calc|>"
CALC_CLOSE = "<|/calc|>"

FormatClass = Literal["none", "wellformed", "drift", "truncation", "discard"]

CUES: dict[str, tuple[str, ...]] = {
    "verify": ("verify", "verified", "check", "checking", "checked", "recheck", "recompute", "confirm",
               "confirmed", "double-check"),
    "redirect": ("redirect", "wait", "instead", "redo", "fix", "fixed", "correction", "rewrite", "restart"),
    "diagnosis": ("mistake", "wrong", "error", "slip", "sign", "precedence", "dropped", "missed", "forgot",
                  "because"),
    "uncertainty": ("unsure", "maybe", "perhaps", "might", "uncertain", "probably", "likely", "doubt"),
}
_CUE_RE = {cat: re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.IGNORECASE)
           for cat, words in CUES.items()}
_CONFIDENCE_RE = re.compile(r"(?<![\w])confidence\s*[:=]?\s*(\d{1,3}(?:\.\d+)?)(?!\.?\d)(?:\s*(%))?", re.IGNORECASE)
_BRACELESS_RE = re.compile(r"[^\s${}]+")
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_DECISION_RE = re.compile(r"(?<![\w])decision\s*:\s*(redirect|verify)(?![\w])", re.IGNORECASE)


@dataclass(frozen=True)
class MetaBlock:
    """A closed block. start/end span the tags too; content_start/content_end only the inside."""

    start: int
    end: int
    content_start: int
    content_end: int
    content: str
    confidence: float | None = None
    confidence_span: tuple[int, int] | None = None  # absolute offsets of the confidence statement
    decision: str | None = None
    categories: frozenset[str] = field(default_factory=frozenset)


def _tags(text: str, open_tag: str, close_tag: str) -> list[tuple[int, str]]:
    pattern = re.compile(re.escape(open_tag) + "|" + re.escape(close_tag))
    return [(m.start(), "open" if m.group() == open_tag else "close") for m in pattern.finditer(text)]


def cue_categories(content: str) -> frozenset[str]:
    return frozenset(cat for cat, rx in _CUE_RE.items() if rx.search(content))


def parse_confidence(content: str) -> tuple[float | None, tuple[int, int] | None]:
    """The last stated confidence in a block's content: 0.8, 80 %, 80 → 0.8. Out of range → None."""
    matches = list(_CONFIDENCE_RE.finditer(content))
    if not matches:
        return None, None
    m = matches[-1]
    value = float(m.group(1))
    if m.group(2) or value > 1:
        value /= 100
    if not 0 <= value <= 1:
        return None, None
    return value, (m.start(), m.end())


def stated_confidence(blocks: Sequence[MetaBlock]) -> float | None:
    """THE stated confidence of a response (evaluation's ECE/Brier and the calibration head both use it): the
    confidence of the LAST closed block that states one (within a block, its last statement, parse_confidence);
    None when no block states one. The last, not the first: it is the belief closest to the final answer, so a
    block that redirects after a slip states its confidence in the corrected answer, which is the answer graded."""
    return next((b.confidence for b in reversed(blocks) if b.confidence is not None), None)


def find_blocks(text: str, open_tag: str = META_OPEN, close_tag: str = META_CLOSE) -> list[MetaBlock]:
    """Closed blocks in order. An open tag followed by another open tag before a close is not a block."""
    blocks = []
    pending: int | None = None
    for pos, kind in _tags(text, open_tag, close_tag):
        if kind == "open":
            pending = pos
        elif pending is not None:
            c0, c1 = pending + len(open_tag), pos
            content = text[c0:c1]
            conf, span = parse_confidence(content)
            decision = _DECISION_RE.search(content)
            blocks.append(MetaBlock(
                start=pending, end=pos + len(close_tag), content_start=c0, content_end=c1, content=content,
                confidence=conf, confidence_span=(c0 + span[0], c0 + span[1]) if span else None,
                decision=decision.group(1).lower() if decision else None, categories=cue_categories(content)))
            pending = None
    return blocks


def format_class(text: str, truncated: bool = False, max_blocks: int = 1, open_tag: str = META_OPEN,
                 close_tag: str = META_CLOSE) -> FormatClass:
    """none · wellformed (≤ max_blocks closed, un-nested blocks) · drift (one open, never closed) ·
    truncation (open, cut at the length limit) · discard (anything else)."""
    tags = _tags(text, open_tag, close_tag)
    if not tags:
        return "none"
    kinds = [k for _, k in tags]
    n_open = kinds.count("open")
    alternating = all(k == ("open" if i % 2 == 0 else "close") for i, k in enumerate(kinds))
    if alternating and len(kinds) % 2 == 0 and n_open <= max_blocks:
        return "wellformed"
    if alternating and len(kinds) % 2 == 1 and n_open <= max_blocks:
        return "truncation" if truncated else "drift"
    return "discard"


def split_first_block(text: str, open_tag: str = META_OPEN, close_tag: str = META_CLOSE
                      ) -> tuple[str, str, str] | None:
    """y = p ∘ m ∘ c around the first closed block (m includes its tags); None when there is none."""
    blocks = find_blocks(text, open_tag, close_tag)
    if not blocks:
        return None
    b = blocks[0]
    return text[:b.start], text[b.start:b.end], text[b.end:]


def strip_meta(text: str, open_tag: str = META_OPEN, close_tag: str = META_CLOSE) -> str:
    """The no-meta twin: remove whole closed blocks (tags included), then stray tags; nothing else changes."""
    out, last = [], 0
    for b in find_blocks(text, open_tag, close_tag):
        out.append(text[last:b.start])
        last = b.end
    out.append(text[last:])
    return _remove_tags("".join(out), (open_tag, close_tag))


def _remove_tags(text: str, tags: tuple[str, ...]) -> str:
    """Remove every tag, including tags that only form once another is removed ("<|me<|/meta|>ta|>"): one
    replace pass would leave those. A stack keeps it linear even for deeply nested fragments."""
    if not any(t in text for t in tags):
        return text
    ends = {t[-1] for t in tags}
    buf: list[str] = []
    for ch in text:
        buf.append(ch)
        if ch in ends:
            for t in tags:
                if len(buf) >= len(t) and "".join(buf[-len(t):]) == t:
                    del buf[-len(t):]
                    break
    return "".join(buf)


def env_char_spans(text: str, open_marker: str = CALC_OPEN, close_marker: str = CALC_CLOSE
                   ) -> list[tuple[int, int]]:
    """[start, end) character spans of environment output in a text: after each `open_marker` (which the model
    writes) up to and including the next `close_marker` (which the environment writes), or to the end of the text
    when it never closes. 'check 44-7<|calc|>=37<|/calc|>, same' → the span of '=37<|/calc|>'."""
    spans, at = [], 0
    while (o := text.find(open_marker, at)) >= 0:
        start = o + len(open_marker)
        c = text.find(close_marker, start)
        end = len(text) if c < 0 else c + len(close_marker)
        spans.append((start, end))
        at = end
    return spans


def has_tags(text: str, open_tag: str = META_OPEN, close_tag: str = META_CLOSE) -> bool:
    return open_tag in text or close_tag in text


Region = Literal["answer", "meta", "confidence", "format"]


def char_regions(text: str, open_tag: str = META_OPEN, close_tag: str = META_CLOSE
                 ) -> list[tuple[int, int, Region]]:
    """Partition the text into regions for advantage routing: tags and stray tags → format, a block's
    confidence statement → confidence, the rest of a closed block → meta, everything else → answer."""
    spans: list[tuple[int, int, Region]] = []
    blocks = find_blocks(text, open_tag, close_tag)
    for b in blocks:
        spans.append((b.start, b.content_start, "format"))
        if b.confidence_span:
            spans += [(b.content_start, b.confidence_span[0], "meta"), (*b.confidence_span, "confidence"),
                      (b.confidence_span[1], b.content_end, "meta")]
        else:
            spans.append((b.content_start, b.content_end, "meta"))
        spans.append((b.content_end, b.end, "format"))
    # A block's content holds no tag, so the only tags inside blocks are their own (a set keeps this linear).
    block_tags = {b.start for b in blocks} | {b.content_end for b in blocks}
    for pos, kind in _tags(text, open_tag, close_tag):
        tag_len = len(open_tag if kind == "open" else close_tag)
        if pos not in block_tags:
            spans.append((pos, pos + tag_len, "format"))
    spans.sort()
    out: list[tuple[int, int, Region]] = []
    cursor = 0
    for s, e, region in spans:
        if s > cursor:
            out.append((cursor, s, "answer"))
        if e > s:
            out.append((s, e, region))
        cursor = max(cursor, e)
    if cursor < len(text):
        out.append((cursor, len(text), "answer"))
    return out


BOX_COMMANDS = ("boxed", "fbox")


@dataclass(frozen=True)
class Boxes:
    """The answer boxes of a text. contents: every complete box, in order of its opening; spans: each one's
    (start, end) character offsets, command included; truncated: the LAST box opening never closes (the text was
    cut, or abandoned, inside its final answer)."""

    contents: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    truncated: bool


def find_boxes(text: str, commands: tuple[str, ...] = BOX_COMMANDS, braceless: bool = True) -> Boxes:
    """Every `\\boxed{...}` (and the other `commands`) of `text`, brace-balanced, a backslash escaping the next
    character. With `braceless`, `\\boxed 5` is the box of the next token (up to whitespace or `$`, trailing
    sentence punctuation dropped), as verl's and Qwen2.5-Math's extractors read it. A box opening with no content
    (`\\boxed{` unclosed, `\\boxed` at the end) is incomplete; when it is the last opening, `truncated` is True.
    Linear in len(text)."""
    opener = re.compile(r"\\(?:" + "|".join(map(re.escape, commands)) + r")(?![a-zA-Z])\s*")
    opens = list(opener.finditer(text))
    if not opens:
        return Boxes((), (), False)
    # Match all braces in one pass: rescanning from each unclosed \boxed{ to the end of the text was quadratic.
    closes: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            closes[stack.pop()] = m.start()
    contents: list[str] = []
    spans: list[tuple[int, int]] = []
    complete = True  # of the last box opening seen
    for m in opens:
        o = m.end()
        if o < len(text) and text[o] != "{" and not braceless:
            continue  # `\\boxed 5` is not a box without `braceless`
        complete = False
        if o < len(text) and text[o] == "{":
            if o in closes:
                contents.append(text[o + 1:closes[o]])
                spans.append((m.start(), closes[o] + 1))
                complete = True
        elif braceless:
            token = _BRACELESS_RE.match(text, o)
            value = token.group().rstrip(".,;:!?") if token else ""
            if value:
                contents.append(value)
                spans.append((m.start(), o + len(value)))
                complete = True
    return Boxes(tuple(contents), tuple(spans), not complete)


def last_boxed(text: str, commands: tuple[str, ...] = BOX_COMMANDS, braceless: bool = True) -> str | None:
    """Content of the last box (find_boxes); None if there is none or the last box never closes."""
    boxes = find_boxes(text, commands, braceless)
    return None if boxes.truncated or not boxes.contents else boxes.contents[-1]
