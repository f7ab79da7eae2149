"""The base-model stage for toy models: a tokenizer trained on the world's text, a fresh tiny model, trained on
plain worked solutions (no meta) by the SFT trainer until greedy val accuracy reaches the target or the step budget
runs out. Both arms start from this one model.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.artifacts import atomic_path, atomic_write_json, read_json
from infra.errors import DataError
from meta.grammar import META_CLOSE, META_OPEN, has_tags

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from infra.spec import BaseTrainingSpec, ComputeSpec, GraderSpec, ModelSpec, ToyModelSpec


def val_accuracy(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", val_rows: list[dict[str, Any]],
                 grader_cfg: "GraderSpec", device: str, precision: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy accuracy on prompt rows, overall and per domain, graded by the shared grader."""
    from evals.engine import HFEngine, render_prompt
    from rewards.grader import get_grader

    engine = HFEngine(model, tokenizer, device=device, precision=precision)
    gens = engine.generate([render_prompt(tokenizer, r["prompt"]) for r in val_rows], n=1, temperature=0.0,
                           max_new_tokens=max_new_tokens)
    grades = get_grader(grader_cfg).grade([g[0].text for g in gens], [r["answer"] for r in val_rows])
    by_domain: dict[str, list[bool]] = defaultdict(list)
    for row, grade in zip(val_rows, grades):
        by_domain[row["domain"]].append(grade.correct)
    return {"accuracy": sum(g.correct for g in grades) / len(grades),
            "by_domain": {d: sum(v) / len(v) for d, v in sorted(by_domain.items())},
            "truncated": sum(g[0].truncated for g in gens) / len(gens)}


def train_base_model(base_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]], corpus: list[str],
                     toy: "ToyModelSpec", training: "BaseTrainingSpec", compute: "ComputeSpec",
                     grader_cfg: "GraderSpec", out_dir: Path, threads: int | None = None,
                     max_new_tokens: int = 160, ranks: int = 1) -> dict[str, Any]:
    """Train the shared base model; return its metrics and save model + tokenizer to `out_dir/model`.

    base_rows: SFT rows without meta blocks (worlds.arith 'base' split); val_rows: prompt rows; corpus: the
    texts the tokenizer learns from (worlds.arith.world_texts). Greedy val accuracy is measured every
    `training.eval_every` steps and at the end; training stops as complete once it reaches
    `training.target_val_accuracy` or at `training.max_steps` (the cosine schedule's length); never on a wall-clock
    budget, so the same spec gives the same model on any machine. `ranks` > 1 trains data-parallel on that many
    processes of `threads` threads each (sft.ranks; val is measured by this process). Calling it again on the same
    out_dir resumes (same tokenizer, latest checkpoint) and a finished run returns its saved metrics.
    Returns {val_accuracy, val_accuracy_by_domain, evals, params, vocab_size, steps, stopped, train_seconds,
    tokenizer_seconds, seconds, precision, device, model_dir}.
    """
    from sft.train import TrainConfig, train_lm
    from worlds.model import n_params, resolve_device, resolve_precision, save_model, set_threads, toy_model
    from worlds.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").is_file():
        return read_json(out_dir / "metrics.json")
    for i, row in enumerate(base_rows):
        if any(has_tags(m.get("content", "")) for m in row.get("messages", [])):
            raise DataError(f"base rows: row {i} (id {row.get('id')!r}): field 'messages': the base model trains "
                            f"on plain solutions, but this row has meta tags")
    if not val_rows:
        raise DataError("base model: no val rows to measure accuracy on")
    t_start = time.perf_counter()
    set_threads(threads)
    device = resolve_device(compute)
    precision = resolve_precision(compute, device)
    tok_dir = out_dir / "tokenizer"
    t0 = time.perf_counter()
    if not tok_dir.is_dir():
        with atomic_path(tok_dir) as tmp:
            save_tokenizer(train_tokenizer(corpus, toy.vocab_size), tmp)
    tokenizer = load_tokenizer(tok_dir)
    tokenizer_seconds = time.perf_counter() - t0
    model = toy_model(toy, tokenizer, training.seed)
    config = TrainConfig(lr=training.lr, batch_size=training.batch_size, max_steps=training.max_steps,
                         warmup_steps=training.warmup_steps, max_length=toy.max_position,
                         checkpoint_every=training.eval_every)
    evals_path = out_dir / "evals.json"
    evals: list[dict[str, Any]] = read_json(evals_path) if evals_path.is_file() else []  # kept across resumes

    def evaluate(step: int, seconds: float) -> dict[str, Any]:
        t = time.perf_counter()
        result = val_accuracy(model, tokenizer, val_rows, grader_cfg, device, precision, max_new_tokens)
        evals.append({"step": step, "train_seconds": seconds, "eval_seconds": round(time.perf_counter() - t, 3),
                      **result})
        atomic_write_json(evals_path, evals)
        return result

    def on_step(record: dict[str, Any]) -> bool:
        if record["step"] % training.eval_every:
            return False
        return evaluate(record["step"], record["seconds"])["accuracy"] >= training.target_val_accuracy

    run = train_lm(model, tokenizer, base_rows, config, out_dir / "train", training.seed, compute, on_step,
                   where="base rows", ranks=ranks)
    if not evals or evals[-1]["step"] != run["steps"]:
        evaluate(run["steps"], run["seconds"])
    with atomic_path(out_dir / "model") as tmp:
        save_model(model, tmp)
        save_tokenizer(tokenizer, tmp)
    final = evals[-1]
    metrics = {"val_accuracy": final["accuracy"], "val_accuracy_by_domain": final["by_domain"], "evals": evals,
               "params": n_params(model), "vocab_size": len(tokenizer), "steps": run["steps"],
               "stopped": "target" if run["stopped"] == "callback" else run["stopped"],
               "train_seconds": run["seconds"], "ranks": ranks,
               "tokenizer_seconds": round(tokenizer_seconds, 3),
               "seconds": round(time.perf_counter() - t_start, 3), "precision": precision, "device": device,
               "model_dir": str(out_dir / "model")}
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def prepare_pretrained(model: "ModelSpec", out_dir: Path) -> dict[str, Any]:
    """A hub id or local path as the shared base model: the meta tags are added to its vocabulary as ordinary
    tokens (decoding keeps them) and the embeddings resized, so both twins tokenise with the same vocabulary.
    Saved to `out_dir/model`; returns facts (source, resolved revision, added tokens, vocabulary size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "model" / "config.json").is_file():
        return read_json(out_dir / "facts.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.source, revision=model.revision)
        lm = AutoModelForCausalLM.from_pretrained(model.source, revision=model.revision, dtype="auto")
    except OSError as exc:
        raise DataError(f"model.source {model.source!r} (revision {model.revision!r}): cannot load: "
                        f"{str(exc).splitlines()[0]}") from None
    added = tokenizer.add_tokens([META_OPEN, META_CLOSE])
    if added:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    with atomic_path(out_dir / "model") as tmp:
        lm.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    facts = {"source": model.source, "revision": model.revision,
             "resolved_revision": getattr(lm.config, "_commit_hash", None), "added_meta_tokens": added,
             "vocab_size": len(tokenizer)}
    atomic_write_json(out_dir / "facts.json", facts)
    return facts
