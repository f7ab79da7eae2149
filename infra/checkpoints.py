"""Training checkpoints shared by every trainer (base model, SFT, GRPO): HF weights (+ tokenizer) + optimizer +
RNG + a JSON state, written atomically as `checkpoints/step-NNNNNNN/`.

A checkpoint directory is complete exactly when it exists under its final name (atomic rename), so a trainer
killed mid-save leaves only a hidden temporary that the next start removes; resuming never sees a half-written
checkpoint. `model/` is a self-contained HF model directory (config, safetensors, tokenizer) that sweeps and
evaluations load directly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.artifacts import atomic_path, clean_stale_tmp

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKPOINTS = "checkpoints"


def step_of(path: Path) -> int:
    """The step of a `step-NNNNNNN` checkpoint directory (ValueError or IndexError for any other name)."""
    return int(Path(path).name.split("-", 1)[1])


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under out_dir, oldest first (removes temporaries of killed writers)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    clean_stale_tmp(root)
    return sorted((p for p in root.glob("step-*") if (p / "state.json").is_file()), key=step_of)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under out_dir, or None (removes temporaries of killed writers)."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def save_checkpoint(out_dir: Path, step: int, model: "PreTrainedModel", optimizer: "torch.optim.Optimizer",
                    state: dict[str, Any], tokenizer: "PreTrainedTokenizerBase | None" = None,
                    keep: int | None = None) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` (None: all of them)."""
    import torch

    final = Path(out_dir) / CHECKPOINTS / f"step-{step:07d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp / "model"), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "model"))
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.random.get_rng_state()},
                   tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True, default=str))
    if keep is not None:
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: "PreTrainedModel", optimizer: "torch.optim.Optimizer") -> dict[str, Any]:
    """Restore weights, optimizer and torch RNG in place; return the saved state."""
    import torch
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for shard in sorted((Path(path) / "model").glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied embeddings are saved once: the only key allowed to be missing is the tied output head
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {unexpected})")
    extra = torch.load(Path(path) / "optim.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    torch.random.set_rng_state(extra["torch_rng"])
    return json.loads((Path(path) / "state.json").read_text())
