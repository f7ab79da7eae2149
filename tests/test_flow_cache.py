"""The ablation flow: a second run of the same spec is served from cache and adds no lineage or MLflow rows."""
from __future__ import annotations

from pathlib import Path

import yaml

from infra.lineage import Lineage
from infra.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent


def tiny_spec(tmp_path: Path, name: str) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_second_run_is_cached_and_adds_no_rows(flow_home, tmp_path):
    from flows.ablation import ablation

    spec = tiny_spec(tmp_path, "cache-twice")
    first = ablation(spec_file=str(spec))
    assert first["stages"] and all(status == "computed" for status in first["stages"].values())
    lineage, tracker = Lineage(flow_home.lineage_db), Tracker(flow_home)
    rows_lineage, rows_mlflow = lineage.counts(), tracker.counts()

    second = ablation(spec_file=str(spec))
    assert second["stages"].keys() == first["stages"].keys()
    assert all(status == "cached" for status in second["stages"].values()), second["stages"]
    assert lineage.counts() == rows_lineage
    assert tracker.counts() == rows_mlflow
    completed = lineage.rows("SELECT DISTINCT status FROM runs WHERE ablation = 'cache-twice'")
    assert completed == [{"status": "completed"}]
