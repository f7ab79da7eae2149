"""SFT twins (DESIGN §7, §9): the meta twin (rows as given) and the no-meta twin (meta blocks stripped).

The twins are where a confound first enters an ablation, so they are built and verified row for row: same ids
in the same order, the same metadata, messages that differ only by the stripped meta spans, the same final
answers, the same wrong prefixes and the same loss masks outside the meta spans. A row that cannot be twinned
is refused on both sides, with the names of the checks it would fail, and listed; it is never dropped silently.
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel

from infra.artifacts import atomic_path, atomic_write_json, read_parquet, write_parquet
from infra.errors import DataError, TwinarmError
from infra.hashing import hash_json
from meta.grammar import META_CLOSE, META_OPEN, char_regions, find_blocks, format_class, has_tags, last_boxed, \
    strip_meta
from sft.masks import IGNORE, loss_mask

ROLES = ("system", "user", "assistant")
TEXT_COLUMNS = ("messages", "wrong_prefix")  # all the twins may differ in; every other column is metadata
MAX_LISTED = 100  # failing row ids listed per check
MAX_EXAMPLES = 5  # failing rows explained per check


class TwinCheckError(TwinarmError):
    """The twins violate a named check (a confound): the message names each failed check and its rows."""

    def __init__(self, report: "TwinReport"):
        self.report = report
        super().__init__("SFT twins refused, failed checks: " + "; ".join(map(_describe, report.failed())))


def _describe(check: "Check") -> str:
    if not check.failing:
        return f"{check.name} ({json.dumps(check.evidence, default=str)[:200]})"
    more = ", …" if check.failing > 5 else ""
    return f"{check.name} ({check.failing} row{'s' * (check.failing != 1)}: {', '.join(check.rows[:5])}{more})"


class Refusal(BaseModel):
    id: str
    row: int  # position in the input rows (0-based)
    reasons: dict[str, str]  # name of the check the twin would fail → what happened


class Check(BaseModel):
    name: str
    passed: bool
    failing: int = 0  # rows that fail it
    rows: list[str] = []  # their ids (the first MAX_LISTED)
    evidence: dict[str, Any] = {}


class TwinReport(BaseModel):
    passed: bool
    checks: list[Check]
    stats: dict[str, Any]
    mask_level: Literal["chars", "tokens"]  # masks compared on the response text, or on templated tokens
    tokenizer: str | None = None  # fingerprint of the tokenizer both twins were checked with
    max_length: int | None = None
    refused: dict[str, Any] | None = None  # set by write_twins: refusal counts by check

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def raise_for_failures(self) -> None:
        if not self.passed:
            raise TwinCheckError(self)


@dataclass
class TwinSet:
    meta: list[dict[str, Any]]
    nometa: list[dict[str, Any]]
    refused: list[Refusal]
    open_tag: str = META_OPEN
    close_tag: str = META_CLOSE


# ---------------------------------------------------------------- loading and validation

def load_sft_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read SFT rows from .parquet or .jsonl and validate every row (DataError names file, row, id and field).
    Rows come back with the union of the file's columns (missing → None, as parquet has it) and always a
    `wrong_prefix` key, so a JSONL file and its parquet copy load identically."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: SFT data file not found")
    if path.suffix == ".parquet":
        try:
            rows = read_parquet(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        where = [f"row {i + 1}" for i in range(len(rows))]
    elif path.suffix == ".jsonl":
        rows, where = _read_jsonl(path)
    else:
        raise DataError(f"{path}: expected a .parquet or .jsonl SFT data file, got '{path.suffix}'")
    return validate_rows(rows, str(path), where)


def _read_jsonl(path: Path) -> tuple[list[Any], list[str]]:
    rows, where = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # a blank line is not a row
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        where.append(f"line {n}")
    return rows, where


def validate_rows(rows: list[Any], source: str = "<rows>", where: list[str] | None = None) -> list[dict[str, Any]]:
    """Validate the SFT row contract and normalise the columns (see load_sft_rows). Raises DataError."""
    where = where or [f"row {i + 1}" for i in range(len(rows))]
    seen: dict[str, str] = {}
    columns: dict[str, None] = {}
    for row, loc in zip(rows, where):
        _validate_row(row, source, loc)
        wp = row.get("wrong_prefix")
        if wp is not None and (problem := _prefix_problem(wp, row["messages"][-1]["content"])):
            raise _field_error(source, loc, row, "wrong_prefix",
                               f"an exact prefix of the assistant response; {problem}")
        if row["id"] in seen:
            raise _field_error(source, loc, row, "id", f"a unique id; {seen[row['id']]} has it too")
        seen[row["id"]] = loc
        columns.update(dict.fromkeys(row))
    columns.setdefault("wrong_prefix")
    return [{c: row.get(c) for c in columns} for row in rows]


def _validate_row(row: Any, source: str, loc: str) -> None:
    """The structure every check relies on (ids unique and prefixes exact are checked separately)."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: {loc}: expected an object with id and messages, got {type(row).__name__}")
    if not isinstance(row.get("id"), str) or not row["id"]:
        raise _field_error(source, loc, row, "id", f"a non-empty string, got {_short(row.get('id'))}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _field_error(source, loc, row, "messages", f"a non-empty list of messages, got {_short(messages)}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _field_error(source, loc, row, f"messages[{k}]", f"an object with role and content, got {_short(m)}")
        if extra := sorted(set(m) - {"role", "content"}):
            raise _field_error(source, loc, row, f"messages[{k}]", f"only the keys role and content, got {extra}")
        if m.get("role") not in ROLES:
            raise _field_error(source, loc, row, f"messages[{k}].role",
                               f"one of {list(ROLES)}, got {_short(m.get('role'))}")
        if not isinstance(m.get("content"), str):
            raise _field_error(source, loc, row, f"messages[{k}].content", f"a string, got {_short(m.get('content'))}")
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if len(body) < 2 or body[-1] != "assistant" or set(body[:-1]) != {"user"}:
        raise _field_error(source, loc, row, "messages",
                           f"roles [system], user, …, user, assistant (the response last), got {roles}")
    wp = row.get("wrong_prefix")
    if wp is not None and not isinstance(wp, str):
        raise _field_error(source, loc, row, "wrong_prefix", f"a string or null, got {_short(wp)}")


def _field_error(source: str, loc: str, row: dict[str, Any], field: str, expected: str) -> DataError:
    rid = row.get("id")
    ident = f" (id {rid!r})" if isinstance(rid, str) else ""
    return DataError(f"{source}: {loc}{ident}: field '{field}': expected {expected}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _prefix_problem(prefix: str, text: str) -> str | None:
    if text.startswith(prefix):
        return None
    at = next((i for i, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
    return f"they differ at char {at} ({prefix[at:at + 12]!r} vs {text[at:at + 12]!r})"


# ---------------------------------------------------------------- tag leakage

@lru_cache(maxsize=8)
def _leak_re(open_tag: str, close_tag: str) -> re.Pattern[str]:
    # A tag with up to two characters missing from its ends (at least 6 long, or the whole tag), anywhere;
    # and a text that ends inside a tag (a proper prefix of 3+ characters, a cut mid-tag).
    pieces = {t[i:len(t) - j] for t in (open_tag, close_tag) for i in range(3) for j in range(3 - i)
              if len(t) - i - j >= max(len(t) - 2, min(len(t), 6))}
    cuts = {t[:k] for t in (open_tag, close_tag) for k in range(3, len(t))}
    inner = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
    tail = "|".join(re.escape(p) for p in sorted(cuts, key=len, reverse=True)) or "(?!)"
    return re.compile(f"{inner}|(?:{tail})\\Z", re.IGNORECASE)


def tag_leaks(text: str, open_tag: str = META_OPEN, close_tag: str = META_CLOSE) -> list[str]:
    """Meta tags and tag fragments in a text (in any letter case): what the no-meta twin must not contain."""
    return [m.group() for m in _leak_re(open_tag, close_tag).finditer(text)]


# ---------------------------------------------------------------- per-row checks (shared by build and verify)

@dataclass(frozen=True)
class _Ctx:
    open_tag: str
    close_tag: str
    tokenizer: Any = None
    max_length: int | None = None


def _response(row: dict[str, Any]) -> str:
    return row["messages"][-1]["content"]


def _check_only_messages(m: dict[str, Any], n: dict[str, Any], ctx: _Ctx) -> str | None:
    if len(m["messages"]) != len(n["messages"]):
        return f"{len(m['messages'])} messages vs {len(n['messages'])}"
    for k, (a, b) in enumerate(zip(m["messages"], n["messages"])):
        if a["role"] != b["role"]:
            return f"messages[{k}].role {a['role']!r} vs {b['role']!r}"
        if b["content"] != strip_meta(a["content"], ctx.open_tag, ctx.close_tag):
            return f"messages[{k}].content is not the meta content with its meta stripped"
    wp_m, wp_n = m.get("wrong_prefix"), n.get("wrong_prefix")
    if (wp_n is None) != (wp_m is None) or (wp_m is not None and wp_n != strip_meta(wp_m, ctx.open_tag, ctx.close_tag)):
        return "wrong_prefix is not the meta wrong prefix with its meta stripped"
    return None


def _check_no_leak(m: dict[str, Any], n: dict[str, Any], ctx: _Ctx) -> str | None:
    texts = [(f"messages[{k}].content", msg["content"]) for k, msg in enumerate(n["messages"])]
    texts.append(("wrong_prefix", n.get("wrong_prefix") or ""))
    for where, text in texts:
        if leaks := tag_leaks(text, ctx.open_tag, ctx.close_tag):
            return f"{where} contains {leaks[:3]}"
    return None


def _check_answer(m: dict[str, Any], n: dict[str, Any], ctx: _Ctx) -> str | None:
    a, b = last_boxed(_response(m)), last_boxed(_response(n))
    if a is not None and has_tags(a, ctx.open_tag, ctx.close_tag):
        return f"a meta tag sits inside the final \\boxed{{}} ({_short(a)})"
    if a != b:
        return f"final answer {_short(a)} becomes {_short(b)}"
    return None


def _check_prefix(m: dict[str, Any], n: dict[str, Any], ctx: _Ctx) -> str | None:
    wp_m, wp_n = m.get("wrong_prefix"), n.get("wrong_prefix")
    if (wp_m is None) != (wp_n is None):
        return f"wrong_prefix set on one side only (meta: {_short(wp_m)}, no-meta: {_short(wp_n)})"
    for side, row, wp in (("meta", m, wp_m), ("no-meta", n, wp_n)):
        if wp is not None and (problem := _prefix_problem(wp, _response(row))):
            return f"{side} wrong_prefix is not an exact prefix of its response: {problem}"
    return None


def _check_nonempty(m: dict[str, Any], n: dict[str, Any], ctx: _Ctx) -> str | None:
    if not _response(n)[len(n.get("wrong_prefix") or ""):].strip():
        return "nothing is left to train in the no-meta response once the meta is stripped"
    return None


def _check_masks(m: dict[str, Any], n: dict[str, Any], ctx: _Ctx) -> str | None:
    """The no-meta twin's trained characters equal the meta twin's with its meta spans (blocks and stray tags,
    by char_regions) removed. Without a tokenizer: on the response, trained = after the wrong prefix. With one:
    on the templated chat, by the trainer's own loss_mask (see trained_chars)."""
    if _check_prefix(m, n, ctx):
        return "the mask is undefined: a wrong prefix is not an exact prefix of its response"
    if ctx.tokenizer is None:
        (text_m, wp_m), (text_n, wp_n) = [(_response(r), len(r.get("wrong_prefix") or "")) for r in (m, n)]
        mask_m, mask_n = [i >= wp_m for i in range(len(text_m))], [i >= wp_n for i in range(len(text_n))]
    else:
        try:
            (text_m, mask_m), (text_n, mask_n) = [trained_chars(ctx.tokenizer, r, ctx.max_length) for r in (m, n)]
        except DataError as exc:  # too long for max_length, or nothing left to train, on either side
            return f"no loss mask: {exc}"
    kept = [(s, e) for s, e, region in char_regions(text_m, ctx.open_tag, ctx.close_tag) if region == "answer"]
    if "".join(text_m[s:e] for s, e in kept) != text_n:
        return "the no-meta text is not the meta text with its meta spans removed (a tag formed by joining?)"
    kept_mask = [t for s, e in kept for t in mask_m[s:e]]
    diff = [j for j, (a, b) in enumerate(zip(kept_mask, mask_n)) if a != b]
    if diff:
        j = diff[0]
        return (f"{len(diff)} characters trained on one side only, the first at no-meta char {j} "
                f"({text_n[max(0, j - 12):j + 12]!r}; meta {'trains' if kept_mask[j] else 'masks'} it)")
    return None


def trained_chars(tokenizer: Any, row: dict[str, Any], max_length: int | None = None) -> tuple[str, list[bool]]:
    """The row's chat-templated text and, per character, whether the trainer learns it: labels come from the
    canonical sft.train.loss_mask, projected onto characters by the offsets of the same tokenisation."""
    ids, labels = loss_mask(tokenizer, row["messages"], row.get("wrong_prefix"),
                            sys.maxsize if max_length is None else max_length)
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise DataError("loss_mask's tokens are not the tokens of the templated chat")
    return text, char_mask(len(text), enc["offset_mapping"], labels)


def char_mask(n_chars: int, offsets: list[tuple[int, int]], labels: list[int]) -> list[bool]:
    """A character is trained iff every token covering it is trained (a character split over several byte tokens
    needs all of them); one covered by no token (an offset trimmed off a token's leading whitespace) takes the
    status of the next covered character, or False at the end."""
    status: list[bool | None] = [None] * n_chars
    covered = 0  # offsets never decrease: characters before `covered` already have a status
    for (s, e), label in zip(offsets, labels):
        ok = label != IGNORE
        if s >= covered:
            status[s:e] = [ok] * (e - s)
        else:  # a character shared with earlier tokens (byte pieces of one character)
            for i in range(s, e):
                status[i] = ok and status[i] is not False
        covered = max(covered, e)
    following = False
    for i in range(n_chars - 1, -1, -1):
        if status[i] is None:
            status[i] = following
        following = status[i]
    return status  # type: ignore[return-value]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides token ids and the chat rendering."""
    return hash_json([tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template])


ROW_CHECKS: dict[str, Callable[[dict[str, Any], dict[str, Any], _Ctx], str | None]] = {
    "only_messages_differ": _check_only_messages,
    "no_tag_leakage": _check_no_leak,
    "answers_preserved": _check_answer,
    "wrong_prefix_exact": _check_prefix,
    "nometa_response_nonempty": _check_nonempty,
    "masks_identical": _check_masks,
}


def _row_problems(m: dict[str, Any], n: dict[str, Any], ctx: _Ctx) -> dict[str, str]:
    return {name: problem for name, check in ROW_CHECKS.items() if (problem := check(m, n, ctx))}


# ---------------------------------------------------------------- build

def strip_row(row: dict[str, Any], open_tag: str = META_OPEN, close_tag: str = META_CLOSE) -> dict[str, Any]:
    """The no-meta twin of one row: every message content and the wrong prefix stripped, nothing else."""
    wp = row.get("wrong_prefix")
    messages = [{**msg, "content": strip_meta(msg["content"], open_tag, close_tag)} for msg in row["messages"]]
    return {**row, "messages": messages,
            "wrong_prefix": None if wp is None else strip_meta(wp, open_tag, close_tag)}


def twin_side(strip_meta: bool) -> Literal["meta", "nometa"]:
    """Which twin an arm trains on: the no-meta side when `sft.strip_meta` (control arms), else the meta side.
    The twins stage writes both as `<source>_meta` / `<source>_nometa`."""
    return "nometa" if strip_meta else "meta"


def build_twins(rows: list[dict[str, Any]], open_tag: str = META_OPEN, close_tag: str = META_CLOSE, *,
                tokenizer: Any = None, max_length: int | None = None) -> TwinSet:
    """Both twins, row-for-row aligned. A row that would fail any per-row check is refused from both sides.
    Given the training tokenizer (and max_length), masks are compared on tokens, so a token merging across
    the wrong-prefix boundary, or a row the trainer could not encode within max_length, also refuses it."""
    rows = validate_rows(rows)  # a malformed row is an input error, not a refusal
    ctx = _Ctx(open_tag, close_tag, tokenizer, max_length)
    twins = TwinSet(meta=[], nometa=[], refused=[], open_tag=open_tag, close_tag=close_tag)
    for i, row in enumerate(rows):
        twin = strip_row(row, open_tag, close_tag)
        if problems := _row_problems(row, twin, ctx):
            twins.refused.append(Refusal(id=row["id"], row=i, reasons=problems))
        else:
            twins.meta.append(row)
            twins.nometa.append(twin)
    return twins


# ---------------------------------------------------------------- verify

def verify_twins(meta_rows: list[dict[str, Any]], nometa_rows: list[dict[str, Any]], tokenizer: Any = None,
                 max_length: int | None = None, *, open_tag: str = META_OPEN, close_tag: str = META_CLOSE,
                 nometa_tokenizer: Any = None) -> TwinReport:
    """Every check of the twin contract, each pass/fail with evidence and the failing row ids.

    Rows are paired by position when the id lists are equal, else by id (so a reordering fails ids_aligned
    only). With a tokenizer, masks are compared on tokens and the tokenizer checks are added; nometa_tokenizer
    is the one the no-meta arm would train with (default: the same)."""
    for side, rows in (("meta twin", meta_rows), ("no-meta twin", nometa_rows)):
        for i, row in enumerate(rows):
            _validate_row(row, side, f"row {i + 1}")
    ctx = _Ctx(open_tag, close_tag, tokenizer, max_length)
    ids_m, ids_n = [r["id"] for r in meta_rows], [r["id"] for r in nometa_rows]
    if ids_m == ids_n:
        pairs = list(zip(meta_rows, nometa_rows))
    else:
        by_id = {r["id"]: r for r in nometa_rows}
        pairs = [(r, by_id[r["id"]]) for r in meta_rows if r["id"] in by_id]

    checks = [
        Check(name="row_count", passed=len(meta_rows) == len(nometa_rows),
              evidence={"meta": len(meta_rows), "nometa": len(nometa_rows)}),
        _ids_check(ids_m, ids_n),
        _pair_check("metadata_identical", pairs, _metadata_problem),
    ]
    checks += [_pair_check(name, pairs, lambda m, n, f=fn: f(m, n, ctx)) for name, fn in ROW_CHECKS.items()]
    if tokenizer is not None:
        checks += _tokenizer_checks(tokenizer, nometa_tokenizer or tokenizer, open_tag, close_tag)
    return TwinReport(passed=all(c.passed for c in checks), checks=checks, stats=_stats(meta_rows, open_tag, close_tag),
                      mask_level="chars" if tokenizer is None else "tokens",
                      tokenizer=None if tokenizer is None else tokenizer_fingerprint(tokenizer), max_length=max_length)


def pairing_problem(meta_rows: list[dict[str, Any]], nometa_rows: list[dict[str, Any]]) -> str | None:
    """Why two files are not row-for-row twins (ids not the same in the same order, or a row whose metadata
    columns differ), or None when they are. The content checks (leaks, answers, masks) are verify_twins'."""
    ids = _ids_check([str(r.get("id")) for r in meta_rows], [str(r.get("id")) for r in nometa_rows])
    if not ids.passed:
        return f"ids not aligned ({ids.failing} rows, e.g. {', '.join(ids.rows[:3])})"
    for m, n in zip(meta_rows, nometa_rows):
        if problem := _metadata_problem(m, n):
            return f"row {m.get('id')}: metadata {problem}"
    return None


def _ids_check(ids_m: list[str], ids_n: list[str]) -> Check:
    dups = sorted({i for ids in (ids_m, ids_n) for i, c in Counter(ids).items() if c > 1})
    only_m, only_n = sorted(set(ids_m) - set(ids_n)), sorted(set(ids_n) - set(ids_m))
    moved = [a for a, b in zip(ids_m, ids_n) if a != b]
    bad = list(dict.fromkeys(dups + only_m + only_n + moved))
    first = next((k for k, (a, b) in enumerate(zip(ids_m, ids_n)) if a != b), None)
    return Check(name="ids_aligned", passed=not bad, failing=len(bad), rows=bad[:MAX_LISTED],
                 evidence={"duplicates": dups[:MAX_LISTED], "meta_only": only_m[:MAX_LISTED],
                           "nometa_only": only_n[:MAX_LISTED], "first_misaligned_position": first})


def _metadata_problem(m: dict[str, Any], n: dict[str, Any]) -> str | None:
    cols_m, cols_n = set(m) - set(TEXT_COLUMNS), set(n) - set(TEXT_COLUMNS)
    if cols_m != cols_n:
        return f"columns differ: meta only {sorted(cols_m - cols_n)}, no-meta only {sorted(cols_n - cols_m)}"
    drift = [c for c in sorted(cols_m) if not _same(m[c], n[c])]
    return f"{drift} differ (meta {_short(m[drift[0]])} vs no-meta {_short(n[drift[0]])})" if drift else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN == NaN for metadata
    return type(a) is type(b) and a == b


def _pair_check(name: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]],
                problem: Callable[[dict[str, Any], dict[str, Any]], str | None]) -> Check:
    failures = [(m["id"], p) for m, n in pairs if (p := problem(m, n))]
    return Check(name=name, passed=not failures, failing=len(failures), rows=[i for i, _ in failures[:MAX_LISTED]],
                 evidence={"rows_checked": len(pairs), "examples": dict(failures[:MAX_EXAMPLES])})


def _tokenizer_checks(tok_m: Any, tok_n: Any, open_tag: str, close_tag: str) -> list[Check]:
    def ids(tok: Any) -> dict[str, int | None]:
        vocab = tok.get_vocab()
        return {t: vocab.get(t) if tok.encode(t, add_special_tokens=False) == [vocab.get(t)] else None
                for t in (open_tag, close_tag)}

    found = {"meta": ids(tok_m), "nometa": ids(tok_n)}
    prints = {"meta": tokenizer_fingerprint(tok_m), "nometa": tokenizer_fingerprint(tok_n)}
    return [
        Check(name="meta_tokens_in_vocab", passed=all(v is not None for side in found.values() for v in side.values()),
              evidence={"single_token_ids": found}),
        Check(name="same_tokenizer", passed=prints["meta"] == prints["nometa"], evidence={"fingerprints": prints}),
    ]


def _stats(meta_rows: list[dict[str, Any]], open_tag: str, close_tag: str) -> dict[str, Any]:
    """What the meta twin teaches: blocks per response, cue categories, format classes, stated confidences."""
    per_row, categories, classes = Counter(), Counter(), Counter()
    confidences = 0
    for row in meta_rows:
        blocks = find_blocks(_response(row), open_tag, close_tag)
        per_row[len(blocks)] += 1
        classes[format_class(_response(row), open_tag=open_tag, close_tag=close_tag)] += 1
        categories.update(c for b in blocks for c in b.categories)
        confidences += sum(b.confidence is not None for b in blocks)
    return {"rows": len(meta_rows), "rows_with_blocks": sum(v for k, v in per_row.items() if k),
            "blocks": sum(k * v for k, v in per_row.items()),
            "blocks_per_row": {str(k): v for k, v in sorted(per_row.items())},
            "categories": dict(sorted(categories.items())), "format_classes": dict(sorted(classes.items())),
            "stated_confidences": confidences,
            "rows_with_wrong_prefix": sum(r.get("wrong_prefix") is not None for r in meta_rows)}


# ---------------------------------------------------------------- write

def write_twins(twins: TwinSet, out_dir: str | Path, tokenizer: Any = None, max_length: int | None = None
                ) -> TwinReport:
    """Verify, then write meta.parquet, nometa.parquet, report.json and refused.json as one atomic directory.
    Nothing is written when a check fails (TwinCheckError names it) or when no row could be twinned."""
    if not twins.meta:
        raise DataError(f"no row could be twinned ({len(twins.refused)} refused); nothing to write to {out_dir}")
    report = verify_twins(twins.meta, twins.nometa, tokenizer, max_length,
                          open_tag=twins.open_tag, close_tag=twins.close_tag)
    report.refused = {"rows": len(twins.refused),
                      "by_check": dict(sorted(Counter(k for r in twins.refused for k in r.reasons).items()))}
    report.raise_for_failures()
    import pyarrow as pa

    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir()
        try:
            write_parquet(twins.meta, tmp / "meta.parquet")
            write_parquet(twins.nometa, tmp / "nometa.parquet")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"cannot write the twins as parquet (a column with mixed types?): {exc}") from None
        atomic_write_json(tmp / "report.json", report.model_dump(mode="json"))
        atomic_write_json(tmp / "refused.json", [r.model_dump(mode="json") for r in twins.refused])
    return report
