"""MASA meta-prediction rewards as pure functions (DESIGN §6).

A meta-prediction rollout answers, before solving, with a JSON object
`{"notions": [...], "pass_rate": 0..8, "solution_length": tokens}`: the key notions a solution needs, how many of
8 solutions it expects to be correct, and how long a correct solution will be. Its reward compares the
prediction with the true statistics of the same prompt's solution rollouts:
- r_length = 1[min correct length ≤ predicted length ≤ max correct length] (0 when no solution is correct);
- r_difficulty = b^|pass_rate/8 − true pass rate| (b = 0.01: 1 when exact, 0.01 when off by everything);
- r_notion = share of the predicted notions (normalised, those already in the problem dropped) that occur in a
  larger share of the correct solutions than of the incorrect ones;
- the meta reward is the mean of the three.
MASA-efficient uses the predictions before solving: `gate` skips prompts the M predictions agree are all-right or
all-wrong, `cutoff_length` stops solution rollouts at factor × the predicted length. The DAgger-style expert SFT
(best meta trajectories with the true statistics substituted, `substitute_prediction`) is a training step, in
rl/masa.py with the rollouts and the gating.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from meta.grammar import META_CLOSE, META_OPEN

PASS_MAX = 8  # pass_rate is a count out of 8 solutions


def meta_prompt(problem: str, vocabulary: Sequence[str] | None = None) -> str:
    """The meta-prediction prompt (the one template: rl/masa.py prompts with it, sft/masa_demos.py demonstrates it):
    the problem and the instruction to predict, after a meta block, the notions (from `vocabulary` when the world
    defines one), the pass rate out of PASS_MAX and the length of a correct solution, as one JSON object. Kept
    short (~180 toy-tokenizer tokens with the arith vocabulary): its length is paid in every meta rollout's
    generation and update."""
    choose = f" from: {', '.join(vocabulary)}" if vocabulary else ""
    return (f"Predict, do not solve: think in {META_OPEN}{META_CLOSE}, then JSON with notions (needed, not "
            f"stated{choose}), pass_rate (correct of {PASS_MAX}) and solution_length (tokens).\n\nProblem: {problem}")


@dataclass(frozen=True)
class MetaPrediction:
    notions: tuple[str, ...]
    pass_rate: float  # 0..8
    solution_length: float  # tokens, > 0


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _validate(obj: Any) -> MetaPrediction | None:
    if not isinstance(obj, dict):
        return None
    notions, rate, length = obj.get("notions"), _number(obj.get("pass_rate")), _number(obj.get("solution_length"))
    if not isinstance(notions, list) or not all(isinstance(n, str) for n in notions):
        return None
    if rate is None or not 0 <= rate <= PASS_MAX or length is None or length <= 0:
        return None
    return MetaPrediction(tuple(notions), rate, length)


def prediction_span(text: str) -> tuple[int, int, MetaPrediction] | None:
    """The last valid prediction object in the text (bare JSON, fenced, or embedded in prose) and its character
    span [start, end); None if none."""
    decoder = json.JSONDecoder()
    found = None
    for m in re.finditer(r"\{", text):
        try:
            obj, end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if (pred := _validate(obj)) is not None:
            found = (m.start(), end, pred)
    return found


def parse_prediction(text: str) -> MetaPrediction | None:
    """The last valid prediction object in the text (bare JSON, fenced, or embedded in prose); None if none."""
    found = prediction_span(text)
    return found[2] if found else None


def substitute_prediction(text: str, pred: MetaPrediction) -> str:
    """The text with its last valid prediction object replaced by `pred` as JSON (MASA's expert trajectory: the
    model's own reasoning with the true statistics substituted), whole numbers written as integers. Raises
    ValueError when the text has none."""
    found = prediction_span(text)
    if found is None:
        raise ValueError("no valid prediction object in the text to substitute")
    start, end, _ = found
    obj = {"notions": list(pred.notions), "pass_rate": _plain(pred.pass_rate),
           "solution_length": _plain(pred.solution_length)}
    return text[:start] + json.dumps(obj) + text[end:]


def _plain(x: float) -> float | int:
    """A whole number as an int (JSON '7', not '7.0': the template asks for counts; behaviour-cloning '7.0' taught
    the toy model '220.0.0.0.0' within 12 steps), anything else unchanged."""
    return int(x) if float(x).is_integer() else x


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation dropped."""
    return re.sub(r"\s+", " ", text.lower()).strip(" \t\n.,;:!?\"'`()[]{}")


def _contains(haystack: str, notion: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(notion) + r"(?!\w)", haystack) is not None


def r_length(predicted: float, correct_lengths: Sequence[int]) -> float:
    if not correct_lengths:
        return 0.0
    return float(min(correct_lengths) <= predicted <= max(correct_lengths))


def r_difficulty(predicted_pass: float, pass_rate: float, base: float = 0.01) -> float:
    return base ** abs(predicted_pass / PASS_MAX - pass_rate)


def r_notion(notions: Sequence[str], problem: str, correct: Sequence[str], incorrect: Sequence[str]) -> float:
    problem_n = normalise(problem)
    kept = [n for n in dict.fromkeys(normalise(n) for n in notions) if n and not _contains(problem_n, n)]
    if not kept:
        return 0.0

    def share(n: str, texts: list[str]) -> float:
        return sum(_contains(t, n) for t in texts) / len(texts) if texts else 0.0

    good, bad = [normalise(t) for t in correct], [normalise(t) for t in incorrect]
    return sum(share(n, good) > share(n, bad) for n in kept) / len(kept)


def meta_reward(pred: MetaPrediction, problem: str, solutions: Sequence[str], correct: Sequence[bool],
                lengths: Sequence[int], base: float = 0.01) -> dict[str, float]:
    """The three components and their mean for one prediction against one prompt's solution rollouts."""
    if not solutions or not len(solutions) == len(correct) == len(lengths):
        raise ValueError("need one correct flag and one length per solution, and at least one solution")
    parts = {
        "r_length": r_length(pred.solution_length, [n for n, ok in zip(lengths, correct) if ok]),
        "r_difficulty": r_difficulty(pred.pass_rate, sum(correct) / len(correct), base),
        "r_notion": r_notion(pred.notions, problem, [s for s, ok in zip(solutions, correct) if ok],
                             [s for s, ok in zip(solutions, correct) if not ok]),
    }
    return {**parts, "reward": sum(parts.values()) / 3}


def gate(preds: Sequence[MetaPrediction | None], gate_std: float = 0.1) -> bool:
    """True = skip the prompt: every prediction valid, their pass rates (as fractions) agree (std < gate_std,
    population std) and their mean rounds to all-wrong (0) or all-right (8)."""
    if not preds or any(p is None for p in preds):
        return False
    rates = [p.pass_rate / PASS_MAX for p in preds]
    return statistics.pstdev(rates) < gate_std and round(statistics.fmean(rates) * PASS_MAX) in (0, PASS_MAX)


def cutoff_length(preds: Sequence[MetaPrediction | None], factor: float = 2.0, max_length: int | None = None
                  ) -> int | None:
    """Early cutoff for the solution rollouts: factor × the mean predicted length; None without a valid
    prediction (then the spec's max response length applies)."""
    lengths = [p.solution_length for p in preds if p is not None]
    if not lengths:
        return None
    cut = math.ceil(factor * statistics.fmean(lengths))
    return min(cut, max_length) if max_length is not None else cut
