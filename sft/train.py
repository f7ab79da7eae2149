"""The causal-LM trainer for the base model and both SFT arms; rows are encoded with THE loss-mask rule
(sft.masks).

Training (`train_lm`): AdamW, linear warmup then cosine to zero over `max_steps`, grad-norm clipping, token-mean
loss over trained tokens. Example order is a function of (seed, epoch) only, so the same seed gives the same
weights, and a run resumed from its latest checkpoint is identical to one that never stopped.
"""
from __future__ import annotations

import hashlib
import math
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from infra.artifacts import read_json
from infra.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from infra.errors import DataError, TwinarmError
from infra.progress import Progress
from infra.hashing import canonical_json
from sft.masks import IGNORE, encode_rows

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from infra.spec import ComputeSpec, SFTSpec

KEEP_CHECKPOINTS = 2  # a resumable one and the one being superseded
# A batch runs as length-sorted micro-batches of this many rows, their losses weighted by trained tokens so the
# gradient is the batch's token-mean as one pass gives it (up to bf16 rounding): one padded pass pads every row
# to the batch's longest (demo base rows: 63 tokens mean, ~107 longest in a batch of 64); measured on the demo's
# base model, 1 thread, 2-core box with other jobs: 16 rows cut forward+backward CPU time by 31 % (0.62 -> 0.43 s)
# and a whole training step by ~26 % (0.58-0.62 -> 0.44 s wall); 8 rows were no better, 32 saved less.
MICRO_BATCH_ROWS = 16


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run; `max_steps` optimizer steps span the whole LR schedule."""

    lr: float
    batch_size: int
    max_steps: int
    warmup_steps: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    max_length: int = 256
    checkpoint_every: int = 200

    @classmethod
    def from_sft(cls, sft: "SFTSpec", n_rows: int, checkpoint_every: int = 200) -> "TrainConfig":
        steps = sft.epochs * math.ceil(n_rows / sft.batch_size)
        return cls(lr=sft.lr, batch_size=sft.batch_size, max_steps=steps,
                   warmup_steps=round(sft.warmup_ratio * steps), grad_clip=sft.grad_clip,
                   weight_decay=sft.weight_decay, max_length=sft.max_length, checkpoint_every=checkpoint_every)


def lr_at(step: int, config: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine to zero at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))


def batch_indices(step: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Rows of optimizer step `step`: a seeded permutation per epoch, cut in order (last batch may be short).
    Not bucketed by length: that made batches domain-homogeneous and the base model learned far worse
    (11 % vs 61 % greedy val after 700 steps)."""
    import torch

    per_epoch = math.ceil(n_rows / batch_size)
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=gen)
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def _collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple["torch.Tensor", ...]:
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, (x, y) in enumerate(encoded):
        ids[r, :len(x)] = torch.tensor(x)
        labels[r, :len(y)] = torch.tensor(y)
        mask[r, :len(x)] = 1
    return ids, labels, mask


def micro_batches(encoded: list[tuple[list[int], list[int]]], rows: int = MICRO_BATCH_ROWS
                  ) -> list[list[tuple[list[int], list[int]]]]:
    """A batch of encoded (ids, labels) rows sorted by length (stable) and cut into chunks of at most `rows`
    rows, so each chunk pads only to its own longest row."""
    ordered = sorted(encoded, key=lambda e: len(e[0]))
    return [ordered[i:i + rows] for i in range(0, len(ordered), rows)]


def lm_loss(model: "PreTrainedModel", ids: "torch.Tensor", labels: "torch.Tensor", mask: "torch.Tensor"
            ) -> tuple["torch.Tensor", int]:
    """Token-mean next-token loss over labelled positions, and how many there were."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    target = labels[:, 1:]
    n = int((target != IGNORE).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss / max(n, 1), n


def step_parts(encoded: list[tuple[list[int], list[int]]], step: int, batch_size: int, seed: int
               ) -> tuple[list[list[tuple[list[int], list[int]]]], int]:
    """Optimizer step `step`'s batch as length-sorted micro-batches, and its trained-token count (the loss
    weights' denominator)."""
    batch = [encoded[i] for i in batch_indices(step, len(encoded), batch_size, seed)]
    return micro_batches(batch), sum(sum(t != IGNORE for t in labels[1:]) for _, labels in batch)


def accumulate(model: "PreTrainedModel", parts: list[list[tuple[list[int], list[int]]]], pad: int, n_tokens: int,
               device: str, precision: str) -> float:
    """Forward and backward over micro-batches, each loss weighted by its share of the batch's `n_tokens` trained
    tokens, so the accumulated .grad is the batch's token-mean gradient; returns the summed token loss."""
    from worlds.model import autocast

    loss_sum = 0.0
    for part in parts:
        ids, labels, mask = _collate(part, pad)
        with autocast(device, precision):
            loss, n = lm_loss(model, ids.to(device), labels.to(device), mask.to(device))
        (loss * (n / max(n_tokens, 1))).backward()
        loss_sum += loss.item() * n
    return loss_sum


def follower_job(model: "PreTrainedModel", encoded: list[tuple[list[int], list[int]]], config: TrainConfig,
                 seed: int, pad: int, device: str, precision: str) -> dict[str, Any]:
    """What a data-parallel follower (`follow`) needs to rebuild the model and every step's batch."""
    import torch

    return {"model_class": type(model), "model_config": model.config, "encoded": encoded,
            "batch_size": config.batch_size, "seed": seed, "pad": pad, "device": device, "precision": precision,
            "threads": torch.get_num_threads()}


def _optimizer(model: "PreTrainedModel", config: TrainConfig) -> "torch.optim.Optimizer":
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _fingerprint(config: TrainConfig, seed: int, encoded: list[tuple[list[int], list[int]]], ranks: int = 1
                 ) -> str:
    """What a checkpoint must match to be resumed: config, seed, rank count (when > 1) and every row's ids and
    labels."""
    head = {"config": asdict(config), "seed": seed, **({"ranks": ranks} if ranks > 1 else {})}
    digest = hashlib.sha256(canonical_json(head).encode())
    for ids, labels in encoded:
        digest.update(array("q", ids).tobytes() + b"|" + array("q", labels).tobytes() + b"\n")
    return digest.hexdigest()[:16]


def train_lm(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerFast", rows: list[dict[str, Any]],
             config: TrainConfig, out_dir: Path, seed: int, compute: "ComputeSpec",
             on_step: Callable[[dict[str, Any]], bool | None] | None = None, where: str = "rows",
             ranks: int = 1) -> dict[str, Any]:
    """Train `model` in place on SFT rows (the SFT-row contract of `sft.twins.validate_rows`) and return the run's metrics.

    Checkpoints (HF weights + optimizer + RNG + state) go to `out_dir/checkpoints/step-N`, written atomically
    every `config.checkpoint_every` steps and at the end. Called again on the same out_dir it resumes from the
    latest complete checkpoint (a finished run returns at once); a checkpoint of a different run (rows, config
    or seed) is an error. `on_step(record)` runs after every step (record: step, lr, tokens, loss, seconds);
    returning True ends the run early as complete. `ranks` > 1 trains data-parallel on that many processes of
    this process's torch thread count (sft.ranks; this process is rank 0; numerics differ from one rank in
    low-order bits, so a run's checkpoints resume only with the same count). Returns {steps, stopped, seconds,
    tokens, final_loss, history, device, precision, resumed_from, ranks}.
    """
    import torch

    from sft.ranks import Ranks
    from sft.twins import validate_rows
    from worlds.model import resolve_device, resolve_precision

    validate_rows(rows, where)
    out_dir = Path(out_dir)
    device = resolve_device(compute)
    precision = resolve_precision(compute, device)
    if ranks > 1 and device != "cpu":
        raise TwinarmError(f"data-parallel training on {ranks} ranks runs on CPU only, but the device resolved to "
                           f"{device}: set executor.compute.shared_cpu_processes to 1")
    encoded = encode_rows(tokenizer, rows, config.max_length, where)
    fingerprint = _fingerprint(config, seed, encoded, ranks)
    model.to(device).train()
    opt = _optimizer(model, config)
    state: dict[str, Any] = {"step": 0, "done": False, "stopped": None, "history": [], "seconds": 0.0,
                             "fingerprint": fingerprint}
    resumed_from = None
    if (ckpt := latest_checkpoint(out_dir)) is not None:
        if read_json(ckpt / "state.json").get("fingerprint") != fingerprint:
            raise DataError(f"{out_dir}: holds checkpoints of a different training run (rows, config, seed or "
                            f"data-parallel rank count differ); use a fresh directory")
        state = load_checkpoint(ckpt, model, opt)
        resumed_from = state["step"]
    pad = tokenizer.pad_token_id
    last_ckpt = state["step"]
    bar = Progress("train steps", config.max_steps, start=state["step"])
    job = follower_job(model, encoded, config, seed, pad, device, precision)
    with Ranks(1 if state["done"] else ranks, job, out_dir) as group:  # a finished run starts no rank
        while not state["done"]:
            step = state["step"]
            t0 = time.perf_counter()
            lr = lr_at(step, config)
            for param_group in opt.param_groups:
                param_group["lr"] = lr
            parts, n_tokens = step_parts(encoded, step, config.batch_size, seed)
            opt.zero_grad(set_to_none=True)
            mine = group.begin_step(step, model, len(parts))
            loss_sum = group.end_step(model, accumulate(model, [parts[i] for i in mine], pad, n_tokens, device,
                                                        precision))
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            state["seconds"] += time.perf_counter() - t0
            record = {"step": step + 1, "lr": lr, "tokens": n_tokens, "loss": loss_sum / max(n_tokens, 1),
                      "seconds": round(state["seconds"], 4)}
            state["history"].append(record)
            state["step"] = step + 1
            limit = "max_steps" if state["step"] >= config.max_steps else None
            if limit is None and state["step"] - last_ckpt >= config.checkpoint_every:
                save_checkpoint(out_dir, state["step"], model, opt, state, keep=KEEP_CHECKPOINTS)  # before the callback, which may be slow or fail
                last_ckpt = state["step"]
            bar.advance(loss=record["loss"])
            stop = bool(on_step(record)) if on_step else False
            state["stopped"] = "callback" if stop else limit
            state["done"] = state["stopped"] is not None
            if state["done"]:
                save_checkpoint(out_dir, state["step"], model, opt, state, keep=KEEP_CHECKPOINTS)
    bar.close()
    history = state["history"]
    return {"steps": state["step"], "stopped": state["stopped"], "seconds": round(state["seconds"], 3),
            "tokens": sum(r["tokens"] for r in history), "final_loss": history[-1]["loss"] if history else None,
            "history": history, "device": device, "precision": precision, "resumed_from": resumed_from,
            "ranks": ranks}


def follow(job: dict[str, Any]) -> None:
    """A data-parallel follower's loop (sft.ranks starts it as `python -m sft.train JOB`): wait for a step (or
    STOP), take rank 0's weights, run this rank's micro-batches, send the gradients. `job`: model class and config,
    encoded rows, batch size, seed, pad id, device, precision, threads, rank, world, store (follower_job)."""
    import torch
    import torch.distributed as dist
    from torch.nn.utils import vector_to_parameters

    from sft.ranks import STOP, deal, flat_grads, join, ready_file
    from worlds.model import register_attention, set_threads

    set_threads(job["threads"])
    register_attention()  # the config names it; this process has not loaded a model through worlds.model
    model = job["model_class"](job["model_config"]).to(torch.float32).to(job["device"]).train()
    params = list(model.parameters())
    Path(ready_file(job["store"], job["rank"])).touch()  # rank 0 starts the rendezvous once every rank is here
    group = join(job["store"], job["rank"], job["world"])
    try:
        while True:
            control = torch.zeros(1, dtype=torch.long)
            dist.broadcast(control, src=0, group=group)
            step = int(control[0])
            if step == STOP:
                return
            weights = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
            dist.broadcast(weights, src=0, group=group)
            vector_to_parameters(weights, params)
            model.zero_grad(set_to_none=True)
            parts, n_tokens = step_parts(job["encoded"], step, job["batch_size"], job["seed"])
            mine = [parts[i] for i in deal(len(parts), job["world"])[job["rank"]]]
            loss_sum = accumulate(model, mine, job["pad"], n_tokens, job["device"], job["precision"])
            dist.reduce(flat_grads(params), dst=0, group=group)
            dist.reduce(torch.tensor([loss_sum], dtype=torch.float64), dst=0, group=group)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from infra.procs import load_job
    from sft.train import follow as _follow  # the module's own functions, not __main__'s copies

    _follow(load_job())
