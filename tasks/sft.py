"""Stage: SFT of one arm on its twin (the meta side, or the no-meta side when sft.strip_meta) with the shared
mask rule. Same seed → same example order in every arm (the twins share ids and order)."""
from __future__ import annotations

from typing import Any

from infra.artifacts import atomic_path, read_parquet
from infra.hashing import hash_json
from infra.spec import ComputeSpec, SFTSpec
from tasks.common import Stage, StageCall, StageOutput, live_metrics, store


def sft_body(call: StageCall) -> StageOutput:
    """Train `init` on the arm's twin rows (sft1 then sft2, block contents as sft.meta_blocks says) with the shared
    mask rule; output role `model`; facts: rows seen, example order hash, LR per step, tokens trained, final loss."""
    from sft.masa_demos import with_meta_predictions
    from sft.meta_blocks import meta_block_form
    from sft.train import TrainConfig, batch_indices, train_lm
    from worlds.model import load_model, save_model, set_threads
    from worlds.tokenizer import load_tokenizer, save_tokenizer

    set_threads(ComputeSpec(**call.config["executor.compute"]).cpu_threads)
    cfg = SFTSpec(**call.config["sft"])
    seed = call.config["seed"]
    rows = [r for role in ("sft1", "sft2") if role in call.inputs for r in read_parquet(call.input_path(role))]
    rows, form_facts = meta_block_form(rows, cfg.meta_blocks, seed=seed)  # the meta side's block form
    init = call.input_path("init")
    tokenizer, model = load_tokenizer(init), load_model(init)
    rows, demo_facts = with_meta_predictions(rows, cfg.meta_predictions, seed, tokenizer, cfg.meta_prediction_fit,
                                             model, ComputeSpec(**call.config["executor.compute"]))  # MASA's template
    config = TrainConfig.from_sft(cfg, len(rows))
    log = live_metrics(call)

    def on_step(rec: dict[str, Any]) -> None:
        log([("sft/loss", rec["loss"], rec["step"]), ("sft/lr", rec["lr"], rec["step"]),
             ("sft/tokens", rec["tokens"], rec["step"])])

    run = train_lm(model, tokenizer, rows, config, call.workdir / "train", seed,
                   ComputeSpec(**call.config["executor.compute"]), on_step=on_step, where="sft rows")
    with atomic_path(call.workdir / "model") as tmp:
        save_model(model, tmp)
        save_tokenizer(tokenizer, tmp)
    order = [rows[i]["id"] for s in range(run["steps"]) for i in batch_indices(s, len(rows), cfg.batch_size, seed)]
    history = run["history"]
    metrics = [(k, r[f], r["step"]) for r in history for k, f in (("sft/loss", "loss"), ("sft/lr", "lr"),
                                                                   ("sft/tokens", "tokens"))]
    facts = {"rows_seen": len(rows), "example_order": hash_json(order), "lr_per_step": [r["lr"] for r in history],
             "tokens_trained": run["tokens"], "steps": run["steps"], "strip_meta": cfg.strip_meta,
             "final_loss": run["final_loss"], "device": run["device"], "precision": run["precision"], **form_facts,
             **demo_facts}
    art = store(call).describe(call.workdir / "model", kind="checkpoint", step=run["steps"])
    return StageOutput(outputs={"model": art}, facts=facts, metrics=metrics,
                       summary={"rows": len(rows), "steps": run["steps"], "loss": round(run["final_loss"], 4)})


STAGE = Stage("sft", sft_body, config_keys=("sft", "executor.compute", "seed"), inputs=("init", "sft1", "sft2"),
              outputs=("model",), per_arm=True, placed=True, trains=True)
