"""Child processes that die with their parent: servers twinarm starts (flows.ui), data-parallel training ranks
(sft.ranks) and held-out evaluation shares (evals.evaluate), the last two as `python -m MODULE JOB` jobs."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

# Linux: the child asks the kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, kept across execve),
# then becomes the real command. A parent killed by SIGKILL cannot stop its children itself: without this, a
# SIGKILLed `twinarm run` left its temporary Prefect server running for good. Done in a fresh one-thread
# interpreter, not in Popen's preexec_fn, which is unsafe in a process with threads. The parent check closes the
# race of a parent that died before the prctl.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit(0); os.execvp(sys.argv[2], sys.argv[2:])")


def spawn(args: list[str], env: dict[str, str] | None, log: Path | None = None) -> subprocess.Popen:
    """A child in its own process group (stop() ends it with everything it started) that gets SIGTERM when this
    process dies, however it dies (Linux; elsewhere only stop() ends it). env None: this process's environment."""
    if sys.platform == "linux":
        args = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it; closed on exit
    try:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()


def spawn_jobs(module: str, jobs: list[dict], tmp: str, logs: list[Path]) -> list[subprocess.Popen]:
    """Start `python -m module JOB` once per job (pickled to `tmp`/job-N.pkl, N from 1), each dying with this
    process (`spawn`), output to its log. The module's `__main__` reads its job with `load_job`."""
    procs = []
    for n, (job, log) in enumerate(zip(jobs, logs, strict=True), start=1):
        path = Path(tmp) / f"job-{n}.pkl"
        path.write_bytes(pickle.dumps(job))
        procs.append(spawn([sys.executable, "-m", module, str(path)], env=None, log=log))
    return procs


def load_job() -> dict:
    """The job a `spawn_jobs` child was started with (its command line's path)."""
    return pickle.loads(Path(sys.argv[1]).read_bytes())


def kill_all(procs: list[subprocess.Popen], tmp: str | None = None) -> None:
    """SIGKILL the children still running and reap them; then remove their temporary directory `tmp`, if any."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
