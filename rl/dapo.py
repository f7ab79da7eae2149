"""DAPO's dynamic sampling for the local GRPO executor (arXiv 2503.14476 §3.2; verl's `algorithm.filter_groups`).

A group (the n rollouts of one prompt) whose accuracies are all equal — all correct or all wrong — has zero
advantage under group centring and teaches nothing. Dynamic sampling drops such groups and generates more prompts
until the step holds `batch_size` informative groups. The criterion is verl 0.9.1's
(`verl.trainer.ppo.v1.replay_buffer.ReplayBuffer._dapo_filtered_keys`: a group of more than one rollout whose
metric has np.std == 0); the loop is verl's recipe/dapo trainer's (generate a batch of `batch_size` prompts, keep
the informative groups, repeat, cut the kept groups to `batch_size` in generation order). Neither is importable as
a function on its own (the v1 buffer works on TransferQueue keys), so the two are restated here.

Where twinarm departs from the recipe: the recipe raises once `max_num_gen_batches` rounds did not fill the
batch; here the step trains on the informative groups it has (a short batch), or, when it has none, on the last
round's batch as generated (its groups carry no correctness signal), and both are counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from rewards.pipeline import Sample


def zero_variance(values: Sequence[float]) -> bool:
    """True when a group's per-rollout metric is constant (np.std == 0) over more than one rollout: verl's DAPO
    filter criterion. A single-rollout group is never filtered (verl keeps it too)."""
    return len(values) > 1 and float(np.std(np.asarray(values, dtype=np.float64))) == 0.0


@dataclass
class DynamicBatch:
    """The groups a step trains on (prompt rows and their rollouts, generation order) and what it took."""

    rows: list[dict[str, Any]]
    groups: list[list["Sample"]]
    facts: dict[str, int] = field(default_factory=dict)


def dynamic_sampling(prompts_of_round: Callable[[int], list[dict[str, Any]]],
                     sample: Callable[[list[dict[str, Any]], int], list[list["Sample"]]],
                     accuracy: Callable[[list[list["Sample"]]], list[list[float]]],
                     batch_size: int, max_num_gen_batches: int) -> DynamicBatch:
    """Generate rounds of prompts until `batch_size` groups with non-zero accuracy variance are kept.

    `prompts_of_round(r)` gives round r's prompt rows (r = 0, 1, …); `sample(rows, r)` their rollout groups, one
    list per row; `accuracy(groups)` each rollout's accuracy (1.0 correct, 0.0 not), same shape. Stops after
    `max_num_gen_batches` rounds (0 = no cap). Returns the first `batch_size` kept groups in generation order, or
    fewer when the cap stopped it, or the last round's groups unfiltered when none was kept. Facts (counts):
    dynamic_sampling/rounds, generated_groups, filtered_all_correct, filtered_all_wrong, kept_groups (informative
    groups trained on), train_groups (groups trained on), cap_hit (1 when the cap stopped the step short),
    unfiltered (1 when the step fell back to the last round).
    Raises ValueError when `sample` or `accuracy` returns a different number of groups or rollouts."""
    if batch_size < 1 or max_num_gen_batches < 0:
        raise ValueError(f"batch_size must be ≥ 1 and max_num_gen_batches ≥ 0, got {batch_size}, "
                         f"{max_num_gen_batches}")
    rows: list[dict[str, Any]] = []
    groups: list[list["Sample"]] = []
    counts = {"rounds": 0, "generated_groups": 0, "filtered_all_correct": 0, "filtered_all_wrong": 0}
    last: tuple[list[dict[str, Any]], list[list["Sample"]]] = ([], [])
    while len(groups) < batch_size and (max_num_gen_batches == 0 or counts["rounds"] < max_num_gen_batches):
        r = counts["rounds"]
        round_rows = prompts_of_round(r)
        round_groups = sample(round_rows, r)
        acc = accuracy(round_groups)
        if len(round_groups) != len(round_rows) or len(acc) != len(round_groups) or \
                any(len(a) != len(g) for a, g in zip(acc, round_groups)):
            raise ValueError(f"round {r}: {len(round_rows)} prompts, {len(round_groups)} groups, {len(acc)} "
                             f"accuracy lists: sample and accuracy must give one group per prompt, one value per "
                             f"rollout")
        counts["rounds"] += 1
        counts["generated_groups"] += len(round_groups)
        for row, group, values in zip(round_rows, round_groups, acc):
            if zero_variance(values):
                counts["filtered_all_correct" if values[0] > 0 else "filtered_all_wrong"] += 1
            else:
                rows.append(row)
                groups.append(group)
        last = (round_rows, round_groups)
    unfiltered = not groups
    if unfiltered:
        rows, groups = list(last[0]), list(last[1])
    kept = 0 if unfiltered else min(len(groups), batch_size)
    facts = {**counts, "kept_groups": kept, "train_groups": min(len(groups), batch_size),
             "cap_hit": int(kept < batch_size), "unfiltered": int(unfiltered)}
    return DynamicBatch(rows[:batch_size], groups[:batch_size],
                        {f"dynamic_sampling/{k}": v for k, v in facts.items()})
