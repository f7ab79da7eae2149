"""The arith world: generated arithmetic with worked solutions, realistic slips and meta blocks.

Everything is a pure function of (ArithWorldSpec, sizes): each split draws from its own RNG stream, seeded by
a string, so the same spec gives byte-identical rows and resizing one split leaves the others unchanged.

Solution format (one line per reduction; the step *and* the rewritten remainder, which tiny models learn
better than the step alone):

    7-3*(2-5)          <- word problems only: the expression read from the text
    2-5=-3|7-3*-3
    3*-3=-9|7--9
    7--9=16|16
    \\boxed{16}

Negative numbers are written bare (7--9, 3*-3). Reduction order: innermost-leftmost bracket group, inside it
the first × or / else the first + or −; a group reduced to one number loses its brackets.

Why a block can help (measured with scripts/probe_world.py): a ~1M-parameter model gets single-digit facts
right ~99 % of the time but steps with a two-digit number 20–80 % wrong, mostly off by 1, 2 or 10. A check
recomputes a step from single-digit facts, column by column, and ends on the step itself
('check 44-7: 14-7=7, 4-1=3, so 44-7=37'): a form the model gets right more often than the step, ending on the
exact text the solution line starts with, so the line can copy the value. The base split teaches that check in
plain text (check drills, 'Is 44-7=36?'), as a real base model already knows how to verify arithmetic; meta SFT
teaches when to check and what to do with the result.

Meta blocks, one per response at most:
- verify: before the riskiest step, check it; the step line then writes the checked value;
- redirect: after a slipped step (a real wrong prefix, loss-masked), check it ('…, so 44-7=37, not 36, redo'),
  restate the expression it came from and redo the step, so every line follows from the line above it;
- SFT-2 blocks add 'confidence: X, decision: verify|redirect'.
- tool form (`tool_form`, the positive control of issue 14): a check's recomputation is replaced by a call of the
  environment's calculator, 'check 44-7<|calc|>=37<|/calc|>, not 36, redo', and every step line gets a pre-check
  of its own; the environment writes '=37<|/calc|>' (`arith_check`), the model writes the rest. Responses in tool
  form hold several blocks (format class 'discard' for a one-block format head).
A block starts a line and the next line follows its close tag directly, so `strip_meta` leaves a clean
solution with the same boxed answer. Blocks never hold the boxed answer.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from infra.errors import DataError
from meta.grammar import CALC_CLOSE, CALC_OPEN, META_CLOSE, META_OPEN, find_blocks

if TYPE_CHECKING:
    from infra.spec import ArithWorldSpec

Token = int | str  # numbers are ints; operators and brackets are one-character strings
OPS = "+-*/"
LIMIT = 99  # every operand, intermediate and answer stays within ±LIMIT
LEVELS = (1, 2, 3)  # training levels; HARD_LEVEL is the held-out harder band
HARD_LEVEL = 4
SOURCE = "arith"


# ---------------------------------------------------------------- expressions

DIGITS = "0123456789"  # ASCII only: str.isdigit() also takes '٣' and '³'


def parse(expr: str) -> list[Token]:
    """'7-3*-3' → [7, '-', 3, '*', -3]. A '-' is a sign when it starts the expression or follows an operator
    or '('. Raises ValueError on anything else (also a non-ASCII digit)."""
    out: list[Token] = []
    i = 0
    while i < len(expr):
        ch = expr[i]
        sign_ok = not out or (isinstance(out[-1], str) and out[-1] != ")")
        if ch in DIGITS or (ch == "-" and sign_ok and i + 1 < len(expr) and expr[i + 1] in DIGITS):
            j = i + 1
            while j < len(expr) and expr[j] in DIGITS:
                j += 1
            out.append(int(expr[i:j]))
            i = j
        elif ch in OPS + "()":
            out.append(ch)
            i += 1
        else:
            raise ValueError(f"unexpected character {ch!r} in {expr!r}")
    return out


def well_formed(tokens: list[Token]) -> bool:
    """Numbers and operators alternate, brackets balance and never enclose nothing."""
    depth, want_number = 0, True
    for t in tokens:
        if t == "(" and want_number:
            depth += 1
        elif t == ")" and not want_number and depth:
            depth -= 1
        elif isinstance(t, int) and want_number:
            want_number = False
        elif isinstance(t, str) and t in OPS and not want_number:
            want_number = True
        else:
            return False
    return depth == 0 and not want_number


def render(tokens: list[Token]) -> str:
    return "".join(str(t) for t in tokens)


def apply(a: int, op: str, b: int) -> int | None:
    """a op b as an int, None when not exact (division) or out of range."""
    if op == "+":
        v = a + b
    elif op == "-":
        v = a - b
    elif op == "*":
        v = a * b
    else:
        if b == 0 or a % b:
            return None
        v = a // b
    return v if abs(v) <= LIMIT else None


@dataclass(frozen=True)
class Step:
    """One reduction: a op b = value, at token index `at` (of the operator) of the expression `before`."""

    before: tuple[Token, ...]
    at: int
    a: int
    op: str
    b: int
    value: int
    after: tuple[Token, ...]

    @property
    def lhs(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def line(self) -> str:
        return f"{self.lhs}={self.value}|{render(list(self.after))}"


def _group(tokens: list[Token]) -> tuple[int, int]:
    """[lo, hi) of the innermost-leftmost bracket group's inside, or the whole expression."""
    opened = None
    for i, t in enumerate(tokens):
        if t == "(":
            opened = i
        elif t == ")":
            return opened + 1, i
    return 0, len(tokens)


def next_op(tokens: list[Token]) -> int | None:
    """Token index of the operator to reduce next, None if the expression is a single number."""
    lo, hi = _group(tokens)
    inner = range(lo + 1, hi, 2)
    for i in inner:
        if tokens[i] in "*/":
            return i
    for i in inner:
        if tokens[i] in "+-":
            return i
    return None


def reduce_at(tokens: list[Token], i: int, value: int) -> list[Token]:
    """Replace tokens[i-1:i+2] by value; drop the brackets around a lone number (every pair: '((1+2))' → 3)."""
    out = tokens[:i - 1] + [value] + tokens[i + 2:]
    j = i - 1
    while 0 < j < len(out) - 1 and out[j - 1] == "(" and out[j + 1] == ")":
        out = out[:j - 1] + [value] + out[j + 2:]
        j -= 1
    return out


def solve(tokens: list[Token]) -> list[Step] | None:
    """The worked steps, or None if some step is not exact or leaves the range."""
    steps = []
    while (i := next_op(tokens)) is not None:
        a, op, b = tokens[i - 1], tokens[i], tokens[i + 1]
        value = apply(a, op, b)
        if value is None:
            return None
        after = reduce_at(tokens, i, value)
        steps.append(Step(tuple(tokens), i, a, op, b, value, tuple(after)))
        tokens = after
    return steps


def _unwrap(tokens: list[Token]) -> list[Token]:
    """tokens with the brackets around every lone number dropped ('(5)*2' → 5*2), which next_op cannot reduce past."""
    out = list(tokens)
    i = 1
    while i < len(out) - 1:
        if out[i - 1] == "(" and isinstance(out[i], int) and out[i + 1] == ")":
            out[i - 1:i + 2] = [out[i]]
            i = max(i - 1, 1)
        else:
            i += 1
    return out


def evaluate(tokens: list[Token]) -> int | None:
    """The value of a well-formed expression with this world's reduction order, None when a step is not exact or
    leaves ±LIMIT."""
    tokens = _unwrap(tokens)
    steps = solve(tokens)
    if steps is None:
        return None
    if steps:
        return steps[-1].value
    return tokens[0] if len(tokens) == 1 and isinstance(tokens[0], int) else None


# ---------------------------------------------------------------- the nine domains

DOMAINS = ("addsub", "mul", "paren", "neg", "nest", "long", "twodigit", "div", "word")

# operators per level (1, 2, 3, hard band 4)
_N_OPS = {"addsub": (2, 3, 4, 5), "mul": (1, 2, 3, 4), "paren": (2, 2, 3, 4), "neg": (1, 2, 3, 4),
          "nest": (3, 3, 4, 5), "long": (4, 5, 5, 7), "twodigit": (1, 2, 2, 3), "div": (1, 2, 3, 4),
          "word": (2, 2, 3, 4)}


def _digit(rng: random.Random) -> int:
    return rng.randint(1, 9)


def _build(operands: list[int], ops: list[str], spans: Iterable[tuple[int, int]] = ()) -> list[Token]:
    """Tokens of operands joined by ops, with brackets around operand spans (lo, hi), inclusive."""
    spans = list(spans)
    toks: list[Token] = []
    for k, x in enumerate(operands):
        if k:
            toks.append(ops[k - 1])
        toks += ["("] * sum(lo == k for lo, _ in spans)
        toks.append(x)
        toks += [")"] * sum(hi == k for _, hi in spans)
    return toks


def _brackets_needed(toks: list[Token]) -> bool:
    """Each bracket pair changes the value (no decorative brackets)."""
    value = evaluate(toks)
    for k, t in enumerate(toks):
        if t == "(":
            depth, end = 0, k
            for end in range(k, len(toks)):
                depth += toks[end] == "("
                depth -= toks[end] == ")"
                if depth == 0:
                    break
            if evaluate(toks[:k] + toks[k + 1:end] + toks[end + 1:]) == value:
                return False
    return True


def _expr(rng: random.Random, domain: str, level: int) -> list[Token]:
    """One candidate expression (the caller rejects those that leave the range)."""
    n = _N_OPS[domain][level - 1]
    operands = [_digit(rng) for _ in range(n + 1)]
    if domain in ("addsub", "twodigit", "long"):
        ops = [rng.choice("+-") for _ in range(n)]
    else:
        ops = [rng.choice("+-*") for _ in range(n)]
    spans: list[tuple[int, int]] = []
    if domain == "mul" and "*" not in ops:
        ops[rng.randrange(n)] = "*"
    elif domain == "neg":
        for k in rng.sample(range(n + 1), rng.randint(1, 2)):
            operands[k] = -operands[k]
    elif domain == "twodigit":  # one two-digit operand; the hard band has two
        for k in rng.sample(range(n + 1), 2 if level == HARD_LEVEL else 1):
            operands[k] = rng.randint(10, 49)
    elif domain == "paren":
        lo = rng.randint(0, n - 1)
        hi = rng.randint(lo + 1, min(n, lo + 2))
        spans = [(lo, hi)] if (lo, hi) != (0, n) else [(lo, hi - 1)]
    elif domain == "nest":
        lo = rng.randint(0, n - 2)
        hi = rng.randint(lo + 2, n)
        if (lo, hi) == (0, n):
            lo, hi = (1, n) if rng.random() < 0.5 else (0, n - 1)
        inner_lo = rng.randint(lo, hi - 1)
        inner_hi = rng.randint(inner_lo + 1, hi)
        if (inner_lo, inner_hi) == (lo, hi):
            inner_lo, inner_hi = (lo + 1, hi) if rng.random() < 0.5 else (lo, hi - 1)
        spans = [(lo, hi), (inner_lo, inner_hi)]
    elif domain == "div":
        k = rng.randrange(n)  # operands k, k+1 become q*d / d
        d = rng.randint(2, 9)
        ops[k] = "/"
        operands[k], operands[k + 1] = d * _digit(rng), d
        if k and ops[k - 1] in "*/":
            ops[k - 1] = rng.choice("+-")
    return _build(operands, ops, spans)


# Word problems: templates over single digits ({n} a name, {i} an item) and the expression they mean.
_NAMES = ("Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena")
_ITEMS = ("apple", "coin", "card", "shell", "stamp", "marble", "book", "cookie")
_WORD: dict[int, list[tuple[str, str]]] = {  # by operator count
    2: [("{n} has {a} {i}s, buys {b} more and gives away {c}. How many {i}s now?", "a+b-c"),
        ("{n} buys {a} bags of {b} {i}s and loses {c}. How many {i}s are left?", "a*b-c"),
        ("{n} has {a} {i}s and gets {b} boxes of {c} more. How many {i}s now?", "a+b*c"),
        ("{n} has {a} {i}s and gives {b} friends {c} each. How many {i}s are left?", "a-b*c"),
        ("It is {a} degrees. It drops {b} degrees, then {c} more. What is the temperature?", "a-b-c"),
        ("{n} packs {a} {i}s into bags of {b} and has {c} more bags. How many bags?", "a/b+c"),
        ("{n} has {a} {i}s and gives away {b}. A friend has {c} times as many. How many has the friend?",
         "(a-b)*c")],
    3: [("{n} has {a} {i}s, buys {b} bags of {c} and gives away {d}. How many {i}s now?", "a+b*c-d"),
        ("{n} buys {a} bags of {b} {i}s, eats {c} and finds {d}. How many {i}s now?", "a*b-c+d"),
        ("{n} scores {a} points, loses {b} points {c} times, then wins {d}. What is the score?", "a-b*c+d"),
        ("It is {a} degrees. It drops {b} degrees {c} times, then {d} more. What is the temperature?",
         "a-b*c-d"),
        ("{n} has {a} {i}s and {b} friends have {c} each. They lose {d}. How many {i}s in all?", "a+b*c-d"),
        ("{n} shares {a} {i}s among {b} friends; each gets {c} more and gives back {d}. How many each?",
         "a/b+c-d")],
    4: [("{n} has {a} {i}s, buys {b} bags of {c}, gives away {d} and finds {e}. How many {i}s now?",
         "a+b*c-d+e"),
        ("{n} scores {a} points, loses {b} points {c} times, wins {d} and loses {e}. What is the score?",
         "a-b*c+d-e"),
        ("It is {a} degrees. It drops {b} degrees {c} times, rises {d}, then drops {e}. What is it now?",
         "a-b*c+d-e")],
}


def _word(rng: random.Random, level: int) -> tuple[str, list[Token]]:
    text, shape = rng.choice(_WORD[_N_OPS["word"][level - 1]])
    values = {k: _digit(rng) for k in "abcde"}
    if "/" in shape:
        values["a"] = values["b"] * _digit(rng)
    elif level == HARD_LEVEL:
        values["a"] = rng.randint(10, 40)  # the hard band starts from a two-digit amount
    expr = "".join(str(values[ch]) if ch in values else ch for ch in shape)
    prompt = text.format(n=rng.choice(_NAMES), i=rng.choice(_ITEMS), **values)
    return prompt, parse(expr)


_PHRASES = ("Compute {e}.", "What is {e}?", "Evaluate {e}.", "Find the value of {e}.")


def _template_regex(template: str) -> "re.Pattern[str]":
    """A phrase or word template as a regex whose named groups read its slots back."""
    out, seen = "", set()
    for part in re.split(r"(\{\w\})", template):
        name = part[1:-1] if re.fullmatch(r"\{\w\}", part) else None
        if name is None:
            out += re.escape(part)
        elif name in seen:
            out += f"(?P={name})"
        else:
            seen.add(name)
            out += f"(?P<{name}>-?\\d+)" if name in "abcde" else f"(?P<{name}>[^ ]+?)"
    return re.compile(out)


_DRILL = "Is {z}?"  # a check drill: 'Is 44-7=36?'
_READERS = [(_template_regex(t.replace("{e}", "{z}")), None) for t in _PHRASES] + \
    [(_template_regex(text), shape) for templates in _WORD.values() for text, shape in templates]


def expr_of(prompt: str) -> str | None:
    """The expression a prompt of this world asks for (word problems read back through their template), or
    None for a prompt this world did not write."""
    drill = _template_regex(_DRILL).fullmatch(prompt)
    if drill:
        return drill["z"].split("=")[0]
    for regex, shape in _READERS:
        m = regex.fullmatch(prompt)
        if m is None:
            continue
        if shape is None:
            return m["z"]
        return "".join(m[ch] if ch in "abcde" else ch for ch in shape)
    return None


@dataclass(frozen=True)
class Problem:
    domain: str
    level: int
    prompt: str
    expr: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> str:
        return str(self.steps[-1].value)

    @property
    def lines(self) -> list[str]:
        """The solution lines before the box: the expression read from a word problem, then the steps."""
        return ([self.expr] if self.domain == "word" else []) + [s.line for s in self.steps]

    def response(self, lines: list[str] | None = None) -> str:
        return "\n".join((self.lines if lines is None else lines) + [f"\\boxed{{{self.answer}}}"])


def make_problem(rng: random.Random, domain: str, level: int) -> Problem:
    """A random problem of this domain and level whose every step is exact and within ±LIMIT."""
    while True:
        if domain == "word":
            prompt, toks = _word(rng, level)
        else:
            toks = _expr(rng, domain, level)
            prompt = rng.choice(_PHRASES).format(e=render(toks))
        if any(isinstance(t, int) and abs(t) > LIMIT for t in toks):
            continue
        steps = solve(toks)
        if not steps or ("(" in toks and not _brackets_needed(toks)):
            continue
        if domain == "word" and "degrees" not in prompt and "score" not in prompt \
                and min(s.value for s in steps) < 0:
            continue  # counts of things never go negative
        return Problem(domain, level, prompt, render(toks), tuple(steps))


# ---------------------------------------------------------------- checks: the step recomputed from facts

def _column(x: int, op: str, y: int) -> tuple[list[str], int]:
    """x op y (x ≥ y ≥ 0 for '-') by the school column method: only single-digit facts (teen facts for a
    borrow), a carry or borrow of one on the tens digit, then the digits read off."""
    x1, x0, y1, y0 = x // 10, x % 10, y // 10, y % 10
    if op == "+":
        units = x0 + y0
        carry = units // 10
        facts = [f"{x0}+{y0}={units}"]
        tens = x1 + y1 + carry
        if y1 or carry:
            facts.append(f"{x1}" + (f"+{y1}" if y1 else "") + ("+1" if carry else "") + f"={tens}")
        return facts, 10 * tens + units % 10
    borrow = x0 < y0
    units = x0 + 10 * borrow - y0
    facts = [f"{x0 + 10 * borrow}-{y0}={units}"]
    tens = x1 - y1 - borrow
    if y1 or borrow:
        facts.append(f"{x1}" + (f"-{y1}" if y1 else "") + ("-1" if borrow else "") + f"={tens}")
    return facts, 10 * tens + units


def recompute(a: int, op: str, b: int) -> str:
    """The step a op b recomputed in a form the model gets right: signs taken out first (7--9 → 7+9,
    2-5 → -(5-2), 3*-4 → -(3*4)), then single-digit facts, two-digit numbers column by column, ending with the
    step itself: 44-7 → '14-7=7, 4-1=3, so 44-7=37'; a plain fact is just restated (7+8 → '7+8=15').
    Ending on exactly 'lhs=value', the text the solution line starts with, lets the line copy the value
    (an induction-style copy, which tiny models learn fast) instead of recomputing it the fragile way."""
    value = apply(a, op, b)
    step = f"{a}{op}{b}={value}"
    if op in "*/":
        x, y = abs(a), abs(b)
        parts = [f"-({x}{op}{y})"] if (a < 0) != (b < 0) else []
        if op == "/":
            parts.append(f"{y}*{x // y}={x}")
        elif x <= 9 and y <= 9:
            parts.append(f"{x}*{y}={x * y}")
        else:  # a two-digit factor times a digit: units product, then tens product plus its carry
            big, small = max(x, y), min(x, y)
            low = big % 10 * small
            carry = low // 10
            parts += [f"{big % 10}*{small}={low}",
                      f"{big // 10}*{small}" + (f"+{carry}" if carry else "") + f"={big // 10 * small + carry}"]
    else:
        c = b if op == "+" else -b  # a op b = a + c
        if (a >= 0) == (c >= 0):  # same signs: add the sizes (the larger first when columns are needed)
            x, y = abs(a), abs(c)
            sign, inner = (1 if a >= 0 else -1), "+"
            if max(x, y) > 9:
                x, y = max(x, y), min(x, y)
        else:
            pos, neg = (a, -c) if a >= 0 else (c, -a)
            sign, x, y, inner = (1, pos, neg, "-") if pos >= neg else (-1, neg, pos, "-")
        small = x <= 9 and y <= 9  # then the fact itself shows a positive form
        parts = [] if (x, inner, y) == (a, op, b) or (small and sign > 0) else \
            [f"{x}{inner}{y}" if sign > 0 else f"-({x}{inner}{y})"]
        if small:
            parts.append(f"{x}{inner}{y}={x + y if inner == '+' else x - y}")
        else:
            facts, magnitude = _column(x, inner, y)
            assert sign * magnitude == value, (a, op, b)
            parts += facts
    if parts == [step]:
        return step
    return ", ".join(parts + [f"so {step}"])


def check_text(a: int, op: str, b: int, written: int) -> str:
    """'check 44-7: 14-7=7, 4-1=3, so 44-7=37, not 36' / '…, same': the step recomputed from its operands
    first (the written value is not restated before the recomputation, so it cannot be copied into it), then
    compared with the value written."""
    verdict = "same" if apply(a, op, b) == written else f"not {written}"
    return f"check {a}{op}{b}: {recompute(a, op, b)}, {verdict}"


def risk(step: Step) -> int:
    """How slip-prone a step is for a tiny model (measured: single-digit facts ~99 % right, anything with a
    two-digit number far less): 0 plain fact · 1 signs to sort out · 2 a two-digit number · 3 with a carry,
    borrow or two two-digit numbers."""
    a, b, v = abs(step.a), abs(step.b), abs(step.value)
    if step.op == "/" or max(a, b) >= 10 or (step.op in "+-" and v >= 19):
        if step.op in "+-" and min(a, b) >= 10:
            return 3
        if step.op == "+" and (a % 10 + b % 10 >= 10) or step.op == "-" and v >= 10 and v % 10 != (a - b) % 10:
            return 3
        return 2
    return 1 if step.a < 0 or step.b < 0 or step.value < 0 else 0


# ---------------------------------------------------------------- slips

SLIPS = ("arith", "sign", "precedence", "dropped")


@dataclass(frozen=True)
class Slip:
    kind: str
    line: str   # the slipped line as written
    value: int  # the value the slipped line computed


def make_slip(step: Step, kind: str, rng: random.Random) -> Slip | None:
    """A realistic wrong version of `step` whose remainder evaluates to a wrong answer, or None if this kind
    of slip does not apply here. arith: off by 1, 2 or 10 (the tiny model's measured errors); sign: the sign
    of the result lost or a minus misread; precedence: the + or − left of a due × or / done first; dropped:
    the last term of the remainder left out."""
    before, at = list(step.before), step.at
    gold = evaluate(list(step.after))
    if kind in ("arith", "sign"):
        if kind == "arith":
            options = [step.value + d for d in (1, -1, 2, -2, 10, -10) if d in (1, -1) or abs(step.value) >= 10]
        else:
            options = [-step.value] + ([v] if (v := _sign_slip(step.a, step.op, step.b)) is not None else [])
        options = [v for v in options if v != step.value and abs(v) <= LIMIT]
        rng.shuffle(options)
        for v in options:
            after = reduce_at(before, at, v)
            if evaluate(after) not in (None, gold):
                return Slip(kind, f"{step.lhs}={v}|{render(after)}", v)
        return None
    if kind == "precedence":
        j = at - 2  # the operator left of the due × or /
        if step.op not in "*/" or j < 1 or before[j] not in "+-" or not isinstance(before[j - 1], int):
            return None
        v = apply(before[j - 1], before[j], before[j + 1])
        if v is None:
            return None
        after = reduce_at(before, j, v)
        if evaluate(after) in (None, gold):
            return None
        lhs = f"{before[j - 1]}{before[j]}{before[j + 1]}"
        return Slip(kind, f"{lhs}={v}|{render(after)}", v)
    after = list(step.after)  # dropped: the remainder loses its last "op number"
    if len(after) < 3 or after[-2] not in ("+", "-") or not isinstance(after[-1], int) or after[-3] == "(":
        return None
    short = after[:-2]
    if evaluate(short) in (None, gold):
        return None
    return Slip(kind, f"{step.lhs}={step.value}|{render(short)}", step.value)


# ---------------------------------------------------------------- meta blocks and rows

def block(content: str) -> str:
    assert "\\boxed" not in content and "\n" not in content
    return f"{META_OPEN}{content}{META_CLOSE}"


def _confidence(ok: bool, level: int) -> str:
    """The stated chance that the answer this solution is heading to is right: lower for harder levels and
    after a slip had to be redone."""
    return f"{(0.9 if ok else 0.8) - 0.1 * (min(level, 3) - 1):.1f}"


def _check_content(step: Step, slip: Slip | None, level: int, confidence: bool, decision: bool) -> str:
    """Verify (no slip): the step about to be written, recomputed ('check 44-7: 14-7=7, 4-1=3, so 44-7=37').
    Redirect: the slipped step recomputed and compared ('check 44-7: …, so 44-7=37, not 36'); a
    precedence slip is caught by naming the step due ('check 4+4=8: 4*2 first, not 4+4'); a dropped term by
    reading the remainder back."""
    if slip is None:  # a check before the step is written: its recomputed value is what the line will use
        text = f"check {step.lhs}: {recompute(step.a, step.op, step.b)}"
    elif slip.kind in ("arith", "sign"):
        text = check_text(step.a, step.op, step.b, slip.value)
    elif slip.kind == "precedence":
        text = f"check {slip.line.split('|')[0]}: {step.lhs} first, not {slip.line.split('=')[0]}"
    else:
        full, short = list(step.after), slip.line.split("|")[1]
        text = f"check rest: {render(full)}, not {short}, {full[-2]}{full[-1]} dropped"
    if slip is not None and not decision:
        text += ", redo"
    if confidence or decision:
        text += f". confidence: {_confidence(slip is None, level)}"
    if decision:
        text += f", decision: {'redirect' if slip else 'verify'}"
    return text


def _risky_step(problem: Problem, rng: random.Random) -> int:
    scores = [risk(s) for s in problem.steps]
    top = max(scores)
    return rng.choice([k for k, r in enumerate(scores) if r == top])


def _slip_for(problem: Problem, rng: random.Random) -> tuple[int, Slip] | None:
    """A slip where a tiny model would make it: arithmetic and sign slips on the riskiest step, precedence and
    dropped-term slips wherever they apply."""
    kind = rng.choices(SLIPS, weights=(0.5, 0.2, 0.15, 0.15))[0]
    if kind in ("arith", "sign"):
        candidates = [_risky_step(problem, rng)]
    else:
        candidates = list(range(len(problem.steps)))
        rng.shuffle(candidates)
    for kind_try in (kind, "arith"):
        for k in candidates:
            slip = make_slip(problem.steps[k], kind_try, rng)
            if slip is not None:
                return k, slip
    return None


def meta_response(problem: Problem, k: int, slip: Slip | None, confidence: bool, decision: bool
                  ) -> tuple[str, str]:
    """(response, prefix before the block). Verify: the lines before step k, a block checking step k, then
    step k and the rest. Redirect: the lines up to the slipped step k, a block catching it, the expression
    restated and step k redone. The block starts a line (or the response) and the next line follows its close
    tag directly, so strip_meta leaves ordinary lines."""
    offset = len(problem.lines) - len(problem.steps)  # the expression line of a word problem
    lines = problem.lines
    if slip is None:  # verify: check step k before writing it
        written, after = lines[:offset + k], lines[offset + k:]
    else:
        # after a slip, restate the expression the step was taken from, then redo it: every line still follows
        # from the line right above it (a redo derived from two lines up teaches stale-remainder copying)
        written = lines[:offset + k] + [slip.line]
        after = [render(list(problem.steps[k].before))] + lines[offset + k:]
    prefix = "".join(line + "\n" for line in written)
    content = _check_content(problem.steps[k], slip, problem.level, confidence, decision)
    return prefix + block(content) + problem.response(after), prefix


# ---------------------------------------------------------------- the environment's calculator (tool form)

_TOOL_CALL = re.compile(r"check (?P<expr>[^\s:,]+)\Z")


def arith_check(context: str) -> str | None:
    """The arith world's calculator, the `arith_check` tool of evals.tools: `context` is the open block's text
    before the tool marker, ending on 'check <expression>'; returns '=<exact value>' ('check 44-7' → '=37',
    'check 7-3*-3' → '=16', with this world's reduction order and exact division), or None when the context does not
    end on a check of an expression this world can evaluate (unparsable, inexact division, beyond ±LIMIT)."""
    m = _TOOL_CALL.search(context)
    if m is None:
        return None
    try:
        tokens = parse(m["expr"])
    except ValueError:
        return None
    if not well_formed(tokens) or any(isinstance(t, int) and abs(t) > LIMIT for t in tokens):
        return None
    value = evaluate(tokens)
    return None if value is None else f"={value}"


def _tool_content(content: str) -> str | None:
    """A block's content in tool form, or None when it is not a recomputing check (precedence and dropped-term
    checks, which no calculator answers, stay as written)."""
    m = re.match(r"check (?P<lhs>[^:\s]+): ", content)
    if m is None:
        return None
    try:
        lhs = parse(m["lhs"])
    except ValueError:
        return None
    if len(lhs) != 3 or not well_formed(lhs):
        return None
    a, op, b = lhs
    if apply(a, op, b) is None:
        return None
    recomputed = m.group() + recompute(a, op, b)
    if not content.startswith(recomputed):
        return None
    value = arith_check(f"check {m['lhs']}")
    return f"check {m['lhs']}{CALC_OPEN}{value}{CALC_CLOSE}{content[len(recomputed):]}"


def tool_form(text: str, start: int = 0) -> tuple[str, int]:
    """(text with every step checked by the environment's calculator, tool calls written). Each recomputing check
    block becomes a call ('check 44-7: 14-7=7, 4-1=3, so 44-7=37, not 36, redo' → 'check 44-7<|calc|>=37<|/calc|>,
    not 36, redo'; verdicts and confidences kept; precedence and dropped-term checks stay as written), and every
    step line from `start` on (a wrong prefix before it is left alone) not already right after a block gets a
    pre-check of its own: '<|meta|>check 9*5<|calc|>=45<|/calc|><|/meta|>9*5=45|8+45'. A check before every step
    is what makes the calculator useful to a model whose slips are spread over all steps (scripts/probe_tool.py:
    one check per response, at the riskiest step, did not lift accuracy above the stripped twin). Only blocks
    change, so strip_meta gives the same text before and after."""
    out, last, calls = [], 0, 0
    for b in find_blocks(text):
        new = _tool_content(b.content)
        if new is None:
            continue
        out += [text[last:b.content_start], new]
        last = b.content_end
        calls += 1
    out.append(text[last:])
    text = "".join(out)
    lines = text.split("\n")
    at = 0
    for k, line in enumerate(lines):
        bare = line.rsplit(META_CLOSE, 1)[-1]  # a line may start with a block: the step follows its close tag
        if at >= start and bare == line and (parsed := _parse_line(line)) is not None:
            (a, op, b), _, _ = parsed
            value = arith_check(f"check {a}{op}{b}")
            if value is not None:
                lines[k] = block(f"check {a}{op}{b}{CALC_OPEN}{value}{CALC_CLOSE}") + line
                calls += 1
        at += len(line) + 1
    return "\n".join(lines), calls


def tool_form_rows(rows: list[dict[str, Any]], where: str = "rows") -> tuple[list[dict[str, Any]], int]:
    """(SFT rows of this world with their assistant responses in tool form, tool calls written). The wrong prefix
    precedes its block, so it stays an exact prefix. Raises DataError for a row this world did not write (its
    `source` is not 'arith'): its checks are not this world's, so no calculator form is defined for them."""
    out, converted = [], 0
    for i, row in enumerate(rows):
        if row.get("source") != SOURCE:
            raise DataError(f"{where}: row {i} (id {row.get('id')!r}): sft.meta_blocks 'tool' rewrites checks of "
                            f"the arith world only; this row's source is {row.get('source')!r}, expected "
                            f"{SOURCE!r} (use sft.meta_blocks: as_written for other data)")
        messages = [dict(m) for m in row["messages"]]
        messages[-1]["content"], n = tool_form(messages[-1]["content"], len(row.get("wrong_prefix") or ""))
        converted += n
        out.append({**row, "messages": messages})
    return out, converted


# ---------------------------------------------------------------- auditing written solutions

@dataclass(frozen=True)
class LineCheck:
    """One written line judged against the expression it was taken from. `errors` ⊆ {unparsed, read, order,
    sign, value, copy}: read = the expression line of a word problem is wrong; order = not the step due
    (precedence); sign / value = the written step's result is wrong (sign-only or otherwise); copy = the
    remainder is not the expression with the step replaced (dropped or altered term). `redo`: the line
    correctly redoes the previous line's step (a correction), judged against the expression before it."""

    index: int
    line: str
    errors: frozenset[str]
    redo: bool = False


def _parse_line(line: str) -> tuple[list[Token], int, list[Token]] | None:
    lhs, sep, rest = line.partition("=")
    value, bar, after = rest.partition("|")
    try:
        lt, at = parse(lhs), parse(after)
        v = int(value)
    except ValueError:
        return None
    if not sep or not bar or len(lt) != 3 or not well_formed(lt) or not well_formed(at):
        return None
    return lt, v, at


def _judge(cur: list[Token], a: int, op: str, b: int, v: int, after: list[Token]) -> set[str]:
    errors = set()
    i = next_op(cur)
    if i is None or (cur[i - 1], cur[i], cur[i + 1]) != (a, op, b):
        errors.add("order")
    true = apply(a, op, b)
    if true != v:
        errors.add("sign" if true is not None and (v == -true or v == _sign_slip(a, op, b)) else "value")
    # where the written step sits in the expression (the due one if it matches, else the first match)
    at = i if "order" not in errors else next((j for j in range(1, len(cur) - 1, 2)
                                                if (cur[j - 1], cur[j], cur[j + 1]) == (a, op, b)), None)
    if at is None or reduce_at(cur, at, v) != after:
        errors.add("copy")
    return errors


def audit_lines(expr: str, lines: list[str], word: bool = False) -> list[LineCheck]:
    """Judge each solution line (meta blocks and the boxed line already removed), following the remainder as
    written, so that one slip is counted once and not again in every later line."""
    cur, prev = parse(expr), None
    seen = [cur]  # every expression state so far: a restated one starts a redo
    out = []
    for k, line in enumerate(lines):
        bare = _parse_expr(line)
        if word and k == 0:
            out.append(LineCheck(k, line, frozenset() if line == expr else frozenset({"read"})))
            cur = bare if bare is not None else cur
            seen = [cur]
            continue
        if bare is not None:  # a restated expression: fine if it is one this solution already had
            out.append(LineCheck(k, line, frozenset() if bare in seen else frozenset({"copy"}), redo=True))
            cur, prev = bare, None
            continue
        parsed = _parse_line(line)
        if parsed is None:
            out.append(LineCheck(k, line, frozenset({"unparsed"})))
            continue
        (a, op, b), v, after = parsed
        errors = _judge(cur, a, op, b, v, after)
        if errors and prev is not None and not _judge(prev, a, op, b, v, after):
            out.append(LineCheck(k, line, frozenset(), redo=True))
        else:
            out.append(LineCheck(k, line, frozenset(errors)))
            prev = cur
        cur = after
        seen.append(cur)
    return out


def _parse_expr(line: str) -> list[Token] | None:
    """A line that is a bare expression (no '='), or None."""
    if "=" in line:
        return None
    try:
        toks = parse(line)
    except ValueError:
        return None
    return toks if well_formed(toks) else None


def _sign_slip(a: int, op: str, b: int) -> int | None:
    """The value of a op b with b's sign misread (7--9 → 7-9): the classic sign slip."""
    return apply(a, op, -b) if b < 0 else None


# ---------------------------------------------------------------- notions (MASA's meta-predictions)

# The arith world's notions: what a worked solution needs, as MASA's meta-prediction names it. Operator kinds and
# brackets are visible in the problem; carries, borrows, negatives and two-digit numbers often appear only on
# the way (7-3*(2-5) has no negative operand but a -3 and a -9 on the way). Names are single tokens of lower-case
# text with hyphens, so rewards.masa's whole-word match finds them in `notion_text`.
NOTIONS: dict[str, str] = {
    "addition": "a step adds (a+b)",
    "subtraction": "a step subtracts (a-b)",
    "multiplication": "a step multiplies (a*b)",
    "division": "a step divides (a/b)",
    "brackets": "the expression holds a bracket group",
    "negative": "a step has a negative operand or value",
    "two-digit": "a step has an operand or value of two digits",
    "carry": "an addition of sizes carries a ten (units digits sum to 10 or more: 17+5)",
    "borrow": "a subtraction of sizes borrows a ten (a smaller units digit minus a larger one: 22-5)",
}


def step_notions(a: int, op: str, b: int, value: int) -> set[str]:
    """The notions one reduction a op b = value uses. Carries and borrows are those of the sizes the step really
    adds or subtracts after signs are taken out (7--9 adds 7+9: a carry; -5+12 subtracts 12-5: a borrow)."""
    out = {{"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}[op]}
    if min(a, b, value) < 0:
        out.add("negative")
    if max(abs(a), abs(b), abs(value)) > 9:
        out.add("two-digit")
    if op in "+-":
        c = b if op == "+" else -b  # a op b = a + c
        x, y = abs(a), abs(c)
        if (a >= 0) == (c >= 0):
            out |= {"carry"} if x % 10 + y % 10 >= 10 else set()
        else:
            big, small = max(x, y), min(x, y)
            out |= {"borrow"} if big % 10 < small % 10 else set()
    return out


def problem_notions(expr: str) -> set[str]:
    """The notions visible in the problem's expression itself: its operator kinds, brackets, negative and
    two-digit literals. Raises ValueError for text that is not an expression."""
    toks = parse(expr)
    names = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}
    out = {names[t] for t in toks if isinstance(t, str) and t in names}
    if "(" in toks:
        out.add("brackets")
    nums = [t for t in toks if isinstance(t, int)]
    if any(t < 0 for t in nums):
        out.add("negative")
    if any(abs(t) > 9 for t in nums):
        out.add("two-digit")
    return out


def solution_notions(text: str) -> set[str]:
    """The notions a solution text shows: those of each step line it writes ('a op b=v|rest', meta blocks and
    other lines ignored, a wrong value counted as written), plus brackets when any line holds one."""
    out: set[str] = set()
    for line in text.splitlines():
        parsed = _parse_line(line.strip())
        if parsed is None:
            continue
        (a, op, b), v, after = parsed
        out |= step_notions(a, op, b, v)
        if "(" in line:
            out.add("brackets")
    return out


def notions(problem: Problem) -> set[str]:
    """The notions of a problem's worked solution (the reference steps), a subset of NOTIONS; brackets when the
    expression has a group (a reduced group loses its brackets, so the step lines may not show one)."""
    return solution_notions(problem.response()) | ({"brackets"} if "(" in problem.expr else set())


def notion_text(names: Iterable[str]) -> str:
    """Notion names as the text rewards.masa.r_notion searches (sorted, space separated)."""
    return " ".join(sorted(names))


# ---------------------------------------------------------------- MASA meta-prediction demonstrations

# The declared pass-rate proxy of the demonstrations: the chance that a step of each risk class (`risk`: 0 plain
# single-digit fact, 1 signs, 2 a two-digit number, 3 a carry/borrow or two two-digit numbers) is written
# wrong. Not measured per model: 0.01 is the ~99 % single-digit accuracy `risk` cites, and the rest rise with
# the measured "20–80 % wrong" for two-digit steps, kept at its low end because SFT and meta checks catch some.
SLIP_BY_RISK = (0.01, 0.05, 0.15, 0.30)


def problem_of(prompt: str, domain: str = "", level: int = 0) -> Problem | None:
    """The Problem an arith prompt asks (its expression read back by `expr_of` and solved); None when the prompt
    is no arith problem (a check drill, another world's text) or its expression does not solve within ±LIMIT."""
    expr = None if _template_regex(_DRILL).fullmatch(prompt) else expr_of(prompt)
    try:
        toks = parse(expr) if expr is not None else []
    except ValueError:
        return None
    if not toks or not well_formed(toks) or not (steps := solve(toks)):
        return None
    return Problem(domain, level, prompt, expr, tuple(steps))


def risk_counts(problem: Problem) -> tuple[int, ...]:
    """The number of the problem's steps in each `risk` class 0–3 (a tuple of len(SLIP_BY_RISK))."""
    counts = [0] * len(SLIP_BY_RISK)
    for step in problem.steps:
        counts[risk(step)] += 1
    return tuple(counts)


def pass_probability_of(counts: Sequence[int], slips: Sequence[float]) -> float:
    """Π_c (1 − slips[c])^counts[c]: the chance that all steps are right when a problem has counts[c] steps of risk
    class c and each slips independently with probability slips[c]."""
    return math.prod((1 - s) ** n for s, n in zip(slips, counts, strict=True))


def pass_probability(problem: Problem, slips: Sequence[float] = SLIP_BY_RISK) -> float:
    """`pass_probability_of` the problem's `risk_counts` (the declared model behind the demonstrations' pass
    rate)."""
    return pass_probability_of(risk_counts(problem), slips)


def pass_rate_proxy(problem: Problem, out_of: int, slips: Sequence[float] = SLIP_BY_RISK) -> int:
    """The demonstrations' pass rate: round(out_of × `pass_probability`), i.e. the expected correct count of
    `out_of` attempts if each step slips independently at its risk class's rate. With the default SLIP_BY_RISK a
    declared proxy of difficulty by step count and step risk, not a measurement of any model; with slips fitted
    by `fit_slip_by_risk` to a model's sampled solutions, that model's expected count under the same model."""
    return round(out_of * pass_probability(problem, slips))


@dataclass(frozen=True)
class SlipFit:
    """`fit_slip_by_risk`'s result. slips: per risk class, the fitted slip rate, or None where no sampled problem
    has a step of that class (not identified); se: its standard error (delta method on the observed Fisher
    information; None where not identified or the rate lies on the bound 0); steps: the class's steps summed over
    the problems; log_lik: the binomial log-likelihood at the fit."""

    slips: tuple[float | None, ...]
    se: tuple[float | None, ...]
    steps: tuple[int, ...]
    log_lik: float

    def filled(self, default: Sequence[float] = SLIP_BY_RISK) -> tuple[float, ...]:
        """The slips with `default`'s value where a class is not identified."""
        return tuple(d if s is None else s for s, d in zip(self.slips, default, strict=True))


def binomial_log_lik(counts: Sequence[Sequence[int]], correct: Sequence[int], samples: int,
                     slips: Sequence[float]) -> float:
    """Σ_i log Binomial(correct_i | samples, Π_c (1 − slips[c])^counts_i[c]), the binomial coefficient left out
    (it does not depend on the slips). −inf when a problem with a correct sample has pass probability 0 or one
    with a wrong sample has pass probability 1."""
    total = 0.0
    for n_c, k in zip(counts, correct, strict=True):
        p = pass_probability_of(n_c, slips)
        for hits, prob in ((k, p), (samples - k, 1 - p)):
            if hits:
                total += hits * math.log(prob) if prob > 0 else -math.inf
    return total


def fit_slip_by_risk(counts: Sequence[Sequence[int]], correct: Sequence[int], samples: int) -> SlipFit:
    """Maximum-likelihood slip rate per risk class: problem i (counts[i][c] steps of class c) is solved right in
    correct[i] of `samples` independent attempts, correct_i ~ Binomial(samples, Π_c (1 − s_c)^counts_i[c]), the
    model `pass_probability` declares. Fitted on θ_c = −log(1 − s_c) ≥ 0, where log p_i = −Σ_c counts_i[c] θ_c is
    linear and the negative log-likelihood convex (so the optimum is the global one); scipy's L-BFGS-B with the
    analytic gradient. A class no problem has a step of is not identified (slip None). Raises ValueError for
    empty or inconsistent input (a count outside 0..samples, a row of the wrong length, samples < 1)."""
    import numpy as np
    from scipy.optimize import minimize

    n_classes = len(SLIP_BY_RISK)
    if samples < 1 or not counts or len(counts) != len(correct):
        raise ValueError(f"fit_slip_by_risk: need samples ≥ 1 and one correct count per problem (got samples "
                         f"{samples}, {len(counts)} problems, {len(correct)} counts)")
    for i, (n_c, k) in enumerate(zip(counts, correct)):
        if len(n_c) != n_classes or min(n_c) < 0 or not 0 <= k <= samples:
            raise ValueError(f"fit_slip_by_risk: problem {i}: expected {n_classes} step counts ≥ 0 and a correct "
                             f"count in 0..{samples}, got {list(n_c)} and {k}")
    x = np.asarray(counts, dtype=float)
    k = np.asarray(correct, dtype=float)
    seen = x.sum(axis=0) > 0
    xs = x[:, seen]

    def nll(theta: "np.ndarray") -> tuple[float, "np.ndarray"]:
        z = np.maximum(xs @ theta, 1e-12)  # −log p_i
        # −[k log p + (S − k) log(1 − p)], with log(1 − p) = log(−expm1(−z)); d/dz = k − (S − k) / expm1(z)
        value = float(np.sum(k * z - (samples - k) * np.log(-np.expm1(-z))))
        grad_z = k - (samples - k) / np.expm1(z)
        return value, xs.T @ grad_z

    res = minimize(nll, np.full(int(seen.sum()), 0.05), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, 50.0)] * int(seen.sum()))
    theta = res.x
    # observed Fisher information of θ: Σ_i S p_i / (1 − p_i) x_i x_iᵀ (the binomial's, p = exp(−x·θ))
    z = np.maximum(xs @ theta, 1e-12)
    w = samples * np.exp(-z) / -np.expm1(-z)
    info = (xs * w[:, None]).T @ xs
    try:
        cov = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        cov = np.full_like(info, np.nan)
    slips: list[float | None] = [None] * n_classes
    se: list[float | None] = [None] * n_classes
    for j, c in enumerate(np.flatnonzero(seen)):
        slips[c] = float(-np.expm1(-theta[j]))
        var = cov[j, j]
        se[c] = float((1 - slips[c]) * math.sqrt(var)) if theta[j] > 1e-9 and var >= 0 else None
    fit = SlipFit(tuple(slips), tuple(se), tuple(int(v) for v in x.sum(axis=0)), log_lik=math.nan)
    # unidentified classes have no steps, so the value filled in for them does not change the likelihood
    return dataclasses.replace(fit, log_lik=binomial_log_lik(counts, correct, samples, fit.filled()))


def meta_prediction_demo(problem: Problem, solution_length: int, out_of: int,
                         slips: Sequence[float] = SLIP_BY_RISK) -> str:
    """A demonstration answer to rewards.masa.meta_prompt for this problem: a meta block with what the prediction
    is read from (the step count and each step's risk class), then the JSON object rewards.masa.parse_prediction
    reads: the notions its worked solution needs that the problem does not show (sorted), `pass_rate_proxy` under
    `slips` and the given solution length (tokens of the solution this world wrote for it)."""
    import json

    needed = sorted(notions(problem) - problem_notions(problem.expr))
    risks = " ".join(str(risk(s)) for s in problem.steps)
    return block(f"{len(problem.steps)} steps, risks {risks}") + "\n" + json.dumps(
        {"notions": needed, "pass_rate": pass_rate_proxy(problem, out_of, slips),
         "solution_length": solution_length})


# ---------------------------------------------------------------- the world's splits

SPLITS = ("base", "sft1", "sft2", "rl", "val", "heldout")


def _rng(seed: int, split: str) -> random.Random:
    # a string seed is hashed by sha512: stable across runs and Python versions, and one stream per split
    return random.Random(f"arith:{seed}:{split}")


def _cell(i: int, levels: tuple[int, ...]) -> tuple[str, int]:
    """Round-robin domain and level, so every split covers every domain and each of `levels` evenly."""
    return DOMAINS[i % len(DOMAINS)], levels[(i // len(DOMAINS)) % len(levels)]


def _draw(rng: random.Random, domain: str, level: int, avoid: set[str]) -> Problem:
    for _ in range(10_000):
        problem = make_problem(rng, domain, level)
        if problem.expr not in avoid:
            return problem
    raise DataError(f"arith world: cannot draw a {domain} problem of level {level} outside the "
                    f"{len(avoid)} reserved ones; lower the val / held-out sizes")


def _unique(rng: random.Random, n: int, cell: Callable[[int], tuple[str, int]], avoid: set[str]
            ) -> list[Problem]:
    out = []
    for i in range(n):
        problem = _draw(rng, *cell(i), avoid)
        avoid.add(problem.expr)
        out.append(problem)
    return out


def sft_row(rid: str, problem: Problem, response: str, wrong_prefix: str | None, kind: str) -> dict[str, Any]:
    return {"id": rid, "messages": [{"role": "user", "content": problem.prompt},
                                    {"role": "assistant", "content": response}],
            "wrong_prefix": wrong_prefix, "domain": problem.domain, "level": problem.level,
            "answer": problem.answer, "source": SOURCE, "kind": kind}


def prompt_row(rid: str, problem: Problem, suite: str | None = None) -> dict[str, Any]:
    row = {"id": rid, "prompt": problem.prompt, "answer": problem.answer, "domain": problem.domain,
           "level": problem.level, "source": SOURCE}
    if suite is not None:
        row["suite"] = suite
    return row


CHECK_DOMAIN = "check"  # the base split's check drills (not a val domain)


def _drill(rid: str, rng: random.Random, i: int, avoid: set[str], levels: tuple[int, ...]) -> dict[str, Any]:
    """A check drill: a claimed step of a random problem ('Is 44-7=36?') checked the way meta blocks check
    ('check 44-7: 14-7=7, 4-1=3, so 44-7=37, not 36'), right claims and slipped ones alike. The base model learns
    to verify arithmetic in plain text, as a real base model already can; meta SFT then only has to teach when
    to check and what to do with the verdict."""
    while True:
        problem = make_problem(rng, *_cell(i, levels))
        step = problem.steps[_risky_step(problem, rng)]
        if step.lhs not in avoid:
            break
    slip = make_slip(step, rng.choice(("arith", "sign")), rng) if rng.random() < 0.5 else None
    claimed = slip.value if slip else step.value
    response = f"{check_text(step.a, step.op, step.b, claimed)}\n\\boxed{{{step.value}}}"
    return {"id": rid, "messages": [{"role": "user", "content": _DRILL.format(z=f"{step.lhs}={claimed}")},
                                    {"role": "assistant", "content": response}],
            "wrong_prefix": None, "domain": CHECK_DOMAIN, "level": problem.level, "answer": str(step.value),
            "source": SOURCE, "kind": "drill"}


def _base(spec: "ArithWorldSpec", rng: random.Random, avoid: set[str]) -> list[dict[str, Any]]:
    """Plain worked solutions, and a share of check drills."""
    rows = []
    for i in range(spec.n_base):
        rid = f"arith-base-{i:06d}"
        if rng.random() < spec.check_drill_share:
            rows.append(_drill(rid, rng, i, avoid, tuple(spec.levels)))
        else:
            problem = _draw(rng, *_cell(i, tuple(spec.levels)), avoid)
            rows.append(sft_row(rid, problem, problem.response(), None, "plain"))
    return rows


def _sft1(spec: "ArithWorldSpec", rng: random.Random, avoid: set[str]) -> list[dict[str, Any]]:
    """Worked solutions; a share checks its riskiest step before writing it (verify), a share slips and a
    check catches and redoes it (redirect, the slipped prefix masked); the rest are plain."""
    rows = []
    for i in range(spec.n_sft1):
        problem = _draw(rng, *_cell(i, tuple(spec.levels)), avoid)
        rid, u = f"arith-sft1-{i:06d}", rng.random()
        confidence = rng.random() < spec.confidence_share
        found = _slip_for(problem, rng) if u < spec.slip_share else None
        if found is not None:
            response, prefix = meta_response(problem, *found, confidence=confidence, decision=False)
            rows.append(sft_row(rid, problem, response, prefix, "redirect"))
        elif u < spec.slip_share + spec.verify_share:
            response, _ = meta_response(problem, _risky_step(problem, rng), None, confidence, decision=False)
            rows.append(sft_row(rid, problem, response, None, "verify"))
        else:
            rows.append(sft_row(rid, problem, problem.response(), None, "plain"))
    return rows


def _sft2(spec: "ArithWorldSpec", rng: random.Random, avoid: set[str]) -> list[dict[str, Any]]:
    """A given prefix (a real slip, or the correct lines before the riskiest step), masked; then ONE block
    with `confidence: X, decision: redirect|verify`; then the recovery or continuation."""
    rows = []
    for i in range(spec.n_sft2):
        problem = _draw(rng, *_cell(i, tuple(spec.levels)), avoid)
        rid = f"arith-sft2-{i:06d}"
        found = _slip_for(problem, rng) if rng.random() < spec.sft2_redirect_share else None
        if found is not None:
            response, prefix = meta_response(problem, *found, confidence=True, decision=True)
            rows.append(sft_row(rid, problem, response, prefix, "sft2_redirect"))
        else:
            response, prefix = meta_response(problem, _risky_step(problem, rng), None, True, decision=True)
            rows.append(sft_row(rid, problem, response, prefix or None, "sft2_verify"))
    return rows


def generate_world(spec: "ArithWorldSpec") -> dict[str, list[dict[str, Any]]]:
    """All splits as row lists. Held-out and val are drawn first and reserved (held-out: a share from the
    harder band), so no training split (base, SFT, RL) contains any of their problems, and the held-out
    shares none with val. Every split draws its problems from `spec.levels` (default all three; the held-out's
    harder band aside)."""
    reserved: set[str] = set()
    levels = tuple(spec.levels)
    cell = lambda i: _cell(i, levels)  # noqa: E731
    n_hard = round(spec.n_heldout * spec.heldout_hard_share)
    heldout = _unique(_rng(spec.seed, "heldout"), spec.n_heldout,
                      lambda i: (DOMAINS[i % len(DOMAINS)], HARD_LEVEL) if i < n_hard else cell(i - n_hard),
                      reserved)
    val = _unique(_rng(spec.seed, "val"), spec.n_val_per_domain * len(DOMAINS), cell, reserved)
    rl_rng = _rng(spec.seed, "rl")
    return {
        "base": _base(spec, _rng(spec.seed, "base"), reserved),
        "sft1": _sft1(spec, _rng(spec.seed, "sft1"), reserved),
        "sft2": _sft2(spec, _rng(spec.seed, "sft2"), reserved),
        "rl": [prompt_row(f"arith-rl-{i:06d}", _draw(rl_rng, *cell(i), reserved)) for i in range(spec.n_rl)],
        "val": [prompt_row(f"arith-val-{i:06d}", p) for i, p in enumerate(val)],
        "heldout": [prompt_row(f"arith-heldout-{i:06d}", p, suite=SOURCE) for i, p in enumerate(heldout)],
    }


def write_world(world: dict[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    """Each split to `<out_dir>/<split>.parquet` (atomic, deterministic bytes)."""
    from infra.artifacts import write_parquet

    paths = {}
    for split, rows in world.items():
        paths[split] = Path(out_dir) / f"{split}.parquet"
        write_parquet(rows, paths[split])
    return paths


def world_texts(world: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The text a tokenizer for this world is trained on: every prompt and assistant turn, in split order."""
    texts = []
    for rows in world.values():
        for row in rows:
            texts += [m["content"] for m in row["messages"]] if "messages" in row else [row["prompt"]]
    return texts
