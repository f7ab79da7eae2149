"""The report's figures (matplotlib, Agg backend): PNG files written where the caller says, path returned.
Each takes the aggregate tables of evals.metrics (accuracies as fractions, CIs as _lo/_hi)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

Row = dict[str, Any]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(arms: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    return {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}


def plot_val(table: list[Row], arms: list[str], path: Path) -> Path:
    """Val accuracy per RL step, one line per arm with its bootstrap CI band. table: aggregate(..., by=()) rows
    with arm, step, avg_at_k, avg_at_k_lo, avg_at_k_hi (fractions). Writes and returns the PNG path."""
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
    """Val accuracy per domain, bars per arm with CI whiskers. table: aggregate(..., by=("domain",)) rows of one
    step. Writes and returns the PNG path."""
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
    """Reliability diagram: accuracy against stated confidence per bin, one line per arm x step, with the
    diagonal. cal: evals.metrics.calibration rows. Writes and returns the PNG path."""
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


