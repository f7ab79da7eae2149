"""Run a stage body inline, or as a Ray task on a local Ray instance or a cluster (DESIGN §5).

The arms of an ablation are independent after their shared stages, so the flow submits one Prefect task per
arm and each of those calls `call(...)`: with use_ray the bodies run as Ray tasks in parallel, with the CPUs
and GPUs per arm from the spec. A Ray address in the spec or RAY_ADDRESS targets a cluster instead of a local
instance (TWINARM_HOME must then be on storage the cluster's nodes share). A Ray task writes its progress lines
to the logs of the Prefect task run that placed it (infra.progress.run_log); the worker must reach that Prefect
API (on a cluster: a PREFECT_API_URL the nodes can reach, not the temporary 127.0.0.1 server of `twinarm run`).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, TypeVar

from infra.code import REPO_ROOT
from infra.errors import TwinarmError
from infra.progress import RunLog, current_run_log, run_log
from infra.spec import ExecutorSpec

T = TypeVar("T")
_init_lock = threading.Lock()
# Ray's driver folds worker log lines that differ only in their numbers into one ("[repeated 5x across cluster]"):
# that drops most progress lines of a stage placed on Ray, its last one included. Read when ray is first imported,
# which is in this module (lazily); RAY_DEDUP_LOGS=1 set by the user is kept.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Environment the workers need to find the same state and settings as the flow process.
FORWARD_ENV = ("TWINARM_HOME", "MLFLOW_TRACKING_URI", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
               "TOKENIZERS_PARALLELISM", "PREFECT_HOME", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")


def ray_address(executor: ExecutorSpec) -> str | None:
    """The Ray cluster to join: executor.ray_address, else $RAY_ADDRESS, else None (a local instance)."""
    return executor.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init retries an unreachable address for minutes; a plain TCP connect answers in seconds."""
    import socket

    hostport = address.split("://", 1)[-1]
    if hostport in ("auto", "local") or ":" not in hostport:
        return
    host, port = hostport.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise TwinarmError(f"could not connect to the Ray cluster at {address}: {exc}. Check executor.ray_address "
                           f"/ RAY_ADDRESS, or set executor.use_ray: false to run arms in the flow process.") from None


def _init(executor: ExecutorSpec) -> None:
    """ray.init: join the cluster at `ray_address` with the repository as working_dir, or start a local instance on
    every CPU; workers get FORWARD_ENV. Raises TwinarmError when the cluster is unreachable or Ray fails to start."""
    import ray

    env_vars = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    address = ray_address(executor)
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, configure_logging=False, runtime_env={
                "env_vars": env_vars, "working_dir": str(REPO_ROOT),
                "excludes": [".venv", ".twinarm", ".git", "bench-out", "*.duckdb", "*.db"]})
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
                     runtime_env={"env_vars": env_vars})
    except Exception as exc:  # Ray raises several types for a bad address; the user needs one message
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise TwinarmError(f"could not connect to {where}: {exc}. Check executor.ray_address / RAY_ADDRESS, "
                           f"or set executor.use_ray: false to run arms in the flow process.") from None


_starter: tuple[threading.Event, list[BaseException]] | None = None  # the last start: (ended, its error if any)


def _start(executor: ExecutorSpec) -> tuple[threading.Event, list[BaseException]]:
    """The thread that runs ray.init and then parks until the process exits (started once; again when the last
    start failed or Ray was shut down since): Ray binds its local processes (GCS, raylet) to the thread that started
    them (PR_SET_PDEATHSIG, which Linux fires when that *thread* ends), so a thread that returned, such as a Prefect
    task runner's at the end of a flow, would kill them and leave their agents orphaned. Returns (set when the start
    ended, its error if any)."""
    import ray

    global _starter
    with _init_lock:
        if _starter is None or (_starter[0].is_set() and not ray.is_initialized()):
            done, error = threading.Event(), []

            def start_and_park() -> None:
                try:
                    _init(executor)
                except BaseException as exc:
                    error.append(exc)
                    return
                finally:
                    done.set()
                threading.Event().wait()

            threading.Thread(target=start_and_park, name="ray-start", daemon=True).start()
            _starter = (done, error)
        return _starter


def ensure_ray(executor: ExecutorSpec) -> None:
    """Initialise Ray once per process (thread-safe), on the thread `_start` parks: join the cluster at
    `ray_address`, or start a local instance. Raises TwinarmError when the cluster is unreachable or Ray fails to
    start (a later call tries again)."""
    import ray

    if ray.is_initialized():
        return
    done, error = _start(executor)
    done.wait()
    if error:
        raise error[0]


def start_early(executor: ExecutorSpec) -> None:
    """Start (or join) Ray in the background when the executor uses it, so that the first stage placed on it does
    not wait for it (a local instance takes ~5 s to start on a 2-core box). An error is not raised here: the first
    `call` raises it (ensure_ray)."""
    if executor.use_ray:
        _start(executor)


def in_run_log(target: RunLog | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) in a Ray worker, its progress lines sent to the logs of the Prefect run `target`."""
    with run_log(target):
        return fn(*args, **kwargs)


def call(fn: Callable[..., T], *args: Any, executor: ExecutorSpec, processes: int = 1, **kwargs: Any) -> T:
    """fn(*args, **kwargs) inline, or as a Ray task with the spec's resources whose progress lines go to the
    logs of the calling Prefect task (or flow) run; errors surface unchanged. A body that starts `processes`
    processes (a shared stage's compute.shared_cpu_processes) reserves cpus_per_arm for each, at most every CPU
    of the cluster (more could never be scheduled)."""
    if not executor.use_ray:
        return fn(*args, **kwargs)
    import ray
    from ray.exceptions import RayTaskError

    ensure_ray(executor)
    cpus = executor.cpus_per_arm * processes
    if processes > 1:
        cpus = min(cpus, ray.cluster_resources().get("CPU", cpus))
    remote = ray.remote(num_cpus=cpus, num_gpus=executor.gpus_per_arm, max_retries=0)(in_run_log)
    try:
        # named after fn: Ray prefixes the worker's lines on the terminal with the task name
        return ray.get(remote.options(name=getattr(fn, "__name__", "call")).remote(current_run_log(), fn, *args,
                                                                                     **kwargs))
    except RayTaskError as exc:
        # the body's own exception (a TwinarmError with its clear message), not Ray's wrapper
        raise (exc.cause if isinstance(exc.cause, BaseException) else exc.as_instanceof_cause()) from None
