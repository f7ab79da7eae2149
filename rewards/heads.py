"""Reward heads → per-head group-centred advantages → token-level advantages by region (DESIGN §5).

Shared by BOTH executors: the local executor calls it through rewards.pipeline, the verl executor through
rewards.verl_adapter, and both reach `centre_heads` and `token_advantages` here.

Heads per rollout (None = no value: the row is left out of that head's group mean and gets 0 advantage on it):
- correctness: +1 correct, −1 otherwise (a grader timeout is incorrect); with DAPO's soft overlong punishment
  (rl.overlong_buffer) plus `overlong_penalty` of the response length;
- meta: the reward signal's value (None where the signal skipped);
- calibration: −(confidence − 1[correct])² with meta.grammar.stated_confidence (the LAST closed block that states
  one: the latest belief before the answer, the same definition evaluation uses); None without one;
- format: FORMAT_VALUES by format class (below);
- emission: 1 with a closed block, else 0.
MASA meta-prediction rows carry only the meta head (they are not solutions).

Centring: per head, within each group, over the rows with a value: A = v − mean. With `adv_norm_std`, A is
divided by (unbiased group std + eps), for every head and every arm alike (the switch is returned as a fact). A
head with a single valued row in a group gets 0 (there is no baseline; verl's GRPO would pass the raw reward).

Token advantage: A_t = Σ_h w_h(step) · A_h · routing[h][region(t)], with w_h ramped linearly from 0 over
HeadsSpec.warmup_steps[h]. With weights {correctness: 1} and the default routing (correctness reaches every
region) this is plain GRPO's outcome advantage on every token.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from infra.spec import HEADS, REGIONS, HeadsSpec
from rewards.signals import Rollout
from meta.grammar import META_CLOSE, META_OPEN, char_regions, find_blocks, stated_confidence

# wellformed/none are the target formats; truncation is the length limit's doing, not the model's format choice
# (the correctness head already sees the missing answer); drift opened a block and never closed it; discard
# broke the grammar (nesting, stray close, more blocks than allowed).
FORMAT_VALUES: dict[str, float] = {"none": 0.0, "wellformed": 0.0, "truncation": 0.0, "drift": -0.5, "discard": -1.0}
REGION_INDEX = {r: i for i, r in enumerate(REGIONS)}
# when a token straddles regions with equal overlap, the more specific region wins
_PRIORITY = {"format": 3, "confidence": 2, "meta": 1, "answer": 0}


def rollout_heads(r: Rollout, meta: float | None, meta_open: str = META_OPEN, meta_close: str = META_CLOSE
                  ) -> dict[str, float | None]:
    if r.role == "meta_prediction":
        return {**dict.fromkeys(HEADS), "meta": meta}
    blocks = find_blocks(r.response, meta_open, meta_close)
    stated = stated_confidence(blocks)
    return {
        "correctness": 1.0 if r.correct else -1.0,
        "meta": meta,
        "calibration": -(stated - float(r.correct)) ** 2 if stated is not None else None,
        "format": FORMAT_VALUES[r.format_class],
        "emission": 1.0 if blocks else 0.0,
    }


def overlong_penalty(n_tokens: int, max_response_length: int, buffer_len: int, penalty_factor: float) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476 eq. 13; verl's DAPORewardManager): with L_max the
    response limit and L_cache the buffer, min(−(|y| − (L_max − L_cache)) / L_cache · penalty_factor, 0): 0 up to
    L_max − L_cache tokens, then linear down to −penalty_factor at L_max. Lengths in tokens; raises ValueError
    for a buffer that is not in 1..max_response_length."""
    if not 1 <= buffer_len <= max_response_length:
        raise ValueError(f"overlong buffer {buffer_len} must lie in 1..max_response_length {max_response_length}")
    exceed = n_tokens - (max_response_length - buffer_len)
    return min(-exceed / buffer_len * penalty_factor, 0.0)


def head_weights(heads: HeadsSpec, step: int) -> dict[str, float]:
    """w_h(step) = weight · min(1, step / warmup_steps) (no ramp when warmup_steps is 0)."""
    if step < 0:
        raise ValueError(f"step must be ≥ 0, got {step}")
    out = {}
    for h in HEADS:
        w, n = heads.weights.get(h, 0.0), heads.warmup_steps.get(h, 0)
        out[h] = w * min(1.0, step / n) if n > 0 else w
    return out


def centre_heads(values: Sequence[Mapping[str, float | None]], groups: Sequence[Hashable], adv_norm_std: bool,
                 eps: float = 1e-6) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Per-head advantages of each row, centred within its group over the rows with a value; and the facts."""
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} rows but {len(groups)} group ids")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    adv = [dict.fromkeys(HEADS, 0.0) for _ in values]
    facts: dict[str, Any] = {"adv_norm_std_applied": bool(adv_norm_std), "adv_eps": eps, "adv_groups": len(members)}
    for h in HEADS:
        counts = dict.fromkeys(("rows", "groups", "groups_singleton", "groups_zero_std"), 0)
        for rows in members.values():
            vals = [(i, values[i].get(h)) for i in rows if values[i].get(h) is not None]
            if any(not math.isfinite(v) for _, v in vals):
                raise ValueError(f"head '{h}': a non-finite value reached centring (skips must be None)")
            if not vals:
                continue
            counts["rows"] += len(vals)
            counts["groups"] += 1
            if len(vals) == 1:
                counts["groups_singleton"] += 1
                continue
            mean = math.fsum(v for _, v in vals) / len(vals)
            std = math.sqrt(math.fsum((v - mean) ** 2 for _, v in vals) / (len(vals) - 1))
            counts["groups_zero_std"] += std == 0
            for i, v in vals:
                adv[i][h] = (v - mean) / (std + eps) if adv_norm_std else v - mean
        facts.update({f"adv/{h}/{k}": n for k, n in counts.items()})
    return adv, facts


def gain_matrix(weights: Mapping[str, float], routing: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """G[h, r] = w_h · routing[h][r], heads and regions in HEADS/REGIONS order."""
    return np.array([[weights.get(h, 0.0) * routing.get(h, {}).get(r, 0.0) for r in REGIONS] for h in HEADS],
                    dtype=np.float64)


def token_advantages(head_adv: Mapping[str, float], gain: np.ndarray, region_ids: Sequence[int]) -> np.ndarray:
    """A_t = Σ_h A_h · G[h, region(t)]: one coefficient per region, gathered by each token's region."""
    coef = np.array([head_adv[h] for h in HEADS], dtype=np.float64) @ gain
    return coef[np.asarray(region_ids, dtype=np.int64)]


def token_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text and each token's character span in it. Decoding token by token is exact for byte-level
    BPE unless a token splits a multi-byte character (or the tokenizer rewrites spaces on decode); then each end
    is the length of the decoded prefix (quadratic, only for those responses)."""
    ids = list(ids)
    text = tokenizer.decode(ids)
    pieces = tokenizer.batch_decode([[t] for t in ids])
    if "".join(pieces) == text:
        ends = np.cumsum([len(p) for p in pieces]).tolist()
    else:
        ends, top = [], 0
        for k in range(len(ids)):
            top = max(top, len(tokenizer.decode(ids[:k + 1])))
            ends.append(top)
    return text, [(s, e) for s, e in zip([0, *ends[:-1]], ends)]


def token_regions(text: str, offsets: Sequence[tuple[int, int]], meta_open: str = META_OPEN,
                  meta_close: str = META_CLOSE) -> list[int]:
    """Region id (index into REGIONS) of each token: the region covering most of its characters, ties to the more
    specific region (format > confidence > meta > answer); a zero-width token takes the region at its position,
    and anything past the end of the text is answer."""
    spans = char_regions(text, meta_open, meta_close)
    ends = [e for _, e, _ in spans]
    out = []
    for s, e in offsets:
        k = bisect.bisect_right(ends, s)
        if e <= s:
            out.append(REGION_INDEX[spans[k][2]] if k < len(spans) else REGION_INDEX["answer"])
            continue
        overlap: dict[str, int] = defaultdict(int)
        while k < len(spans) and spans[k][0] < e:
            overlap[spans[k][2]] += min(e, spans[k][1]) - max(s, spans[k][0])
            k += 1
        best = max(overlap, key=lambda r: (overlap[r], _PRIORITY[r])) if overlap else "answer"
        out.append(REGION_INDEX[best])
    return out
