"""GRPO, local executor: one process, HF transformers generate/forward, CPU or one GPU (DESIGN §5).

One step: sample `batch_size` prompts (a seeded permutation per epoch) → `n` samples each → the shared reward
pipeline (grade → decoys → signal → heads → per-head group centring → token advantages by region) → PPO-clip
updates over mini-batches with verl's own policy loss (clip-higher, dual-clip, token-mean), so the algorithm is
the one the verl executor runs. The control arm takes the same path with the vanilla signal (no scorer is even
loaded, and "scorer calls = 0" is recorded).

Log-probs: old, new and reference log-probs are taken at the sampling temperature (logits / rl.temperature), as
verl's actor computes them. Each mini-batch runs as length-sorted micro-batches (UPDATE_MICRO_ROWS) whose losses
are normalised by the whole mini-batch's tokens / sequences (verl's global_batch_info), so the gradient is the
one-pass gradient without padding every rollout to the longest.

KL: `rl.kl_loss` is verl's `use_kl_loss` with `kl_loss_type: low_var_kl`: rl.kl_coef · token-mean k3 estimate of
KL(π‖π_ref) added to the actor loss (kl_coef > 0 without kl_loss is refused by the spec), π_ref the frozen SFT
result (the same model object as the PMI-shift scorer when the arm has one; loaded once otherwise). With kl_loss
off no reference forward runs at all; on with coefficient 0 (the research runs) the KL is measured, not added.
Facts record `kl.applied`; the metric `actor/kl_loss` is the mean KL of each step.

Schedule and the other actor terms are verl's own (rl/schedule.py): lr_at (constant or cosine with warm-up and
a min-lr floor), entropy bonus entropy_coeff · agg(entropy), rollout top-k (`rl.top_k`, −1 = off).

DAPO (docs/method-cards.md): with `rl.filter_groups.enable` a step's groups come from rl.dapo.dynamic_sampling
(zero-variance groups dropped, more prompts generated up to a cap; counts recorded per step and as the fact
`dynamic_sampling`); `rl.overlong_buffer` is applied by the reward pipeline (rewards.pipeline).

MASA (docs/method-cards.md, "MASA as arms"): with `rl.masa.enable` a step also generates meta-prediction rollouts
(rl.masa.MASARunner: before the solutions, which MASA-efficient may gate, cut short or hint), rewards them against
the same prompts' solution rollouts, adds them to the same PPO update, runs the expert SFT buffer after the update,
and writes them to meta_rollouts/. With it off nothing of MASA runs; the run fact `masa` records zero meta rollouts.

Tool (`tool`, evals/tools.py): with an environment tool, rollouts and validation go through the tool loop; the
tokens the environment appended get mask 0 in the update (verl's response_mask on tool output), so they are in
no log-prob ratio, KL or entropy term and not in the token-mean denominator. The rollout parquet records each
rollout's tool calls, errors and environment token spans.

Rollout engine (`rl.rollout_engine`): hf samples in process with the policy itself; vllm samples in a vLLM engine
process (evals/vllm_engine.py) started on the SFT checkpoint, whose weights are reloaded from the policy after
every update (and after a resume), so every rollout is on-policy up to the engines' numerics; log-probs for the
update are always recomputed by the policy (verl's recompute of old log-probs). Validation and cf regeneration
stay on the in-process engine. The run fact `rollout` records the engine, its versions and the weight-sync time.

Prompt length: a prompt (rl prompts or val) whose rendered chat template is longer than `rl.max_prompt_length`
tokens is REFUSED before training starts, with a DataError naming the set, the prompt id and its length (verl's
`data.truncation: error`). Nothing is truncated: a cut prompt would be a different problem with the same gold.

Every `save_freq` steps (and at the end) a checkpoint is written atomically: HF weights + tokenizer + optimizer
+ RNG + the run's state (metrics so far, LR per step, counters). Every step's rollouts go to parquet; every
`test_freq` steps the val mix is scored with pure correctness per domain. Sampling is seeded per step from
(seed, step), so a run resumed from its latest complete checkpoint ends exactly where an uninterrupted run does.
"""
from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from infra.artifacts import write_parquet
from infra.checkpoints import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint, step_of
from infra.errors import DataError
from infra.hashing import hash_json
from infra.progress import Progress
from infra.spec import ComputeSpec, GraderSpec, RLSpec
from meta.grammar import META_OPEN
from rl.masa import masa_facts
from rl.schedule import KL_LOSS_TYPE, hf_top_k, lr_at

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from rewards.pipeline import Sample

MetricRows = list[tuple[str, float, int]]


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike hash())."""
    return int(hash_json(list(parts), 8), 16) & 0x7FFFFFFF


def prompt_indices(step: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Prompts of RL step `step` (1-based): a seeded permutation per epoch, cut in order, wrapping into the
    next epoch's permutation when the batch straddles two epochs."""
    import numpy as np

    out: list[int] = []
    start = (step - 1) * batch_size
    while len(out) < batch_size:
        epoch, k = divmod(start + len(out), n_rows)
        perm = np.random.default_rng(derived_seed("prompts", seed, epoch)).permutation(n_rows)
        out += perm[k:k + batch_size - len(out)].tolist()
    return out


def _actor_config(rl: RLSpec) -> Any:
    from verl.workers.config.actor import ActorConfig

    mini = rl.mini_batch_size * rl.n
    return ActorConfig(strategy="fsdp", clip_ratio=rl.clip_low, clip_ratio_low=rl.clip_low,
                       clip_ratio_high=rl.clip_high, loss_agg_mode=rl.loss_agg, ppo_mini_batch_size=mini,
                       ppo_micro_batch_size_per_gpu=mini, rollout_n=rl.n, use_kl_loss=rl.kl_loss,
                       kl_loss_coef=rl.kl_coef, kl_loss_type=KL_LOSS_TYPE, entropy_coeff=rl.entropy_coeff)


def _collate(rows: list[tuple], pad_id: int, device: str) -> dict[str, "torch.Tensor"]:
    """Left-pad prompts and right-pad responses so every response starts at the same column. A row is (prompt ids,
    response ids, token advantages) or, with a fourth element, also the response's per-token mask (1 = a policy
    token, 0 = environment output): `resp_mask` is 0 on padding and on environment tokens."""
    import torch

    p_len = max(len(row[0]) for row in rows)
    r_len = max(len(row[1]) for row in rows)
    ids = torch.full((len(rows), p_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp_mask = torch.zeros((len(rows), r_len), dtype=torch.float32)
    adv = torch.zeros((len(rows), r_len), dtype=torch.float32)
    for i, (p, r, a, *m) in enumerate(rows):
        ids[i, p_len - len(p):p_len] = torch.tensor(p)
        ids[i, p_len:p_len + len(r)] = torch.tensor(r)
        attn[i, p_len - len(p):p_len + len(r)] = 1
        resp_mask[i, :len(r)] = torch.tensor(m[0], dtype=torch.float32) if m else 1
        adv[i, :len(r)] = torch.tensor(a)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # what generate() uses under left padding
    return {"ids": ids.to(device), "attn": attn.to(device), "pos": position_ids.to(device),
            "resp_mask": resp_mask.to(device), "adv": adv.to(device), "p_len": torch.tensor(p_len)}


@functools.cache
def _sampled_token_logprob_fn() -> Any:
    """The torch.autograd.Function behind `sampled_token_logprobs` (built on first use: torch is imported lazily)."""
    import torch

    class SampledTokenLogProb(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, logits: "torch.Tensor", targets: "torch.Tensor", temperature: float, chunk: int
                    ) -> "torch.Tensor":
            flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
            acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
            out = torch.empty(flat.shape[0], dtype=acc, device=logits.device)
            lse = torch.empty_like(out)
            for i in range(0, flat.shape[0], chunk):
                x = flat[i:i + chunk].to(acc) / temperature
                lse[i:i + chunk] = torch.logsumexp(x, -1)
                out[i:i + chunk] = x.gather(-1, tgt[i:i + chunk])[:, 0] - lse[i:i + chunk]
            ctx.save_for_backward(logits, targets, lse)
            ctx.temperature, ctx.chunk = temperature, chunk
            return out.view(targets.shape)

        @staticmethod
        def backward(ctx: Any, grad: "torch.Tensor") -> tuple[Any, ...]:
            logits, targets, lse = ctx.saved_tensors
            flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
            g = grad.reshape(-1, 1).to(lse.dtype)
            out = torch.empty_like(flat)
            for i in range(0, flat.shape[0], ctx.chunk):
                x = flat[i:i + ctx.chunk].to(lse.dtype) / ctx.temperature
                d = torch.exp(x - lse[i:i + ctx.chunk, None]).mul_(-g[i:i + ctx.chunk])
                d.scatter_add_(-1, tgt[i:i + ctx.chunk], g[i:i + ctx.chunk])
                out[i:i + ctx.chunk] = d.div_(ctx.temperature)
            return out.view(logits.shape), None, None, None

    return SampledTokenLogProb


def sampled_token_logprobs(logits: "torch.Tensor", targets: "torch.Tensor", temperature: float,
                           chunk_rows: int = 1024) -> "torch.Tensor":
    """log softmax(logits / temperature)[target] in fp32 (fp64 for fp64 logits), shape logits.shape[:-1], without a
    full-vocabulary fp32 tensor: rows of `chunk_rows` positions are upcast, reduced by logsumexp and gathered one
    chunk at a time (verl.utils.torch_functional.logprobs_from_logits_v2's identity log_softmax(x)_t = x_t −
    logsumexp(x)), and the backward recomputes each chunk's softmax from the model-dtype logits it kept:
    ∂/∂x_v = g · (1[v = t] − softmax(x)_v) / temperature. `logits` (..., vocab) in any float dtype; `targets`
    int64 (...). Equal to log_softmax(logits.float() / T).gather(target) up to fp32 rounding."""
    return _sampled_token_logprob_fn().apply(logits, targets, temperature, chunk_rows)


def response_logprobs(model: "PreTrainedModel", batch: dict[str, "torch.Tensor"], device: str, precision: str,
                      temperature: float, with_entropy: bool = False) -> Any:
    """log π(response token | everything before it) at the sampling temperature, shape (rows, response length).

    The logits are divided by `temperature` before the log-softmax, as verl's actor does for old, new and
    reference log-probs (verl.workers.engine.fsdp.transformer_impl), so importance ratios are those of the
    distribution the rollouts were sampled from. Only the response positions go through the LM head
    (`logits_to_keep`), and the log-softmax never materialises fp32 full-vocabulary logits
    (`sampled_token_logprobs`). With `with_entropy`, also the per-token entropy of the tempered distribution
    (rows, response length), verl's entropy_from_logits — that one does materialise the logits, so it is computed
    only when rl.entropy_coeff > 0. Returns lp, or (lp, entropy)."""
    from worlds.model import autocast

    p_len = int(batch["p_len"])
    r_len = batch["resp_mask"].shape[1]
    with autocast(device, precision):
        # responses are right-padded from column p_len, so the last r_len + 1 positions hold every logit needed
        logits = model(input_ids=batch["ids"], attention_mask=batch["attn"], position_ids=batch["pos"],
                       use_cache=False, logits_to_keep=r_len + 1).logits[:, :-1]
    lp = sampled_token_logprobs(logits, batch["ids"][:, p_len:p_len + r_len], temperature)
    if not with_entropy:
        return lp
    from verl.utils.torch_functional import entropy_from_logits

    return lp, entropy_from_logits(logits.float() / temperature)


def grpo_loss(old_lp: "torch.Tensor", new_lp: "torch.Tensor", adv: "torch.Tensor", mask: "torch.Tensor",
              actor_cfg: Any, ref_lp: "torch.Tensor | None" = None, entropy: "torch.Tensor | None" = None
              ) -> tuple["torch.Tensor", dict[str, float]]:
    """The actor loss of one mini-batch, composed as verl 0.9.1's `verl.workers.utils.losses.ppo_loss`: the
    vanilla clipped policy loss (clip-higher, dual-clip) aggregated by `loss_agg_mode`; minus entropy_coeff ·
    agg(entropy) when entropy_coeff > 0; plus, with `use_kl_loss`, kl_loss_coef · agg(kl_penalty(new, ref,
    kl_loss_type)) against the frozen reference (logged even at coefficient 0, as verl does).
    All tensors are (rows, response length) log-probs / advantages / entropies; `mask` is 1 on response tokens.
    Returns (scalar loss, metrics); raises ValueError when a term is on and its input is missing."""
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty

    pg_loss, metrics = compute_policy_loss_vanilla(old_lp, new_lp, adv, mask, loss_agg_mode=actor_cfg.loss_agg_mode,
                                                   config=actor_cfg)
    metrics = {"actor/pg_loss": pg_loss.item(), **metrics}
    loss = pg_loss
    if actor_cfg.entropy_coeff > 0:
        if entropy is None:
            raise ValueError(f"entropy_coeff {actor_cfg.entropy_coeff} needs the per-token entropy of the policy")
        ent = agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=actor_cfg.loss_agg_mode,
                       **actor_cfg.global_batch_info)
        loss = loss - actor_cfg.entropy_coeff * ent
        metrics["actor/entropy_loss"] = ent.item()
    if not actor_cfg.use_kl_loss:
        return loss, metrics
    if ref_lp is None:
        raise ValueError("use_kl_loss is on but no reference log-probs were given")
    kld = kl_penalty(logprob=new_lp, ref_logprob=ref_lp, kl_penalty=actor_cfg.kl_loss_type)
    kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=actor_cfg.loss_agg_mode,
                       **actor_cfg.global_batch_info)
    metrics.update({"actor/kl_loss": kl_loss.item(), "actor/kl_coef": actor_cfg.kl_loss_coef})
    return loss + kl_loss * actor_cfg.kl_loss_coef, metrics


# A mini-batch runs as length-sorted micro-batches of at most this many rollouts, each padded only to its own
# longest, with verl's global-batch normalisation (agg_loss's batch_num_tokens / global_batch_size, as verl's
# engines pass them to micro-batches), so the accumulated gradient is the mini-batch's one-pass gradient up to
# fp32 summation order. One padded pass over 64 rollouts pads every row to the longest response.
UPDATE_MICRO_ROWS = 16
# losses agg_loss normalises by the global batch: micro-batch values are partial sums (verl: AggregationType.SUM);
# every other metric is a per-micro-batch mean, averaged (verl: AggregationType.MEAN)
_SUMMED = ("actor/pg_loss", "actor/entropy_loss", "actor/kl_loss")


def update_micro_batches(rows: list[tuple], rows_per_micro: int | None = None) -> list[list[tuple]]:
    """A mini-batch's rows sorted by prompt + response length (stable) and cut into chunks of at most
    `rows_per_micro` rows (default UPDATE_MICRO_ROWS)."""
    rows_per_micro = rows_per_micro or UPDATE_MICRO_ROWS
    ordered = sorted(rows, key=lambda row: len(row[0]) + len(row[1]))
    return [ordered[i:i + rows_per_micro] for i in range(0, len(ordered), rows_per_micro)]


def ppo_update(model: "PreTrainedModel", optimizer: "torch.optim.Optimizer", rows: list[tuple], rl: RLSpec,
               actor_cfg: Any, pad_id: int, device: str, precision: str,
               ref_model: "PreTrainedModel | None" = None) -> dict[str, float]:
    """One PPO pass over the batch in mini-batches of mini_batch_size prompts × n samples (verl's layout), one
    optimizer step each; a mini-batch's gradient is accumulated over length-sorted micro-batches
    (UPDATE_MICRO_ROWS) under the mini-batch's token and sequence counts (actor_cfg.global_batch_info, verl's
    agg_loss normalisation). Rows as `_collate` takes them (an optional per-token mask leaves environment tokens
    out of every term). `ref_model` (frozen) is run only when the KL loss is on (actor_cfg.use_kl_loss); then it is
    required. Returns each metric per mini-batch (losses summed over its micro-batches, other metrics averaged, as
    verl aggregates them), averaged over the mini-batches, and actor/param_norm_change over the whole pass
    (_param_norm)."""
    import torch

    if actor_cfg.use_kl_loss and ref_model is None:
        raise ValueError("rl.kl_loss needs the frozen reference model")
    size = rl.mini_batch_size * rl.n
    minis = [[_collate(micro, pad_id, device) for micro in update_micro_batches(rows[i:i + size])]
             for i in range(0, len(rows), size)]
    with torch.no_grad():  # the behaviour policy: the weights that sampled the batch
        # the first mini-batch is updated before the weights move: its old log-probs are its new ones, detached
        # (ratio exactly 1, as verl's on-policy path), so only the later mini-batches need an old-log-prob pass
        old = [[None if k == 0 else response_logprobs(model, mb, device, precision, rl.temperature) for mb in micros]
               for k, micros in enumerate(minis)]
        refs = [[response_logprobs(ref_model, mb, device, precision, rl.temperature) if actor_cfg.use_kl_loss
                 else None for mb in micros] for micros in minis]
    stats: dict[str, list[float]] = defaultdict(list)
    norm_before = _param_norm(model)
    try:
        for micros, olds, ref_lps in zip(minis, old, refs):
            masks = [mb["resp_mask"] for mb in micros]
            actor_cfg.global_batch_info.update(
                dp_size=1, batch_num_tokens=float(sum(m.sum() for m in masks)),
                global_batch_size=int(sum(int((m.sum(-1) > 0).sum()) for m in masks)))
            optimizer.zero_grad(set_to_none=True)
            parts: dict[str, list[float]] = defaultdict(list)
            for mb, old_lp, ref_lp in zip(micros, olds, ref_lps):
                new_lp, ent = response_logprobs(model, mb, device, precision, rl.temperature, with_entropy=True) \
                    if actor_cfg.entropy_coeff > 0 else (response_logprobs(model, mb, device, precision,
                                                                           rl.temperature), None)
                loss, metrics = grpo_loss(new_lp.detach() if old_lp is None else old_lp, new_lp, mb["adv"],
                                          mb["resp_mask"], actor_cfg, ref_lp, ent)
                loss.backward()
                for key, value in metrics.items():
                    parts[key].append(float(value))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), rl.grad_clip)
            optimizer.step()
            stats["actor/grad_norm"].append(float(grad_norm))
            for key, values in parts.items():
                stats[key].append(sum(values) if key in _SUMMED else sum(values) / len(values))
    finally:
        actor_cfg.global_batch_info.clear()
    return {**{k: sum(v) / len(v) for k, v in stats.items()},
            "actor/param_norm_change": _param_norm(model) - norm_before}


def _param_norm(model: "PreTrainedModel") -> float:
    """‖θ‖₂ over every parameter (tied ones once), accumulated in fp64. Its change over an update bounds the
    update from below, |‖θ'‖ − ‖θ‖| ≤ ‖θ' − θ‖ (triangle inequality), so a non-zero `actor/param_norm_change`
    proves the step moved the weights, without keeping a copy of them; unchanged weights give exactly 0."""
    import torch

    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64)
                                                       for p in model.parameters()])))


def check_prompt_lengths(tokenizer: "PreTrainedTokenizerFast", sets: dict[str, list[dict[str, Any]]],
                         max_prompt_length: int) -> None:
    """Refuse (DataError) any prompt whose rendered chat-template tokens exceed `max_prompt_length`, naming the
    set, the prompt id and its length (verl's data.truncation='error'); nothing is truncated."""
    from evals.engine import render_prompt

    for name, rows in sets.items():
        if not rows:
            continue
        lengths = [len(ids) for ids in tokenizer([render_prompt(tokenizer, r["prompt"]) for r in rows],
                                                 add_special_tokens=False)["input_ids"]]
        over = [(r.get("id"), n) for r, n in zip(rows, lengths) if n > max_prompt_length]
        if over:
            shown = ", ".join(f"id {i!r}: {n} tokens" for i, n in over[:5])
            raise DataError(f"{name}: {len(over)} prompt(s) longer than rl.max_prompt_length {max_prompt_length} "
                            f"({shown}{', …' if len(over) > 5 else ''}); raise rl.max_prompt_length or drop them")


def _rollout_rows(step: int, rows: list[dict[str, Any]], records: list[dict[str, Any]], n: int,
                  gens: list[Any] | None = None) -> list[dict[str, Any]]:
    """One row per rollout; with `gens` (the Samples or Generations, in rollout order) also its tool calls, tool
    errors and environment token spans ([start, end) token indices, JSON)."""
    from evals.tools import env_spans

    out = []
    for k, rec in enumerate(records):
        prompt = rows[rec["group"]]
        blocks = rec["blocks"]
        out.append({
            "step": step, "prompt_id": prompt["id"], "domain": prompt.get("domain"), "sample": k % n,
            "response": rec["response"], "gold": rec["gold"], "decoy": rec["decoy"], "correct": rec["correct"],
            "extracted": rec["extracted"], "timed_out": rec["timed_out"], "truncated": rec["truncated"],
            "format_class": rec["format_class"], "n_tokens": rec["n_tokens"], "n_blocks": len(blocks),
            "categories": sorted({c for b in blocks for c in b["categories"]}),
            "confidence": next((b["confidence"] for b in blocks if b["confidence"] is not None), None),
            "decision": next((b["decision"] for b in blocks if b["decision"]), None),
            "signal": rec["signal"], "signal_value": rec["signal_value"],
            "signal_extras": json.dumps(rec["signal_extras"], sort_keys=True, default=str),
            "heads": json.dumps(rec["heads"], sort_keys=True), "adv": json.dumps(rec["adv"], sort_keys=True),
            "tool_calls": gens[k].tool_calls if gens else 0, "tool_errors": gens[k].tool_errors if gens else 0,
            "env_spans": json.dumps(env_spans(gens[k]) if gens else []),
        })
    return out


def _decoy_facts(prompts: list[dict[str, Any]], grader: Any, tokenizer: Any) -> dict[str, Any]:
    """How many of the RL prompts' gold/decoy pairs PMI-shift and gm can score (rewards.decoys.decoy_facts)."""
    from rewards.decoys import decoy_facts, make_decoys

    golds = [str(r["answer"]) for r in prompts]
    return decoy_facts(golds, make_decoys(golds, grader, tokenizer), tokenizer)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def validate(engine: Any, tokenizer: "PreTrainedTokenizerFast", grader: Any, val: list[dict[str, Any]],
             rl: RLSpec, seed: int, step: int, out_dir: Path) -> dict[str, float]:
    """Pure correctness on the val mix, overall and per domain (never mixed with shaped reward)."""
    from evals.evaluate import sample_and_grade, val_metrics, val_sampling

    s = val_sampling(rl)  # the sweep samples the val mix with the same settings
    rows = sample_and_grade(engine, tokenizer, grader, "val", val, s["n"], s["temperature"], s["top_p"],
                            s["max_new_tokens"], derived_seed("val", seed, step))
    write_parquet([{"step": step, **r} for r in rows], out_dir / "val" / f"step-{step:07d}.parquet")
    return val_metrics(rows)


def _dynamic_batch(sample: Callable[[list[dict[str, Any]], int], list[list["Sample"]]], prompts: list[dict[str, Any]],
                   rl: RLSpec, seed: int, state: dict[str, Any], grader: Any
                   ) -> tuple[list[dict[str, Any]], list[list["Sample"]], dict[str, int]]:
    """One step's groups under DAPO dynamic sampling (rl.dapo.dynamic_sampling): round r generates the prompts of
    generation batch state["gen_batches"] + r + 1 (the same seeded epoch permutation as `prompt_indices`, a cursor
    that the checkpointed state carries), filtered on the grader's accuracy. Advances state["gen_batches"]."""
    from rl.dapo import dynamic_sampling

    done = state.get("gen_batches", 0)

    def prompts_of_round(r: int) -> list[dict[str, Any]]:
        return [prompts[i] for i in prompt_indices(done + r + 1, len(prompts), rl.batch_size, seed)]

    def accuracy(groups: list[list["Sample"]]) -> list[list[float]]:
        flat = [s for g in groups for s in g]
        grades = iter(grader.grade([s.response for s in flat], [s.gold for s in flat]))
        return [[float(next(grades).correct) for _ in g] for g in groups]

    ds = dynamic_sampling(prompts_of_round, sample, accuracy, rl.batch_size, rl.filter_groups.max_num_gen_batches)
    state["gen_batches"] = done + ds.facts["dynamic_sampling/rounds"]
    return ds.rows, ds.groups, ds.facts


def _dapo_facts(rl: RLSpec, totals: Counter) -> dict[str, Any]:
    """The run facts of DAPO's dynamic sampling and soft overlong punishment: settings and totals over steps."""
    ds = {k.split("/", 1)[1]: totals[k] for k in sorted(totals) if k.startswith("dynamic_sampling/")}
    return {"dynamic_sampling": {**rl.filter_groups.model_dump(), **ds},
            "overlong_buffer": {**rl.overlong_buffer.model_dump(), "penalised": totals["overlong/penalised"]}}


def _masa_runner(rl: RLSpec, engine: Any, tokenizer: "PreTrainedTokenizerFast", grader: Any, seed: int,
                 prompts: list[dict[str, Any]], device: str, precision: str) -> Any:
    """rl.masa's runner (rl/masa.py), its meta-prediction prompts refused like any prompt over max_prompt_length;
    None with MASA off (the matched control: no meta rollout is generated, and zero is recorded)."""
    if not rl.masa.enable:
        return None
    from rl.masa import MASARunner

    def bc_logprobs(model: "PreTrainedModel", rows: list[tuple[list[int], list[int]]]) -> tuple[Any, Any]:
        batch = _collate([(p, r, [0.0] * len(r)) for p, r in rows], tokenizer.pad_token_id, device)
        return response_logprobs(model, batch, device, precision, 1.0), batch["resp_mask"]

    runner = MASARunner(rl, engine, tokenizer, grader, lambda *parts: derived_seed(*parts, seed), bc_logprobs)
    check_prompt_lengths(tokenizer, {"meta-prediction prompts": runner.prompts(prompts)}, rl.max_prompt_length)
    return runner


def _rollout_vllm(rl: RLSpec, init_dir: Path, tokenizer: "PreTrainedTokenizerFast", device: str, precision: str
                  ) -> Any:
    """The vLLM rollout engine when rl.rollout_engine is 'vllm' (started on the SFT checkpoint, the policy's
    starting weights), else None. Raises evals.vllm_engine.EngineError when the engine environment is missing or
    the engine cannot start. The engine process is killed with its group if this process dies (its watchdog)."""
    if rl.rollout_engine != "vllm":
        return None
    from evals.vllm_engine import VLLMEngine

    return VLLMEngine(init_dir, tokenizer, device=device, precision=precision)


def train_grpo(init_dir: Path, prompts: list[dict[str, Any]], val: list[dict[str, Any]], rl: RLSpec,
               grader_spec: GraderSpec, compute: ComputeSpec, seed: int, out_dir: Path,
               on_step: Callable[[int, dict[str, float]], None] | None = None, tool: str = "none") -> dict[str, Any]:
    """Train one arm from `init_dir` (its SFT result, also the frozen scorer); resumable on `out_dir`. `tool`: the
    environment's tool (evals.tools) rollouts and validation run in.

    Returns {checkpoints: [(step, path)], metrics: [(key, value, step)], facts, summary}.
    """
    import torch

    from evals.engine import HFEngine, render_prompt
    from evals.tools import with_tool
    from rewards.grader import get_grader
    from rewards.pipeline import Sample, score_batch
    from rewards.scorer import HFScorer
    from rewards.signals import get_signal
    from worlds.model import load_model, resolve_device, resolve_precision
    from worlds.tokenizer import load_tokenizer

    if not prompts or not val:
        raise DataError(f"RL needs prompts and a val set (got {len(prompts)} prompts, {len(val)} val rows)")
    out_dir = Path(out_dir)
    device = resolve_device(compute)
    precision = resolve_precision(compute, device)
    tokenizer = load_tokenizer(init_dir)
    model = load_model(init_dir, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=rl.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=rl.weight_decay)
    signal = get_signal(rl.reward)
    scorer = HFScorer.from_pretrained(init_dir, device=device) if "scorer" in signal.needs else None
    # the KL reference is the same frozen SFT result as the scorer: reuse it; no reference at all without KL
    ref_model = None if not rl.kl_loss else scorer.model if scorer is not None else \
        load_model(init_dir, device).eval().requires_grad_(False)
    grader = get_grader(grader_spec)
    plain = HFEngine(model, tokenizer, device=device, precision=precision)
    engine = with_tool(plain, tool)
    # rollouts: this engine, or a vLLM engine process serving the policy (weights reloaded after every update)
    vllm = _rollout_vllm(rl, init_dir, tokenizer, device, precision)
    rollout = engine if vllm is None else with_tool(vllm, tool)
    actor_cfg = _actor_config(rl)
    meta_open_id = tokenizer.convert_tokens_to_ids(META_OPEN)
    check_prompt_lengths(tokenizer, {"rl prompts": prompts, "val": val}, rl.max_prompt_length)
    masa = _masa_runner(rl, rollout, tokenizer, grader, seed, prompts, device, precision)
    fingerprint = hash_json({"rl": rl.model_dump(mode="json"), "seed": seed, "prompts": [r["id"] for r in prompts],
                             "val": [r["id"] for r in val], **({"tool": tool} if tool != "none" else {})})

    state: dict[str, Any] = {"step": 0, "fingerprint": fingerprint, "metrics": [], "lr": [],
                             "prompt_ids": [], "totals": {}, "adv_norm_std_applied": None}
    if (ckpt := latest_checkpoint(out_dir)) is not None:
        saved = load_checkpoint(ckpt, model, optimizer)
        if saved.get("fingerprint") != fingerprint:
            raise DataError(f"{out_dir}: holds checkpoints of a different RL run (config, seed or data differ)")
        state = saved
    totals: Counter = Counter(state["totals"])
    metrics: MetricRows = [tuple(m) for m in state["metrics"]]
    if masa is not None:
        masa.bind(state)
    sync_s = 0.0
    if vllm is not None and state["step"]:  # resumed: the engine serves the checkpoint's policy, not the SFT start
        vllm.load_weights(model)

    def record(step: int, values: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}
        metrics.extend((k, v, step) for k, v in sorted(clean.items()))
        if on_step:
            on_step(step, clean)

    def regenerate(contexts: list[str]) -> list[str]:  # cf / asym_cf: continue x∘p with the meta token banned
        gens = plain.generate(contexts, n=1, temperature=rl.temperature, top_p=rl.top_p,
                              max_new_tokens=rl.max_response_length,
                              seed=derived_seed("cf", seed, state["step"]), banned_tokens=[meta_open_id])
        return [g[0].text for g in gens]

    if state["step"] == 0:
        record(0, validate(engine, tokenizer, grader, val, rl, seed, 0, out_dir))
    bar = Progress("GRPO steps", rl.steps, start=state["step"])
    for step in range(state["step"] + 1, rl.steps + 1):
        t_step = time.perf_counter()
        lr = lr_at(step, rl)
        for group in optimizer.param_groups:
            group["lr"] = lr

        def sample(rows: list[dict[str, Any]], round_: int, max_new_tokens: int | None = None) -> list[list[Sample]]:
            rendered = [render_prompt(tokenizer, r["prompt"]) for r in rows]
            gens = rollout.generate(rendered, n=rl.n, temperature=rl.temperature, top_p=rl.top_p, top_k=hf_top_k(rl),
                                   max_new_tokens=max_new_tokens or rl.max_response_length,
                                   seed=derived_seed("rollout", seed, step, *([round_] if round_ else [])))
            return [[Sample(prompt=rendered[i], response=g.text, response_ids=g.token_ids,
                            gold=str(rows[i]["answer"]), truncated=g.truncated, env_mask=g.env_mask,
                            tool_calls=g.tool_calls, tool_errors=g.tool_errors) for g in gs]
                    for i, gs in enumerate(gens)]

        t0 = time.perf_counter()
        if rl.filter_groups.enable:
            rows, groups, ds_facts = _dynamic_batch(sample, prompts, rl, seed, state, grader)
        else:
            rows = [prompts[i] for i in prompt_indices(step, len(prompts), rl.batch_size, seed)]
            rows, groups = masa.sample(rows, sample, step) if masa is not None else (rows, sample(rows, 0))
            ds_facts = {}
        rendered = [gs[0].prompt for gs in groups]
        t_sample = time.perf_counter() - t0
        batch = score_batch(groups, rl=rl, step=step, grader=grader, tokenizer=tokenizer, scorer=scorer,
                            regenerate=regenerate)
        f = batch.facts
        if state["adv_norm_std_applied"] is not None and state["adv_norm_std_applied"] != f["adv_norm_std_applied"]:
            raise RuntimeError("advantage normalisation changed within a run")
        state["adv_norm_std_applied"] = f["adv_norm_std_applied"]
        t0 = time.perf_counter()
        prompt_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
        flat = [s for gs in groups for s in gs]
        update_rows = [(prompt_ids[g], list(s.response_ids), adv,
                        *([[0.0 if e else 1.0 for e in s.env_mask]] if s.env_mask is not None else []))
                       for (g, s), adv in zip([(g, s) for g, gs in enumerate(groups) for s in gs],
                                              batch.token_advantages)]
        if masa is not None:  # the meta rollouts join the same update of the one policy
            update_rows += masa.update_rows(rows, batch.records, step)
        update = ppo_update(model, optimizer, update_rows, rl, actor_cfg, tokenizer.pad_token_id, device, precision,
                            ref_model)
        if masa is not None:
            masa.expert_step(model, optimizer)
        t_update = time.perf_counter() - t0
        t_sync = None
        if vllm is not None:  # the next rollouts sample the policy just updated
            t0 = time.perf_counter()
            vllm.load_weights(model)
            t_sync = time.perf_counter() - t0
            sync_s += t_sync

        write_parquet(_rollout_rows(step, rows, batch.records, rl.n, flat),
                      out_dir / "rollouts" / f"step-{step:07d}.parquet")
        if masa is not None:
            write_parquet(masa.rollout_rows(step), out_dir / "meta_rollouts" / f"step-{step:07d}.parquet")
        recs = batch.records
        for key in ("scorer/calls", "scorer/forwards", "signal/scored", "signal/skipped", "signal/save",
                    "signal/derail", "grader/timeouts", "signal/regenerations", "overlong/penalised", *ds_facts):
            totals[key] += f.get(key, ds_facts.get(key)) or 0
        state["lr"].append(lr)
        state["prompt_ids"] += [r["id"] for r in rows]
        values = {
            "train/accuracy/pure": f["accuracy/pure"], "actor/lr": lr, **update,
            "train/signal/mean": f["signal/mean"], "train/signal/save": f["signal/save"],
            "train/signal/derail": f["signal/derail"], "train/signal/skipped": f["signal/skipped"],
            "train/meta/block_rate": _mean([len(r["blocks"]) > 0 for r in recs]),
            "train/response_length/mean": _mean([r["n_tokens"] for r in recs]),
            "train/truncated_rate": _mean([r["truncated"] for r in recs]),
            "train/adv_nonzero_rate": _mean([any(abs(a) > 0 for a in adv) for adv in batch.token_advantages]),
            "time/sample_s": t_sample, "time/grade_s": f["time/grading_s"], "time/score_s": f["time/scoring_s"],
            "time/update_s": t_update, "scorer/calls": totals["scorer/calls"], **ds_facts,
            "train/overlong/penalised": f.get("overlong/penalised"),
            "train/overlong/penalty_mean": f.get("overlong/penalty_mean"),
            "time/weight_sync_s": t_sync,
            "train/tool/call_rate": _mean([s.tool_calls > 0 for s in flat]),
            "train/tool/errors": sum(s.tool_errors for s in flat),
            **{f"train/format/{c}": _mean([r["format_class"] == c for r in recs])
               for c in ("none", "wellformed", "drift", "truncation", "discard")},
            **(masa.step_metrics() if masa is not None else {}),
        }
        if step % rl.test_freq == 0 or step == rl.steps:
            values.update(validate(engine, tokenizer, grader, val, rl, seed, step, out_dir))
        values["time/step_s"] = time.perf_counter() - t_step
        record(step, values)
        bar.advance(acc=f["accuracy/pure"], **({"val": values["val/accuracy/pure"]} if "val/accuracy/pure" in values
                                               else {}))
        state["step"] = step
        if step % rl.save_freq == 0 or step == rl.steps:
            state.update(metrics=[list(m) for m in metrics], totals=dict(totals))
            save_checkpoint(out_dir, step, model, optimizer, state, tokenizer=tokenizer)

    bar.close()
    rollout_facts = {"name": rl.rollout_engine, **(vllm.facts() if vllm is not None else plain.facts()),
                     "weight_sync_s": round(sync_s, 2)}
    if vllm is not None:
        vllm.close()
    checkpoints = [(step_of(p), p) for p in complete_checkpoints(out_dir)]
    final_val = {k: v for k, v, s in metrics if s == rl.steps and k.startswith("val/")}
    facts = {
        "reward": rl.reward, "adv_norm_std_applied": state["adv_norm_std_applied"], "tool": tool,
        "scorer_calls": totals["scorer/calls"], "scorer_forwards": totals["scorer/forwards"],
        "lr_per_step": state["lr"], "save_freq": rl.save_freq, "test_freq": rl.test_freq, "steps": rl.steps,
        "rows_seen": len(set(state["prompt_ids"])), "prompts_sampled": len(state["prompt_ids"]),
        "example_order": hash_json(state["prompt_ids"]),
        "signal_totals": {k: totals[k] for k in ("signal/scored", "signal/skipped", "signal/save",
                                                 "signal/derail", "signal/regenerations")},
        "grader": grader.facts(), "device": device, "precision": precision,
        "kl": {"applied": actor_cfg.use_kl_loss, "coef": rl.kl_coef,
               "loss_type": KL_LOSS_TYPE if actor_cfg.use_kl_loss else None,
               "reference": None if ref_model is None else "scorer (shared)" if scorer is not None else "loaded"},
        "max_prompt_length": rl.max_prompt_length, "logprob_temperature": rl.temperature, "rollout": rollout_facts,
        "decoys": _decoy_facts(prompts, grader, tokenizer) if "decoy" in signal.needs else None,
        **_dapo_facts(rl, totals), "masa": masa_facts(rl, state.get("masa")),
    }
    summary = {"val_acc": round(final_val.get("val/accuracy/pure", float("nan")), 3),
               "scorer_calls": totals["scorer/calls"]}
    return {"checkpoints": checkpoints, "metrics": metrics, "facts": facts, "summary": summary}
