"""SFT through verl's SFT trainer (verl.trainer.sft_trainer, config `sft_trainer_engine`) with OUR loss masks.

`TwinarmSFTDataset` is a dataset class for verl's `data.custom_cls` (verl.trainer.sft_trainer.create_sft_dataset
constructs it as `cls(parquet_files=, tokenizer=, config=, processor=, max_samples=)`). It reads our SFT rows (id,
messages, wrong_prefix: the twins' layout, sft/twins.py) and encodes them with THE mask rule of the local trainer,
sft.masks.encode_rows: the prompt, the wrong prefix, environment output and everything after the final end-of-turn
token are not trained. It returns verl's no-padding items, {input_ids, position_ids, loss_mask} (1-D), where
loss_mask[t] = 1 exactly when the local trainer's label of token t is not IGNORE: verl's sft_loss (verl.workers.
utils.losses) rolls the mask left by one to align it with the log-prob of token t, as HF's loss shifts labels.
Only `data.pad_mode: no_padding` carries a per-token mask in verl 0.9.1 (right padding trains a response_mask it
builds itself), so any other pad mode is refused. The tokenizer is the model directory's own (worlds.tokenizer.
load_tokenizer on the tokenizer's name_or_path when that is a directory), the tokenizer the local trainer masks
with: verl loads tokenizers with AutoTokenizer, which next to a qwen2 config.json picks Qwen2Tokenizer for our
locally trained tokenizer (worlds/tokenizer.py), and the mask is cut by the tokenizer's character offsets.

`sft_overrides` translates the SFT stage's config slice to verl SFT overrides; `check_sft` composes verl's shipped
`sft_trainer_engine` config with them (Hydra, as `python -m verl.trainer.sft_trainer` does) and validates the
engine, optimizer, checkpoint and profiler sections through verl's config dataclasses, and the dataset class as
verl resolves it. Not wired into the flow's SFT stage (see docs/gpu-cluster.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from infra.artifacts import write_parquet
from infra.errors import DataError
from infra.spec import SFTSpec, VerlSpec
from rewards.verl_adapter import model_tokenizer
from rl.verl_config import VerlConfigError, config_dir, render, verl_version

DATASET = ("pkg://rl.verl_sft", "TwinarmSFTDataset")
PAD_MODE = "no_padding"


def sft_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()),
                      ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                      ("wrong_prefix", pa.string())])


def write_sft_parquet(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Our SFT rows (after sft.meta_blocks) as the parquet TwinarmSFTDataset reads (atomic, deterministic)."""
    write_parquet([{"id": str(r["id"]), "messages": [{"role": m["role"], "content": m["content"]}
                                                     for m in r["messages"]],
                    "wrong_prefix": r.get("wrong_prefix")} for r in rows], Path(path), schema=sft_schema())


try:
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover - torch is a dependency
    _Dataset = object  # type: ignore[assignment, misc]


class TwinarmSFTDataset(_Dataset):
    """verl SFT dataset with our loss masks (see the module docstring). Raises DataError naming the file, the row
    and the field for a row the mask rule refuses (too long, nothing left to train, a template that hides the
    content), and for a pad mode other than no_padding or a truncation other than error."""

    def __init__(self, parquet_files: str | Sequence[str], tokenizer: Any, config: Any, processor: Any = None,
                 max_samples: int = -1) -> None:
        import pyarrow.parquet as pq

        from sft.masks import IGNORE, encode_rows

        get = config.get if hasattr(config, "get") else (lambda k, d=None: d)
        if get("pad_mode", PAD_MODE) != PAD_MODE:
            raise DataError(f"data.pad_mode '{get('pad_mode')}': the twinarm SFT dataset returns per-token loss "
                            f"masks, which verl {verl_version()}'s SFT loss reads only with pad_mode {PAD_MODE}")
        if get("truncation", "error") != "error":
            raise DataError(f"data.truncation '{get('truncation')}': a truncated row would train on a cut "
                            f"conversation; the local trainer refuses rows over max_length (truncation: error)")
        files = [parquet_files] if isinstance(parquet_files, (str, Path)) else list(parquet_files)
        tokenizer = model_tokenizer(tokenizer)
        max_length = int(get("max_length", 1024))
        self.rows: list[tuple[list[int], list[int]]] = []
        for f in files:
            rows = pq.read_table(str(f)).to_pylist()
            for i, row in enumerate(rows):
                for field in ("id", "messages"):
                    if not row.get(field):
                        raise DataError(f"{f}: row {i}: field '{field}': expected a non-empty value, got "
                                        f"{row.get(field)!r}")
            self.rows += [(ids, [int(t != IGNORE) for t in labels])
                          for ids, labels in encode_rows(tokenizer, rows, max_length, where=str(f))]
        if max_samples is not None and 0 < max_samples < len(self.rows):
            self.rows = self.rows[:max_samples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> dict[str, Any]:
        import torch

        ids, mask = self.rows[item]
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "position_ids": torch.arange(len(ids), dtype=torch.long),
                "loss_mask": torch.tensor(mask, dtype=torch.long)}


# verl SFT key → the spec key behind it
SFT_SOURCES = {"optim.lr": "sft.lr", "optim.weight_decay": "sft.weight_decay", "optim.clip_grad": "sft.grad_clip",
               "optim.lr_warmup_steps_ratio": "sft.warmup_ratio", "trainer.total_epochs": "sft.epochs",
               "data.train_batch_size": "sft.batch_size", "data.max_length": "sft.max_length",
               "data.max_token_len_per_gpu": "sft.max_length", "trainer.seed": "seed",
               "trainer.nnodes": "executor.verl.nnodes", "trainer.n_gpus_per_node": "executor.verl.n_gpus_per_node",
               "engine.dtype": "executor.compute.precision"}


def sft_overrides(sft: SFTSpec, verl: VerlSpec, precision: str, seed: int, *, train_files: str, model: str,
                  checkpoints: str, ablation: str, arm: str) -> dict[str, Any]:
    """verl SFT overrides of one arm × seed, {verl key: value}: AdamW (betas 0.9/0.999) at sft.lr with linear
    warmup over sft.warmup_ratio of the steps then cosine to 0 (the local trainer's sft.train.lr_at shape), grad
    clip, weight decay, sft.epochs over the rows, global batch sft.batch_size, our dataset and its no-padding mode,
    rows over sft.max_length refused, the model's dtype from executor.compute.precision."""
    return {
        "data.train_files": train_files, "data.val_files": None, "data.train_batch_size": sft.batch_size,
        "data.max_length": sft.max_length, "data.max_token_len_per_gpu": 2 * sft.max_length,
        "data.pad_mode": PAD_MODE, "data.truncation": "error", "data.use_dynamic_bsz": True,
        "data.custom_cls.path": DATASET[0], "data.custom_cls.name": DATASET[1],
        "model.path": model,
        "engine.dtype": "float32" if precision == "fp32" else "bfloat16",
        "optim.optimizer": "AdamW", "optim.lr": sft.lr, "optim.betas": [0.9, 0.999],
        "optim.weight_decay": sft.weight_decay, "optim.clip_grad": sft.grad_clip,
        "optim.lr_scheduler_type": "cosine", "optim.lr_warmup_steps_ratio": sft.warmup_ratio,
        "optim.min_lr_ratio": 0.0, "optim.num_cycles": 0.5,
        "trainer.total_epochs": sft.epochs, "trainer.seed": seed, "trainer.save_freq": -1, "trainer.test_freq": -1,
        "trainer.nnodes": verl.nnodes, "trainer.n_gpus_per_node": verl.n_gpus_per_node, "trainer.device": "cuda",
        "trainer.logger": ["console", "mlflow"], "trainer.project_name": ablation,
        "trainer.experiment_name": f"{arm}-seed{seed}-sft", "trainer.default_local_dir": checkpoints,
        "trainer.resume_mode": "auto",
    }


def compose_sft(overrides: list[str]) -> Any:
    """verl's `sft_trainer_engine` config with the overrides, composed by Hydra as verl's SFT entrypoint does.
    Raises VerlConfigError naming an override verl's SFT config has no key for."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, OverrideParseException

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            return compose("sft_trainer_engine", overrides=list(overrides))
    except (ConfigCompositionException, OverrideParseException) as exc:
        msg = str(exc)
        key = next((o.split("=", 1)[0] for o in overrides if f"'{o.split('=', 1)[0]}'" in msg), "?")
        raise VerlConfigError(f"verl SFT override '{key}'{_sft_source(key)}: verl {verl_version()}'s "
                              f"sft_trainer_engine config refuses it ({msg.splitlines()[0]})") from None


def _sft_source(key: str) -> str:
    src = SFT_SOURCES.get(key.lstrip("+"))
    return f" (from spec key {src})" if src else " (a fixed setting)"


def check_sft(overrides: list[str]) -> dict[str, Any]:
    """compose_sft, then verl's own dataclasses on the engine, optim, checkpoint and profiler sections (what
    SFTTrainer._build_config instantiates; the model section loads the model, so only its keys are checked) and the
    dataset class resolved as verl's create_sft_dataset does. Returns what was validated; raises VerlConfigError
    naming the section and the spec key behind it."""
    from torch.utils.data import Dataset
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.import_utils import load_extern_object

    config = compose_sft(overrides)
    checked = {}
    for section in ("engine", "optim", "checkpoint", "profiler"):
        try:
            checked[section] = type(omega_conf_to_dataclass(config[section])).__name__
        except Exception as exc:  # verl's dataclasses raise ValueError/AssertionError/TypeError on a bad value
            keys = [k for k in (o.split("=", 1)[0] for o in overrides) if k.lstrip("+").startswith(section + ".")]
            sources = sorted({SFT_SOURCES[k] for k in keys if k in SFT_SOURCES})
            raise VerlConfigError(f"verl SFT section '{section}' (spec keys {', '.join(sources) or 'none'}): "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    cls = load_extern_object(config.data.custom_cls.path, config.data.custom_cls.name)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise VerlConfigError(f"data.custom_cls {config.data.custom_cls.name}: not a torch Dataset")
    checked["data.custom_cls"] = cls.__name__
    return checked

