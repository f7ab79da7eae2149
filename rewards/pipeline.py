"""One RL batch from rollouts to token advantages; the glue BOTH executors call (DESIGN §5).

grade (the correctness head, every arm alike; plus DAPO's soft overlong punishment with rl.overlong_buffer) → decoys (one per problem, only for signals that need one) →
signal per group → heads → per-head group centring → token advantages by region.

Returns one record per rollout (for the rollout parquet) and a flat dict of facts (for lineage/tracking/audit):
scorer calls and forwards, scored/skipped counts by reason, SAVE/DERAIL counts, grader counts, whether the std
normalisation was applied, seconds spent grading vs scoring. `accuracy/pure` is the plain correctness accuracy
of the solution rollouts, reported apart from any shaped reward.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from infra.spec import HEADS, REGIONS, RLSpec
from rewards.heads import centre_heads, gain_matrix, head_weights, overlong_penalty, rollout_heads, \
    token_advantages, token_offsets, token_regions
from rewards.scorer import BatchedRequests, Scorer
from rewards.signals import Rollout, SignalContext, SignalResult, get_signal, score_group
from meta.grammar import META_CLOSE, META_OPEN, find_blocks, format_class


@dataclass(frozen=True)
class Sample:
    """A generated rollout as an executor has it. response_ids must decode to `response` (extra trailing tokens,
    e.g. an end-of-turn token dropped from the text, are allowed and count as answer tokens)."""

    prompt: str
    response: str
    response_ids: Sequence[int]
    gold: str
    truncated: bool = False
    role: Literal["solution", "meta_prediction"] = "solution"
    env_mask: Sequence[bool] | None = None  # per response token: appended by the environment's tool (evals/tools.py)
    tool_calls: int = 0
    tool_errors: int = 0


@dataclass
class BatchResult:
    records: list[dict[str, Any]]  # one per rollout, groups in order
    token_advantages: list[list[float]]  # aligned with each rollout's response_ids
    region_ids: list[list[int]]  # index into REGIONS per response token
    facts: dict[str, Any] = field(default_factory=dict)


def _grader_decoys(grader: Any, tokenizer: Any) -> Callable[[list[str]], list[str | None]]:
    from rewards.decoys import make_decoys

    return lambda golds: make_decoys(golds, grader, tokenizer)  # a decoy of the gold's token length first


def _apply_overlong_penalty(values: list[dict[str, float | None]], rollouts: Sequence[Rollout], rl: RLSpec
                            ) -> dict[str, Any]:
    """DAPO's soft overlong punishment added to each solution rollout's correctness head, in place, when
    rl.overlong_buffer.enable; returns the facts (rollouts penalised, mean penalty over the solutions)."""
    ob = rl.overlong_buffer
    if not ob.enable:
        return {}
    penalties = [overlong_penalty(r.n_tokens, rl.max_response_length, ob.len, ob.penalty_factor)
                 for r in rollouts if r.role == "solution"]
    solutions = [v for v, r in zip(values, rollouts) if r.role == "solution"]
    for v, p in zip(solutions, penalties):
        v["correctness"] += p
    return {"overlong/penalised": sum(p < 0 for p in penalties),
            "overlong/penalty_mean": sum(penalties) / len(penalties) if penalties else None}


def score_batch(groups: Sequence[Sequence[Sample]], *, rl: RLSpec, step: int, grader: Any, tokenizer: Any,
                scorer: Scorer | None = None, regenerate: Callable[[list[str]], list[str]] | None = None,
                make_decoys: Callable[[list[str]], list[str | None]] | None = None,
                meta_open: str = META_OPEN, meta_close: str = META_CLOSE, max_blocks: int = 1) -> BatchResult:
    """Score one RL batch. `grader.grade(responses, golds)` → Grades; `make_decoys(golds)` defaults to
    rewards.decoys.make_decoys under the same grader; `regenerate` is needed by cf/asym_cf only."""
    signal = get_signal(rl.reward)
    flat = [(g, s) for g, group in enumerate(groups) for s in group]
    for g, group in enumerate(groups):
        if len({s.gold for s in group}) > 1:
            raise ValueError(f"group {g} mixes golds: a group is the rollouts of one prompt")

    t0 = time.perf_counter()
    solutions = [k for k, (_, s) in enumerate(flat) if s.role == "solution"]
    graded = dict(zip(solutions, grader.grade([flat[k][1].response for k in solutions],
                                              [flat[k][1].gold for k in solutions]) if solutions else []))
    t_grade = time.perf_counter() - t0

    decoys: dict[int, str | None] = dict.fromkeys(range(len(groups)))
    if "decoy" in signal.needs:  # one decoy per problem, shared by all its rollouts
        live = [g for g, group in enumerate(groups) if group]
        decoy_fn = make_decoys or _grader_decoys(grader, tokenizer)
        decoys.update(zip(live, decoy_fn([groups[g][0].gold for g in live])))

    counters: Counter = Counter()

    def cf_grade(responses: list[str], golds: list[str]) -> list[bool]:
        counters["cf_graded"] += len(responses)
        return [gr.correct for gr in grader.grade(responses, golds)]

    ctx = SignalContext(params=rl.signal, scorer=scorer, tokenizer=tokenizer, regenerate=regenerate,
                        grade=cf_grade, meta_open=meta_open, meta_close=meta_close, counters=counters)
    rollouts = [Rollout(prompt=s.prompt, response=s.response, gold=s.gold, decoy=decoys[g],
                        correct=k in graded and graded[k].correct, truncated=s.truncated,
                        format_class=format_class(s.response, s.truncated, max_blocks, meta_open, meta_close),
                        n_tokens=len(s.response_ids), role=s.role) for k, (g, s) in enumerate(flat)]

    calls0, forwards0 = (scorer.calls, scorer.forwards) if scorer is not None else (0, 0)
    t0 = time.perf_counter()

    def by_group(context: SignalContext) -> list[SignalResult]:
        out, start = [], 0
        for group in groups:
            out += score_group(rl.reward, rollouts[start:start + len(group)], context)
            start += len(group)
        return out

    if scorer is not None and "scorer" in signal.needs and not {"regenerate", "grade"} & set(signal.needs):
        # every group's requests in one scorer call (record, score, replay): contexts of different groups share
        # forward passes. Signals that regenerate or grade are scored group by group (no second pass of those)
        batched = BatchedRequests()
        by_group(dataclasses.replace(ctx, scorer=batched.recording, counters=Counter()))
        results = by_group(dataclasses.replace(ctx, scorer=batched.run(scorer)))
    else:
        results = by_group(ctx)
    t_score = time.perf_counter() - t0

    values = [rollout_heads(r, res.value, meta_open, meta_close) for r, res in zip(rollouts, results)]
    overlong = _apply_overlong_penalty(values, rollouts, rl)
    adv, adv_facts = centre_heads(values, [g for g, _ in flat], rl.adv_norm_std)
    weights = head_weights(rl.heads, step)
    gain = gain_matrix(weights, rl.heads.routing)

    records, token_adv, regions = [], [], []
    for k, ((g, s), r, res) in enumerate(zip(flat, rollouts, results)):
        text, offsets = token_offsets(tokenizer, s.response_ids)
        if not text.startswith(s.response):
            raise ValueError(f"rollout {k}: response_ids decode to {text[:60]!r}…, not the response text "
                             f"{s.response[:60]!r}… (regions would be misrouted)")
        reg = token_regions(text, offsets, meta_open, meta_close)
        regions.append(reg)
        token_adv.append(token_advantages(adv[k], gain, reg).tolist())
        grade = graded.get(k)
        records.append({
            "group": g, "role": s.role, "prompt": s.prompt, "response": s.response, "gold": s.gold,
            "decoy": r.decoy, "correct": r.correct, "extracted": grade.extracted if grade else None,
            "timed_out": bool(grade and grade.timed_out), "truncated": s.truncated, "format_class": r.format_class,
            "n_tokens": len(s.response_ids),
            "blocks": [{"start": b.start, "end": b.end, "confidence": b.confidence, "decision": b.decision,
                        "categories": sorted(b.categories)} for b in find_blocks(s.response, meta_open, meta_close)],
            "signal": rl.reward, "signal_value": res.value, "signal_extras": res.extras,
            "heads": values[k], "adv": adv[k],
            "region_tokens": {name: reg.count(i) for i, name in enumerate(REGIONS)},
        })

    scored = [res for res in results if res.value is not None]
    skips = Counter(res.extras.get("skip", "unknown") for res in results if res.value is None)
    grades = list(graded.values())
    facts: dict[str, Any] = {
        "reward": rl.reward, "step": step, "groups": len(groups), "rollouts": len(flat),
        "accuracy/pure": sum(gr.correct for gr in grades) / len(grades) if grades else None,
        "grader/graded": len(grades), "grader/correct": sum(gr.correct for gr in grades),
        "grader/timeouts": sum(gr.timed_out for gr in grades), "grader/cf_graded": counters["cf_graded"],
        "scorer/calls": scorer.calls - calls0 if scorer is not None else 0,
        "scorer/forwards": scorer.forwards - forwards0 if scorer is not None else 0,
        "signal/regenerations": counters["regenerations"],
        "signal/scored": len(scored), "signal/skipped": sum(skips.values()),
        **{f"signal/skip/{reason}": n for reason, n in sorted(skips.items())},
        "signal/save": sum(bool(res.extras.get("save")) for res in scored),
        "signal/derail": sum(bool(res.extras.get("derail")) for res in scored),
        "signal/mean": sum(res.value for res in scored) / len(scored) if scored else None,
        **{f"head_weight/{h}": weights[h] for h in HEADS},
        **adv_facts, **overlong,
        "time/grading_s": t_grade, "time/scoring_s": t_score,
    }
    return BatchResult(records, token_adv, regions, facts)
