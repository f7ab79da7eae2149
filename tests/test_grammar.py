"""Properties of the meta-block grammar (meta/grammar.py) on adversarial text, plus the DESIGN §7 hand cases."""
from __future__ import annotations

import dataclasses
import re
import time

import pytest
from hypothesis import assume, example, given, settings, strategies as st

from meta.grammar import META_CLOSE, META_OPEN, Boxes, char_regions, cue_categories, find_blocks, find_boxes, \
    format_class, has_tags, last_boxed, parse_confidence, split_first_block, strip_meta

O, C = META_OPEN, META_CLOSE
# Pieces that combine into nested/unclosed/stray tags, tags split by other tags, tags inside \boxed, and unicode
# that is easy to get wrong (combining marks, RTL text and marks, emoji, NUL).
PIECES = [O, C, O, C, "<|", "|>", "meta", "/", "<|me", "ta|>", "<|/me", "\\boxed{", "\\fbox {", "{", "}", "\\",
          "confidence: 0.9", "Confidence 80%", "confidence:", " ", "\n", "x", "7", "check", "wait", "e\u0301",
          "\u05e9\u05dc\u05d5\u05dd", "\u200f", "\u202e", "😀", "👩‍👩‍👧", "\x00"]
adversarial = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=40).map("".join)
quick = settings(max_examples=150, deadline=None)


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(ch in it for ch in short)


@quick
@given(adversarial)
@example("<|me<|/meta|>ta|>")  # a tag that forms only once another is removed
@example(f"<|/me{O}x{C}ta|>")
def test_strip_meta_leaves_no_tag_is_idempotent_and_only_deletes(text):
    out = strip_meta(text)
    assert O not in out and C not in out
    assert strip_meta(out) == out
    assert _is_subsequence(out, text)


@quick
@given(st.text())
def test_text_without_tags_is_untouched(text):
    assume(not has_tags(text))
    assert strip_meta(text) == text
    assert find_blocks(text) == [] and split_first_block(text) is None
    assert format_class(text) == "none" and format_class(text, truncated=True) == "none"
    assert char_regions(text) == ([(0, len(text), "answer")] if text else [])


@quick
@given(adversarial)
def test_find_blocks_spans_are_ordered_disjoint_and_tag_free(text):
    cursor = 0
    for b in find_blocks(text):
        assert cursor <= b.start < b.content_start <= b.content_end < b.end <= len(text)
        assert text[b.start:b.content_start] == O and text[b.content_end:b.end] == C
        assert b.content == text[b.content_start:b.content_end]
        assert O not in b.content and C not in b.content
        if b.confidence_span:
            assert b.content_start <= b.confidence_span[0] < b.confidence_span[1] <= b.content_end
        cursor = b.end


@quick
@given(adversarial)
def test_char_regions_partition_the_text(text):
    regions = char_regions(text)
    assert [s for s, _, _ in regions] + [len(text)] == [0] + [e for _, e, _ in regions]  # contiguous, [0, len)
    assert all(s < e for s, e, _ in regions)
    inside = [(b.start, b.end) for b in find_blocks(text)]
    for s, e, region in regions:
        if region in ("meta", "confidence"):
            assert any(bs <= s and e <= be for bs, be in inside)
        if region == "format":
            assert text[s:e] in (O, C)


@quick
@given(adversarial)
def test_removing_non_answer_regions_agrees_with_strip_meta(text):
    kept = "".join(text[s:e] for s, e, region in char_regions(text) if region == "answer")
    assert strip_meta(kept) == strip_meta(text)
    if not has_tags(kept):  # no tag formed by joining: the regions are exactly what strip_meta removes
        assert strip_meta(text) == kept


@quick
@given(adversarial, st.sampled_from(["confidence: 0.9", " Confidence = 70%", "confidence 0.1\n"]))
def test_confidence_outside_a_closed_block_is_ignored(text, statement):
    assert find_blocks(text + statement) == find_blocks(text)
    assert find_blocks(statement + " " + text) == [
        dataclasses.replace(b, **_shift(b, len(statement) + 1)) for b in find_blocks(text)]


def _shift(b, k):
    span = (b.confidence_span[0] + k, b.confidence_span[1] + k) if b.confidence_span else None
    return {"start": b.start + k, "end": b.end + k, "content_start": b.content_start + k,
            "content_end": b.content_end + k, "confidence_span": span}


def test_confidence_hand_cases():
    assert [b.confidence for b in find_blocks(f"confidence: 0.9 {O}check{C} {O}confidence: 80%{C}")] == [None, 0.8]
    assert find_blocks(f"{O}confidence: 0.9") == []  # unclosed: no block, no confidence
    assert find_blocks(f"{O}a {O}confidence: 0.3{C}")[0].confidence == 0.3  # the inner, closed one
    assert parse_confidence("confidence: 0.55") == (0.55, (0, 16))
    assert parse_confidence("Confidence = 80 %") == (0.8, (0, 17))
    assert parse_confidence("confidence: 0.9 \n next") == (0.9, (0, 15))  # the span stops at the number
    assert parse_confidence("confidence: 1000") == (None, None)  # not read as 100
    assert parse_confidence("confidence: 0.2 then confidence: 0.7")[0] == 0.7  # the last statement
    assert parse_confidence("lowconfidence: 0.7") == (None, None)
    block = find_blocks(f"{O}unsure. confidence: 0.6\n{C}")[0]
    assert block.content[slice(*(i - block.content_start for i in block.confidence_span))] == "confidence: 0.6"


@pytest.mark.parametrize("text, truncated, max_blocks, expected", [
    ("plain", False, 1, "none"),
    (f"a {O}check{C} b", False, 1, "wellformed"),
    (f"a {O}{C} b", False, 1, "wellformed"),  # an empty block is still one open + one close
    (f"a {O}check", False, 1, "drift"),
    (f"a {O}check", True, 1, "truncation"),
    (f"{O}a{C}{O}b{C}", False, 1, "discard"),  # two blocks where the spec allows one
    (f"{O}a{C}{O}b{C}", False, 2, "wellformed"),
    (f"{O}a{O}b{C}{C}", False, 2, "discard"),  # nested
    (f"a {C} b", False, 1, "discard"),  # stray close
    (f"{C}{O}a", True, 1, "discard"),
    (f"{O}a{C} b {O}c", True, 1, "discard"),
])
def test_format_classes(text, truncated, max_blocks, expected):
    assert format_class(text, truncated=truncated, max_blocks=max_blocks) == expected


def test_nested_unclosed_and_stray_tags():
    nested = f"a{O}b{O}c{C}d{C}e"
    assert [b.content for b in find_blocks(nested)] == ["c"]  # the outer open is overridden: not a block
    assert strip_meta(nested) == "abde"
    assert split_first_block(f"p{O}m{C}c{O}n{C}") == ("p", f"{O}m{C}", f"c{O}n{C}")
    assert strip_meta(f"x{O}y") == "xy" and strip_meta(f"x{C}y{C}") == "xy"
    # tags that only form once a block or a tag is removed are removed too
    assert strip_meta("<|me<|/meta|>ta|>") == "" and strip_meta(f"<|me{O}x{C}ta|>") == ""
    deep = "<|me" * 50 + O + "ta|>" * 50
    assert strip_meta(deep) == ""


def test_tags_inside_boxed():
    text = f"so \\boxed{{4{O}check{C}}}"
    assert last_boxed(text) == f"4{O}check{C}"
    assert last_boxed(strip_meta(text)) == "4"


def test_unicode_keeps_offsets():
    text = f"שלום e\u0301 😀 {O}wait, é\u0301 👩‍👩‍👧 confidence: 0.5{C} \u202eend"
    (b,) = find_blocks(text)
    assert text[b.start:b.end].startswith(O) and "redirect" in b.categories and b.confidence == 0.5
    assert strip_meta(text) == "שלום e\u0301 😀  \u202eend"


def test_cue_categories_are_whole_words_case_insensitive():
    assert cue_categories("Let me CHECK; wait, a sign slip. Maybe.") == {"verify", "redirect", "diagnosis",
                                                                         "uncertainty"}
    assert cue_categories("checkpoint waiting signs") == frozenset()
    assert cue_categories("double-check it") == {"verify"}


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{5}", "5"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\boxed{3}}", "3"),  # the last \\boxed is the inner one
    ("\\boxed{5} and \\boxed{6", None),  # the last never closes: no answer (truncated)
    ("\\boxed{6", None),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not count
    ("\\boxed{a}}}", "a"),
    ("\\fbox {x}", "x"),
    ("\\boxed 5", "5"),  # brace-less: the next token
    ("$\\boxed 12.5$.", "12.5"),
    ("\\boxed{5} \\boxed", None),
    ("\\boxedx{5}", None),  # another command
    ("no box {here}", None),
    ("\\boxed{}", ""),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_find_boxes_reports_truncation_and_spans():
    text = "a \\boxed{1}, \\boxed 2 and \\boxed{3"
    boxes = find_boxes(text)
    assert boxes.contents == ("1", "2") and boxes.truncated
    assert [text[s:e] for s, e in boxes.spans] == ["\\boxed{1}", "\\boxed 2"]
    assert find_boxes("\\boxed 2", braceless=False) == Boxes((), (), False)
    assert find_boxes("\\fbox{2}", commands=("boxed",)) == Boxes((), (), False)


def _last_boxed_reference(text):
    """The straightforward rescan (quadratic on unbalanced input) of the last braced box; the fast version must
    agree with it on braced boxes."""
    opens = list(re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*\{", text))
    if not opens:
        return None
    m = opens[-1]
    depth, i = 1, m.end()
    while i < len(text) and depth:
        if text[i] == "\\" and i + 1 < len(text):
            i += 2
            continue
        depth += (text[i] == "{") - (text[i] == "}")
        i += 1
    return text[m.end():i - 1] if depth == 0 else None


@quick
@given(st.lists(st.sampled_from(["\\boxed{", "\\boxed {", "\\fbox{", "{", "}", "\\", "\\\\", "\\{", "\\}", "x", "7",
                                 " ", O]), max_size=30).map("".join))
def test_last_boxed_matches_reference(text):
    assert last_boxed(text, braceless=False) == _last_boxed_reference(text)


LONG = {  # each ≥ 100k characters; each was quadratic somewhere before (seconds to minutes)
    "many_blocks": f"{O}c{C} " * 8000,
    "stray_tags": (C + O + "a") * 6000,
    "nested_fragments": "<|me" * 20000 + O + "ta|>" * 20000,
    "unclosed_boxed": "\\boxed{" * 20000,
    "unicode": f"e\u0301😀שלום {O}confidence: 0.5 wait{C}" * 3000,
}


@pytest.mark.parametrize("name", sorted(LONG))
def test_long_inputs_stay_fast(name):
    text = LONG[name]
    assert len(text) >= 100_000
    start = time.perf_counter()
    stripped = strip_meta(text)
    regions = char_regions(text)
    format_class(text)
    split_first_block(text)
    last_boxed(text)
    elapsed = time.perf_counter() - start
    assert not has_tags(stripped) and regions[-1][1] == len(text)
    assert elapsed < 5, f"{name}: {elapsed:.1f}s"  # linear work is ~0.1 s; the quadratic versions took >20 s
