"""The RL hyperparameters that must act the same in both executors, as small pure functions (DESIGN §5).

Each one is verl's own code or verl's own formula, so the local executor (rl/grpo.py) and the verl executor
(rl/verl_config.py maps the same keys to verl's config) cannot drift apart:

- `lr_at(step, rl)`: the actor learning rate at RL step `step` (1-based), from verl's schedulers
  (verl.utils.torch_functional.get_constant_schedule_with_warmup / get_cosine_schedule_with_warmup) exactly as
  verl's FSDP engine builds them: warm-up steps = lr_warmup_steps, or int(warmup_ratio · steps) when that is 0;
  the scheduler is 0-indexed and stepped after each update, so step s uses the multiplier at s − 1.
- the entropy and KL terms of the actor loss live with the rest of the loss in rl.grpo.grpo_loss (verl's own
  agg_loss / kl_penalty, configured through verl's ActorConfig).
- `hf_top_k(rl)`: the rollout top-k in HF generate's convention (0 = off) from verl's (−1 = off).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

from infra.spec import RLSpec

KL_LOSS_TYPE = "low_var_kl"  # verl's kl_loss_type (k3, Schulman 2020); the translation sets the same


def warmup_steps(rl: RLSpec) -> int:
    """verl's rule: lr_warmup_steps when > 0, else int(warmup_ratio · total steps)."""
    return rl.lr_warmup_steps if rl.lr_warmup_steps > 0 else int(rl.warmup_ratio * rl.steps)


@lru_cache(maxsize=32)
def _multiplier(schedule: str, warmup: int, total: int, min_lr_ratio: float) -> Callable[[int], float]:
    import torch
    from verl.utils.torch_functional import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only to build verl's LambdaLR
    if schedule == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total,
                                                min_lr_ratio=min_lr_ratio, num_cycles=0.5, zero_indexed_step=True)
    else:
        sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup)
    return sched.lr_lambdas[0]


def lr_at(step: int, rl: RLSpec) -> float:
    """Actor learning rate at RL step `step` (1-based, ≤ rl.steps): rl.lr × verl's multiplier at step − 1.
    With warm-up, step 1 trains at lr 0 — as verl does. Raises ValueError outside 1..steps."""
    if not 1 <= step <= rl.steps:
        raise ValueError(f"step {step} outside 1..{rl.steps}")
    return rl.lr * _multiplier(rl.lr_schedule, warmup_steps(rl), rl.steps, rl.min_lr_ratio)(step - 1)


def hf_top_k(rl: RLSpec) -> int:
    """rl.top_k for HF generate (0 disables top-k there; verl and vLLM use −1)."""
    return 0 if rl.top_k < 0 else rl.top_k

