"""Decoys (DESIGN §6): a deterministic near-miss of a gold answer, for the belief and gm signals.

Candidates come from fixed rules (integers ±1 ±2 ±5 ±10, decimals ±0.1 ±0.5 ±1 on the last number, a number
written with thousands separators moved as one number and written back with the same separator; drop π; unwrap
√; swap a fraction or bump its numerator; flip the sign), are ordered by an RNG seeded from a sha256 of the gold
(stable across processes and PYTHONHASHSEED), and the first that differs from the gold as a string, as a number
and under the grader is the decoy. Text answers, which those rules cannot move, fall back to an opposite word
(yes/no, even/odd, east/west, ...) or the last letter of the last word moved on by one (`Evelyn` → `Evelyo`,
`(C)` → `(D)`); fallbacks come after every rule candidate, so they are used only when none survives.

With the scorer's tokenizer, candidates whose `\\boxed{candidate}` has the token length of `\\boxed{gold}` go
first (in the same RNG order), so PMI-shift and gm, which skip pairs of different token lengths, can score the
pair whenever such a candidate exists; `decoy_facts` counts the share they can score.

"Under the grader" is the grader's own call: a response boxing the decoy must grade incorrect against the gold,
so a candidate the grader cannot settle (timeout, error) never becomes a decoy. Golds that are plain integers of
at most 15 digits skip the grader: it compares two exact integers exactly, and every candidate of such a gold is
an integer of a different value.
"""
from __future__ import annotations

import hashlib
import random
import re
import threading
from collections import OrderedDict
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from infra.hashing import hash_json

if TYPE_CHECKING:
    from rewards.grader import Grader

INT_OFFSETS = (1, 2, 5, 10)
DECIMAL_OFFSETS = (Decimal("0.1"), Decimal("0.5"), Decimal("1"))

_FAST_INT = re.compile(r"-?\d{1,15}")
# A number with thousands separators (10,\!080 · 1{,}000 · 1\,000 · 1,000), not part of a longer number or name.
_GROUPED = re.compile(r"(?<![\w.\\])\d{1,3}(?:(,\\!|\{,\}|\\,|,)\d{3})(?:(?:,\\!|\{,\}|\\,|,)\d{3})*(?![\w.])")
_SIGNED_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# A numeric literal that is not part of a name, a command or a longer number.
_LITERAL = re.compile(r"(?<![\w.\\])\d+(?:\.\d+)?(?![\w.])")
_FRAC = re.compile(r"\\([dt]?frac)\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SLASH = re.compile(r"(?<![\w.])(\d+)\s*/\s*(\d+)(?![\w.])")
_PI = re.compile(r"\\pi(?![a-zA-Z])")
_SQRT = re.compile(r"\\sqrt\s*(?:\{([^{}]*)\}|(\d+|[a-zA-Z]))")
# Answers whose sign cannot be flipped by a leading minus: lists, intervals, relations, sets, words.
_NO_SIGN_FLIP = re.compile(r",|<|>|\\le|\\ge|\\ne|\\in\b|\\cup|\\cap|\\text|\\mathrm|\\infty|\\pm|\\mp")
_WORDS_ONLY = re.compile(r"[A-Za-z]{2,}(?:\s+[A-Za-z]+)*")  # a word answer has no sign: Yes, not -Yes
_GRADE_FIRST = 2  # candidates per gold in the first grading round; most golds need no second round
_MEMO_ENTRIES = 65536


def _seed(gold: str) -> int:
    return int.from_bytes(hashlib.sha256(gold.encode()).digest()[:8], "big")


def _multiplies_left(text: str, start: int) -> bool:
    """Whether what precedes `start` would multiply a factor placed there (2\\pi, x\\sqrt{3}, )\\pi)."""
    before = text[:start].rstrip()
    return bool(before) and (before[-1].isalnum() or before[-1] in ")}]")


def _grouped(value: int, sep: str) -> str:
    return f"{value:,}".replace(",", sep)


def _number_moves(gold: str) -> list[str]:
    grouped = list(_GROUPED.finditer(gold))
    literals = list(_LITERAL.finditer(gold))
    if grouped and (not literals or grouped[-1].end() >= literals[-1].end()):
        # 10,\!080 moves as 10080 and is written back as 10,\!081: never a malformed 10,\!82
        m = grouped[-1]
        sep, head = m.group(1), gold[:m.start()].strip()
        whole = head in ("", "-") and not gold[m.end():].strip()
        value = int(re.sub(r"\D", "", m.group())) * (-1 if whole and head == "-" else 1)
        moved = [value + sign * d for d in INT_OFFSETS for sign in (1, -1)]
        start = 0 if whole else m.start()
        return [gold[:start] + ("-" if v < 0 else "") + _grouped(abs(v), sep) + gold[m.end():]
                for v in moved if whole or v > 0]
    if _SIGNED_NUMBER.fullmatch(gold):  # the whole answer is a number: move it, sign included
        start, end, literal, whole = 0, len(gold), gold, True
    else:
        if not literals:
            return []
        m = literals[-1]
        start, end, literal, whole = m.start(), m.end(), m.group(), False
    # A number inside an expression stays positive: no "\frac{1}{0}" or "x^{-3}"; the sign rule handles signs.
    if "." in literal:
        value = Decimal(literal)
        moved = [value + sign * d for d in DECIMAL_OFFSETS for sign in (1, -1)]
        return [gold[:start] + str(v) + gold[end:] for v in moved if whole or v > 0]
    digits = literal.lstrip("-")
    width = len(digits) if digits.startswith("0") and len(digits) > 1 else 0  # 007 moves to 008, not 8
    value = int(literal)
    moved = [value + sign * d for d in INT_OFFSETS for sign in (1, -1)]
    return [gold[:start] + (str(v).zfill(width) if v >= 0 else str(v)) + gold[end:] for v in moved if whole or v > 0]


def _fraction_moves(gold: str) -> list[str]:
    out = []
    fracs = list(_FRAC.finditer(gold))
    if fracs:
        m = fracs[-1]
        cmd, num, den = m.groups()
        out.append(f"{gold[:m.start()]}\\{cmd}{{{den}}}{{{num}}}{gold[m.end():]}")
        if num.strip().isdigit():
            out.append(f"{gold[:m.start()]}\\{cmd}{{{int(num) + 1}}}{{{den}}}{gold[m.end():]}")
    slashes = list(_SLASH.finditer(gold))
    if slashes:
        m = slashes[-1]
        num, den = m.groups()
        out.append(f"{gold[:m.start()]}{den}/{num}{gold[m.end():]}")
        out.append(f"{gold[:m.start()]}{int(num) + 1}/{den}{gold[m.end():]}")
    return out


def _drop_pi(gold: str) -> list[str]:
    if not _PI.search(gold):
        return []
    # 2\pi -> 2, \frac{\pi}{4} -> \frac{1}{4}, \pi -> 1
    return [_PI.sub(lambda m: "" if _multiplies_left(gold, m.start()) else "1", gold).strip()]


def _unwrap_sqrt(gold: str) -> list[str]:
    if not _SQRT.search(gold):
        return []

    def unwrap(m: re.Match) -> str:
        inner = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        inner = inner if inner.isalnum() else f"({inner})"
        return f"\\cdot {inner}" if _multiplies_left(gold, m.start()) else inner

    return [_SQRT.sub(unwrap, gold)]


def _flip_sign(gold: str) -> list[str]:
    if _NO_SIGN_FLIP.search(gold) or _WORDS_ONLY.fullmatch(gold):
        return []
    head, eq, rhs = gold.rpartition("=")  # x=3 -> x=-3
    rhs = rhs.strip()
    if not rhs:
        return []
    flipped = rhs[1:].lstrip() if rhs.startswith("-") else f"-{rhs}"
    return [f"{head}{eq}{flipped}"] if flipped else []


_OPPOSITES = dict(pair for a, b in (
    ("yes", "no"), ("true", "false"), ("even", "odd"), ("east", "west"), ("north", "south"), ("left", "right"),
    ("increasing", "decreasing"), ("maximum", "minimum"), ("max", "min"), ("positive", "negative"),
    ("always", "never"), ("possible", "impossible"), ("finite", "infinite"), ("convergent", "divergent"),
    ("acute", "obtuse"), ("inside", "outside"), ("above", "below")) for pair in ((a, b), (b, a)))
# A word outside LaTeX commands: `Evelyn` in \text{Evelyn}, never `text`.
_WORD = re.compile(r"(?<![\\a-zA-Z])[A-Za-z]+")


def _same_case(word: str, like: str) -> str:
    return word.upper() if like.isupper() and len(like) > 1 else word.capitalize() if like[:1].isupper() else word


def text_moves(gold: str) -> list[str]:
    """Fallback near-misses of an answer with words: the last word's opposite, then the last word with its last
    letter moved on by one (z → a, case kept)."""
    words = list(_WORD.finditer(gold))
    if not words:
        return []
    m = words[-1]
    word, out = m.group(), []
    if word.lower() in _OPPOSITES:
        out.append(_same_case(_OPPOSITES[word.lower()], word))
    last = word[-1]
    nxt = chr((ord(last.lower()) - ord("a") + 1) % 26 + ord("a"))
    out.append(word[:-1] + (nxt.upper() if last.isupper() else nxt))
    return [gold[:m.start()] + w + gold[m.end():] for w in out]


def candidates(gold: str) -> list[str]:
    """Every near-miss of `gold` the rules produce, in rule order, deduplicated; not yet filtered. Text
    fallbacks are not among them (`text_moves`)."""
    g = gold.strip()
    raw = _number_moves(g) + _fraction_moves(g) + _drop_pi(g) + _unwrap_sqrt(g) + _flip_sign(g)
    return list(dict.fromkeys(c.strip() for c in raw if c.strip()))


def as_number(text: str) -> Fraction | None:
    """The exact value of a plain number, a/b or \\frac{a}{b} (optionally signed); None for anything else."""
    s = re.sub(r"\s+", "", text)
    sign = -1 if s.startswith("-") else 1
    s = s[1:] if s[:1] in "-+" else s
    m = re.fullmatch(r"\\[dt]?frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}|(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)
    if m:
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        return sign * Fraction(num) / Fraction(den) if Fraction(den) else None
    return sign * Fraction(s) if re.fullmatch(r"\d+(?:\.\d+)?", s) else None


def _differs(candidate: str, gold: str) -> bool:
    """Differs from gold as a string (ignoring whitespace) and, where both are plain numbers, as a number."""
    if re.sub(r"\s+", "", candidate) == re.sub(r"\s+", "", gold):
        return False
    a, b = as_number(candidate), as_number(gold)
    return a is None or b is None or a != b


def ordered_candidates(gold: str, tokenizer: Any = None) -> list[str]:
    """The candidates that pass the string and number filters, in this gold's RNG order (first = preferred), then
    the text fallbacks in rule order (the opposite word first). With `tokenizer`, the candidates whose `\\boxed{}` has the gold's token
    length go first, each group keeping that order."""
    g = gold.strip()
    rng = random.Random(_seed(gold))
    pool = [c for c in candidates(g) if _differs(c, g)]
    rng.shuffle(pool)
    pool += [c for c in dict.fromkeys(text_moves(g)) if c not in pool and _differs(c, g)]  # opposite first
    if tokenizer is not None:
        n = _boxed_length(tokenizer, g)
        pool.sort(key=lambda c: _boxed_length(tokenizer, c) != n)  # stable: RNG order within each group
    return pool


def _boxed_length(tokenizer: Any, answer: str) -> int:
    from rewards.scorer import encode

    return len(encode(tokenizer, "\\boxed{" + answer + "}"))


_PROBE = "\\boxed{-0123456789.5} \\frac{1}{2}\\pi \\sqrt{x} \\text{Evelyn} (A), 10,\\!080"


def _tokenizer_key(tokenizer: Any) -> str | None:
    """Tells tokenizers apart for the memo: their ids of a probe text and their vocabulary size."""
    if tokenizer is None:
        return None
    from rewards.scorer import encode

    return hash_json([encode(tokenizer, _PROBE), len(tokenizer) if hasattr(tokenizer, "__len__") else None])


_MEMO: OrderedDict[tuple[str, str, str | None], str | None] = OrderedDict()  # (gold, grader, tokenizer) -> decoy
_MEMO_LOCK = threading.Lock()


def make_decoys(golds: list[str], grader: Grader | None = None, tokenizer: Any = None) -> list[str | None]:
    """make_decoy for many golds with one grader call per round (RL batches: one call per step)."""
    if grader is None:
        from infra.spec import GraderSpec
        from rewards.grader import get_grader

        grader = get_grader(GraderSpec())
    config = hash_json(grader.cfg.model_dump(mode="json"))
    tok = _tokenizer_key(tokenizer)
    out: dict[str, str | None] = {}
    pending: dict[str, list[str]] = {}
    for gold in dict.fromkeys(golds):
        with _MEMO_LOCK:
            if (gold, config, tok) in _MEMO:
                _MEMO.move_to_end((gold, config, tok))
                out[gold] = _MEMO[(gold, config, tok)]
                continue
        order = ordered_candidates(gold, tokenizer)
        if _FAST_INT.fullmatch(gold.strip()):
            out[gold] = order[0] if order else None  # integer vs integer: the number check is the grader's check
        else:
            pending[gold] = order
    for lo, hi in ((0, _GRADE_FIRST), (_GRADE_FIRST, None)):
        pairs = [(gold, c) for gold, order in pending.items() if gold not in out for c in order[lo:hi]]
        if not pairs:
            break
        grades = grader.grade([f"\\boxed{{{c}}}" for _, c in pairs], [gold for gold, _ in pairs])
        survivors: dict[str, str] = {}
        for (gold, c), grade in zip(pairs, grades):
            # extracted == c: the grader compared the whole candidate (unbalanced braces would hide it)
            settled_wrong = not (grade.correct or grade.timed_out or grade.error) and grade.extracted == c
            if settled_wrong and gold not in survivors:
                survivors[gold] = c  # pairs are in RNG order per gold, so this is the first survivor
        out.update(survivors)
    for gold in pending:
        out.setdefault(gold, None)
    with _MEMO_LOCK:
        for gold, decoy in out.items():
            _MEMO[(gold, config, tok)] = decoy
            if len(_MEMO) > _MEMO_ENTRIES:
                _MEMO.popitem(last=False)
    return [out[gold] for gold in golds]


def make_decoy(gold: str, grader: Grader | None = None, tokenizer: Any = None) -> str | None:
    """The decoy of `gold`, or None when no candidate survives (callers skip the item). Same gold, same decoy.

    `grader` defaults to the shared grader of the default GraderSpec; pass the arm's grader to filter under its
    exact config, and the scorer's tokenizer to prefer a decoy of the gold's token length."""
    return make_decoys([gold], grader, tokenizer)[0]


def decoy_facts(golds: list[str], decoys: list[str | None], tokenizer: Any) -> dict[str, int | float | None]:
    """Recorded facts of a problem set's decoys (one gold per problem): how many have none, and how many gold/decoy
    pairs PMI-shift and gm can score (equal token length of `\\boxed{}` under `tokenizer`, some token differs).
    decoys/scorable_share = scorable / problems (None for no problems)."""
    from rewards.scorer import encode

    if len(golds) != len(decoys):
        raise ValueError(f"decoy_facts: {len(golds)} golds but {len(decoys)} decoys")
    scorable = 0
    for gold, decoy in zip(golds, decoys):
        if decoy is not None:
            g, d = encode(tokenizer, f"\\boxed{{{gold}}}"), encode(tokenizer, f"\\boxed{{{decoy}}}")
            scorable += len(g) == len(d) and g != d
    return {"decoys/problems": len(golds), "decoys/none": sum(d is None for d in decoys),
            "decoys/scorable": scorable, "decoys/scorable_share": scorable / len(golds) if golds else None}
