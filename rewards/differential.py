"""A differential check of the grader against verl's shipped math rewards (`verl.utils.reward_score`, verl 0.9.1).

Corpus: each held-out gold × renderings that must grade correct (the gold boxed; `equivalent_renderings`; the gold
as a percent; a fraction as a 6-significant-digit decimal; brace-less `\\boxed G`; `\\fbox{G}`; a list gold as one
box per item) and responses that must grade wrong (the decoy boxed; the right box followed by a changed answer
cut off inside its box). Each case carries the label the documented conventions give it (docs/method-cards.md,
"Grader conventions").

verl's functions run in a fresh interpreter (`verl_scores`): the grader replaces math-verify's numeric comparison
inside the processes that grade, and verl's math_verify reward must run on the unpatched library.
- `verl_math`: `math_reward.compute_score` (last `\\boxed`, string normalisation, Hendrycks MATH),
- `verl_math_verify`: `math_verify._verify_in_subprocess` (what its `compute_score` runs in its process pool:
  math-verify with gold `\\boxed{gold}` and the whole response, LaTeX and expression extraction),
- `verl_math_dapo`: `math_dapo.compute_score(...)["acc"]` (Minerva `Answer:` else strict last box on the last 100
  characters, normalised strings).
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from rewards.golds import equivalent_renderings

if TYPE_CHECKING:
    from rewards.grader import Grader

VERL_FUNCTIONS = ("verl_math", "verl_math_verify", "verl_math_dapo")
TABLE_FIELDS = ("id", "kind", "verl_fn", "gold", "response", "expected", "twinarm", "verl", "reason")

_REPO = Path(__file__).resolve().parent.parent
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_INT_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_TOKEN = re.compile(r"[^\s${}\\]+")


@dataclass(frozen=True)
class Case:
    id: str  # problem id
    kind: str  # rendering kind
    gold: str
    response: str
    expected: bool  # the label under the documented conventions


def _decimal(num: int, den: int, negative: bool) -> str:
    value = Fraction(num, den)
    text = format(Decimal(value.numerator) / Decimal(value.denominator), ".6g")
    return ("-" if negative else "") + text


def renderings(gold: str) -> list[tuple[str, str, bool]]:
    """(kind, response, expected) for one gold, decoy cases excluded (they need the decoy: `decoy_cases`)."""
    from rewards.grader import list_items

    out = [("boxed", f"The answer is $\\boxed{{{gold}}}$.", True)]
    out += [(f"rendering: {name}", f"Hence $\\boxed{{{text}}}$", True) for name, text in equivalent_renderings(gold)]
    if _PLAIN_NUMBER.fullmatch(gold):
        out.append(("percent", f"So it is $\\boxed{{{gold}\\%}}$ of the total.", True))
    m = _INT_FRAC.fullmatch(gold)
    if m and int(m.group(3)):
        out.append(("decimal of a fraction", f"$\\boxed{{{_decimal(int(m.group(2)), int(m.group(3)), bool(m.group(1)))}}}$",
                    True))
    if _TOKEN.fullmatch(gold):
        out.append(("brace-less box", f"so the answer is $\\boxed {gold}$.", True))
    out.append(("fbox", f"\\fbox{{{gold}}}", True))
    items = list_items(gold)
    if len(items) > 1:
        out.append(("one box per list item", "The answers are " + ", ".join(f"$\\boxed{{{x}}}$" for x in items) + ".",
                    True))
    return out


def build_corpus(problems: list[tuple[str, str]]) -> list[Case]:
    """The rendering cases of (problem id, gold) pairs (`renderings`)."""
    return [Case(pid, kind, gold, response, expected) for pid, gold in problems
            for kind, response, expected in renderings(gold)]


def decoy_cases(problems: list[tuple[str, str]], decoys: list[str | None]) -> list[Case]:
    """The wrong-answer cases of (problem id, gold) pairs and their decoys (a None decoy: none for that gold)."""
    cases = []
    for (pid, gold), decoy in zip(problems, decoys):
        if decoy is not None:
            cases.append(Case(pid, "decoy", gold, f"The answer is \\boxed{{{decoy}}}.", False))
            cases.append(Case(pid, "right box, then a changed answer cut off", gold,
                              f"So $\\boxed{{{gold}}}$. Wait, I misread the question: it is $\\boxed{{{decoy}", False))
    return cases


def sample(problems: list[tuple[str, str]], every_integer: int, every_other: int) -> list[tuple[str, str]]:
    """A deterministic sample by a hash of the problem id: 1/every_integer of the golds that are plain integers
    and 1/every_other of the rest (where graders differ most); 1 keeps all."""
    def keep(pid: str, gold: str) -> bool:
        every = every_integer if re.fullmatch(r"-?\d+", gold) else every_other
        return int(hashlib.sha256(pid.encode()).hexdigest(), 16) % every == 0

    return [(pid, gold) for pid, gold in problems if keep(pid, gold)]


_VERL_RUNNER = r"""
import json, logging, sys
logging.disable(logging.WARNING)
from verl.utils.reward_score import math_dapo, math_reward
from verl.utils.reward_score.math_verify import _verify_in_subprocess
out = []
for response, gold in json.load(sys.stdin):
    row = {}
    try:
        row["verl_math"] = bool(math_reward.compute_score(response, gold) == 1.0)
    except Exception:
        row["verl_math"] = False
    try:
        row["verl_math_verify"] = bool(_verify_in_subprocess("\\boxed{" + gold + "}", response) == 1.0)
    except Exception:
        row["verl_math_verify"] = False
    try:
        row["verl_math_dapo"] = bool(math_dapo.compute_score(response, gold)["acc"])
    except Exception:
        row["verl_math_dapo"] = False
    out.append(row)
json.dump(out, sys.stdout)
"""


def start_verl(cases: list[Case]) -> subprocess.Popen:
    """Start scoring `cases` with verl's functions in a fresh interpreter; `verl_scores(proc)` collects them."""
    proc = subprocess.Popen([sys.executable, "-c", _VERL_RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=_REPO)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps([[c.response, c.gold] for c in cases]))
    proc.stdin.close()
    return proc


def verl_scores(proc: subprocess.Popen, timeout_s: float = 600) -> list[dict[str, bool]]:
    """The verl results of a `start_verl` process, one dict per case (keys VERL_FUNCTIONS)."""
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    if proc.wait(timeout_s) != 0:
        raise RuntimeError(f"verl scoring process failed (exit {proc.returncode}): {err[-2000:]}")
    return json.loads(out)


def disagreements(cases: list[Case], twinarm: list[bool], verl: list[dict[str, bool]]) -> list[dict]:
    """One row per (case, verl function) where verl's verdict differs from twinarm's (TABLE_FIELDS, no reason)."""
    rows = []
    for case, ours, theirs in zip(cases, twinarm, verl):
        for fn in VERL_FUNCTIONS:
            if theirs[fn] != ours:
                rows.append({**asdict(case), "verl_fn": fn, "twinarm": ours, "verl": theirs[fn]})
    return rows


_STRING_EQ = "compares the raw box content with the gold string (no normalisation)"
_HENDRYCKS = "compares strings after Hendrycks MATH normalisation"
REASONS: dict[tuple[str, str], str] = {
    ("verl_math", "fbox"): "finds \\fbox{...} but remove_boxed asserts a \\boxed{ prefix; the error is caught as 0",
    ("verl_math", "one box per list item"): "reads only the last box",
    ("verl_math", "decimal of a fraction"): f"{_HENDRYCKS}: a decimal never equals a \\frac",
    ("verl_math", "rendering: displaystyle"): f"{_HENDRYCKS}, which keeps \\displaystyle",
    ("verl_math", "rendering: exact fraction"): f"{_HENDRYCKS}: \\frac{{5}}{{4}} is not 1.25",
    ("verl_math", "rendering: mathrm"): f"{_HENDRYCKS}: \\mathrm{{x}} is not \\text{{x}}",
    ("verl_math", "rendering: textbf"): f"{_HENDRYCKS}: \\textbf{{x}} is not \\text{{x}}",
    ("verl_math", "rendering: text units"): f"{_HENDRYCKS}; units go only after '\\text{{ ' (space inside)",
    ("verl_math", "rendering: thousands separator"): f"{_HENDRYCKS}, which keeps thousands commas",
    ("verl_math", "rendering: trailing .0"): f"{_HENDRYCKS}: 18.0 is not 18",
    ("verl_math", "rendering: trailing zero"): f"{_HENDRYCKS}: 1.250 is not 1.25",
    ("verl_math_verify", "fbox"): "math-verify's LaTeX extraction reads \\boxed, not \\fbox",
    ("verl_math_verify", "percent"): "math-verify reads a boxed 18\\% as a string, never equal to the gold 18 (the "
                                     "convention drops the percent sign, as verl's math_reward and Qwen2.5-Math do)",
    ("verl_math_verify", "right box, then a changed answer cut off"):
        "takes the last COMPLETE box: credits the answer the response abandoned before it was cut off",
    ("verl_math_verify", "decimal of a fraction"): "math-verify rounds both to 6 decimal places: a 6-significant-digit "
                                                   "decimal of a value >= 1 differs in the 6th decimal",
    ("verl_math_verify", "one box per list item"): "reads only the last box",
    ("verl_math_dapo", "brace-less box"): "its strict box needs \\boxed{",
    ("verl_math_dapo", "fbox"): "its strict box needs \\boxed{",
    ("verl_math_dapo", "one box per list item"): "reads only the last box",
    **{("verl_math_dapo", kind): _STRING_EQ for kind in (
        "percent", "decimal of a fraction", "rendering: assignment", "rendering: dfrac", "rendering: displaystyle",
        "rendering: exact fraction", "rendering: left/right", "rendering: mathrm", "rendering: spaced operators",
        "rendering: text units", "rendering: textbf", "rendering: thousands separator", "rendering: trailing .0",
        "rendering: trailing zero")},
}
SAMPLE = (8, 2)  # sample(problems, *SAMPLE): the committed table and the test use the same corpus


def run(problems: list[tuple[str, str]], grader: Grader) -> tuple[list[Case], list[bool], list[dict[str, bool]]]:
    """Build the corpus of `problems`, grade it with `grader` and with verl's functions (concurrently)."""
    from rewards.decoys import make_decoys

    base = build_corpus(problems)
    first = start_verl(base)  # verl scores the renderings while the decoys are made
    extra = decoy_cases(problems, make_decoys([gold for _, gold in problems], grader))
    second = start_verl(extra)
    cases = base + extra
    ours = [g.correct for g in grader.grade([c.response for c in cases], [c.gold for c in cases])]
    return cases, ours, verl_scores(first) + verl_scores(second)


def table_rows(cases: list[Case], ours: list[bool], verl: list[dict[str, bool]]) -> list[dict]:
    """The disagreement table: one row per disagreement (TABLE_FIELDS), reason from REASONS ('' if none)."""
    return [{**row, "reason": REASONS.get((row["verl_fn"], row["kind"]), "")}
            for row in disagreements(cases, ours, verl)]


def write_table(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_table(path: Path) -> list[dict]:
    """The committed table, booleans parsed."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("expected", "twinarm", "verl"):
            row[key] = row[key] == "True"
    return rows
