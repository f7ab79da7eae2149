"""The signal and ownership cases of the command line, measured black-box on any checkout (so the same numbers can
be taken before and after a change): Ctrl-C on `twinarm run`, SIGTERM and Ctrl-C on `twinarm ui`, `twinarm serve`
beside `twinarm ui`, `twinarm serve` with an unreachable API. tests/test_interrupts.py asserts on these results.

    python scripts/signal_cases.py [--repo PATH] [--python PATH]     # prints a Markdown table
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
TRAINING = re.compile(r"\] (train steps|GRPO steps) \d+/")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def owned(home: Path) -> list[str]:
    """Processes still alive that were started for this TWINARM_HOME (they inherit it), as 'pid name'."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("TWINARM_HOME") == str(home):
                found.append(f"{proc.pid} {proc.info['name']}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


class Started:
    """A twinarm command in its own session (like a terminal's job), its output collected line by line."""

    def __init__(self, repo: Path, python: str, home: Path, *args: str, env: dict[str, str] | None = None):
        self.env = {**os.environ, "TWINARM_HOME": str(home), "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1",
                    "TWINARM_PROGRESS_EVERY_S": "1", "COLUMNS": "200", **(env or {})}
        for key in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "TWINARM_ENV_HOME"):
            if not env or key not in env:
                self.env.pop(key, None)
        self.proc = subprocess.Popen([python, "-m", "flows.cli", *args], cwd=repo, env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: re.Pattern, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(pattern.search(line) for _, line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.proc.args}: no line matching {pattern.pattern}:\n{self.text()}")
            time.sleep(0.2)

    def ended(self, timeout: float) -> tuple[int | None, float]:
        t0 = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(0.5)  # the reader thread catches the last lines
        return code, time.monotonic() - t0

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def kill_all(self, home: Path) -> None:
        for entry in owned(home):
            try:
                os.kill(int(entry.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def tiny_spec(repo: Path, directory: Path) -> Path:
    sys.path.insert(0, str(repo / "tests"))
    from conftest import tiny_spec_dict  # the CI-sized spec of the tests

    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(), sort_keys=False))
    return path


def flow_run_states(home: Path) -> list[str]:
    """State names of the flow runs in the Prefect database of TWINARM_HOME (the temporary server's store)."""
    db = home / "prefect" / "prefect.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT state_name FROM flow_run ORDER BY start_time")]


def ctrl_c_run(repo: Path, python: str, root: Path) -> dict[str, Any]:
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it) once a training loop prints progress."""
    home = root / "run-home"
    job = Started(repo, python, home, "run", str(tiny_spec(repo, root)))
    try:
        deadline = time.monotonic() + 900
        while not list(home.glob("runs/base_model/*/train/checkpoints/*")):  # base-model training, mid-way
            if job.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no base-model checkpoint appeared:\n{job.text()}")
            time.sleep(0.2)
        t_signal, wall_signal = time.monotonic(), time.time()
        os.killpg(job.proc.pid, signal.SIGINT)
        code, seconds = job.ended(timeout=180)
        wall_exit = time.time()
        time.sleep(2)  # anything still computing in the background would write now
        after = [line for t, line in job.lines if t > t_signal + 1 and TRAINING.search(line)]
        # a checkpoint being saved when the signal came may finish before exit; nothing may be written after it
        written = [p for p in (home / "runs").rglob("*") if p.is_file() and p.stat().st_mtime > wall_exit]
        before = [line for t, line in job.lines if t <= t_signal and TRAINING.search(line)]
        return {"case": "Ctrl-C on `twinarm run` (mid-training)", "exit": code, "seconds": round(seconds, 1),
                "progress lines before the signal": len(before), "training lines after the signal": len(after), "files written after exit": len(written),
                "flow run": ", ".join(flow_run_states(home)),
                "left running": len(owned(home)), "last line": job.text().strip().splitlines()[-1][:160],
                "output": job.text()}
    finally:
        job.kill_all(home)


def ui_cases(repo: Path, python: str, root: Path, sig: signal.Signals, group: bool, serve_beside: bool
             ) -> list[dict[str, Any]]:
    home = root / f"ui-home-{sig.name}"
    ports = free_port(), free_port()
    static = Path(subprocess.run([python, "-c", "import prefect; print(prefect.__ui_static_subpath__)"],
                                 capture_output=True, text=True).stdout.strip())
    t_start = time.time()
    job = Started(repo, python, home, "ui", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]))
    results = []
    try:
        deadline = time.monotonic() + 300
        urls = f"http://127.0.0.1:{ports[0]}/api/health", f"http://127.0.0.1:{ports[1]}/health"
        while not all(answers(u) for u in urls):
            if job.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"twinarm ui did not come up:\n{job.text()}")
            time.sleep(1)
        time.sleep(15)  # the deployments' runner registers and polls
        if serve_beside:
            serve = Started(repo, python, home, "serve", "--cron", "*/5 * * * *",
                            env={"PREFECT_API_URL": f"http://127.0.0.1:{ports[0]}/api"})
            code, seconds = serve.ended(timeout=60)
            if code is None:
                serve.proc.send_signal(signal.SIGTERM)
                serve.ended(timeout=60)
            results.append({"case": "`twinarm serve` beside `twinarm ui`", "exit": code,
                            "seconds": round(seconds, 1) if code is not None else "still serving after 60 s",
                            "last line": (serve.text().strip().splitlines() or [""])[-1][:160]})
        n_processes = len(owned(home))
        (os.killpg if group else os.kill)(job.proc.pid, sig)
        code, seconds = job.ended(timeout=120)
        time.sleep(2)
        in_venv = sum(1 for p in static.rglob("*") if p.is_file() and p.stat().st_mtime >= t_start) \
            if static.exists() else 0
        results.append({"case": f"{'Ctrl-C' if group else sig.name} on `twinarm ui`", "exit": code,
                        "seconds": round(seconds, 1), "processes before": n_processes,
                        "left running": len(owned(home)),
                        "ports still answering": sum(answers(u) for u in urls),
                        "files written in the venv": in_venv,
                        "last line": (job.text().strip().splitlines() or [""])[-1][:160]})
        return results
    finally:
        job.kill_all(home)


def serve_unreachable(repo: Path, python: str, root: Path) -> dict[str, Any]:
    url = f"http://127.0.0.1:{free_port()}/api"
    job = Started(repo, python, root / "serve-home", "serve", env={"PREFECT_API_URL": url})
    code, seconds = job.ended(timeout=120)
    if code is None:
        job.kill_all(root / "serve-home")
    return {"case": "`twinarm serve` with an unreachable API", "exit": code, "seconds": round(seconds, 1),
            "names the URL": url in job.text(), "last line": (job.text().strip().splitlines() or [""])[-1][:160]}


def all_cases(repo: Path, python: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="signal-cases-") as tmp:
        root = Path(tmp)
        return [ctrl_c_run(repo, python, root),
                *ui_cases(repo, python, root, signal.SIGTERM, group=False, serve_beside=True),
                *ui_cases(repo, python, root, signal.SIGINT, group=True, serve_beside=False),
                serve_unreachable(repo, python, root)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    for row in all_cases(args.repo.resolve(), args.python):
        row.pop("output", None)
        print("| " + " | ".join(f"{k}: {v}" for k, v in row.items()) + " |", flush=True)


if __name__ == "__main__":
    main()
