"""`twinarm ui`: the Prefect server (UI + API) and the MLflow UI on 127.0.0.1, plus the served deployments, as
child processes that share TWINARM_HOME's stores. Ctrl-C or SIGTERM stops every child it started (each in its own
process group, so their own children go too) and frees the ports.

Nothing is written into the virtualenv: the Prefect UI's build (which the server copies and rewrites for its
base URL at each start) goes to TWINARM_HOME/prefect/ui-build (PREFECT_UI_STATIC_DIRECTORY), and the servers'
output to TWINARM_HOME/prefect/*.log."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from infra.errors import TwinarmError
from infra.home import Home, configure_environment
from infra.procs import spawn
from infra.tracking import tracking_uri

STOP_GRACE_S = 20


def _free(port: int) -> None:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise TwinarmError(f"port {port} on 127.0.0.1 is already in use: stop what holds it or pass another "
                               f"port (--prefect-port / --mlflow-port)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def check_api(url: str, timeout_s: float = 5.0) -> None:
    """Raise TwinarmError naming PREFECT_API_URL when nothing answers at `url` (a server that answers, even with an
    HTTP error such as a cloud workspace's 401, is reachable)."""
    import urllib.error

    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        raise TwinarmError(f"PREFECT_API_URL={url} does not answer ({getattr(exc, 'reason', exc)}): start that Prefect "
                           f"server, or unset PREFECT_API_URL and twinarm starts its own for the run") from None


def prefect_env(home: Home, port: int) -> dict[str, str]:
    """The environment of a Prefect server on 127.0.0.1:port and of the clients that use it."""
    api = f"http://127.0.0.1:{port}/api"
    return {**os.environ, "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED":
            "false", "PREFECT_UI_STATIC_DIRECTORY": str(home.prefect / "ui-build")}


def start_prefect(home: Home, port: int, env: dict[str, str]) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port (output in TWINARM_HOME/prefect/server.log); returns once the
    API answers."""
    _free(port)
    proc = spawn([os.path.join(os.path.dirname(sys.executable), "prefect"), "server", "start", "--host",
                  "127.0.0.1", "--port", str(port)], env, home.prefect / "server.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc)
    except BaseException:
        stop([proc])
        raise
    return proc


@contextmanager
def run_server(while_starting: Callable[[], Any] | None = None) -> Iterator[None]:
    """The Prefect API of one `twinarm run`/`heldout` when PREFECT_API_URL is not set: the temporary server Prefect
    would start itself (no UI, no services), but in its own process group, so that a Ctrl-C reaches the flow,
    which stops its stages and records its end, and not the server it records them in. Stopped on exit.
    `while_starting`: what to do while the server starts (~10 s with a fresh database on a 2-core box), such as
    importing the flow or creating the MLflow store. PREFECT_API_URL is set first: prefect reads its settings once,
    when it is imported."""
    if os.environ.get("PREFECT_API_URL"):
        check_api(os.environ["PREFECT_API_URL"])
        if while_starting:
            while_starting()
        yield
        return
    home = configure_environment()
    port = free_port()
    env = {**os.environ, "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT_UI_ENABLED": "0"}
    proc = spawn([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
                  "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"], env,
                 home.prefect / "run-server.log")
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    try:
        if while_starting:
            while_starting()
        wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc)
        yield
    finally:
        if "prefect.logging.handlers" in sys.modules:  # send what is queued while the server still answers
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for worker in (APILogWorker, EventsWorker):
                logging.getLogger(worker.__name__).setLevel(logging.ERROR)  # not "Still processing items"
                worker.drain_all(timeout=15)
        os.environ.pop("PREFECT_API_URL", None)
        stop([proc])


def start_servers(prefect_port: int, mlflow_port: int) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """Start both servers; return the processes and the environment that points clients at them."""
    home = configure_environment()
    for port in (prefect_port, mlflow_port):
        _free(port)
    env = prefect_env(home, prefect_port)
    procs = [start_prefect(home, prefect_port, env)]
    try:
        procs.append(spawn([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
                            "--backend-store-uri", tracking_uri(home), "--default-artifact-root",
                            home.mlflow_artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(mlflow_port)],
                           env, home.prefect / "mlflow-server.log"))
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 120, procs[1])
    except BaseException:
        stop(procs)
        raise
    return procs, env


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop the children in reverse start order (the deployments' runner first, while the API still answers, so
    it can record its runs' end): SIGTERM to each process group, SIGKILL after STOP_GRACE_S."""
    for proc in reversed(procs):
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        _signal_group(proc, signal.SIGKILL)  # grandchildren that outlived their parent


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_ui(prefect_port: int, mlflow_port: int, spec: str, deployments: bool, console: Any) -> int:
    # SIGTERM stops the children like Ctrl-C; SIGINT is set explicitly too, since a process started with SIGINT
    # ignored (a background job of a non-interactive shell) would otherwise never see Ctrl-C
    previous = {sig: signal.signal(sig, _terminate_as_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen] = []
    try:
        procs, env = start_servers(prefect_port, mlflow_port)
        if deployments:
            procs.append(spawn([sys.executable, "-m", "flows.cli", "serve", "--spec", spec, "--replace"], env))
        console.print(f"Prefect UI  http://127.0.0.1:{prefect_port}   (deployments: twinarm-ablation/ablation, "
                      f"twinarm-nightly-heldout/nightly-heldout)")
        console.print(f"MLflow UI   http://127.0.0.1:{mlflow_port}")
        console.print("Ctrl-C stops both.")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        failed = next(p for p in procs if p.poll() is not None)
        raise TwinarmError(f"{' '.join(map(str, failed.args[:3]))} exited with code {failed.returncode}")
    except KeyboardInterrupt:
        stop(procs)
        procs = []
        console.print(f"stopped: the Prefect and MLflow servers and the served deployments; ports {prefect_port} "
                      f"and {mlflow_port} are free.")
        return 0
    finally:
        stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
