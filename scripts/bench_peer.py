"""Peer benchmark: twinarm's local GRPO step against Hugging Face TRL's GRPOTrainer on identical work.

    .venv/bin/python -m pip install -e '.[bench]'     # TRL (a benchmark extra, not a runtime dependency)
    .venv/bin/python scripts/bench_peer.py [--home .twinarm] [--ablation demo] [--spec configs/demo.yaml]
                                           [--arm control] [--steps 6] [--json out.json]
    .venv/bin/python scripts/bench_peer.py --init DIR --prompts rl_prompts.parquet   # any SFT model + prompts

Identical work on both sides: the control arm's SFT model (fp32 master weights, eager attention), the same
`batch_size` prompts per step in the same order (twinarm's seeded permutation; TRL reads them unshuffled), `n`
samples each drawn by HF `generate` under the same torch seed per step (so both sides sample the same tokens; the
report says whether they did), `rl.temperature`, top_p 1, at most `rl.max_response_length` tokens, one torch
thread, bf16 autocast where the CPU has it (twinarm's precision "auto"; TRL `bf16=True`), the same grader's
correctness reward (+1 / −1), no KL (TRL beta 0), clip 0.2 / 0.28 (TRL epsilon / epsilon_high), token-mean loss
(TRL loss_type "dapo" on one process), no std scaling of advantages (TRL scale_rewards "none"), constant LR, the
same AdamW settings and grad clip. Two layouts:
- one-step: the whole batch is one mini-batch, one optimizer step per batch (TRL per_device_train_batch_size =
  batch × n, steps_per_generation 1);
- demo: `rl.mini_batch_size` prompts per mini-batch, i.e. the demo's two optimizer steps per batch (TRL
  steps_per_generation 2).

Each side runs in its own process (so peak RSS is its own); the parent lets them take steps in turn (one batch
each, alternating who goes first) so machine noise hits both alike. Per layout and side: median step seconds over
steps 2..K (step 1 is warm-up), the median of the per-step paired ratio twinarm / TRL, the generation share
(generate seconds / step seconds), peak RSS, mean response tokens. A twinarm step is its loop's `time/step_s`
(sample, grade, score, update; twinarm's step K+1 would also validate and is never run); a TRL step is
`on_step_begin` → `on_step_end` of its optimizer steps for that batch.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


class _Stop(Exception):
    """The parent has all the steps it asked for."""


def _rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _setup(job: dict) -> tuple[Any, list[dict], list[dict]]:
    from infra.artifacts import read_parquet
    from infra.spec import RLSpec
    from worlds.model import set_threads

    set_threads(1)
    rl = RLSpec(**job["rl"])
    prompts = read_parquet(Path(job["prompts"]))
    return rl, prompts, prompts[:1]


def twinarm_worker(conn: Any, job: dict) -> None:
    """train_grpo with an on_step hook that hands the turn back to the parent after every step."""
    from infra.artifacts import read_parquet
    from infra.spec import ComputeSpec, GraderSpec
    from rl.grpo import train_grpo

    rl, prompts, val = _setup(job)
    with tempfile.TemporaryDirectory() as tmp:
        def on_step(step: int, values: dict[str, float]) -> None:
            if step > 0:
                rows = read_parquet(Path(tmp) / "rollouts" / f"step-{step:07d}.parquet")
                conn.send({"step_s": values["time/step_s"], "gen_s": values["time/sample_s"],
                           "resp_tokens": values["train/response_length/mean"],
                           "lengths": [r["n_tokens"] for r in rows]})
            if conn.recv() == "stop":
                raise _Stop

        try:
            train_grpo(Path(job["init"]), prompts, val, rl, GraderSpec(**job["grader"]),
                       ComputeSpec(device="cpu", precision="auto", cpu_threads=1), job["seed"], Path(tmp),
                       on_step=on_step)
        except _Stop:
            pass
    conn.send({"peak_rss_mb": _rss_mb()})


def trl_worker(conn: Any, job: dict) -> None:
    """TRL's GRPOTrainer on the same prompts in the same order; a callback hands the turn back after each batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from evals.engine import stop_ids
    from infra.spec import GraderSpec
    from rewards.grader import get_grader
    from rl.grpo import derived_seed, prompt_indices
    from worlds.model import seeded
    from worlds.tokenizer import load_tokenizer

    rl, prompts, _ = _setup(job)
    steps = job["steps"] + 1  # one more than asked, never run: the parent stops the last one before it starts
    order = [prompts[i] for s in range(1, steps + 1) for i in prompt_indices(s, len(prompts), rl.batch_size,
                                                                            job["seed"])]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])}
                              for r in order])
    tok = load_tokenizer(Path(job["init"]))
    model = AutoModelForCausalLM.from_pretrained(job["init"], dtype=torch.float32, attn_implementation="eager")
    grader = get_grader(GraderSpec(**job["grader"]))

    def correctness(completions: list, answer: list[str], **_: Any) -> list[float]:
        grades = grader.grade([c[0]["content"] for c in completions], answer)
        return [1.0 if g.correct else -1.0 for g in grades]

    per_batch = rl.batch_size * rl.n
    mini = rl.mini_batch_size * rl.n
    state = {"batch": 0, "gen_s": 0.0, "t0": 0.0, "opt_steps": 0, "step_s": 0.0, "lengths": []}
    real_generate = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        state["batch"] += 1
        t0 = time.perf_counter()
        with seeded(derived_seed("rollout", job["seed"], state["batch"])):  # twinarm's seed for the same step
            out = real_generate(*args, **kwargs)
        state["gen_s"] += time.perf_counter() - t0
        prompt_len = kwargs["input_ids"].shape[1]
        stop = set(stop_ids(tok))
        for row in out[:, prompt_len:].tolist():
            end = next((i for i, t in enumerate(row) if t in stop), None)
            state["lengths"].append(len(row) if end is None else end + 1)
        return out

    model.generate = generate

    class Turns(TrainerCallback):
        def on_step_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            if state["opt_steps"] % (per_batch // mini) == 0:  # the first optimizer step of a batch
                if conn.recv() == "stop":
                    raise _Stop
                state.update(step_s=0.0, gen_s=0.0, lengths=[])
            state["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            state["step_s"] += time.perf_counter() - state["t0"]
            state["opt_steps"] += 1
            if state["opt_steps"] % (per_batch // mini) == 0:
                conn.send({"step_s": state["step_s"], "gen_s": state["gen_s"],
                           "resp_tokens": statistics.mean(state["lengths"]), "lengths": list(state["lengths"])})

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=job["bf16"], report_to="none", save_strategy="no", logging_steps=1,
            seed=job["seed"], shuffle_dataset=False, per_device_train_batch_size=mini,
            steps_per_generation=per_batch // mini, gradient_accumulation_steps=1, num_iterations=1,
            num_generations=rl.n, max_completion_length=rl.max_response_length, temperature=rl.temperature,
            top_p=1.0, top_k=0, beta=0.0, epsilon=rl.clip_low, epsilon_high=rl.clip_high, loss_type="dapo",
            scale_rewards="none", learning_rate=rl.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=rl.weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            max_grad_norm=rl.grad_clip, max_steps=steps * (per_batch // mini), disable_dropout=True,
            dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[Turns()])
        try:
            trainer.train()
        except _Stop:
            pass
    conn.send({"peak_rss_mb": _rss_mb()})


def run_layout(job: dict, steps: int) -> dict:
    """Both sides in their own processes, one batch at a time in turn."""
    ctx = mp.get_context("spawn")
    sides = {}
    for name, target in (("twinarm", twinarm_worker), ("trl", trl_worker)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, {**job, "steps": steps}), name=f"bench-{name}")
        proc.start()
        sides[name] = {"conn": parent, "proc": proc, "steps": []}
    for step in range(1, steps + 1):
        order = ["twinarm", "trl"] if step % 2 else ["trl", "twinarm"]
        for name in order:
            sides[name]["conn"].send("go")
            sides[name]["steps"].append(sides[name]["conn"].recv())
        print(json.dumps({"step": step, **{n: {k: round(v, 3) for k, v in s["steps"][-1].items()
                                              if isinstance(v, float)} for n, s in sides.items()}}), flush=True)
    out: dict = {}
    for name, side in sides.items():
        side["conn"].send("stop")
        final = side["conn"].recv()
        side["proc"].join(timeout=120)
        timed = side["steps"][1:]  # step 1 is warm-up
        out[name] = {"median_step_s": round(statistics.median(s["step_s"] for s in timed), 3),
                     "generation_share": round(sum(s["gen_s"] for s in timed) / sum(s["step_s"] for s in timed), 3),
                     "resp_tokens_mean": round(statistics.mean(s["resp_tokens"] for s in timed), 1),
                     "peak_rss_mb": final["peak_rss_mb"],
                     "step_s": [round(s["step_s"], 3) for s in side["steps"]]}
    pairs = [a["step_s"] / b["step_s"] for a, b in zip(sides["twinarm"]["steps"][1:], sides["trl"]["steps"][1:])]
    out["paired_ratio_median"] = round(statistics.median(pairs), 3)
    # the same sampled tokens on both sides shows as the same response length for every rollout, in order
    out["same_samples_per_step"] = [a["lengths"] == b["lengths"] for a, b in zip(sides["twinarm"]["steps"],
                                                                                 sides["trl"]["steps"])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("TWINARM_HOME", ".twinarm")))
    ap.add_argument("--ablation", default="demo")
    ap.add_argument("--spec", default="configs/demo.yaml")
    ap.add_argument("--arm", default="control", help="whose SFT model both sides start from")
    ap.add_argument("--init", type=Path, default=None, help="an SFT model directory (instead of the ablation's)")
    ap.add_argument("--prompts", type=Path, default=None, help="an rl_prompts parquet (instead of the ablation's)")
    ap.add_argument("--steps", type=int, default=6, help="batches per side and layout (the first is warm-up)")
    ap.add_argument("--layouts", default="one-step,demo")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()

    from infra.spec import load_spec, resolved_arms
    from worlds.model import cpu_has_bf16

    cfg = resolved_arms(load_spec(args.spec))[args.arm]
    init, prompts = args.init, args.prompts
    if init is None or prompts is None:
        os.environ["TWINARM_HOME"] = str(args.home.resolve())
        from bench_rl import _artifact_path
        from infra.home import configure_environment
        from infra.lineage import Lineage
        from tasks.common import SHARED

        configure_environment()
        lineage = Lineage(args.home.resolve() / "lineage.duckdb")
        init = init or _artifact_path(lineage, args.ablation, "sft", args.arm, "model")
        prompts = prompts or _artifact_path(lineage, args.ablation, "data", SHARED, "rl_prompts")
    rl = cfg.rl.model_copy(update={"reward": "vanilla", "kl_coef": 0.0, "clip_low": 0.2, "clip_high": 0.28,
                                   "loss_agg": "token-mean", "adv_norm_std": False, "top_p": 1.0,
                                   "lr_warmup_steps": 0, "steps": args.steps + 1, "save_freq": args.steps + 1,
                                   "test_freq": args.steps + 1})
    result: dict = {"init": str(init), "steps": args.steps, "cpus": os.cpu_count(), "threads_per_side": 1,
                    "bf16": cpu_has_bf16(),
                    "batch": f"{rl.batch_size} prompts x {rl.n} samples, <= {rl.max_response_length} tokens, "
                             f"T={rl.temperature}", "layouts": {}}
    for layout in args.layouts.split(","):
        mini = {"one-step": rl.batch_size, "demo": cfg.rl.mini_batch_size}[layout]
        job = {"init": str(init), "prompts": str(prompts), "seed": cfg.seeds[0], "bf16": result["bf16"],
               "grader": cfg.grader.model_dump(mode="json"),
               "rl": rl.model_copy(update={"mini_batch_size": mini}).model_dump(mode="json")}
        print(f"layout {layout}: {rl.batch_size // mini} optimizer step(s) per batch", flush=True)
        res = run_layout(job, args.steps)
        res["twinarm_over_trl"] = round(res["twinarm"]["median_step_s"] / res["trl"]["median_step_s"], 3)
        result["layouts"][layout] = res
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
