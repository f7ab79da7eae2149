"""Stage: GRPO of one arm from its SFT result (also its frozen scorer), with the local executor; checkpoints
every save_freq, rollouts per step, val per test_freq."""
from __future__ import annotations

from typing import Any

from prefect import task

from infra.artifacts import read_parquet
from infra.spec import ComputeSpec, GraderSpec, RLSpec
from tasks.common import StageCall, StageOutput, live_metrics, placed, stage_cache_key, store


def rl_body(call: StageCall) -> StageOutput:
    from rl.grpo import train_grpo
    from worlds.model import set_threads

    set_threads(ComputeSpec(**call.config["executor.compute"]).cpu_threads)
    cfg = call.config
    log = live_metrics(call)
    result = train_grpo(call.input_path("init"), read_parquet(call.input_path("prompts")),
                        read_parquet(call.input_path("val")), RLSpec(**cfg["rl"]), GraderSpec(**cfg["grader"]),
                        ComputeSpec(**cfg["executor.compute"]), cfg["seed"], call.workdir,
                        on_step=lambda step, values: log([(k, v, step) for k, v in values.items()]))
    st = store(call)
    outputs = {f"step-{step:07d}": st.describe(path / "model", kind="checkpoint", step=step)
               for step, path in result["checkpoints"]}
    outputs["final"] = outputs[f"step-{result['checkpoints'][-1][0]:07d}"]
    outputs["rollouts"] = st.describe(call.workdir / "rollouts", kind="table")
    outputs["val"] = st.describe(call.workdir / "val", kind="table")
    return StageOutput(outputs=outputs, facts=result["facts"], metrics=result["metrics"], summary=result["summary"])


@task(name="rl", cache_key_fn=stage_cache_key, persist_result=True)
def rl(call: StageCall, executor: dict[str, Any]) -> StageOutput:
    return placed(rl_body, call, executor)
