"""Belief replay (DESIGN §6): how one RL rollout moved the frozen reference model between the gold answer and its
decoy, sentence by sentence.

At every boundary of the response (start, sentence ends, the edges of closed meta blocks, end) the belief
B(x∘y[:pos]) = Σ_{t∈D} [log π(g_t | ·, g_<t) − log π(d_t | ·, d_<t)] is scored under the arm's SFT model (the
scorer its PMI-shift reward used) with the reward code's own belief function, so the replay shows exactly what
the signal saw: at a block's open tag B is PMI-shift's o (unmatched position), at its close tag B is c.
Everything is read back from lineage: the rollout parquet of the arm's RL run, its prompts and its init model.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from audit.flowrun import latest_flow
from infra.artifacts import atomic_write_bytes, read_parquet
from infra.errors import TwinarmError, UsageError
from infra.home import Home
from infra.lineage import Lineage
from infra.spec import ComputeSpec, load_spec
from meta.grammar import META_CLOSE, META_OPEN, find_blocks

# a sentence ends after . ! ? followed by whitespace (not inside 3.5), or after a run of line breaks
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n+")


@dataclass(frozen=True)
class Boundary:
    pos: int  # character offset into the response: the scored context is prompt + response[:pos]
    kind: str  # start | sentence | meta_open | meta_close | end


def boundaries(response: str, open_tag: str = META_OPEN, close_tag: str = META_CLOSE) -> list[Boundary]:
    """Start, sentence ends, edges of closed meta blocks and end, one per position (a block edge names it)."""
    kinds = {0: "start"}
    for m in _SENTENCE_END.finditer(response):
        kinds.setdefault(m.end(), "sentence")
    for b in find_blocks(response, open_tag, close_tag):
        kinds[b.start], kinds[b.end] = "meta_open", "meta_close"
    kinds.setdefault(len(response), "end")
    return [Boundary(pos, kind) for pos, kind in sorted(kinds.items())]


@dataclass
class Replay:
    ablation: str
    arm: str
    seed: int | None
    step: int
    rollout: int
    prompt_id: str
    gold: str
    decoy: str
    correct: bool
    scorer: str  # the frozen reference model's directory
    response: str
    blocks: list[tuple[int, int]]  # closed meta blocks (start, end) in the response
    points: list[dict[str, Any]] = field(default_factory=list)  # pos, kind, belief, terms, piece
    recorded: dict[str, Any] = field(default_factory=dict)  # the signal as training recorded it


def replay(home: Home, ablation: str, arm: str | None = None, step: int | None = None,
           rollout: int | None = None) -> Replay:
    """Replay one rollout of the ablation's latest flow run. Defaults: the first contrast's treatment arm (else the
    first arm), its first seed, the last RL step, and among its rollouts with a usable decoy the first of those
    with a closed meta block and the most boundaries (the most to watch)."""
    from evals.engine import render_prompt
    from rewards.scorer import HFScorer
    # the reward's own gold/decoy pairing (skip rules included) and belief terms, not a re-implementation
    from rewards.signals import SignalContext, _belief_terms, _pair
    from worlds.model import resolve_device

    flow = latest_flow(Lineage(home.lineage_db), ablation)
    rl_runs = flow.stage("rl")
    if arm is None:
        contrasts = load_spec(flow.spec_path).contrasts.values()
        arm = next((c.treatment for c in contrasts if c.treatment in flow.arms), flow.arms[0])
    runs = [r for r in rl_runs if r.arm == arm]
    if not runs:
        raise UsageError(f"--arm: no completed RL run of arm '{arm}' in ablation '{ablation}'; arms with one: "
                         f"{', '.join(sorted({r.arm for r in rl_runs})) or 'none'}")
    run = runs[0]
    files = {int(p.stem.split("-")[1]): p for p in run.output_path("rollouts").glob("step-*.parquet")}
    step = max(files) if step is None else step
    if step not in files:
        raise UsageError(f"--step: arm '{arm}' has no rollouts at step {step}; steps: {sorted(files)}")
    rows = read_parquet(files[step])
    if rollout is not None and not 0 <= rollout < len(rows):
        raise UsageError(f"--rollout: step {step} of arm '{arm}' has rollouts 0..{len(rows) - 1}, not {rollout}")

    scorer = HFScorer.from_pretrained(str(run.input_path("init")),
                                      device=resolve_device(ComputeSpec(**run.config["executor.compute"])))
    ctx = SignalContext(scorer=scorer, tokenizer=scorer.tokenizer)
    if rollout is None:
        usable = [i for i, r in enumerate(rows) if not isinstance(_pair(ctx, r["gold"], r["decoy"]), str)]
        if not usable:
            raise TwinarmError(f"no rollout of arm '{arm}' at step {step} has a usable decoy (gold and decoy must "
                               f"tokenise to the same length)")
        rollout = max(usable, key=lambda i: (rows[i]["n_blocks"] > 0, len(boundaries(rows[i]["response"]))))
    row = rows[rollout]
    pair = _pair(ctx, row["gold"], row["decoy"])
    if isinstance(pair, str):
        raise UsageError(f"--rollout {rollout}: the belief is undefined for this rollout ({pair}; gold "
                         f"{row['gold']!r}, decoy {row['decoy']!r})")
    prompt = next(p for p in read_parquet(run.input_path("prompts")) if p["id"] == row["prompt_id"])
    context = render_prompt(scorer.tokenizer, prompt["prompt"])
    response = row["response"]
    bounds = boundaries(response)
    terms = _belief_terms(ctx, [(context + response[:b.pos], pair) for b in bounds])
    # piece: the text read since the previous boundary
    points = [{"pos": b.pos, "kind": b.kind, "belief": sum(t), "terms": t, "piece": response[prev.pos:b.pos]}
              for prev, b, t in zip([bounds[0], *bounds], bounds, terms)]
    return Replay(ablation=ablation, arm=arm, seed=run.seed, step=step, rollout=rollout, prompt_id=row["prompt_id"],
                  gold=row["gold"], decoy=row["decoy"], correct=bool(row["correct"]),
                  scorer=str(run.input_path("init")), response=response,
                  blocks=[(b.start, b.end) for b in find_blocks(response)], points=points,
                  recorded={"signal": row["signal"], "signal_value": row["signal_value"],
                            "signal_extras": json.loads(row["signal_extras"] or "{}")})


def tail_text(text: str, width: int = 44) -> str:
    """The end of a piece of text, on one line."""
    flat = text.replace("\n", "⏎")
    return "(start)" if not flat else ("…" + flat[-width:] if len(flat) > width else flat)


def plot_belief(rep: Replay, path: Path) -> Path:
    """One row per boundary, top to bottom: a decoy←→gold bar and the belief's dot on it; the dots are joined so
    the movement reads down the page; rows inside a closed meta block are shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    beliefs = [p["belief"] for p in rep.points]
    lim = max(1.0, 1.15 * max(abs(b) for b in beliefs))
    n = len(beliefs)
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.36 * n), dpi=110)
    gradient = np.linspace(-1, 1, 256)[None, :]
    for i in range(n):
        ax.imshow(gradient, cmap="RdYlGn", alpha=0.45, aspect="auto", extent=(-lim, lim, i + 0.28, i - 0.28))
    for start, end in rep.blocks:
        rows = [i for i, p in enumerate(rep.points) if start <= p["pos"] <= end]
        if rows:
            ax.axhspan(rows[0] - 0.45, rows[-1] + 0.45, color="#7b61ff", alpha=0.12, zorder=0)
            ax.text(lim * 1.02, (rows[0] + rows[-1]) / 2, "meta\nblock", va="center", fontsize=8, color="#5b3fd6")
    ys = np.arange(n)
    ax.plot(beliefs, ys, color="#333", linewidth=1, alpha=0.6, zorder=2)
    ax.scatter(beliefs, ys, s=46, color="#111", edgecolor="white", linewidth=1.2, zorder=3)
    for y, b in zip(ys, beliefs):
        ax.text(b + lim * 0.02, y, f"{b:+.2f}", ha="left", va="center", fontsize=7, zorder=4)
    ax.axvline(0, color="#555", linewidth=0.8, linestyle=":")
    ax.set_yticks(ys, [f"{tail_text(p['piece'])}  [{p['kind']}]" for p in rep.points], fontsize=7,
                  family="monospace")
    ax.set_ylim(n - 0.5, -0.7)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel(f"belief B = Σ log π(gold) − log π(decoy)      ← decoy {rep.decoy}  |  gold {rep.gold} →")
    ax.set_title(f"{rep.ablation} · {rep.arm} (seed {rep.seed}) · step {rep.step} · rollout {rep.rollout} "
                 f"({'correct' if rep.correct else 'wrong'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_replay(home: Home, ablation: str, arm: str | None = None, step: int | None = None,
                 rollout: int | None = None, out: Path | None = None) -> tuple[Replay, Path, Path]:
    """Replay, draw the PNG and write the numbers as JSON beside it (same name, .json)."""
    rep = replay(home, ablation, arm, step, rollout)
    png = Path(out) if out else home.reports / ablation / f"belief-{rep.arm}-s{rep.seed}-step{rep.step}-" \
                                                         f"r{rep.rollout}.png"
    if png.suffix != ".png":
        raise UsageError(f"--out: expected a .png path, got {png}")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_belief(rep, png)
    numbers = png.with_suffix(".json")
    atomic_write_bytes(numbers, json.dumps(asdict(rep), indent=2, ensure_ascii=False).encode())
    return rep, png, numbers
