"""The RL stage on the verl cluster executor (`executor.kind: verl`): data out, Ray Job, checkpoints back.

`train_verl` is what tasks/rl.py's verl stage body runs for one arm × seed, in the flow process:
1. writes the stage's prompts and val rows in verl's parquet layout under the stage's working directory
   (rl/verl_data.py; their content hashes become facts and the `verl_prompts` / `verl_val` output artifacts);
2. translates the stage's config slice to verl overrides (rl/verl_config.py) with the paths on the shared
   filesystem: the SFT model (`init`), the parquet files, `verl-checkpoints/` for verl's trainer.default_local_dir;
3. runs the Ray Job with the submission id of the stage's compute key (rl/verl_jobs.py: submitted, re-attached
   while it runs, read back once SUCCEEDED; a FAILED/STOPPED job is one TwinarmError line); every log line goes to
   `verl-job.log` in the working directory and to the Prefect task's log;
4. reads verl's saved steps back (`global_step_N/actor`, complete when N ≤ latest_checkpointed_iteration.txt and
   `fsdp_config.json` exists), merges each FSDP shard set to an HF model with verl's own model merger
   (verl.model_merger FSDPModelMerger, the code behind `python -m verl.model_merger merge --backend fsdp`) and
   writes it as the local executor's checkpoint layout, `checkpoints/step-NNNNNNN/model` + `state.json`
   (infra.checkpoints), so sweeps and the held-out job load it unchanged.

The verl trainer itself never runs on CPU (verl has no CPU path); everything above runs on CPU up to the job's
failure (tests/test_verl_run.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from infra.artifacts import atomic_path
from infra.checkpoints import CHECKPOINTS, complete_checkpoints, step_of
from infra.errors import SpecError, TwinarmError
from infra.progress import STOP
from infra.spec import BaseSpec

DATA_DIR = "verl-data"
VERL_CHECKPOINTS = "verl-checkpoints"  # trainer.default_local_dir
JOB_LOG = "verl-job.log"
TRACKER = "latest_checkpointed_iteration.txt"  # verl's trainer writes it after a complete save
STEP_DIR = re.compile(r"^global_step_(\d+)$")
# verl's console logger (verl.utils.logger.aggregate_logger.concat_dict_to_str): "step:3 - actor/lr:1e-06 - ...",
# in a job's log behind Ray's prefix of the actor that printed it: "(TaskRunner pid=123) step:3 - ..."
CONSOLE_STEP = re.compile(r"^(?:\([^)]*\)\s+)?step:(\d+) - (.*)$")


def arm_config(config: dict[str, Any]) -> BaseSpec:
    """The arm config rl.verl_config.translate reads, rebuilt from the verl RL stage's config slice (keys rl,
    grader, tool, executor.compute, executor.verl): every key translate reads is in the slice, so the overrides
    depend on nothing the compute key does not cover."""
    return BaseSpec.model_validate({
        "rl": config["rl"], "grader": config["grader"], "tool": config["tool"],
        "executor": {"kind": "verl", "compute": config["executor.compute"], "verl": config["executor.verl"]}})


def blocked_reason(cfg: BaseSpec) -> str | None:
    """Why this arm cannot run on verl yet, or None: a reward signal the verl reward manager does not run
    (rewards.verl_adapter.VERL_SIGNALS; regeneration signals need a generation engine in the reward loop)."""
    from rewards.verl_adapter import VERL_SIGNALS

    if cfg.rl.reward not in VERL_SIGNALS:
        return (f"rl.reward '{cfg.rl.reward}' is not run by the verl reward manager (it runs "
                f"{', '.join(VERL_SIGNALS)}): it refuses it at start")
    return None


def scorer_note(cfg: BaseSpec) -> str | None:
    """What a user of a scorer signal on verl must know, or None: the frozen-reference scorer runs inside verl's
    reward-loop workers, which verl 0.9.1 starts without GPUs, so the scorer runs on their CPUs."""
    from rewards.signals import get_signal

    if "scorer" in get_signal(cfg.rl.reward).needs:
        return (f"rl.reward '{cfg.rl.reward}': the frozen-reference scorer (the SFT model) runs in verl's "
                f"reward-loop workers, which verl starts without GPUs: on their CPUs, slow for a large model")
    return None


# ablation → the Ray Jobs API address its RL stages submit to: set by the flow's preflight, read by the stage body
# (in the flow process). Placement, so never part of a compute key; not an environment variable, which Ray itself
# reads (RAY_API_SERVER_ADDRESS in the environment of a `ray start` breaks the head's startup).
JOBS_ADDRESS: dict[str, str] = {}


def preflight(spec_file: str, arms: dict[str, BaseSpec], ablation: str | None = None) -> str:
    """Refuse, before any compute, what the verl RL stage could not run: arms on different executors (one contrast
    on two code paths), an arm the translation refuses or that is blocked (blocked_reason), an unreachable Ray Jobs
    API. Returns the Jobs API address (executor.ray_address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS) and records
    it as JOBS_ADDRESS[ablation] when `ablation` is given. Raises SpecError / TwinarmError, one line per problem."""
    from rl.verl_config import RunPaths, translate
    from rl.verl_jobs import client, dashboard_address

    local = sorted(a for a, c in arms.items() if c.executor.kind != "verl")
    if local:
        raise SpecError(f"{spec_file}: arms {', '.join(local)} run on executor.kind 'local' and the others on "
                        f"'verl': every arm of an ablation runs on one executor (two code paths would be a confound)")
    problems = []
    for arm, cfg in arms.items():
        try:
            translate(cfg, ablation="preflight", arm=arm, seed=cfg.seeds[0], paths=RunPaths("-", "-", "-", "-"))
        except SpecError as exc:
            problems.append(str(exc))
        if reason := blocked_reason(cfg):
            problems.append(f"arm '{arm}': {reason}")
    if problems:
        raise SpecError(f"{spec_file}: the verl executor cannot run this spec:\n  " + "\n  ".join(problems))
    addresses = sorted({cfg.executor.ray_address or "" for cfg in arms.values()})
    if len(addresses) > 1:
        raise SpecError(f"{spec_file}: arms name different executor.ray_address {addresses}: one cluster runs them")
    address = dashboard_address(addresses[0] or None)
    client(address)  # one line when the Jobs API does not answer
    if ablation is not None:
        JOBS_ADDRESS[ablation] = address
    return address


def write_data(prompts: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]], workdir: Path
               ) -> dict[str, tuple[Path, str, int]]:
    """The stage's prompts and val rows in verl's layout: {"prompts"|"val": (path, content hash, rows)}."""
    from rl.verl_data import write_verl_parquet

    out = {}
    for role, rows, split in (("prompts", prompts, "train"), ("val", val, "val")):
        path = Path(workdir) / DATA_DIR / f"{role}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        out[role] = (path, write_verl_parquet(rows, path, split, where=f"RL stage input '{role}'"), len(rows))
    return out


def saved_steps(root: Path) -> list[tuple[int, Path]]:
    """verl's complete saved steps under trainer.default_local_dir, oldest first: (step, global_step_N/actor).
    A step is complete when its actor directory has fsdp_config.json and the step is at most the one verl's
    tracker file names (verl writes the tracker after the whole save)."""
    root = Path(root)
    tracker = root / TRACKER
    if not tracker.is_file():
        return []
    latest = int(tracker.read_text().strip())
    steps = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and int(m.group(1)) <= latest and (p / "actor" / "fsdp_config.json").is_file():
            steps.append((int(m.group(1)), p / "actor"))
    return sorted(steps)


def merge_to_hf(actor_dir: Path, target: Path) -> Path:
    """verl's FSDP model merger on one saved step: the shard set `model_world_size_W_rank_R.pt` of actor_dir +
    its `huggingface/` config and tokenizer → an HF model directory at `target` (safetensors, bf16 as verl's merger
    writes, config, tokenizer), written atomically. Raises TwinarmError naming the directory when verl's merger
    cannot read it."""
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    actor_dir = Path(actor_dir)
    with atomic_path(Path(target)) as tmp:
        tmp.mkdir(parents=True)
        config = ModelMergerConfig(operation="merge", backend="fsdp", local_dir=str(actor_dir),
                                   target_dir=str(tmp), hf_model_config_path=str(actor_dir / "huggingface"))
        try:
            merger = FSDPModelMerger(config)
            merger.merge_and_save()
            merger.cleanup()
        except (OSError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            raise TwinarmError(f"verl checkpoint {actor_dir}: verl's model merger could not merge it: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return Path(target)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")


def read_back(verl_dir: Path, out_dir: Path, steps: int, init: Path) -> list[tuple[int, Path]]:
    """Every complete verl step merged to `out_dir/checkpoints/step-NNNNNNN` (model/ + state.json, the local
    executor's layout; a step already merged is kept). The model's tokenizer is the `init` model's, saved as the
    local executor saves it (worlds.tokenizer): RL never changes the vocabulary, and verl's merger re-saves the
    tokenizer through AutoTokenizer, which for a locally trained tokenizer picks a class that cuts offsets
    differently. Returns [(step, checkpoint dir)] oldest first. Raises TwinarmError when verl saved nothing or its
    last saved step is not `steps` (rl.steps)."""
    from worlds.tokenizer import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(Path(init))
    saved = saved_steps(verl_dir)
    if not saved or saved[-1][0] != steps:
        raise TwinarmError(f"verl checkpoints in {verl_dir}: expected the last saved step to be rl.steps {steps}, "
                           f"found steps {[s for s, _ in saved] or 'none'}")
    for step, actor in saved:
        final = Path(out_dir) / CHECKPOINTS / f"step-{step:07d}"
        if (final / "state.json").is_file():
            continue
        with atomic_path(final) as tmp:
            tmp.mkdir(parents=True)
            merge_to_hf(actor, tmp / "model")
            for name in TOKENIZER_FILES:
                (tmp / "model" / name).unlink(missing_ok=True)
            save_tokenizer(tokenizer, tmp / "model")
            (tmp / "state.json").write_text(json.dumps({"step": step, "executor": "verl", "verl_dir": str(actor),
                                                        "merged_by": "verl.model_merger (fsdp)"}, indent=1))
    return [(step_of(p), p) for p in complete_checkpoints(out_dir)]


def console_metrics(lines: Sequence[str]) -> list[tuple[str, float, int]]:
    """(key, value, step) from verl's console logger lines (`step:N - key:value - ...`); non-numbers skipped."""
    out = []
    for line in lines:
        m = CONSOLE_STEP.match(line.strip())
        if not m:
            continue
        for item in m.group(2).split(" - "):
            key, _, value = item.rpartition(":")
            try:
                out.append((key.strip(), float(value), int(m.group(1))))
            except ValueError:
                continue
    return out


def scorer_facts(reward: str, metrics: Sequence[tuple[str, float, int]]) -> dict[str, Any]:
    """scorer_calls / scorer_forwards (the local executor's facts, rl.grpo) from the per-step metrics our trainer
    logs (rewards.verl_adapter.scorer_totals, training rollouts only): their sums over the steps; 0 for a scorer-free
    signal whose job logged none (its reward manager loads no scorer); None (unknown: the audit keeps it open) for a
    scorer signal whose job logged none."""
    from rewards.signals import get_signal
    from rewards.verl_adapter import SCORER_METRICS

    needs = "scorer" in get_signal(reward).needs
    out: dict[str, Any] = {"scorer": "frozen SFT model (reward-loop worker)" if needs else None}
    for fact, metric in zip(("scorer_calls", "scorer_forwards"), SCORER_METRICS.values()):
        values = [v for k, v, _ in metrics if k == metric]
        out[fact] = int(sum(values)) if values else (None if needs else 0)
    return out


def train_verl(init: Path, prompts: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]], config: dict[str, Any],
               *, ablation: str, arm: str, workdir: Path, stage_key: str, mlflow_run_id: str | None = None,
               address: str | None = None, on_log: Callable[[str], None] | None = None,
               poll_s: float = 2.0) -> dict[str, Any]:
    """One arm × seed of GRPO on verl (see the module docstring). `config`: the verl RL stage's slice.

    `address`: the Ray Jobs API; None = JOBS_ADDRESS[ablation] (the flow's preflight), else the environment.
    Returns {checkpoints: [(step, dir)], data: {role: (path, hash, rows)}, metrics, facts, summary}, like
    rl.grpo.train_grpo. Raises TwinarmError (one line) when the job fails or its checkpoints cannot be read back."""
    from rl.verl_config import RunPaths, overrides_for, verl_version
    from rl.verl_jobs import job_spec, run_job

    workdir = Path(workdir)
    cfg = arm_config(config)
    if reason := blocked_reason(cfg):
        raise SpecError(f"arm '{arm}': {reason}")
    seed = config["seed"]
    data = write_data(prompts, val, workdir)
    verl_dir = workdir / VERL_CHECKPOINTS
    paths = RunPaths(train_files=str(data["prompts"][0]), val_files=str(data["val"][0]), model=str(Path(init)),
                     checkpoints=str(verl_dir))
    overrides = overrides_for(cfg, ablation=ablation, arm=arm, seed=seed, paths=paths)
    spec = job_spec(overrides, stage_key, mlflow_run_id=mlflow_run_id,
                    metadata={"ablation": ablation, "arm": arm, "seed": str(seed)})
    log_path = workdir / JOB_LOG
    with log_path.open("a") as log:
        def line(text: str) -> None:
            log.write(text + "\n")
            log.flush()
            if on_log is not None:
                on_log(text)

        line(f"# twinarm: Ray job {spec.submission_id}: {spec.entrypoint_line}")
        outcome = run_job(spec, address or JOBS_ADDRESS.get(ablation), on_log=line, poll_s=poll_s,
                          stop=STOP.is_set)  # Ctrl-C of the command: stop waiting, the job runs on
    checkpoints = read_back(verl_dir, workdir, cfg.rl.steps, Path(init))
    metrics = console_metrics(outcome.logs.splitlines())
    facts = {
        "executor": "verl", "verl": verl_version(), "reward": cfg.rl.reward, **scorer_facts(cfg.rl.reward, metrics),
        "steps": cfg.rl.steps, "save_freq": cfg.rl.save_freq, "test_freq": cfg.rl.test_freq,
        "job": {"submission_id": spec.submission_id, "action": outcome.action, "status": outcome.status},
        "data": {role: {"hash": h, "rows": n} for role, (_, h, n) in data.items()},
        "saved_steps": [s for s, _ in checkpoints], "device": cfg.executor.compute.device,
        "precision": cfg.executor.compute.precision, "rollout": {"name": cfg.executor.verl.rollout_engine},
    }
    summary = {"job": outcome.action, "steps": cfg.rl.steps, "checkpoints": len(checkpoints)}
    return {"checkpoints": checkpoints, "data": data, "metrics": metrics, "facts": facts, "summary": summary}
