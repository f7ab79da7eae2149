"""Held-out suites (DESIGN §8): the manifest, the loaders and the validation that refuses a bad file.

A manifest (datasets/heldout-1030.yaml) pins each suite by hub id, config, split and revision and says how its
columns map to the prompt-row schema. `load_suite` reads a suite from a local directory (JSONL or parquet with
the hub's columns) or, without one, from the hub; either way every row is normalised to a prompt row
(PROMPT_ROW_FIELDS) and the suite is validated: row count, unique ids and problem texts, every gold parsed by
`rewards.golds.extract_gold`, and no control characters left by mis-escaped LaTeX. Any failed expectation raises
one DataError that names the file, the row and the field; rows are never dropped.

The demo's held-out (`eval.heldout: arith`) is a parquet the arith world writes in the prompt-row schema;
`load_arith_heldout` validates it the same way.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.errors import DataError
from infra.hashing import hash_json
from infra.spec import format_validation_errors, yaml_key_lines
from rewards.golds import SOURCES, extract_gold

ARITH = "arith"

# The prompt-row schema shared by every held-out suite (and the arith world's held-out parquet).
PROMPT_ROW_SCHEMA = pa.schema([
    ("id", pa.string()),        # unique within the held-out set, stable across runs
    ("prompt", pa.string()),    # the problem text as the dataset gives it (templating happens at generation)
    ("answer", pa.string()),    # the gold, already extracted (e.g. the text after '####' for GSM8K)
    ("domain", pa.string()),    # stratum for per-domain metrics (MATH subject, 'gsm8k', 'aime', arith domain)
    ("level", pa.int64()),      # difficulty level where the dataset has one (MATH 1..5), else null
    ("source", pa.string()),    # gold rule / grader source: gsm8k, math500, aime24, arith, ...
    ("suite", pa.string()),     # suite name in the manifest
])
PROMPT_ROW_FIELDS = tuple(PROMPT_ROW_SCHEMA.names)

# Control characters that never belong in benchmark text; \a \b \v \f are what "\alpha", "\beta", "\vec",
# "\frac" become when LaTeX is read through a string escape.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ESCAPE_NAMES = {"\x07": r"\a", "\x08": r"\b", "\x0b": r"\v", "\x0c": r"\f"}
# Tab and carriage return are legitimate whitespace, except where they complete a LaTeX command:
# "\times" -> TAB + "imes", "\right" -> CR + "ight"; "\tan" only before ( { ^ _ \ or a digit, as prose has "an".
# Newline is not checked: "\neq" -> LF + "eq" cannot be told from a line break, and a file with that bug also
# carries the \f / \t / \b forms.
_MISESCAPED_WS_RE = re.compile(
    r"\t(?=(?:imes|ext[a-z]*|heta|au|o|op|riangle|ilde|frac|binom|herefore)(?![A-Za-z])|anh?(?=[\\({^_\d]))"
    r"|\r(?=(?:ight[a-z]*|ho|angle|floor|ceil|m)(?![A-Za-z]))")
_MAX_LISTED = 20


# ---------------------------------------------------------------- manifest

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubSource(_Strict):
    id: str = Field(min_length=1, description="hub dataset id, e.g. openai/gsm8k")
    config: str | None = Field(None, description="config / subset name (None: the default one)")
    split: str
    revision: str = Field(description="branch, tag or commit; a commit hash pins the content")


def _format_fields(template: str) -> list[str]:
    """The field names a format string reads (`{index:04d}` -> ['index'])."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class FieldMap(_Strict):
    """How a dataset's columns become a prompt row. id and domain are format strings over the row's columns plus
    {index} (0-based position in dataset order); a string without braces is a constant."""

    id: str
    problem: str
    gold: str = Field(description="the column the gold is extracted from (by the suite's source rule)")
    domain: str
    level: str | None = None

    @field_validator("id", "domain")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            names = _format_fields(value)
        except ValueError as exc:
            raise ValueError(f"not a valid format string: {exc}") from None
        if any(not n.isidentifier() for n in names):
            raise ValueError(f"format fields must be plain column names, got {names}")
        return value


class SuiteRows(_Strict):
    """How a suite's rows are selected, mapped, counted and sampled (shared by manifest suites and arith)."""

    source: str = Field(description="gold rule for rewards.golds.extract_gold")
    first: int | None = Field(None, ge=1, description="keep the first N rows in dataset order")
    rows: int = Field(ge=1, description="rows expected after selection")
    fields: FieldMap

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in SOURCES:
            raise ValueError(f"unknown gold source '{value}'; known: {', '.join(SOURCES)}")
        return value

    @model_validator(mode="after")
    def _first_is_rows(self) -> "SuiteRows":
        if self.first is not None and self.first != self.rows:
            raise ValueError(f"first ({self.first}) and rows ({self.rows}) disagree")
        return self


class SuiteSpec(SuiteRows):
    """A manifest suite: pinned on the hub, with the file name to read instead under a local data directory."""

    hub: HubSource
    file: str = Field(description="file name under a local data directory (.jsonl or .parquet)")

    @field_validator("file")
    @classmethod
    def _bare_name(cls, value: str) -> str:
        if Path(value).name != value or Path(value).suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"expected a bare .jsonl or .parquet file name, got '{value}'")
        return value


class ManifestProtocol(_Strict):
    """The sampling protocol a suite set's published numbers were measured under (e.g. a paper's table): the spec's
    eval.* keys remain the one protocol every arm is measured with; `protocol_differences` lists where they depart
    from this one. `pass_at` are the pass@k the publication reports (pass@1 = the mean over the n samples)."""

    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    n: int = Field(ge=1, description="samples per problem, every suite")
    pass_at: list[int] = Field(min_length=1, description="the pass@k reported, each 1 <= k <= n")
    reference: str = Field(min_length=1, description="where the protocol is published")

    @model_validator(mode="after")
    def _ks(self) -> "ManifestProtocol":
        bad = [k for k in self.pass_at if not 1 <= k <= self.n]
        if bad:
            raise ValueError(f"pass_at {bad}: each k must lie in 1..n ({self.n})")
        return self


class HeldoutManifest(_Strict):
    name: str
    total: int = Field(ge=1, description="sum of the suites' rows")
    suites: dict[str, SuiteSpec] = Field(min_length=1)
    protocol: ManifestProtocol | None = Field(None, description="the published protocol of these suites, if any")

    @model_validator(mode="after")
    def _total(self) -> "HeldoutManifest":
        got = sum(s.rows for s in self.suites.values())
        if got != self.total:
            raise ValueError(f"total is {self.total} but the suites' rows add up to {got}")
        if ARITH in self.suites:
            raise ValueError(f"suite name '{ARITH}' is reserved for the arith world's held-out")
        return self


def load_manifest(path: str | Path) -> HeldoutManifest:
    """Parse and validate a held-out manifest; errors name the file, line and dotted key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: held-out manifest not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping with keys name, total, suites")
    try:
        return HeldoutManifest.model_validate(raw)
    except ValidationError as exc:
        problems = format_validation_errors(exc, str(path), yaml_key_lines(text), model=HeldoutManifest)
        raise DataError("invalid held-out manifest:\n  " + "\n  ".join(problems)) from None


def protocol_differences(manifest: HeldoutManifest, temperature: float, top_p: float, n: int,
                         n_per_suite: dict[str, int]) -> list[str]:
    """Where an eval protocol (the spec's eval.temperature, eval.top_p, eval.n, eval.n_per_suite) departs from the
    manifest's published protocol, one line each; [] when it matches or the manifest declares none. The held-out
    job reports pass@1 and pass@n per suite (tasks/heldout.py), so a published pass@k is reproduced only when
    k is 1 or the suite's n."""
    p = manifest.protocol
    if p is None:
        return []
    out = []
    if temperature != p.temperature:
        out.append(f"eval.temperature is {temperature}, the published protocol's is {p.temperature}")
    if top_p != p.top_p:
        out.append(f"eval.top_p is {top_p}, the published protocol's is {p.top_p}")
    for suite in manifest.suites:
        got = n_per_suite.get(suite, n)
        key = f"eval.n_per_suite.{suite}" if suite in n_per_suite else "eval.n"
        if got != p.n:
            out.append(f"suite '{suite}': {key} is {got}, the published protocol samples {p.n} per problem")
        missing = [k for k in p.pass_at if k not in (1, got)]
        if missing:
            out.append(f"suite '{suite}': pass@{','.join(map(str, missing))} is published but not reported "
                       f"(the held-out job reports pass@1 and pass@{got})")
    return out


# ---------------------------------------------------------------- validation report and suite data

@dataclass
class ValidationReport:
    suite: str
    origin: str                 # the file read, or hub id@revision
    rows: int
    expected_rows: int | None
    unique_ids: int
    golds_parsed: int
    control_chars: list[str] = field(default_factory=list)  # mis-escaped LaTeX: refused
    notes: list[str] = field(default_factory=list)          # whitespace tabs etc.: reported, accepted
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SuiteData:
    name: str
    source: str
    origin: str
    rows: list[dict[str, Any]]  # prompt rows (PROMPT_ROW_FIELDS), dataset order
    rows_hash: str              # hash of the normalised rows: equal content <=> equal hash, wherever it came from
    report: ValidationReport

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=PROMPT_ROW_SCHEMA)


# ---------------------------------------------------------------- reading

def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: not UTF-8: byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            out.append((f"line {lineno}", row))
    return out


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    return [(f"row {i}", row) for i, row in enumerate(rows)]


def _read_file(path: Path) -> list[tuple[str, dict]]:
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)


def _local_file(spec: SuiteSpec, data_dir: Path) -> Path:
    """The manifest's file, or the same stem in the other supported format."""
    stem = Path(spec.file).stem
    candidates = [data_dir / spec.file] + [data_dir / f"{stem}{ext}" for ext in (".jsonl", ".parquet")
                                           if ext != Path(spec.file).suffix]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"{data_dir}: no file for suite source '{spec.source}': expected one of "
                    f"{', '.join(p.name for p in candidates)}")


def _read_hub(hub: HubSource) -> list[tuple[str, dict]]:
    import datasets  # lazy: heavy, and only the hub path needs it

    ds = datasets.load_dataset(hub.id, hub.config, split=hub.split, revision=hub.revision)
    return [(f"row {i}", dict(row)) for i, row in enumerate(ds)]


# ---------------------------------------------------------------- normalising and checking

def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def control_char_findings(text: str) -> tuple[list[str], list[str]]:
    """(refused, noted): refused = control characters from mis-escaped LaTeX, noted = tab/CR used as whitespace.
    Each finding shows the offset and a little context."""
    refused, noted = [], []

    def context(i: int) -> str:
        return repr(text[max(0, i - 15):i + 15])

    for m in _CONTROL_RE.finditer(text):
        ch = m.group()
        hint = f" (a LaTeX '{_ESCAPE_NAMES[ch]}...' read as an escape?)" if ch in _ESCAPE_NAMES else ""
        refused.append(f"control character U+{ord(ch):04X} at offset {m.start()}{hint}: {context(m.start())}")
    flagged = set()
    for m in _MISESCAPED_WS_RE.finditer(text):
        flagged.add(m.start())
        esc = r"\t" if m.group() == "\t" else r"\r"
        refused.append(f"U+{ord(m.group()):04X} completing a LaTeX command at offset {m.start()} "
                       f"(a '{esc}...' read as an escape?): {context(m.start())}")
    for m in re.finditer(r"(?:\t|\r(?!\n))+", text):
        if not flagged.intersection(range(m.start(), m.end())):
            noted.append(f"{m.end() - m.start()} tab/CR character(s) used as whitespace at offset {m.start()}: "
                         f"{context(m.start())}")
    return refused, noted


def _level(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer level or null, got {value!r}")
    return value


def _duplicate_ids(rows: list[dict], where: list[str], origin: str) -> list[str]:
    seen: dict[str, str] = {}
    problems = []
    for row, loc in zip(rows, where):
        if row["id"] in seen:
            problems.append(f"{origin}: {loc}: field 'id': duplicate id '{row['id']}' (first at {seen[row['id']]})")
        else:
            seen[row["id"]] = loc
    return problems


def _duplicate_problems(rows: list[dict], where: list[str], origin: str, field: str) -> list[str]:
    """A problem text twice in one suite (compared stripped): a duplicated row, which ids made from the row's
    position ({index}) cannot catch, would count one problem twice in every metric."""
    seen: dict[str, str] = {}
    problems = []
    for row, loc in zip(rows, where):
        text = row["prompt"].strip()
        if text in seen:
            problems.append(f"{origin}: {loc} (id {row['id']}): field '{field}': the same problem text as "
                            f"{seen[text]} (a duplicated row?)")
        else:
            seen[text] = loc
    return problems


def _map_row(name: str, spec: SuiteRows, index: int, row: dict, at: str) -> tuple[dict | None, list[str]]:
    """One raw row -> (prompt row, []) or (None, problems)."""
    fm = spec.fields
    format_cols = [c for t in (fm.id, fm.domain) for c in _format_fields(t) if c != "index"]
    needed = [fm.problem, fm.gold, *([fm.level] if fm.level else []), *format_cols]
    problems = [f"{at}: field '{col}': missing" for col in dict.fromkeys(needed) if col not in row]
    problems += [f"{at}: field '{col}': null, used in an id/domain format" for col in dict.fromkeys(format_cols)
                 if col in row and row[col] is None]
    if problems:
        return None, problems
    values = {**row, "index": index}
    row_id = fm.id.format(**values)
    at = f"{at} (id {row_id})"
    prompt = row[fm.problem]
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(f"{at}: field '{fm.problem}': expected a non-empty problem text, got {prompt!r}")
    gold = None
    try:
        gold = extract_gold(spec.source, row, index=index)
    except DataError as exc:  # its message names the field
        problems.append(f"{at}: unparseable gold: {exc}")
    level = None
    try:
        level = _level(row[fm.level]) if fm.level else None
    except ValueError as exc:
        problems.append(f"{at}: field '{fm.level}': {exc}")
    if problems:
        return None, problems
    return {"id": row_id, "prompt": prompt, "answer": gold, "domain": fm.domain.format(**values), "level": level,
            "source": spec.source, "suite": name}, []


def check_suite(name: str, spec: SuiteRows, raw: list[tuple[str, dict]], origin: str,
                unique_problems: bool = False) -> tuple[list[dict], ValidationReport]:
    """Select and map raw rows (locator, row) in dataset order and list every problem; raises only when the data
    has fewer rows than `first` selects. `unique_problems`: a problem text twice is a problem too (a benchmark
    suite; RL prompts may repeat). The rows are final only when report.ok."""
    if spec.first is not None:
        if len(raw) < spec.first:
            raise DataError(f"{origin}: suite '{name}' needs the first {spec.first} rows, the data has {len(raw)}")
        raw = raw[:spec.first]
    rows: list[dict] = []
    where: list[str] = []
    problems: list[str] = []
    refused_all: list[str] = []
    notes: list[str] = []
    for index, (loc, row) in enumerate(raw):
        at = f"{origin}: {loc}"
        for key, value in row.items():
            for text in _strings(value):
                refused, noted = control_char_findings(text)
                refused_all += [f"{at}: field '{key}': {r}" for r in refused]
                notes += [f"{at}: field '{key}': {n}" for n in noted]
        mapped, row_problems = _map_row(name, spec, index, row, at)
        problems += row_problems
        if mapped is not None:
            rows.append(mapped)
            where.append(loc)
    problems += refused_all + _duplicate_ids(rows, where, origin)
    if unique_problems:
        problems += _duplicate_problems(rows, where, origin, spec.fields.problem)
    if len(raw) != spec.rows:
        problems.append(f"{origin}: expected {spec.rows} rows, got {len(raw)}")
    report = ValidationReport(suite=name, origin=origin, rows=len(raw), expected_rows=spec.rows,
                              unique_ids=len({r["id"] for r in rows}), golds_parsed=len(rows),
                              control_chars=refused_all, notes=notes, problems=problems)
    return rows, report


def normalise_suite(name: str, spec: SuiteRows, raw: list[tuple[str, dict]], origin: str,
                    unique_problems: bool = False) -> SuiteData:
    """check_suite, then one DataError listing every problem (file, row, field), or the validated suite."""
    rows, report = check_suite(name, spec, raw, origin, unique_problems)
    if not report.ok:
        listed = report.problems[:_MAX_LISTED]
        more = len(report.problems) - len(listed)
        raise DataError(f"held-out suite '{name}' ({origin}) failed validation ({len(report.problems)} problem(s)):"
                        f"\n  " + "\n  ".join(listed) + (f"\n  ... and {more} more" if more else ""))
    return SuiteData(name=name, source=spec.source, origin=origin, rows=rows,
                     rows_hash=hash_json(rows), report=report)


# ---------------------------------------------------------------- public loaders

def load_suite(name: str, spec: SuiteSpec, data_dir: Path | None) -> SuiteData:
    """One suite from `data_dir` (the manifest's file name, JSONL or parquet) or, when None, from the hub."""
    if data_dir is not None:
        path = _local_file(spec, Path(data_dir))
        return normalise_suite(name, spec, _read_file(path), str(path), unique_problems=True)
    hub = spec.hub
    origin = f"{hub.id}{'/' + hub.config if hub.config else ''}:{hub.split}@{hub.revision}"
    return normalise_suite(name, spec, _read_hub(hub), origin, unique_problems=True)


def local_suite_files(manifest_path: str | Path, data_dir: str | Path) -> list[Path]:
    """The files of `data_dir` a manifest's suites would be read from (those that exist), for cache keys. Raises
    the manifest's own DataError when the manifest is invalid."""
    files = []
    for spec in load_manifest(manifest_path).suites.values():
        try:
            files.append(_local_file(spec, Path(data_dir)))
        except DataError:
            continue  # the data stage raises it, naming the suite
    return files


def load_heldout(manifest_path: str | Path, data_dir: str | Path | None) -> list[SuiteData]:
    """Every suite of a manifest, in manifest order; ids must be unique across suites too."""
    manifest = load_manifest(manifest_path)
    suites = [load_suite(name, spec, Path(data_dir) if data_dir is not None else None)
              for name, spec in manifest.suites.items()]
    owner: dict[str, str] = {}
    for suite in suites:
        for row in suite.rows:
            if row["id"] in owner:
                raise DataError(f"{manifest_path}: id '{row['id']}' occurs in suites '{owner[row['id']]}' and "
                                f"'{suite.name}'; ids must be unique across the held-out set")
            owner[row["id"]] = suite.name
    return suites


def load_arith_heldout(path: str | Path, expected_rows: int) -> SuiteData:
    """The arith world's held-out parquet (already in the prompt-row schema), validated like a manifest suite.
    The suite is named 'arith' and its golds are checked with the 'arith' rule."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: arith held-out file not found")
    spec = SuiteRows(source=ARITH, rows=expected_rows,
                     fields=FieldMap(id="{id}", problem="prompt", gold="answer", domain="{domain}", level="level"))
    return normalise_suite(ARITH, spec, _read_parquet(path), str(path))


def load_eval_heldout(heldout: str, data_dir: str | Path | None, arith_file: str | Path | None = None,
                      arith_rows: int | None = None) -> list[SuiteData]:
    """What `eval.heldout` names: 'arith' (the world's held-out file, its row count and samples per problem,
    all given by the caller) or a manifest path (read from `data_dir`, else the hub)."""
    if heldout != ARITH:
        return load_heldout(heldout, data_dir)
    if arith_file is None or arith_rows is None:
        raise DataError("eval.heldout is 'arith': the arith world's held-out file, its row count and samples per "
                        "problem are needed")
    return [load_arith_heldout(arith_file, arith_rows)]


def load_prompt_rows(path: str | Path, name: str, source: str = ARITH) -> SuiteData:
    """A file already in the prompt-row schema (RL prompts, a val mix), validated like a held-out suite:
    unique ids, a parseable gold per row (by `source`'s gold rule), no mis-escaped control characters."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {name} file not found")
    raw = _read_file(path)
    if not raw:
        raise DataError(f"{path}: {name} file has no rows")
    spec = SuiteRows(source=source, rows=len(raw),
                     fields=FieldMap(id="{id}", problem="prompt", gold="answer", domain="{domain}", level="level"))
    return normalise_suite(name, spec, raw, str(path))
