"""The twin-arm ablation flow: spec → resolved arms → (stages added by later issues) → summary.

Thin on purpose: each stage is a task in tasks/, recorded by the Session (the one lineage writer).
"""
from __future__ import annotations

from infra.home import configure_environment

configure_environment()  # before prefect reads its settings

from prefect import flow, runtime  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from infra.errors import SpecError  # noqa: E402
from infra.spec import AblationSpec, load_spec, resolve_arm  # noqa: E402
from tasks import resolve as resolve_stage  # noqa: E402
from tasks.common import Session, run_task  # noqa: E402


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
    if overrides.seeds:
        spec.base.seeds = overrides.seeds
    if overrides.rl_steps:
        spec.base.rl.steps = overrides.rl_steps
    return spec


@flow(name="twinarm-ablation", log_prints=True)
def ablation(spec_file: str = "configs/demo.yaml", overrides: RunOverrides = RunOverrides(),
             fresh: bool = False) -> dict:
    """Run a matched twin-arm ablation from a spec file; completed stages are served from cache."""
    spec = apply_overrides(load_spec(spec_file), overrides)
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    with Session(spec, spec_file, fresh=fresh, flow_run_id=flow_run_id) as s:
        spec_art = s.store.put(spec_file, kind="spec")
        for arm in spec.arms:
            resolved = resolve_arm(spec, arm).model_dump(mode="json")
            run_task(s, resolve_stage.resolve, s.call("resolve", arm, None, resolved, {"spec": spec_art}))
        return {"ablation": spec.name, "home": str(s.home.root), "stages": dict(s.status),
                "summaries": dict(s.summaries)}
