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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.artifacts import read_parquet, write_parquet
from infra.hashing import hash_json

if TYPE_CHECKING:
    from evals.engine import GenerationEngine

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
    engine: dict[str, Any]  # generation engine name and versions (evals.engines.engine_identity)

    @property
    def key(self) -> str:
        return hash_json(self.__dict__)


def sample_and_grade(engine: "GenerationEngine", tokenizer: Any, grader: Any, suite: str,
                     rows: list[dict[str, Any]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                     seed: int) -> list[dict[str, Any]]:
    """n samples per prompt row, graded, with closed-meta facts and the meta-strip regrade."""
    from evals.engine import render_prompt, seed_for
    from sft.grammar import find_blocks, strip_meta

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
            "confidence": next((b.confidence for b in blocks if b.confidence is not None), None),
            "stripped_correct": regrades[i].correct if i in regrades else grade.correct,
        })
    return out


def evaluate_model(model_dir: Path, suites: dict[str, list[dict[str, Any]]], protocol: Protocol, grader: Any,
                   device: str, precision: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, runtime facts of the engine that generated them) with the protocol's engine."""
    from evals.engines import make_engine

    engine = make_engine(protocol.engine["name"], model_dir, device, precision)
    try:
        rows: list[dict[str, Any]] = []
        for name, suite_rows in suites.items():
            rows += sample_and_grade(engine, engine.tokenizer, grader, name, suite_rows, protocol.n[name],
                                     protocol.temperature, protocol.top_p, protocol.max_new_tokens, protocol.seed)
        return rows, engine.facts()
    finally:
        engine.close()


@dataclass(frozen=True)
class Entry:
    """A checkpoint to evaluate, and the labels its rows get."""

    arm: str
    seed: int
    step: int
    checkpoint_id: str
    model_dir: Path


class ResultStore:
    """Per-checkpoint results under one protocol. `engine_facts`: runtime facts of the last engine that evaluated
    here (versions it reported, start-up time) and how many checkpoints were evaluated now."""

    def __init__(self, root: Path, protocol: Protocol):
        self.dir = Path(root) / protocol.key
        self.protocol = protocol
        self.engine_facts: dict[str, Any] = {"engine": protocol.engine["name"], "evaluated_now": 0}

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
                rows, facts = evaluate_model(entry.model_dir, suites, self.protocol, grader, device, precision)
                write_parquet(rows, self.path(entry.checkpoint_id))
                self.engine_facts = {**facts, "evaluated_now": self.engine_facts["evaluated_now"] + 1}
                bar.advance(checkpoint=f"{entry.arm}@{entry.step}",
                            samples_per_s=len(rows) / (time.perf_counter() - t0))
        return todo

    def rows(self, entries: list[Entry]) -> list[dict[str, Any]]:
        """Stored rows of the entries, labelled with arm, seed and step."""
        return [{"arm": e.arm, "seed": e.seed, "step": e.step, **r} for e in entries
                for r in read_parquet(self.path(e.checkpoint_id))]
