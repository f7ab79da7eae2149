"""A demo-shaped lineage built in seconds for audit tests: the real demo spec, content-hashed files, stage runs
recorded the way the flow records them (stage slices of the resolved arm configs), no training. Optionally with
evaluation rows (sweep and held-out result tables) whose accuracies the caller chooses."""
from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from infra.artifacts import Artifact, ArtifactStore, write_parquet
from infra.lineage import Lineage, Run, StageRecord
from infra.spec import load_spec, resolved_arms
from tasks.stages import STAGES
from sft.twins import twin_side

ARMS = ["control", "pmishift"]
FLOW = "flow-1"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
# (arm, seed, step, suite, problem index, sample) -> correct; None: no result tables
Outcome = Callable[[str, int, int, str, int, int], bool]
REPO = Path(__file__).resolve().parent.parent
ARMS = ["control", "pmishift"]
FLOW = "flow-1"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Builder:
    """Records stage runs the way the flow does: stage slices of the resolved arm configs as run configs."""

    def __init__(self, root: Path, seeds: list[int], eval_overrides: dict[str, Any] | None = None,
                 spec_file: Path = REPO / "configs" / "demo.yaml"):
        self.root = root
        self.spec_path = root / "spec.yaml"
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec_file, self.spec_path)
        self.spec = load_spec(self.spec_path)
        self.spec.base.seeds = seeds
        self.spec.base.eval = self.spec.base.eval.model_copy(update=eval_overrides or {})
        self.arms = resolved_arms(self.spec)
        self.store = ArtifactStore(root / "artifacts")
        self.lineage = Lineage(root / "lineage.duckdb")
        self.lineage.init()
        self.clock = 0

    def dataset(self, name: str, rows: list[dict[str, Any]]) -> Artifact:
        path = self.root / "files" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(rows, path)
        return self.store.put(path, kind="dataset", rows=len(rows))

    def model(self, name: str, content: str) -> Artifact:
        folder = self.root / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.bin").write_text(content)
        (folder / "tokenizer.json").write_text('{"vocab": "bytes"}')
        return self.store.describe(folder, kind="checkpoint")

    def table(self, name: str, rows: list[dict[str, Any]]) -> Artifact:
        path = self.root / "tables" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(rows, path)
        return self.store.describe(path, kind="table", rows=len(rows))

    def record(self, stage: str, arm: str, seed: int | None, config: dict[str, Any],
               inputs: dict[str, Artifact], outputs: dict[str, Artifact], run_id: str | None = None,
               facts: dict[str, Any] | None = None) -> str:
        self.clock += 1
        rid = run_id or f"{stage}-{arm}-{seed}"
        run = Run(run_id=rid, ablation="demo", arm=arm, stage=stage, seed=seed, config=config, config_hash="h",
                  code_version="code-1", status="completed", started_at=T0 + timedelta(minutes=self.clock),
                  ended_at=T0 + timedelta(minutes=self.clock), flow_run_id=FLOW)
        self.lineage.record(StageRecord(run, inputs=sorted(((a, r) for r, a in inputs.items()), key=lambda x: x[1]),
                                        outputs=sorted(((a, r) for r, a in outputs.items()), key=lambda x: x[1]),
                                        facts={"stage": STAGES[stage].declaration(), **(facts or {})}))
        return rid

    def config(self, arm: str, stage: str, seed: int | None = None) -> dict[str, Any]:
        return STAGES[stage].config(self.arms[arm], seed)


def twin_rows(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    meta, nometa = [], []
    for i in range(n):
        user = {"role": "user", "content": f"compute {i}+1"}
        meta.append({"id": f"sft1-{i}", "domain": "arith", "messages": [
            user, {"role": "assistant", "content": f"{i}+1 <|meta|>check<|/meta|> \\boxed{{{i + 1}}}"}]})
        nometa.append({"id": f"sft1-{i}", "domain": "arith", "messages": [
            user, {"role": "assistant", "content": f"{i}+1  \\boxed{{{i + 1}}}"}]})
    return meta, nometa


def result_rows(outcome: Outcome, arm: str, seed: int, step: int, suites: dict[str, int], samples: int,
                domains: int = 1) -> list[dict[str, Any]]:
    """Evaluation rows (evals.evaluate's columns) of one checkpoint: every problem of every suite x samples."""
    return [{"arm": arm, "seed": seed, "step": step, "suite": suite, "problem_id": f"{suite}-{i:03d}",
             "domain": f"{suite}-d{i % domains}", "sample": j, "correct": bool(outcome(arm, seed, step, suite, i, j)),
             "length": 10, "n_blocks": int(arm != "control" and j == 0), "categories": [], "confidence": None}
            for suite, n in suites.items() for i in range(n) for j in range(samples)]


def build(root: Path, seeds: list[int] = [0], outcome: Outcome | None = None,
          heldout: dict[str, int] | None = None, samples: int = 4, eval_overrides: dict[str, Any] | None = None,
          stuck: str | None = None, spec_file: Path = REPO / "configs" / "demo.yaml") -> Builder:
    """resolve → data → base_model → twins → sft per arm × seed → rl per arm × seed → sweep → held-out (one job).
    With an outcome, the sweep (steps 3, 6; 12 val problems in 3 domains) and the held-out job (steps 0, 6; the
    suites in `heldout`, default arith: 40 problems) write result tables of `samples` samples per problem.
    eval_overrides change base.eval before the arms are resolved (as the flow's resolve runs record them). The
    `stuck` arm's RL never changes its weights: every saved step is one artifact (one run, several output roles).
    `spec_file` (default the demo's) gives the arms (every arm of the spec runs) and the contrasts."""
    heldout = heldout or {"arith": 40}
    b = Builder(root, seeds, eval_overrides, spec_file)
    arms = list(b.spec.arms)
    spec_art = b.store.put(b.spec_path, kind="spec")
    for arm in arms:
        b.record("resolve", arm, None, b.arms[arm].model_dump(mode="json"), {"spec": spec_art}, {})
    prompts = b.dataset("rl_prompts", [{"id": f"rl-{i}", "prompt": f"compute {i}*2", "gold": str(2 * i)}
                                       for i in range(12)])
    val = b.dataset("val", [{"id": f"val-{i}", "prompt": f"compute {i}-1", "gold": str(i - 1)} for i in range(6)])
    suite = b.dataset("heldout-arith", [{"id": f"h-{i}", "prompt": f"compute {i}*3", "gold": str(3 * i)}
                                        for i in range(6)])
    sft1 = b.dataset("sft1", twin_rows(8)[0])
    b.record("data", "*", None, b.config("control", "data"), {},
             {"rl_prompts": prompts, "val": val, "heldout:arith": suite, "sft1": sft1})
    base = b.model("base", "base weights")
    b.record("base_model", "*", None, b.config("control", "base_model"), {"sft1": sft1, "val": val}, {"model": base})
    meta, nometa = twin_rows(8)
    twins = {"sft1_meta": b.dataset("sft1_meta", meta), "sft1_nometa": b.dataset("sft1_nometa", nometa)}
    b.record("twins", "*", None, b.config("control", "twins"), {"base_model": base, "sft1": sft1}, twins)
    finals = {}
    for arm in arms:
        for seed in seeds:
            side = twin_side(b.arms[arm].sft.strip_meta)
            sft = b.model(f"sft-{arm}-{seed}", f"sft {arm} {seed}")
            b.record("sft", arm, seed, b.config(arm, "sft", seed), {"init": base, "sft1": twins[f"sft1_{side}"]},
                     {"model": sft})
            steps = {step: b.model(f"rl-{arm}-{seed}-{step}", f"rl {arm} {seed} {'-' if arm == stuck else step}")
                     for step in (3, 6)}
            b.record("rl", arm, seed, b.config(arm, "rl", seed), {"init": sft, "prompts": prompts, "val": val},
                     {**{f"step-{s:07d}": m for s, m in steps.items()}, "final": steps[6]})
            sweep_out = {}
            if outcome is not None:
                sweep_out["sweep"] = b.table(f"sweep-{arm}-{seed}", [
                    r for step in steps for r in result_rows(outcome, arm, seed, step, {"val": 12}, samples, 3)])
            b.record("sweep", arm, seed, b.config(arm, "sweep", seed),
                     {"val": val, **{f"checkpoint:{arm}:{seed}:{s}": m for s, m in steps.items()}}, sweep_out)
            finals[f"checkpoint:{arm}:{seed}:0"] = sft
            finals[f"checkpoint:{arm}:{seed}:6"] = steps[6]
    heldout_out, facts = {}, {}
    if outcome is not None:
        heldout_out["heldout"] = b.table("heldout", [r for arm in arms for seed in seeds for step in (0, 6)
                                                      for r in result_rows(outcome, arm, seed, step, heldout, samples)])
        facts = {"protocol": {"n": dict.fromkeys(heldout, samples)}}
    b.record("heldout", "*", None, b.config("control", "heldout"), {"heldout:arith": suite, **finals}, heldout_out,
             facts=facts)
    return b


