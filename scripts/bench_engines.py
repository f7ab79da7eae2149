"""HF `generate` vs vLLM (eval.engine) on the same work: a demo-sized toy checkpoint (random init, so every
response runs to max_new_tokens: the worst case), the arith world's held-out prompts, n samples each.

    python scripts/bench_engines.py [--prompts 64] [--n 4] [--max-new 160] [--precision bf16] [--threads 1]
    python scripts/bench_engines.py --server   # also: start-up of vLLM's OpenAI server vs the engine worker
    python scripts/bench_engines.py --rollout  # GRPO rollouts instead: per step, new weights + 16 prompts × 8
    python scripts/bench_engines.py --home .twinarm --ablation demo  # an ablation's held-out job on both engines
    python scripts/bench_engines.py --decode DIR  # HFEngine vs HF `generate` on a trained model (no vLLM needed)

Prints one JSON line per measurement: engine, start-up seconds, generation seconds, samples/s (start-up
included and excluded). Needs `make setup-vllm`. Keep it short on a shared box and say it was contended.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def build_checkpoint(out: Path, seed: int = 0) -> list[str]:
    """Save a demo-sized toy model + tokenizer to out; return the rendered held-out prompts."""
    from evals.engine import render_prompt
    from infra.spec import ArithWorldSpec, ToyModelSpec
    from worlds.arith import generate_world, world_texts
    from worlds.model import save_model, toy_model
    from worlds.tokenizer import save_tokenizer, train_tokenizer

    world = generate_world(ArithWorldSpec(n_base=2000, n_sft1=200, n_sft2=60, n_rl=20, n_val_per_domain=2,
                                          n_heldout=270))
    tokenizer = train_tokenizer(world_texts(world), vocab_size=ToyModelSpec().vocab_size)
    save_model(toy_model(ToyModelSpec(), tokenizer, seed=seed), out)
    save_tokenizer(tokenizer, out)
    return [render_prompt(tokenizer, r["prompt"]) for r in world["heldout"]]


def run(name: str, ckpt: Path, prompts: list[str], n: int, max_new: int, precision: str) -> dict:
    from evals.engines import make_engine

    t0 = time.perf_counter()
    engine = make_engine(name, ckpt, "cpu", precision)
    started = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        gens = engine.generate(prompts, n=n, temperature=0.7, top_p=0.95, max_new_tokens=max_new, seed=0)
        gen_s = time.perf_counter() - t1
    finally:
        engine.close()
    samples = sum(len(g) for g in gens)
    tokens = sum(len(s.token_ids) for g in gens for s in g)
    return {"engine": name, "precision": precision, "samples": samples, "tokens": tokens,
            "startup_s": round(started, 1), "generate_s": round(gen_s, 1),
            "samples_per_s": round(samples / gen_s, 1),
            "samples_per_s_with_startup": round(samples / (gen_s + started), 1)}


def rollout(ckpt: Path, prompts: list[str], steps: int, batch: int, n: int, max_new: int, precision: str) -> list:
    """GRPO-shaped rollouts (the demo's batch): each step perturbs the policy like an optimizer step, then HF
    generates from the model in place, while vLLM first reloads the new weights into its engine process."""
    import torch

    from evals.engine import HFEngine
    from evals.vllm_engine import VLLMEngine
    from worlds.model import load_model
    from worlds.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ckpt)
    model = load_model(ckpt)
    hf = HFEngine(model, tokenizer, precision=precision)
    t0 = time.perf_counter()
    with VLLMEngine(ckpt, tokenizer, precision=precision) as vllm:
        out = [{"engine": "vllm", "startup_s": round(time.perf_counter() - t0, 1)}]
        for step in range(steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0 + 1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
            chunk = prompts[step * batch % len(prompts):][:batch]
            kw = dict(n=n, temperature=0.7, top_p=1.0, max_new_tokens=max_new, seed=step)
            t1 = time.perf_counter()
            hf.generate(chunk, **kw)
            t2 = time.perf_counter()
            reload_engine_s = vllm.load_weights(model)
            t3 = time.perf_counter()
            vllm.generate(chunk, **kw)
            t4 = time.perf_counter()
            out.append({"step": step, "samples": batch * n, "hf_s": round(t2 - t1, 2),
                        "vllm_reload_s": round(t3 - t2, 2), "vllm_reload_engine_s": round(reload_engine_s, 2),
                        "vllm_generate_s": round(t4 - t3, 2), "speedup": round((t2 - t1) / (t4 - t2), 2)})
    return out


def decode(init: Path, batch: int, n: int, max_new: int, precision: str, repeats: int) -> list[dict]:
    """HFEngine (stopped rows leave the batch) vs HF `model.generate` (every row to the end) on one trained
    checkpoint: the arith world's RL prompts, `batch` prompts × n samples at temperature 0.7, alternating
    `repeats` times; CPU seconds of this process (what contention on a shared box disturbs least) and wall
    seconds, mean and longest response; then greedy on the same prompts: how many outputs are identical."""
    import statistics

    import torch

    from evals.engine import HFEngine, finished, render_prompt, stop_ids
    from infra.spec import ArithWorldSpec
    from worlds.arith import generate_world
    from worlds.model import autocast, load_model
    from worlds.tokenizer import load_tokenizer

    model, tok = load_model(init).eval(), load_tokenizer(init)
    world = generate_world(ArithWorldSpec(n_base=10, n_sft1=10, n_sft2=10, n_rl=batch, n_val_per_domain=1,
                                          n_heldout=10))
    prompts = [render_prompt(tok, r["prompt"]) for r in world["rl"][:batch]]
    stop = stop_ids(tok)
    engine = HFEngine(model, tok, precision=precision)

    def reference(temperature: float, seed: int) -> list[list[int]]:
        enc = tok([p for p in prompts for _ in range(n)], return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seed)
        with torch.no_grad(), autocast("cpu", precision):
            seq = model.generate(**enc, max_new_tokens=max_new, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                                 **sampling)
        return [list(finished(tok, r, stop).token_ids) for r in seq[:, enc["input_ids"].shape[1]:].tolist()]

    def ours(temperature: float, seed: int) -> list[list[int]]:
        gens = engine.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new, seed=seed)
        return [list(g.token_ids) for gs in gens for g in gs]

    runs: dict[str, list[tuple[float, float, list[list[int]]]]] = {"hf_engine": [], "hf_generate": []}
    for rep in range(repeats):
        for name, fn in (("hf_engine", ours), ("hf_generate", reference)):
            cpu, wall = time.process_time(), time.perf_counter()
            rows = fn(0.7, rep)
            runs[name].append((time.process_time() - cpu, time.perf_counter() - wall, rows))
    out = []
    for name, rs in runs.items():
        lengths = [len(r) for _, _, rows in rs for r in rows]
        out.append({"engine": name, "samples": batch * n, "max_new_tokens": max_new, "precision": precision,
                     "cpu_s_median": round(statistics.median(r[0] for r in rs), 3),
                     "wall_s_median": round(statistics.median(r[1] for r in rs), 3),
                     "response_tokens_mean": round(statistics.mean(lengths), 1),
                     "response_tokens_max": max(lengths)})
    greedy_same = sum(a == b for a, b in zip(ours(0.0, 0), reference(0.0, 0)))
    out.append({"greedy_identical": f"{greedy_same}/{batch * n}",
                "cpu_ratio_engine_over_generate": round(out[0]["cpu_s_median"] / out[1]["cpu_s_median"], 3)})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_startup(ckpt: Path, precision: str) -> dict:
    """Seconds until vLLM's OpenAI-compatible server answers /health, same engine options as the worker."""
    from evals.vllm_engine import DTYPES, engine_python

    port = free_port()
    cmd = [str(engine_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", DTYPES[precision], "--enforce-eager",
           "--no-enable-chunked-prefill", "--skip-tokenizer-init", "--generation-config", "vllm"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            while time.perf_counter() - t0 < 300 and proc.poll() is None:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    return {"engine": "vllm-openai-server", "startup_s": round(time.perf_counter() - t0, 1)}
                except OSError:
                    time.sleep(0.5)
            log.seek(0)
            return {"engine": "vllm-openai-server", "error": log.read().decode(errors="replace")[-2000:]}
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def heldout_both(home: Path, ablation: str, engines: list[str]) -> list[dict]:
    """The ablation's held-out job (its checkpoints, suites and protocol, read from lineage as the nightly flow
    does) evaluated once per engine into a scratch result store: samples/s and accuracy per checkpoint, so the
    engines can be compared on the same work. Sampled (temperature > 0) outputs differ between engines (different
    RNGs), so accuracies agree within sampling noise, not sample for sample."""
    import os
    from collections import defaultdict

    os.environ["TWINARM_HOME"] = str(home)
    import json as _json

    from evals.evaluate import checkpoint_entries, evaluate_checkpoints, heldout_protocol
    from infra.artifacts import read_parquet, uri_path
    from infra.lineage import Lineage
    from infra.roles import SuiteRole
    from infra.spec import ComputeSpec, ConfigSlice, GraderSpec
    from rewards.grader import get_grader
    from worlds.model import resolve_device, resolve_precision

    lineage = Lineage(home / "lineage.duckdb")
    run = lineage.rows("SELECT run_id, config_json FROM runs WHERE ablation = ? AND stage = 'heldout' AND "
                       "status = 'completed' ORDER BY ended_at DESC LIMIT 1", [ablation])[0]
    config = _json.loads(run["config_json"])
    inputs = {r["role"]: r for r in lineage.rows(
        "SELECT e.role, a.artifact_id, a.uri FROM edges e JOIN artifacts a USING (artifact_id) "
        "WHERE e.run_id = ? AND e.direction = 'in'", [run["run_id"]])}
    compute = ComputeSpec(**config["executor.compute"])
    device = resolve_device(compute)
    grader = get_grader(GraderSpec(**config["grader"]))
    suites = {ref.name: role for role in sorted(inputs) if (ref := SuiteRole.parse(role))}
    rows = {name: read_parquet(uri_path(inputs[role]["uri"])) for name, role in suites.items()}
    job = checkpoint_entries({r: (a["artifact_id"], uri_path(a["uri"])) for r, a in inputs.items()})
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in engines:
            protocol = heldout_protocol(ConfigSlice({**config, "eval.engine": name}, "eval"), grader,
                                        {s: inputs[r]["artifact_id"] for s, r in suites.items()})
            t0 = time.perf_counter()
            got, _, facts = evaluate_checkpoints(job, rows, protocol, Path(tmp) / name, grader, device,
                                                 resolve_precision(compute, device))
            seconds = time.perf_counter() - t0
            acc = defaultdict(list)
            for r in got:
                acc[f"{r['arm']}@{r['step']}"].append(r["correct"])
            out.append({"engine": name, "checkpoints": len(job), "samples": len(got), "seconds": round(seconds, 1),
                        "samples_per_s": round(len(got) / seconds, 1),
                        "accuracy": {k: round(sum(v) / len(v), 4) for k, v in sorted(acc.items())},
                        "engine_facts": facts})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=160)
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both engines (the demo's cpu_threads)")
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--server", action="store_true")
    ap.add_argument("--rollout", action="store_true", help="GRPO rollouts: --steps steps of 16 prompts × --n")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--home", type=Path, help="an ablation's TWINARM_HOME: evaluate its held-out job on each engine")
    ap.add_argument("--ablation", default="demo")
    ap.add_argument("--decode", type=Path, metavar="DIR",
                    help="a trained checkpoint dir (e.g. an ablation's SFT model): HFEngine vs HF generate on "
                         "--batch prompts × --n (default 8) rollouts, --repeats times")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from worlds.model import set_threads

    set_threads(args.threads)
    if args.decode:
        for row in decode(args.decode, args.batch, 8 if args.n == ap.get_default("n") else args.n, args.max_new,
                          args.precision[0], args.repeats):
            print(json.dumps({**row, "threads": args.threads}), flush=True)
        return 0
    if args.home:
        rows = heldout_both(args.home.resolve(), args.ablation, args.engines)
        for row in rows:
            print(json.dumps(row), flush=True)
        if len(rows) == 2:
            print(json.dumps({"vllm_over_hf_samples_per_s": round(rows[1]["samples_per_s"] / rows[0]["samples_per_s"],
                                                                  2)}), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        prompts = build_checkpoint(Path(tmp))[:args.prompts]
        if args.rollout:
            for row in rollout(Path(tmp), prompts, args.steps, 16, args.n, args.max_new, args.precision[0]):
                print(json.dumps({**row, "precision": args.precision[0], "threads": args.threads}), flush=True)
            return 0
        for precision in args.precision:
            for name in args.engines:
                print(json.dumps({**run(name, Path(tmp), prompts, args.n, args.max_new, precision),
                                  "threads": args.threads}), flush=True)
        if args.server:
            print(json.dumps(server_startup(Path(tmp), "fp32")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
