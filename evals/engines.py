"""The generation engine by name (`eval.engine`: hf | vllm), and what the evaluation protocol records of it.

`engine_identity` is part of the protocol (its hash keys stored results), so results of different engines, or
of different versions of one, never share a key, and the audit sees the engine in every evaluation's facts.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.errors import DataError

if TYPE_CHECKING:
    from evals.engine import GenerationEngine

ENGINES = ("hf", "vllm")


def engine_identity(name: str) -> dict[str, Any]:
    """What the evaluation protocol records of an engine: its name and the version of the generating library
    (transformers for hf, with the HF engine's decoding loop; vLLM of the engine environment for vllm, read from
    its metadata without starting it).
    Raises DataError for an unknown name or a missing engine environment."""
    if name == "hf":
        from importlib.metadata import version

        from evals.engine import HF_DECODE

        return {"name": "hf", "version": version("transformers"), "torch": version("torch"), "decode": HF_DECODE}
    if name == "vllm":
        from evals.vllm_engine import env_versions  # EngineError when the engine environment is missing

        found = env_versions()
        return {"name": "vllm", "version": found["vllm"], "torch": found["torch"]}
    raise _unknown(name)


def make_engine(name: str, model_dir: Path, device: str, precision: str) -> "GenerationEngine":
    """The engine `name` serving the checkpoint in model_dir (close() it when done). DataError for an unknown
    name; EngineError (evals.vllm_engine) when the vLLM engine cannot start."""
    from worlds.tokenizer import load_tokenizer

    if name not in ENGINES:
        raise _unknown(name)
    tokenizer = load_tokenizer(model_dir)
    if name == "vllm":
        from evals.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, tokenizer, device=device, precision=precision)
    from evals.engine import HFEngine
    from worlds.model import load_model

    return HFEngine(load_model(model_dir, device), tokenizer, device=device, precision=precision)


def _unknown(name: str) -> DataError:
    return DataError(f"eval.engine: unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
