"""evals.suites: the held-out manifest, the real benchmark files, and planted bad files that must be refused."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rewards.golds import extract_gold
from evals.suites import (PROMPT_ROW_SCHEMA, control_char_findings, load_arith_heldout, load_eval_heldout,
                          load_heldout, load_manifest, load_suite, protocol_differences)
from infra.errors import DataError

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "datasets" / "heldout-1030.yaml"


@pytest.fixture(scope="module")
def heldout(benchmarks_dir):
    return {s.name: s for s in load_heldout(MANIFEST, benchmarks_dir)}


# ---------------------------------------------------------------- the real held-out 1030

def test_manifest_pins_every_suite():
    manifest = load_manifest(MANIFEST)
    assert manifest.total == 1030 and list(manifest.suites) == ["gsm8k", "math500", "aime24"]
    hubs = {name: (s.hub.id, s.hub.config, s.hub.split) for name, s in manifest.suites.items()}
    assert hubs == {"gsm8k": ("openai/gsm8k", "main", "test"), "math500": ("HuggingFaceH4/MATH-500", None, "test"),
                    "aime24": ("HuggingFaceH4/aime_2024", None, "train")}
    assert all(s.hub.revision for s in manifest.suites.values())


def test_real_files_give_1030_rows_with_parsed_golds(heldout):
    assert {name: len(s.rows) for name, s in heldout.items()} == {"gsm8k": 500, "math500": 500, "aime24": 30}
    ids = [r["id"] for s in heldout.values() for r in s.rows]
    assert len(ids) == len(set(ids)) == 1030
    for suite in heldout.values():
        assert suite.report.ok and suite.report.golds_parsed == suite.report.rows == len(suite.rows)
        assert all(r["answer"] and r["suite"] == suite.name for r in suite.rows)
        assert suite.table().schema == PROMPT_ROW_SCHEMA
    math = heldout["math500"].rows
    assert math[0]["id"] == "test/precalculus/807.json" and math[0]["domain"] == "Precalculus"
    assert math[0]["level"] == 2 and math[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert len({r["domain"] for r in math}) == 7
    assert heldout["aime24"].rows[0]["id"] == "aime24-60" and heldout["aime24"].rows[0]["answer"] == "204"


def test_gsm8k_is_the_first_500_in_dataset_order(heldout, benchmarks_dir):
    raw = [json.loads(line) for line in open(benchmarks_dir / "gsm8k.jsonl", encoding="utf-8")][:500]
    rows = heldout["gsm8k"].rows
    assert [r["id"] for r in rows] == [f"gsm8k-{i:04d}" for i in range(500)]
    assert [r["prompt"] for r in rows] == [r["question"] for r in raw]
    assert rows[0]["answer"] == "18" and rows[499]["answer"] == raw[499]["answer"].split("####")[1].strip()


def test_rows_hash_is_independent_of_the_file_format(heldout, benchmarks_dir, tmp_path):
    rows = [json.loads(line) for line in open(benchmarks_dir / "aime24.jsonl", encoding="utf-8")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "aime24.parquet")  # only a parquet: found by its stem
    spec = load_manifest(MANIFEST).suites["aime24"]
    from_parquet = load_suite("aime24", spec, tmp_path)
    assert from_parquet.origin.endswith("aime24.parquet")
    assert from_parquet.rows_hash == heldout["aime24"].rows_hash


def test_hub_path_uses_the_pinned_coordinates(monkeypatch, benchmarks_dir):
    calls = []
    rows = [json.loads(line) for line in open(benchmarks_dir / "aime24.jsonl", encoding="utf-8")]

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    suite = load_suite("aime24", load_manifest(MANIFEST).suites["aime24"], None)
    assert calls == [("HuggingFaceH4/aime_2024", None, "train", "main")]
    assert suite.origin == "HuggingFaceH4/aime_2024:train@main" and len(suite.rows) == 30


# ---------------------------------------------------------------- manifest errors

def test_manifest_rejects_unknown_keys_naming_file_and_key(tmp_path):
    raw = yaml.safe_load(MANIFEST.read_text())
    raw["suites"]["math500"]["fields"]["subjekt"] = "subject"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(DataError, match=r"m\.yaml:\d+: suites\.math500\.fields\.subjekt: unknown key"):
        load_manifest(path)
    raw["suites"]["math500"]["fields"].pop("subjekt")
    raw["total"] = 1000
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(DataError, match="total is 1000 but the suites' rows add up to 1030"):
        load_manifest(path)
    raw["total"] = 1030
    raw["suites"]["aime24"]["source"] = "aime2024"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(DataError, match="suites.aime24.source: .*unknown gold source 'aime2024'"):
        load_manifest(path)


# ---------------------------------------------------------------- planted bad files

def write_suite(tmp_path: Path, rows: list[dict], source: str = "math500", n_rows: int = 3,
                fields: dict | None = None) -> Path:
    """A one-suite manifest named 'mini' and its data file mini.jsonl; returns the manifest path."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    with open(data / "mini.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    manifest = {"name": "mini", "total": n_rows, "suites": {"mini": {
        "source": source, "hub": {"id": "x/mini", "config": None, "split": "test", "revision": "main"},
        "file": "mini.jsonl", "rows": n_rows,
        "fields": fields or {"id": "{unique_id}", "problem": "problem", "gold": "answer", "domain": "{subject}",
                             "level": "level"}}}}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def math_row(i: int, **changes) -> dict:
    row = {"problem": f"What is ${i} + 1$?", "answer": str(i + 1), "subject": "Algebra", "level": 1,
           "unique_id": f"test/algebra/{i}.json"}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def refused(tmp_path: Path, rows: list[dict], **kw) -> str:
    with pytest.raises(DataError) as err:
        load_heldout(write_suite(tmp_path, rows, **kw), tmp_path / "data")
    return str(err.value)


def test_good_mini_suite_loads(tmp_path):
    (suite,) = load_heldout(write_suite(tmp_path, [math_row(i) for i in range(3)]), tmp_path / "data")
    assert [r["answer"] for r in suite.rows] == ["1", "2", "3"]


def test_duplicate_id_is_refused(tmp_path):
    message = refused(tmp_path, [math_row(0), math_row(1), math_row(2, unique_id="test/algebra/0.json")])
    assert "mini.jsonl: line 3: field 'id': duplicate id 'test/algebra/0.json' (first at line 1)" in message


def test_missing_field_is_refused(tmp_path):
    message = refused(tmp_path, [math_row(0), math_row(1, problem=None), math_row(2)])
    assert "mini.jsonl: line 2: field 'problem': missing" in message


def test_unparseable_gold_is_refused(tmp_path):
    rows = [{"question": "q?", "answer": "so 4\n#### 4"}, {"question": "q?", "answer": "the answer is 4"},
            {"question": "q?", "answer": "#### 4"}]
    fields = {"id": "g-{index}", "problem": "question", "gold": "answer", "domain": "gsm8k"}
    message = refused(tmp_path, rows, source="gsm8k", fields=fields)
    assert "mini.jsonl: line 2 (id g-1): unparseable gold" in message and "field 'answer'" in message
    assert "'####'" in message


def test_control_characters_from_misescaped_latex_are_refused(tmp_path):
    rows = [math_row(0), math_row(1, problem="Simplify $\x0crac{1}{2}$."), math_row(2, answer="3\times 1")]
    message = refused(tmp_path, rows)
    assert "mini.jsonl: line 2: field 'problem': control character U+000C" in message and r"'\f...'" in message
    assert "mini.jsonl: line 3: field 'answer': U+0009 completing a LaTeX command" in message


def test_whitespace_tabs_are_noted_not_refused(tmp_path):
    rows = [math_row(0), math_row(1, problem="Two shapes have\tequal\tperimeters."), math_row(2)]
    (suite,) = load_heldout(write_suite(tmp_path, rows), tmp_path / "data")
    assert suite.report.control_chars == [] and len(suite.report.notes) == 2
    assert "line 2: field 'problem'" in suite.report.notes[0]
    assert control_char_findings("$x \\to 0$")[0] == []  # a real backslash is fine


def test_wrong_row_count_and_missing_file_are_refused(tmp_path):
    assert "expected 3 rows, got 2" in refused(tmp_path, [math_row(0), math_row(1)])
    manifest = write_suite(tmp_path, [math_row(i) for i in range(3)])
    (tmp_path / "data" / "mini.jsonl").unlink()
    with pytest.raises(DataError, match="expected one of mini.jsonl, mini.parquet"):
        load_heldout(manifest, tmp_path / "data")


def test_bad_json_line_is_refused(tmp_path):
    manifest = write_suite(tmp_path, [math_row(i) for i in range(3)])
    with open(tmp_path / "data" / "mini.jsonl", "a") as fh:
        fh.write('{"problem": \n')
    with pytest.raises(DataError, match=r"mini\.jsonl: line 4: not valid JSON"):
        load_heldout(manifest, tmp_path / "data")


# ---------------------------------------------------------------- the arith world's held-out

def arith_rows(k: int) -> list[dict]:
    return [{"id": f"arith-{i:03d}", "prompt": f"{i}+1=", "answer": str(i + 1), "domain": "add", "level": 1,
             "source": "arith", "suite": "arith"} for i in range(k)]


def test_arith_heldout_parquet(tmp_path):
    path = tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(arith_rows(5), schema=PROMPT_ROW_SCHEMA), path)
    (suite,) = load_eval_heldout("arith", None, arith_file=path, arith_rows=5)
    assert suite.name == "arith" and suite.rows == arith_rows(5)
    rows = arith_rows(5)
    rows[4]["id"] = "arith-000"
    pq.write_table(pa.Table.from_pylist(rows, schema=PROMPT_ROW_SCHEMA), path)
    with pytest.raises(DataError, match="heldout.parquet: row 4: field 'id': duplicate id 'arith-000'"):
        load_arith_heldout(path, 5)
    with pytest.raises(DataError, match="arith world's held-out file"):
        load_eval_heldout("arith", None)


# ---------------------------------------------------------------- the MASA suite (datasets/masa-suite.yaml)

MASA = REPO / "datasets" / "masa-suite.yaml"
AIME25_FIXTURE = REPO / "tests" / "data" / "aime25-hub-fixture"  # 3 rows in math-ai/aime25's layout
ON_DISK = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench")  # ../shared/data/benchmarks has these


def masa_spec(name: str, **update):
    spec = load_manifest(MASA).suites[name]
    return spec.model_copy(update=update) if update else spec


def test_masa_manifest_suites_and_protocol():
    manifest = load_manifest(MASA)
    assert list(manifest.suites) == ["aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"]
    assert manifest.total == 1547 == 30 + 30 + 40 + 500 + 272 + 675
    p = manifest.protocol
    assert (p.temperature, p.top_p, p.n, p.pass_at) == (1.0, 1.0, 32, [1, 32])
    aime25 = manifest.suites["aime25"].hub
    assert (aime25.id, aime25.config, aime25.split) == ("math-ai/aime25", None, "test")
    assert len(aime25.revision) == 40  # pinned to a commit


@pytest.mark.parametrize("name, rows, first_id, first_gold, domains", [
    ("aime24", 30, "aime24-60", "204", {"aime"}),
    ("amc23", 40, "amc23-00", "27", {"amc"}),
    ("math500", 500, "test/precalculus/807.json", r"\left( 3, \frac{\pi}{2} \right)", None),
    ("minerva_math", 272, "minerva-000", "1.6", {"minerva"}),
    ("olympiadbench", 675, "olympiadbench-1606", "2", {"Algebra", "Combinatorics", "Geometry", "Number Theory"}),
])
def test_masa_suites_load_from_the_real_files(benchmarks_dir, name, rows, first_id, first_gold, domains):
    suite = load_suite(name, masa_spec(name), benchmarks_dir)
    assert suite.report.ok and len(suite.rows) == suite.report.golds_parsed == rows
    assert suite.rows[0]["id"] == first_id and suite.rows[0]["answer"] == first_gold
    assert len({r["id"] for r in suite.rows}) == rows
    if domains is not None:
        assert {r["domain"] for r in suite.rows} == domains
    assert suite.table().schema == PROMPT_ROW_SCHEMA


def test_masa_amc23_golds_are_the_files_answers(benchmarks_dir):
    raw = [json.loads(line) for line in open(benchmarks_dir / "amc23.jsonl", encoding="utf-8")]
    suite = load_suite("amc23", masa_spec("amc23"), benchmarks_dir)
    assert [float(r["answer"]) for r in suite.rows] == [r["answer"] for r in raw]
    assert [r["prompt"] for r in suite.rows] == [r["question"] for r in raw]


def test_aime25_loader_on_the_hub_layout_fixture():
    suite = load_suite("aime25", masa_spec("aime25", rows=3), AIME25_FIXTURE)
    assert [(r["id"], r["answer"], r["domain"], r["source"]) for r in suite.rows] == [
        ("aime25-0", "70", "aime", "aime25"), ("aime25-1", "16", "aime", "aime25"), ("aime25-2", "117", "aime", "aime25")]
    # the manifest's row count is the hub's 30: three rows are refused, naming the file
    with pytest.raises(DataError, match=r"aime25\.jsonl: expected 30 rows, got 3"):
        load_suite("aime25", masa_spec("aime25"), AIME25_FIXTURE)


def test_aime25_hub_path_uses_the_pinned_commit(monkeypatch):
    calls = []
    rows = [json.loads(line) for line in open(AIME25_FIXTURE / "aime25.jsonl", encoding="utf-8")]

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    suite = load_suite("aime25", masa_spec("aime25", rows=3), None)
    revision = load_manifest(MASA).suites["aime25"].hub.revision
    assert calls == [("math-ai/aime25", None, "test", revision)]
    assert suite.origin == f"math-ai/aime25:test@{revision}" and [r["id"] for r in suite.rows][-1] == "aime25-2"


@pytest.mark.parametrize("change, expected", [
    ({"answer": "seventy"}, r"aime25\.jsonl: line 2 \(id aime25-1\): unparseable gold: aime25 row id='1': "
                            r"field 'answer': expected an integer, got 'seventy'"),
    ({"problem": None}, r"aime25\.jsonl: line 2: field 'problem': missing"),
    ({"id": None}, r"aime25\.jsonl: line 2: field 'id': missing"),
    ({"id": "0"}, r"aime25\.jsonl: line 2: field 'id': duplicate id 'aime25-0' \(first at line 1\)"),
])
def test_aime25_bad_rows_are_refused_naming_file_row_and_field(tmp_path, change, expected):
    rows = [json.loads(line) for line in open(AIME25_FIXTURE / "aime25.jsonl", encoding="utf-8")]
    rows[1] = {k: v for k, v in {**rows[1], **change}.items() if v is not None}
    (tmp_path / "aime25.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=expected):
        load_suite("aime25", masa_spec("aime25", rows=3), tmp_path)


def test_masa_suite_loads_whole_from_one_directory(benchmarks_dir, tmp_path):
    """All six suites through load_heldout (ids unique across suites), aime25 from the fixture."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ON_DISK:
        (data / f"{name}.jsonl").symlink_to(benchmarks_dir / f"{name}.jsonl")
    (data / "aime25.jsonl").symlink_to(AIME25_FIXTURE / "aime25.jsonl")
    raw = yaml.safe_load(MASA.read_text())
    raw["suites"]["aime25"]["rows"], raw["total"] = 3, 1547 - 27
    manifest = tmp_path / "masa.yaml"
    manifest.write_text(yaml.safe_dump(raw, sort_keys=False))
    suites = load_heldout(manifest, data)
    assert {s.name: len(s.rows) for s in suites} == {"aime24": 30, "aime25": 3, "amc23": 40, "math500": 500,
                                                    "minerva_math": 272, "olympiadbench": 675}


def test_protocol_differences_against_the_published_protocol():
    manifest = load_manifest(MASA)
    assert protocol_differences(manifest, 1.0, 1.0, 32, {}) == []
    diffs = protocol_differences(manifest, 0.7, 0.95, 8, {"aime24": 32})
    assert diffs[:2] == ["eval.temperature is 0.7, the published protocol's is 1.0",
                         "eval.top_p is 0.95, the published protocol's is 1.0"]
    assert "suite 'amc23': eval.n is 8, the published protocol samples 32 per problem" in diffs
    assert ("suite 'amc23': pass@32 is published but not reported (the held-out job reports pass@1 and pass@8)"
            in diffs)
    assert not any("'aime24'" in d for d in diffs)  # its n_per_suite override matches
    assert protocol_differences(load_manifest(MANIFEST), 0.7, 0.95, 8, {}) == []  # no published protocol


def test_protocol_pass_at_must_fit_n(tmp_path):
    raw = yaml.safe_load(MASA.read_text())
    raw["protocol"]["pass_at"] = [1, 64]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(DataError, match=r"m\.yaml:\d+: protocol: .*pass_at \[64\]: each k must lie in 1\.\.n \(32\)"):
        load_manifest(path)


# ---------------------------------------------------------------- bad copies of the MASA suite's real files

def _copy_with(src: Path, dst_dir: Path, name: str, change) -> None:
    rows = [json.loads(line) for line in open(src / name, encoding="utf-8")]
    change(rows)
    (dst_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("name, index_id, problem_field", [
    ("amc23", "amc23-39", "question"),           # ids from the row's position ({index}): a copied row gets a new id
    ("minerva_math", "minerva-271", "problem"),
])
def test_a_duplicated_row_is_refused_even_when_ids_come_from_the_position(benchmarks_dir, tmp_path, name,
                                                                          index_id, problem_field):
    def duplicate_first_row_at_the_end(rows):
        rows[-1] = dict(rows[0])

    _copy_with(benchmarks_dir, tmp_path, f"{name}.jsonl", duplicate_first_row_at_the_end)
    last = len(open(tmp_path / f"{name}.jsonl", encoding="utf-8").readlines())
    with pytest.raises(DataError) as err:
        load_suite(name, masa_spec(name), tmp_path)
    assert (f"{name}.jsonl: line {last} (id {index_id}): field '{problem_field}': the same problem text as "
            f"line 1 (a duplicated row?)") in str(err.value)


def test_a_gold_the_grader_cannot_box_is_refused(benchmarks_dir, tmp_path):
    def unbalance(rows):
        rows[3]["answer"] = r"\frac{1}{2"  # what a truncated export leaves

    _copy_with(benchmarks_dir, tmp_path, "math500.jsonl", unbalance)
    with pytest.raises(DataError) as err:
        load_suite("math500", masa_spec("math500"), tmp_path)
    assert (r"math500.jsonl: line 4 (id test/number_theory/572.json): unparseable gold: math500 row "
            r"unique_id='test/number_theory/572.json': field 'answer': gold '\\frac{1}{2' has unbalanced braces"
            in str(err.value))
    for gold in ("}{", "a}", "x\\"):  # a closing brace first, one too many, a trailing backslash escaping the box's "}"
        with pytest.raises(DataError, match="has unbalanced braces"):
            extract_gold("math500", {"answer": gold})
    assert extract_gold("math500", {"answer": r"\{1, 2\}"}) == r"\{1, 2\}"  # escaped braces are text


def test_a_line_that_is_not_utf8_is_refused_naming_file_and_line(benchmarks_dir, tmp_path):
    lines = (benchmarks_dir / "aime24.jsonl").read_bytes().splitlines(keepends=True)
    lines[6] = lines[6][:10] + b"\xff" + lines[6][10:]
    (tmp_path / "aime24.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"aime24\.jsonl: line 7: not UTF-8: byte 0xff at column 11$"):
        load_suite("aime24", masa_spec("aime24"), tmp_path)
