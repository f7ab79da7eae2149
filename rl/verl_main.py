"""The cluster entrypoint a Ray Job runs: `python -m rl.verl_main [--check] KEY=VALUE ...` (verl Hydra overrides).

Composes verl's `ppo_trainer` config with the overrides and validates it through verl's own checks
(rl.verl_config.compose/validate). With --check it prints one line `twinarm-verl-check {json}` and exits 0 (what
`twinarm plan` and the CPU Ray Jobs test run on a head without GPUs). Without it, it runs verl's PPO driver
(verl.trainer.main_ppo.run_ppo) with a task runner that first imports rl.verl_trainer, so verl's trainer
registry has our trainer mode and verl's estimator registry our estimator in the process that trains.
Exit codes: 0 ok, 2 a config verl refuses (one line on stderr naming the key).
"""
from __future__ import annotations

import json
import sys
from typing import Any

CHECK_TAG = "twinarm-verl-check"


def _task_runner() -> Any:
    import ray
    from verl.trainer.main_ppo import TaskRunnerV1

    base = TaskRunnerV1.__ray_metadata__.modified_class

    class TwinarmTaskRunner(base):  # type: ignore[misc, valid-type]
        def run(self, config: Any) -> Any:
            import rl.verl_trainer  # noqa: F401  (registers trainer mode twinarm_sync + estimator twinarm_heads)

            return super().run(config)

    return ray.remote(num_cpus=1)(TwinarmTaskRunner)


def main(argv: list[str] | None = None) -> int:
    from rl.verl_config import VerlConfigError, check, load

    args = list(sys.argv[1:] if argv is None else argv)
    only_check = "--check" in args
    overrides = [a for a in args if a != "--check"]
    try:
        if only_check:
            print(f"{CHECK_TAG} {json.dumps(check(overrides), sort_keys=True)}", flush=True)
            return 0
        config, _ = load(overrides)
    except VerlConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    run_ppo(config, task_runner_class=_task_runner())
    return 0


if __name__ == "__main__":  # pragma: no cover - the Ray Job's entrypoint
    sys.exit(main())
