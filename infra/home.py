"""Where the state of runs lives: everything under TWINARM_HOME (default `.twinarm/` in the working dir)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def lineage_db(self) -> Path:
        return self.root / "lineage.duckdb"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
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
        return self.root / "prefect"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def ensure(self) -> "Home":
        for d in (self.root, self.artifacts, self.runs, self.prefect, self.locks, self.reports,
                  self.mlflow_artifacts):
            d.mkdir(parents=True, exist_ok=True)
        return self


def home() -> Home:
    return Home(Path(os.environ.get("TWINARM_HOME", ".twinarm")).expanduser().resolve())


_OURS: dict[str, str] = {}  # the values this module set, so a later call may move them with TWINARM_HOME


def configure_environment() -> Home:
    """Point Prefect and MLflow at TWINARM_HOME unless the user configured them. Call before importing prefect."""
    h = home().ensure()
    defaults = {
        "PREFECT_HOME": str(h.prefect),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(h.prefect / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_TRACKING_URI": f"sqlite:///{h.mlflow_db}",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for key, value in defaults.items():
        if key not in os.environ or os.environ[key] == _OURS.get(key):
            os.environ[key] = value
            _OURS[key] = value
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return h
