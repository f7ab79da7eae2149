"""Stage: the start model both arms share. Toy: a tokenizer trained on the world's text and a tiny Qwen2
trained on plain solutions to the stated val accuracy. Otherwise: a hub id or local path with the meta tokens
added to its vocabulary (so both twins tokenise identically)."""
from __future__ import annotations

from infra.artifacts import read_parquet
from infra.errors import DataError
from infra.spec import ComputeSpec, GraderSpec, ModelSpec
from tasks.common import Stage, StageCall, StageOutput, store

CORPUS_ROLES = ("base", "sft1", "sft2", "rl_prompts", "val")  # never the held-out: it stays unseen


def base_model_body(call: StageCall) -> StageOutput:
    """Train the toy tokenizer + model on the world's base split (or prepare a hub model with the meta tokens);
    output role `model` (an HF checkpoint dir). Raises DataError when a toy model has no arith base split."""
    from sft.base import prepare_pretrained, train_base_model

    cfg = call.config
    model = ModelSpec(**cfg["model"])
    compute = ComputeSpec(**cfg["executor.compute"])
    if model.source != "toy":
        info = prepare_pretrained(model, call.workdir)
        art = store(call).describe(call.workdir / "model", kind="checkpoint", step=0)
        return StageOutput(outputs={"model": art}, facts=info, summary={"source": model.source})
    if "base" not in call.inputs:
        raise DataError("model.source 'toy' trains on the arith world's base split: give at least one data source "
                        "of kind 'arith', or use a pretrained model")
    from worlds.arith import world_texts

    splits = {role: read_parquet(call.input_path(role)) for role in CORPUS_ROLES if role in call.inputs}
    grader = GraderSpec(**cfg["grader"])
    metrics = train_base_model(splits["base"], splits["val"], world_texts(splits), model.toy, model.base_training,
                               compute, grader, call.workdir, threads=compute.cpu_threads,
                               ranks=compute.shared_cpu_processes)
    art = store(call).describe(call.workdir / "model", kind="checkpoint", step=metrics["steps"])
    rows = [("base/val_accuracy", e["accuracy"], e["step"]) for e in metrics["evals"]]
    facts = {k: metrics[k] for k in ("params", "vocab_size", "steps", "stopped", "val_accuracy",
                                     "val_accuracy_by_domain", "precision", "device")}
    return StageOutput(outputs={"model": art}, facts=facts, metrics=rows,
                       summary={"params": metrics["params"], "val_acc": round(metrics["val_accuracy"], 3),
                                "steps": metrics["steps"]})


# shared by every arm and run once, in the flow process
STAGE = Stage("base_model", base_model_body, config_keys=("model", "grader", "executor.compute"),
              inputs=CORPUS_ROLES, outputs=("model",), trains=True)
