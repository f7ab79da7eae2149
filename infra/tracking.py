"""MLflow tracking (DESIGN §4): a parent run per ablation, a child run per arm × stage, all idempotent.

Runs are found again by tag (`twinarm.ablation`, `twinarm.run_id` = the lineage run id), metrics are logged
only for (key, step) pairs not yet present, datasets and models only once per content hash; so recording a
stage twice (a cached rerun, a resume) adds no rows. The default store is SQLite under TWINARM_HOME with the
artifact root beside it; a user's MLFLOW_TRACKING_URI is honoured as is.
"""
from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from infra.errors import TwinarmError
from infra.home import Home
from infra.artifacts import Artifact

PARENT_TAG = "twinarm.ablation"
RUN_TAG = "twinarm.run_id"
PURE_ACCURACY = "accuracy/pure"  # the correctness-only metric; never mixed with shaped reward


def experiment_name(ablation: str) -> str:
    """The MLflow experiment name of an ablation: `twinarm/<ablation>`."""
    return f"twinarm/{ablation}"


def tracking_uri(home: Home) -> str:
    """$MLFLOW_TRACKING_URI if set, else the local SQLite store `sqlite:///<home>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home.mlflow_db}"


MLFLOW_UI = "http://127.0.0.1:5000"  # the MLflow UI of `twinarm ui` (its --mlflow-port default)


def runs_url(experiment_id: str, ui: str | None = None) -> str:
    """The MLflow UI page with an experiment's runs table (not MLflow 3's GenAI overview tab, which stays empty
    for these runs). The UI is `ui`, else a remote tracking server's own, else `twinarm ui`'s."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = ui or (uri if uri.startswith(("http://", "https://")) else MLFLOW_UI)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail early with one clear message when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except Exception as exc:  # any failure to connect is the same message to the user
        raise TwinarmError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: {exc}. "
                           f"Start it, fix the URI, or unset it to use the local store.") from None


class Tracker:
    """Idempotent MLflow recording for one home. The constructor raises TwinarmError when a remote tracking server
    does not answer within 5 s."""

    def __init__(self, home: Home):
        from mlflow.tracking import MlflowClient

        self.home = home
        self.uri = tracking_uri(home)
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        # Create the SQLite schema now, in one process, before any parallel writer touches it.
        self.client.search_experiments(max_results=1)

    # ------------------------------------------------------------ runs

    def experiment(self, ablation: str) -> str:
        """The ablation's experiment id, created if missing (local store: artifacts under mlartifacts/<ablation>)."""
        name = experiment_name(ablation)
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = (self.home.mlflow_artifacts / ablation).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _find(self, experiment_id: str, filter_string: str) -> str | None:
        runs = self.client.search_runs([experiment_id], filter_string=filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def find_parent(self, ablation: str) -> str | None:
        """The ablation's parent run, if a flow has created it."""
        exp = self.client.get_experiment_by_name(experiment_name(ablation))
        if exp is None:
            return None
        return self._find(exp.experiment_id,
                          f"tags.`{PARENT_TAG}` = '{ablation}' and tags.`twinarm.kind` = 'ablation'")

    def parent_run(self, ablation: str, spec_hash: str, description: str = "") -> str:
        """The ablation's parent run id, created if missing (with `description` as its note); an existing one gets its
        `twinarm.spec_hash` tag set to `spec_hash`."""
        found = self.find_parent(ablation)
        if found:
            self.client.set_tag(found, "twinarm.spec_hash", spec_hash)
            return found
        run = self.client.create_run(self.experiment(ablation), run_name=ablation, tags={
            PARENT_TAG: ablation, "twinarm.kind": "ablation", "twinarm.spec_hash": spec_hash,
            "mlflow.note.content": description})
        return run.info.run_id

    def child_run(self, ablation: str, parent_id: str, lineage_run_id: str, name: str,
                  params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """The run id of a lineage run, found by its `twinarm.run_id` tag, else created as a child of `parent_id` with
        `params` and `tags`."""
        exp = self.experiment(ablation)
        found = self._find(exp, f"tags.`{RUN_TAG}` = '{lineage_run_id}'")
        if found:
            return found
        run = self.client.create_run(exp, run_name=name, tags={
            PARENT_TAG: ablation, RUN_TAG: lineage_run_id, "mlflow.parentRunId": parent_id, **(tags or {})})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params sorted by key, values as str cut to 6000 characters, in batches of 100 (MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate a run with `status` (FINISHED, FAILED, KILLED) unless it already has that status."""
        if self.client.get_run(run_id).info.status != status:
            self.client.set_terminated(run_id, status=status)

    # ------------------------------------------------------------ metrics and artifacts

    def log_metrics(self, run_id: str, rows: Iterable[tuple[str, float, int]]) -> int:
        """Log (key, value, step) rows whose (key, step) is not logged yet. Returns how many were new."""
        from mlflow.entities import Metric

        rows = list(rows)
        seen: dict[str, set[int]] = {}
        for key in {k for k, _, _ in rows}:
            seen[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        now = int(time.time() * 1000)
        new = []
        for key, value, step in rows:
            if step not in seen[key]:
                seen[key].add(step)
                new.append(Metric(key, float(value), now, int(step)))
        for i in range(0, len(new), 1000):
            self.client.log_batch(run_id, metrics=new[i:i + 1000], synchronous=True)
        return len(new)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file unless a file of that name is already there (artifacts are content-addressed upstream)."""
        path = Path(path)
        existing = {Path(f.path).name for f in self.client.list_artifacts(run_id, artifact_path)}
        if path.name not in existing:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_files(self, run_id: str, paths: Iterable[Path], artifact_path: str) -> None:
        """Upload files under one artifact folder, replacing same-named ones (a report rebuilt by a later flow run
        replaces the earlier one under report/ of the ablation's parent run)."""
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dataset(self, run_id: str, artifact: Artifact, name: str, context: str) -> None:
        """A dataset input (mlflow.data) named by its content hash; logged once per run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        run = self.client.get_run(run_id)
        if any(d.dataset.digest == artifact.artifact_id for d in run.inputs.dataset_inputs):
            return
        dataset = Dataset(name=name, digest=artifact.artifact_id, source_type="local", source=artifact.uri,
                          profile=f'{{"num_rows": {artifact.rows or 0}}}')
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_model(self, ablation: str, run_id: str, artifact: Artifact, name: str, step: int | None) -> str:
        """A checkpoint as an MLflow LoggedModel whose weights stay at their external path."""
        exp = self.experiment(ablation)
        found = self.client.search_logged_models(
            [exp], filter_string=f"tags.`twinarm.artifact_id` = '{artifact.artifact_id}' "
                                 f"and source_run_id = '{run_id}'", max_results=1)
        if found:
            return found[0].model_id
        model = self.client.create_logged_model(
            exp, name=name, source_run_id=run_id, model_type="checkpoint",
            tags={"twinarm.artifact_id": artifact.artifact_id, "twinarm.uri": artifact.uri,
                  "twinarm.step": str(step if step is not None else "")})
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    # ------------------------------------------------------------ counting (tests, fault injection)

    def counts(self) -> dict[str, int]:
        """Row counts in the local SQLite store (runs, params, metrics, inputs, logged models)."""
        if not self.uri.startswith("sqlite:///"):
            raise TwinarmError("row counts are only available for the local SQLite store")
        import sqlite3

        con = sqlite3.connect(self.uri.removeprefix("sqlite:///"))
        try:
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("runs", "params", "metrics", "inputs", "logged_models")}
        finally:
            con.close()
