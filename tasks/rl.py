"""Stage: GRPO of one arm from its SFT result (also its frozen scorer), with the local executor; checkpoints
every save_freq, rollouts per step, val per test_freq."""
from __future__ import annotations

from infra.artifacts import read_parquet
from infra.roles import StepRole
from infra.spec import ComputeSpec, GraderSpec, RLSpec
from tasks.common import Stage, StageCall, StageOutput, live_metrics, store


def rl_body(call: StageCall) -> StageOutput:
    """GRPO from `init` on `prompts` with val on `val` (rl.grpo.train_grpo); outputs a checkpoint per saved step
    (`step-NNNNNNN`), `final`, the per-step `rollouts` and `val` tables."""
    from rl.grpo import train_grpo
    from worlds.model import set_threads

    set_threads(ComputeSpec(**call.config["executor.compute"]).cpu_threads)
    cfg = call.config
    log = live_metrics(call)
    result = train_grpo(call.input_path("init"), read_parquet(call.input_path("prompts")),
                        read_parquet(call.input_path("val")), RLSpec(**cfg["rl"]), GraderSpec(**cfg["grader"]),
                        ComputeSpec(**cfg["executor.compute"]), cfg["seed"], call.workdir,
                        on_step=lambda step, values: log([(k, v, step) for k, v in values.items()]), tool=cfg["tool"])
    st = store(call)
    outputs = {str(StepRole(step)): st.describe(path / "model", kind="checkpoint", step=step)
               for step, path in result["checkpoints"]}
    outputs["final"] = outputs[str(StepRole(result["checkpoints"][-1][0]))]
    outputs["rollouts"] = st.describe(call.workdir / "rollouts", kind="table")
    outputs["val"] = st.describe(call.workdir / "val", kind="table")
    return StageOutput(outputs=outputs, facts=result["facts"], metrics=result["metrics"], summary=result["summary"])


STAGE = Stage("rl", rl_body, config_keys=("rl", "grader", "executor.compute", "seed", "tool"),
              inputs=("init", "prompts", "val"), outputs=(StepRole.PREFIX + "*", "final", "rollouts", "val"),
              per_arm=True, placed=True, trains=True)
