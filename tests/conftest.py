"""Shared fixtures. Every test that touches state gets its own TWINARM_HOME; nothing reaches the network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh TWINARM_HOME for one test (lineage, MLflow store, artifacts)."""
    monkeypatch.setenv("TWINARM_HOME", str(tmp_path / "home"))
    from infra.home import configure_environment

    return configure_environment()


@pytest.fixture(scope="session")
def flow_home(tmp_path_factory):
    """One TWINARM_HOME for every test that runs a Prefect flow (Prefect's settings are per process)."""
    path = tmp_path_factory.mktemp("flow-home")
    old = os.environ.get("TWINARM_HOME")
    os.environ["TWINARM_HOME"] = str(path)
    from infra.home import configure_environment

    yield configure_environment()
    if old is None:
        os.environ.pop("TWINARM_HOME", None)
    else:
        os.environ["TWINARM_HOME"] = old


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    if not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark files not found at {BENCHMARKS}")
    return BENCHMARKS
