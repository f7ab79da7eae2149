"""The report's pieces on constructed data: the difficulty-quartile Simpson check, meta rates, bootstrap CIs of
aggregate, the Δ and reading the verdict shows, the power line, the whole report on a demo-shaped lineage with
three seeds (no training), the latest flow run of an ablation, belief boundaries and the belief figure."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from audit.belief import Replay, boundaries, plot_belief
from audit.flowrun import latest_flow
from evals.metrics import aggregate, meta_rates, quartile_simpson
from infra.errors import UsageError
from infra.artifacts import Artifact
from infra.lineage import Lineage, Run, StageRecord

REPO = Path(__file__).resolve().parent.parent


def problem(arm: str, pid: str, n: int, c: int, **extra) -> list[dict]:
    """n samples of one problem, the first c correct."""
    return [{"arm": arm, "step": 6, "suite": "s", "problem_id": pid, "domain": "d", "sample": j, "correct": j < c,
             "n_blocks": 0, "categories": [], "confidence": None, **extra} for j in range(n)]


def test_quartile_simpson_weighs_problems_not_samples():
    # Four easy problems and four hard ones; the treatment drew 2 samples on easy and 8 on hard ones, the control
    # the other way round. Pooled over samples the treatment looked 30 pp worse (the old, sample-weighted check
    # called that a paradox); per problem, as the headline weighs them, it is better overall and in every quartile.
    rows = []
    for i in range(4):
        rows += problem("t", f"easy{i}", 2, 2) + problem("c", f"easy{i}", 8, 7)
        rows += problem("t", f"hard{i}", 8, 2) + problem("c", f"hard{i}", 2, 0)
    result = quartile_simpson(rows, "t", "c")
    assert {s["stratum"]: s["delta"] for s in result["strata"]} == pytest.approx({1: .125, 2: .125, 3: .25, 4: .25})
    assert result["headline"] == pytest.approx((4 * 1 + 4 * 0.25) / 8 - (4 * 0.875) / 8)
    assert not result["flag"] and result["kind"] is None


def test_a_hard_quartile_within_the_margin_is_no_simpson_alarm():
    # The sensitivity run's false alarm: the treatment far ahead (+50 pp on six problems), both arms near 0 on the
    # two hardest (-2.5 pp). The report's Simpson check reads quartiles with the verdict's equivalence margin.
    from audit.report import simpson_text
    from audit.stats import contrast_simpson
    from infra.spec import ContrastSpec

    rows = [r for i in range(6) for r in problem("t", f"easy{i}", 40, 40) + problem("c", f"easy{i}", 40, 20)]
    rows += [r for i in range(2) for r in problem("t", f"hard{i}", 40, 0) + problem("c", f"hard{i}", 40, 1)]
    contrast, steps = ContrastSpec(treatment="t", control="c"), {"t": 6, "c": 6}
    strict = contrast_simpson(rows, contrast, steps)
    assert strict["flag"] and {s["stratum"]: s["delta"] for s in strict["strata"]}[4] == pytest.approx(-0.025)
    assert simpson_text("positive", strict).text.startswith("⚠ positive: headline Δ +36.9 pp")
    tolerant = contrast_simpson(rows, contrast, steps, margin=0.05)
    assert not tolerant["flag"] and tolerant["headline"] == pytest.approx(strict["headline"])
    line = simpson_text("positive", tolerant)
    assert line.text.endswith("no quartile goes against the headline by more than the margin ±5 pp.")
    assert contrast_simpson(rows, contrast, steps, margin=0.02)["flag"]  # -2.5 pp is beyond a 2 pp margin


def test_meta_rates_count_samples_with_blocks_cues_and_confidence():
    rows = (problem("m", "p0", 2, 1, n_blocks=1, categories=["verify"], confidence=0.8)
            + problem("m", "p1", 2, 0, n_blocks=0, categories=[], confidence=None))
    rows[1] = dict(rows[1], categories=["verify", "redirect"], confidence=None)
    (rates,) = meta_rates(rows)
    assert rates["samples"] == 4 and rates["meta_emission"] == 0.5
    assert rates["cue_verify"] == 0.5 and rates["cue_redirect"] == 0.25 and rates["cue_uncertainty"] == 0.0
    assert rates["confidence_stated"] == 0.25


def test_aggregate_bootstrap_ci_brackets_the_mean():
    rows = [r for i, c in enumerate([0, 1, 2, 3, 4, 4, 4, 0]) for r in problem("a", f"p{i}", 4, c)]
    (row,) = aggregate(rows, by=(), ks=(1, 4), resamples=500, seed=1)
    assert row["avg_at_k_lo"] < row["avg_at_k"] < row["avg_at_k_hi"]
    assert row["pass_at_4_lo"] <= row["pass_at_4"] <= row["pass_at_4_hi"]
    assert aggregate(rows, by=(), ks=(1, 4), resamples=500, seed=1) == [row]  # seeded: reproducible
    (same,) = aggregate([r for i in range(5) for r in problem("a", f"q{i}", 4, 2)], by=(), resamples=200)
    assert same["avg_at_k_lo"] == same["avg_at_k_hi"] == 0.5  # identical problems: no spread
    assert "avg_at_k_lo" not in aggregate(rows, by=())[0]


def test_contrast_delta_is_the_difference_of_the_accuracies_it_shows():
    from audit.stats import contrast_delta
    from infra.spec import ContrastSpec

    rows = [r for i, (ct, cc) in enumerate([(4, 1), (3, 3), (0, 2)])
            for r in problem("t", f"p{i}", 4, ct) + problem("c", f"p{i}", 4, cc)]
    rows += problem("t", "only-t", 4, 4)  # unpaired: left out of the accuracies and the Δ
    d = contrast_delta(rows, ContrastSpec(treatment="t", control="c"), {"t": 6, "c": 6}, resamples=200, seed=0)
    assert d["acc_t"] == pytest.approx(7 / 12) and d["acc_c"] == pytest.approx(6 / 12)
    assert d["delta"] == pytest.approx(d["acc_t"] - d["acc_c"]) and d["only_treatment"] == 1
    assert contrast_delta(rows, ContrastSpec(treatment="t", control="c"), {"t": 6, "c": 2}, 200, 0) == {
        "error": "no rows of arm(s) c: nothing to compare"}
    seeded = [dict(r, seed=0) for r in rows] + [dict(r, seed=1) for r in rows if r["arm"] == "t"]
    assert "arms ran different seeds" in contrast_delta(seeded, ContrastSpec(treatment="t", control="c"),
                                                        {"t": 6, "c": 6}, 200, 0)["error"]


@pytest.mark.parametrize("lo,hi,margin,words", [
    (0.01, 0.03, None, "treatment better"), (-0.03, -0.01, 0.05, "treatment worse"),
    (-0.01, 0.015, 0.02, "equivalent within ±2 pp"), (-0.01, 0.03, 0.02, "inconclusive: the CI holds 0 but reaches "
                                                                          "beyond ±2 pp"),
    (-0.01, 0.01, None, "no equivalence margin is declared (eval.equivalence_margin)")])
def test_reading_says_something_for_every_interval(lo, hi, margin, words):
    from audit.stats import reading

    assert words in reading({"lo": lo, "hi": hi}, margin)


def _run(run_id: str, stage: str, arm: str, flow: str, at: datetime) -> Run:
    return Run(run_id=run_id, ablation="abl", arm=arm, stage=stage, seed=None, config={}, config_hash="h",
               code_version="v", status="completed", started_at=at, ended_at=at, flow_run_id=flow)


def test_latest_flow_takes_the_runs_of_the_last_ablation_flow(tmp_path):
    lineage = Lineage(tmp_path / "lineage.duckdb")
    lineage.init()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spec = Artifact("spec-id", "spec", "file:///x/spec.yaml")
    # flow A resolved arm a and ran its RL; flow B (a new spec) resolved a again under a new config, later
    lineage.record(StageRecord(_run("resolve-a1", "resolve", "a", "A", t0), inputs=[(spec, "spec")]))
    lineage.record(StageRecord(_run("rl-a1", "rl", "a", "A", t0 + timedelta(minutes=5))))
    lineage.record(StageRecord(_run("resolve-a2", "resolve", "a", "B", t0 + timedelta(hours=1)),
                               inputs=[(spec, "spec")]))
    # a nightly held-out flow records no resolve run: not an ablation flow, however recent
    lineage.record(StageRecord(_run("nightly", "heldout", "*", "N", t0 + timedelta(days=1))))
    flow = latest_flow(lineage, "abl")
    assert flow.flow_run_id == "B" and flow.flows == 2
    assert [r.run_id for r in flow.runs] == ["resolve-a2"] and flow.stage("rl") == []
    with pytest.raises(UsageError, match="ablation 'nope' has no run.*known: abl"):
        latest_flow(lineage, "nope")


def test_boundaries_are_sentence_ends_and_meta_block_edges():
    response = "Add 3.5 and 2. Then double it!\n\n<|meta|>Wait. check it<|/meta|>So \\boxed{11}"
    found = [(b.pos, b.kind) for b in boundaries(response)]
    block_start, block_end = response.index("<|meta|>"), response.index("So")
    assert found == [(0, "start"), (14, "sentence"), (30, "sentence"), (block_start, "meta_open"),
                     (response.index(" check"), "sentence"), (block_end, "meta_close"), (len(response), "end")]
    assert response[:14] == "Add 3.5 and 2." and response[:block_start].endswith("!\n\n")


def test_belief_figure_is_written_with_a_meta_block(tmp_path):
    response = "First. <|meta|>Check.<|/meta|>Done \\boxed{5}"
    points = [{"pos": b.pos, "kind": b.kind, "belief": belief, "terms": [belief], "piece": response[:b.pos]}
              for b, belief in zip(boundaries(response), [-0.5, -0.2, -0.4, 1.2, 2.5])]
    assert [p["kind"] for p in points] == ["start", "sentence", "meta_open", "meta_close", "end"]
    rep = Replay(ablation="abl", arm="a", seed=0, step=3, rollout=1, prompt_id="p", gold="5", decoy="6",
                 correct=True, scorer="/x", response=response, blocks=[(7, 30)], points=points)
    png = plot_belief(rep, tmp_path / "belief.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the whole report, three seeds, no training

def _accuracy(arm: str, seed: int, step: int, suite: str, i: int, j: int) -> bool:
    """Problem i is solved with chance 0.2 + 0.6 i/40; the treatment adds 0.15 at the last step, seed 1 of the
    treatment 0.1 less (seed noise). Deterministic: a hash of the sample decides."""
    import hashlib

    p = 0.2 + 0.6 * (i % 40) / 40 + (0.15 - 0.1 * (seed == 1) if arm == "pmishift" and step == 6 else 0.0)
    u = int(hashlib.sha256(f"{arm}/{seed}/{step}/{suite}/{i}/{j}".encode()).hexdigest()[:8], 16) / 16 ** 8
    return u < p


def test_report_with_three_seeds_names_per_seed_deltas_power_and_reading(tmp_path):
    import re

    from audit.report import build_report
    from infra.home import Home
    from lineage_builder import build

    build(tmp_path / "home", seeds=[0, 1, 2], outcome=_accuracy)
    files = build_report(Home(tmp_path / "home"), "demo", tmp_path / "out")
    assert files.files[-1] == files.html and {p.name for p in files.files} >= {
        "report.html", "report.md", "ledger.json", "val-accuracy.png", "domains.png"}
    md = files.markdown.read_text()
    verdict = re.search(r"\| meta \| arith \| .*", md).group(0)
    assert "× 3 |" in verdict and "treatment better (CI above 0)" in verdict, verdict
    seeds = md[md.index("### Seeds: Δ per seed"):md.index("### Difficulty quartiles")]
    assert all(f"| meta | arith | seed {s} |" in seeds for s in (0, 1, 2)) and "| mean of 3 |" in seeds
    power = next(line for line in md.splitlines() if line.startswith("Power (meta)"))
    assert "40 problems × 4 samples × 3 seeds" in power and "σ²_seed" in power and "at 80 % power" in power
    assert re.search(r"\| Q[1-4] \(easiest\) \| 10 \|", md)  # equal-count quartiles: 40 problems, 10 each
    assert "Δ pooled over problems" in md and "Δ macro over domains" in md
    assert "seeds [0, 1, 2] in every arm" in md
    print(md[md.index("## Verdict"):md.index("## Audit ledger")])
    print(seeds)


def _no_effect(arm: str, seed: int, step: int, suite: str, i: int, j: int) -> bool:
    return _accuracy("control", seed, step, suite, i, j + 1000 * (arm == "pmishift"))


@pytest.mark.parametrize("margin,words", [
    (0.05, "equivalent within ±5 pp (CI holds 0 and lies inside the margin: TOST)"),
    (0.005, "inconclusive: the CI holds 0 but reaches beyond ±0.5 pp"),
    (None, "inconclusive: the CI holds 0 and no equivalence margin is declared (eval.equivalence_margin)")])
def test_report_reads_the_declared_equivalence_margin(tmp_path, margin, words):
    import re

    from audit.report import build_report
    from infra.home import Home
    from lineage_builder import build

    build(tmp_path / "home", seeds=[0, 1], outcome=_no_effect, heldout={"arith": 200}, samples=8,
          eval_overrides={"equivalence_margin": margin, "bootstrap_resamples": 300})
    md = build_report(Home(tmp_path / "home"), "demo", tmp_path / "out").markdown.read_text()
    verdict = re.search(r"\| meta \| arith \| .*", md).group(0)
    assert verdict.endswith(f"| 200 × 2 | {words} |"), verdict
    assert "300 resamples" in md and ("not declared" in md) == (margin is None)


def test_signal_coverage_names_scored_rollouts_and_the_decoy_share():
    from types import SimpleNamespace

    from audit.report import signal_coverage

    run = SimpleNamespace(arm="pmishift", seed=1, facts={
        "reward": "pmishift", "scorer_calls": 5588, "signal_totals": {"signal/scored": 1397, "signal/skipped": 6283},
        "decoys": {"decoys/problems": 2000, "decoys/scorable": 1990, "decoys/scorable_share": 0.995}})
    assert signal_coverage(run) == ("pmishift/seed1: pmishift, 1397 rollouts scored, 6283 skipped, 5588 scorer calls, "
                                    "decoys scorable for 1990/2000 problems (99.5%)")
    control = SimpleNamespace(arm="control", seed=0, facts={"reward": "vanilla", "scorer_calls": 0,
                                                            "signal_totals": {"signal/skipped": 7680},
                                                            "decoys": None})
    assert signal_coverage(control) == "control: vanilla, 0 rollouts scored, 7680 skipped, 0 scorer calls"


# ---------------------------------------------------------------- every contrast of the spec

def _three_arms(tmp_path):
    """The demo spec plus a placebo arm and two more contrasts (one of them with a wrong declaration)."""
    import yaml

    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["arms"]["placebo"] = {"overrides": {"sft.meta_blocks": "fixed", "rl.reward": "vanilla"}}
    spec["contrasts"]["placebo"] = {"treatment": "placebo", "control": "control", "question": "null?",
                                    "mechanisms": ["meta_sft", "placebo_blocks"]}
    spec["contrasts"]["reward"] = {"treatment": "pmishift", "control": "placebo", "mechanisms": ["meta_reward"]}
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _placebo_null(arm: str, seed: int, step: int, suite: str, i: int, j: int) -> bool:
    """pmishift as _accuracy (ahead at the last step); the placebo arm is the control arm's chance, other draws."""
    if arm == "placebo":
        return _accuracy("control", seed, step, suite, i, j + 1000)
    return _accuracy(arm, seed, step, suite, i, j)


def test_report_shows_every_contrast_with_its_verdict_and_package_effect(tmp_path):
    import re

    from audit.report import build_report
    from infra.home import Home
    from lineage_builder import build

    seeds, n, samples = [0, 1], 200, 8
    build(tmp_path / "home", seeds=seeds, outcome=_placebo_null, heldout={"arith": n}, samples=samples,
          eval_overrides={"equivalence_margin": 0.05, "bootstrap_resamples": 300}, spec_file=_three_arms(tmp_path))
    md = build_report(Home(tmp_path / "home"), "demo", tmp_path / "out").markdown.read_text()
    screen = md[:md.index("## Validation accuracy by step")]

    def acc(arm: str) -> float:
        hits = [_placebo_null(arm, s, 6, "arith", i, j) for s in seeds for i in range(n) for j in range(samples)]
        return sum(hits) / len(hits)

    expected = {"meta": ("pmishift", "control", "treatment better (CI above 0)"),
                "placebo": ("placebo", "control", "equivalent within ±5 pp"),
                # seed 1's smaller gain and other placebo draws: with two seeds the CI reaches 0
                "reward": ("pmishift", "placebo", "inconclusive: the CI holds 0 but reaches beyond ±5 pp")}
    for name, (t, c, reading) in expected.items():
        row = re.search(rf"^\| {name} \| arith \| .*$", screen, re.M).group(0)
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[2] == f"{100 * acc(t):.1f}% ({t} @ 6)" and cells[3] == f"{100 * acc(c):.1f}% ({c} @ 6)", row
        assert cells[4] == f"{100 * (acc(t) - acc(c)):+.1f} pp" and cells[6] == f"{n} × 2", row
        lo, hi = map(float, re.fullmatch(r"\[(-?[\d.]+), (-?[\d.]+)\]", cells[5]).groups())
        assert lo <= 100 * (acc(t) - acc(c)) <= hi and cells[7].startswith(reading), row
    contrasts = {m.group(1): m.group(0) for m in re.finditer(r"^\| (meta|placebo|reward) \| \w+ − \w+ \|.*$", screen,
                                                               re.M)}
    assert "| ✓ meta_reward, meta_sft (declared package effect) |" in contrasts["meta"]
    assert "| meta_sft, placebo_blocks | ✓ meta_sft, placebo_blocks (declared package effect) |" \
        in contrasts["placebo"]
    # pmishift − placebo changes the reward AND the blocks, but declares only the reward: the ledger's ✗, named
    assert "| ✗ contrast reward (pmishift − placebo) changes mechanism placebo_blocks (sft.meta_blocks), not " \
           "declared in contrasts.reward.mechanisms ['meta_reward'] |" in contrasts["reward"]
    # Markdown escapes the | of |Δ|
    assert all(re.search(r"\| \\\|Δ\\\| ≥ \d+\.\d pp \|$", line) for line in contrasts.values())
    assert "Power (placebo)" in md and "Power (" not in screen  # the power lines in full follow the held-out tables


def test_report_of_one_contrast_has_its_verdict_and_package_effect(tmp_path):
    import re

    from audit.report import build_report
    from infra.home import Home
    from lineage_builder import build

    build(tmp_path / "home", seeds=[0], outcome=_accuracy)
    md = build_report(Home(tmp_path / "home"), "demo", tmp_path / "out").markdown.read_text()
    screen = md[:md.index("## Validation accuracy by step")]
    assert re.findall(r"^\| (\w+) \| arith \|", screen, re.M) == ["meta"]
    assert re.search(r"^\| meta \| pmishift − control \| does the meta mechanism .* \| meta_sft, meta_reward \| "
                     r"✓ meta_reward, meta_sft \(declared package effect\) \| \\\|Δ\\\| ≥ \d+\.\d pp \|$",
                     screen, re.M)
    assert "treatment better (CI above 0)" in re.search(r"^\| meta \| arith \|.*$", screen, re.M).group(0)
