"""Atomic writes and the content-addressed artifact store.

A stage never leaves a partial output visible: files are written to a hidden temporary sibling and renamed
into place (rename is atomic on one filesystem). Small artifacts (datasets, tables, reports) are copied into
`artifacts/<kind>/<hash><suffix>`; large ones (checkpoints) are registered where they lie, by content hash.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from infra.hashing import hash_path, path_size


@dataclass
class Artifact:
    """One content-addressed artifact as lineage records it: id = content hash, kind (dataset, table,
    checkpoint, config, report, spec), uri (file:// path), size in bytes, row count for tables, free facets."""

    artifact_id: str
    kind: str
    uri: str
    bytes: int = 0
    rows: int | None = None
    facets: dict[str, Any] = field(default_factory=dict)

_TMP_MARK = ".tmp-"


def _tmp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clean_stale_tmp(directory: Path) -> None:
    """Remove temporaries left by killed writers (their rename never happened, so nothing refers to them)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(".") and _TMP_MARK in p.name:
            pid = p.name.split(_TMP_MARK, 1)[1].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path (file or directory) that replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary sibling, fsync, rename; parents created). Returns `path`."""
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    """`atomic_write_bytes` of `text` encoded as UTF-8. Returns `path`."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write `obj` atomically as JSON (indent 2, sorted keys, final newline; other values via str). Returns `path`."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The parsed JSON of the file at `path`. Raises OSError if unreadable, json.JSONDecodeError if not JSON."""
    return json.loads(Path(path).read_text())


def write_parquet(rows: list[dict[str, Any]], path: Path, schema: Any = None) -> int:
    """Write rows atomically as parquet; deterministic bytes for equal rows. Returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table.num_rows


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """Every row of a parquet file as a {column: value} dict, in file order."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def parquet_rows(path: Path) -> int:
    """The row count of a parquet file, read from its footer (no data is read)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


class ArtifactStore:
    """Content-addressed store under `root`: `put` copies into `<root>/<kind>/<hash><suffix>`; `describe` does not."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def describe(self, path: Path, kind: str, rows: int | None = None, **facets: Any) -> Artifact:
        """Register an artifact where it lies (checkpoints): id = content hash of the file or directory."""
        path = Path(path).resolve()
        return Artifact(artifact_id=hash_path(path), kind=kind, uri=path.as_uri(), bytes=path_size(path),
                        rows=rows, facets=facets)

    def put(self, src: Path, kind: str, rows: int | None = None, **facets: Any) -> Artifact:
        """Copy a file or directory into the content-addressed store (idempotent) and describe it there."""
        src = Path(src)
        digest = hash_path(src)
        suffix = "".join(src.suffixes) if src.is_file() else ""
        final = self.root / kind / f"{digest}{suffix}"
        if not final.exists():
            with atomic_path(final) as tmp:
                shutil.copytree(src, tmp) if src.is_dir() else shutil.copyfile(src, tmp)
        return Artifact(artifact_id=digest, kind=kind, uri=final.resolve().as_uri(), bytes=path_size(final),
                        rows=rows, facets=facets)


def uri_path(uri: str) -> Path:
    """The local path of a file:// URI (artifacts of this store are local)."""
    if not uri.startswith("file://"):
        raise ValueError(f"not a local artifact uri: {uri}")
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path))
