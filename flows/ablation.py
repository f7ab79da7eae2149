"""The twin-arm ablation flow, top to bottom:

spec → resolved arms → data → base model → twins → per arm × seed: SFT → GRPO → checkpoint sweeps →
held-out (all arms, one job) → summary

Thin on purpose: each stage is a task in tasks/ that returns a StageOutput; the Session (the one lineage writer)
records it. Shared stages run once for every group of arms whose slice of the config and inputs are equal;
per-arm stages run concurrently (as Ray tasks when the executor says so), each arm's chain at its own pace.
"""
from __future__ import annotations

from infra.home import configure_environment

configure_environment()  # before prefect reads its settings

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from prefect import flow, runtime  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402

from flows.artifacts import publish_summary  # noqa: E402
from flows.orphans import crash_orphans  # noqa: E402
from infra.artifacts import Artifact  # noqa: E402
from infra.errors import SpecError  # noqa: E402
from infra.roles import CheckpointRole, StepRole, SuiteRole  # noqa: E402
from infra.spec import AblationSpec, BaseSpec, resolved_arms  # noqa: E402
from tasks import report as report_stage  # noqa: E402
from tasks import rl_verl  # noqa: E402
from tasks.base_model import CORPUS_ROLES  # noqa: E402
from infra.ray_exec import start_early  # noqa: E402
from tasks.common import SHARED, Session, Stage, StageOutput, load_output, run_chains, run_task  # noqa: E402
from tasks.stages import STAGES, load_checked_spec  # noqa: E402
from tasks.twins import TWIN_SOURCES  # noqa: E402


class RunOverrides(BaseModel):
    """Run-level overrides offered in the Prefect UI form next to the spec file."""

    model_config = ConfigDict(extra="forbid")
    arms: list[str] | None = Field(None, description="run only these arms (default: all)")
    seeds: list[int] | None = Field(None, description="replace base.seeds")
    rl_steps: int | None = Field(None, ge=1, description="replace base.rl.steps")


def apply_overrides(spec: AblationSpec, overrides: RunOverrides) -> AblationSpec:
    spec = spec.model_copy(deep=True)
    if overrides.arms:
        unknown = [a for a in overrides.arms if a not in spec.arms]
        if unknown:
            raise SpecError(f"--arms: unknown arm(s) {unknown} (arms: {', '.join(spec.arms)})")
        spec.arms = {a: spec.arms[a] for a in overrides.arms}
        spec.contrasts = {n: c for n, c in spec.contrasts.items()
                          if c.treatment in spec.arms and c.control in spec.arms}
    for option, value, section, key in (("--seeds", overrides.seeds, spec.base, "seeds"),
                                        ("--rl-steps", overrides.rl_steps, spec.base.rl, "steps")):
        if value:
            try:  # validated on assignment: a rule of the spec can refuse the new value
                setattr(section, key, value)
            except ValidationError as exc:
                raise SpecError(f"{option} {value}: " + "; ".join(e["msg"].removeprefix("Value error, ")
                                                                  for e in exc.errors())) from None
    return spec


Arms = dict[str, BaseSpec]
Outputs = dict[str, Artifact]


def shared(s: Session, stage: Stage, arms: Arms, inputs_for: Callable[[str], Outputs],
           on_compute: Callable[[], None] | None = None, **kwargs: Any) -> dict[str, StageOutput]:
    """Run a shared stage once per group of arms with equal config slice and inputs; arm label '*' when every
    arm shares it. `on_compute` runs first when a group's output is not complete (the stage will compute)."""
    groups: dict[str, tuple[Any, list[str]]] = {}
    for arm, cfg in arms.items():
        call = s.stage_call(stage, SHARED, None, stage.config(cfg), inputs_for(arm))
        groups.setdefault(call.key, (call, []))[1].append(arm)
    if on_compute and any(load_output(call) is None for call, _ in groups.values()):
        on_compute()
    out: dict[str, StageOutput] = {}
    for call, members in groups.values():
        label = SHARED if len(members) == len(arms) else "+".join(members)
        result = run_task(s, stage.task, s.begin(dataclasses.replace(call, arm=label)), **kwargs)
        out.update(dict.fromkeys(members, result))
    return out


def one_protocol(arms: Arms) -> dict[str, Any]:
    """The held-out job's config: it must be the same for every arm (one job, one protocol)."""
    configs = {arm: STAGES["heldout"].config(cfg) for arm, cfg in arms.items()}
    first = next(iter(configs.values()))
    differ = sorted({k for c in configs.values() for k in c if c[k] != first[k]})
    if differ:
        raise SpecError(f"the held-out evaluation runs every arm in one job under one protocol, but arms differ in "
                        f"{differ}; move these keys out of the arms' overrides")
    return first


def preflight(spec_file: str, arms: Arms, ablation_name: str | None = None) -> None:
    """Refuse what would fail late, before any compute."""
    from infra.ray_exec import check_reachable, ray_address

    if any(cfg.executor.kind == "verl" for cfg in arms.values()):
        from rl.verl_run import preflight as verl_preflight

        # also records the Jobs API address the RL stage submits to (placement, not in its compute key)
        verl_preflight(spec_file, arms, ablation_name)
    for address in sorted({ray_address(cfg.executor) for cfg in arms.values() if cfg.executor.use_ray} - {None}):
        check_reachable(address)


@flow(name="twinarm-ablation", log_prints=True)
def ablation(spec_file: str = "configs/demo.yaml", overrides: RunOverrides = RunOverrides(),
             fresh: bool = False) -> dict:
    """Run a matched twin-arm ablation from a spec file; completed stages are served from cache."""
    from sft.twins import twin_side

    spec = apply_overrides(load_checked_spec(spec_file), overrides)
    arms = resolved_arms(spec)
    preflight(spec_file, arms, spec.name)
    placement = {"executor": spec.base.executor.model_dump(mode="json")}
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    with Session(spec, spec_file, fresh=fresh, flow_run_id=flow_run_id) as s:
        crash_orphans(s.lineage, spec.name, flow_run_id)  # flow runs of this ablation whose process was killed
        spec_art = s.store.put(Path(spec_file), kind="spec")
        resolve = STAGES["resolve"]
        for arm, cfg in arms.items():
            run_task(s, resolve.task, s.begin(s.stage_call(resolve, arm, None, resolve.config(cfg),
                                                           {"spec": spec_art})), **placement)
        data = shared(s, STAGES["data"], arms, lambda arm: {}, **placement)
        base = shared(s, STAGES["base_model"], arms, lambda arm: {
            role: art for role, art in data[arm].outputs.items() if role in CORPUS_ROLES}, **placement)
        # the twins take one core for seconds: a Ray instance for the per-arm stages starts on the other meanwhile
        # (started during the base model, its idle processes would take CPU from it for minutes)
        twins = shared(s, STAGES["twins"], arms, lambda arm: {
            "base_model": base[arm].outputs["model"],
            **{n: data[arm].outputs[n] for n in TWIN_SOURCES if n in data[arm].outputs}},
            on_compute=lambda: start_early(spec.base.executor), **placement)

        def sft_inputs(arm: str, seed: int, earlier: list[StageOutput]) -> Outputs:
            side = twin_side(arms[arm].sft.strip_meta)
            return {"init": base[arm].outputs["model"],
                    **{n: twins[arm].outputs[f"{n}_{side}"] for n in TWIN_SOURCES
                       if f"{n}_{side}" in twins[arm].outputs}}

        on_verl = next(iter(arms.values())).executor.kind == "verl"  # preflight: one executor for every arm

        def rl_inputs(arm: str, seed: int, earlier: list[StageOutput]) -> Outputs:
            return {"init": earlier[0].outputs["model"], "prompts": data[arm].outputs["rl_prompts"],
                    "val": data[arm].outputs["val"]}

        def saved(arm: str, seed: int, earlier: list[StageOutput]) -> Outputs:
            return {"val": data[arm].outputs["val"],
                    **{str(CheckpointRole(arm, seed, ref.step)): art
                       for role, art in earlier[1].outputs.items() if (ref := StepRole.parse(role))}}

        # each arm × seed goes SFT -> RL -> sweep on its own, never waiting for a slower arm's stage
        sft, rl, *_ = run_chains(s, arms, [
            (STAGES["sft"], sft_inputs),
            (rl_verl.STAGE if on_verl else STAGES["rl"], rl_inputs),
            *([(STAGES["sweep"], saved)] if spec.base.eval.sweep else [])], **placement)
        first = next(iter(arms))
        suites = {r: a for r, a in data[first].outputs.items() if SuiteRole.parse(r)}
        starts_and_ends = {}
        for (arm, seed), out in rl.items():
            final = out.outputs["final"]
            starts_and_ends[str(CheckpointRole(arm, seed, 0))] = sft[arm, seed].outputs["model"]
            starts_and_ends[str(CheckpointRole(arm, seed, final.facets["step"]))] = final
        heldout = STAGES["heldout"]
        run_task(s, heldout.task, s.begin(s.stage_call(heldout, SHARED, None, one_protocol(arms),
                                                       {**suites, **starts_and_ends})), **placement)
        # every stage of this flow run is recorded: the ledger and the report read it back from lineage
        return publish_summary({"ablation": spec.name, "home": str(s.home.root), "stages": dict(s.status),
                                "summaries": dict(s.summaries), **report_stage.audit_and_report(s)})
