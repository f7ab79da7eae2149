"""The code version a result was produced by: a hash of the sources it depends on, plus git's commit."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from infra.hashing import hash_json, hash_file

REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def source_hash(packages: tuple[str, ...]) -> str:
    """Hash of every .py file of the given top-level packages: a cache key that changes when their code does."""
    files = sorted(p for pkg in packages for p in (REPO_ROOT / pkg).rglob("*.py"))
    return hash_json([(p.relative_to(REPO_ROOT).as_posix(), hash_file(p)) for p in files])


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`<git commit>[+dirty]:<source hash of all packages>`; the source hash alone if git is unavailable."""
    packages = ("infra", "worlds", "sft", "rl", "rewards", "evals", "audit", "tasks", "flows")
    src = source_hash(packages)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"src:{src}"
    return f"{commit}{'+dirty' if dirty else ''}:{src}" if commit else f"src:{src}"
