"""The tiny model factory (Qwen2 architecture) and the device / precision / thread helpers every stage uses.

bf16 autocast on CPU is only worth it (2.5–3× faster here) when the CPU has native BF16 instructions; without
them it is emulated and slower, so `resolve_precision` detects them instead of assuming.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from infra.errors import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from infra.spec import ComputeSpec, ToyModelSpec


# The attention every model twinarm trains, samples from or scores with (toy_model, load_model, the PMI-shift
# scorer): transformers' eager attention, except that queries continuing a KV cache (a decoding step, a scored
# continuation) of a grouped-query model attend per key/value head (grouped_attention). Registered with
# transformers' AttentionInterface under this name when a model is made.
ATTENTION = "twinarm_eager"
# model families whose eager attention is the plain one (scaled scores + additive mask, softmax, weighted sum):
# grouped_attention reproduces exactly that; any other family (Gemma-2's score soft-capping, attention sinks, ...)
# keeps its own eager attention for every call
PLAIN_EAGER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def grouped_attention(module: "torch.nn.Module", query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
                      attention_mask: "torch.Tensor | None", scaling: float, dropout: float = 0.0, **kwargs: object
                      ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Eager attention (transformers' `eager_attention_forward` of the module's own model family) with one
    deviation for queries that continue a KV cache under grouped-query attention (GQA; Ainslie et al. 2023,
    arXiv 2305.13245).

    query [B, H, L, D], key/value [B, KV, T, D] with H = KV·g, attention_mask additive [B, 1, L, T] (or None for a
    one-token query). Eager attention first copies every key/value head g times (`repeat_kv`: the whole cache, at
    every decoding step) and then multiplies per query head. When the L queries continue a longer cache (L < T) the
    g query heads that share a key/value head are instead stacked as g·L rows of one product against that head:
    query [B, KV, g·L, D] @ key^T [B, KV, D, T], the mask repeated for each stacked head. Every output element is the
    same dot product, softmax and weighted sum as eager's, without the copy (tests/test_tokenizer_model.py: equal to
    eager within fp32 rounding, and bit-identical decoding in bf16 on the demo box): a demo RL batch (16 prompts ×
    8, bf16, 1 thread) decodes in about a third less time (the GRPO step's sampling: 2.05 → 1.35–1.42 s).
    Training and prompt passes (L == T), and every call of a family outside PLAIN_EAGER_FAMILIES, are eager's own.
    Returns (output [B, L, H, D], weights [B, H, L, T]) like eager."""
    import importlib

    import torch

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, length, d = query.shape
    where = type(module).__module__  # transformers.models.<family>.modeling_<family>
    family = where.split(".")[-2] if "." in where else where
    if length >= key.shape[2] or groups == 1 or (dropout and module.training) or (
            attention_mask is None and length > 1) or family not in PLAIN_EAGER_FAMILIES:
        eager = importlib.import_module(where).eager_attention_forward
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    weights = torch.matmul(query.reshape(b, h // groups, groups * length, d), key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # [B, 1, L, T]: row r·L + l of the stacked queries is query l of head r
        weights = weights + (attention_mask if length == 1 else attention_mask.repeat(1, 1, groups, 1))
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).reshape(b, h, length, d).transpose(1, 2).contiguous()
    return out, weights.reshape(b, h, length, -1)


def register_attention() -> str:
    """Register ATTENTION with transformers (idempotent; eager's mask) and return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    return ATTENTION


def toy_model(spec: "ToyModelSpec", tokenizer: "PreTrainedTokenizerFast", seed: int) -> "PreTrainedModel":
    """A freshly initialised Qwen2ForCausalLM sized by the spec (same seed → same weights), fp32 master
    weights, eager attention with grouped decoding (ATTENTION: the fastest at these sizes on CPU, and exact under
    autocast)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise DataError(f"toy model: hidden_size {spec.hidden_size} must be a multiple of num_heads "
                        f"{spec.num_heads}, which must be a multiple of num_kv_heads {spec.num_kv_heads}")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, use_cache=True, attn_implementation=register_attention())
    with seeded(seed):
        model = Qwen2ForCausalLM(config)
    return model.to(torch.float32)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run under a fixed torch seed without disturbing the caller's global RNG."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def n_params(model: "PreTrainedModel") -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: "PreTrainedModel", out_dir: Path) -> Path:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def load_model(path: Path, device: str = "cpu") -> "PreTrainedModel":
    """Reload in fp32 (the master precision) whatever the checkpoint's dtype note says, with ATTENTION."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation=register_attention())
    return model.to(device)


# ---------------------------------------------------------------- compute

def resolve_device(compute: "ComputeSpec") -> str:
    import torch

    if compute.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if compute.device == "cuda" and not torch.cuda.is_available():
        raise DataError("executor.compute.device is 'cuda' but no CUDA device is available")
    return compute.device


def cpu_has_bf16() -> bool:
    """Native BF16 instructions (AVX512-BF16 or AMX-BF16). Linux reports them in /proc/cpuinfo; elsewhere we
    do not know, and say no."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(compute: "ComputeSpec", device: str) -> str:
    """'bf16' or 'fp32'. auto → bf16 on a GPU that supports it or on a CPU with native BF16, else fp32."""
    import torch

    if compute.precision != "auto":
        return compute.precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision around forward passes: weights and optimizer stay fp32."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(n: int | None) -> int:
    """Torch intra-op threads: n, or all the CPUs this process may use. Returns the number set."""
    import torch

    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n
