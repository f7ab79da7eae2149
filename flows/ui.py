"""`twinarm ui`: the Prefect server (UI + API) and the MLflow UI on 127.0.0.1, plus the served deployments, as
child processes that share TWINARM_HOME's stores; Ctrl-C stops them all."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from infra.errors import TwinarmError
from infra.home import configure_environment
from infra.tracking import tracking_uri


def _free(port: int) -> None:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise TwinarmError(f"port {port} on 127.0.0.1 is already in use: stop what holds it or pass another "
                               f"port (--prefect-port / --mlflow-port)")


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TwinarmError(f"{proc.args[0]} exited with code {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TwinarmError(f"{url} did not answer within {timeout_s:.0f}s")


def start_servers(prefect_port: int, mlflow_port: int) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """Start both servers; return the processes and the environment that points clients at them."""
    home = configure_environment()
    for port in (prefect_port, mlflow_port):
        _free(port)
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
    procs = [
        subprocess.Popen([os.path.join(bin_dir, "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                          str(prefect_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
        subprocess.Popen([os.path.join(bin_dir, "mlflow"), "server", "--backend-store-uri", tracking_uri(home),
                          "--default-artifact-root", home.mlflow_artifacts.as_uri(), "--host", "127.0.0.1",
                          "--port", str(mlflow_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
    ]
    try:
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 120, procs[0])
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 120, procs[1])
    except BaseException:
        stop(procs)
        raise
    return procs, env


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_ui(prefect_port: int, mlflow_port: int, spec: str, deployments: bool, console: Any) -> int:
    procs, env = start_servers(prefect_port, mlflow_port)
    if deployments:
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--spec", spec], env=env))
    console.print(f"Prefect UI  http://127.0.0.1:{prefect_port}   (deployments: twinarm-ablation/ablation, "
                  f"twinarm-nightly-heldout/nightly-heldout)")
    console.print(f"MLflow UI   http://127.0.0.1:{mlflow_port}")
    console.print("Ctrl-C stops both.")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        failed = next(p for p in procs if p.poll() is not None)
        raise TwinarmError(f"{' '.join(map(str, failed.args[:3]))} exited with code {failed.returncode}")
    finally:
        stop(procs)
