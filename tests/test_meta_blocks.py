"""sft.meta_blocks: placebo block contents (fixed, shuffled) change only the text between the tags, so the stripped
twin of a placebo row is the stripped twin of the original row."""
from __future__ import annotations

import typing

import pytest

from infra.errors import DataError
from infra.spec import _VALUE_MECHANISMS, SFTSpec
from meta.grammar import find_blocks, stated_confidence
from sft.meta_blocks import META_BLOCK_FORMS, NEUTRAL_CONTENT, meta_block_form
from sft.twins import strip_row


def row(i: int, blocks: list[str], prefix_blocks: int = 0) -> dict:
    """A response with a block after each step; the first `prefix_blocks` blocks lie in the wrong prefix."""
    parts = [f"{i}+{k}={i + k}|\n<|meta|>{b}<|/meta|>" for k, b in enumerate(blocks)]
    response = "".join(parts) + f"\\boxed{{{i}}}"
    return {"id": f"r{i}", "domain": "addsub", "answer": str(i),
            "messages": [{"role": "user", "content": f"<|meta|>context {i}<|/meta|> compute {i}"},
                         {"role": "assistant", "content": response}],
            "wrong_prefix": "".join(parts[:prefix_blocks]) or None}


ROWS = [row(0, ["check 0+0: 0. confidence: 0.9"], prefix_blocks=1), row(1, []),
        row(2, ["check 2+0: 2, not 3, redo", "check 2+1: 3"]), row(3, ["check 3+0: 3. confidence: 0.7"]),
        row(4, ["check 4+0: 4"])]


def contents(r: dict) -> list[str]:
    return [b.content for b in find_blocks(r["messages"][-1]["content"])]


def test_every_value_of_the_key_has_a_form_and_a_mechanism_entry():
    values = set(typing.get_args(SFTSpec.model_fields["meta_blocks"].annotation))
    assert values == set(META_BLOCK_FORMS) == set(_VALUE_MECHANISMS["sft.meta_blocks"])


def form(kind: str, rows: list[dict], seed: int = 0, where: str = "sft rows") -> list[dict]:
    out, facts = meta_block_form(rows, kind, where, seed)
    assert facts["meta_blocks"] == kind
    return out


@pytest.mark.parametrize("kind", ["as_written", "fixed", "empty", "line_end", "response_end", "shuffled"])
def test_stripped_twin_of_a_placebo_row_is_the_stripped_twin_of_the_row(kind):
    out = form(kind, ROWS, seed=3)
    assert [r["id"] for r in out] == [r["id"] for r in ROWS]
    assert [strip_row(r) for r in out] == [strip_row(r) for r in ROWS]
    for before, after in zip(ROWS, out):
        assert len(contents(after)) == len(contents(before))  # positions kept: one block for one block
        assert after["messages"][0] == before["messages"][0]  # the prompt's block is context, left as written
        wp = after["wrong_prefix"]
        assert wp is None or after["messages"][-1]["content"].startswith(wp)


def test_fixed_puts_one_neutral_content_in_every_block():
    out, facts = meta_block_form(ROWS, "fixed")
    assert facts == {"meta_blocks": "fixed", "placebo_blocks": 5}
    assert [contents(r) for r in out] == [[NEUTRAL_CONTENT], [], [NEUTRAL_CONTENT] * 2, [NEUTRAL_CONTENT],
                                          [NEUTRAL_CONTENT]]
    assert out[0]["wrong_prefix"] == f"0+0=0|\n<|meta|>{NEUTRAL_CONTENT}<|/meta|>"
    # neutral: no cue word (meta.grammar.CUES), no digit, no confidence, no decision
    block = find_blocks(out[3]["messages"][-1]["content"])
    assert not block[0].categories and not any(ch.isdigit() for ch in NEUTRAL_CONTENT)
    assert stated_confidence(block) is None and block[0].decision is None


E = "<|meta|><|/meta|>"  # an empty block


def test_empty_keeps_every_block_in_place_with_nothing_inside():
    out, facts = meta_block_form(ROWS, "empty")
    assert facts == {"meta_blocks": "empty", "placebo_blocks": 5}
    assert out[2]["messages"][-1]["content"] == f"2+0=2|\n{E}2+1=3|\n{E}\\boxed{{2}}"
    assert out[0]["wrong_prefix"] == f"0+0=0|\n{E}"


@pytest.mark.parametrize("kind,row2,row3", [
    # line_end: each block, emptied, moves to the end of the line it opened (before the line break)
    ("line_end", f"2+0=2|\n2+1=3|{E}\n\\boxed{{2}}{E}", f"3+0=3|\n\\boxed{{3}}{E}"),
    # response_end: every block, emptied, after the answer
    ("response_end", f"2+0=2|\n2+1=3|\n\\boxed{{2}}{E}{E}", f"3+0=3|\n\\boxed{{3}}{E}"),
])
def test_relocated_placebos_move_empty_blocks_and_keep_the_wrong_prefix(kind, row2, row3):
    out, facts = meta_block_form(ROWS, kind)
    assert facts == {"meta_blocks": kind, "placebo_blocks": 5}
    assert [r["messages"][-1]["content"] for r in out[2:4]] == [row2, row3]
    # a block inside the wrong prefix is context: it stays there (emptied), so the prefix is still a prefix
    assert out[0]["wrong_prefix"] == f"0+0=0|\n{E}" and out[0]["messages"][-1]["content"] == f"0+0=0|\n{E}\\boxed{{0}}"
    assert out[1] == {**ROWS[1], "wrong_prefix": None}  # no block: unchanged
    assert out[2]["messages"][0] == ROWS[2]["messages"][0]  # the prompt's block stays as written
    bad = {**ROWS[3], "wrong_prefix": "3+0=3|\n<|meta|>check"}
    with pytest.raises(DataError, match=r"sft1: row id 'r3': a meta block straddles the end of wrong_prefix"):
        meta_block_form([bad], kind, "sft1")


def test_response_end_trains_the_stripped_solution_then_only_empty_blocks():
    # the known null: what the model writes up to its answer is token for token the stripped twin's target
    for before, after in zip(ROWS, form("response_end", ROWS)):
        response, stripped = after["messages"][-1]["content"], strip_row(before)["messages"][-1]["content"]
        wp = after["wrong_prefix"] or ""
        trained, tail = response[len(wp):], stripped[len(strip_row(before)["wrong_prefix"] or ""):]
        assert trained.startswith(tail) and set(trained[len(tail):].split(E)) <= {""}


def test_shuffled_permutes_contents_across_rows_never_within_one():
    before = {c: r["id"] for r in ROWS for c in contents(r)}
    for seed in range(6):
        out = form("shuffled", ROWS, seed=seed)
        moved = [c for r in out for c in contents(r)]
        assert sorted(moved) == sorted(before)  # a permutation of the contents as written
        assert all(before[c] != r["id"] for r in out for c in contents(r))  # each from another row
        assert out[0]["messages"][-1]["content"].startswith(out[0]["wrong_prefix"])
    assert form("shuffled", ROWS, 5) == form("shuffled", ROWS, 5)  # seeded
    assert len({tuple(c for r in form("shuffled", ROWS, s) for c in contents(r)) for s in range(6)}) > 1


def test_shuffled_refuses_rows_with_too_few_blocks_to_move():
    with pytest.raises(DataError, match=r"sft2: sft.meta_blocks 'shuffled' needs at least 4 blocks .*found 3"):
        form("shuffled", [ROWS[2], ROWS[3]], where="sft2")


def test_a_block_straddling_the_wrong_prefix_is_a_data_error():
    bad = {**ROWS[3], "wrong_prefix": "3+0=3|\n<|meta|>check"}
    with pytest.raises(DataError, match=r"sft1: row id 'r3': a meta block straddles the end of wrong_prefix"):
        form("fixed", [bad], where="sft1")


def test_a_placebo_with_strip_meta_is_refused():
    assert SFTSpec(meta_blocks="fixed").meta_blocks == "fixed"
    with pytest.raises(ValueError, match="meta_blocks 'shuffled' reshapes meta blocks, but strip_meta trains on"):
        SFTSpec(strip_meta=True, meta_blocks="shuffled")
    with pytest.raises(ValueError, match="Input should be 'as_written', 'fixed'"):
        SFTSpec(meta_blocks="random")
    with pytest.raises(ValueError, match="sft.meta_blocks: unknown form 'random'; expected one of as_written, fixed"):
        meta_block_form(ROWS, "random")


@pytest.mark.parametrize("response,tags,blocks", [
    ("1+1=2|\n<|meta|>check 1+1: 2 <|meta|>ok<|/meta|>\\boxed{2}", 3, 1),  # doubled open: 'check 1+1: 2' kept
    ("1+1=2|\n<|meta|>check 1+1: 2\n\\boxed{2}", 1, 0),  # never closed
    ("1+1=2|\ncheck 1+1: 2<|/meta|>\n\\boxed{2}", 1, 0),  # stray close
    ("1+1=2|\n<|meta|>a <|meta|>b<|/meta|> c<|/meta|>\\boxed{2}", 4, 1),  # nested: 'a  c' kept
])
@pytest.mark.parametrize("kind", [k for k in META_BLOCK_FORMS if k != "as_written"])
def test_a_tag_outside_a_closed_block_is_a_data_error_not_a_leaking_placebo(kind, response, tags, blocks):
    # a form rewrites closed blocks only: an unpaired tag's text would stay in the placebo as written
    bad = {**ROWS[4], "messages": [ROWS[4]["messages"][0], {"role": "assistant", "content": response}]}
    with pytest.raises(DataError, match=rf"sft1: row id 'r4': field 'messages\[-1\]\.content': {tags} meta tags "
                                        rf"make {blocks} closed block\(s\).*sft.meta_blocks '{kind}'"):
        meta_block_form([*ROWS, bad], kind, "sft1")
    assert meta_block_form([bad], "as_written")[0] == [bad]  # the rows as written are not reshaped
