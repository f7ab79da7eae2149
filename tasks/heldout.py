"""Stage: the held-out evaluation — every arm's SFT start (step 0) and final RL checkpoint on the held-out
suites, in one job, one protocol, one seed (DESIGN §8). One row per problem × sample; the meta-strip regrade
is counted; stored per checkpoint by content so reruns and the nightly flow evaluate nothing twice."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task

from infra.artifacts import read_parquet, write_parquet
from infra.spec import ComputeSpec, EvalSpec, GraderSpec
from tasks.common import StageCall, StageOutput, live_metrics, placed, stage_cache_key, store
from tasks.data import SUITE
from tasks.sweep import entries, grader_identity


def protocol_for(call: StageCall, grader: Any) -> Any:
    from evals.engines import engine_identity
    from evals.evaluate import Protocol

    ev = EvalSpec(**call.config["eval"])
    suites = {role[len(SUITE):]: art.artifact_id for role, art in sorted(call.inputs.items())
              if role.startswith(SUITE)}
    return Protocol(temperature=ev.temperature, top_p=ev.top_p, n={s: ev.n_per_suite.get(s, ev.n) for s in suites},
                    seed=ev.seed, max_new_tokens=ev.max_new_tokens, grader=grader_identity(grader), suites=suites,
                    engine=engine_identity(ev.engine))


def evaluate_heldout(call: StageCall) -> tuple[list[dict[str, Any]], Any, list[Any], dict[str, Any]]:
    """(rows of every checkpoint input, protocol, entries evaluated now, the engine's runtime facts)."""
    from evals.evaluate import ResultStore
    from rewards.grader import get_grader
    from worlds.model import resolve_device, resolve_precision

    compute = ComputeSpec(**call.config["executor.compute"])
    device = resolve_device(compute)
    grader = get_grader(GraderSpec(**call.config["grader"]))
    protocol = protocol_for(call, grader)
    suites = {name: read_parquet(call.input_path(SUITE + name)) for name in protocol.suites}
    results = ResultStore(Path(call.home) / "results" / "heldout", protocol)
    todo = entries(call)
    done = results.evaluate(todo, suites, grader, device, resolve_precision(compute, device))
    return results.rows(todo), protocol, done, results.engine_facts


def heldout_body(call: StageCall) -> StageOutput:
    from evals.metrics import aggregate
    from worlds.model import set_threads

    set_threads(ComputeSpec(**call.config["executor.compute"]).cpu_threads)
    rows, protocol, done, engine_facts = evaluate_heldout(call)
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


@task(name="heldout", cache_key_fn=stage_cache_key, persist_result=True)
def heldout(call: StageCall, executor: dict[str, Any]) -> StageOutput:
    return placed(heldout_body, call, executor)
