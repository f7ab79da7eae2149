"""Benchmark training cost: GRPO step time of the vanilla vs the PMI-shift reward on the same batch, and the demo
ablation's wall time with arms sequential vs parallel on local Ray (plus the cached rerun), with peak memory.

    # step: one arm's SFT model from a completed ablation, K GRPO steps per reward from the same start
    .venv/bin/python scripts/bench_rl.py step [--home .twinarm] [--ablation demo] [--spec configs/demo.yaml]
    # the same, rollouts from the in-process HF engine vs the vLLM engine process (`make setup-vllm`)
    .venv/bin/python scripts/bench_rl.py step --rollout-engines [--arm control]
    # step without an ablation: any SFT model directory and rl_prompts / val parquet files
    .venv/bin/python scripts/bench_rl.py step --init DIR --prompts rl_prompts.parquet --val val.parquet
    # demo: the whole ablation in fresh homes, arms sequential then on Ray, then the cached rerun
    .venv/bin/python scripts/bench_rl.py demo [--spec configs/demo.yaml] [--work /tmp/twinarm-bench]

Step timings are the GRPO loop's own metrics (time/sample_s, grade, score, update), after a one-step warm-up, with
the rewards measured alternately `--repeats` times. Step 1 is the identical batch for both rewards (same start
weights, prompts and sampling seed): its ratio is the cost of the reward itself. Later steps diverge as the
weights do (e.g. response lengths), so the median over steps 1..K-1 is reported too, with the mean response
length beside it (step K also validates, and is left out). Peak memory: the RSS high-water
mark of this process for `step`; for `demo` the largest summed RSS of the whole process tree (driver, Ray, arm
workers, grader processes) sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASES = ("time/sample_s", "time/grade_s", "time/score_s", "time/update_s", "time/weight_sync_s")  # sync: vLLM only


def _artifact_path(lineage, ablation: str, stage: str, arm: str, role: str) -> Path:
    from infra.artifacts import uri_path

    rows = lineage.rows("SELECT a.uri FROM run_outputs o JOIN artifacts a USING (artifact_id) WHERE o.ablation = ? "
                        "AND o.stage = ? AND o.arm = ? AND o.role = ? LIMIT 1", [ablation, stage, arm, role])
    if not rows:
        sys.exit(f"no {stage}/{arm} output '{role}' for ablation '{ablation}' in {lineage.path}: run the ablation "
                 f"first (make demo)")
    return uri_path(rows[0]["uri"])


def bench_step(home: Path, ablation: str, spec_file: str, arm: str | None, steps: int, val_rows: int,
               repeats: int, files: dict[str, Path | None] | None = None, engines: bool = False) -> dict:
    """`files` (init, prompts, val) replace the ablation's artifacts where given. With `engines`, the two variants
    are the rollout engines (rl.rollout_engine hf vs vllm, the arm's own reward) instead of the two rewards."""
    from infra.artifacts import read_parquet
    from infra.spec import load_spec, resolved_arms
    from rl.grpo import train_grpo

    spec = load_spec(spec_file)
    arms = resolved_arms(spec)
    arm = arm or next(a for a, cfg in arms.items() if cfg.rl.reward != "vanilla")
    cfg = arms[arm]
    from worlds.model import set_threads

    set_threads(cfg.executor.compute.cpu_threads)  # as the RL stage does
    paths = dict(files or {})
    if not all(paths.get(k) for k in ("init", "prompts", "val")):
        os.environ["TWINARM_HOME"] = str(home)
        from infra.home import configure_environment
        from infra.lineage import Lineage
        from tasks.common import SHARED

        configure_environment()
        lineage = Lineage(home / "lineage.duckdb")
        paths["init"] = paths.get("init") or _artifact_path(lineage, ablation, "sft", arm, "model")
        for role, key in (("rl_prompts", "prompts"), ("val", "val")):
            paths[key] = paths.get(key) or _artifact_path(lineage, ablation, "data", SHARED, role)
    init = paths["init"]
    prompts = read_parquet(paths["prompts"])
    val = read_parquet(paths["val"])[:val_rows]
    out: dict = {"arm": arm, "init": str(init), "steps": steps, "repeats": repeats,
                 "batch": f"{cfg.rl.batch_size} prompts x {cfg.rl.n} samples, max {cfg.rl.max_response_length} tokens",
                 "rewards": {}}

    def measure(variant: str, n_steps: int) -> dict:
        rl = cfg.rl.model_copy(update={("rollout_engine" if engines else "reward"): variant, "steps": n_steps,
                                       "save_freq": n_steps, "test_freq": n_steps})
        with tempfile.TemporaryDirectory() as tmp:
            result = train_grpo(init, prompts, val, rl, cfg.grader, cfg.executor.compute, cfg.seeds[0], Path(tmp))
        by_step: dict[int, dict[str, float]] = {}
        for key, value, step in result["metrics"]:
            by_step.setdefault(step, {})[key] = value
        return {"by_step": by_step, "scorer_calls": result["facts"]["scorer_calls"]}

    base, treated = ("hf", "vllm") if engines else ("vanilla", cfg.rl.reward)
    measure(base, 1)  # warm-up: first-call costs (allocator, grader worker start) would land on one variant
    runs: dict[str, list[dict]] = {base: [], treated: []}
    for _ in range(repeats):  # alternate, so drift in machine load hits both rewards alike
        for reward in runs:
            runs[reward].append(measure(reward, steps))
    for variant, results in runs.items():
        # step 1 is the identical batch for both rewards: same weights, prompts and sampling seed (for the engines,
        # the same weights and prompts; the samples differ, vLLM's RNG is not HF's)
        step1 = [{p: r["by_step"][1].get(p, 0.0) for p in PHASES} for r in results]
        later = [r["by_step"][s] for r in results for s in range(1, steps)]  # step `steps` also validates
        out["rewards"][variant] = {
            "step1_s": round(min(sum(x.values()) for x in step1), 3),
            "step1_phases_s": {p: round(min(x[p] for x in step1), 3) for p in PHASES},
            "median_step_s": round(statistics.median(sum(m.get(p, 0.0) for p in PHASES) for m in later), 3),
            "response_tokens_mean": round(statistics.mean(m["train/response_length/mean"] for m in later), 1),
            "median_sample_s": round(statistics.median(m["time/sample_s"] for m in later), 3),
            "scorer_calls": results[0]["scorer_calls"]}
    v, t = out["rewards"][base], out["rewards"][treated]
    out["ratio_step1"] = round(t["step1_s"] / v["step1_s"], 3)
    # the reward's own cost on the identical batch: its scoring seconds as a share of the vanilla step (aim ≤ 0.15)
    out["scoring_share_of_vanilla_step1"] = round(t["step1_phases_s"]["time/score_s"] / v["step1_s"], 3)
    out["ratio_median"] = round(t["median_step_s"] / v["median_step_s"], 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _tree_rss_peak(pid: int, stop: threading.Event, peak: list[int]) -> None:
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        peak[0] = max(peak[0], total)
        time.sleep(0.2)


def _timed_run(spec: Path, home: Path) -> dict:
    env = {**os.environ, "TWINARM_HOME": str(home)}  # derived settings follow it (infra.home)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "twinarm"), "run", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_tree_rss_peak, args=(proc.pid, stop, peak), daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"twinarm run {spec} failed (exit {proc.returncode}):\n{output[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_tree_rss_mb": round(peak[0] / 2**20)}


def _stage_seconds(home: Path) -> dict[str, float]:
    from infra.lineage import Lineage

    rows = Lineage(home / "lineage.duckdb").rows(
        "SELECT stage, arm, epoch(ended_at) - epoch(started_at) AS s FROM runs WHERE status = 'completed' "
        "ORDER BY started_at")
    return {f"{r['stage']}/{r['arm']}": round(r["s"], 1) for r in rows}


def bench_demo(spec_file: str, work: Path) -> dict:
    import yaml

    spec = yaml.safe_load(Path(spec_file).read_text())
    out: dict = {"spec": spec_file, "cpus": os.cpu_count()}
    for placement, use_ray in (("sequential", False), ("ray", True)):
        spec["base"]["executor"]["use_ray"] = use_ray
        home = work / placement
        if home.exists():
            sys.exit(f"{home} exists: the demo must start from an empty home; remove it or pass another --work")
        home.mkdir(parents=True)
        path = home / "spec.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        out[placement] = _timed_run(path, home)
        out[placement]["stages_s"] = _stage_seconds(home)
        print(json.dumps({placement: out[placement]}), flush=True)
    out["cached_rerun"] = _timed_run(work / "ray" / "spec.yaml", work / "ray")
    # placement must not change results: every stage output of the two homes, compared by content hash
    outputs = {p: _outputs(work / p) for p in ("sequential", "ray")}
    out["outputs_compared"] = len(outputs["ray"])
    out["outputs_differing"] = sorted(k for k in outputs["ray"].keys() | outputs["sequential"].keys()
                                      if outputs["ray"].get(k) != outputs["sequential"].get(k))
    return out


def _outputs(home: Path) -> dict[str, str]:
    from infra.lineage import Lineage

    return Lineage(home / "lineage.duckdb").output_ids()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    step = sub.add_parser("step", help="GRPO step time, vanilla vs the treatment arm's reward",
                          description="GRPO step time of one arm's SFT model from a completed ablation: K steps "
                                      "per reward (vanilla vs the arm's) from the same start, or with "
                                      "--rollout-engines HF vs vLLM rollouts on the arm's reward")
    step.add_argument("--home", type=Path, default=Path(os.environ.get("TWINARM_HOME", ".twinarm")),
                      help="TWINARM_HOME of the completed ablation (default: $TWINARM_HOME or .twinarm)")
    step.add_argument("--ablation", default="demo", help="its name (default: %(default)s)")
    step.add_argument("--spec", default="configs/demo.yaml", help="its spec (default: %(default)s)")
    step.add_argument("--arm", default=None, help="default: the first arm whose reward is not vanilla")
    step.add_argument("--steps", type=int, default=6, help="GRPO steps K per measurement (default: %(default)s)")
    step.add_argument("--val-rows", type=int, default=16,
                      help="val rows of the step-K validation (default: %(default)s)")
    step.add_argument("--repeats", type=int, default=2, help="measurements per reward, alternating")
    step.add_argument("--init", type=Path, default=None, help="an SFT model directory (instead of the ablation's)")
    step.add_argument("--prompts", type=Path, default=None, help="an rl_prompts parquet (instead of the ablation's)")
    step.add_argument("--val", type=Path, default=None, help="a val parquet (instead of the ablation's)")
    step.add_argument("--rollout-engines", action="store_true",
                      help="compare rl.rollout_engine hf vs vllm (the arm's reward) instead of the two rewards")
    demo = sub.add_parser("demo", help="demo wall time, arms sequential vs on Ray, and the cached rerun",
                          description="the whole ablation in fresh homes: arms sequential, then on local Ray, then "
                                      "the cached rerun; wall time and peak memory of each")
    demo.add_argument("--spec", default="configs/demo.yaml", help="the spec run (default: %(default)s)")
    demo.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "twinarm-bench",
                      help="folder of the fresh homes (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    if args.mode == "step":
        result = bench_step(args.home.resolve(), args.ablation, args.spec, args.arm, args.steps, args.val_rows,
                            args.repeats, {"init": args.init, "prompts": args.prompts, "val": args.val},
                            engines=args.rollout_engines)
    else:
        result = bench_demo(args.spec, args.work.resolve())
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
