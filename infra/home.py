"""Where the state of runs lives: everything under TWINARM_HOME (default `.twinarm/` in the working dir)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    """The layout of run state under one TWINARM_HOME `root`; `ensure()` creates its folders."""

    root: Path

    @property
    def lineage_db(self) -> Path:
        """The DuckDB lineage database file."""
        return self.root / "lineage.duckdb"

    @property
    def mlflow_db(self) -> Path:
        """The SQLite file of the default (local) MLflow tracking store."""
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """MLflow's artifact root for the local store (one folder per ablation)."""
        return self.root / "mlartifacts"

    @property
    def artifacts(self) -> Path:
        """Content-addressed store for datasets, tables and reports."""
        return self.root / "artifacts"

    @property
    def runs(self) -> Path:
        """Working directories of stage runs (checkpoints, rollouts), keyed by stage and content hash."""
        return self.root / "runs"

    @property
    def prefect(self) -> Path:
        """PREFECT_HOME unless the user set their own (persisted task results under `results/`)."""
        return self.root / "prefect"

    @property
    def locks(self) -> Path:
        """Lock files (one per ablation being run, so two flows never run the same one)."""
        return self.root / "locks"

    @property
    def reports(self) -> Path:
        """Ablation reports and audit figures, one folder per ablation."""
        return self.root / "reports"

    def ensure(self) -> "Home":
        """Create root and its folders (artifacts, runs, prefect, locks, reports, mlartifacts). Returns self."""
        for d in (self.root, self.artifacts, self.runs, self.prefect, self.locks, self.reports,
                  self.mlflow_artifacts):
            d.mkdir(parents=True, exist_ok=True)
        return self


def home() -> Home:
    """The Home at $TWINARM_HOME (default `.twinarm` in the working dir), `~` expanded, absolute; creates nothing."""
    return Home(Path(os.environ.get("TWINARM_HOME", ".twinarm")).expanduser().resolve())


_MARK = "TWINARM_ENV_HOME"  # the home the derived variables below point at; inherited by subprocesses


def _derived(h: Home) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(h.prefect),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(h.prefect / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # INFO reaches the run's logs (the Prefect UI, `prefect flow-run logs`): progress lines, stage summaries;
        # the terminal shows Prefect's warnings and errors only (twinarm prints its own lines there)
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # 20 s default: too short on a busy 2-core box
        "MLFLOW_TRACKING_URI": f"sqlite:///{h.mlflow_db}",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # our own progress lines say what is happening
        "TRANSFORMERS_VERBOSITY": "error",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def configure_environment() -> Home:
    """Point Prefect and MLflow at TWINARM_HOME unless the user configured them. Call before importing prefect.

    A variable still holding the value derived for an earlier home (this process's, or a parent's that started
    us with another TWINARM_HOME) is ours and moves with TWINARM_HOME; any other value is the user's and stays."""
    h = home().ensure()
    earlier = _derived(Home(Path(os.environ[_MARK]))) if _MARK in os.environ else {}
    for key, value in _derived(h).items():
        if key not in os.environ or os.environ[key] == earlier.get(key):
            os.environ[key] = value
    os.environ[_MARK] = str(h.root)
    # Idle OpenMP threads sleep instead of spinning (torch's libgomp reads this when torch loads, so before any
    # stage imports torch; Ray workers and subprocesses inherit it). How threads wait never changes what they
    # compute. Measured on the 2-core box with 4 other jobs running: base-model training on 2 threads took
    # 12.1 s/step with spinning threads vs 0.86-1.10 s/step passive (1 thread: 1.0-3.6 s/step). A user's own
    # setting stays.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return h
