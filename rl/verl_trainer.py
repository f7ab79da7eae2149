"""verl's synchronous v1 PPO trainer with our advantage step, registered as trainer mode "twinarm_sync".

verl 0.9.1's PPOTrainer._compute_advantage fetches a fixed field list from its TransferQueue (uid, response_mask,
rm_scores, log-probs, values) and hands a registered estimator only token_level_rewards, response_mask, index and
config. Our estimator needs each rollout's heads (the reward manager's reward_extra_info, stored per rollout
under "extra_fields") and its response token ids (for the regions). This subclass fetches them too, runs
rewards.verl_adapter.heads_advantage — the same centring and routing functions as the local executor — and
writes advantages/returns back exactly as verl's own method does. Everything else is verl's trainer unchanged.

Needs TransferQueue (verl's `verl-core` extra, installed with verl[vllm] on a GPU cluster); it is not in this
project's pinned CPU environment, so this module is imported only by the cluster entrypoint (rl/verl_main.py).
tests/test_verl.py runs `_compute_advantage` on TransferQueue-shaped fields when TransferQueue is importable.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import transfer_queue as tq
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from infra.spec import HEADS, RLSpec
from rewards.verl_adapter import HEAD_KEY, heads_advantage, model_tokenizer, read_twinarm_section, \
    scorer_totals
from rl.verl_config import TRAINER_MODE


def reward_infos(extra_fields: Any) -> list[dict[str, Any]]:
    """The per-rollout reward_extra_info dicts of extra_fields (a tensordict NonTensorStack as TransferQueue returns
    it, or a plain list)."""
    items = extra_fields.tolist() if hasattr(extra_fields, "tolist") else list(extra_fields)
    return [(e.data if hasattr(e, "data") and not isinstance(e, dict) else e)["reward_extra_info"] for e in items]


def head_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """{twinarm_head_<h>: float64 (bs,)} from the per-rollout reward_extra_info dicts."""
    return {HEAD_KEY.format(h): np.array([float(r[HEAD_KEY.format(h)]) for r in rows], dtype=np.float64)
            for h in HEADS}


@register_trainer(TRAINER_MODE)
class TwinarmTrainer(PPOTrainerSync):
    """PPOTrainerSync whose advantage step is the heads/region estimator (never verl's stock GRPO)."""

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        section = read_twinarm_section(self.config)
        rl = RLSpec.model_validate(section["rl"])
        fields = ["uid", "response_mask", "responses", "extra_fields"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]
        extra = data.pop("extra_fields")
        proto = DataProto(batch=data.to_padded_tensor())
        proto.non_tensor_batch["uid"] = np.array(proto.batch.pop("uid").tolist(), dtype=object)
        infos = reward_infos(extra)
        proto.non_tensor_batch.update(head_columns(infos))
        facts = heads_advantage(proto, model_tokenizer(self.tokenizer), rl.heads, self.global_steps,
                                bool(self.config.algorithm.norm_adv_by_std_in_grpo))
        metrics.update({f"twinarm/{k}": float(v) for k, v in facts.items() if isinstance(v, (int, float))})
        metrics.update(scorer_totals(infos))  # this step's training rollouts (validation's are not counted)
        output = TensorDict({f: response_to_nested(proto.batch[f], response_mask) for f in ("advantages", "returns")},
                            batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)

