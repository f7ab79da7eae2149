"""The verl RL stage on CPU (rl/verl_run.py, tasks/rl_verl.py, the flow's verl branch).

- checkpoints back: verl's own FSDPCheckpointManager saves a 2-rank FSDP2 shard set of a tiny Qwen2 model on CPU
  (gloo), verl's own model merger merges it, and the result is registered in the local executor's layout and loads
  with the loaders the held-out job uses;
- the flow with executor.kind verl against a REAL local Ray head: every stage before RL runs, the RL stage writes
  verl's parquet files, submits the real entrypoint as a Ray Job with the stage's submission id, streams its log,
  and the job's failure on this GPU-less box is one line; the stage is recorded failed, its marker is not written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from infra.errors import SpecError, TwinarmError
from conftest import REPO, tiny_spec_dict
from test_verl_jobs import free_ports, ray_head  # noqa: F401  (the real local Ray head fixture)

SAVE = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from pathlib import Path
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from worlds.model import load_model
    from worlds.tokenizer import load_tokenizer
    sft, root = Path(sys.argv[1]), Path(sys.argv[2])
    model = load_model(sft)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    manager = FSDPCheckpointManager(model, processing_class=load_tokenizer(sft),
                                    checkpoint_config={"save_contents": ["model"], "load_contents": ["model"]})
    manager.save_checkpoint(str(root / "global_step_2" / "actor"), global_step=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # "training": step 4's weights differ from step 2's
    manager.save_checkpoint(str(root / "global_step_4" / "actor"), global_step=4)
    dist.barrier()
    if dist.get_rank() == 0:  # what verl's trainer writes after each complete save (trainer_base._save_checkpoint)
        (root / "latest_checkpointed_iteration.txt").write_text("4")
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def verl_checkpoints(tmp_path_factory, one_torch_thread):
    """(sft model dir, verl trainer.default_local_dir) with steps 2 and 4 saved by verl's checkpoint manager on 2
    gloo ranks, and a half-written step 6 (one rank's shard, no fsdp_config.json, beyond the tracker)."""
    from infra.spec import ToyModelSpec
    from meta.grammar import META_CLOSE, META_OPEN
    from worlds.model import save_model, toy_model
    from worlds.tokenizer import save_tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("verl-ckpt")
    texts = [f"{a}+{b}={a + b} {META_OPEN}check {a}{META_CLOSE}" for a in range(30) for b in range(5)]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    model = toy_model(ToyModelSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
                      tokenizer, seed=0)
    sft = tmp / "sft"
    save_model(model, sft)
    save_tokenizer(tokenizer, sft)
    root = tmp / "verl-checkpoints"
    port = free_ports(1)[0]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", SAVE, str(sft), str(root)], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    half = root / "global_step_6" / "actor"
    half.mkdir(parents=True)
    (half / "model_world_size_2_rank_0.pt").write_bytes(b"partial")
    return sft, root


def test_verl_fsdp_checkpoints_merge_and_register_like_the_local_executors(verl_checkpoints, tmp_path):
    import torch

    from rl.verl_run import read_back, saved_steps
    from worlds.model import load_model
    from worlds.tokenizer import load_tokenizer

    sft, root = verl_checkpoints
    actor = root / "global_step_2" / "actor"
    assert sorted(p.name for p in actor.iterdir()) == ["fsdp_config.json", "huggingface",
                                                      "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    assert json.loads((actor / "fsdp_config.json").read_text())["world_size"] == 2
    assert [s for s, _ in saved_steps(root)] == [2, 4]  # step 6: incomplete, beyond the tracker

    out = tmp_path / "stage"
    ckpts = read_back(root, out, steps=4, init=sft)
    assert [(s, p.name) for s, p in ckpts] == [(2, "step-0000002"), (4, "step-0000004")]
    assert json.loads((ckpts[1][1] / "state.json").read_text())["executor"] == "verl"

    original = load_model(sft).state_dict()
    tokenizer = load_tokenizer(sft)
    for (step, path), shift in zip(ckpts, (0.0, 0.5)):
        merged = load_model(path / "model").state_dict()  # the held-out job's loaders (evals/engines.py)
        assert merged.keys() == original.keys()
        for key, value in original.items():  # verl's merger writes bf16
            assert torch.equal(merged[key], (value + shift).to(torch.bfloat16).float()), (step, key)
        reloaded = load_tokenizer(path / "model")
        assert type(reloaded) is type(tokenizer) and len(reloaded) == len(tokenizer)
        text = "12+7=19 <meta>check 12</meta>"
        assert reloaded(text, return_offsets_mapping=True)["offset_mapping"] == \
            tokenizer(text, return_offsets_mapping=True)["offset_mapping"]

    # a second read-back keeps what was merged (the flow re-reading a finished job)
    mtime = (ckpts[0][1] / "model" / "model.safetensors").stat().st_mtime_ns
    assert read_back(root, out, steps=4, init=sft) == ckpts
    assert (ckpts[0][1] / "model" / "model.safetensors").stat().st_mtime_ns == mtime

    with pytest.raises(TwinarmError, match=r"expected the last saved step to be rl.steps 6, found steps \[2, 4\]"):
        read_back(root, tmp_path / "other", steps=6, init=sft)


def test_a_shard_set_verls_merger_cannot_read_is_one_line(verl_checkpoints, tmp_path):
    import shutil

    from rl.verl_run import merge_to_hf

    _, root = verl_checkpoints
    broken = tmp_path / "actor"
    shutil.copytree(root / "global_step_2" / "actor", broken)
    (broken / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(TwinarmError) as exc:
        merge_to_hf(broken, tmp_path / "merged")
    assert str(exc.value).startswith(f"verl checkpoint {broken}: verl's model merger could not merge it: ")
    assert "\n" not in str(exc.value) and not (tmp_path / "merged").exists()


def test_console_metrics_and_scorer_facts_from_verls_console_lines():
    from verl.utils.logger.aggregate_logger import concat_dict_to_str

    from rl.verl_run import console_metrics, scorer_facts

    step1 = concat_dict_to_str({"actor/lr": 1e-06, "twinarm/scorer_calls": 12.0, "twinarm/scorer_forwards": 3.0,
                                "note": "text"}, step=1)
    step2 = concat_dict_to_str({"actor/lr": 2e-06, "twinarm/scorer_calls": 8.0, "twinarm/scorer_forwards": 2.0},
                               step=2)
    lines = [f"(TaskRunner pid=4242) {step1}", step2, "Training Progress: 50%", "step: not metrics"]
    metrics = console_metrics(lines)
    assert metrics == [("actor/lr", 1e-06, 1), ("twinarm/scorer_calls", 12.0, 1), ("twinarm/scorer_forwards", 3.0, 1),
                       ("actor/lr", 2e-06, 2), ("twinarm/scorer_calls", 8.0, 2), ("twinarm/scorer_forwards", 2.0, 2)]
    assert scorer_facts("pmishift", metrics) == {"scorer": "frozen SFT model (reward-loop worker)",
                                                 "scorer_calls": 20, "scorer_forwards": 5}
    # nothing logged: a scorer-free signal loads no scorer (0); a scorer signal's count is unknown (None), not 0
    assert scorer_facts("vanilla", []) == {"scorer": None, "scorer_calls": 0, "scorer_forwards": 0}
    assert scorer_facts("pmishift", [])["scorer_calls"] is None


def verl_tiny_spec(tmp_path: Path, address: str, arms: dict | None = None) -> Path:
    spec = tiny_spec_dict("tinyverl")
    spec["base"]["executor"] = {"kind": "verl", "compute": {"device": "auto"}, "use_ray": False,
                                "ray_address": address,
                                "verl": {"nnodes": 1, "n_gpus_per_node": 1, "rollout_engine": "vllm"}}
    spec["arms"] = arms or {"control": {"overrides": {"sft.strip_meta": True, "rl.reward": "vanilla"}}}
    spec["contrasts"] = {}
    path = tmp_path / "tinyverl.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_preflight_refuses_what_the_verl_stage_cannot_run(tmp_path, monkeypatch):
    from infra.spec import resolved_arms
    from rl.verl_run import preflight
    from tasks.stages import load_checked_spec

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    both = {"control": {"overrides": {"sft.strip_meta": True, "rl.reward": "vanilla"}},
            "cf": {"overrides": {"rl.reward": "cf"}}}
    arms = resolved_arms(load_checked_spec(verl_tiny_spec(tmp_path, "http://127.0.0.1:1", both)))
    with pytest.raises(SpecError) as exc:
        preflight("s.yaml", arms)
    assert str(exc.value) == ("s.yaml: the verl executor cannot run this spec:\n  arm 'cf': rl.reward 'cf' is not "
                              "run by the verl reward manager (it runs vanilla, pmishift, pmi, gm): it refuses it at "
                              "start")
    mixed = dict(arms)
    mixed["cf"] = arms["control"].model_copy(update={"executor": arms["control"].executor.model_copy(
        update={"kind": "local", "verl": type(arms["control"].executor.verl)()})})
    with pytest.raises(SpecError, match=r"arms cf run on executor.kind 'local' and the others on 'verl'"):
        preflight("s.yaml", mixed)
    cpu = {"control": arms["control"].model_copy(update={"executor": arms["control"].executor.model_copy(
        update={"compute": arms["control"].executor.compute.model_copy(update={"device": "cpu"})})})}
    with pytest.raises(SpecError, match=r"arm 'control': executor.compute.device 'cpu': verl has no CPU training"):
        preflight("s.yaml", cpu)
    control = {"control": arms["control"]}
    with pytest.raises(TwinarmError, match=r"^could not reach the Ray Jobs API at http://127.0.0.1:1: "):
        preflight("s.yaml", control)
    control["control"] = control["control"].model_copy(update={"executor": control["control"].executor.model_copy(
        update={"ray_address": "auto"})})
    with pytest.raises(TwinarmError, match="no Ray Jobs address"):
        preflight("s.yaml", control)


def test_flow_on_verl_submits_the_rl_stage_and_surfaces_the_jobs_failure_in_one_line(ray_head, flow_home, tmp_path):
    from flows.ablation import ablation
    from infra.lineage import Lineage
    from ray.job_submission import JobSubmissionClient

    from rl.verl_jobs import submission_id
    from rl.verl_run import DATA_DIR, JOB_LOG

    from rl.verl_run import JOBS_ADDRESS

    spec_file = verl_tiny_spec(tmp_path, ray_head)
    env_before = {k: v for k, v in os.environ.items() if k.startswith("RAY")}
    with pytest.raises(TwinarmError) as exc:
        ablation(spec_file=str(spec_file))
    msg = str(exc.value)
    print(msg)
    # the Jobs address reaches the stage through the preflight's record, not the environment (Ray reads that)
    assert JOBS_ADDRESS["tinyverl"] == ray_head
    assert {k: v for k, v in os.environ.items() if k.startswith("RAY")} == env_before
    lineage = Lineage(flow_home.lineage_db)
    runs = lineage.rows("SELECT stage, arm, status, config_json FROM runs WHERE ablation = 'tinyverl' ORDER BY stage")
    status = {r["stage"]: r["status"] for r in runs}
    assert status == {"base_model": "completed", "data": "completed", "resolve": "completed", "sft": "completed",
                      "twins": "completed", "rl": "failed"}
    # the RL stage's compute key names its job and working directory (the session's home holds other tests' RL
    # runs too: this one is the only one that wrote a verl job log)
    work, = [d for d in (flow_home.root / "runs" / "rl").iterdir() if (d / JOB_LOG).is_file()]
    sid = submission_id(work.name)
    assert "\n" not in msg and msg.startswith(f"Ray job {sid} FAILED: ") and msg.endswith(
        f"(full logs: ray job logs {sid}; once the cause is fixed, ray job delete {sid} and run again: verl resumes "
        f"from its last checkpoint)")
    job = JobSubmissionClient(ray_head).get_job_info(sid)
    assert job.status == "FAILED" and job.metadata == {"ablation": "tinyverl", "arm": "control", "seed": "0"}
    assert not (work / "stage-output.json").exists()  # not done: the next flow run reads the failure back
    log = (work / JOB_LOG).read_text()
    assert log.startswith(f"# twinarm: Ray job {sid}: python -m rl.verl_main ")
    assert "trainer.v1.trainer_mode=twinarm_sync" in log and len(log.splitlines()) > 1  # the job's own lines too
    import pyarrow.parquet as pq

    rows = pq.read_table(work / DATA_DIR / "prompts.parquet").to_pylist()
    assert rows[0]["reward_model"]["style"] == "rule" and rows[0]["prompt"][0]["role"] == "user"
    # the job's overrides name the SFT model, data and checkpoint directory of this stage
    config = json.loads(next(r for r in runs if r["stage"] == "rl")["config_json"])
    assert set(config) == {"rl", "grader", "executor.compute", "executor.verl", "seed", "tool"}
    assert f"data.train_files={work / DATA_DIR / 'prompts.parquet'}" in log
    assert f"trainer.default_local_dir={work / 'verl-checkpoints'}" in log


def test_stage_body_after_a_succeeded_job_registers_verls_checkpoints(verl_checkpoints, home, monkeypatch):
    """The RL stage body's success path, with a STAND-IN for the Ray Job (verl cannot train on CPU): the stand-in
    checks what the body submits, puts verl's real checkpoint set (saved by verl's FSDPCheckpointManager above) where
    the overrides tell verl to save, and returns verl's console lines made by verl's own formatter. Everything else —
    data out, read-back, verl's merger, registration, facts — is the body's real code; the held-out job's engine
    loads the registered `final`."""
    import shutil

    from verl.utils.logger.aggregate_logger import concat_dict_to_str

    import rl.verl_jobs
    from evals.engines import make_engine
    from evals.suites import PROMPT_ROW_SCHEMA
    from infra.artifacts import ArtifactStore, uri_path, write_parquet
    from infra.hashing import hash_file
    from infra.spec import BaseSpec
    from rl.verl_jobs import JobOutcome, submission_id
    from rl.verl_run import DATA_DIR, VERL_CHECKPOINTS
    from tasks.common import StageCall
    from tasks.rl_verl import STAGE
    from worlds.tokenizer import load_tokenizer

    sft, verl_saved = verl_checkpoints
    rows = [{"id": f"r{i}", "prompt": f"{i}+1=?", "answer": str(i + 1), "domain": "add", "level": None,
             "source": "arith", "suite": "rl"} for i in range(6)]
    store = ArtifactStore(home.artifacts)
    inputs = {"init": store.describe(sft, kind="checkpoint")}
    for role in ("prompts", "val"):
        path = home.root / f"{role}.parquet"
        write_parquet(rows, path, schema=PROMPT_ROW_SCHEMA)
        inputs[role] = store.describe(path, kind="dataset")
    cfg = BaseSpec.model_validate({"executor": {"kind": "verl", "compute": {"device": "auto"}},
                                   "rl": {"reward": "vanilla", "steps": 4, "save_freq": 2, "test_freq": 2}})
    call = StageCall(home=str(home.root), ablation="abl", arm="control", seed=0, stage="rl",
                     config=STAGE.config(cfg, 0), inputs=inputs, code=STAGE.code(), mlflow_run_id=None)
    submitted = []

    def stand_in(spec, address, on_log=None, poll_s=0.5, timeout_s=None, stop=None):
        overrides = dict(o.split("=", 1) for o in spec.entrypoint[3:])
        submitted.append((spec, overrides))
        shutil.copytree(verl_saved, overrides["trainer.default_local_dir"])
        logs = "\n".join(f"(TaskRunner pid=7) {concat_dict_to_str(m, step=s)}" for s, m in
                         ((1, {"actor/lr": 1e-6, "twinarm/scorer_calls": 0.0, "twinarm/scorer_forwards": 0.0}),
                          (4, {"actor/lr": 5e-7, "twinarm/scorer_calls": 0.0, "twinarm/scorer_forwards": 0.0})))
        for line in logs.splitlines():
            on_log(line)
        return JobOutcome(spec.submission_id, "submitted", "SUCCEEDED", logs)

    monkeypatch.setattr(rl.verl_jobs, "run_job", stand_in)
    out = STAGE.body(call)

    (spec, overrides), = submitted
    assert spec.submission_id == submission_id(call.key)
    assert overrides["actor_rollout_ref.model.path"] == str(sft)
    assert overrides["trainer.default_local_dir"] == str(call.workdir / VERL_CHECKPOINTS)
    assert sorted(out.outputs) == ["final", "step-0000002", "step-0000004", "verl_prompts", "verl_val"]
    assert out.outputs["final"] == out.outputs["step-0000004"] and out.outputs["final"].facets == {"step": 4}
    prompts = call.workdir / DATA_DIR / "prompts.parquet"
    assert out.outputs["verl_prompts"].artifact_id == hash_file(prompts) == out.facts["data"]["prompts"]["hash"]
    assert out.facts["job"] == {"submission_id": spec.submission_id, "action": "submitted", "status": "SUCCEEDED"}
    assert (out.facts["scorer_calls"], out.facts["scorer_forwards"], out.facts["saved_steps"]) == (0, 0, [2, 4])
    assert ("actor/lr", 5e-7, 4) in out.metrics
    log = (call.workdir / "verl-job.log").read_text().splitlines()
    assert log[0].startswith(f"# twinarm: Ray job {spec.submission_id}: python -m rl.verl_main ") and len(log) == 3
    final = uri_path(out.outputs["final"].uri)
    assert final == call.workdir / "checkpoints" / "step-0000004" / "model"
    engine = make_engine("hf", final, "cpu", "fp32")  # what the held-out stage builds for a checkpoint
    assert engine.tokenizer("12+7=19")["input_ids"] == load_tokenizer(sft)("12+7=19")["input_ids"]
