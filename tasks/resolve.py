"""Stage: record each arm's resolved config (base + declared overrides) as a content-addressed artifact."""
from __future__ import annotations

from infra.artifacts import atomic_write_json
from infra.spec import BaseSpec, config_hash
from tasks.common import Stage, StageCall, StageOutput, store


def resolve_body(call: StageCall) -> StageOutput:
    """Write the arm's resolved config (canonical JSON) as the artifact `resolved_config`."""
    path = atomic_write_json(call.workdir / "resolved.json", call.config)
    art = store(call).put(path, kind="config")
    return StageOutput(outputs={"resolved_config": art}, facts={"config_hash": config_hash(call.config)},
                       summary={"config_hash": config_hash(call.config)})


STAGE = Stage("resolve", resolve_body, config_keys=tuple(BaseSpec.model_fields), inputs=("spec",),
              outputs=("resolved_config",), per_arm=True)
