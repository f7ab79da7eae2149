"""MLflow tracking: parent/child runs found again by tag; metrics, datasets and models logged once."""
from __future__ import annotations

import pytest

from infra.errors import TwinarmError
from infra.artifacts import Artifact
from infra.tracking import Tracker, check_reachable


def test_runs_metrics_datasets_models_are_idempotent(home):
    tracker = Tracker(home)
    parent = tracker.parent_run("abl", "spechash")
    assert tracker.parent_run("abl", "spechash") == parent
    child = tracker.child_run("abl", parent, "lineage-run-1", "control/rl", {"rl.lr": 1e-5, "rl.n": 8})
    assert tracker.child_run("abl", parent, "lineage-run-1", "control/rl", {"rl.lr": 1e-5, "rl.n": 8}) == child
    assert tracker.client.get_run(child).data.tags["mlflow.parentRunId"] == parent

    rows = [("accuracy/pure", 0.5, 0), ("accuracy/pure", 0.6, 10)]
    assert tracker.log_metrics(child, rows) == 2
    assert tracker.log_metrics(child, rows + [("accuracy/pure", 0.7, 20)]) == 1
    assert [m.step for m in tracker.client.get_metric_history(child, "accuracy/pure")] == [0, 10, 20]

    data = Artifact("d1", "dataset", "file:///x/d1.parquet", 10, 5)
    model = Artifact("m1", "checkpoint", "file:///x/ckpt", 100, None, {"step": 10})
    for _ in range(2):
        tracker.log_dataset(child, data, name="train", context="input")
        tracker.log_model("abl", child, model, name="control-rl", step=10)
    counts = tracker.counts()
    assert counts["runs"] == 2 and counts["inputs"] == 1 and counts["logged_models"] == 1
    assert counts["metrics"] == 3

    artifact_root = tracker.client.get_experiment(tracker.experiment("abl")).artifact_location
    assert artifact_root.startswith(home.mlflow_artifacts.as_uri())


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(TwinarmError) as exc:
        check_reachable("http://127.0.0.1:9", timeout_s=1)
    assert "unreachable" in str(exc.value) and "MLFLOW_TRACKING_URI" in str(exc.value)
