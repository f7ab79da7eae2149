"""Stage: checkpoint sweep of one arm — every saved RL step on the val mix with pure correctness per domain,
step-indexed. Per-checkpoint results are stored by content, so only checkpoints without one are evaluated."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from infra.artifacts import read_parquet, write_parquet
from infra.spec import ComputeSpec, GraderSpec
from tasks.common import StageCall, StageOutput, placed, stage_cache_key, store

CHECKPOINT = "checkpoint:"


def checkpoint_role(arm: str, seed: int, step: int) -> str:
    return f"{CHECKPOINT}{arm}:{seed}:{step}"


def entries(call: StageCall) -> list[Any]:
    """The checkpoints among a call's inputs, as evaluation entries (arm, seed, step, content id, model dir)."""
    from evals.evaluate import Entry

    out = []
    for role, art in sorted(call.inputs.items()):
        if role.startswith(CHECKPOINT):
            arm, seed, step = role[len(CHECKPOINT):].rsplit(":", 2)
            out.append(Entry(arm=arm, seed=int(seed), step=int(step), checkpoint_id=art.artifact_id,
                             model_dir=call.input_path(role)))
    return sorted(out, key=lambda e: (e.arm, e.seed, e.step))


def grader_identity(grader: Any) -> dict[str, Any]:
    """What makes two gradings the same grading: version, config, call path (not the counters)."""
    facts = grader.facts()
    return {k: facts[k] for k in ("grader_version", "config", "call_path")}


def sweep_body(call: StageCall) -> StageOutput:
    from evals.engines import engine_identity
    from evals.evaluate import Protocol, ResultStore
    from rewards.grader import get_grader
    from rl.grpo import val_metrics
    from worlds.model import resolve_device, resolve_precision, set_threads

    set_threads(ComputeSpec(**call.config["executor.compute"]).cpu_threads)
    cfg = call.config
    compute = ComputeSpec(**cfg["executor.compute"])
    device = resolve_device(compute)
    grader = get_grader(GraderSpec(**cfg["grader"]))
    protocol = Protocol(temperature=cfg["rl.val_temperature"], top_p=1.0, n={"val": cfg["rl.val_n"]},
                        seed=cfg["eval.seed"], max_new_tokens=cfg["rl.max_response_length"],
                        grader=grader_identity(grader), suites={"val": call.inputs["val"].artifact_id},
                        engine=engine_identity(cfg["eval.engine"]))
    results = ResultStore(Path(call.home) / "results" / "sweep", protocol)
    todo = entries(call)
    done = results.evaluate(todo, {"val": read_parquet(call.input_path("val"))}, grader, device,
                            resolve_precision(compute, device))
    rows = results.rows(todo)
    write_parquet(rows, call.workdir / "sweep.parquet")
    metrics = []
    for e in todo:
        values = val_metrics([r for r in rows if r["step"] == e.step], prefix="sweep")
        metrics += [(k, v, e.step) for k, v in sorted(values.items())]
    final = max(todo, key=lambda e: e.step)
    final_acc = next(v for k, v, s in metrics if k == "sweep/accuracy/pure" and s == final.step)
    return StageOutput(outputs={"sweep": store(call).put(call.workdir / "sweep.parquet", kind="table",
                                                         rows=len(rows))},
                       facts={"protocol": protocol.__dict__, "protocol_key": protocol.key,
                              "checkpoints": len(todo), "evaluated_now": len(done), "grader": grader_identity(grader),
                              "engine": results.engine_facts},
                       metrics=metrics, summary={"checkpoints": len(todo), "final_acc": round(final_acc, 3)})


@task(name="sweep", cache_key_fn=stage_cache_key, persist_result=True)
def sweep(call: StageCall, executor: dict[str, Any]) -> StageOutput:
    return placed(sweep_body, call, executor)
