"""The ablation report: one static HTML page and its Markdown twin (with PNG figures), logged to the ablation's
MLflow parent run.

Every number is read back from what the latest flow run recorded (lineage runs, facts and the result tables
its stages wrote) and summarised with evals.metrics; nothing is recomputed from training. Accuracy is always the
pure correctness metric, never shaped reward. The first screen holds the question, the verdict (held-out Δ with
its paired bootstrap CI per contrast) and the audit ledger's status: what a reader needs to decide whether the
comparison says anything, and whether the arms were matched.
"""
from __future__ import annotations

import base64
import html
import json
import platform
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence, Union

from audit.flowrun import FlowRun, latest_flow
from audit.ledger import run_ledger
from evals.metrics import (aggregate, calibration, meta_rates, paired_bootstrap, quartile_simpson,
                           quartile_table)
from infra.artifacts import atomic_write_bytes, read_parquet
from infra.code import package_versions
from infra.errors import DataError, TwinarmError
from infra.home import Home
from infra.lineage import Lineage
from infra.spec import AblationSpec, ContrastSpec, EvalSpec, load_spec
from infra.tracking import Tracker, tracking_uri
from meta.grammar import CUES

Row = dict[str, Any]
STATUS_WORDS = {"✓": "verified", "✗": "violated", "☐": "open"}
REPORT_PACKAGES = ("torch", "transformers", "verl", "math-verify", "sympy", "mlflow", "prefect", "duckdb", "numpy",
                   "matplotlib")


# ---------------------------------------------------------------- document model (rendered to HTML and Markdown)

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    cls: str = ""  # an HTML class: "note", "bad", "good"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Code:
    text: str
    lang: str = "sql"


@dataclass
class Details:
    summary: str
    blocks: list["Block"] = field(default_factory=list)


Block = Union[Heading, Para, Table, Figure, Code, Details]


# ---------------------------------------------------------------- formatting

def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def ci(lo: float | None, hi: float | None) -> str:
    return "—" if lo is None or hi is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def pp(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f} pp"


def num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def value_text(value: Any, limit: int = 400) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + " …"


# ---------------------------------------------------------------- pure computations over sample rows

def pool_seeds(rows: Sequence[Row]) -> list[Row]:
    """Rows of several seeds of an arm as more samples of the same problems: sample -> (seed, sample)."""
    return [{**r, "sample": (r.get("seed"), r["sample"])} for r in rows]


def at_steps(rows: Sequence[Row], steps: dict[str, int]) -> list[Row]:
    """The rows of each arm at its given step (arms not named are dropped)."""
    return [r for r in rows if steps.get(r["arm"]) == r["step"]]


def final_steps(rows: Sequence[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["arm"]] = max(out.get(r["arm"], r["step"]), r["step"])
    return out


def contrast_delta(rows: Sequence[Row], contrast: ContrastSpec, steps: dict[str, int], resamples: int, seed: int
                   ) -> Row | None:
    """paired_bootstrap of treatment − control at the given steps, with each arm's accuracy on the shared
    problems (acc_t, acc_c; so Δ = acc_t − acc_c); None when the arms share no problems."""
    t, c = contrast.treatment, contrast.control
    if t not in steps or c not in steps:
        return None
    picked = at_steps(rows, {t: steps[t], c: steps[c]})
    problems = {a: {(r["suite"], r["problem_id"]) for r in picked if r["arm"] == a} for a in (t, c)}
    shared = problems[t] & problems[c]
    if not shared:
        return None
    acc = {g["arm"]: g["avg_at_k"] for g in aggregate([r for r in picked if (r["suite"], r["problem_id"]) in shared],
                                                      by=())}
    return {**paired_bootstrap(picked, t, c, resamples=resamples, seed=seed), "acc_t": acc[t], "acc_c": acc[c]}


def step_deltas(rows: Sequence[Row], contrast: ContrastSpec, resamples: int, seed: int) -> list[Row]:
    """Δ with CI at every step both arms of the contrast have rows for."""
    steps_of: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        steps_of[r["arm"]].add(r["step"])
    shared = sorted(steps_of[contrast.treatment] & steps_of[contrast.control])
    out = []
    for step in shared:
        d = contrast_delta(rows, contrast, {contrast.treatment: step, contrast.control: step}, resamples, seed)
        if d is not None:
            out.append({"step": step, **d})
    return out


def verdict_word(d: Row) -> str:
    if d["lo"] > 0:
        return "treatment better (CI above 0)"
    if d["hi"] < 0:
        return "treatment worse (CI below 0)"
    return "no difference shown (CI spans 0)"


# ---------------------------------------------------------------- what the flow recorded

@dataclass
class Inputs:
    flow: FlowRun
    spec: AblationSpec
    eval: EvalSpec
    contrasts: dict[str, ContrastSpec]
    val_rows: list[Row]
    val_source: str
    heldout_rows: list[Row]
    heldout_n: dict[str, int]


def gather(lineage: Lineage, ablation: str) -> Inputs:
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
    # the report's own keys (eval.bootstrap_resamples, eval.seed of the bootstrap) come from the flow run's spec
    return Inputs(flow=flow, spec=spec, eval=spec.base.eval,
                  contrasts=contrasts, val_rows=pool_seeds(val_rows), val_source=source,
                  heldout_rows=pool_seeds(read_parquet(heldout[0].output_path("heldout"))) if heldout else [],
                  heldout_n=protocol.get("n", {}))


# ---------------------------------------------------------------- figures

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(arms: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    return {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}


def plot_val(table: list[Row], arms: list[str], path: Path) -> Path:
    plt = _plt()
    colors = _colors(arms)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    for arm in arms:
        pts = [r for r in table if r["arm"] == arm]
        steps = [r["step"] for r in pts]
        ax.plot(steps, [r["avg_at_k"] for r in pts], marker="o", color=colors[arm], label=arm)
        ax.fill_between(steps, [r["avg_at_k_lo"] for r in pts], [r["avg_at_k_hi"] for r in pts],
                        color=colors[arm], alpha=0.15, linewidth=0)
    ax.set(xlabel="RL step", ylabel="val accuracy (pure)", ylim=(-0.02, 1.02))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_domains(table: list[Row], arms: list[str], path: Path) -> Path:
    plt = _plt()
    colors = _colors(arms)
    domains = sorted({r["domain"] for r in table})
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.7 * len(domains) * len(arms)), 3.4), dpi=110)
    for i, arm in enumerate(arms):
        by = {r["domain"]: r for r in table if r["arm"] == arm}
        xs = [d + i * width - 0.4 + width / 2 for d in range(len(domains))]
        acc = [by[d]["avg_at_k"] if d in by else 0.0 for d in domains]
        err = [[max(0.0, a - by[d]["avg_at_k_lo"]) if d in by else 0.0 for d, a in zip(domains, acc)],
               [max(0.0, by[d]["avg_at_k_hi"] - a) if d in by else 0.0 for d, a in zip(domains, acc)]]
        ax.bar(xs, acc, width, yerr=err, capsize=2, color=colors[arm], label=arm)
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set(ylabel="val accuracy (pure)", ylim=(0, 1.02))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(cal: list[Row], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for row in cal:
        if row["bins"]:
            ax.plot([b["confidence"] for b in row["bins"]], [b["accuracy"] for b in row["bins"]], marker="o",
                    label=f"{row['arm']} @ {row['step']} (ECE {row['ece']:.3f})")
    ax.set(xlabel="stated confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- sections

def _step_label(step: int, final: dict[str, int], arm: str) -> str:
    return f"{step} (SFT start)" if step == 0 else f"{step} (final)" if final.get(arm) == step else str(step)


def first_screen(inp: Inputs, ledger: Any, verdicts: list[tuple[str, ContrastSpec, str, Row | None]],
                 simpsons: dict[str, Row]) -> list[Block]:
    spec, flow = inp.spec, inp.flow
    blocks: list[Block] = [Heading("Question")]
    if spec.description:
        blocks.append(Para(spec.description.strip()))
    for name, c in inp.contrasts.items():
        mech = f" — declared mechanisms: {', '.join(c.mechanisms)}" if c.mechanisms else ""
        blocks.append(Para(f"{name}: {c.treatment} − {c.control}" + (f": {c.question}" if c.question else "") + mech))
    final = final_steps(inp.heldout_rows)
    rows = []
    for name, c, suite, d in verdicts:
        if d is None:
            rows.append([name, suite, "—", "—", "—", "—", "—", "arms share no held-out problems"])
            continue
        rows.append([name, suite, f"{pct(d['acc_t'])} ({c.treatment} @ {final[c.treatment]})",
                     f"{pct(d['acc_c'])} ({c.control} @ {final[c.control]})", pp(d["delta"]), ci(d["lo"], d["hi"]),
                     f"{d['problems']}", verdict_word(d)])
    blocks += [Heading("Verdict: held-out Δ at the final checkpoints"),
               Table(["contrast", "suite", "treatment", "control", "Δ", "95% CI (pp)", "problems", "reading"], rows,
                     caption=f"avg@k, paired bootstrap over shared problems ({inp.eval.bootstrap_resamples} "
                             f"resamples, stratified by suite, seed {inp.eval.seed})")]
    if not verdicts:
        blocks.append(Para("no held-out job in this flow run, or no contrast whose arms both ran", "bad"))
    for name, s in simpsons.items():
        if s["flag"]:
            blocks.append(Para(f"⚠ {name}: Simpson's paradox across difficulty quartiles ({s['reason']}); read the "
                               f"quartile table before the pooled Δ.", "bad"))
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
    for name, c in inp.contrasts.items():
        deltas = step_deltas(inp.val_rows, c, ev.bootstrap_resamples, ev.seed)
        blocks.append(Table(["step", c.treatment, c.control, "Δ", "95% CI (pp)", "P(Δ ≤ 0)", "problems"],
                            [[str(d["step"]), pct(d["acc_t"]), pct(d["acc_c"]), pp(d["delta"]), ci(d["lo"], d["hi"]),
                              num(d["p_le_0"], 3), str(d["problems"])] for d in deltas],
                            caption=f"{name}: {c.treatment} − {c.control} at the steps both arms share "
                                    f"(paired bootstrap over shared problems)"))
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


def heldout_section(inp: Inputs, simpsons: dict[str, Row], out: Path) -> list[Block]:
    rows, ev = inp.heldout_rows, inp.eval
    if not rows:
        return [Heading("Held-out evaluation"), Para("no held-out job in this flow run", "bad")]
    final = final_steps(rows)
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
              caption="one job, one protocol for every arm; CIs: bootstrap over problems")]

    final_rows = at_steps(rows, final)
    quart = quartile_table(final_rows)
    arms = sorted(final)
    by_q = {(r["arm"], r["quartile"]): r for r in quart}
    qs = sorted({r["quartile"] for r in quart})
    blocks += [Heading("Difficulty quartiles (final checkpoints)", 3),
               Table(["quartile", *(f"{a} {m}" for a in arms for m in ("acc", "meta"))],
                     [[f"Q{q}" + (" (easiest)" if q == 1 else " (hardest)" if q == 4 else ""),
                       *(v for a in arms for v in ((pct(by_q[a, q]["accuracy"]), pct(by_q[a, q]["meta_emission"]))
                                                     if (a, q) in by_q else ("—", "—")))] for q in qs],
                     caption="difficulty = 1 − accuracy pooled over every arm; meta = share of samples with a closed "
                             "meta block")]
    for name, s in simpsons.items():
        strata = ", ".join(f"Q{t['stratum']} {pp(t['delta'])}" for t in s["strata"])
        blocks.append(Para(f"{name}: pooled Δ {pp(s['pooled'])}, common-weight Δ {pp(s['standardised'])}; "
                           f"per quartile {strata}. " + (f"⚠ Simpson: {s['reason']}" if s["flag"] else
                                                         "Pooled and stratified differences agree in sign."),
                           "bad" if s["flag"] else ""))

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


def ledger_section(ledger: Any, arms: list[str]) -> list[Block]:
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


def reproducibility_section(inp: Inputs, tracker: Tracker, parent_id: str) -> list[Block]:
    flow = inp.flow
    tags = tracker.client.get_run(parent_id).data.tags
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
    rows = [
        ["flow run", f"{flow.flow_run_id} ({len(flow.runs)} stage runs)"],
        ["spec", f"{flow.spec_path} (spec hash {tags.get('twinarm.spec_hash', 'not tagged')})"],
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
        ["MLflow", f"{tracking_uri(tracker.home)} · parent run {parent_id}"],
        ["lineage", str(tracker.home.lineage_db)],
        ["report built", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {socket.gethostname()} with Python "
                         f"{platform.python_version()}, " + ", ".join(f"{p} {v or 'absent'}" for p, v in package_versions(REPORT_PACKAGES).items())],
    ]
    return [Heading("Reproducibility"), Table(["", ""], rows,
                                              caption="packages are those of the process that built this report")]


# ---------------------------------------------------------------- rendering

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 28px;color:#1d2330;max-width:1200px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:14px 0 6px;border-bottom:1px solid #dde}
h3{font-size:14px;margin:12px 0 4px}p{margin:4px 0}
table{border-collapse:collapse;margin:4px 0 8px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d6d9e0;padding:2px 7px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f1f3f7}img{max-width:100%}
caption{caption-side:bottom;text-align:left;color:#667;font-size:12px;padding-top:2px}
.note{color:#667;font-size:12px}.bad{color:#b3261e;font-weight:600}.good{color:#1e7b34;font-weight:600}
.s-ok{color:#1e7b34;font-weight:700}.s-bad{color:#b3261e;font-weight:700}.s-open{color:#8a6d00;font-weight:700}
pre{background:#f6f7f9;padding:6px;white-space:pre-wrap;font-size:12px;margin:2px 0}
figure{margin:6px 0}figcaption{color:#667;font-size:12px}summary{cursor:pointer}
"""
_STATUS_CLASS = {"✓": "s-ok", "✗": "s-bad", "☐": "s-open"}


def _cell(text: str, tag: str) -> str:
    cls = _STATUS_CLASS.get(text)
    return f"<{tag}{f' class={cls}' if cls else ''}>{html.escape(text)}</{tag}>"


def block_html(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p{f' class={b.cls}' if b.cls else ''}>{html.escape(b.text)}</p>"
    if isinstance(b, Table):
        head = "".join(_cell(c, "th") for c in b.columns) if any(b.columns) else ""
        body = "".join("<tr>" + "".join(_cell(c, "td") for c in row) + "</tr>" for row in b.rows)
        caption = f"<caption>{html.escape(b.caption)}</caption>" if b.caption else ""
        return f"<table>{caption}{f'<tr>{head}</tr>' if head else ''}{body}</table>"
    if isinstance(b, Figure):  # embedded, so the page stands alone (MLflow's artifact viewer, a copied file)
        data = base64.b64encode(b.path.read_bytes()).decode()
        return (f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    if isinstance(b, Code):
        return f"<pre>{html.escape(b.text)}</pre>"
    return (f"<details><summary>{html.escape(b.summary)}</summary>" + "".join(block_html(x) for x in b.blocks)
            + "</details>")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def block_md(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {b.text}"
    if isinstance(b, Para):
        return b.text
    if isinstance(b, Table):
        lines = ["| " + " | ".join(_md_cell(c) for c in b.columns) + " |", "|" + "---|" * len(b.columns)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        return "\n".join(lines) + (f"\n\n*{b.caption}*" if b.caption else "")
    if isinstance(b, Figure):
        return f"![{b.caption}]({b.path.name})"
    if isinstance(b, Code):
        return f"```{b.lang}\n{b.text}\n```"
    return f"**{b.summary}**\n\n" + "\n\n".join(block_md(x) for x in b.blocks)


def render(title: str, subtitle: str, screen: list[Block], rest: list[Block]) -> tuple[str, str]:
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=note>{html.escape(subtitle)}</p>"
            + "".join(block_html(b) for b in screen) + "<hr>" + "".join(block_html(b) for b in rest)
            + "</body></html>")
    md = f"# {title}\n\n*{subtitle}*\n\n" + "\n\n".join(block_md(b) for b in [*screen, *rest]) + "\n"
    return page, md


# ---------------------------------------------------------------- entry point

def build_report(home: Home, ablation: str, out_dir: Path | None = None, domain_step: int | None = None) -> Path:
    """Write report.html, report.md, ledger.json and the figures for the ablation's latest flow run into out_dir
    (default TWINARM_HOME/reports/<ablation>), log them to the MLflow parent run under `report/`, and return the
    HTML path."""
    lineage = Lineage(home.lineage_db)
    inp = gather(lineage, ablation)
    tracker = Tracker(home)
    parent_id = tracker.find_parent(ablation)
    if parent_id is None:
        raise TwinarmError(f"ablation '{ablation}' has no MLflow parent run in {tracking_uri(home)} (is "
                           f"MLFLOW_TRACKING_URI pointing at the store its flow used?)")
    out = Path(out_dir) if out_dir else home.reports / ablation
    out.mkdir(parents=True, exist_ok=True)
    ledger = run_ledger(lineage, ablation)
    arms = inp.flow.arms

    verdicts: list[tuple[str, ContrastSpec, str, Row | None]] = []
    simpsons: dict[str, Row] = {}
    if inp.heldout_rows:
        final = final_steps(inp.heldout_rows)
        final_rows = at_steps(inp.heldout_rows, final)
        simpsons = {name: quartile_simpson(final_rows, c.treatment, c.control) for name, c in inp.contrasts.items()
                    if {c.treatment, c.control} <= set(final)}
        suites = sorted({r["suite"] for r in inp.heldout_rows})
        ev = inp.eval
        for name, c in inp.contrasts.items():
            for suite in suites + (["all suites"] if len(suites) > 1 else []):
                rows = inp.heldout_rows if suite == "all suites" else [r for r in inp.heldout_rows
                                                                       if r["suite"] == suite]
                verdicts.append((name, c, suite, contrast_delta(rows, c, final, ev.bootstrap_resamples, ev.seed)))

    screen = first_screen(inp, ledger, verdicts, simpsons)
    rest = [*val_section(inp, arms, out, domain_step), *heldout_section(inp, simpsons, out),
            *ledger_section(ledger, arms),
            *reproducibility_section(inp, tracker, parent_id)]
    page, md = render(f"twinarm report — {ablation}", f"arms: {', '.join(arms)} · built from lineage "
                                                      f"{home.lineage_db}", screen, rest)
    ledger_json = json.dumps(ledger.to_json(), indent=2, ensure_ascii=False)
    written = [*(b.path for b in _walk([*screen, *rest]) if isinstance(b, Figure)),
               atomic_write_bytes(out / "report.md", md.encode()),
               atomic_write_bytes(out / "ledger.json", ledger_json.encode()),
               atomic_write_bytes(out / "report.html", page.encode())]
    for path in written:  # overwritten on purpose: the parent run shows the report of the latest flow run
        tracker.client.log_artifact(parent_id, str(path), "report")
    return written[-1]


def _walk(blocks: list[Block]) -> list[Block]:
    return [x for b in blocks for x in ([b, *_walk(b.blocks)] if isinstance(b, Details) else [b])]
