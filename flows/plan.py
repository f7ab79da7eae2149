"""`twinarm plan SPEC`: the verl jobs a spec would submit, without submitting anything (dry run).

For each arm × seed: the paths it reads and writes on the shared filesystem (derived from the stage slices that
determine them, so two arms share a file exactly when they share the computation), the verl overrides
(rl.verl_config.translate), the RL stage's compute key and the exact `ray job submit` line (rl.verl_jobs). Then,
per contrast (or per pair of arms when there are none), the verl overrides that differ, each mapped back to the spec
keys behind it, checked against the declared diff of the spec (infra.spec.config_diff): a verl diff that is not
the declared diff means the translation leaks or loses an arm difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

from infra.hashing import hash_json
from infra.spec import AblationSpec, BaseSpec, config_diff, resolved_arms
from rl.verl_config import LABEL_KEYS, SOURCES, RunPaths, render, translate
from rl.verl_jobs import JobSpec, job_spec, submit_line
from rl.verl_run import DATA_DIR, VERL_CHECKPOINTS, blocked_reason, scorer_note
from tasks.rl_verl import STAGE as VERL_STAGE
from tasks.stages import STAGES

DATA_STAGES = ("data",)
MODEL_STAGES = ("data", "base_model", "twins", "sft")  # what the arm's SFT model depends on
PATH_STAGES = {"data.train_files": DATA_STAGES, "data.val_files": DATA_STAGES,
               "actor_rollout_ref.model.path": MODEL_STAGES}


def _slices(cfg: BaseSpec, stages: tuple[str, ...], seed: int) -> dict[str, Any]:
    return {s: STAGES[s].config(cfg, seed) for s in stages}


def run_paths(cfg: BaseSpec, seed: int, root: str) -> tuple[RunPaths, str]:
    """The arm × seed's paths under `root` (TWINARM_HOME as the cluster mounts it) and its RL key, in the flow's
    layout. A plan-time key: the flow's compute key also covers its input artifacts' content hashes, known only
    once the upstream stages ran, so the flow's submission id and directories have this shape, not these values."""
    data_key = hash_json(_slices(cfg, DATA_STAGES, seed), 12)
    model_key = hash_json(_slices(cfg, MODEL_STAGES, seed), 12)
    rl_key = hash_json({"stage": "rl", "config": VERL_STAGE.config(cfg, seed), "model": model_key, "data": data_key})
    work = f"{root}/runs/rl/{rl_key}"  # the flow's layout (rl.verl_run); the flow's key also covers input hashes
    paths = RunPaths(train_files=f"{work}/{DATA_DIR}/prompts.parquet", val_files=f"{work}/{DATA_DIR}/val.parquet",
                     model=f"{root}/runs/sft/{model_key}/model", checkpoints=f"{work}/{VERL_CHECKPOINTS}")
    return paths, rl_key


@dataclass
class ArmPlan:
    arm: str
    seed: int
    overrides: dict[str, Any]
    job: JobSpec
    submit: str
    blocked: str | None  # why this arm cannot run on verl yet (None = nothing known)
    note: str | None = None  # what runs, but not as one would want (the scorer's placement)


def plan_arms(spec: AblationSpec, root: str, address: str) -> list[ArmPlan]:
    out = []
    for arm, cfg in resolved_arms(spec).items():
        for seed in cfg.seeds:
            paths, key = run_paths(cfg, seed, root)
            overrides = translate(cfg, ablation=spec.name, arm=arm, seed=seed, paths=paths)
            job = job_spec(render(overrides, cfg.executor.verl.extra_overrides), key,
                           metadata={"ablation": spec.name, "arm": arm, "seed": str(seed)})
            out.append(ArmPlan(arm, seed, overrides, job, submit_line(job, address), blocked_reason(cfg),
                               scorer_note(cfg)))
    return out


def spec_keys_behind(key: str, a: BaseSpec, b: BaseSpec, seed: int) -> set[str]:
    """The spec keys whose difference between configs a and b makes verl key `key` differ."""
    if key.startswith("+"):
        name = key.split(".", 1)[1]
        return {name} if name != "seed" else {"seeds"}
    if key in PATH_STAGES:
        stages = PATH_STAGES[key]
        diff = config_diff(_slices(a, stages, seed), _slices(b, stages, seed))
        return {k.split(".", 1)[1] for k in diff}
    if key == "trainer.default_local_dir" or key in LABEL_KEYS:
        return set()
    return {SOURCES.get(key, key)}


@dataclass
class ArmDiff:
    a: str
    b: str
    verl: dict[str, tuple[Any, Any]]  # verl key -> (a value, b value), label keys left out
    mapped: set[str]  # spec keys behind the verl diff
    declared: set[str]  # spec keys that differ between the resolved arms

    @property
    def equal(self) -> bool:
        return self.mapped == self.declared


def arm_diffs(spec: AblationSpec, plans: list[ArmPlan]) -> list[ArmDiff]:
    arms = resolved_arms(spec)
    first = {p.arm: p for p in plans if p.seed == arms[p.arm].seeds[0]}
    pairs = [(c.treatment, c.control) for c in spec.contrasts.values()] or list(combinations(arms, 2))
    out = []
    for a, b in pairs:
        pa, pb = first[a], first[b]
        verl = {k: (pa.overrides.get(k), pb.overrides.get(k))
                for k in sorted(set(pa.overrides) | set(pb.overrides))
                if k not in LABEL_KEYS and pa.overrides.get(k) != pb.overrides.get(k)}
        mapped = set().union(*(spec_keys_behind(k, arms[a], arms[b], pa.seed) for k in verl)) if verl else set()
        declared = set(config_diff(arms[a], arms[b]))
        out.append(ArmDiff(a, b, verl, mapped, declared))
    return out


def print_plan(spec_file: str, address: str | None, root: str | None, console: Any) -> int:
    """`twinarm plan`: per arm the submit line and the overrides, then the arm diffs; exit 1 when a verl diff is
    not the declared diff."""
    import json
    import os

    from rich.markup import escape
    from rich.table import Table

    from infra.home import home
    from tasks.stages import load_checked_spec

    spec = load_checked_spec(spec_file)  # `twinarm validate`'s checks: a reward no registry holds is a SpecError
    address = address or spec.base.executor.ray_address or os.environ.get("RAY_ADDRESS") or "http://HEAD:8265"
    if "://" not in address:
        address = "http://HEAD:8265" if address == "auto" else f"http://{address}"
    plans = plan_arms(spec, root or str(home().root), address)
    console.print(f"[bold]plan[/] {spec_file}: ablation {spec.name}, {len(plans)} verl job(s), nothing submitted")
    for p in plans:
        console.print(f"\n[bold]arm {p.arm} seed {p.seed}[/]  job {p.job.submission_id}", highlight=False)
        if p.blocked:
            console.print(f"  [yellow]blocked:[/] {escape(p.blocked)}", highlight=False)
        if p.note:
            console.print(f"  [yellow]note:[/] {escape(p.note)}", highlight=False)
        console.print(escape(p.submit), soft_wrap=True, highlight=False)
        t = Table("verl override", "value", title=f"verl overrides: {p.arm}")
        for k, v in p.overrides.items():
            t.add_row(escape(k), escape(json.dumps(v)))
        console.print(t)
    bad = 0
    for d in arm_diffs(spec, plans):
        t = Table("verl override", d.a, d.b, "spec key", title=f"arm diff {d.a} − {d.b} (labels left out: "
                                                                 f"{', '.join(LABEL_KEYS)})")
        arms = resolved_arms(spec)
        for k, (va, vb) in d.verl.items():
            behind = spec_keys_behind(k, arms[d.a], arms[d.b], arms[d.a].seeds[0])
            t.add_row(escape(k), escape(json.dumps(va)), escape(json.dumps(vb)), escape(", ".join(sorted(behind))))
        console.print(t)
        verdict = "[green]equals the declared diff[/]" if d.equal else "[bold red]differs from the declared diff[/]"
        console.print(f"  spec keys behind the verl diff: {sorted(d.mapped)}; declared diff: {sorted(d.declared)} "
                      f"— {verdict}", highlight=False)
        bad += not d.equal
    return 1 if bad else 0
