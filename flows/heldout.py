"""Nightly held-out evaluation: every RL checkpoint of every registered ablation that has no held-out result yet.

An ablation is registered once its ablation flow has recorded a held-out job; the nightly job reuses that job's
protocol and suites exactly (read back from lineage) and adds every saved RL checkpoint as an input. Results
are stored per checkpoint by content, so only new checkpoints are evaluated and a second run evaluates nothing.
An ablation whose own flow is running right now is skipped (its lock is held) and picked up next night.
"""
from __future__ import annotations

from infra.home import configure_environment

configure_environment()

import json  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, runtime  # noqa: E402

from infra.artifacts import Artifact, uri_path  # noqa: E402
from infra.errors import LockedError  # noqa: E402
from infra.lineage import Lineage  # noqa: E402
from infra.roles import CheckpointRole, StepRole, SuiteRole  # noqa: E402
from infra.progress import to_run_log  # noqa: E402
from infra.spec import load_spec  # noqa: E402
from tasks.common import SHARED, Session, run_task  # noqa: E402
from tasks.stages import STAGES  # noqa: E402

NIGHTLY = "nightly"


def line(ablation: str, result: dict[str, Any]) -> str:
    """`tiny: 6 checkpoints, 4 evaluated now` (the nightly run's log line and `twinarm heldout`'s output)."""
    return f"{ablation}: {result['checkpoints']} checkpoints, {result['evaluated_now']} evaluated now"


def registered(lineage: Lineage) -> list[str]:
    return [r["ablation"] for r in lineage.rows(
        "SELECT DISTINCT ablation FROM runs WHERE stage = 'heldout' AND status = 'completed' ORDER BY ablation")]


def _artifact(row: dict[str, Any]) -> Artifact:
    return Artifact(artifact_id=row["artifact_id"], kind=row["kind"], uri=row["uri"], bytes=row["bytes"],
                    rows=row["rows"], facets=json.loads(row["facets_json"] or "{}"))


def nightly_inputs(lineage: Lineage, ablation: str) -> tuple[dict[str, Any], dict[str, Artifact], str]:
    """(protocol config, inputs: the suites + every RL checkpoint, spec path) of an ablation, from lineage."""
    job = lineage.rows("SELECT run_id, config_json FROM runs WHERE ablation = ? AND stage = 'heldout' AND "
                       "arm = ? AND status = 'completed' ORDER BY ended_at DESC LIMIT 1", [ablation, SHARED])[0]
    cols = "a.artifact_id, a.kind, a.uri, a.bytes, a.rows, a.facets_json"
    suites = {r["role"]: _artifact(r) for r in lineage.rows(
        f"SELECT e.role, {cols} FROM edges e JOIN artifacts a USING (artifact_id) WHERE e.run_id = ? "
        f"AND e.direction = 'in' AND {SuiteRole.sql_like('e.role')}", [job["run_id"]])}
    checkpoints = {str(CheckpointRole(r["arm"], r["seed"], json.loads(r["facets_json"])["step"])): _artifact(r)
                   for r in lineage.rows(
                       f"SELECT DISTINCT o.arm, o.seed, {cols} FROM run_outputs o JOIN artifacts a USING (artifact_id) "
                       f"JOIN runs r USING (run_id) WHERE o.ablation = ? AND o.stage = 'rl' AND {StepRole.sql_like('o.role')} "
                       f"AND r.status = 'completed'", [ablation])
                   if uri_path(r["uri"]).exists()}
    spec = lineage.rows("SELECT a.uri FROM run_inputs i JOIN artifacts a USING (artifact_id) WHERE i.ablation = ? "
                        "AND i.stage = 'resolve' AND i.role = 'spec' LIMIT 1", [ablation])[0]["uri"]
    return json.loads(job["config_json"]), {**suites, **checkpoints}, str(uri_path(spec))


@flow(name="twinarm-nightly-heldout", log_prints=True)
def nightly_heldout(ablations: list[str] | None = None) -> dict[str, Any]:
    """Evaluate, for every registered ablation (or the ones named), each saved RL checkpoint without a held-out
    result, under the protocol of that ablation's held-out job."""
    home = configure_environment()
    lineage = Lineage(home.lineage_db)
    if not lineage.path.exists():
        return {"ablations": {}}
    summary: dict[str, Any] = {}
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    for name in ablations or registered(lineage):
        config, inputs, spec_file = nightly_inputs(lineage, name)
        try:
            with Session(load_spec(spec_file), spec_file, flow_run_id=flow_run_id) as s:
                heldout = STAGES["heldout"]
                call = s.begin(s.stage_call(heldout, SHARED, None, config, inputs))
                out = run_task(s, heldout.task, call,
                               executor=s.spec.base.executor.model_dump(mode="json"))
                cached = s.status[f"heldout/{SHARED}"] == "cached"
                summary[name] = {"checkpoints": sum(CheckpointRole.parse(r) is not None for r in inputs),
                                 "evaluated_now": 0 if cached else out.facts["evaluated_now"]}
                to_run_log(line(name, summary[name]))
        except LockedError as exc:
            print(f"skipping {name}: {exc}")
            summary[name] = {"skipped": str(exc)}
    return {"ablations": summary}
