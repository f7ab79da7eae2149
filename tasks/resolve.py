"""Stage: record each arm's resolved config (base + declared overrides) as a content-addressed artifact."""
from __future__ import annotations

from prefect import task

from infra.artifacts import atomic_write_json
from infra.spec import config_hash
from tasks.common import StageCall, StageOutput, run_stage, stage_cache_key, store


def resolve_body(call: StageCall) -> StageOutput:
    path = atomic_write_json(call.workdir / "resolved.json", call.config)
    art = store(call).put(path, kind="config")
    return StageOutput(outputs={"resolved_config": art}, facts={"config_hash": config_hash(call.config)},
                       summary={"config_hash": config_hash(call.config)})


@task(name="resolve", cache_key_fn=stage_cache_key, persist_result=True)
def resolve(call: StageCall) -> StageOutput:
    return run_stage(call, resolve_body)
