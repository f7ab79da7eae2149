"""scripts/bench_masa.py's time-to-baseline and interval arithmetic on hand-built step metrics."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_masa", Path(__file__).resolve().parent.parent / "scripts" /
                                               "bench_masa.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
V = bench.VAL_KEY

# the control validates 0.5 → 0.6 → 0.7 at steps 0, 2, 4, 10 s a step: baseline 0.7 after 40 s
CONTROL = {0: {V: 0.5}, 1: {"time/step_s": 10}, 2: {"time/step_s": 10, V: 0.6}, 3: {"time/step_s": 10},
           4: {"time/step_s": 10, V: 0.7}}


def test_time_to_baseline_counts_steps_and_seconds_without_the_audit():
    treatment = {0: {V: 0.7}, 1: {"time/step_s": 20, "time/masa_audit_s": 5},  # step 0 is the SFT model: not counted
                 2: {"time/step_s": 20, "time/masa_audit_s": 5, V: 0.7}, 3: {"time/step_s": 20},
                 4: {"time/step_s": 20, V: 0.8}}
    t = bench.time_to_baseline(CONTROL, treatment)
    assert (t["baseline"], t["start"], t["control_steps"], t["control_s"], t["treatment_step"]) == (0.7, 0.5, 4, 40, 2)
    assert t["treatment_s"] == 30  # (20 - 5) × 2
    assert t["speedup_steps"] == 2 and t["speedup_wall"] == pytest.approx(40 / 30)
    assert t["treatment_final"] == 0.8 and t["degenerate"] is False
    worse = {**CONTROL, 4: {"time/step_s": 10, V: 0.5}}  # the control ends where it started
    assert bench.time_to_baseline(worse, treatment)["degenerate"] is True


def test_time_to_baseline_not_reached_is_none():
    treatment = {0: {V: 0.5}, 2: {"time/step_s": 5, V: 0.6}, 4: {"time/step_s": 5, V: 0.69}}
    t = bench.time_to_baseline(CONTROL, treatment)
    assert t["treatment_step"] is None and t["speedup_steps"] is None and t["speedup_wall"] is None


def test_t_interval_of_log_ratios():
    assert bench.t_interval([1.5]) is None
    assert bench.t_interval([2.0, 2.0]) == pytest.approx((2.0, 2.0))
    lo, hi = bench.t_interval([1.0, math.e])  # logs 0, 1: mean 0.5, sd 1/√2, t(0.975, 1) = 12.706
    h = 12.7062 * (1 / math.sqrt(2)) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((math.exp(0.5 - h), math.exp(0.5 + h)), rel=1e-4)


def _options(**kw):
    import argparse

    base = dict(spec=str(Path(__file__).resolve().parent.parent / "configs" / "masa.yaml"), control="grpo",
                treatment="masa_efficient", out="unused", home="unused", ablation="masa", init="missing-init",
                prompts="missing.parquet", val="missing.parquet", seeds=[0], steps=12, batch_size=8,
                mini_batch_size=4, start_step=4, audit_prompts=4, buffer_size=16, test_freq=2, val_rows=36,
                val_n=2, val_temperature=0.7)
    return argparse.Namespace(**{**base, **kw})


def test_bench_options_the_rl_spec_refuses_are_spec_errors_naming_the_option():
    from infra.errors import SpecError

    rl, _ = bench.bench_rl(_options().spec, "masa_efficient", _options())
    assert (rl.steps, rl.batch_size, rl.masa.efficient.start_step, rl.masa.expert.buffer_size) == (12, 8, 4, 16)
    assert (rl.val_n, rl.val_temperature) == (2, 0.7)  # both arms validate the same way, as the bench says
    control, _ = bench.bench_rl(_options().spec, "grpo", _options(val_n=3, val_temperature=0.0))
    assert (control.val_n, control.val_temperature, control.masa.enable) == (3, 0.0, False)
    with pytest.raises(SpecError, match=r"rl.val_n \(--val-n\): Input should be greater than or equal to 1"):
        bench.bench_rl(_options().spec, "grpo", _options(val_n=0))
    with pytest.raises(SpecError, match=r"arm 'grpo' with this bench's options: rl.steps \(--steps\): Input should "
                                        r"be greater than or equal to 1"):
        bench.bench_rl(_options().spec, "grpo", _options(steps=0))
    with pytest.raises(SpecError, match=r"arm 'nope' \(--control / --treatment\) is not in .*masa.yaml \(arms: grpo, "):
        bench.bench_rl(_options().spec, "nope", _options())


def test_bench_run_checks_both_arms_before_it_reads_or_trains_anything():
    # was: the control arm trained for a seed, then the treatment's RLSpec raised a pydantic traceback
    from infra.errors import SpecError

    with pytest.raises(SpecError, match=r"arm 'masa_efficient' with this bench's options: rl: "
                                        r"masa.efficient.start_step 99: .*steps is 5"):
        bench.run(_options(start_step=99, steps=5))  # the missing init and parquet files are never reached


def test_analyse_pools_gating_and_cutoff_after_k_and_in_shadow(tmp_path, capsys):
    """Two seeds, k = 1: step 1's shadow decisions and step 2's audit decisions are pooled apart, with precision and
    F1 from the pooled counts; the calibration column is the mean predicted pass rate against train accuracy."""
    import json

    def run(arm, seed, per_step):
        metrics = [[key, value, step] for step, d in per_step.items() for key, value in d.items()]
        (tmp_path / f"{arm}-seed{seed}.json").write_text(json.dumps(
            {"arm": arm, "seed": seed, "rl": {"batch_size": 4, "n": 8, "masa": {"efficient": {"start_step": 1}}},
             "metrics": metrics}))

    def masa(gate, cutoff, pred, acc):
        return {**{f"masa/gate/{c}": v for c, v in zip(("tp", "fp", "fn", "tn"), gate)},
                **{f"masa/cutoff/{c}": v for c, v in zip(("tp", "fp", "fn", "tn"), cutoff)},
                "masa/gated_prompts": gate[0] + gate[1], "masa/pred_pass_rate/mean": pred,
                "train/accuracy/pure": acc, "time/step_s": 1.0}

    for seed in (0, 1):
        run("grpo", seed, {0: {V: 0.3}, 1: {"time/step_s": 1.0}, 2: {"time/step_s": 1.0, V: 0.4}})
        # shadow at step 1: seed 0 gate tp 1 fp 1 fn 2 tn 0; seed 1 tp 0 fp 0 fn 1 tn 3
        run("masa_efficient", seed, {0: {V: 0.3},
                                     1: masa((1, 1, 2, 0) if seed == 0 else (0, 0, 1, 3), (2, 0, 2, 4), 0.5, 0.25),
                                     2: {**masa((1, 0, 0, 1), (1, 1, 0, 2), 0.3, 0.35), V: 0.45}})
    args = _options(out=str(tmp_path))
    result = bench.analyse(args)
    s = result["summary"]
    assert s["shadow_to_k"]["gate"]["counts"] == {"tp": 1, "fp": 1, "fn": 3, "tn": 3}
    assert s["shadow_to_k"]["gate"]["precision"] == 0.5 and s["shadow_to_k"]["gate"]["f1"] == pytest.approx(
        2 * 0.5 * 0.25 / 0.75)  # recall 1/4
    assert s["after_k"]["gate"]["counts"] == {"tp": 2, "fp": 0, "fn": 0, "tn": 2}
    assert s["after_k"]["gate"]["precision"] == 1.0 and s["after_k"]["gate"]["f1"] == 1.0
    assert s["after_k"]["cutoff"]["precision"] == 0.5 and s["after_k"]["cutoff"]["f1"] == pytest.approx(2 / 3)
    assert s["share_gated_after_k"] == 2 / 8  # 2 gated of 4 prompts × 2 seeds
    step1 = result["per_step"][0]
    assert (step1["pred_pass"], step1["train_accuracy"]) == (0.5, 0.25)
    assert s["time_to_baseline"][0]["treatment_step"] == 2 and s["time_to_baseline"][0]["degenerate"] is False
    assert "steps ≤ k (shadow, every prompt), pooled: gate precision 0.50" in capsys.readouterr().out
