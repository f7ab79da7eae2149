"""Ray Jobs round trip against a REAL local Ray head (dashboard on 127.0.0.1, free ports, its own temp dir),
with the real entrypoint: `python -m rl.verl_main --check <overrides>` composes verl's config and validates it.
Submit → read back (idempotent resubmit) → re-attach to a running job → a failed job surfaced as one line.
The head is stopped at the end (its process group only: other Ray instances on the machine are left alone)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from infra.errors import TwinarmError
from infra.spec import load_spec, resolved_arms


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr, low = free_ports(10)
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           # Ray ≥ 2.5x turns token auth on when ~/.ray/auth_token exists; this head answers 127.0.0.1 only
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # in a `ray start`'s environment it keeps the head from starting
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--min-worker-port={low}", f"--max-worker-port={low + 40}",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={tmp}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 240  # a contended box (several test runs at once) starts Ray slowly
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                if list_nodes(address=url):  # the node registers a moment after the Jobs API answers
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Ray head did not start (rc {proc.poll()})")
            time.sleep(1)
        yield url
    finally:  # stop exactly the head we started: its own process group
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def control_overrides(seed: int = 0, extra: list[str] = ()) -> list[str]:
    from rl.verl_config import RunPaths, overrides_for

    spec = load_spec("configs/qwen3-8b.yaml")
    cfg = resolved_arms(spec)["control"]
    cfg.executor.verl.extra_overrides = list(extra)
    return overrides_for(cfg, ablation=spec.name, arm="control", seed=seed,
                         paths=RunPaths("/shared/rl.parquet", "/shared/val.parquet", "/shared/model", "/shared/ckpt"))


def test_ray_jobs_round_trip(ray_head):
    """Two jobs run at once to keep this near a minute: A (valid) and C (a bad key)."""
    from concurrent.futures import ThreadPoolExecutor

    from ray.job_submission import JobSubmissionClient

    from rl.verl_jobs import job_spec, run_job
    from rl.verl_main import CHECK_TAG

    jobs = JobSubmissionClient(ray_head)
    transcript: list[str] = []

    def say(line: str) -> None:
        transcript.append(line)
        print(line)

    lines: list[str] = []
    spec = job_spec(control_overrides(), "a1" * 8, check=True)
    bad = job_spec(control_overrides(extra=["actor_rollout_ref.actor.clip_ratio_hgih=0.3"]), "c3" * 8, check=True)
    with ThreadPoolExecutor(2) as pool:
        # 1. submit: the real entrypoint composes and validates verl's config on the cluster, logs streamed
        first = pool.submit(run_job, spec, ray_head, lines.append, 0.5, 240)
        failing = pool.submit(run_job, bad, ray_head, None, 0.5, 240)
        deadline = time.monotonic() + 60
        while not any(j.submission_id == spec.submission_id for j in jobs.list_jobs()):
            assert time.monotonic() < deadline, "the job was not submitted"
            time.sleep(0.2)
        # 2. the same computation asked for while it runs (a second flow process): re-attached, not resubmitted
        attached = run_job(spec, ray_head, poll_s=0.5, timeout_s=240)
        out = first.result()
        with pytest.raises(TwinarmError) as exc:
            failing.result()
    assert (out.action, out.status, out.submission_id) == ("submitted", "SUCCEEDED", "twinarm-rl-a1a1a1a1a1a1a1a1")
    result = json.loads(next(ln for ln in lines if ln.startswith(CHECK_TAG))[len(CHECK_TAG):])
    assert result["adv_estimator"] == "twinarm_heads" and result["trainer_mode"] == "twinarm_sync"
    assert result["validated"]["reward.reward_manager"] == "TwinarmRewardManager" and result["verl"] == "0.9.1"
    say(f"submit   {out.submission_id}: {out.action}, {out.status}; streamed {len(lines)} log lines, among them "
        f"{CHECK_TAG} {json.dumps(result, sort_keys=True)}")
    assert (attached.action, attached.status) == ("attached", "SUCCEEDED") and CHECK_TAG in attached.logs
    say(f"attach   {attached.submission_id}: {attached.action} while running, then {attached.status}")

    # 3. resubmit once finished: read back, nothing runs again
    n_jobs = len(jobs.list_jobs())
    again = run_job(spec, ray_head)
    assert (again.action, again.status) == ("finished", "SUCCEEDED") and CHECK_TAG in again.logs
    assert len(jobs.list_jobs()) == n_jobs == 2
    say(f"resubmit {again.submission_id}: {again.action} (read back); jobs on the cluster: {n_jobs} → "
        f"{len(jobs.list_jobs())}")

    # 4. the command interrupted while it waits (Ctrl-C): it stops waiting, the job runs on and is re-attached
    from infra.progress import StopRequested

    later = job_spec(control_overrides(seed=1), "b2" * 8, check=True)
    with pytest.raises(StopRequested, match=r"^Ray job twinarm-rl-b2b2b2b2b2b2b2b2: stopped waiting while "
                                            r"(PENDING|RUNNING); it keeps running on the cluster"):
        run_job(later, ray_head, poll_s=0.5, stop=lambda: True)
    resumed = run_job(later, ray_head, poll_s=0.5, timeout_s=240)
    assert resumed.action in ("attached", "finished") and resumed.status == "SUCCEEDED"
    say(f"stop     {later.submission_id}: stopped waiting, job ran on; re-attached → {resumed.status}")

    # 5. the failing job: one clear line naming the bad key, the same when asked again (not resubmitted)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("Ray job twinarm-rl-c3c3c3c3c3c3c3c3 FAILED: error: verl override "
                                              "'actor_rollout_ref.actor.clip_ratio_hgih'")
    with pytest.raises(TwinarmError) as again_exc:
        run_job(bad, ray_head)
    assert str(again_exc.value) == msg and len(jobs.list_jobs()) == 3
    say(f"failure  {msg}")
    assert len(transcript) == 5


def test_unreachable_jobs_api_is_one_line(monkeypatch):
    from rl.verl_jobs import client

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)

    with pytest.raises(TwinarmError, match=r"could not reach the Ray Jobs API at http://127.0.0.1:1"):
        client("127.0.0.1:1")
    with pytest.raises(TwinarmError, match="no Ray Jobs address"):
        client("auto")


def test_doctor_on_a_head_without_gpus(ray_head):
    from rl.verl_doctor import check_gpus, check_ray

    ray_check, url = check_ray(ray_head)
    assert ray_check.ok and url == ray_head
    gpus = check_gpus(url, nnodes=1, per_node=8)
    assert not gpus.ok and re.fullmatch(r"GPUs: verl needs 1 node\(s\) with 8 GPUs each \(executor.verl.nnodes / "
                                        r"n_gpus_per_node\); the cluster has [0-9.]+: 0", gpus.line)
    print(gpus.line)
