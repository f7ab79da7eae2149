"""The arith world: determinism, coverage, disjoint held-out, true slips, answers that survive strip_meta."""
from __future__ import annotations

import random
import re

import pytest

from infra.artifacts import read_parquet
from infra.spec import ArithWorldSpec
from meta.grammar import find_blocks, format_class, has_tags, last_boxed, strip_meta
from worlds.arith import (CHECK_DOMAIN, DOMAINS, HARD_LEVEL, LEVELS, SPLITS, apply, audit_lines, check_text,
                          evaluate, expr_of, generate_world, make_problem, make_slip, parse, recompute, render,
                          write_world)

SMALL = ArithWorldSpec(seed=3, n_base=540, n_sft1=300, n_sft2=120, n_rl=90, n_val_per_domain=6, n_heldout=54)


@pytest.fixture(scope="module")
def world():
    return generate_world(SMALL)


def _response(row):
    return row["messages"][-1]["content"]


def _solution_lines(text):
    return [ln for ln in text.split("\n") if not ln.startswith("\\boxed")]


def test_same_seed_same_bytes_and_splits_independent(world, tmp_path):
    again = generate_world(SMALL)
    assert again == world
    a, b = write_world(world, tmp_path / "a"), write_world(again, tmp_path / "b")
    assert set(a) == set(SPLITS)
    for split in SPLITS:
        assert a[split].read_bytes() == b[split].read_bytes()
        assert read_parquet(a[split]) == world[split]
    # resizing one split leaves the others' rows unchanged; another seed changes them
    resized = generate_world(SMALL.model_copy(update={"n_base": 100}))
    assert resized["sft1"] == world["sft1"] and resized["rl"] == world["rl"]
    assert generate_world(SMALL.model_copy(update={"seed": 4}))["base"] != world["base"]


def test_schemas_and_unique_ids(world):
    for split in ("base", "sft1", "sft2"):
        for row in world[split]:
            assert list(row) == ["id", "messages", "wrong_prefix", "domain", "level", "answer", "source", "kind"]
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert row["wrong_prefix"] is None or _response(row).startswith(row["wrong_prefix"])
    for split in ("rl", "val"):
        assert all(list(r) == ["id", "prompt", "answer", "domain", "level", "source"] for r in world[split])
    assert all(list(r)[-1] == "suite" and r["suite"] == "arith" for r in world["heldout"])
    ids = [r["id"] for rows in world.values() for r in rows]
    assert len(ids) == len(set(ids))


def test_domain_and_level_coverage(world):
    for split in ("base", "sft1", "rl"):
        cells = {(r["domain"], r["level"]) for r in world[split] if r["domain"] != CHECK_DOMAIN}
        assert cells == {(d, lv) for d in DOMAINS for lv in LEVELS}, split
    drills = [r for r in world["base"] if r["kind"] == "drill"]
    assert {r["domain"] for r in drills} == {CHECK_DOMAIN}
    assert abs(len(drills) / SMALL.n_base - SMALL.check_drill_share) < 0.05
    per_domain = {d: sum(r["domain"] == d for r in world["val"]) for d in DOMAINS}
    assert per_domain == {d: SMALL.n_val_per_domain for d in DOMAINS}
    hard = [r for r in world["heldout"] if r["level"] == HARD_LEVEL]
    assert len(hard) == round(SMALL.n_heldout * SMALL.heldout_hard_share)
    assert {r["domain"] for r in hard} == set(DOMAINS)


def test_levels_key_restricts_every_split_to_those_levels():
    """`world.levels` (the CI spec's [1]) draws every split from those levels only; held-out keeps its harder
    band; the default is the three levels."""
    easy = generate_world(SMALL.model_copy(update={"levels": [1]}))
    for split in ("base", "sft1", "sft2", "rl", "val"):
        assert {r["level"] for r in easy[split]} == {1}, split
    assert {r["level"] for r in easy["heldout"]} == {1, HARD_LEVEL}
    assert {(r["domain"], r["level"]) for r in easy["rl"]} == {(d, 1) for d in DOMAINS}
    assert easy["rl"] != generate_world(SMALL)["rl"] and SMALL.levels == list(LEVELS)
    for bad, message in (([], "at least 1 item"), ([4], "Input should be 1, 2 or 3"), ([1, 1], "repeats a level")):
        with pytest.raises(ValueError, match=message):
            ArithWorldSpec(levels=bad)


def test_heldout_disjoint_from_every_training_problem(world):
    def exprs(split):
        out = set()
        for r in world[split]:
            prompt = r["prompt"] if "prompt" in r else r["messages"][0]["content"]
            e = expr_of(prompt)
            assert e is not None, prompt  # every prompt reads back to its expression
            out.add(e)
        return out

    held = exprs("heldout")
    assert len(held) == SMALL.n_heldout  # no duplicates either
    for split in ("base", "sft1", "sft2", "rl", "val"):
        assert not held & exprs(split), split
    for split in ("base", "sft1", "sft2", "rl"):
        assert not exprs("val") & exprs(split), split


def test_every_answer_is_gold_before_and_after_strip(world):
    for split in ("base", "sft1", "sft2"):
        for row in world[split]:
            text = _response(row)
            stripped = strip_meta(text)
            assert last_boxed(text) == last_boxed(stripped) == row["answer"]
            assert str(evaluate(parse(expr_of(row["messages"][0]["content"])))) == row["answer"]
            assert not has_tags(stripped) and "\n\n" not in stripped and not stripped.startswith("\n")
            blocks = find_blocks(text)
            assert len(blocks) == (row["kind"] not in ("plain", "drill"))
            assert format_class(text) == ("none" if row["kind"] in ("plain", "drill") else "wellformed")
            for b in blocks:
                assert "\\boxed" not in b.content and "\n" not in b.content
                assert b.start == 0 or text[b.start - 1] == "\n"  # a block starts a line (or the response)
            if split == "base":
                assert row["kind"] in ("plain", "drill") and row["wrong_prefix"] is None
    for row in world["rl"] + world["val"] + world["heldout"]:
        assert str(evaluate(parse(expr_of(row["prompt"])))) == row["answer"]


def test_plain_solutions_audit_clean(world):
    for row in world["base"]:
        if row["kind"] == "drill":
            lhs, claimed = row["messages"][0]["content"].removeprefix("Is ").removesuffix("?").split("=")
            assert _response(row).split("\n")[0] == check_text(*parse(lhs), int(claimed))
            continue
        expr = expr_of(row["messages"][0]["content"])
        checks = audit_lines(expr, _solution_lines(_response(row)), word=row["domain"] == "word")
        assert not [c for c in checks if c.errors], row["id"]


def test_slips_are_wrong_and_caught_by_the_block(world):
    kinds = {r["kind"] for r in world["sft1"] + world["sft2"]}
    assert kinds == {"plain", "verify", "redirect", "sft2_redirect", "sft2_verify"}
    for row in world["sft1"] + world["sft2"]:
        if row["kind"] not in ("redirect", "sft2_redirect"):
            continue
        prefix = row["wrong_prefix"]
        slipped = prefix.rstrip("\n").split("\n")[-1]
        remainder = slipped.split("|", 1)[1]
        assert evaluate(parse(remainder)) != int(row["answer"]), row["id"]  # the slip leads to a wrong value
        expr = expr_of(row["messages"][0]["content"])
        lines = _solution_lines(strip_meta(_response(row)))
        checks = audit_lines(expr, lines, word=row["domain"] == "word")
        slip_at = len(prefix.rstrip("\n").split("\n")) - 1
        assert [c.index for c in checks if c.errors] == [slip_at], (row["id"], checks)  # only the slip line
        assert checks[slip_at + 1].redo and not checks[slip_at + 2].errors  # expression restated, step redone
        block = find_blocks(_response(row))[0]
        assert ", not " in block.content and block.start == len(prefix)
        if row["kind"] == "redirect":
            assert "redirect" in block.categories  # 'redo'
        else:
            assert block.decision == "redirect" and block.confidence is not None
        redo_value = lines[slip_at + 2].split("=")[1].split("|")[0]
        recomputed = re.search(r"=(-?\d+), not", block.content)  # the value the redo line writes
        if recomputed:
            assert recomputed[1] == redo_value


def test_verify_blocks_and_sft2_fields(world):
    for row in world["sft1"] + world["sft2"]:
        blocks = find_blocks(_response(row))
        if row["kind"] in ("verify", "sft2_verify"):  # checks the step the next line writes, with its value
            step = re.match(r"check (\S+): (?:.*(?:so |=))?(-?\d+)(?:\.|$)", blocks[0].content)
            assert step and "verify" in blocks[0].categories, blocks[0].content
            assert _response(row)[blocks[0].end:].startswith(f"{step[1]}={step[2]}|")
        if row["kind"] == "verify":
            assert row["wrong_prefix"] is None
        if row["kind"].startswith("sft2"):
            assert _response(row)[len(row["wrong_prefix"] or ""):].startswith("<|meta|>")
            assert blocks[0].decision == row["kind"].removeprefix("sft2_")
            assert 0 < blocks[0].confidence <= 1


_FACT = re.compile(r"^(-?\d+)([-+*])(\d+)(?:([-+])(\d+))?(?:([-+])1)?=(-?\d+)$")


@pytest.mark.parametrize("seed", range(3))
def test_checks_recompute_from_true_small_facts(seed):
    """The check form is what makes a block able to help: only true single-digit facts (a teen minuend for a
    borrow, a digit times a digit plus a carry), ending in the step's value."""
    rng = random.Random(seed)
    for _ in range(400):
        a, b = rng.randint(-99, 99), rng.randint(-99, 99)
        op = rng.choice("+-*/")
        value = apply(a, op, b)
        if value is None:
            continue
        text = recompute(a, op, b)
        parts = text.split(", ")
        assert parts[-1].removeprefix("so ") == f"{a}{op}{b}={value}", text  # ends on the step itself
        facts = [p for p in parts if "=" in p and not p.startswith("so ")]
        for fact in facts:
            assert _FACT.match(fact), (text, fact)
            lhs, rhs = fact.split("=")
            assert evaluate(parse(lhs)) == int(rhs), (text, fact)  # every fact written is true
            # and small: digits, a teen minuend for a borrow, a digit times a digit
            assert all(int(x) <= 18 for x in re.findall(r"\d+", lhs)) or fact.startswith(f"{abs(b)}*"), text
        written = value + rng.choice((0, 1, -10))
        assert check_text(a, op, b, written) == \
            f"check {a}{op}{b}: {text}, " + ("same" if written == value else f"not {written}")


def test_make_slip_kinds_change_the_answer():
    rng = random.Random(0)
    seen = set()
    for i in range(600):
        problem = make_problem(rng, DOMAINS[i % len(DOMAINS)], LEVELS[i % len(LEVELS)])
        gold = int(problem.answer)
        for step in problem.steps:
            for kind in ("arith", "sign", "precedence", "dropped"):
                slip = make_slip(step, kind, rng)
                if slip is None:
                    continue
                seen.add(kind)
                assert evaluate(parse(slip.line.split("|")[1])) != gold
                assert slip.line != step.line
    assert seen == {"arith", "sign", "precedence", "dropped"}


def test_audit_lines_names_the_slip():
    assert [c.errors for c in audit_lines("7-3*2", ["3*2=6|7-6", "7-6=1|1"])] == [frozenset(), frozenset()]
    assert audit_lines("7-3*2", ["7-3=4|4*2"])[0].errors == {"order"}
    assert audit_lines("44-7", ["44-7=36|36"])[0].errors == {"value"}
    assert audit_lines("7--9", ["7--9=-2|-2"])[0].errors == {"sign"}
    assert audit_lines("7-3*2+4", ["3*2=6|7-6"])[0].errors == {"copy"}
    assert audit_lines("1+2", ["1+2=3|3+"])[0].errors == {"unparsed"}
    redo = audit_lines("7-3*2", ["3*2=5|7-5", "7-3*2", "3*2=6|7-6", "7-6=1|1"])
    assert [c.errors for c in redo] == [{"value"}, set(), set(), set()] and redo[1].redo
    assert audit_lines("7-3*2", ["3*2=6|7-6", "7-4*2"])[1].errors == {"copy"}  # restating what never was


def test_expressions_parse_render_round_trip():
    rng = random.Random(1)
    for i in range(300):
        p = make_problem(rng, DOMAINS[i % len(DOMAINS)], 1 + i % 4)
        assert render(parse(p.expr)) == p.expr
        assert all(abs(s.value) <= 99 for s in p.steps)
        with pytest.raises(ValueError):
            parse(p.expr + "x")


def test_exhausted_draws_fail_loudly(monkeypatch):
    import worlds.arith as arith
    from infra.errors import DataError

    fixed = make_problem(random.Random(0), "addsub", 1)
    monkeypatch.setattr(arith, "make_problem", lambda rng, domain, level: fixed)
    with pytest.raises(DataError, match=r"cannot draw a \w+ problem of level \d outside the \d+ reserved"):
        generate_world(SMALL)
