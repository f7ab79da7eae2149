"""One ablation flow run as lineage recorded it: its stage runs with their inputs, outputs and facts.

The report and the belief replay read everything from here, so both describe the same runs. A run row carries
the flow run that recorded it last: a cached rerun re-records every stage it reuses under its own flow run id,
so the latest flow's runs are exactly the rows that carry its id. Which flow is latest is read from the resolve
runs (every ablation flow records them first); the nightly held-out flow records no resolve run and is not an
ablation flow.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.artifacts import uri_path
from infra.errors import UsageError
from infra.artifacts import Artifact
from infra.lineage import Lineage


@dataclass(frozen=True)
class StageRun:
    run_id: str
    arm: str
    stage: str
    seed: int | None
    status: str
    config: dict[str, Any]
    config_hash: str
    code_version: str
    mlflow_run_id: str | None
    inputs: dict[str, Artifact] = field(default_factory=dict)
    outputs: dict[str, Artifact] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def input_path(self, role: str) -> Path:
        return uri_path(self.inputs[role].uri)

    def output_path(self, role: str) -> Path:
        return uri_path(self.outputs[role].uri)


@dataclass(frozen=True)
class FlowRun:
    ablation: str
    flow_run_id: str | None
    runs: list[StageRun]
    flows: int  # ablation flow runs lineage knows for this ablation (the latest is this one)

    def stage(self, stage: str, arm: str | None = None) -> list[StageRun]:
        """Completed runs of a stage (of one arm), ordered by arm and seed."""
        found = [r for r in self.runs if r.stage == stage and r.status == "completed" and arm in (None, r.arm)]
        return sorted(found, key=lambda r: (r.arm, r.seed if r.seed is not None else -1))

    @property
    def arms(self) -> list[str]:
        """The arms this flow resolved, in the order it resolved them."""
        return [r.arm for r in self.runs if r.stage == "resolve"]

    @property
    def spec_path(self) -> Path:
        return self.stage("resolve")[0].input_path("spec")


def ablations(lineage: Lineage) -> list[str]:
    return [r["ablation"] for r in lineage.rows(
        "SELECT DISTINCT ablation FROM runs WHERE stage = 'resolve' ORDER BY ablation")]


def latest_flow(lineage: Lineage, ablation: str) -> FlowRun:
    """The runs of the ablation's most recent flow run.

    Lineage keeps a run's first start time, so when several flow runs resolved this ablation (its spec changed
    between them) the latest is the one whose runs were started last: exact unless a later flow computed nothing
    new, which only happens when it repeats an earlier spec exactly."""
    flows = lineage.rows(
        "SELECT r.flow_run_id, max(greatest(r.started_at, coalesce(r.ended_at, r.started_at))) AS last "
        "FROM runs r JOIN (SELECT DISTINCT flow_run_id FROM runs WHERE ablation = ? AND stage = 'resolve') f "
        "ON r.flow_run_id IS NOT DISTINCT FROM f.flow_run_id WHERE r.ablation = ? "
        "GROUP BY r.flow_run_id ORDER BY last DESC", [ablation, ablation])
    if not flows:
        known = ablations(lineage)
        raise UsageError(f"ablation '{ablation}' has no run in {lineage.path}; "
                         f"known: {', '.join(known) or 'none (run an ablation first)'}")
    flow_id = flows[0]["flow_run_id"]
    rows = lineage.rows("SELECT * FROM runs WHERE ablation = ? AND flow_run_id IS NOT DISTINCT FROM ? "
                        "ORDER BY started_at", [ablation, flow_id])
    ids = [r["run_id"] for r in rows]
    edges = lineage.rows("SELECT e.run_id, e.direction, e.role, a.* FROM edges e JOIN artifacts a USING (artifact_id) "
                         "WHERE e.run_id IN (SELECT unnest(?))", [ids])
    facts = lineage.rows("SELECT run_id, name, value_json FROM facts WHERE run_id IN (SELECT unnest(?))", [ids])
    runs = []
    for r in rows:
        arts = {"in": {}, "out": {}}
        for e in edges:
            if e["run_id"] == r["run_id"]:
                arts[e["direction"]][e["role"]] = Artifact(
                    artifact_id=e["artifact_id"], kind=e["kind"], uri=e["uri"], bytes=e["bytes"], rows=e["rows"],
                    facets=json.loads(e["facets_json"] or "{}"))
        runs.append(StageRun(
            run_id=r["run_id"], arm=r["arm"], stage=r["stage"], seed=r["seed"], status=r["status"],
            config=json.loads(r["config_json"]), config_hash=r["config_hash"], code_version=r["code_version"],
            mlflow_run_id=r["mlflow_run_id"], inputs=arts["in"], outputs=arts["out"],
            facts={f["name"]: json.loads(f["value_json"]) for f in facts if f["run_id"] == r["run_id"]}))
    return FlowRun(ablation=ablation, flow_run_id=flow_id, runs=runs, flows=len(flows))
