"""Data-parallel base-model training (sft/ranks.py) against one process, on the demo's base model and data.

    .venv/bin/python scripts/bench_ranks.py [--spec configs/demo.yaml] [--steps 60] [--ranks 1 2] [--repeats 2]

Builds what the base-model stage trains on from the spec alone (the arith world's base split, the toy tokenizer
and model, `model.base_training`'s batch size and lr; no home needed), then runs `sft.train.train_lm` for --steps
steps with each rank count, alternating runs (--repeats rounds) so load on the machine hits both alike. Each rank
process has executor.compute.shared_cpu_threads threads (else cpu_threads), as in the stage. Per run: the
seconds per step over steps 11..N (after warm-up; the stage's own clock), the wall time of the whole call (rank
start-up included) and the final loss; then the medians per rank count and the speedup against 1 rank. The losses
differ only by fp32 summation order (then bf16 autocast amplifies it over steps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(REPO / "configs" / "demo.yaml"),
                        help="the ablation spec whose world, toy model and base training are used")
    parser.add_argument("--arm", default=None, help="the arm whose resolved base is used (default: the first)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (> 10; 1-10 are warm-up)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                        help="rank counts to compare; the first is the reference of the speedup")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternating runs; medians are reported")
    args = parser.parse_args(argv)
    if args.steps <= 10:
        parser.error("--steps must be > 10 (steps 1..10 are warm-up)")

    from infra.spec import load_spec, resolved_arms, stage_compute
    from sft.train import TrainConfig, train_lm
    from worlds.arith import generate_world, world_texts
    from worlds.model import set_threads, toy_model
    from worlds.tokenizer import train_tokenizer

    arms = resolved_arms(load_spec(args.spec))
    cfg = arms[args.arm or next(iter(arms))]
    toy, training = cfg.model.toy, cfg.model.base_training
    threads = stage_compute(cfg.executor.compute.model_dump(), shared=True)["cpu_threads"]
    set_threads(threads)
    world = generate_world(cfg.world)
    tokenizer = train_tokenizer(world_texts(world), toy.vocab_size)
    config = TrainConfig(lr=training.lr, batch_size=training.batch_size, max_steps=args.steps,
                         warmup_steps=min(training.warmup_steps, args.steps), max_length=toy.max_position,
                         checkpoint_every=10 ** 9)
    print(f"{len(world['base'])} base rows, batch {training.batch_size}, {args.steps} steps, {threads} thread(s) "
          f"per rank, precision {cfg.executor.compute.precision}", flush=True)
    per_step: dict[int, list[float]] = {r: [] for r in args.ranks}
    for repeat in range(args.repeats):
        for ranks in args.ranks:
            model = toy_model(toy, tokenizer, training.seed)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                run = train_lm(model, tokenizer, world["base"], config, Path(out), training.seed,
                               cfg.executor.compute, where="base rows", ranks=ranks)
            history = run["history"]
            seconds = (history[-1]["seconds"] - history[9]["seconds"]) / (len(history) - 10)
            per_step[ranks].append(seconds)
            print(f"round {repeat + 1} ranks {ranks}: {seconds:.3f} s/step (steps 11-{args.steps}), call "
                  f"{time.perf_counter() - t0:.1f} s, final loss {history[-1]['loss']:.4f}", flush=True)
    base = statistics.median(per_step[args.ranks[0]])
    for ranks, values in per_step.items():
        median = statistics.median(values)
        print(f"ranks {ranks}: median {median:.3f} s/step; {base / median:.2f}x vs {args.ranks[0]} rank(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
