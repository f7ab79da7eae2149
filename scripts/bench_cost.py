"""Cost growth on the demo's model, so a user can predict a run: GRPO step time against batch size (prompts × n)
and against response length, and held-out time against suite size, each with a fitted line.

    .venv/bin/python scripts/bench_cost.py [--home .twinarm] [--ablation demo] [--spec configs/demo.yaml]
        [--arm control] [--out docs/cost-growth.png]

Needs a completed ablation (`make demo`): the arm's SFT model is the policy (as RL starts from it), its final RL
checkpoint is the held-out model, and the data stage's rl_prompts / val / held-out suite are the inputs.

- GRPO step: `rl.grpo.train_grpo` for 4 steps at each grid point (validation only at step 4, on 8 val rows),
  after one warm-up run. Per point: the CPU seconds of this process between the ends of steps 1→2 and 2→3, and
  the loop's own wall time of steps 1–3 (time/sample_s + grade + score + update, as `scripts/bench_rl.py step`),
  each the smallest over `--repeats` runs. Batch grid: prompts × n at the spec's max response length; length
  grid: `rl.max_response_length` caps at the spec's batch, plotted against the measured mean response tokens.
  Threads: executor.compute.cpu_threads (the RL stage's) unless --threads. The arm's own reward (vanilla for
  control; PMI-shift adds its scoring, `bench_rl.py step`).
- Held-out: `evals.evaluate.evaluate_model` of one checkpoint on the first k problems of the suite under the
  spec's held-out protocol (eval.n samples each, eval.max_new_tokens), engine load included, at the held-out
  stage's thread count (shared_cpu_threads, else cpu_threads) unless --threads; CPU and wall seconds, smallest
  of `--repeats`. The demo's job is 4 checkpoints × 270 problems.

On one thread the figure plots CPU seconds: what the work costs on an idle core, little moved by other jobs on a
shared machine (wall time there is an upper bound that scatters; both are in the JSON). With more threads it
plots wall seconds. Each panel gets a least-squares line y = a + b·x (numpy.polyfit), written into the figure
and, with every point, into the JSON beside the PNG (`--out` with .json). Rerun it on the machine you want to
predict.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASES = ("time/sample_s", "time/grade_s", "time/score_s", "time/update_s")


def grpo_point(init: Path, prompts: list, val: list, cfg, prompts_per_step: int, n: int, max_len: int,
               repeats: int) -> dict:
    """Seconds of one GRPO step at this batch and length cap: `cpu_s`, this process's CPU time between the ends
    of steps 1→2 and 2→3 of a 4-step run (validation only at step 4), and `step_s`, the loop's own wall time of
    steps 1–3 (sample + grade + score + update); the smallest over `repeats` runs. Also the mean response tokens."""
    from rl.grpo import train_grpo

    rl = cfg.rl.model_copy(update={"batch_size": prompts_per_step, "n": n, "max_response_length": max_len,
                                   "mini_batch_size": min(cfg.rl.mini_batch_size, prompts_per_step),
                                   "steps": 4, "save_freq": 4, "test_freq": 4})
    steps, cpu = [], []
    for _ in range(repeats):
        ends: dict[int, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            result = train_grpo(init, prompts, val, rl, cfg.grader, cfg.executor.compute, cfg.seeds[0], Path(tmp),
                                on_step=lambda step, values: ends.setdefault(step, time.process_time()))
        by_step: dict[int, dict[str, float]] = {}
        for key, value, step in result["metrics"]:
            by_step.setdefault(step, {})[key] = value
        steps += [by_step[s] for s in (1, 2, 3)]
        cpu += [ends[s] - ends[s - 1] for s in (2, 3)]
    return {"prompts": prompts_per_step, "n": n, "samples": prompts_per_step * n, "max_response_length": max_len,
            "cpu_s": round(min(cpu), 3), "step_s": round(min(sum(m[p] for p in PHASES) for m in steps), 3),
            "response_tokens_mean": round(statistics.mean(m["train/response_length/mean"] for m in steps), 1)}


def heldout_point(model_dir: Path, suite: list, k: int, cfg, repeats: int) -> dict:
    """Seconds to evaluate one checkpoint on the first k suite problems under the spec's held-out protocol
    (the fastest of `repeats`)."""
    from evals.evaluate import evaluate_model, heldout_protocol
    from rewards.grader import get_grader
    from worlds.model import resolve_device, resolve_precision

    grader = get_grader(cfg.grader)
    protocol = heldout_protocol(cfg.eval, grader, {"arith": f"first-{k}"})
    device = resolve_device(cfg.executor.compute)
    seconds, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        rows, _ = evaluate_model(model_dir, {"arith": suite[:k]}, protocol, grader, device,
                                 resolve_precision(cfg.executor.compute, device))
        seconds.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"problems": k, "samples": len(rows), "seconds": round(min(seconds), 3), "cpu_s": round(min(cpu), 3)}


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = a + b·x (numpy.polyfit, degree 1)."""
    import numpy as np

    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return {"a": round(float(a), 4), "b": round(float(b), 6)}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    clock = "CPU s" if result["clock"] == "cpu" else "s"
    panels = [("batch", "samples", result["y"]["batch"], "GRPO step vs batch size",
               "samples per step (prompts × n)", f"{clock} per step", "sample"),
              ("length", "response_tokens_mean", result["y"]["length"], "GRPO step vs response length",
               "mean response tokens", f"{clock} per step", "token"),
              ("heldout", "samples", result["y"]["heldout"], "held-out vs suite size", "samples (problems × n)",
               f"{clock} per checkpoint", "sample")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, x, y, title, xlabel, ylabel, unit) in zip(axes, panels):
        pts = result[name]["points"]
        xs, ys = [p[x] for p in pts], [p[y] for p in pts]
        f = result[name]["fit"]
        line = np.linspace(0, max(xs) * 1.1, 50)
        ax.plot(xs, ys, "o", color="C0")
        ax.plot(line, f["a"] + f["b"] * line, "-", color="C1",
                label=f"fit: {f['a']:.2f} s + {f['b'] * 1000:.1f} ms per {unit}")
        for p, xv, yv in zip(pts, xs, ys):
            label = {"batch": lambda p: f"{p['prompts']}×{p['n']}",
                     "length": lambda p: f"cap {p['max_response_length']}",
                     "heldout": lambda p: f"{p['problems']}×{p['samples'] // p['problems']}"}[name](p)
            ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, None), ylim=(0, None))
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(result["caption"], fontsize=8.5, y=0.02, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=REPO / ".twinarm", help="TWINARM_HOME of a completed ablation "
                                                                          "(default: %(default)s)")
    ap.add_argument("--ablation", default="demo", help="its name (default: %(default)s)")
    ap.add_argument("--spec", default=str(REPO / "configs" / "demo.yaml"), help="its spec (default: configs/demo.yaml)")
    ap.add_argument("--arm", default="control", help="the arm measured (default: %(default)s)")
    ap.add_argument("--batches", default="4x8,8x8,16x8,16x16", help="prompts x n per step")
    ap.add_argument("--lengths", default="12,24,36,160", help="rl.max_response_length values (the demo's "
                    "model stops by itself at ~38 tokens)")
    ap.add_argument("--suite-sizes", default="34,68,135,270", help="held-out problems per point")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "cost-growth.png",
                    help="the figure; the points go to the same name with .json (default: docs/cost-growth.png)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per point; the fastest is kept")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every point (default: the spec's, per stage as the demo runs them)")
    ap.add_argument("--note", default="", help="appended to the caption (e.g. how busy the machine was)")
    args = ap.parse_args()

    os.environ["TWINARM_HOME"] = str(args.home)
    from infra.artifacts import read_parquet
    from infra.home import configure_environment
    from infra.lineage import Lineage
    from infra.spec import load_spec, resolve_arm, stage_compute
    from bench_rl import _artifact_path  # scripts/ is this script's sys.path[0]
    from tasks.common import SHARED
    from worlds.model import set_threads

    configure_environment()
    cfg = resolve_arm(load_spec(args.spec), args.arm)
    lineage = Lineage(args.home / "lineage.duckdb")
    init = _artifact_path(lineage, args.ablation, "sft", args.arm, "model")
    final = _artifact_path(lineage, args.ablation, "rl", args.arm, "final")
    prompts = read_parquet(_artifact_path(lineage, args.ablation, "data", SHARED, "rl_prompts"))
    val = read_parquet(_artifact_path(lineage, args.ablation, "data", SHARED, "val"))[:8]
    suite = read_parquet(_artifact_path(lineage, args.ablation, "data", SHARED, f"heldout:{cfg.eval.heldout}"))
    compute = cfg.executor.compute.model_dump()
    rl_threads = args.threads or stage_compute(compute, shared=False)["cpu_threads"]
    heldout_threads = args.threads or stage_compute(compute, shared=True)["cpu_threads"]

    set_threads(rl_threads)
    grpo_point(init, prompts, val, cfg, 4, 4, 32, 1)  # warm-up: first-call costs (grader workers, allocator)
    batch = []
    for item in args.batches.split(","):
        p, n = (int(v) for v in item.split("x"))
        batch.append(grpo_point(init, prompts, val, cfg, p, n, cfg.rl.max_response_length, args.repeats))
        print(json.dumps({"batch": batch[-1]}), flush=True)
    length = []
    for cap in (int(v) for v in args.lengths.split(",")):
        length.append(grpo_point(init, prompts, val, cfg, cfg.rl.batch_size, cfg.rl.n, cap, args.repeats))
        print(json.dumps({"length": length[-1]}), flush=True)
    set_threads(heldout_threads)
    heldout = []
    for k in (int(v) for v in args.suite_sizes.split(",")):
        heldout.append(heldout_point(final, suite, min(k, len(suite)), cfg, args.repeats))
        print(json.dumps({"heldout": heldout[-1]}), flush=True)

    load = os.getloadavg()
    # one thread: CPU time is what the work costs on an idle core, little moved by other jobs; more: wall time
    clock = "cpu" if max(rl_threads, heldout_threads) == 1 else "wall"
    y = ({"batch": "cpu_s", "length": "cpu_s", "heldout": "cpu_s"} if clock == "cpu"
         else {"batch": "step_s", "length": "step_s", "heldout": "seconds"})
    result = {"clock": clock, "y": y,
        "spec": args.spec, "arm": args.arm, "reward": cfg.rl.reward, "cpus": os.cpu_count(),
        "rl_threads": rl_threads, "heldout_threads": heldout_threads, "loadavg_at_end": [round(v, 2) for v in load],
        "batch": {"points": batch, "fit": fit([p["samples"] for p in batch], [p[y["batch"]] for p in batch])},
        "length": {"points": length, "fit": fit([p["response_tokens_mean"] for p in length],
                                                [p[y["length"]] for p in length])},
        "heldout": {"points": heldout, "fit": fit([p["samples"] for p in heldout],
                                                  [p[y["heldout"]] for p in heldout])},
    }
    measure = ("this process's CPU seconds on 1 thread (≈ wall time on an idle core; grading workers not counted)"
               if clock == "cpu" else "wall seconds")
    result["caption"] = (
        f"{Path(args.spec).name}, {args.arm} arm ({cfg.rl.reward} reward): {measure}, smallest of {args.repeats} "
        f"run(s) per point. GRPO on {rl_threads} thread(s): batch panel at ≤{cfg.rl.max_response_length} tokens, "
        f"length panel at {cfg.rl.batch_size}×{cfg.rl.n} under length caps (the model stops by itself at "
        f"~{max(p['response_tokens_mean'] for p in length):.0f} tokens). Held-out: one checkpoint, "
        f"{heldout_threads} thread(s), {cfg.eval.n} samples per problem, engine load included. {os.cpu_count()} "
        f"CPUs, load average {load[0]:.1f} at the end. {args.note}").strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k]["fit"] for k in ("batch", "length", "heldout")}))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
