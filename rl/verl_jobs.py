"""Submit a verl run as a Ray Job (ray.job_submission.JobSubmissionClient), idempotently.

The submission id is derived from the RL stage's compute key (`submission_id`), so the same computation always has
the same job: `run_job` submits it when the cluster has no such job, re-attaches to it while it is PENDING/RUNNING,
reads a SUCCEEDED one back without running it again, and raises a TwinarmError of one line for a FAILED/STOPPED one
(with the job's last error line and the command that prints its logs). Logs are streamed to a callback (the
Prefect task's logger) as they grow. The job's runtime env carries the repository as working_dir, the
environment the workers need (infra.ray_exec.FORWARD_ENV) and MLFLOW_RUN_ID, which attaches verl's mlflow logger
to our child run. verl itself resumes from its latest checkpoint after a preemption (trainer.resume_mode=auto).
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from infra.code import REPO_ROOT
from infra.errors import TwinarmError

ENTRYPOINT = ("python", "-m", "rl.verl_main")
EXCLUDES = [".venv", ".twinarm", ".git", "bench-out", "*.duckdb", "*.db", "__pycache__"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submission_id(stage_key: str) -> str:
    """The Ray Job id of the RL stage with compute key `stage_key` (same key → same job)."""
    if not stage_key or not stage_key.isalnum():
        raise ValueError(f"stage key must be a non-empty alphanumeric hash, got {stage_key!r}")
    return f"twinarm-rl-{stage_key[:24]}"


@dataclass(frozen=True)
class JobSpec:
    submission_id: str
    entrypoint: list[str]  # argv
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def entrypoint_line(self) -> str:
        return shlex.join(self.entrypoint)


def job_spec(overrides: list[str], stage_key: str, *, check: bool = False, mlflow_run_id: str | None = None,
             env: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
             working_dir: str | None = None) -> JobSpec:
    """The job of one arm × seed: `python -m rl.verl_main [--check] <overrides>` with our runtime env."""
    from infra.ray_exec import FORWARD_ENV

    env_vars = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    env_vars.update(env or {})
    if mlflow_run_id:
        env_vars["MLFLOW_RUN_ID"] = mlflow_run_id
    runtime_env = {"working_dir": working_dir or str(REPO_ROOT), "excludes": EXCLUDES, "env_vars": env_vars}
    argv = [*ENTRYPOINT, *(["--check"] if check else []), *overrides]
    return JobSpec(submission_id(stage_key), argv, runtime_env, dict(metadata or {}))


def submit_line(spec: JobSpec, address: str) -> str:
    """The equivalent `ray job submit` command line (what `twinarm plan` prints)."""
    return shlex.join(["ray", "job", "submit", "--address", address, "--submission-id", spec.submission_id,
                       "--runtime-env-json", json.dumps(spec.runtime_env, sort_keys=True), "--no-wait", "--",
                       *spec.entrypoint])


@dataclass
class JobOutcome:
    submission_id: str
    action: str  # submitted | attached | finished (already SUCCEEDED: read back, not run again)
    status: str
    logs: str


def dashboard_address(address: str | None) -> str:
    """The Jobs API address (the dashboard, http://host:8265): `address`, else (None or "auto")
    RAY_API_SERVER_ADDRESS, else RAY_ADDRESS. Raises TwinarmError when none names one."""
    if address in (None, "", "auto"):  # "auto" (the Ray client's convention) names no Jobs API: read the env
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        raise TwinarmError("no Ray Jobs address: set executor.ray_address (or RAY_ADDRESS) to the cluster's "
                           "dashboard, e.g. http://head-node:8265")
    return address if "://" in address else f"http://{address}"


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError depending on what is listening
        raise TwinarmError(f"could not reach the Ray Jobs API at {url}: {str(exc).splitlines()[0]} (the head's "
                           f"dashboard must run: `ray start --head --include-dashboard=true`)") from None


def _status(value: Any) -> str:
    return str(getattr(value, "value", value))


def _info(jobs: Any, sid: str) -> Any | None:
    try:
        return jobs.get_job_info(sid)
    except RuntimeError as exc:  # the Jobs API answers 404 for an unknown id
        if "404" in str(exc) or "does not exist" in str(exc).lower():
            return None
        raise


def _failure_line(sid: str, status: str, message: str | None, logs: str) -> str:
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith(("error:", "traceback")) or "Error:" in ln]
    last = errors[-1] if errors else (lines[-1] if lines else (message or "no output"))
    # the id is the computation's: the same flow run again reads this failure back until the job is deleted
    return (f"Ray job {sid} {status}: {last} (full logs: ray job logs {sid}; once the cause is fixed, "
            f"ray job delete {sid} and run again: verl resumes from its last checkpoint)")


def run_job(spec: JobSpec, address: str | None, on_log: Callable[[str], None] | None = None,
            poll_s: float = 0.5, timeout_s: float | None = None,
            stop: Callable[[], bool] | None = None) -> JobOutcome:
    """Submit (or re-attach to, or read back) the job and wait for it; log lines go to `on_log` as they come.

    Raises TwinarmError (one line) when the job FAILED or was STOPPED, or the wait passed `timeout_s`; raises
    infra.progress.StopRequested when `stop()` turns true while waiting (the command was interrupted: the job keeps
    running on the cluster, and the same command re-attaches to it)."""
    jobs = client(address)
    info = _info(jobs, spec.submission_id)
    if info is None:
        jobs.submit_job(entrypoint=spec.entrypoint_line, submission_id=spec.submission_id,
                        runtime_env=spec.runtime_env, metadata=spec.metadata)
        action = "submitted"
    elif _status(info.status) == "SUCCEEDED":
        action = "finished"
    elif _status(info.status) in ("PENDING", "RUNNING"):
        action = "attached"
    else:
        logs = jobs.get_job_logs(spec.submission_id)
        raise TwinarmError(_failure_line(spec.submission_id, _status(info.status), info.message, logs))
    seen, start = 0, time.monotonic()
    while True:
        status = _status(jobs.get_job_status(spec.submission_id))
        logs = jobs.get_job_logs(spec.submission_id)
        if on_log and len(logs) > seen:
            for line in logs[seen:].splitlines():
                on_log(line)
            seen = len(logs)
        if status in TERMINAL:
            break
        if stop is not None and stop():
            from infra.progress import StopRequested

            raise StopRequested(f"Ray job {spec.submission_id}: stopped waiting while {status}; it keeps running on "
                                f"the cluster (the same command re-attaches; ray job stop {spec.submission_id} "
                                f"ends it)")
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TwinarmError(f"Ray job {spec.submission_id} still {status} after {timeout_s:.0f} s "
                               f"(it keeps running; run the same command again to re-attach)")
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        info = jobs.get_job_info(spec.submission_id)
        raise TwinarmError(_failure_line(spec.submission_id, status, info.message, logs))
    return JobOutcome(spec.submission_id, action, status, logs)
