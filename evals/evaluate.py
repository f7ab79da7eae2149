"""Sampling + grading of checkpoints on prompt rows: one function for RL validation, checkpoint sweeps and the
held-out job, so every number is measured the same way (DESIGN §8).

A result is one row per problem × sample (SAMPLE_COLUMNS). Each response is also regraded with its meta blocks
stripped ("meta-strip regrade"): a flip means the grader's verdict depended on text inside a block.

Results are stored per checkpoint under `<results>/<protocol key>/<checkpoint id>.parquet` (both content
hashes): a job evaluates only the checkpoints without a result, so the ablation's held-out stage, a resumed
job and the nightly flow never evaluate a checkpoint twice under the same protocol.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.artifacts import read_parquet, write_parquet
from infra.hashing import hash_json
from infra.roles import CheckpointRole

if TYPE_CHECKING:
    from evals.engine import GenerationEngine
    from infra.spec import EvalSpec, RLSpec

SAMPLE_COLUMNS = ("suite", "problem_id", "domain", "level", "sample", "response", "extracted", "correct",
                  "length", "truncated", "n_blocks", "categories", "confidence", "stripped_correct")


@dataclass(frozen=True)
class Protocol:
    """Everything that defines a measurement; its hash keys the stored results."""

    temperature: float
    top_p: float
    n: dict[str, int]  # samples per problem, per suite
    seed: int
    max_new_tokens: int
    grader: dict[str, Any]  # grader config and version
    suites: dict[str, str]  # suite -> hash of its rows

    @property
    def key(self) -> str:
        return hash_json(self.__dict__)


def grader_identity(grader: Any) -> dict[str, Any]:
    """What makes two gradings the same grading: version, config, call path (not the counters)."""
    facts = grader.facts()
    return {k: facts[k] for k in ("grader_version", "config", "call_path")}


def val_sampling(rl: "RLSpec") -> dict[str, Any]:
    """THE val-mix sampling settings, used by validation during RL and by the checkpoint sweep alike:
    {temperature, top_p, n, max_new_tokens} (temperature 0 = greedy)."""
    return {"temperature": rl.val_temperature, "top_p": rl.top_p, "n": rl.val_n,
            "max_new_tokens": rl.max_response_length}


def val_protocol(rl: "RLSpec", seed: int, grader: Any, val_id: str) -> Protocol:
    """The protocol of a checkpoint sweep on the val mix (suite 'val', rows with content id `val_id`)."""
    s = val_sampling(rl)
    return Protocol(temperature=s["temperature"], top_p=s["top_p"], n={"val": s["n"]}, seed=seed,
                    max_new_tokens=s["max_new_tokens"], grader=grader_identity(grader), suites={"val": val_id})


def heldout_protocol(ev: "EvalSpec", grader: Any, suites: dict[str, str]) -> Protocol:
    """The held-out protocol (DESIGN §8): eval.* sampling, n per suite (eval.n_per_suite overrides eval.n), one
    seed; `suites` maps suite name -> content id of its rows."""
    return Protocol(temperature=ev.temperature, top_p=ev.top_p, n={s: ev.n_per_suite.get(s, ev.n) for s in suites},
                    seed=ev.seed, max_new_tokens=ev.max_new_tokens, grader=grader_identity(grader),
                    suites=dict(suites))


def seed_for(*parts: Any) -> int:
    return int(hash_json(list(parts), 8), 16) & 0x7FFFFFFF


def sample_and_grade(engine: "GenerationEngine", tokenizer: Any, grader: Any, suite: str,
                     rows: list[dict[str, Any]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                     seed: int) -> list[dict[str, Any]]:
    """n samples per prompt row, graded, with closed-meta facts and the meta-strip regrade."""
    from evals.engine import render_prompt
    from meta.grammar import find_blocks, stated_confidence, strip_meta

    gens = engine.generate([render_prompt(tokenizer, r["prompt"]) for r in rows], n=n, temperature=temperature,
                           top_p=top_p, max_new_tokens=max_new_tokens, seed=seed_for(seed, suite))
    flat = [(row, k, g) for row, gs in zip(rows, gens) for k, g in enumerate(gs)]
    grades = grader.grade([g.text for _, _, g in flat], [str(row["answer"]) for row, _, _ in flat])
    stripped_idx = [i for i, (_, _, g) in enumerate(flat) if strip_meta(g.text) != g.text]
    regrades = dict(zip(stripped_idx, grader.grade([strip_meta(flat[i][2].text) for i in stripped_idx],
                                                   [str(flat[i][0]["answer"]) for i in stripped_idx])))
    out = []
    for i, ((row, k, g), grade) in enumerate(zip(flat, grades)):
        blocks = find_blocks(g.text)
        out.append({
            "suite": suite, "problem_id": row["id"], "domain": row.get("domain") or suite,
            "level": row.get("level"), "sample": k, "response": g.text, "extracted": grade.extracted,
            "correct": grade.correct, "length": len(g.token_ids), "truncated": g.truncated,
            "n_blocks": len(blocks), "categories": sorted({c for b in blocks for c in b.categories}),
            "confidence": stated_confidence(blocks),
            "stripped_correct": regrades[i].correct if i in regrades else grade.correct,
        })
    return out


def evaluate_model(model_dir: Path, suites: dict[str, list[dict[str, Any]]], protocol: Protocol, grader: Any,
                   device: str, precision: str) -> list[dict[str, Any]]:
    from evals.engine import HFEngine
    from worlds.model import load_model
    from worlds.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    engine = HFEngine(load_model(model_dir, device), tokenizer, device=device, precision=precision)
    rows: list[dict[str, Any]] = []
    for name, suite_rows in suites.items():
        rows += sample_and_grade(engine, tokenizer, grader, name, suite_rows, protocol.n[name],
                                 protocol.temperature, protocol.top_p, protocol.max_new_tokens, protocol.seed)
    return rows


@dataclass(frozen=True)
class Entry:
    """A checkpoint to evaluate, and the labels its rows get."""

    arm: str
    seed: int
    step: int
    checkpoint_id: str
    model_dir: Path


def checkpoint_entries(inputs: dict[str, tuple[str, Path]]) -> list[Entry]:
    """The checkpoints among a stage's inputs ({role: (artifact id, model dir)}), sorted by arm, seed, step."""
    out = []
    for role, (artifact_id, model_dir) in inputs.items():
        ref = CheckpointRole.parse(role)
        if ref is not None:
            out.append(Entry(arm=ref.arm, seed=ref.seed, step=ref.step, checkpoint_id=artifact_id,
                             model_dir=model_dir))
    return sorted(out, key=lambda e: (e.arm, e.seed, e.step))


def evaluate_checkpoints(entries: list[Entry], suites: dict[str, list[dict[str, Any]]], protocol: Protocol,
                         results_dir: Path, grader: Any, device: str, precision: str
                         ) -> tuple[list[dict[str, Any]], list[Entry]]:
    """Every entry's rows under `protocol` (one row per problem × sample, labelled arm/seed/step), evaluating only
    those without a stored result under `results_dir`; returns (rows, entries evaluated now)."""
    store = ResultStore(results_dir, protocol)
    done = store.evaluate(entries, suites, grader, device, precision)
    return store.rows(entries), done


def val_metrics(rows: list[dict[str, Any]], prefix: str = "val") -> dict[str, float]:
    """Pure correctness on val rows: {prefix}/accuracy/pure overall and per domain, and the closed-meta block
    rate {prefix}/meta/block_rate (fractions in [0, 1]; NaN when there are no rows)."""
    def mean(values: list[Any]) -> float:
        return sum(values) / len(values) if values else float("nan")

    by_domain: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_domain[r["domain"]].append(r["correct"])
    metrics = {f"{prefix}/accuracy/pure": mean([r["correct"] for r in rows]),
               f"{prefix}/meta/block_rate": mean([r["n_blocks"] > 0 for r in rows])}
    metrics.update({f"{prefix}/accuracy/pure/{d}": mean(v) for d, v in sorted(by_domain.items())})
    return metrics


class ResultStore:
    def __init__(self, root: Path, protocol: Protocol):
        self.dir = Path(root) / protocol.key
        self.protocol = protocol

    def path(self, checkpoint_id: str) -> Path:
        return self.dir / f"{checkpoint_id}.parquet"

    def missing(self, entries: list[Entry]) -> list[Entry]:
        return [e for e in entries if not self.path(e.checkpoint_id).is_file()]

    def evaluate(self, entries: list[Entry], suites: dict[str, list[dict[str, Any]]], grader: Any, device: str,
                 precision: str) -> list[Entry]:
        """Evaluate the entries without a stored result (each stored atomically as soon as it is done)."""
        from infra.progress import progress

        todo = self.missing(entries)
        with progress("checkpoints evaluated", len(todo)) as bar:
            for entry in todo:
                t0 = time.perf_counter()
                rows = evaluate_model(entry.model_dir, suites, self.protocol, grader, device, precision)
                write_parquet(rows, self.path(entry.checkpoint_id))
                bar.advance(checkpoint=f"{entry.arm}@{entry.step}",
                            samples_per_s=len(rows) / (time.perf_counter() - t0))
        return todo

    def rows(self, entries: list[Entry]) -> list[dict[str, Any]]:
        """Stored rows of the entries, labelled with arm, seed and step."""
        return [{"arm": e.arm, "seed": e.seed, "step": e.step, **r} for e in entries
                for r in read_parquet(self.path(e.checkpoint_id))]
