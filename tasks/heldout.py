"""Stage: the held-out evaluation — every arm's SFT start (step 0) and final RL checkpoint on the held-out
suites, in one job, one protocol, one seed (DESIGN §8). One row per problem × sample; the meta-strip regrade
is counted; stored per checkpoint by content so reruns and the nightly flow evaluate nothing twice."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from infra.artifacts import read_parquet, write_parquet
from infra.roles import CheckpointRole, SuiteRole
from infra.spec import ComputeSpec, ConfigSlice, GraderSpec
from tasks.common import Stage, StageCall, StageOutput, live_metrics, store


def heldout_body(call: StageCall) -> StageOutput:
    """Evaluate every checkpoint input on every suite input under the held-out protocol; output role `heldout`,
    one row per checkpoint × problem × sample; facts: protocol, samples per checkpoint, meta-strip regrade flips."""
    from evals.evaluate import checkpoint_entries, compute_identity, evaluate_checkpoints, heldout_protocol
    from evals.metrics import aggregate
    from rewards.grader import get_grader
    from worlds.model import resolve_device, resolve_precision, set_threads

    cfg = call.config
    compute = ComputeSpec(**cfg["executor.compute"])
    set_threads(compute.cpu_threads)
    device = resolve_device(compute)
    precision = resolve_precision(compute, device)
    grader = get_grader(GraderSpec(**cfg["grader"]))
    suites = {ref.name: role for role in sorted(call.inputs) if (ref := SuiteRole.parse(role))}
    ev = ConfigSlice(cfg, "eval")
    protocol = heldout_protocol(ev, grader, {name: call.inputs[role].artifact_id for name, role in suites.items()},
                                cfg["tool"], compute_identity(device, precision, compute.cpu_threads))
    todo = checkpoint_entries({r: (a.artifact_id, call.input_path(r)) for r, a in call.inputs.items()})
    rows, done, engine_facts = evaluate_checkpoints(
        todo, {name: read_parquet(call.input_path(role)) for name, role in suites.items()}, protocol,
        Path(call.home) / "results" / "heldout", grader, device, precision, processes=compute.shared_cpu_processes)
    write_parquet(rows, call.workdir / "heldout.parquet")
    ks = sorted({1, *protocol.n.values()})
    table = aggregate(rows, by=("suite",), ks=ks)
    flips = [r for r in rows if r["correct"] != r["stripped_correct"]]
    metrics = [(f"heldout/{g['arm']}/{g['suite']}/{key}", g[key], g["step"]) for g in table
               for key in ("avg_at_k", *(f"pass_at_{k}" for k in ks)) if g[key] is not None]
    live_metrics(call)(metrics)
    facts = {"protocol": protocol.__dict__, "protocol_key": protocol.key, "grader": protocol.grader,
             "samples": dict(Counter(f"{r['arm']}@{r['step']}" for r in rows)),
             "regrade_flips": len(flips),
             "regrade_flip_examples": [{k: r[k] for k in ("arm", "step", "suite", "problem_id", "sample")}
                                       for r in flips[:20]],
             "evaluated_now": len(done), "engine": engine_facts}
    final = {g["arm"]: round(g["avg_at_k"], 3) for g in aggregate(rows, by=(), ks=[1])
             if g["step"] == max(r["step"] for r in rows if r["arm"] == g["arm"])}
    return StageOutput(outputs={"heldout": store(call).put(call.workdir / "heldout.parquet", kind="table",
                                                           rows=len(rows))},
                       facts=facts, metrics=metrics, summary={**{f"{a}_acc": v for a, v in final.items()},
                                                              "flips": len(flips)})


# the held-out protocol: the eval.* keys that decide sampling (bootstrap_resamples and ece_bins are the report's)
PROTOCOL_KEYS = ("eval.temperature", "eval.top_p", "eval.n", "eval.n_per_suite", "eval.seed", "eval.max_new_tokens",
                 "eval.engine")

STAGE = Stage("heldout", heldout_body, config_keys=(*PROTOCOL_KEYS, "grader", "executor.compute", "tool"),
              inputs=(SuiteRole.PREFIX + "*", CheckpointRole.PREFIX + "*"), outputs=("heldout",), placed=True,
              result_view="heldout_rows")
