"""Content hashes: canonical JSON for configs, streamed sha256 for files and directories."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """JSON that is identical for equal values, whatever the key order or re-serialisation (floats by repr)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot hash object of type {type(obj).__name__}")


def hash_json(obj: Any, length: int = 16) -> str:
    """The first `length` hex digits of sha256(canonical_json(obj)). Raises TypeError for a value it cannot encode."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def hash_bytes(data: bytes, length: int = 16) -> str:
    """The first `length` hex digits of the sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()[:length]


def hash_file(path: Path, length: int = 16) -> str:
    """The first `length` hex digits of the sha256 of a file's bytes, streamed in 1 MiB chunks. Raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def hash_path(path: Path, length: int = 16) -> str:
    """Hash of a file, or of a directory as the sorted (relative path, file hash) list (names matter)."""
    path = Path(path)
    if path.is_file():
        return hash_file(path, length)
    if not path.is_dir():
        raise FileNotFoundError(path)
    entries = [
        (p.relative_to(path).as_posix(), hash_file(p, 64))
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hash_json(entries, length)


def path_size(path: Path) -> int:
    """Size in bytes of a file, or the total of the files under a directory (0 for a path that does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
