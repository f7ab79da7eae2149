"""SFT twins (sft/twins.py): construction, refusals, planted confounds, files, masks projected on characters."""
from __future__ import annotations

import json

import pytest

from infra.artifacts import write_parquet
from infra.errors import DataError
from meta.grammar import META_CLOSE as C, META_OPEN as O
from sft.masks import IGNORE, loss_mask
from sft.twins import TwinCheckError, TwinSet, build_twins, char_mask, load_sft_rows, tag_leaks, trained_chars, \
    verify_twins, write_twins

WP = "5 × 3 = 16"


def row(rid, response, wrong_prefix=None, prompt="What is 3 + 4?", system=None, **meta):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"id": rid, "messages": messages, "wrong_prefix": wrong_prefix, "domain": "add", "level": 1, **meta}


CLEAN = [
    row("plain", "3 + 4 = 7\n\\boxed{7}", answer="7"),
    row("verify", f"3 + 4 = 7\n{O}check: 3 + 4 = 7. confidence: 0.9{C}\n\\boxed{{7}}", answer="7"),
    row("sft2", f"{WP}\n{O}wait, mistake: 5 × 3 = 15{C}\n5 × 3 = 15\n\\boxed{{15}}", WP, prompt="What is 5 × 3?",
        answer="15"),
    row("sft2_block", f"{O}plan: multiply{C}\n{WP}\n{O}wait, mistake{C}\n5 × 3 = 15\n\\boxed{{15}}",
        f"{O}plan: multiply{C}\n{WP}", prompt="What is 5 × 3?", answer="15"),
    row("unicode", f"2 + 2 = 4 {O}verify 😀 e\u0301{C} so \\boxed{{4}}", prompt="Combien font 2 + 2 ? שלום",
        system="Solve it.", answer="4"),
]


@pytest.fixture(scope="module")
def tok():
    from worlds.tokenizer import train_tokenizer

    texts = [m["content"] for r in CLEAN for m in r["messages"]] + ["The answer is 7. the answer"]
    return train_tokenizer(texts * 5, vocab_size=320)


def ids(rows):
    return [r["id"] for r in rows]


# ---------------------------------------------------------------- build and verify

def test_build_twins_strips_only_the_messages():
    twins = build_twins(CLEAN)
    assert twins.refused == []
    assert twins.meta == CLEAN
    assert ids(twins.nometa) == ids(CLEAN)
    for m, n in zip(twins.meta, twins.nometa):
        assert {k: v for k, v in n.items() if k not in ("messages", "wrong_prefix")} == \
               {k: v for k, v in m.items() if k not in ("messages", "wrong_prefix")}
        assert [x["role"] for x in n["messages"]] == [x["role"] for x in m["messages"]]
    by_id = {r["id"]: r for r in twins.nometa}
    assert by_id["plain"] == CLEAN[0]
    assert by_id["verify"]["messages"][-1]["content"] == "3 + 4 = 7\n\n\\boxed{7}"
    assert by_id["sft2"]["wrong_prefix"] == WP
    assert by_id["sft2"]["messages"][-1]["content"] == f"{WP}\n\n5 × 3 = 15\n\\boxed{{15}}"
    assert by_id["sft2_block"]["wrong_prefix"] == f"\n{WP}"
    assert by_id["sft2_block"]["messages"][-1]["content"].startswith(f"\n{WP}\n\n5 × 3 = 15")
    assert by_id["unicode"]["messages"][0] == {"role": "system", "content": "Solve it."}

    report = verify_twins(twins.meta, twins.nometa)
    assert report.passed and report.mask_level == "chars"
    assert [c.name for c in report.checks] == [
        "row_count", "ids_aligned", "metadata_identical", "only_messages_differ", "no_tag_leakage",
        "answers_preserved", "wrong_prefix_exact", "nometa_response_nonempty", "masks_identical"]
    assert report.stats["rows_with_blocks"] == 4 and report.stats["blocks_per_row"] == {"0": 1, "1": 3, "2": 1}
    assert report.stats["categories"] == {"diagnosis": 2, "redirect": 2, "verify": 2}
    assert report.stats["format_classes"] == {"discard": 1, "none": 1, "wellformed": 3}  # two blocks: discard
    assert report.stats["stated_confidences"] == 1 and report.stats["rows_with_wrong_prefix"] == 2
    json.dumps(report.model_dump(mode="json"))


def test_verify_on_tokens_with_the_shared_tokenizer(tok):
    twins = build_twins(CLEAN, tokenizer=tok, max_length=256)
    assert twins.refused == []
    report = verify_twins(twins.meta, twins.nometa, tok, max_length=256)
    assert report.passed and report.mask_level == "tokens" and report.tokenizer
    assert report.check("meta_tokens_in_vocab").passed and report.check("same_tokenizer").passed


def test_a_tokenizer_without_the_meta_tokens_is_refused(tok):
    from worlds.tokenizer import train_tokenizer

    other = train_tokenizer(["3 + 4 = 7"] * 5, vocab_size=300, meta_tokens=("<|m|>", "<|/m|>"))
    twins = build_twins(CLEAN)
    report = verify_twins(twins.meta, twins.nometa, tok, nometa_tokenizer=other)
    assert not report.check("meta_tokens_in_vocab").passed and not report.check("same_tokenizer").passed
    assert report.check("meta_tokens_in_vocab").evidence["single_token_ids"]["nometa"][O] is None


REFUSED_CASES = {
    "answer_inside_block": (f"3 + 4 = 7\n{O}so \\boxed{{7}}{C}", None, {"answers_preserved"}),
    "answer_changes": (f"\\boxed{{6}}\n{O}wait, \\boxed{{7}}{C} ok", None, {"answers_preserved"}),
    "block_inside_boxed": (f"\\boxed{{7{O}check{C}}}", None, {"answers_preserved"}),
    "prefix_ends_in_block": (f"3 + 4 = 8 {O}wait, 3 + 4 = 7{C} \\boxed{{7}}", f"3 + 4 = 8 {O}wait",
                             {"wrong_prefix_exact", "masks_identical"}),
    "broken_tag": ("3 + 4 = 7 <|meta \\boxed{7}", None, {"no_tag_leakage"}),
    "cut_mid_tag": ("3 + 4 = 7 \\boxed{7} <|me", None, {"no_tag_leakage"}),
    "tag_formed_by_joining": (f"<|me{O}x{C}ta|> \\boxed{{7}}", None, {"masks_identical"}),
    "only_meta": (f"{O}\\boxed{{7}}{C}", None, {"answers_preserved", "nometa_response_nonempty"}),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CASES))
def test_untwinnable_rows_are_refused_from_both_sides_with_reasons(case):
    response, wp, expected = REFUSED_CASES[case]
    rows = [CLEAN[0], row(case, response, wp), CLEAN[1]]
    twins = build_twins(rows)
    assert ids(twins.meta) == ids(twins.nometa) == ["plain", "verify"]
    (refusal,) = twins.refused
    assert refusal.id == case and refusal.row == 1
    assert set(refusal.reasons) == expected and all(refusal.reasons.values())
    assert verify_twins(twins.meta, twins.nometa).passed


def test_token_level_refusals(tok):
    merged = row("merge", f"The answ{O}hmm{C}er is \\boxed{{7}}", "The answ")
    assert build_twins([merged]).refused == []  # on characters the masks agree ...
    (refusal,) = build_twins([merged], tokenizer=tok).refused  # ... but " answer" is one token: masked in one twin
    assert set(refusal.reasons) == {"masks_identical"} and "er" in refusal.reasons["masks_identical"]

    long = row("long", f"3 + 4 = 7\n{O}{'check it ' * 20}{C}\n\\boxed{{7}}")
    n_meta = len(loss_mask(tok, long["messages"], None, 10_000)[0])
    n_nometa = len(loss_mask(tok, build_twins([long]).nometa[0]["messages"], None, 10_000)[0])
    assert build_twins([long], tokenizer=tok, max_length=n_meta).refused == []
    (refusal,) = build_twins([long], tokenizer=tok, max_length=n_nometa).refused  # only the meta twin is too long
    assert set(refusal.reasons) == {"masks_identical"} and "max_length" in refusal.reasons["masks_identical"]


# ---------------------------------------------------------------- planted confounds, each refused by name

def _set_response(r, text):
    return {**r, "messages": r["messages"][:-1] + [{"role": "assistant", "content": text}]}


def plant(name, nometa):
    rows = [dict(r) for r in nometa]
    if name == "leaked_tag":
        rows[1] = _set_response(rows[1], rows[1]["messages"][-1]["content"].replace("\n\n", f"\n{O}\n"))
    elif name == "leaked_fragment":
        rows[1] = _set_response(rows[1], rows[1]["messages"][-1]["content"].replace("\n\n", "\n/meta|>\n"))
    elif name == "changed_answer":
        rows[1] = _set_response(rows[1], rows[1]["messages"][-1]["content"].replace("{7}", "{8}"))
    elif name == "metadata_drift":
        rows[1]["level"] = 2
    elif name == "reordered":
        rows[0], rows[1] = rows[1], rows[0]
    elif name == "shifted_mask":
        rows[2]["wrong_prefix"] = rows[2]["wrong_prefix"][:-1]
    return rows


CONFOUNDS = {"leaked_tag": ("no_tag_leakage", "verify"), "leaked_fragment": ("no_tag_leakage", "verify"),
             "changed_answer": ("answers_preserved", "verify"), "metadata_drift": ("metadata_identical", "verify"),
             "reordered": ("ids_aligned", "plain"), "shifted_mask": ("masks_identical", "sft2")}


@pytest.mark.parametrize("on_tokens", [False, True])
@pytest.mark.parametrize("confound", sorted(CONFOUNDS))
def test_planted_confound_is_refused_by_name(confound, on_tokens, tok, tmp_path):
    check, bad_id = CONFOUNDS[confound]
    twins = build_twins(CLEAN)
    planted = plant(confound, twins.nometa)
    report = verify_twins(twins.meta, planted, tok if on_tokens else None)
    assert not report.passed
    assert not report.check(check).passed and bad_id in report.check(check).rows
    with pytest.raises(TwinCheckError, match=rf"{check} \(.*{bad_id}"):
        report.raise_for_failures()
    with pytest.raises(TwinCheckError, match=check):
        write_twins(TwinSet(twins.meta, planted, []), tmp_path / "twins", tok if on_tokens else None)
    assert not (tmp_path / "twins").exists()


def test_reordering_fails_alignment_only():
    twins = build_twins(CLEAN)
    report = verify_twins(twins.meta, plant("reordered", twins.nometa))
    assert [c.name for c in report.failed()] == ["ids_aligned"]  # rows are paired by id for the other checks
    assert report.check("ids_aligned").evidence["first_misaligned_position"] == 0


def test_row_count_and_missing_rows():
    twins = build_twins(CLEAN)
    report = verify_twins(twins.meta, twins.nometa[:-1])
    assert {c.name for c in report.failed()} == {"row_count", "ids_aligned"}
    assert report.check("ids_aligned").evidence["meta_only"] == [CLEAN[-1]["id"]]


def test_tag_leaks_finds_tags_and_fragments_but_not_math():
    assert tag_leaks(f"a {O} b") == [O]
    assert tag_leaks("a <|META|> b") == ["<|META|>"]
    assert tag_leaks("x <|meta y") == ["<|meta"] and tag_leaks("x /meta|> y") == ["/meta|>"]
    assert tag_leaks("cut <|/m") == ["<|/m"]
    assert tag_leaks("|a|<|b| and |\\theta|>0, <|x|>, metadata") == []


# ---------------------------------------------------------------- files

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_round_trip_jsonl_parquet_and_written_twins(tmp_path, tok):
    rows = CLEAN + [row("bad", f"{O}\\boxed{{7}}{C}")]
    sparse = [dict(r) for r in rows]
    del sparse[0]["wrong_prefix"]  # absent in JSONL means null
    sparse[1]["source"] = "hand"  # a column only one row has
    from_jsonl = load_sft_rows(_write_jsonl(tmp_path / "sft.jsonl", sparse))
    write_parquet(from_jsonl, tmp_path / "sft.parquet")
    from_parquet = load_sft_rows(tmp_path / "sft.parquet")
    assert from_jsonl == from_parquet
    assert from_parquet[0]["wrong_prefix"] is None and from_parquet[0]["source"] is None

    twins = build_twins(from_parquet)
    report = write_twins(twins, tmp_path / "twins", tok, max_length=256)
    assert report.passed and report.refused == {"rows": 1, "by_check": {"answers_preserved": 1,
                                                                       "nometa_response_nonempty": 1}}
    out = tmp_path / "twins"
    assert sorted(p.name for p in out.iterdir()) == ["meta.parquet", "nometa.parquet", "refused.json", "report.json"]
    meta, nometa = load_sft_rows(out / "meta.parquet"), load_sft_rows(out / "nometa.parquet")
    assert meta == twins.meta and nometa == twins.nometa
    assert verify_twins(meta, nometa, tok, max_length=256).passed
    assert json.loads((out / "refused.json").read_text())[0]["id"] == "bad"
    written = json.loads((out / "report.json").read_text())
    assert written["passed"] and written["refused"]["rows"] == 1 and written["mask_level"] == "tokens"


def test_nothing_twinnable_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no row could be twinned"):
        write_twins(build_twins([row("bad", f"{O}\\boxed{{7}}{C}")]), tmp_path / "twins")


GOOD = row("good", "3 + 4 = 7\n\\boxed{7}")
BAD_ROWS = {
    "bad_role": ({**GOOD, "id": "r2", "messages": [{"role": "bot", "content": "x"}, GOOD["messages"][1]]},
                 "messages[0].role"),
    "no_response": ({**GOOD, "id": "r2", "messages": GOOD["messages"][:1]}, "'messages'"),
    "prefix_not_prefix": ({**GOOD, "id": "r2", "wrong_prefix": "3 + 4 = 8"}, "'wrong_prefix'"),
    "prefix_type": ({**GOOD, "id": "r2", "wrong_prefix": 3}, "'wrong_prefix'"),
    "duplicate_id": (GOOD, "'id'"),
    "content_type": ({**GOOD, "id": "r2", "messages": [GOOD["messages"][0], {"role": "assistant", "content": None}]},
                     "messages[1].content"),
    "extra_key": ({**GOOD, "id": "r2", "messages": [GOOD["messages"][0], {**GOOD["messages"][1], "name": "x"}]},
                  "messages[1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_line_id_and_field(case, tmp_path):
    bad, field = BAD_ROWS[case]
    path = _write_jsonl(tmp_path / "sft.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as err:
        load_sft_rows(path)
    message = str(err.value)
    assert str(path) in message and "line 2" in message and f"(id {bad['id']!r})" in message
    assert f"field {field}" in message or f"field '{field}'" in message
    assert err.value.exit_code == 2


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_sft_rows(tmp_path / "missing.jsonl")
    (tmp_path / "sft.csv").write_text("id\n")
    with pytest.raises(DataError, match=r"expected a \.parquet or \.jsonl"):
        load_sft_rows(tmp_path / "sft.csv")
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_sft_rows(tmp_path / "broken.jsonl")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_sft_rows(tmp_path / "corrupt.parquet")
    write_parquet([{**GOOD, "id": 7}], tmp_path / "int_id.parquet")
    with pytest.raises(DataError, match=r"int_id\.parquet: row 1: field 'id': expected a non-empty string, got 7"):
        load_sft_rows(tmp_path / "int_id.parquet")


# ---------------------------------------------------------------- masks on characters

def test_trained_chars_follow_the_trainers_loss_mask(tok):
    r = CLEAN[2]
    text, trained = trained_chars(tok, r)
    start = text.index(r["messages"][-1]["content"])
    end = text.index("<|im_end|>", start) + len("<|im_end|>")
    assert not any(trained[:start + len(WP)])  # prompt and wrong prefix
    assert all(trained[start + len(WP):end])  # the rest of the response and its end-of-turn token
    _, labels = loss_mask(tok, r["messages"], WP, 256)
    assert sum(trained) == sum(len(tok.decode([i])) for i in labels if i != IGNORE)


def test_char_mask_rule():
    # "ab😀 cd": the emoji is two byte tokens (one masked); the space is trimmed off the next token's offsets
    offsets = [(0, 1), (1, 2), (2, 3), (2, 3), (4, 5), (5, 6)]
    labels = [IGNORE, 2, 3, IGNORE, 5, 6]
    assert char_mask(6, offsets, labels) == [False, True, False, True, True, True]
    assert char_mask(7, offsets, [IGNORE, 2, 3, 4, 5, 6]) == [False, True, True, True, True, True, False]
