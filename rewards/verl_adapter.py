"""The shared heads/region advantage as verl's advantage estimator "twinarm_heads" (DESIGN §5, cluster executor).

The estimator reads per-row fields that `attach` writes (per row, so they survive verl's reordering, balancing
and chunking of a batch):
- non_tensor_batch["twinarm_head_<head>"]: float (bs,), NaN where the head has no value (None) — the shape a verl
  reward manager's reward_extra_info already lands in;
- batch["twinarm_region_ids"]: int64 (bs, response_length), region index into infra.spec.REGIONS;
- batch["twinarm_gain"]: float32 (bs, heads, regions) = w_h(step) · routing[h][r].
It centres each head within each `uid` group with rewards.heads.centre_heads and maps heads to tokens with
rewards.heads.token_advantages, the same functions the local executor runs. token_level_rewards are not read
(the heads carry the reward), so in-reward KL is refused rather than silently dropped.

verl 0.9.1's ray_trainer.compute_advantage forwards `batch`/`non_tensor_batch` to GDPO only; any other registered
estimator gets token_level_rewards, response_mask, index and config. The executor therefore calls
`compute_advantage(data, norm_adv_by_std_in_grpo=...)` below in place of verl's for this estimator; called without
the fields, the registered function raises instead of guessing. The std switch is read from the argument or the
algorithm config (`norm_adv_by_std_in_grpo`), never defaulted.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import register_adv_est

from infra.spec import HEADS, REGIONS
from rewards.heads import centre_heads, gain_matrix, token_advantages

ESTIMATOR = "twinarm_heads"
HEAD_KEY = "twinarm_head_{}"
REGION_KEY = "twinarm_region_ids"
GAIN_KEY = "twinarm_gain"


def attach(data: DataProto, head_values: Sequence[Mapping[str, float | None]], region_ids: Sequence[Sequence[int]],
           weights: Mapping[str, float], routing: Mapping[str, Mapping[str, float]]) -> None:
    """Write the estimator's fields into `data` (rows in data's order; region ids padded to the response width)."""
    bs, width = data.batch["response_mask"].shape
    if not len(head_values) == len(region_ids) == bs:
        raise ValueError(f"batch has {bs} rows; got {len(head_values)} head rows, {len(region_ids)} region rows")
    for h in HEADS:
        data.non_tensor_batch[HEAD_KEY.format(h)] = np.array(
            [np.nan if v.get(h) is None else float(v[h]) for v in head_values], dtype=np.float64)
    regions = torch.zeros((bs, width), dtype=torch.long)
    for b, ids in enumerate(region_ids):
        if len(ids) > width:
            raise ValueError(f"row {b}: {len(ids)} region ids for a response width of {width}")
        regions[b, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    data.batch[REGION_KEY] = regions
    gain = torch.tensor(gain_matrix(weights, routing), dtype=torch.float32)
    data.batch[GAIN_KEY] = gain.expand(bs, len(HEADS), len(REGIONS)).clone()


def _std_switch(norm_adv_by_std_in_grpo: bool | None, config: Any) -> bool:
    if config is not None and config.get("use_kl_in_reward", False):
        raise ValueError(f"{ESTIMATOR}: use_kl_in_reward is not supported (token_level_rewards are not read)")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo") if config is not None else None
    if norm_adv_by_std_in_grpo is None:
        raise ValueError(f"{ESTIMATOR}: pass norm_adv_by_std_in_grpo or an algorithm config that sets it")
    return bool(norm_adv_by_std_in_grpo)


def _advantages(response_mask: torch.Tensor, index: np.ndarray, norm: bool, epsilon: float,
                non_tensor_batch: Mapping[str, Any] | None, batch: Mapping[str, Any] | None
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    keys = [HEAD_KEY.format(h) for h in HEADS]
    if non_tensor_batch is None or batch is None or any(k not in non_tensor_batch for k in keys) \
            or REGION_KEY not in batch or GAIN_KEY not in batch:
        raise ValueError(f"{ESTIMATOR}: the batch lacks the head/region fields; write them with "
                         f"rewards.verl_adapter.attach and call rewards.verl_adapter.compute_advantage")
    values = [{h: None if np.isnan(v) else float(v) for h, v in zip(HEADS, row)}
              for row in zip(*(np.asarray(non_tensor_batch[k], dtype=np.float64) for k in keys))]
    adv_rows, facts = centre_heads(values, list(index), norm, epsilon)
    regions, gain = batch[REGION_KEY].cpu().numpy(), batch[GAIN_KEY].cpu().double().numpy()
    out = np.stack([token_advantages(a, gain[b], regions[b]) for b, a in enumerate(adv_rows)])
    return torch.tensor(out, dtype=torch.float32, device=response_mask.device) * response_mask, facts


@register_adv_est(ESTIMATOR)
def compute_twinarm_heads_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                    index: np.ndarray, epsilon: float = 1e-6,
                                    norm_adv_by_std_in_grpo: bool | None = None, config: Any = None,
                                    non_tensor_batch: Mapping[str, Any] | None = None,
                                    batch: Mapping[str, Any] | None = None, **kwargs: Any
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's estimator signature (GDPO's keyword convention for batch/non_tensor_batch); returns (adv, returns)."""
    adv, _ = _advantages(response_mask, index, _std_switch(norm_adv_by_std_in_grpo, config), epsilon,
                         non_tensor_batch, batch)
    return adv, adv


def compute_advantage(data: DataProto, norm_adv_by_std_in_grpo: bool | None = None, config: Any = None,
                      epsilon: float = 1e-6) -> dict[str, Any]:
    """Set data.batch advantages/returns from the attached fields; the centring facts are returned and kept in
    data.meta_info["twinarm_adv_facts"]."""
    adv, facts = _advantages(data.batch["response_mask"], data.non_tensor_batch["uid"],
                             _std_switch(norm_adv_by_std_in_grpo, config), epsilon, data.non_tensor_batch,
                             data.batch)
    data.batch["advantages"] = adv
    data.batch["returns"] = adv
    data.meta_info["twinarm_adv_facts"] = facts
    return facts
