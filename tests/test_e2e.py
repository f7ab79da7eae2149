"""End to end on the demo spec shrunk to CI size: every stage runs for real (arith world, tiny Qwen2, SFT,
GRPO with the PMI-shift and vanilla arms), a rerun is served from cache, and a SIGKILL mid-RL resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from infra.lineage import Lineage
from infra.tracking import Tracker

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
STAGES = {"resolve", "data", "base_model", "twins", "sft", "rl", "sweep", "heldout"}


def test_every_stage_ran_and_lineage_connects_twins_to_rl_checkpoints(tiny_run, flow_home):
    assert {label.split("/")[0] for label in tiny_run["stages"]} == STAGES
    lineage = Lineage(flow_home.lineage_db)
    # what fed the control arm's final RL checkpoint: its SFT checkpoint, the no-meta twin, the base model
    final = lineage.rows("SELECT artifact_id FROM run_outputs WHERE ablation = 'tiny' AND stage = 'rl' "
                         "AND arm = 'control' AND role = 'final'")
    assert len(final) == 1
    ancestors = lineage.rows("SELECT a.kind, a.facets_json FROM artifact_ancestry x JOIN artifacts a "
                             "ON a.artifact_id = x.ancestor_id WHERE x.artifact_id = ?", [final[0]["artifact_id"]])
    sides = {r["facets_json"] for r in ancestors if r["kind"] == "dataset"}
    assert any('"side": "nometa"' in f for f in sides) and not any('"side": "meta"' in f for f in sides)
    facts = {(r["arm"], r["name"]): r["value_json"] for r in lineage.rows(
        "SELECT arm, name, value_json FROM run_facts WHERE ablation = 'tiny' AND stage IN ('rl', 'sft')")}
    assert facts["control", "scorer_calls"] == "0"  # vanilla never touches the scorer
    assert facts["control", "adv_norm_std_applied"] == facts["pmishift", "adv_norm_std_applied"]
    assert facts["control", "example_order"] == facts["pmishift", "example_order"]  # same SFT order in both arms
    # the held-out rows are queryable in SQL, one row per problem x sample, as many as the job recorded
    samples = json.loads(lineage.rows("SELECT value_json FROM run_facts WHERE ablation = 'tiny' AND stage = 'heldout' "
                                      "AND name = 'samples'")[0]["value_json"])
    in_view = lineage.rows("SELECT arm || '@' || step AS k, count(*) AS n FROM heldout_rows WHERE ablation = 'tiny' "
                           "GROUP BY ALL")
    assert {r["k"]: r["n"] for r in in_view} == samples and len(samples) == 4  # 2 arms x (SFT start, final)
    tracker = Tracker(flow_home)
    runs = tracker.client.search_runs([tracker.experiment("tiny")], "tags.`twinarm.stage` = 'rl'")
    assert len(runs) == 2
    for run in runs:
        history = tracker.client.get_metric_history(run.info.run_id, "val/accuracy/pure")
        assert [m.step for m in history] == [0, 2, 4, 6]
        # every RL step of both arms moved the weights (so the SIGKILL-resume test compares states that differ)
        moved = sorted(tracker.client.get_metric_history(run.info.run_id, "actor/param_norm_change"),
                       key=lambda m: m.step)
        assert [m.step for m in moved] == [1, 2, 3, 4, 5, 6]
        assert all(m.value != 0 for m in moved), [(m.step, m.value) for m in moved]
        # and through the policy gradient, not only the entropy bonus: some group held right and wrong samples
        # (the CI world's `levels: [1]`), so some samples had a non-zero GRPO advantage
        history = {key: sorted((m.step, m.value) for m in tracker.client.get_metric_history(run.info.run_id, key))
                   for key in ("train/accuracy/pure", "train/adv_nonzero_rate")}
        assert any(0 < acc < 1 for _, acc in history["train/accuracy/pure"]), history
        assert any(rate > 0 for _, rate in history["train/adv_nonzero_rate"]), history
    # each arm's RL checkpoints differ step to step (an id hashes the model directory: equal weights, equal id)
    saved = lineage.rows("SELECT arm, role, artifact_id FROM run_outputs WHERE ablation = 'tiny' AND stage = 'rl' "
                         "AND role LIKE 'step-%' ORDER BY arm, role")
    for arm in ("control", "pmishift"):
        ids = [r["artifact_id"] for r in saved if r["arm"] == arm]
        assert len(ids) == 3 and len(set(ids)) == 3, saved  # steps 2, 4, 6


def test_second_run_is_cached_and_adds_no_rows(tiny_run, flow_home, tiny_spec):
    from flows.ablation import ablation

    lineage, tracker = Lineage(flow_home.lineage_db), Tracker(flow_home)
    before = lineage.counts(), tracker.counts()
    again = ablation(spec_file=str(tiny_spec))
    assert again["stages"].keys() == tiny_run["stages"].keys()
    assert set(again["stages"].values()) == {"cached"}, again["stages"]
    assert (lineage.counts(), tracker.counts()) == before


def _checkpoints(home: Path) -> dict[str, list[str]]:
    """The complete RL checkpoints under a home, by arm run directory."""
    found: dict[str, list[str]] = {}
    for path in sorted(home.glob("runs/rl/*/checkpoints/step-*")):
        found.setdefault(path.parent.parent.name, []).append(path.name)
    return found


def _twinarm(home: Path, spec: Path) -> subprocess.Popen:
    env = {**os.environ, "TWINARM_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_sigkill_mid_rl_resumes_to_the_uninterrupted_result(tiny_run, flow_home, tiny_spec, tmp_path):
    """Each arm's RL is SIGKILLed once, as soon as its first checkpoint is complete (the arms run one at a time
    inline), so both arms resume from a checkpoint; the rerun must end exactly where the uninterrupted run did."""
    home = tmp_path / "home"
    killed_at: dict[str, list[str]] = {}
    while len(killed_at) < 2:
        proc = _twinarm(home, tiny_spec)
        deadline = time.monotonic() + 600
        while not (new := _checkpoints(home).keys() - killed_at.keys()) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"finished before each arm had an RL checkpoint:\n{proc.stdout.read()}"
        os.killpg(proc.pid, signal.SIGKILL)  # mid-RL: at least one checkpoint is complete, the run is not
        proc.wait()
        assert new, f"no new RL checkpoint within 600 s (killed so far: {killed_at})"
        killed_at |= {arm: steps for arm, steps in _checkpoints(home).items() if arm in new}
    final = f"step-{yaml.safe_load(tiny_spec.read_text())['base']['rl']['steps']:07d}"
    assert all(final not in names for names in killed_at.values()), killed_at  # neither arm had finished

    rerun = _twinarm(home, tiny_spec)
    out, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out
    lineage = Lineage(home / "lineage.duckdb")
    resumed = lineage.rows("SELECT arm, role, artifact_id FROM run_outputs WHERE ablation = 'tiny' "
                           "AND stage = 'rl' ORDER BY arm, role")
    reference = Lineage(flow_home.lineage_db).rows(
        "SELECT arm, role, artifact_id FROM run_outputs WHERE ablation = 'tiny' AND stage = 'rl' ORDER BY arm, role")
    # tolerance: none — the resumed checkpoints, rollouts and val tables are byte-identical to the uninterrupted run
    assert resumed == reference, f"killed with checkpoints {killed_at}"
    # and the rerun added no duplicate rows: one run row per stage call, one metric per (run, key, step)
    assert lineage.rows("SELECT count(*) AS n FROM runs WHERE ablation = 'tiny'") == \
        Lineage(flow_home.lineage_db).rows("SELECT count(*) AS n FROM runs WHERE ablation = 'tiny'")
    import sqlite3

    con = sqlite3.connect(home / "mlflow.db")
    dupes = con.execute("SELECT count(*) FROM (SELECT run_uuid, key, step FROM metrics "
                        "GROUP BY run_uuid, key, step HAVING count(*) > 1)").fetchone()[0]
    runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    assert dupes == 0
    assert runs == 1 + lineage.rows("SELECT count(*) AS n FROM runs WHERE ablation = 'tiny'")[0]["n"]


def test_nightly_evaluates_each_new_checkpoint_once(tiny_run, flow_home, tmp_path):
    """On a copy of the ablation's home (so other tests keep their lineage): the first nightly run evaluates the
    RL checkpoints the ablation's own held-out job did not; the second evaluates nothing and records nothing."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(flow_home.root, home, ignore=shutil.ignore_patterns("*.lock", "locks"))
    env = {**os.environ, "TWINARM_HOME": str(home)}

    def nightly() -> str:
        res = subprocess.run([sys.executable, "-m", "flows.cli", "heldout", "tiny"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.strip().splitlines()[-1]

    lineage = Lineage(flow_home.lineage_db)
    saved = len(lineage.rows("SELECT DISTINCT artifact_id FROM run_outputs WHERE ablation = 'tiny' AND stage = 'rl' "
                             "AND role LIKE 'step-%'"))
    already = len(lineage.rows("SELECT DISTINCT arm FROM run_outputs WHERE ablation = 'tiny' AND stage = 'rl' "
                               "AND role = 'final'"))
    assert nightly() == f"tiny: {saved} checkpoints, {saved - already} evaluated now"  # finals were done
    results = sorted(p.name for p in (home / "results" / "heldout").rglob("*") if p.is_file())
    counts = Lineage(home / "lineage.duckdb").counts()
    assert nightly() == f"tiny: {saved} checkpoints, 0 evaluated now"
    assert sorted(p.name for p in (home / "results" / "heldout").rglob("*") if p.is_file()) == results
    assert Lineage(home / "lineage.duckdb").counts() == counts
