"""Benchmark MASA-efficient against GRPO on the arith world (issue 15's measurements).

    # run: GRPO and MASA-efficient from the same SFT checkpoint (its SFT data holds the meta-prediction
    # demonstrations, sft.meta_predictions), per seed, into --out (a finished run is kept and skipped)
    .venv/bin/python scripts/bench_masa.py run --init DIR --prompts rl.parquet --val val.parquet --out DIR
    .venv/bin/python scripts/bench_masa.py run --home .twinarm --out DIR   # the SFT/data outputs of a masa run
    # analyse: the numbers below from --out, printed and written to <out>/bench_masa.json
    .venv/bin/python scripts/bench_masa.py analyse --out DIR

Arms are configs/masa.yaml's `grpo` and `masa_efficient` (--spec, --control, --treatment), with the bench's sizes
applied to both (--steps, --batch-size, --mini-batch-size, --start-step, --audit-prompts, --buffer-size,
--test-freq, --val-rows, --val-n, --val-temperature; the defaults fit a shared 2-core box: 30 steps of 16 prompts
× 8, the spec's lr 2e-5, validation on all 216 val rows, 2 samples each at the rollouts' temperature 0.7, so that
the control's val accuracy moves by more than its noise). Seeds vary the RL run only (prompt order, sampling);
every run starts from the one SFT checkpoint.

Printed:
- per step, pooled over seeds: precision and F1 of gating against the truly zero-variance
  prompts and of the early cutoff against the truly incorrect rollouts (decisions scored on the audit prompts,
  sampled again at full length and not trained on; steps ≤ k: shadow decisions on every prompt), the share of
  prompts gated and the generation budget saved (masa/token_budget_saved); pooled after k (audit prompts) and
  pooled on steps ≤ k (shadow decisions on every prompt: more prompts, same decision rule);
- tokens generated per step (solution + meta rollouts, audit rollouts apart) against the control's;
- time-to-baseline (flagged degenerate when the control's final val accuracy is no better than its start): the
  control's val accuracy (mean correctness of --val-n samples per val row at --val-temperature; 0 = greedy) at
  its final step is the baseline; per
  seed, the treatment's first validated step at or above it; speedup in steps = control steps / treatment steps,
  in wall time = control's summed step seconds / treatment's summed step seconds up to that step, audit seconds
  (measurement, not method) taken out. Mean over the seeds that reach it, with a 95 % Student-t interval across
  seeds (on the log ratio), next to the paper's 1.28× (arXiv 2510.03259, MASA-efficient vs GRPO).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAPER_SPEEDUP = 1.28  # arXiv 2510.03259: MASA-efficient reaches GRPO's final accuracy 1.28x faster (training time)
VAL_KEY = "val/accuracy/pure"


def bench_rl(spec_file: str, arm: str, a: argparse.Namespace):
    """The arm's resolved RLSpec with the bench's sizes (MASA keys only where the arm has MASA on), and its config.
    Raises SpecError naming the arm and the option for an arm the spec lacks or sizes the RL spec refuses."""
    from pydantic import ValidationError

    from infra.errors import SpecError
    from infra.spec import RLSpec, load_spec, resolved_arms

    arms = resolved_arms(load_spec(spec_file))
    if arm not in arms:
        raise SpecError(f"arm '{arm}' (--control / --treatment) is not in {spec_file} (arms: {', '.join(arms)})")
    cfg = arms[arm]
    d = cfg.rl.model_dump()
    d.update(steps=a.steps, batch_size=a.batch_size, mini_batch_size=a.mini_batch_size, test_freq=a.test_freq,
             save_freq=a.steps, val_n=a.val_n, val_temperature=a.val_temperature)
    if d["masa"]["enable"] and d["masa"]["efficient"]["start_step"]:
        d["masa"]["efficient"].update(start_step=a.start_step, audit_prompts=a.audit_prompts)
    if d["masa"]["expert"]["enable"]:
        d["masa"]["expert"]["buffer_size"] = a.buffer_size
    try:
        return RLSpec(**d), cfg
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            key = ".".join(map(str, e["loc"]))
            option = OPTIONS.get(str(e["loc"][-1])) if e["loc"] else None
            problems.append(f"rl{'.' + key if key else ''}{f' ({option})' if option else ''}: "
                            f"{e['msg'].removeprefix('Value error, ')}")
        raise SpecError(f"arm '{arm}' with this bench's options: " + "; ".join(problems)) from None


# the RL spec keys this bench sets from its options (a refused value names the option)
OPTIONS = {"steps": "--steps", "save_freq": "--steps", "batch_size": "--batch-size",
           "mini_batch_size": "--mini-batch-size", "test_freq": "--test-freq", "start_step": "--start-step",
           "audit_prompts": "--audit-prompts", "buffer_size": "--buffer-size", "val_n": "--val-n",
           "val_temperature": "--val-temperature"}


def run(a: argparse.Namespace) -> None:
    from infra.artifacts import read_parquet
    from rl.grpo import train_grpo
    from worlds.model import set_threads

    rls = {arm: bench_rl(a.spec, arm, a) for arm in (a.control, a.treatment)}  # both checked before any run
    init, prompts_path, val_path = a.init, a.prompts, a.val
    if not (init and prompts_path and val_path):
        import os

        from bench_rl import _artifact_path  # scripts/ is on sys.path when this script runs

        os.environ["TWINARM_HOME"] = str(a.home)
        from infra.home import configure_environment
        from infra.lineage import Lineage
        from tasks.common import SHARED

        configure_environment()
        lineage = Lineage(Path(a.home) / "lineage.duckdb")
        init = init or _artifact_path(lineage, a.ablation, "sft", a.control, "model")
        prompts_path = prompts_path or _artifact_path(lineage, a.ablation, "data", SHARED, "rl_prompts")
        val_path = val_path or _artifact_path(lineage, a.ablation, "data", SHARED, "val")
    prompts, val = read_parquet(prompts_path), read_parquet(val_path)
    val = val[:a.val_rows]  # the world's val rows cycle through the domains, so a prefix covers them all
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for arm in (a.control, a.treatment):
            done = out / f"{arm}-seed{seed}.json"
            if done.exists():
                print(f"{done.name}: done, kept")
                continue
            rl, cfg = rls[arm]
            set_threads(cfg.executor.compute.cpu_threads)
            t0 = time.time()
            res = train_grpo(Path(init), prompts, val, rl, cfg.grader, cfg.executor.compute, seed,
                             out / f"{arm}-seed{seed}")
            done.write_text(json.dumps({"arm": arm, "seed": seed, "init": str(init), "wall_s": time.time() - t0,
                                        "rl": rl.model_dump(), "metrics": res["metrics"],
                                        "masa": res["facts"].get("masa")}, default=str))
            print(f"{done.name}: {time.time() - t0:.0f} s")


def _by_step(metrics: list) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for key, value, step in metrics:
        out.setdefault(step, {})[key] = value
    return out


def _tokens(run_dir: Path, kind: str) -> dict[int, int]:
    from infra.artifacts import read_parquet

    return {int(p.stem.split("-")[1]): sum(r["n_tokens"] for r in read_parquet(p))
            for p in sorted((run_dir / kind).glob("step-*.parquet"))}


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95 % Student-t interval of the mean of log(values), exponentiated (a ratio's geometric-mean interval)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    logs = [math.log(v) for v in values]
    m, s = statistics.fmean(logs), statistics.stdev(logs)
    h = t.ppf(0.975, len(logs) - 1) * s / math.sqrt(len(logs))
    return math.exp(m - h), math.exp(m + h)


def time_to_baseline(control: dict[int, dict[str, float]], treatment: dict[int, dict[str, float]]
                     ) -> dict[str, float | None]:
    """One seed: the baseline (control's final val accuracy), the treatment's first validated step reaching it,
    and the speedups in steps and in wall seconds (see the module docstring); None where it is never reached.
    degenerate: the baseline is no better than the SFT checkpoint's val accuracy (step 0), so reaching it says
    nothing about learning faster."""
    k_c = max(s for s in control if VAL_KEY in control[s])
    base = control[k_c][VAL_KEY]
    t_c = sum(control[s]["time/step_s"] for s in control if 1 <= s <= k_c)
    hit = next((s for s in sorted(treatment) if s >= 1 and VAL_KEY in treatment[s] and treatment[s][VAL_KEY] >= base),
               None)  # step 0 is the SFT checkpoint's val, before any training
    start = control.get(0, {}).get(VAL_KEY)
    out = {"baseline": base, "start": start, "degenerate": start is not None and base <= start,
           "control_steps": k_c, "control_s": t_c,
           "treatment_step": hit, "treatment_final": treatment[max(treatment)].get(VAL_KEY), "speedup_steps": None,
           "speedup_wall": None}
    if hit is not None:
        t_t = sum(treatment[s]["time/step_s"] - treatment[s].get("time/masa_audit_s", 0.0)
                  for s in treatment if 1 <= s <= hit)
        out.update(treatment_s=t_t, speedup_steps=k_c / hit, speedup_wall=t_c / t_t)
    return out


def analyse(a: argparse.Namespace) -> dict:
    from rl.masa import precision_f1

    out = Path(a.out)
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*.json"))]
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({s for arm, s in by if (a.control, s) in by and (a.treatment, s) in by})
    if not seeds:
        sys.exit(f"{out}: no seed with both {a.control} and {a.treatment} finished; run `run` first")
    treat = {s: _by_step(by[(a.treatment, s)]["metrics"]) for s in seeds}
    ctrl = {s: _by_step(by[(a.control, s)]["metrics"]) for s in seeds}
    rl = by[(a.treatment, seeds[0])]["rl"]
    k, b, n = rl["masa"]["efficient"]["start_step"], rl["batch_size"], rl["n"]
    steps = sorted(set.intersection(*(set(treat[s]) for s in seeds)) - {0})
    per_step = []
    for step in steps:
        c = {key: sum(treat[s][step].get(f"masa/{key}", 0.0) for s in seeds)
             for key in ("gate/tp", "gate/fp", "gate/fn", "gate/tn", "cutoff/tp", "cutoff/fp", "cutoff/fn",
                         "cutoff/tn", "gated_prompts", "token_budget_saved", "malformed", "meta_rollouts")}
        gp, gf = precision_f1(c["gate/tp"], c["gate/fp"], c["gate/fn"])
        cp, cf = precision_f1(c["cutoff/tp"], c["cutoff/fp"], c["cutoff/fn"])
        tok_t = [sum(_tokens(out / f"{a.treatment}-seed{s}", kind).get(step, 0) for kind in ("rollouts",
                                                                                         "meta_rollouts"))
                 for s in seeds]
        tok_c = [_tokens(out / f"{a.control}-seed{s}", "rollouts").get(step, 0) for s in seeds]
        per_step.append({
            "step": step, "after_k": step > k, "gate_precision": gp, "gate_f1": gf, "cutoff_precision": cp,
            "cutoff_f1": cf, "gate_counts": [c[f"gate/{x}"] for x in ("tp", "fp", "fn", "tn")],
            "cutoff_counts": [c[f"cutoff/{x}"] for x in ("tp", "fp", "fn", "tn")],
            "share_gated": c["gated_prompts"] / (b * len(seeds)),
            "budget_saved_tokens": c["token_budget_saved"] / len(seeds),
            "malformed_rate": c["malformed"] / c["meta_rollouts"] if c["meta_rollouts"] else math.nan,
            "tokens_treatment": statistics.fmean(tok_t), "tokens_control": statistics.fmean(tok_c),
            "audit_tokens": statistics.fmean(treat[s][step].get("masa/audit_tokens", 0.0) for s in seeds),
            # calibration: the mean predicted pass rate (fraction) against the share of solution rollouts right
            "pred_pass": _nanmean(treat[s][step].get("masa/pred_pass_rate/mean", math.nan) for s in seeds),
            "train_accuracy": _nanmean(treat[s][step].get("train/accuracy/pure", math.nan) for s in seeds)})
    after = [p for p in per_step if p["after_k"]]
    before = [p for p in per_step if not p["after_k"]]

    def pooled(points: list[dict]) -> dict[str, dict]:
        tot = {d: [sum(p[f"{d}_counts"][i] for p in points) for i in range(4)] for d in ("gate", "cutoff")}
        return {d: dict(zip(("precision", "f1"), precision_f1(tot[d][0], tot[d][1], tot[d][2])),
                        counts=dict(zip(("tp", "fp", "fn", "tn"), tot[d]))) for d in tot}
    ttb = {s: time_to_baseline(ctrl[s], treat[s]) for s in seeds}
    reached = [s for s in seeds if ttb[s]["speedup_steps"] is not None]
    summary = {"seeds": seeds, "k": k, "batch": f"{b} prompts x {n}", "steps": max(steps),
               "after_k": pooled(after), "shadow_to_k": pooled(before),
               "share_gated_after_k": statistics.fmean(p["share_gated"] for p in after) if after else None,
               "budget_saved_tokens_per_step_after_k": statistics.fmean(p["budget_saved_tokens"] for p in after)
               if after else None,
               "tokens_per_step_after_k": {"treatment": statistics.fmean(p["tokens_treatment"] for p in after),
                                           "control": statistics.fmean(p["tokens_control"] for p in after)}
               if after else None,
               "time_to_baseline": ttb, "reached": f"{len(reached)}/{len(seeds)}"}
    for unit in ("steps", "wall"):
        vals = [ttb[s][f"speedup_{unit}"] for s in reached]
        ci = t_interval(vals)
        summary[f"speedup_{unit}"] = {"mean": statistics.fmean(vals) if vals else None,
                                      "geomean": math.exp(statistics.fmean(map(math.log, vals))) if vals else None,
                                      "ci95": ci, "paper": PAPER_SPEEDUP}
    result = {"per_step": per_step, "summary": summary}
    (out / "bench_masa.json").write_text(json.dumps(result, indent=1, default=str))
    _print(result, a)
    return result


def _nanmean(values) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _print(result: dict, a: argparse.Namespace) -> None:
    s = result["summary"]
    print(f"{a.treatment} vs {a.control}: seeds {s['seeds']}, {s['batch']}, {s['steps']} steps, k = {s['k']}")
    print("step  k<  gate P/F1 [tp fp fn tn]         cutoff P/F1 [tp fp fn tn]          gated  budget_saved  "
          "tokens t/c       malformed  pred/acc")
    for p in result["per_step"]:
        g, c = p["gate_counts"], p["cutoff_counts"]
        print(f"{p['step']:>4}  {'>' if p['after_k'] else ' '}   {_f(p['gate_precision'])}/{_f(p['gate_f1'])} "
              f"[{' '.join(str(int(x)) for x in g):<11}]  {_f(p['cutoff_precision'])}/{_f(p['cutoff_f1'])} "
              f"[{' '.join(str(int(x)) for x in c):<15}]  {p['share_gated']:.2f}  {p['budget_saved_tokens']:>10.0f}  "
              f"{p['tokens_treatment']:>6.0f}/{p['tokens_control']:<6.0f}  {_f(p['malformed_rate'])}       "
              f"{_f(p['pred_pass'])}/{_f(p['train_accuracy'])}")
    for when, label in (("after_k", "after k (audit prompts)"), ("shadow_to_k", "steps ≤ k (shadow, every prompt)")):
        for d, v in s[when].items():
            print(f"{label}, pooled: {d} precision {_f(v['precision'])}, F1 {_f(v['f1'])}, counts {v['counts']}")
    print(f"share gated after k {_f(s['share_gated_after_k'])}; generation budget saved per step after k "
          f"{_f(s['budget_saved_tokens_per_step_after_k'], '.0f')} tokens; tokens generated per step after k "
          f"{json.dumps(s['tokens_per_step_after_k'])}")
    for seed, t in s["time_to_baseline"].items():
        print(f"seed {seed}: start {_f(t['start'], '.3f')}, baseline {t['baseline']:.3f} ({a.control} step "
              f"{t['control_steps']}, "
              f"{t['control_s']:.0f} s); {a.treatment} reaches it at step {t['treatment_step']} "
              f"(final {_f(t['treatment_final'], '.3f')}); speedup steps {_f(t['speedup_steps'])}, "
              f"wall {_f(t['speedup_wall'])}"
              + ("  [degenerate: the control never beat its SFT checkpoint, so any first validation reaches the "
                 "baseline]" if t["degenerate"] else ""))
    for unit in ("steps", "wall"):
        v = s[f"speedup_{unit}"]
        ci = v["ci95"]
        print(f"time-to-baseline speedup ({unit}): mean {_f(v['mean'])}, geomean {_f(v['geomean'])}, 95 % CI "
              f"{'[' + _f(ci[0]) + ', ' + _f(ci[1]) + ']' if ci else '–'} over {s['reached']} seeds that reach "
              f"it; paper {PAPER_SPEEDUP}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=("run", "analyse"), help="run the arms then analyse, or analyse only")
    p.add_argument("--out", required=True, help="directory of the runs and bench_masa.json")
    p.add_argument("--spec", default=str(REPO / "configs" / "masa.yaml"), help="the ablation spec of the two arms")
    p.add_argument("--control", default="grpo", help="the control arm (its final val accuracy is the baseline)")
    p.add_argument("--treatment", default="masa_efficient", help="the MASA-efficient arm")
    p.add_argument("--home", default=".twinarm", help="run: a home with a finished masa ablation (SFT, data)")
    p.add_argument("--ablation", default="masa", help="run: the ablation name in --home")
    p.add_argument("--init", help="run: an SFT checkpoint directory (instead of --home's)")
    p.add_argument("--prompts", help="run: RL prompts parquet (instead of --home's)")
    p.add_argument("--val", help="run: val parquet (instead of --home's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds (each runs both arms)")
    p.add_argument("--steps", type=int, default=30, help="RL steps of each run")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    p.add_argument("--mini-batch-size", type=int, default=8, help="prompts per PPO mini-batch")
    p.add_argument("--start-step", type=int, default=10, help="k: gating and cutoff act after it")
    p.add_argument("--audit-prompts", type=int, default=2, help="prompts per step re-solved in full after k")
    p.add_argument("--buffer-size", type=int, default=32, help="expert SFT buffer size")
    p.add_argument("--test-freq", type=int, default=5, help="validate every this many steps")
    p.add_argument("--val-rows", type=int, default=216, help="val problems (spread over the domains)")
    p.add_argument("--val-n", type=int, default=2, help="val samples per problem")
    p.add_argument("--val-temperature", type=float, default=0.7, help="val sampling temperature (0 = greedy)")
    a = p.parse_args()
    from infra.errors import TwinarmError

    try:
        if a.command == "run":
            run(a)
        analyse(a)
    except TwinarmError as exc:  # a bad option, spec or home: its message, not a traceback
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
