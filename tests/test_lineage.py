"""Lineage: idempotent transactional writes, the named views, and a clear message when the file is locked."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from infra.errors import LockedError
from infra.artifacts import Artifact
from infra.lineage import Lineage, Run, StageRecord


def art(name: str, kind: str = "dataset") -> Artifact:
    return Artifact(artifact_id=f"id-{name}", kind=kind, uri=f"file:///x/{name}", bytes=10, rows=3)


def run(run_id: str, stage: str, arm: str = "a", config: dict | None = None) -> Run:
    return Run(run_id=run_id, ablation="abl", arm=arm, stage=stage, seed=0, config=config or {"k": 1},
               config_hash="h", code_version="v")


@pytest.fixture
def lineage(tmp_path):
    lin = Lineage(tmp_path / "lineage.duckdb", wait_s=1.0)
    lin.init()
    return lin


def chain(lineage: Lineage) -> None:
    """data -> sft -> rl: the checkpoint's ancestry is sft checkpoint, twin dataset, spec."""
    lineage.record(StageRecord(run("r-data", "twins"), inputs=[(art("spec", "spec"), "spec")],
                               outputs=[(art("twin"), "nometa")], facts={"rows": 12}))
    lineage.record(StageRecord(run("r-sft", "sft"), inputs=[(art("twin"), "train")],
                               outputs=[(art("sftckpt", "checkpoint"), "model")]))
    lineage.record(StageRecord(run("r-rl", "rl"), inputs=[(art("sftckpt", "checkpoint"), "init")],
                               outputs=[(art("rl50", "checkpoint"), "step50")]))


def test_recording_twice_adds_no_rows(lineage):
    chain(lineage)
    before = lineage.counts()
    chain(lineage)
    assert lineage.counts() == before == {"runs": 3, "artifacts": 4, "edges": 6, "facts": 1}


def test_status_and_facts_are_upserted(lineage):
    lineage.record(StageRecord(run("r1", "rl"), facts={"scorer_calls": 5}))
    r = run("r1", "rl")
    r.status = "completed"
    lineage.record(StageRecord(r, facts={"scorer_calls": 9}))
    rows = lineage.rows("SELECT status FROM runs")
    assert rows == [{"status": "completed"}]
    assert lineage.facts_of("r1") == {"scorer_calls": 9}


def test_ancestry_view_walks_every_hop(lineage):
    chain(lineage)
    rows = lineage.rows("SELECT ancestor_id, depth FROM artifact_ancestry WHERE artifact_id = 'id-rl50' "
                        "ORDER BY depth")
    assert [(r["ancestor_id"], r["depth"]) for r in rows] == [("id-sftckpt", 1), ("id-twin", 2), ("id-spec", 3)]
    inputs = lineage.rows("SELECT role, artifact_id FROM run_inputs WHERE stage = 'rl'")
    assert inputs == [{"role": "init", "artifact_id": "id-sftckpt"}]


def test_arm_config_diff_lists_exactly_the_differing_keys(lineage):
    base = {"rl": {"lr": 1e-5, "reward": "vanilla", "steps": 10}, "sft": {"strip_meta": True}, "seeds": [0]}
    other = {"rl": {"lr": 1e-5, "reward": "pmishift", "steps": 10}, "sft": {"strip_meta": False}, "seeds": [0]}
    lineage.record(StageRecord(run("c", "resolve", arm="control", config=base)))
    lineage.record(StageRecord(run("p", "resolve", arm="pmishift", config=other)))
    rows = lineage.rows("SELECT key, value_a, value_b FROM arm_config_diff ORDER BY key")
    assert [(r["key"], r["value_a"], r["value_b"]) for r in rows] == [
        ("rl.reward", '"vanilla"', '"pmishift"'), ("sft.strip_meta", "true", "false")]


def test_failed_record_rolls_back(lineage, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Lineage, "_edge", staticmethod(boom))
    with pytest.raises(RuntimeError):
        lineage.record(StageRecord(run("r1", "sft"), outputs=[(art("x"), "out")]))
    assert lineage.counts() == {"runs": 0, "artifacts": 0, "edges": 0, "facts": 0}


def test_reader_gets_a_clear_message_while_another_process_holds_the_file(lineage):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); time.sleep(30)"),
        str(lineage.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        start = time.monotonic()
        with pytest.raises(LockedError) as exc:
            lineage.query("SELECT 1")
        assert time.monotonic() - start >= 0.9  # it waited before giving up
        assert f"process {holder.pid}" in str(exc.value) and "try again" in str(exc.value)
    finally:
        holder.kill()
        holder.wait()
    assert lineage.query("SELECT 1")[1] == [(1,)]  # and reads once the writer is gone
