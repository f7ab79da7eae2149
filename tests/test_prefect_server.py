"""The Prefect paths users rely on, against a real Prefect server (started here on 127.0.0.1 on a free port, with
its own PREFECT_HOME, stopped at the end): the ablation deployment triggered the way the UI's Run button does,
the nightly held-out deployment on a seconds-long interval schedule, `prefect deploy --all` with the repo's
prefect.yaml and a process worker, and Prefect's own CLI (`deployment ls`, `flow-run ls`, `flow-run logs`).

The tests run in order on one server and one TWINARM_HOME: the ablation registers the held-out job that the
nightly runs evaluate, and the work-pool runs find its stages cached."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flows.ui import free_port, prefect_env, spawn, start_prefect, stop
from infra.home import Home

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ABLATION, NIGHTLY = "twinarm-ablation/ablation", "twinarm-nightly-heldout/nightly-heldout"


@dataclass
class Server:
    api: str
    env: dict[str, str]
    home: Home
    spec: Path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def client(self) -> Any:
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        class Scoped:  # the sync client, pointed at this server whatever this process's Prefect settings are
            def __enter__(s):
                s.settings = temporary_settings({PREFECT_API_URL: self.api})
                s.settings.__enter__()
                s.client = get_client(sync_client=True)
                return s.client.__enter__()

            def __exit__(s, *exc):
                s.client.__exit__(*exc)
                s.settings.__exit__(*exc)

        return Scoped()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_spec) -> Server:
    root = tmp_path_factory.mktemp("prefect-server")
    home = Home(root / "home").ensure()
    port = free_port()
    env = {**prefect_env(home, port), "TWINARM_HOME": str(home.root), "PREFECT_HOME": str(home.prefect),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PREFECT_UI_ENABLED": "false",
           # seconds, not the production minutes: the scheduler, the runner's and the worker's polls, and the
           # time after which a runner that stopped polling no longer counts as serving a deployment
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "2",
           "PREFECT_SERVER_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS": "6",
           "TWINARM_PROGRESS_EVERY_S": "1"}
    proc = start_prefect(home, port, env)
    yield Server(api=env["PREFECT_API_URL"], env=env, home=home, spec=tiny_spec)
    stop([proc])


def _serve(server: Server, *args: str) -> tuple[subprocess.Popen, Path]:
    log = server.home.root / f"serve-{time.monotonic_ns()}.log"
    return spawn([str(BIN / "twinarm"), "serve", "--spec", str(server.spec), *args], server.env, log), log


def _stop_serving(server: Server, proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    from prefect.client.schemas.objects import DeploymentStatus

    deadline = time.monotonic() + 60  # nobody polls any more: the next `serve` is not refused as a second owner
    with server.client() as client:
        while client.read_deployment_by_name(NIGHTLY).status == DeploymentStatus.READY:
            assert time.monotonic() < deadline
            time.sleep(1)


def _deployment(server: Server, name: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                return client.read_deployment_by_name(name)
            except Exception:
                assert time.monotonic() < deadline, f"{name} not deployed:\n{log.read_text()}"
                time.sleep(1)


def _wait_final(server: Server, flow_run_id: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {flow_run_id} still {run.state.name} after {timeout}s"
            time.sleep(1)


def _logs(server: Server, flow_run_id: Any) -> str:
    res = server.cli(str(BIN / "prefect"), "flow-run", "logs", str(flow_run_id))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_ablation_deployment_run_from_the_api_like_the_ui_run_button(server, tmp_path):
    """With the arms placed on Ray (as in the demo spec): the progress lines of the Ray workers reach the run's
    logs under the task run of their stage, and the terminal (the runner's output) once."""
    import yaml

    spec = yaml.safe_load(server.spec.read_text())
    spec["base"]["executor"].update(use_ray=True, cpus_per_arm=1)  # placement: not part of any stage's compute key
    on_ray = tmp_path / "tiny-ray.yaml"
    on_ray.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc, log = _serve(server)
    try:
        deployment = _deployment(server, ABLATION, proc, log)
        with server.client() as client:
            # what the UI's Run button posts: the deployment id and the form's parameters
            flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"spec_file": str(on_ray)})
        run = _wait_final(server, flow_run.id, timeout=900)
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()}"
        logs = _logs(server, run.id)
        assert "[rl/control/seed0] GRPO steps 6/6" in logs and "[sft/pmishift/seed0] computed" in logs, logs
        with server.client() as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, \
                LogFilterFlowRunId

            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            artifacts = client.read_artifacts()
            records = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        names = {t.name for t in tasks}
        assert {"rl/control/seed0", "rl/pmishift/seed0", "data/*", "heldout/*"} <= names, names
        task_ids = {t.name: t.id for t in tasks}
        for label in ("rl/control/seed0", "rl/pmishift/seed0", "sft/control/seed0"):
            progress = [r for r in records if r.message.startswith(f"[{label}] ") and "100%" in r.message]
            assert [r.task_run_id for r in progress] == [task_ids[label]], [(r.task_run_id, r.message) for r in records]
        for line in ("[rl/control/seed0] GRPO steps 6/6", "[sft/pmishift/seed0] train steps 9/9"):
            assert log.read_text().count(line) == 1, log.read_text()  # the worker's line, on the terminal once
        report = [a for a in artifacts if a.flow_run_id == run.id and a.type == "markdown"]
        assert len(report) == 1 and "audit" in report[0].data and "/#/experiments/" in report[0].data, report
    finally:
        _stop_serving(server, proc, log)


def test_nightly_interval_schedule_runs_and_the_next_run_evaluates_nothing_new(server):
    proc, log = _serve(server, "--interval", "3")
    t0 = time.monotonic()
    try:
        deployment = _deployment(server, NIGHTLY, proc, log)
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, \
            FlowRunFilterStartTime
        from prefect.client.schemas.sorting import FlowRunSort

        done: list[Any] = []
        deadline = time.monotonic() + 600
        while len(done) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            with server.client() as client:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
                    sort=FlowRunSort.START_TIME_ASC)
            done = [r for r in runs if r.state.is_final()]
            time.sleep(1)
        first, second = done[:2]
        for run in (first, second):
            assert run.auto_scheduled and run.state.is_completed(), run.state
            print(f"nightly run {run.id} ({run.name}): {run.state.name}, scheduled "
                  f"{run.expected_start_time:%H:%M:%S}, started {run.start_time:%H:%M:%S}, ended "
                  f"{run.end_time:%H:%M:%S} ({run.total_run_time.total_seconds():.1f} s); "
                  f"{time.monotonic() - t0:.0f} s after `twinarm serve --interval 3` started")
        assert second.start_time >= first.end_time  # one nightly at a time
        from infra.lineage import Lineage

        lineage = Lineage(server.home.lineage_db)
        saved = {r["artifact_id"] for r in lineage.rows(  # checkpoints are content-addressed: equal ones count once
            "SELECT artifact_id FROM run_outputs WHERE ablation = 'tiny' AND stage = 'rl' AND role LIKE 'step-%'")}
        finals = {r["artifact_id"] for r in lineage.rows(  # the ablation's own held-out job evaluated these
            "SELECT artifact_id FROM run_outputs WHERE ablation = 'tiny' AND stage = 'rl' AND role = 'final'")}
        new = len(saved - finals)
        first_logs, second_logs = _logs(server, first.id), _logs(server, second.id)
        print("".join(line for line in (first_logs + second_logs).splitlines(keepends=True) if "tiny:" in line))
        assert f"tiny: {len(saved)} checkpoints, {new} evaluated now" in first_logs, first_logs
        assert f"tiny: {len(saved)} checkpoints, 0 evaluated now" in second_logs, second_logs
    finally:
        _stop_serving(server, proc, log)


def test_prefect_deploy_all_with_a_process_worker_runs_both_deployments(server):
    env = {**server.env, "TWINARM_REPO": str(REPO)}
    prefect = str(BIN / "prefect")

    def cli(*args: str) -> str:
        res = subprocess.run([prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout}{res.stderr}"
        return res.stdout

    cli("work-pool", "create", "twinarm", "--type", "process")
    deployed = cli("--no-prompt", "deploy", "--all")
    assert ABLATION in deployed and NIGHTLY in deployed, deployed
    listed = cli("deployment", "ls")
    assert "twinarm-ablation/ablation" in listed and "nightly-heldout" in listed, listed
    worker = spawn([prefect, "worker", "start", "--pool", "twinarm"], env, server.home.root / "worker.log")
    try:
        ids = []
        for name, params in ((ABLATION, ["--param", f"spec_file={server.spec}"]), (NIGHTLY, [])):
            out = cli("deployment", "run", name, *params)  # one after the other: the nightly skips a locked ablation
            ids.append(next(line.split()[-1] for line in out.splitlines() if "UUID" in line))
            run = _wait_final(server, ids[-1], timeout=600)
            assert run.state.is_completed(), f"{run.state}\n{(server.home.root / 'worker.log').read_text()}"
            print(f"{name}: flow run {run.id} {run.state.name} in {run.total_run_time.total_seconds():.1f} s")
        assert re.search(r"\[rl/pmishift/seed0\] (cached|computed)", _logs(server, ids[0]))  # a stage summary line
        assert re.search(r"tiny: \d+ checkpoints, 0 evaluated now", _logs(server, ids[1]))
        listed = cli("flow-run", "ls")
        assert all(i[:8] in listed for i in ids), listed
    finally:
        stop([worker])


def test_flow_runs_left_running_by_a_killed_process_are_marked_crashed(server, tmp_path):
    """What the next run of the ablation does first (flows/orphans.py): the killed attempts' flow runs and their
    task runs still Running become Crashed; a live run of another ablation and the current flow run do not."""
    from prefect import task
    from prefect.states import Running

    from flows.orphans import crash_orphans
    from infra.lineage import Lineage, Run, StageRecord

    @task(name="stage")
    def stage() -> None:
        return None

    lineage = Lineage(tmp_path / "lineage.duckdb")
    lineage.init()
    with server.client() as client:
        deployment = client.read_deployment_by_name(ABLATION)
        runs = {name: client.create_flow_run_from_deployment(deployment.id) for name in ("killed", "other", "now")}
        tasks = {}
        for name, run in runs.items():
            client.set_flow_run_state(run.id, Running(), force=True)
            tasks[name] = client.create_task_run(stage, flow_run_id=run.id, dynamic_key="0", state=Running())
        for name, ablation in (("killed", "orph"), ("other", "elsewhere"), ("now", "orph")):
            lineage.record(StageRecord(run=Run(run_id=f"r-{name}", ablation=ablation, arm="a", stage="sft", seed=0,
                                               config={}, config_hash="h", code_version="c", status="running",
                                               flow_run_id=str(runs[name].id)), inputs=[], outputs=[], facts={}))
        marked = crash_orphans(lineage, "orph", current=str(runs["now"].id))
        flow_states = {name: client.read_flow_run(run.id).state for name, run in runs.items()}
        task_states = {name: client.read_task_run(t.id).state.name for name, t in tasks.items()}
    assert marked == [str(runs["killed"].id)]
    assert {name: s.name for name, s in flow_states.items()} == {"killed": "Crashed", "other": "Running",
                                                                 "now": "Running"}
    assert "next run of ablation 'orph'" in flow_states["killed"].message
    assert task_states == {"killed": "Crashed", "other": "Running", "now": "Crashed"}


# What `twinarm run` does (flows/cli.py): its temporary server, importing prefect while it starts, then a flow whose
# task places a body on Ray, started early. Run as a script, so that Prefect reads the server's PREFECT_API_URL at
# import, as in the CLI; its output is the terminal.
RAY_PLACED = r'''
import json, os, sys
from flows.ui import run_server
from infra.progress import current_run_log, progress, stage_label
from infra.ray_exec import call, start_early
from infra.spec import ExecutorSpec

def body(n):
    with stage_label("rl/ray/seed0"), progress("GRPO steps", n) as bar:
        for _ in range(n):
            bar.advance(acc=0.5)
    return os.getpid()

# prefect is imported while the server starts (it reads PREFECT_API_URL then); Ray starts in the background
with run_server(while_starting=lambda: __import__("prefect")):
    start_early(ExecutorSpec(use_ray=True, cpus_per_arm=1))
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    @task(name="rl/ray/seed0")
    def placed():
        return call(body, 3, executor=ExecutorSpec(use_ray=True, cpus_per_arm=1)), current_run_log()

    @flow
    def ablation():
        return placed(), current_run_log()

    (pid, target), flow_target = ablation()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[target.flow_run_id])))
    print(json.dumps({"api": os.environ["PREFECT_API_URL"], "target": vars(target), "flow": vars(flow_target),
                      "worker_pid": pid, "pid": os.getpid(),
                      "logs": [{"task_run_id": str(r.task_run_id), "message": r.message} for r in logs]}))
'''


def test_progress_of_a_ray_placed_body_reaches_its_task_runs_logs_on_twinarm_runs_server(tmp_path):
    """A Ray worker has no Prefect run context: its progress lines reach the logs of the task run that placed it
    (the flow run's logs, with that task run's id) on the temporary server `twinarm run` starts, and the
    terminal once."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(TWINARM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CI="1")
    res = subprocess.run([sys.executable, "-c", RAY_PLACED], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    target = out["target"]
    assert out["worker_pid"] != out["pid"]  # the body really ran in a Ray worker
    assert target["api_url"] == out["api"] == out["flow"]["api_url"]  # the run's own temporary server
    assert target["flow_run_id"] == out["flow"]["flow_run_id"] and target["task_run_id"]
    line = "[rl/ray/seed0] GRPO steps 3/3  100%"
    in_run = [r for r in out["logs"] if line in r["message"]]
    assert [r["task_run_id"] for r in in_run] == [target["task_run_id"]], out["logs"]
    terminal = res.stdout + res.stderr
    assert terminal.count(line) == 1 + res.stdout.count(line), terminal  # once on the terminal (+ the JSON above)


def test_a_sigkilled_run_does_not_leave_its_temporary_server_running(tmp_path):
    """`twinarm run` killed by SIGKILL cannot stop its temporary Prefect server itself: the server gets SIGTERM from
    the kernel when its parent dies (flows.ui.spawn), so its API stops answering. Before, every SIGKILLed run (the
    SIGKILL-resume test's among them) left one running for good."""
    import os
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(TWINARM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO), CI="1")
    script = ("import os, sys, time\nfrom flows.ui import run_server\nwith run_server():\n"
              "    print(os.environ['PREFECT_API_URL'], flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        api = proc.stdout.readline().strip()
        assert api.startswith("http://127.0.0.1:"), api
        assert urllib.request.urlopen(f"{api}/health", timeout=10).status == 200
    finally:
        proc.kill()
        proc.wait()

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            return True
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while answers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not answers(), f"the temporary server at {api} outlived its SIGKILLed parent"
