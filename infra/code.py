"""Which code a result was produced by.

`closure_hash(modules)` is the code part of a stage's compute key: the content hash of every project source file
the given modules import, transitively — module-level and function-level imports alike, read from the AST (a stage
body imports its science lazily, inside the function, so a module-level scan alone would miss it). Package
`__init__` files on the way are included, since Python runs them on import. Nothing is listed by hand, so the key
cannot drift from the real imports: edit any file the body can reach and the key changes; edit one it cannot reach
and it does not (tests/test_stages.py edits copies of each).

`code_version()` names the whole tree (git commit + a hash of every project package) for the record; it is never
part of a cache key.
"""
from __future__ import annotations

import ast
import functools
import subprocess
from pathlib import Path
from typing import Iterable

from infra.hashing import hash_file, hash_json

REPO_ROOT = Path(__file__).resolve().parent.parent
NOT_PACKAGES = ("tests", "scripts")  # folders with Python that is never imported by a stage


def project_packages(root: Path = REPO_ROOT) -> tuple[str, ...]:
    """Top-level project packages: folders of `root` with an `__init__.py` (tests and scripts excluded)."""
    return tuple(sorted(p.name for p in root.iterdir()
                        if p.is_dir() and (p / "__init__.py").is_file() and p.name not in NOT_PACKAGES))


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of a dotted project module name (`a.b` → a/b.py or a/b/__init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Dotted names a file imports (anywhere in it), including `pkg.name` for every `from pkg import name`."""
    names: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_closure(modules: Iterable[str], root: Path = REPO_ROOT, stop: Iterable[str] = ()) -> list[Path]:
    """Project source files that `modules` import, transitively, themselves included (sorted).

    A name in `stop` is neither included nor followed. Each prefix of a dotted name counts (importing `a.b.c`
    runs a/__init__.py and a/b/__init__.py). Names outside the project's packages (torch, prefect) are ignored.
    Raises ValueError when a starting module is not a project module."""
    packages = set(project_packages(root))
    stop = set(stop)
    seen: dict[str, Path] = {}
    todo = list(modules)
    for name in todo:
        if module_file(name, root) is None:
            raise ValueError(f"{name}: not a module of the project at {root}")
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] not in packages or name in stop:
            continue
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seen or prefix in stop:
                continue
            path = module_file(prefix, root)
            if path is None:
                continue  # `from pkg import function`: pkg.function is no module
            seen[prefix] = path
            todo.extend(_imported_names(path, prefix))
    return sorted(set(seen.values()))


@functools.lru_cache(maxsize=None)
def closure_hash(modules: tuple[str, ...], root: Path = REPO_ROOT, stop: tuple[str, ...] = ()) -> str:
    """Content hash of `import_closure(modules, root, stop)`: relative path and file hash of each file."""
    files = import_closure(modules, root, stop)
    return hash_json([(p.relative_to(root).as_posix(), hash_file(p)) for p in files])


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
    """`<git commit>[+dirty]:<hash of every project source file>`; the source hash alone if git is unavailable.
    For the record (lineage, report), never a cache key."""
    files = sorted(p for pkg in project_packages() for p in (REPO_ROOT / pkg).rglob("*.py"))
    src = hash_json([(p.relative_to(REPO_ROOT).as_posix(), hash_file(p)) for p in files])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"src:{src}"
    return f"{commit}{'+dirty' if dirty else ''}:{src}" if commit else f"src:{src}"
