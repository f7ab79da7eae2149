"""Fault injection: SIGKILL the ablation at a random point of each stage, repeatedly, then let it finish; every
rerun must complete, the final artifacts must hash equal to an uninterrupted run's, and no row may be duplicated.

    .venv/bin/python scripts/fault_inject.py [--spec SPEC] [--kills 2] [--seed 0] [--work /tmp/twinarm-faults]

Default spec: the CI-sized demo (tests/conftest.py: tiny_spec_dict), arms inline. A kill takes the whole process
tree (flow process, grader workers, Ray workers if the spec uses Ray). A stage counts as running while one of its
working directories has no completion marker and its lock names a live process of this run; the kill lands at a
uniform random time within the duration that stage took in the reference run. Each rerun is killed in the first
stage still owed a kill, so the stages are interrupted in pipeline order. Exit code 1 on any difference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
from collections import Counter
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STAGES = ("data", "base_model", "twins", "sft", "rl", "sweep", "heldout")


def _start(spec: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "TWINARM_HOME": str(home)}  # derived settings follow it (infra.home)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.communicate()


def _tree(proc: subprocess.Popen) -> set[int]:
    import psutil

    try:
        root = psutil.Process(proc.pid)
        return {root.pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _running(home: Path, stage: str, pids: set[int]) -> bool:
    """A stage runs when one of its working dirs has no completion marker and its lock names a live process of
    this run (a killed run leaves unfinished dirs and locks naming dead pids behind)."""
    for workdir in (home / "runs" / stage).glob("*"):
        lock = workdir / ".lock"
        if (workdir / "stage-output.json").exists() or not lock.is_file():
            continue
        try:
            if json.loads(lock.read_text() or "{}").get("pid") in pids:
                return True
        except (OSError, json.JSONDecodeError):
            pass
    return False


def _running_stage(home: Path, proc: subprocess.Popen, stages: tuple[str, ...]) -> str | None:
    pids = _tree(proc)
    return next((stage for stage in stages if _running(home, stage, pids)), None)


def _finish(spec: Path, home: Path) -> float:
    t0 = time.perf_counter()
    proc = _start(spec, home)
    out, _ = proc.communicate(timeout=3600)
    if proc.returncode:
        sys.exit(f"a rerun failed (exit {proc.returncode}) — resume is broken:\n{out[-4000:]}")
    return time.perf_counter() - t0


def _state(home: Path, ablation: str) -> dict:
    from infra.lineage import Lineage

    lineage = Lineage(home / "lineage.duckdb")
    outputs = lineage.output_ids(ablation)
    durations = {r["stage"]: r["s"] for r in lineage.rows(
        "SELECT stage, max(epoch(ended_at) - epoch(started_at)) AS s FROM runs WHERE ablation = ? GROUP BY stage",
        [ablation])}
    con = sqlite3.connect(home / "mlflow.db")
    dup_metrics = con.execute("SELECT count(*) FROM (SELECT run_uuid, key, step FROM metrics "
                              "GROUP BY run_uuid, key, step HAVING count(*) > 1)").fetchone()[0]
    mlflow_runs = con.execute("SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'").fetchone()[0]
    con.close()
    return {"outputs": outputs, "durations": durations, "counts": lineage.counts(),
            "mlflow_runs": mlflow_runs, "mlflow_duplicate_metrics": dup_metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=None)
    ap.add_argument("--kills", type=int, default=2, help="kills per stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "twinarm-faults")
    args = ap.parse_args()
    import yaml

    work = args.work.resolve()
    if work.exists():
        sys.exit(f"{work} exists: use an empty --work directory")
    work.mkdir(parents=True)
    spec = args.spec
    if spec is None:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import tiny_spec_dict

        spec = work / "spec.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec_dict("faults"), sort_keys=False))
    ablation = yaml.safe_load(spec.read_text())["name"]
    rng = random.Random(args.seed)

    reference_s = _finish(spec, work / "reference")
    reference = _state(work / "reference", ablation)
    print(f"reference run: {reference_s:.0f}s, {len(reference['outputs'])} outputs", flush=True)

    home = work / "faulted"
    kills: list[dict] = []
    due = Counter({stage: args.kills for stage in STAGES})  # kills still owed to each stage
    while sum(due.values()):
        proc = _start(spec, home)
        targets = tuple(s for s in STAGES if due[s])
        stage = None
        while proc.poll() is None and stage is None:  # the first stage still owed a kill that runs now
            stage = _running_stage(home, proc, targets)
            time.sleep(0.05)
        if stage is None:  # the run finished: the stages still owed kills were too short to catch
            out, _ = proc.communicate()
            if proc.returncode:
                sys.exit(f"a rerun failed (exit {proc.returncode}) — resume is broken:\n{out[-4000:]}")
            kills += [{"stage": s, "at_s": None, "note": "finished before it could be caught"} for s in targets]
            break
        at = rng.uniform(0, max(0.2, reference["durations"].get(stage, 1.0)))
        time.sleep(at)
        still = _running(home, stage, _tree(proc))
        _kill_tree(proc)
        due[stage] -= 1
        kills.append({"stage": stage, "at_s": round(at, 2), "stage_still_running": still})
        print(f"killed during {stage} after {at:.2f}s{'' if still else ' (it had just finished)'}", flush=True)
    final_s = _finish(spec, home)
    faulted = _state(home, ablation)
    again_s = _finish(spec, home)
    after = _state(home, ablation)

    differ = sorted(k for k in reference["outputs"].keys() | faulted["outputs"].keys()
                    if reference["outputs"].get(k) != faulted["outputs"].get(k))
    summary = {
        "kills": kills, "reference_s": round(reference_s, 1), "final_rerun_s": round(final_s, 1),
        "cached_rerun_s": round(again_s, 1), "outputs_compared": len(reference["outputs"]),
        "outputs_differing": differ,
        "lineage_counts_equal": faulted["counts"] == reference["counts"],
        "lineage_counts": {"reference": reference["counts"], "faulted": faulted["counts"]},
        "mlflow_runs": {"reference": reference["mlflow_runs"], "faulted": faulted["mlflow_runs"]},
        "mlflow_duplicate_metrics": faulted["mlflow_duplicate_metrics"],
        "cached_rerun_added_rows": after["counts"] != faulted["counts"] or after["mlflow_runs"] != faulted["mlflow_runs"],
    }
    ok = (not differ and summary["lineage_counts_equal"] and faulted["mlflow_duplicate_metrics"] == 0
          and faulted["mlflow_runs"] == reference["mlflow_runs"] and not summary["cached_rerun_added_rows"])
    summary["ok"] = ok
    print(json.dumps(summary, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
