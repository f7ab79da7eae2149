"""Gold answers per benchmark source, normalised to the string the grader compares against (DESIGN §6, §8).

The grader wraps the gold in `\\boxed{}` itself, so a gold here is bare LaTeX/plain text: `18`, `\\frac{1}{2}`,
`(1,8,19), (2,7,13)`; a gold that `\\boxed{}` cannot hold (unbalanced braces) is refused. Beyond each source's
field rule, two repairs keep LaTeX golds parseable inside `\\boxed{}`:
a sentence-ending period is dropped and olympiadbench's bare `%` is escaped. Every rule refuses a gold it cannot
read (DataError naming source, row and field) rather than letting an empty or garbled gold grade every response
as wrong.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any

from infra.errors import DataError
from meta.grammar import last_boxed

SOURCES = ("gsm8k", "math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "arith")

_ID_FIELDS = ("id", "unique_id", "idx")
_GSM8K_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _where(source: str, row: dict, index: int | None) -> str:
    ident = next((f"{f}={row[f]!r}" for f in _ID_FIELDS if f in row), None)
    if ident is None:
        ident = f"index {index}" if index is not None else "(row has no id field)"
    return f"{source} row {ident}"


def _field(source: str, row: dict, index: int | None, name: str) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"{source} row index {index}: expected a JSON object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        raise DataError(f"{_where(source, row, index)}: field '{name}': missing")
    return row[name]


def _text(source: str, row: dict, index: int | None, name: str) -> str:
    value = _field(source, row, index, name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{_where(source, row, index)}: field '{name}': expected a non-empty string, got {value!r}")
    return value.strip()


def _fail(source: str, row: dict, index: int | None, name: str, why: str) -> DataError:
    return DataError(f"{_where(source, row, index)}: field '{name}': {why}")


def _gsm8k(row: dict, index: int | None) -> str:
    answer = _text("gsm8k", row, index, "answer")
    if "####" not in answer:
        raise _fail("gsm8k", row, index, "answer", "no '####' before the final answer")
    gold = re.sub(r"[,\s]", "", answer.rsplit("####", 1)[1])
    if not _GSM8K_NUMBER.fullmatch(gold):
        raise _fail("gsm8k", row, index, "answer", f"final answer after '####' is not a number: {gold!r}")
    return gold


def _end_of_sentence(latex: str) -> str:
    """Drop a sentence-ending period: math-verify parses `(-\\infty, 0) \\cup\\{1\\}.` as 0 (olympiadbench)."""
    return re.sub(r"(?<!\.)\.\s*$", "", latex).strip()


def _math500(row: dict, index: int | None) -> str:
    gold = _end_of_sentence(_text("math500", row, index, "answer"))
    if not gold:
        raise _fail("math500", row, index, "answer", "nothing left after the sentence punctuation")
    return gold


def _aime(source: str, row: dict, index: int | None) -> str:
    value = _field(source, row, index, "answer")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"\s*-?\d+\s*", str(value)):
        raise _fail(source, row, index, "answer", f"expected an integer, got {value!r}")
    return str(int(value))  # "025" -> "25"


def _aime24(row: dict, index: int | None) -> str:
    return _aime("aime24", row, index)


def _aime25(row: dict, index: int | None) -> str:
    return _aime("aime25", row, index)


def _amc23(row: dict, index: int | None) -> str:
    value = _field("amc23", row, index, "answer")
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise _fail("amc23", row, index, "answer", f"expected a finite number, got {value!r}")
    if number.is_integer():
        return str(int(number))  # 27.0 -> "27"
    return format(Decimal(repr(number)), "f")  # positional, never "1e-05"


def _minerva(row: dict, index: int | None) -> str:
    solution = _text("minerva_math", row, index, "solution")
    boxed = last_boxed(solution)
    if boxed is None or not boxed.strip():
        raise _fail("minerva_math", row, index, "solution", "no non-empty brace-balanced \\boxed{} in the solution")
    return _end_of_sentence(boxed)


def _olympiad(row: dict, index: int | None) -> str:
    answers = _field("olympiadbench", row, index, "final_answer")
    if not isinstance(answers, list) or not answers:
        raise _fail("olympiadbench", row, index, "final_answer", f"expected a non-empty list, got {answers!r}")
    parts = []
    for i, answer in enumerate(answers):
        # A bare % is a LaTeX comment: inside \boxed{} it would swallow the closing brace ("62.5%" -> "62.5\%").
        part = re.sub(r"(?<!\\)%", r"\\%", answer.replace("$", "")) if isinstance(answer, str) else ""
        part = _end_of_sentence(part)
        if not part:
            raise _fail("olympiadbench", row, index, f"final_answer[{i}]", f"expected a non-empty string, got {answer!r}")
        parts.append(part)
    # Several answers become one comma list, which math-verify reads as a set/tuple on both sides.
    return ", ".join(parts)


def _arith(row: dict, index: int | None) -> str:
    value = _field("arith", row, index, "answer")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
        raise _fail("arith", row, index, "answer", f"expected a non-empty string or integer, got {value!r}")
    return str(value)


# The field each rule reads the gold from (named when the gold cannot be boxed).
_GOLD_FIELD = {"minerva_math": "solution", "olympiadbench": "final_answer"}

_RULES = {
    "gsm8k": _gsm8k,
    "math500": _math500,
    "aime24": _aime24,
    "aime25": _aime25,
    "amc23": _amc23,
    "minerva_math": _minerva,
    "olympiadbench": _olympiad,
    "arith": _arith,
}


def extract_gold(source: str, row: dict, *, index: int | None = None) -> str:
    """The gold answer of one raw row of `source` (see SOURCES); `index` only names the row in errors."""
    rule = _RULES.get(source)
    if rule is None:
        raise DataError(f"unknown gold source '{source}' (row {index if index is not None else '?'}); "
                        f"known: {', '.join(SOURCES)}")
    gold = rule(row, index)
    if last_boxed(f"\\boxed{{{gold}}}") != gold:  # the grader compares against \boxed{gold}
        raise _fail(source, row, index, _GOLD_FIELD.get(source, "answer"),
                    f"gold {gold!r} has unbalanced braces: \\boxed{{}} cannot hold it")
    return gold


def equivalent_renderings(gold: str) -> list[tuple[str, str]]:
    """Two (name, LaTeX) renderings that must grade equal to `gold`: grader agreement checks (tests, bench)."""
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        second = ("thousands separator", f"{n:,}") if abs(n) >= 1000 else ("assignment", f"x = {n}")
        return [("trailing .0", f"{gold}.0"), second]
    if re.fullmatch(r"-?\d+\.\d+", gold):
        f = Fraction(Decimal(gold))
        return [("trailing zero", gold + "0"),
                ("exact fraction", f"{'-' if f < 0 else ''}\\frac{{{abs(f.numerator)}}}{{{f.denominator}}}")]
    m = re.fullmatch(r"\\text\{([^{}]*)\}", gold)
    if m:
        return [("mathrm", f"\\mathrm{{{m.group(1)}}}"), ("textbf", f"\\textbf{{{m.group(1)}}}")]
    out = [("displaystyle", "\\displaystyle " + gold)]
    balanced_parens = "(" in gold and gold.count("(") == gold.count(")") and not re.search(r"[\[\]]|\\left", gold)
    if "\\frac" in gold:
        out.append(("dfrac", gold.replace("\\frac", "\\dfrac")))
    elif balanced_parens:
        out.append(("left/right", gold.replace("(", "\\left(").replace(")", "\\right)")))
    elif not re.search(r"\\text|\\mathrm|,", gold):
        out.append(("spaced operators", re.sub(r"\s*([+=])\s*", r" \1 ", gold)))
    else:
        out.append(("text units", gold + "\\ \\text{units}"))
    return out
