"""Decoys (rewards.decoys): near-miss rules, determinism, and that a decoy never grades equal to its gold."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.spec import GraderSpec
from rewards.decoys import as_number, candidates, decoy_facts, make_decoy, make_decoys, ordered_candidates, \
    text_moves
from rewards.golds import extract_gold
from rewards.grader import Grader, get_grader, grade_one
from rewards.scorer import PieceTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_decoy_ok(gold: str, decoy: str | None, required: bool = True) -> None:
    """A decoy differs from its gold as a string, as a number and under the grader (checked in-process)."""
    if decoy is None:
        assert not required, f"no decoy for {gold!r}"
        return
    assert re.sub(r"\s+", "", decoy) != re.sub(r"\s+", "", gold)
    a, b = as_number(decoy), as_number(gold)
    assert a is None or b is None or a != b
    grade = grade_one(f"The answer is \\boxed{{{decoy}}}.", gold)
    assert grade.extracted == decoy and not grade.correct and not grade.timed_out, (gold, decoy, grade)


# ---------------------------------------------------------------- rules

@pytest.mark.parametrize("gold, expected", [
    ("7", {"8", "6", "9", "5", "12", "2", "17", "-3", "-7"}),
    ("-7", {"-6", "-8", "-5", "-9", "-2", "-12", "3", "-17", "7"}),
    ("0.5", {"0.6", "0.4", "1.0", "0.0", "1.5", "-0.5"}),
    ("\\frac{3}{4}", {"\\frac{4}{3}", "\\frac{4}{4}", "\\frac{3}{5}", "\\frac{3}{6}", "\\frac{3}{9}", "\\frac{3}{14}",
                      "\\frac{3}{3}", "\\frac{3}{2}", "-\\frac{3}{4}"}),
    ("3/4", {"4/3", "4/4", "3/5", "3/3", "3/2", "3/6", "3/9", "3/14", "-3/4"}),
    ("2\\pi", {"2", "3\\pi", "1\\pi", "4\\pi", "7\\pi", "12\\pi", "-2\\pi"}),
    ("\\frac{\\pi}{4}", {"\\frac{1}{4}", "\\frac{4}{\\pi}", "\\frac{\\pi}{5}", "\\frac{\\pi}{3}", "\\frac{\\pi}{6}",
                         "\\frac{\\pi}{2}", "\\frac{\\pi}{9}", "\\frac{\\pi}{14}", "-\\frac{\\pi}{4}"}),
    ("2\\sqrt{3}", {"2\\cdot 3", "2\\sqrt{4}", "2\\sqrt{2}", "2\\sqrt{5}", "2\\sqrt{1}", "2\\sqrt{8}", "2\\sqrt{13}",
                    "-2\\sqrt{3}"}),
    ("\\sqrt{x+1}", {"(x+1)", "\\sqrt{x+2}", "\\sqrt{x+3}", "\\sqrt{x+6}", "\\sqrt{x+11}", "-\\sqrt{x+1}"}),
    ("x=3", {"x=4", "x=2", "x=5", "x=1", "x=8", "x=13", "x=-3"}),
    ("(1, 2)", {"(1, 3)", "(1, 1)", "(1, 4)", "(1, 7)", "(1, 12)"}),  # no sign flip for a tuple
    ("\\text{Evelyn}", set()),
])
def test_candidate_rules(gold, expected):
    assert set(candidates(gold)) == expected


def test_filters_drop_candidates_equal_as_string_or_number():
    assert "-0" not in ordered_candidates("0")  # equal as a number
    assert "\\frac{2}{2}" not in ordered_candidates("\\frac{2}{2}")  # swapping an equal fraction: same string
    assert "\\frac{4}{4}" not in ordered_candidates("1")
    assert not any(as_number(c) == 1 for c in ordered_candidates("\\frac{3}{3}"))


def test_order_is_seeded_by_the_gold():
    first = [ordered_candidates(g) for g in ("7", "0.5", "\\frac{3}{4}")]
    assert first == [ordered_candidates(g) for g in ("7", "0.5", "\\frac{3}{4}")]
    assert len({tuple(ordered_candidates(str(n))[:3]) for n in range(100, 140)}) > 5  # not one fixed order


def test_decoys_are_stable_across_processes_and_hash_seeds():
    golds = ["7", "-12", "1520", "0.5", "\\frac{3}{4}", "2\\pi", "x=3", "\\sqrt{53}"]
    code = ("import json, sys; from rewards.decoys import ordered_candidates, make_decoys; "
            "g = json.loads(sys.argv[1]); print(json.dumps([[ordered_candidates(x) for x in g], "
            "make_decoys(g[:3])]))")
    here = [[ordered_candidates(g) for g in golds], make_decoys(golds[:3])]
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(golds)], capture_output=True, text=True,
                             check=True, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert json.loads(out) == here


def test_plain_integers_never_call_the_grader():
    class NoGrader:
        cfg = GraderSpec()

        def grade(self, responses, golds):
            raise AssertionError("the integer fast path must not grade")

    golds = ["7", "-12", "0", "999999999999999", "-000"]
    for gold, decoy in zip(golds, make_decoys(golds, grader=NoGrader())):
        assert_decoy_ok(gold, decoy)  # and the grader, asked afterwards, agrees


def test_same_decoy_for_every_rollout_and_none_without_candidates():
    assert make_decoys(["\\frac{3}{4}"] * 8) == [make_decoy("\\frac{3}{4}")] * 8
    assert make_decoy("\\infty") is None  # no number, no word, no sign to flip: no near-miss


@pytest.mark.parametrize("gold, decoy", [
    ("\\text{Evelyn}", "\\text{Evelyo}"),  # the last letter of the last word moves on by one
    ("\\text{even}", "\\text{odd}"),  # an opposite word comes first
    ("\\text{East}", "\\text{West}"),  # case kept
    ("\\text{(C)}", "\\text{(D)}"),
    ("\\textbf{(E)}", "\\textbf{(F)}"),
    ("\\mathrm{yes}", "\\mathrm{no}"),
    ("Yes", "No"),  # a word has no sign: never "-Yes"
    ("\\text{Paz}", "\\text{Paa}"),  # z wraps to a
])
def test_text_answers_fall_back_to_a_word_near_miss(gold, decoy):
    assert candidates(gold) == []
    assert make_decoy(gold) == decoy
    assert_decoy_ok(gold, decoy)


def test_fallbacks_come_after_every_rule_candidate():
    assert text_moves("18 \\text{ cm}") == ["18 \\text{ cn}"]
    order = ordered_candidates("18 \\text{ cm}")
    assert order[-1] == "18 \\text{ cn}" and all("cm" in c for c in order[:-1])


@pytest.mark.parametrize("gold, expected", [
    ("10,\\!080", {"10,\\!081", "10,\\!079", "10,\\!082", "10,\\!078", "10,\\!085", "10,\\!075", "10,\\!090",
                   "10,\\!070"}),
    ("1{,}000", {"1{,}001", "999", "1{,}002", "998", "1{,}005", "995", "1{,}010", "990"}),
    ("-2,500", {"-2,499", "-2,501", "-2,498", "-2,502", "-2,495", "-2,505", "-2,490", "-2,510"}),
    ("1\\,000\\,000", {"1\\,000\\,001", "999\\,999", "1\\,000\\,002", "999\\,998", "1\\,000\\,005", "999\\,995",
                       "1\\,000\\,010", "999\\,990"}),
    ("12,345 \\text{ dollars}", {f"12,{n} \\text{{ dollars}}" for n in (346, 344, 347, 343, 350, 340, 355, 335)}),
    ("007", {"008", "006", "009", "005", "012", "002", "017", "-3", "-007"}),  # leading zeros kept
])
def test_numbers_move_as_whole_well_formed_numbers(gold, expected):
    assert set(candidates(gold)) == expected
    assert_decoy_ok(gold, make_decoy(gold))


def test_decoys_of_the_golds_token_length_come_first():
    tok = PieceTokenizer()  # one character per token, \boxed{ one token
    # 16: ±1 ±2 ±5 (2 digits) match \boxed{16}; 6 and 26 also; -16 (3 tokens) and the like do not
    order = ordered_candidates("16", tok)
    lengths = [len(tok.encode(f"\\boxed{{{c}}}")) for c in order]
    n = len(tok.encode("\\boxed{16}"))
    k = lengths.index(next(x for x in lengths if x != n))
    assert k > 0 and all(x == n for x in lengths[:k]) and all(x != n for x in lengths[k:])
    # within each group the gold's RNG order is kept
    plain = ordered_candidates("16")
    assert order[:k] == [c for c in plain if len(tok.encode(f"\\boxed{{{c}}}")) == n]
    # -2: every candidate with one digit after the sign, never 3 or 8 (2 tokens)
    assert all(len(tok.encode(f"\\boxed{{{make_decoy(g, tokenizer=tok)}}}")) == len(tok.encode(f"\\boxed{{{g}}}"))
               for g in ("-2", "16", "9", "-10", "999", "0.5", "\\frac{3}{4}", "10,\\!080"))


def test_length_choice_is_deterministic_and_shared_by_a_problems_rollouts():
    tok = PieceTokenizer()
    golds = ["-2", "16", "0.5", "\\frac{3}{4}"] * 4
    first = make_decoys(golds, tokenizer=tok)
    assert first == make_decoys(golds, tokenizer=tok) and first[:4] * 4 == first
    code = ("import json, sys; from rewards.decoys import make_decoys; from rewards.scorer import PieceTokenizer; "
            "print(json.dumps(make_decoys(json.loads(sys.argv[1]), tokenizer=PieceTokenizer())))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(golds)], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "7"}).stdout
    assert json.loads(out) == first


def test_decoy_facts_count_the_pairs_pmishift_can_score():
    tok = PieceTokenizer()
    facts = decoy_facts(["16", "16", "16", "\\text{x}"], ["-2", "-12", None, "\\text{y}"], tok)
    # -2 matches \boxed{16} in length; -12 does not; None has no pair; \text{y} matches
    assert facts == {"decoys/problems": 4, "decoys/none": 1, "decoys/scorable": 2, "decoys/scorable_share": 0.5}
    with pytest.raises(ValueError, match="2 golds but 1 decoys"):
        decoy_facts(["1", "2"], ["3"], tok)


def test_the_grader_filter_is_the_graders_own_call():
    # math-verify parses this gold (trailing period) as 0, and so every candidate, which keeps the period:
    # string and number say "different", the grader says "equal" -> no decoy.
    gold = "(-\\infty, 0) \\cup\\{1\\}."
    assert candidates(gold)
    assert all(grade_one(f"\\boxed{{{c}}}", gold).correct for c in candidates(gold))
    assert make_decoy(gold) is None


def test_a_candidate_the_grader_cannot_settle_is_never_the_decoy():
    fast = Grader(GraderSpec(timeout_s=0.3, workers=2))
    try:
        assert make_decoy("10^{10^{10}}", grader=fast) is None  # parsing the gold hangs: every candidate times out
        assert fast.facts()["counts"]["timeouts"] >= 2
    finally:
        fast.close()


# ---------------------------------------------------------------- properties: never equal under the grader

@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=-10**25, max_value=10**25))
def test_integer_decoys(n):
    gold = str(n)
    assert_decoy_ok(gold, make_decoy(gold))


@SLOW
@given(st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_decimal_decoys(d):
    gold = format(d, "f")
    assert_decoy_ok(gold, make_decoy(gold))


@SLOW
@given(st.integers(1, 60), st.integers(1, 60), st.sampled_from(["\\frac", "\\dfrac", "slash"]), st.booleans())
def test_fraction_decoys(num, den, form, negative):
    gold = f"{num}/{den}" if form == "slash" else f"{form}{{{num}}}{{{den}}}"
    gold = "-" + gold if negative else gold
    assert_decoy_ok(gold, make_decoy(gold))


LATEX_FORMS = st.one_of(
    st.builds(lambda k: f"{k}\\pi", st.integers(1, 20)),
    st.builds(lambda k, m: f"\\frac{{{k}\\pi}}{{{m}}}", st.integers(1, 12), st.integers(2, 12)),
    st.builds(lambda k, m: f"{k}\\sqrt{{{m}}}", st.integers(1, 20), st.integers(2, 50)),
    st.builds(lambda a, b, c: f"{a} + {b}\\sqrt{{{c}}}", st.integers(1, 9), st.integers(1, 9), st.integers(2, 30)),
    st.builds(lambda v, n: f"{v} = {n}", st.sampled_from("xyk"), st.integers(-50, 50)),
    st.builds(lambda a, b: f"({a}, {b})", st.integers(-20, 20), st.integers(-20, 20)),
    st.builds(lambda n: f"{n}^\\circ", st.integers(1, 359)),
    st.builds(lambda n: f"{n}\\text{{ cm}}", st.integers(1, 500)),
    st.builds(lambda a, b: f"x^{{{a}}} + {b}", st.integers(2, 5), st.integers(1, 20)),
)


@SLOW
@given(LATEX_FORMS)
def test_latex_decoys(gold):
    assert_decoy_ok(gold, make_decoy(gold))


# ---------------------------------------------------------------- the real benchmark golds

def test_real_golds_never_grade_equal_to_their_decoys(benchmarks_dir):
    golds = []
    for source in ("gsm8k", "math500", "aime24", "amc23", "minerva_math", "olympiadbench"):
        lines = (benchmarks_dir / f"{source}.jsonl").read_text().splitlines()
        golds += [extract_gold(source, json.loads(line)) for line in lines]
    golds = list(dict.fromkeys(golds))
    integers = [g for g in golds if re.fullmatch(r"-?\d+", g)]
    # Non-integer golds cost a grader round trip each, and a wrong answer is the slow path of math-verify
    # (symbolic simplification): a deterministic 1/12 of them, by content hash.
    others = [g for g in golds if g not in set(integers)
              and int(hashlib.sha256(g.encode()).hexdigest(), 16) % 12 == 0]
    assert len(integers) > 500 and len(others) > 40
    grader = get_grader(GraderSpec())
    int_decoys = make_decoys(integers)
    assert None not in int_decoys
    grades = grader.grade([f"\\boxed{{{d}}}" for d in int_decoys], integers)  # the integer fast path vs the grader
    assert not any(g.correct or g.timed_out or g.error for g in grades)
    for gold, decoy in zip(others, make_decoys(others)):
        assert_decoy_ok(gold, decoy, required=bool(re.search(r"\d|\\pi|\\sqrt", gold)))
