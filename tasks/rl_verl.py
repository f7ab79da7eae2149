"""Stage: the RL stage (tasks/rl.py) on the verl cluster executor, for `executor.kind: verl` (flows/ablation.py picks
it). Same name, inputs and checkpoint roles as the local stage; a module of its own so that neither stage's code key
covers the other's code (infra.code.closure_hash follows every import of the body's module)."""
from __future__ import annotations

from infra.artifacts import read_parquet
from infra.roles import StepRole
from tasks.common import Stage, StageCall, StageOutput, store


def rl_verl_body(call: StageCall) -> StageOutput:
    """GRPO of one arm × seed on verl (rl.verl_run.train_verl): the prompts and val rows written in verl's parquet
    layout (outputs `verl_prompts`, `verl_val`, content-hashed), one Ray Job per compute key, its log lines in the
    task's log and `verl-job.log`, verl's saved steps merged to HF by verl's model merger and registered as the
    local stage's are (`step-NNNNNNN` per saved step, `final`). The Jobs API address is the one the flow's
    preflight recorded for this ablation (rl.verl_run.JOBS_ADDRESS, from executor.ray_address: placement, not in the
    compute key)."""
    from infra.progress import STAGE_LABEL, to_run_log
    from rl.verl_run import train_verl

    label = STAGE_LABEL.get()
    result = train_verl(call.input_path("init"), read_parquet(call.input_path("prompts")),
                        read_parquet(call.input_path("val")), call.config, ablation=call.ablation, arm=call.arm,
                        workdir=call.workdir, stage_key=call.key, mlflow_run_id=call.mlflow_run_id,
                        on_log=lambda line: to_run_log(f"[{label}] {line}"))
    st = store(call)
    outputs = {str(StepRole(step)): st.describe(path / "model", kind="checkpoint", step=step)
               for step, path in result["checkpoints"]}  # the local stage's roles (tasks/rl.py)
    outputs["final"] = outputs[str(StepRole(result["checkpoints"][-1][0]))]
    for role, (path, _, rows) in result["data"].items():
        outputs[f"verl_{role}"] = st.describe(path, kind="dataset", rows=rows)
    return StageOutput(outputs=outputs, facts=result["facts"], metrics=result["metrics"], summary=result["summary"])


# Runs in the flow process (it submits a Ray Job and waits); its compute key also covers executor.verl (parallelism,
# rollout engine, raw overrides: they can change the numbers).
STAGE = Stage("rl", rl_verl_body, config_keys=("rl", "grader", "executor.compute", "executor.verl", "seed", "tool"),
              inputs=("init", "prompts", "val"), outputs=(StepRole.PREFIX + "*", "final", "verl_prompts", "verl_val"),
              per_arm=True, placed=False, trains=True)
