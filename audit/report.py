"""The ablation report: one static HTML page and its Markdown twin (with PNG figures) and the ledger as JSON, for
the ablation's latest flow run. build_report writes them and returns the files; publishing them (to the
ablation's MLflow parent run, under report/) is the caller's: the flow's Session, or `twinarm report`.

Every number is read back from what the flow recorded (lineage runs, facts and the result tables its stages
wrote) and computed by audit.stats (formulas and their sources in evals.metrics); nothing is recomputed from
training. Accuracy is always the pure correctness metric, never shaped reward. The first screen holds the
question; every contrast of the spec with its declared mechanisms, the ledger's package-effect line and the power
of its design in brief; the verdict of every contrast (held-out Δ with a CI over seeds and problems, read as
better, worse, equivalent within the declared margin, or inconclusive); the Simpson checks and the audit ledger's
status. The power lines in full follow the held-out tables.
Figures are audit.figures', rendering audit.render's.
"""
from __future__ import annotations

import json
import platform
import socket
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from audit.figures import plot_domains, plot_reliability, plot_val
from audit.checks import package_effect_lines, package_effect_text
from audit.flowrun import FlowRun, latest_flow
from audit.ledger import Ledger, run_ledger
from audit.render import Block, Code, Details, Figure, Heading, Para, Table, ci, num, pct, pp, render, value_text, \
    walk
from audit.stats import at_steps, contrast_delta, contrast_power, contrast_simpson, final_steps, reading, \
    step_deltas
from evals.metrics import aggregate, calibration, meta_rates, quartile_table
from infra.artifacts import atomic_write_bytes, read_parquet
from infra.code import package_versions
from infra.errors import DataError
from infra.home import Home
from infra.lineage import Lineage
from infra.spec import AblationSpec, ContrastSpec, EvalSpec, load_spec
from infra.tracking import experiment_name, tracking_uri
from meta.grammar import CUES

Row = dict[str, Any]
STATUS_WORDS = {"✓": "verified", "✗": "violated", "☐": "open"}
REPORT_PACKAGES = ("torch", "transformers", "verl", "math-verify", "sympy", "mlflow", "prefect", "duckdb", "numpy",
                   "matplotlib")
ALL_SUITES = "all suites"


# ---------------------------------------------------------------- what the flow recorded

@dataclass
class Inputs:
    """Everything the report is built from (see gather)."""

    flow: FlowRun
    spec: AblationSpec
    eval: EvalSpec
    contrasts: dict[str, ContrastSpec]
    val_rows: list[Row]
    val_source: str
    heldout_rows: list[Row]
    heldout_n: dict[str, int]


def gather(lineage: Lineage, ablation: str) -> Inputs:
    """What the report reads: the latest flow run, its stored spec, the resolved eval section, the contrasts
    whose arms both ran, the val rows (sweep, else RL validation) and the held-out rows, one per problem x sample
    (seeds kept apart in the `seed` field). Raises UsageError when lineage has no run of the ablation."""
    flow = latest_flow(lineage, ablation)
    spec = load_spec(flow.spec_path)
    arms = set(flow.arms)
    contrasts = {n: c for n, c in spec.contrasts.items() if {c.treatment, c.control} <= arms}
    sweeps = flow.stage("sweep")
    if sweeps:
        source = "checkpoint sweep"
        val_rows = [r for s in sweeps for r in read_parquet(s.output_path("sweep"))]
    else:  # eval.sweep off: the validation the RL stage ran every test_freq steps
        source = "RL validation (test_freq)"
        val_rows = [{"arm": s.arm, "seed": s.seed, **r} for s in flow.stage("rl")
                    for f in sorted(s.output_path("val").glob("step-*.parquet")) for r in read_parquet(f)]
    heldout = flow.stage("heldout")
    protocol = heldout[0].facts.get("protocol", {}) if heldout else {}
    # the report's keys (eval.bootstrap_resamples, eval.ece_bins, eval.equivalence_margin) as the flow resolved them
    resolved = EvalSpec.model_validate(flow.stage("resolve")[0].config["eval"])
    return Inputs(flow=flow, spec=spec, eval=resolved,
                  contrasts=contrasts, val_rows=val_rows, val_source=source,
                  heldout_rows=read_parquet(heldout[0].output_path("heldout")) if heldout else [],
                  heldout_n=protocol.get("n", {}))


# ---------------------------------------------------------------- what each contrast says (computed once)

@dataclass
class Verdict:
    """One contrast on one suite (or all suites) at the final checkpoints: delta is a contrast_delta row."""

    contrast: str
    spec: ContrastSpec
    suite: str
    delta: Row


@dataclass
class Findings:
    """The statistics the first screen and the held-out section share: verdicts per contrast x suite, and per
    contrast (all suites) the Simpson check and the power of the design."""

    final: dict[str, int]
    verdicts: list[Verdict]
    simpsons: dict[str, Row]
    power: dict[str, Row]


def findings(inp: Inputs) -> Findings:
    """Compute the verdicts, Simpson checks and power lines of every contrast from the held-out rows."""
    rows, ev = inp.heldout_rows, inp.eval
    if not rows:
        return Findings({}, [], {}, {})
    final = final_steps(rows)
    suites = sorted({r["suite"] for r in rows})
    verdicts = []
    for name, c in inp.contrasts.items():
        for suite in suites + ([ALL_SUITES] if len(suites) > 1 else []):
            picked = rows if suite == ALL_SUITES else [r for r in rows if r["suite"] == suite]
            verdicts.append(Verdict(name, c, suite, contrast_delta(picked, c, final, ev.bootstrap_resamples,
                                                                   ev.seed)))
    overall = {v.contrast: v.delta for v in verdicts if v.suite == (ALL_SUITES if len(suites) > 1 else suites[0])}
    return Findings(final, verdicts, {name: contrast_simpson(rows, c, final, ev.equivalence_margin)
                                     for name, c in inp.contrasts.items()},
                    {name: contrast_power(rows, c, final, se=overall[name].get("se"))
                     for name, c in inp.contrasts.items()})


def simpson_text(name: str, s: Row) -> Para:
    """The Simpson line of a contrast: the headline Δ (per problem, the verdict's), each quartile's Δ, and the
    flag when a quartile goes against the headline."""
    if "error" in s:
        return Para(f"{name}: Simpson check not computed: {s['error']}", "bad")
    strata = ", ".join(f"Q{t['stratum']} {pp(t['delta'])}" for t in s["strata"])
    if not s["flag"]:
        return Para(f"{name}: headline Δ {pp(s['headline'])} (each problem weighs the same, as in the verdict); per "
                    f"difficulty quartile {strata}: no quartile goes against the headline"
                    + ("." if s.get("margin") is None else f" by more than the margin ±{100 * s['margin']:g} pp."))
    what = ("Simpson's paradox: every quartile goes the other way" if s["kind"] == "reversal" else
            "the headline averages quartiles that go opposite ways")
    return Para(f"⚠ {name}: headline Δ {pp(s['headline'])}, per difficulty quartile {strata}: {what} "
                f"({s['reason']}); read the quartile table before the headline.", "bad")


def power_text(name: str, p: Row) -> Para:
    """The power line of a contrast: the smallest Δ its design detects at 80 % power, how it is computed, and
    where the variance comes from."""
    if "error" in p:
        return Para(f"{name}: power not computed: {p['error']}", "bad")
    design = (f"{p['problems']} problems × {p['samples'] if p['samples'] is not None else 'unequal'} samples × "
              f"{p['seeds']} seed{'s' * (p['seeds'] != 1)}")
    source = ("the spread of the verdict's seeds × problems bootstrap (conservative with few seeds, Owen 2007)"
              if p["se_source"] == "bootstrap" else "the variance components")
    if p["seed_variance_estimated"]:
        parts = (f"variance components (Brennan 2001, D-study): SE² = σ²_seed/S + σ²_problem/P + σ²_resid/(S·P) = "
                 f"({100 * p['se_components']:.2f} pp)² with σ²_seed {p['sigma2_seed']:.2e}, σ²_problem "
                 f"{p['sigma2_problem']:.2e}, σ²_resid {p['sigma2_resid']:.2e}")
    else:
        parts = (f"variance components: SE² = σ²_problem/P = ({100 * p['se_components']:.2f} pp)² with σ²_problem "
                 f"{p['sigma2_problem']:.2e}; the seed variance is not measurable with one seed, so every SE here "
                 f"is optimistic")
    return Para(f"Power ({name}): this design ({design}) detects |Δ| ≥ {100 * p['mde']:.1f} pp at "
                f"{100 * p['power']:.0f} % power (two-sided α = {p['alpha']:g}): MDE = (z_{{1−α/2}} + z_{{power}}) × "
                f"SE = {p['z']:.2f} × {100 * p['se']:.2f} pp (Bloom 1995), SE from {source}; {parts}; of a "
                f"problem's Δ in one seed, the noise of drawing its samples has variance {p['sampling']:.2e} (more "
                f"samples per problem shrink that part only).", "note")


# ---------------------------------------------------------------- sections

def _step_label(step: int, final: dict[str, int], arm: str) -> str:
    return f"{step} (SFT start)" if step == 0 else f"{step} (final)" if final.get(arm) == step else str(step)


def power_cell(p: Row | None) -> str:
    """The power of a contrast's design in one cell: the smallest |Δ| it detects at 80 % power (power_text has how)."""
    return "—" if p is None or "error" in p else f"|Δ| ≥ {100 * p['mde']:.1f} pp"


def effect_cell(effect: tuple[list[str], list[str]] | None) -> str:
    """A contrast's package-effect line (audit.checks.package_effect_lines): ✓ and the mechanisms it changes, or ✗
    and what is wrong with its declared mechanisms; "—" for a contrast the ledger did not compare."""
    if effect is None:
        return "—"
    mechanisms, problems = effect
    return f"✗ {'; '.join(problems)}" if problems else f"✓ {package_effect_text(mechanisms)}"


def first_screen(inp: Inputs, ledger: Ledger, found: Findings) -> list[Block]:
    """Question; every contrast with its declared mechanisms, the ledger's package-effect line and the power of its
    design; the verdict table (every contrast x suite, with CI and reading); Simpson lines; the ledger's counts."""
    spec, flow, margin = inp.spec, inp.flow, inp.eval.equivalence_margin
    blocks: list[Block] = [Heading("Question")]
    if spec.description:
        blocks.append(Para(spec.description.strip()))
    effects = package_effect_lines(spec, ledger.config_diff, flow.arms)
    if inp.contrasts:
        blocks.append(Table(
            ["contrast", "compares", "question", "declared mechanisms", "package effect (ledger)", "detects"],
            [[name, f"{c.treatment} − {c.control}", c.question, ", ".join(c.mechanisms) or "—",
              effect_cell(effects.get(name)), power_cell(found.power.get(name))] for name, c in inp.contrasts.items()],
            caption="package effect: the mechanisms the arms' resolved configs differ in, checked against the declared "
                    "ones (ledger check 'package effects named'); detects: the smallest |Δ| the design detects at "
                    "80 % power (the power lines under the held-out section)"))
    rows = []
    for v in found.verdicts:
        d, c = v.delta, v.spec
        if "error" in d:
            rows.append([v.contrast, v.suite, "—", "—", "—", "—", "—", reading(d, margin)])
            continue
        rows.append([v.contrast, v.suite, f"{pct(d['acc_t'])} ({c.treatment} @ {found.final[c.treatment]})",
                     f"{pct(d['acc_c'])} ({c.control} @ {found.final[c.control]})", pp(d["delta"]),
                     ci(d["lo"], d["hi"]), f"{d['problems']} × {len(d['seeds'])}", reading(d, margin)])
    blocks += [Heading("Verdict: held-out Δ at the final checkpoints"),
               Table(["contrast", "suite", "treatment", "control", "Δ", "95% CI (pp)", "problems × seeds", "reading"],
                     rows, caption=f"avg@k; CI: bootstrap over seeds and problems (Owen 2007), problems resampled "
                                   f"within suites, {inp.eval.bootstrap_resamples} resamples, seed {inp.eval.seed}; "
                                   "equivalence margin " + (f"±{100 * margin:g} pp (eval.equivalence_margin)"
                                                            if margin is not None else "not declared"))]
    if not found.verdicts:
        blocks.append(Para("no held-out job in this flow run, or no contrast whose arms both ran", "bad"))
    blocks += [simpson_text(name, s) for name, s in found.simpsons.items()]
    counts = {s: sum(c.status == s for c in ledger.checks) for s in STATUS_WORDS}
    blocks += [Heading("Audit ledger"),
               Para(" · ".join(f"{counts[s]} {s} {w}" for s, w in STATUS_WORDS.items()),
                    "bad" if counts["✗"] else "good")]
    attention = [c for c in ledger.checks if c.status != "✓"]
    if attention:
        blocks.append(Table(["", "check", "summary"], [[c.status, c.name, c.summary] for c in attention]))
    if counts["✗"]:
        blocks.append(Para(f"{counts['✗']} violated check(s): the arms are not shown to be matched, so the Δ above "
                           f"may measure a confound.", "bad"))
    blocks.append(Para(f"flow run {flow.flow_run_id} · " + (
        f"the latest of {flow.flows} ablation flow runs in lineage" if flow.flows > 1 else "the only flow run"),
        "note"))
    return blocks


def val_section(inp: Inputs, arms: list[str], out: Path, domain_step: int | None) -> list[Block]:
    """Val accuracy per step (figure, table), per contrast the Δ per step pooled over problems and macro-averaged
    over domains, and per-domain accuracy at one step. Raises DataError for a domain_step without rows."""
    if not inp.val_rows:
        return [Heading("Validation accuracy by step"), Para("no validation rows in this flow run", "bad")]
    ev = inp.eval
    table = aggregate(inp.val_rows, by=(), resamples=ev.bootstrap_resamples, seed=ev.seed)
    steps = sorted({r["step"] for r in table})
    by = {(r["arm"], r["step"]): r for r in table}
    rows = [[str(s), *(f"{pct(by[a, s]['avg_at_k'])} {ci(by[a, s]['avg_at_k_lo'], by[a, s]['avg_at_k_hi'])}"
                       if (a, s) in by else "—" for a in arms)] for s in steps]
    blocks: list[Block] = [
        Heading("Validation accuracy by step"),
        Figure(plot_val(table, arms, out / "val-accuracy.png"), f"pure correctness on the val mix ({inp.val_source})"
                                                                  f", 95% bootstrap CI over problems"),
        Table(["step", *arms], rows, caption=f"{inp.val_source}: avg@k over {table[0]['problems']} problems")]

    def cells(d: Row) -> list[str]:
        return ["—", "—", d["error"]] if "error" in d else [pp(d["delta"]), ci(d["lo"], d["hi"]), num(d["p_le_0"], 3)]

    for name, c in inp.contrasts.items():
        deltas = step_deltas(inp.val_rows, c, ev.bootstrap_resamples, ev.seed)
        blocks.append(Table(
            ["step", c.treatment, c.control, "Δ pooled over problems", "95% CI (pp)", "P(Δ ≤ 0)",
             "Δ macro over domains", "95% CI (pp)", "P(Δ ≤ 0)", "problems × seeds"],
            [[str(d["step"]), pct(d["pooled"].get("acc_t")), pct(d["pooled"].get("acc_c")), *cells(d["pooled"]),
              *cells(d["macro"]), f"{d['pooled']['problems']} × {len(d['pooled']['seeds'])}"
              if "error" not in d["pooled"] else "—"] for d in deltas],
            caption=f"{name}: {c.treatment} − {c.control} at the steps both arms share. Pooled: every problem weighs "
                    f"the same; macro: the mean of the per-domain Δs (every domain weighs the same, as in the "
                    f"research table). CIs: bootstrap over seeds and problems, problems resampled within domains"))
    shared = set.intersection(*({r["step"] for r in table if r["arm"] == a} for a in arms))
    step = domain_step if domain_step is not None else max(shared, default=max(steps))
    if not any(r["step"] == step for r in table):
        raise DataError(f"no validation rows at step {step}; steps: {steps}")
    dom = aggregate([r for r in inp.val_rows if r["step"] == step], by=("domain",),
                    resamples=ev.bootstrap_resamples, seed=ev.seed)
    by_dom = {(r["arm"], r["domain"]): r for r in dom}
    domains = sorted({r["domain"] for r in dom})
    blocks += [Heading(f"Per-domain accuracy at step {step}", 3),
               Figure(plot_domains(dom, arms, out / "domains.png"), f"val accuracy per domain at step {step}"),
               Table(["domain", *arms], [[d, *(f"{pct(by_dom[a, d]['avg_at_k'])} "
                                               f"{ci(by_dom[a, d]['avg_at_k_lo'], by_dom[a, d]['avg_at_k_hi'])}"
                                               if (a, d) in by_dom else "—" for a in arms)] for d in domains])]
    return blocks


def seeds_section(found: Findings) -> list[Block]:
    """Per contrast (all suites): the Δ of each seed and their mean with the seeds x problems CI."""
    overall = [v for v in found.verdicts if v.suite == ALL_SUITES] or found.verdicts
    rows = []
    for v in overall:
        d = v.delta
        if "error" in d:
            rows.append([v.contrast, v.suite, "—", d["error"]])
            continue
        rows += [[v.contrast, v.suite, f"seed {p['seed']}", pp(p["delta"])] for p in d["per_seed"]]
        rows.append([v.contrast, v.suite, f"mean of {len(d['seeds'])}", f"{pp(d['delta'])} {ci(d['lo'], d['hi'])}"])
    if not rows:
        return []
    return [Heading("Seeds: Δ per seed (final checkpoints)", 3),
            Table(["contrast", "suite", "seed", "Δ"], rows,
                  caption="each seed's Δ on the shared problems; the mean's 95% CI resamples seeds, then problems "
                          "(Owen 2007; Davison & Hinkley 1997 §3.8); with one seed it covers problems only")]


def heldout_section(inp: Inputs, found: Findings, out: Path) -> list[Block]:
    """Held-out accuracies per suite/arm/step, per-seed Δs, difficulty quartiles with the Simpson lines, meta
    behaviour and calibration (with the reliability figure)."""
    rows, ev = inp.heldout_rows, inp.eval
    if not rows:
        return [Heading("Held-out evaluation"), Para("no held-out job in this flow run", "bad")]
    final = found.final
    ks = sorted({1, *inp.heldout_n.values()})
    table = aggregate(rows, by=("suite",), ks=ks, resamples=ev.bootstrap_resamples, seed=ev.seed)
    body = []
    for r in sorted(table, key=lambda r: (r["suite"], r["arm"], r["step"])):
        k = inp.heldout_n.get(r["suite"], r["k"])
        at_k = f"pass_at_{k}"
        body.append([r["suite"], r["arm"], _step_label(r["step"], final, r["arm"]), str(r["problems"]), str(r["k"]),
                     f"{pct(r['avg_at_k'])} {ci(r['avg_at_k_lo'], r['avg_at_k_hi'])}",
                     f"{pct(r['pass_at_1'])} {ci(r['pass_at_1_lo'], r['pass_at_1_hi'])}",
                     f"{pct(r.get(at_k))} {ci(r.get(at_k + '_lo'), r.get(at_k + '_hi'))}" if k != 1 else "—"])
    blocks: list[Block] = [
        Heading("Held-out evaluation"),
        Table(["suite", "arm", "step", "problems", "k", "avg@k [95% CI]", "pass@1 [95% CI]", "pass@k [95% CI]"], body,
              caption="one job, one protocol for every arm; k = samples per problem over all seeds; CIs: bootstrap "
                      "over problems"), *seeds_section(found),
        *(power_text(name, p) for name, p in found.power.items())]

    final_rows = at_steps(rows, final)
    quart = quartile_table(final_rows)
    arms = sorted(final)
    by_q = {(r["arm"], r["quartile"]): r for r in quart}
    qs = sorted({r["quartile"] for r in quart})
    blocks += [Heading("Difficulty quartiles (final checkpoints)", 3),
               Table(["quartile", "problems", *(f"{a} {m}" for a in arms for m in ("acc", "meta"))],
                     [[f"Q{q}" + (" (easiest)" if q == 1 else " (hardest)" if q == 4 else ""),
                       str(next(r["problems"] for r in quart if r["quartile"] == q)),
                       *(v for a in arms for v in ((pct(by_q[a, q]["accuracy"]), pct(by_q[a, q]["meta_emission"]))
                                                     if (a, q) in by_q else ("—", "—")))] for q in qs],
                     caption="difficulty = 1 − accuracy pooled over every arm; equal-count quartiles (ties broken by "
                             "a hash of the problem id); meta = share of samples with a closed meta block")]
    blocks += [simpson_text(name, s) for name, s in found.simpsons.items()]

    meta = meta_rates(rows)
    blocks += [Heading("Meta behaviour on the held-out set", 3),
               Table(["arm", "step", "samples", "closed-meta emission", *CUES, "confidence stated"],
                     [[m["arm"], _step_label(m["step"], final, m["arm"]), str(m["samples"]), pct(m["meta_emission"]),
                       *(pct(m[f"cue_{cat}"]) for cat in CUES), pct(m["confidence_stated"])] for m in meta],
                     caption="share of samples; cue categories are whole-word cues inside closed blocks")]

    cal = calibration(rows, bins=ev.ece_bins)
    blocks += [Heading("Calibration of stated confidence", 3),
               Table(["arm", "step", "samples", "stated", "coverage", f"ECE ({ev.ece_bins} bins)", "Brier"],
                     [[c["arm"], _step_label(c["step"], final, c["arm"]), str(c["samples"]), str(c["stated"]),
                       pct(c["coverage"]), num(c["ece"]), num(c["brier"])] for c in cal],
                     caption="confidence parsed inside closed meta blocks only; samples without one are left out")]
    if any(c["bins"] for c in cal):
        blocks.append(Figure(plot_reliability(cal, out / "reliability.png"), "reliability diagram"))
    return blocks


def ledger_section(ledger: Ledger, arms: list[str]) -> list[Block]:
    """Every check with its summary, its evidence (SQL and values) folded, and the resolved-config diff."""
    blocks: list[Block] = [Heading("Audit ledger"),
                           Table(["", "check", "summary"], [[c.status, c.name, c.summary] for c in ledger.checks])]
    for c in ledger.checks:
        evidence: list[Block] = []
        for e in c.evidence:
            evidence += [Code(e.query), Code(value_text(e.values, 2000), "json")]
        blocks.append(Details(f"{c.status} {c.name}: evidence", evidence or [Para("no evidence recorded", "note")]))
    if ledger.config_diff:
        extra = [k for k in ledger.config_diff[0] if k not in ("key", *arms, "declared_by", "mechanism")]
        columns = ["key", *arms, "declared_by", "mechanism", *extra]
        blocks += [Heading("Resolved configs: every key that differs between arms", 3),
                   Table(columns, [[value_text(row.get(col, "")) for col in columns] for row in ledger.config_diff])]
    return blocks


def signal_coverage(run: Any) -> str:
    """One RL run's reward-signal coverage from its facts: the signal, blocks scored / skipped, scorer calls, and
    for signals that need a decoy the share of its RL problems with a scorable gold/decoy pair."""
    f = run.facts
    totals = f.get("signal_totals") or {}
    decoys = f.get("decoys") or {}
    share = decoys.get("decoys/scorable_share")
    return (f"{run.arm}{'' if run.seed in (None, 0) else f'/seed{run.seed}'}: {f.get('reward', '?')}, "
            f"{totals.get('signal/scored', 0)} rollouts scored, {totals.get('signal/skipped', 0)} skipped, "
            f"{f.get('scorer_calls', 0)} scorer calls"
            + (f", decoys scorable for {decoys.get('decoys/scorable')}/{decoys.get('decoys/problems')} problems "
               f"({share:.1%})" if share is not None else ""))


def reproducibility_section(inp: Inputs, home: Home) -> list[Block]:
    """Flow run, spec, configs, code, seeds, devices, hosts, packages, grader, protocol, stores, build host."""
    flow = inp.flow
    codes: dict[str, list[str]] = defaultdict(list)
    for r in flow.runs:
        codes[r.code_version].append(f"{r.stage}/{r.arm}")
    seeds: dict[str, set[int | None]] = defaultdict(set)
    for r in flow.stage("rl"):
        seeds[r.arm].add(r.seed)
    devices = sorted({f"{r.stage}: {r.facts['device']} ({r.facts.get('precision', '?')})" for r in flow.runs
                      if "device" in r.facts})
    grader = next((r.facts["grader"] for r in flow.stage("rl") if "grader" in r.facts), {})
    hosts: dict[str, set[str]] = defaultdict(set)
    packages: set[str] = set()
    for r in flow.runs:
        if runtime := r.facts.get("runtime"):
            hosts[runtime["host"]].add(r.stage)
            packages.add(", ".join(f"{k} {v}" for k, v in runtime["packages"].items() if v))
    spec_art = flow.stage("resolve")[0].inputs["spec"]
    rows = [
        ["flow run", f"{flow.flow_run_id} ({len(flow.runs)} stage runs)"],
        ["spec", f"{flow.spec_path} (content hash {spec_art.artifact_id})"],
        *[["resolved config", f"{r.arm}: {r.config_hash}"] for r in flow.stage("resolve")],
        *[["code version", f"{code} ({len(where)} stage runs)" if len(codes) == 1 else f"{code}: {', '.join(where)}"]
          for code, where in codes.items()],
        ["seeds", "; ".join(f"{a}: {sorted(s)}" for a, s in sorted(seeds.items()))],
        ["devices", "; ".join(devices) or "not recorded"],
        ["hosts", "; ".join(f"{host}: {', '.join(sorted(where))}" for host, where in sorted(hosts.items()))
         or "not recorded"],
        ["stage packages", "; ".join(sorted(packages)) or "not recorded"],
        ["grader", f"{grader.get('grader_version', 'not recorded')} via {grader.get('call_path', '?')}"],
        ["packages recorded", ", ".join(f"{k} {v}" for k, v in grader.get("versions", {}).items())
         or "none (only the grader's call path records its package versions)"],
        ["held-out protocol", next((r.facts.get("protocol_key", "?") for r in flow.stage("heldout")), "no job")],
        *[["reward signal", signal_coverage(r)] for r in flow.stage("rl")],
        ["MLflow", f"{tracking_uri(home)} · experiment {experiment_name(flow.ablation)} (this report: artifacts "
                   f"report/ of its parent run)"],
        ["lineage", str(home.lineage_db)],
        ["report built", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {socket.gethostname()} with Python "
                         f"{platform.python_version()}, " + ", ".join(
                             f"{p} {v or 'absent'}" for p, v in package_versions(REPORT_PACKAGES).items())],
    ]
    return [Heading("Reproducibility"), Table(["", ""], rows,
                                              caption="packages are those of the process that built this report")]


# ---------------------------------------------------------------- entry point

@dataclass(frozen=True)
class ReportFiles:
    """What build_report wrote: the page, its Markdown twin, the ledger as JSON and the figures (PNG)."""

    html: Path
    markdown: Path
    ledger_json: Path
    figures: list[Path]

    @property
    def files(self) -> list[Path]:
        """Every file to publish (e.g. under report/ of the ablation's MLflow parent run), the page last."""
        return [*self.figures, self.markdown, self.ledger_json, self.html]


def build_report(home: Home, ablation: str, out_dir: Path | None = None, domain_step: int | None = None
                 ) -> ReportFiles:
    """Write report.html, report.md, ledger.json and the figures for the ablation's latest flow run into out_dir
    (default TWINARM_HOME/reports/<ablation>) and return them. Touches no tracking server: publishing the files
    is the caller's (the Session logs ReportFiles.files to the parent run). Raises UsageError when lineage has no
    run of the ablation, DataError for a domain_step without val rows."""
    lineage = Lineage(home.lineage_db)
    inp = gather(lineage, ablation)
    out = Path(out_dir) if out_dir else home.reports / ablation
    out.mkdir(parents=True, exist_ok=True)
    ledger = run_ledger(lineage, ablation)
    arms = inp.flow.arms
    found = findings(inp)
    screen = first_screen(inp, ledger, found)
    rest = [*val_section(inp, arms, out, domain_step), *heldout_section(inp, found, out),
            *ledger_section(ledger, arms), *reproducibility_section(inp, home)]
    page, md = render(f"twinarm report — {ablation}", f"arms: {', '.join(arms)} · built from lineage "
                                                      f"{home.lineage_db}", screen, rest)
    ledger_json = json.dumps(ledger.to_json(), indent=2, ensure_ascii=False)
    return ReportFiles(figures=[b.path for b in walk([*screen, *rest]) if isinstance(b, Figure)],
                       markdown=atomic_write_bytes(out / "report.md", md.encode()),
                       ledger_json=atomic_write_bytes(out / "ledger.json", ledger_json.encode()),
                       html=atomic_write_bytes(out / "report.html", page.encode()))
