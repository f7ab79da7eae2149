"""The shared heads/region advantage on verl: reward manager "TwinarmRewardManager" and advantage estimator
"twinarm_heads" (DESIGN §5, cluster executor; rl/verl_config.py wires both into verl's config).

Reward manager (verl's reward-loop interface, one rollout per `run_single`): grades the decoded response with our
grader and returns the per-rollout heads of rewards.heads.rollout_heads as reward_extra_info
`twinarm_head_<head>` (NaN where the head has no value) and the correctness head as verl's reward score. The meta
head is the reward signal's value (VERL_SIGNALS: vanilla, and the frozen-reference scorer's pmishift, pmi, gm),
computed by the local executor's own code (rewards.signals.score_group, rewards.scorer.HFScorer, rewards.decoys)
inside the reward-loop worker, with the scorer's calls/forwards per rollout returned alongside; the regeneration
signals and MASA are refused when the manager starts. DAPO on verl: the manager adds the
soft overlong punishment to the correctness head when `reward.reward_kwargs.overlong_buffer_cfg.enable` (read
where verl's own DAPO reward manager reads it), and returns the grader's accuracy as reward_extra_info `acc`, the
metric verl's ReplayBuffer filters zero-variance groups on (`algorithm.filter_groups`).

The estimator reads per-row fields (per row, so they survive verl's reordering, balancing and chunking):
- non_tensor_batch["twinarm_head_<head>"]: float (bs,), NaN where the head has no value (None) — the shape a verl
  reward manager's reward_extra_info already lands in;
- batch["twinarm_region_ids"]: int64 (bs, response_length), region index into infra.spec.REGIONS, from the
  response token ids by rewards.heads.token_offsets/token_regions (`attach_regions`);
- batch["twinarm_gain"]: float32 (bs, heads, regions) = w_h(step) · routing[h][r] (`attach_gain`).
It centres each head within each `uid` group with rewards.heads.centre_heads and maps heads to tokens with
rewards.heads.token_advantages, the same functions the local executor runs. token_level_rewards are not read
(the heads carry the reward), so in-reward KL is refused rather than silently dropped.

verl 0.9.1's ray_trainer.compute_advantage forwards `batch`/`non_tensor_batch` to GDPO only; any other registered
estimator gets token_level_rewards, response_mask, index and config — and the v1 trainer fetches only a fixed
list of fields from its TransferQueue. Our trainer (rl/verl_trainer.py, trainer mode "twinarm_sync") therefore
fetches the head fields and response ids itself and calls `heads_advantage` below; called without the fields,
the registered function raises instead of guessing. The std switch is read from the argument or the algorithm
config (`norm_adv_by_std_in_grpo`), never defaulted.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.trainer.ppo.core_algos import register_adv_est

from infra.spec import HEADS, REGIONS, GraderSpec, HeadsSpec
from rewards.heads import centre_heads, gain_matrix, head_weights, overlong_penalty, rollout_heads, \
    token_advantages, token_offsets, token_regions
from rewards.signals import Rollout, SignalContext, get_signal, score_group
from meta.grammar import META_CLOSE, META_OPEN, format_class

ESTIMATOR = "twinarm_heads"
TWINARM_SECTION = "twinarm"  # the verl config's top-level section of our keys (rl/verl_config.py writes it)
HEAD_KEY = "twinarm_head_{}"
REGION_KEY = "twinarm_region_ids"
GAIN_KEY = "twinarm_gain"
FILTER_METRIC = "acc"  # reward_extra_info field of the accuracy (algorithm.filter_groups.metric, rl/verl_config.py)


def attach(data: DataProto, head_values: Sequence[Mapping[str, float | None]], region_ids: Sequence[Sequence[int]],
           weights: Mapping[str, float], routing: Mapping[str, Mapping[str, float]]) -> None:
    """Write the estimator's fields into `data` (rows in data's order; region ids padded to the response width)."""
    bs = data.batch["response_mask"].shape[0]
    if len(head_values) != bs:
        raise ValueError(f"batch has {bs} rows; got {len(head_values)} head rows")
    for h in HEADS:
        data.non_tensor_batch[HEAD_KEY.format(h)] = np.array(
            [np.nan if v.get(h) is None else float(v[h]) for v in head_values], dtype=np.float64)
    _write_regions(data, region_ids)
    attach_gain(data, weights, routing)


def _write_regions(data: DataProto, region_ids: Sequence[Sequence[int]]) -> None:
    bs, width = data.batch["response_mask"].shape
    if len(region_ids) != bs:
        raise ValueError(f"batch has {bs} rows; got {len(region_ids)} region rows")
    regions = torch.zeros((bs, width), dtype=torch.long)
    for b, ids in enumerate(region_ids):
        if len(ids) > width:
            raise ValueError(f"row {b}: {len(ids)} region ids for a response width of {width}")
        regions[b, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    data.batch[REGION_KEY] = regions


def attach_regions(data: DataProto, tokenizer: Any, meta_open: str = META_OPEN, meta_close: str = META_CLOSE
                   ) -> None:
    """Region ids of every response token from data.batch["responses"] (bs, T) and "response_mask" (bs, T),
    by the local executor's rewards.heads.token_offsets/token_regions."""
    responses, mask = data.batch["responses"], data.batch["response_mask"]
    regions = []
    for b in range(responses.shape[0]):
        ids = responses[b, :int(mask[b].sum())].tolist()
        text, offsets = token_offsets(tokenizer, ids)
        regions.append(token_regions(text, offsets, meta_open, meta_close))
    _write_regions(data, regions)


def attach_gain(data: DataProto, weights: Mapping[str, float], routing: Mapping[str, Mapping[str, float]]) -> None:
    bs = data.batch["response_mask"].shape[0]
    gain = torch.tensor(gain_matrix(weights, routing), dtype=torch.float32)
    data.batch[GAIN_KEY] = gain.expand(bs, len(HEADS), len(REGIONS)).clone()


def heads_advantage(data: DataProto, tokenizer: Any, heads: HeadsSpec, step: int, norm_adv_by_std_in_grpo: bool,
                    meta_open: str = META_OPEN, meta_close: str = META_CLOSE) -> dict[str, Any]:
    """What our verl trainer runs at RL step `step` (1-based) on a batch carrying uid, responses, response_mask
    and the reward manager's head fields: regions, gain w_h(step)·routing, then `compute_advantage`."""
    attach_regions(data, tokenizer, meta_open, meta_close)
    attach_gain(data, head_weights(heads, step), heads.routing)
    return compute_advantage(data, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)


def read_twinarm_section(config: Any) -> dict[str, Any]:
    """{rl: {...}, grader: {...}, model: {...}, seed} from a composed verl config's `twinarm` section.
    Raises ValueError when the config has none (it was not made by rl.verl_config)."""
    from omegaconf import OmegaConf

    section = config.get(TWINARM_SECTION) if hasattr(config, "get") else None
    if section is None:
        raise ValueError(f"the verl config has no '{TWINARM_SECTION}' section: it was not made by rl.verl_config")
    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)


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


# the signals the verl reward manager runs, each checked against the local executor's score_group (tests/test_verl.py):
# every one of them scores a rollout from its own prompt, response, gold and decoy (the group is only the local
# scorer's batching unit), so one rollout at a time — verl's reward-loop unit — gives the same value
VERL_SIGNALS = ("vanilla", "pmishift", "pmi", "gm")
SCORER_CALLS, SCORER_FORWARDS = "twinarm_scorer_calls", "twinarm_scorer_forwards"


SCORER_METRICS = {SCORER_CALLS: "twinarm/scorer_calls", SCORER_FORWARDS: "twinarm/scorer_forwards"}


def scorer_totals(infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """{"twinarm/scorer_calls", "twinarm/scorer_forwards"}: the sums over a batch's reward_extra_info dicts (the
    step metrics our trainer logs, which rl.verl_run reads back into the stage's facts)."""
    return {metric: float(sum(int(i.get(key, 0)) for i in infos)) for key, metric in SCORER_METRICS.items()}


def model_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer as the local executor loads it (worlds.tokenizer.load_tokenizer) when `tokenizer` was loaded
    from a local model directory (verl loads with AutoTokenizer, which next to a qwen2 config picks another class
    for our locally trained tokenizers); otherwise `tokenizer` itself."""
    from pathlib import Path

    from worlds.tokenizer import load_tokenizer

    name = str(getattr(tokenizer, "name_or_path", "") or "")
    return load_tokenizer(Path(name)) if name and Path(name).is_dir() else tokenizer


class TwinarmRewardManager(RewardManagerBase):
    """verl reward-loop manager: one rollout → {"reward_score": correctness head, "reward_extra_info": heads}.

    Configured by rl/verl_config.py (`reward.reward_manager.source=importlib`, module pkg://rewards.verl_adapter);
    reads the `twinarm` section of the verl config (rl.reward, rl.signal, rl.heads, grader). The meta head is the
    signal's value from rewards.signals.score_group on the rollout alone, with the local executor's frozen-reference
    scorer: rewards.scorer.HFScorer on the arm's SFT model (actor_rollout_ref.model.path, the policy's start, as
    rl.grpo loads it from `init`) and one decoy per gold (rewards.decoys.make_decoys). The scorer's calls and
    forwards made for each rollout are returned as reward_extra_info `twinarm_scorer_calls` /
    `twinarm_scorer_forwards` (0 for a scorer-free signal, which loads no scorer). Raises ValueError at
    construction for a signal not in VERL_SIGNALS (regeneration-based signals, MASA)."""

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any = None, reward_router_address: Any = None,
                 reward_model_tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(config, tokenizer, compute_score)
        from infra.spec import SignalParams
        from rewards.grader import get_grader

        section = read_twinarm_section(config)
        reward = section["rl"]["reward"]
        if reward not in VERL_SIGNALS:
            raise ValueError(f"rl.reward '{reward}': on verl the reward manager runs {', '.join(VERL_SIGNALS)}; "
                             f"signals that regenerate (cf, asym_cf) or MASA's rollouts are not built")
        self.reward = reward
        self.policy_tokenizer = model_tokenizer(tokenizer)  # decodes responses as the local executor does
        self.signal = get_signal(reward)
        self.params = SignalParams.model_validate(section["rl"].get("signal", {}))
        self.grader = get_grader(GraderSpec.model_validate(section["grader"]))
        self.max_response_length = int(config.data.max_response_length)
        self.scorer = None
        if "scorer" in self.signal.needs:
            import torch

            from rewards.scorer import HFScorer

            self.scorer = HFScorer.from_pretrained(str(config.actor_rollout_ref.model.path),
                                                   device="cuda" if torch.cuda.is_available() else "cpu")
        self.scorer_lock = threading.Lock()  # one scorer, rollouts arrive concurrently
        kwargs = config.reward.get("reward_kwargs", None) or {}
        overlong = kwargs.get("overlong_buffer_cfg", None)
        self.overlong = overlong if overlong is not None and overlong.get("enable", False) else None
        if self.overlong is not None and kwargs.get("max_resp_len", None) != self.max_response_length:
            raise ValueError(f"reward.reward_kwargs.max_resp_len {kwargs.get('max_resp_len', None)} is not "
                             f"data.max_response_length {self.max_response_length}")

    def heads_of(self, response: str, gold: str, truncated: bool, n_tokens: int, prompt: str = ""
                 ) -> dict[str, Any]:
        """The per-rollout heads, as rewards.pipeline.score_batch builds them for the local executor (signal value
        on the meta head; the soft overlong punishment on the correctness head when configured), plus `acc` (1.0
        correct, 0.0 not), `signal` (the SignalResult) and the scorer calls/forwards this rollout made. `prompt`:
        the rendered prompt text the policy saw (a scorer signal scores contexts that start with it)."""
        from rewards.decoys import make_decoys

        grade = self.grader.grade([response], [gold])[0]
        decoy = None
        if "decoy" in self.signal.needs:
            decoy = make_decoys([gold], self.grader, self.scorer.tokenizer)[0]
        rollout = Rollout(prompt=prompt, response=response, gold=gold, decoy=decoy, correct=grade.correct,
                          truncated=truncated, format_class=format_class(response, truncated, 1), n_tokens=n_tokens)
        with self.scorer_lock:
            calls0, forwards0 = (self.scorer.calls, self.scorer.forwards) if self.scorer is not None else (0, 0)
            ctx = SignalContext(params=self.params, scorer=self.scorer,
                                tokenizer=self.scorer.tokenizer if self.scorer is not None else None)
            result = score_group(self.reward, [rollout], ctx)[0]
            calls = self.scorer.calls - calls0 if self.scorer is not None else 0
            forwards = self.scorer.forwards - forwards0 if self.scorer is not None else 0
        values = rollout_heads(rollout, result.value)
        if self.overlong is not None:
            values["correctness"] += overlong_penalty(n_tokens, self.max_response_length, int(self.overlong["len"]),
                                                      float(self.overlong["penalty_factor"]))
        return {**values, "acc": float(grade.correct), "signal": result, SCORER_CALLS: calls,
                SCORER_FORWARDS: forwards}

    async def run_single(self, data: DataProto) -> dict:
        item = data[-1]
        response_ids = item.batch["responses"]
        width = response_ids.shape[-1]
        attention = item.batch["attention_mask"]
        valid = int(attention[-width:].sum())
        ids = response_ids[:valid].tolist()
        text, _ = token_offsets(self.policy_tokenizer, ids)  # the text the regions are cut from (local: the same)
        prompt = ""
        if self.scorer is not None:  # the prompt as the policy saw it (left-padded ids, chat template applied)
            prompt_ids = item.batch["prompts"][attention[:-width].bool()].tolist()
            prompt, _ = token_offsets(self.policy_tokenizer, prompt_ids)
        gold = str(item.non_tensor_batch["reward_model"]["ground_truth"])
        values = await self.loop.run_in_executor(
            None, lambda: self.heads_of(text, gold, valid >= self.max_response_length, valid, prompt))
        extra = {HEAD_KEY.format(h): (np.nan if values[h] is None else float(values[h])) for h in HEADS}
        extra[FILTER_METRIC] = values["acc"]
        extra[SCORER_CALLS], extra[SCORER_FORWARDS] = values[SCORER_CALLS], values[SCORER_FORWARDS]
        return {"reward_score": float(values["correctness"]), "reward_extra_info": extra}
