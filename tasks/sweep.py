"""Stage: checkpoint sweep of one arm — every saved RL step on the val mix with pure correctness per domain,
step-indexed, sampled with the same settings as validation during RL (evals.evaluate.val_protocol). Per-checkpoint
results are stored by content, so only checkpoints without one are evaluated."""
from __future__ import annotations

from pathlib import Path

from infra.artifacts import read_parquet, write_parquet
from infra.roles import CheckpointRole
from infra.spec import ComputeSpec, ConfigSlice, GraderSpec
from tasks.common import Stage, StageCall, StageOutput, store


def sweep_body(call: StageCall) -> StageOutput:
    """Evaluate every checkpoint input on the val mix under the val protocol; output role `sweep` (one row per
    checkpoint × problem × sample) and step-indexed sweep/accuracy metrics."""
    from evals.evaluate import checkpoint_entries, compute_identity, evaluate_checkpoints, val_metrics, val_protocol
    from rewards.grader import get_grader
    from worlds.model import resolve_device, resolve_precision, set_threads

    cfg = call.config
    compute = ComputeSpec(**cfg["executor.compute"])
    set_threads(compute.cpu_threads)
    device = resolve_device(compute)
    precision = resolve_precision(compute, device)
    grader = get_grader(GraderSpec(**cfg["grader"]))
    rl = ConfigSlice(cfg, "rl")
    protocol = val_protocol(rl, cfg["eval.seed"], grader, call.inputs["val"].artifact_id, cfg["eval.engine"],
                            cfg["tool"], compute_identity(device, precision, compute.cpu_threads))
    todo = checkpoint_entries({r: (a.artifact_id, call.input_path(r)) for r, a in call.inputs.items()})
    rows, done, engine_facts = evaluate_checkpoints(todo, {"val": read_parquet(call.input_path("val"))}, protocol,
                                                    Path(call.home) / "results" / "sweep", grader, device,
                                                    precision)
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
                              "checkpoints": len(todo), "evaluated_now": len(done), "grader": protocol.grader,
                              "engine": engine_facts},
                       metrics=metrics, summary={"checkpoints": len(todo), "final_acc": round(final_acc, 3)})


STAGE = Stage("sweep", sweep_body,
              config_keys=("rl.val_temperature", "rl.top_p", "rl.val_n", "rl.max_response_length", "grader",
                           "eval.seed", "eval.engine", "executor.compute", "tool"),
              inputs=("val", CheckpointRole.PREFIX + "*"), outputs=("sweep",), per_arm=True, placed=True,
              result_view="sweep_rows")
