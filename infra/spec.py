"""The ablation spec (DESIGN §2): one typed document, `base` shared by every arm, arms as declared overrides.

Load with `load_spec(path)`; it raises SpecError with messages that name the file, the line, the dotted key and
what was expected. `resolve_arm(spec, arm)` applies an arm's overrides over `base` and re-validates.
`stage_config(resolved, stage)` is the slice of the resolved config a stage may read: its hash is the stage's
cache key, so a stage can never depend on a key that does not invalidate its cache.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.errors import SpecError
from infra.hashing import hash_json


class Strict(BaseModel):
    """Unknown keys are errors; assignment is validated too; values are not coerced across types (pydantic strict
    mode: '60', 1.0 or true for an integer, 'yes' or 1 for a boolean, '0.3' or true for a number are refused, an
    integer for a number is accepted)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# ---------------------------------------------------------------- executor / compute

class VerlSpec(Strict):
    """Cluster executor settings (verl on Ray); only read when executor.kind == 'verl'."""

    nnodes: int = Field(1, ge=1)
    n_gpus_per_node: int = Field(8, ge=1)
    rollout_engine: Literal["vllm", "sglang", "hf"] = "vllm"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    extra_overrides: list[str] = Field(default_factory=list,
                                       description="raw hydra overrides appended to verl's command line")


class ComputeSpec(Strict):
    """What changes numerics (part of every training stage's cache key)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    cpu_threads: int = Field(1, ge=1, description="torch intra-op threads on CPU of the per-arm stages (SFT, RL, "
                                                   "sweeps), which run side by side. A numerics key, not placement: "
                                                   "bf16 matmuls on 1 and 2 threads give different weights")
    shared_cpu_threads: int | None = Field(
        None, ge=1, description="torch threads of the stages run once for every arm (base model, held-out), which "
                                "run alone, so they may use every core; None = cpu_threads. A numerics key too: "
                                "each stage's compute key holds the one count it runs with (stage_compute)")
    shared_cpu_processes: int = Field(
        1, ge=1, description="processes the stages run once for every arm split their work over, each with "
                             "shared_cpu_threads threads: the toy base model trains data-parallel on this many "
                             "ranks (sft.ranks; a numerics key: fp32 gradient sums in another order), the held-out "
                             "job evaluates this many checkpoints side by side (results identical). Per-arm stages "
                             "never see it")

    @model_validator(mode="after")
    def _processes_on_cpu(self) -> "ComputeSpec":
        if self.device == "cuda" and self.shared_cpu_processes > 1:
            raise ValueError("shared_cpu_processes > 1 splits CPU work (data-parallel base model ranks over gloo); "
                             "with device cuda set it to 1")
        return self


class ExecutorSpec(Strict):
    """Where the arms run. Placement keys (ray, cpus, gpus) do not change results and are not in cache keys;
    `compute` (device, precision, CPU threads) does and is."""

    kind: Literal["local", "verl"] = "local"
    compute: ComputeSpec = ComputeSpec()
    use_ray: bool = True
    ray_address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local instance")
    cpus_per_arm: float = Field(1, gt=0)
    gpus_per_arm: float = Field(0, ge=0)
    verl: VerlSpec = VerlSpec()

    @model_validator(mode="after")
    def _verl_only_for_verl(self) -> "ExecutorSpec":
        if self.kind != "verl" and self.verl != VerlSpec():
            raise ValueError("executor.verl is read only when executor.kind is 'verl' (kind is "
                             f"'{self.kind}'): remove it or set kind: verl")
        return self


# ---------------------------------------------------------------- data

class DataSourceSpec(Strict):
    """Where a dataset comes from: the generated arith world, a local file, or the HF hub."""

    kind: Literal["arith", "file", "hub"] = "arith"
    path: str | None = Field(None, description="file: a .parquet or .jsonl path; hub: the dataset id")
    split: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _path_given(self) -> "DataSourceSpec":
        if self.kind in ("file", "hub") and not self.path:
            raise ValueError(f"kind '{self.kind}' needs a path")
        # a key this kind never reads is refused, not ignored
        unread = {"arith": ("path", "split", "revision"), "file": ("split", "revision"), "hub": ()}[self.kind]
        if given := [k for k in unread if getattr(self, k) is not None]:
            raise ValueError(f"kind '{self.kind}' does not read {', '.join(given)}")
        return self


class ArithWorldSpec(Strict):
    """Sizes and shares of the generated arithmetic world (only read for data sources of kind 'arith')."""

    seed: int = 0
    n_base: int = Field(20000, ge=1, description="plain worked solutions for the base model")
    n_sft1: int = Field(1500, ge=1)
    n_sft2: int = Field(500, ge=0)
    n_rl: int = Field(2000, ge=1)
    n_val_per_domain: int = Field(24, ge=1)
    n_heldout: int = Field(270, ge=1)
    heldout_hard_share: float = Field(0.34, ge=0, le=1, description="share of held-out from the harder band")
    verify_share: float = Field(0.4, ge=0, le=1, description="SFT-1 rows with a verify block on a correct step")
    slip_share: float = Field(0.2, ge=0, le=1, description="SFT-1 rows with a slip caught by a redirect block")
    sft2_redirect_share: float = Field(0.5, ge=0, le=1, description="SFT-2 rows whose prefix is wrong")
    confidence_share: float = Field(0.8, ge=0, le=1, description="SFT-1 blocks that state a confidence")
    check_drill_share: float = Field(0.25, ge=0, le=1, description="base rows that are plain check drills "
                                     "('Is 44-7=36?' checked column by column), so the base model can verify")
    levels: list[Literal[1, 2, 3]] = Field(
        [1, 2, 3], min_length=1, description="the difficulty levels every split draws from, round-robin (held-out "
        "adds its harder band); [1] is the easiest world, which a CI-sized model gets partly right")

    @field_validator("levels", mode="before")
    @classmethod
    def _integer_levels(cls, value: Any) -> Any:
        # Literal[1, 2, 3] matches by equality, so true and 1.0 would pass as level 1 even in strict mode
        if isinstance(value, list) and (bad := [v for v in value if isinstance(v, bool) or not isinstance(v, int)]):
            raise ValueError(f"expected integers among 1, 2, 3, got {bad!r}")
        return value

    @model_validator(mode="after")
    def _distinct_levels(self) -> "ArithWorldSpec":
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"world.levels {self.levels} repeats a level")
        return self


# ---------------------------------------------------------------- model

class ToyModelSpec(Strict):
    """The tiny Qwen2-architecture model and its locally trained byte-level BPE tokenizer."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_position: int = Field(320, ge=16)
    vocab_size: int = Field(512, ge=300, description="BPE target; byte-level training may stop earlier")


class BaseTrainingSpec(Strict):
    """The base-model stage (toy models only): plain worked solutions until the stated val accuracy."""

    seed: int = 0
    max_steps: int = Field(700, ge=1, description="the cosine schedule's length (700 ≈ 61 % greedy val)")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    eval_every: int = Field(175, ge=1)
    target_val_accuracy: float = Field(0.8, ge=0, le=1, description="stop once greedy val accuracy reaches this")


class ModelSpec(Strict):
    """The model to start from: 'toy' (built and base-trained here from `toy` and `base_training`), or a hub id /
    local path with an optional revision. Keys the source does not read are refused."""

    source: str = Field("toy", description="'toy', a hub id (Qwen/Qwen3-8B) or a local path")
    revision: str | None = None
    toy: ToyModelSpec = ToyModelSpec()
    base_training: BaseTrainingSpec = BaseTrainingSpec()

    @model_validator(mode="after")
    def _read_by_source(self) -> "ModelSpec":
        if self.source == "toy" and self.revision is not None:
            raise ValueError("revision is read only for a hub model; source 'toy' is built here")
        if self.source != "toy" and (self.toy != ToyModelSpec() or self.base_training != BaseTrainingSpec()):
            raise ValueError(f"toy and base_training are read only when source is 'toy' (source is "
                             f"'{self.source}')")
        return self


# ---------------------------------------------------------------- SFT

class MetaPredictionFitSpec(Strict):
    """How the meta-prediction demonstrations' pass rates are calibrated to the model SFT starts from
    (sft/masa_demos.py): `problems` of the demonstrated problems (a seeded sample), `samples` solutions each from
    the init model at `temperature` with at most `max_new_tokens`, graded; the per-risk-class slip rates of
    worlds.arith's pass model are fitted to them by maximum likelihood (worlds.arith.fit_slip_by_risk) and every
    demonstration's pass_rate comes from the fit. temperature and max_new_tokens must equal rl.temperature and
    rl.max_response_length (checked in BaseSpec): the pass rate a prediction is scored against is the RL
    rollouts'."""

    problems: int = Field(256, ge=1, description="demonstrated problems sampled to fit the slip rates")
    samples: int = Field(8, ge=1, description="solutions sampled per problem")
    temperature: float = Field(0.7, gt=0, description="sampling temperature (= rl.temperature)")
    max_new_tokens: int = Field(160, ge=8, description="max new tokens per solution (= rl.max_response_length)")


class SFTSpec(Strict):
    """The SFT stage: SFT-1 and optional SFT-2 data (None: no SFT-2), strip_meta (train on the no-meta twin),
    meta_blocks (what the meta side's block contents are: sft/meta_blocks.py), meta_predictions (share of the SFT
    problems that also get a MASA meta-prediction demonstration: sft/masa_demos.py), and the optimiser
    (warmup_ratio: share of the steps; max_length in tokens). meta_blocks other than as_written, and
    meta_predictions > 0, are refused with strip_meta (no block is left to change; a demonstration writes one)."""

    sft1: DataSourceSpec = DataSourceSpec()
    sft2: DataSourceSpec | None = DataSourceSpec()
    strip_meta: bool = Field(False, description="train on the no-meta twin (control arms)")
    meta_blocks: Literal["as_written", "fixed", "empty", "line_end", "response_end", "shuffled", "tool"] = Field(
        "as_written", description="form of the meta side's blocks (sft/meta_blocks.py): as_written, tool (checked "
                                  "blocks), or a placebo: fixed (one neutral content), empty, line_end / "
                                  "response_end (emptied, moved to the end of the line / after the answer) or "
                                  "shuffled (another row's content)")
    meta_predictions: float = Field(
        0.0, ge=0, le=1, description="share of the SFT problems that also get a MASA meta-prediction demonstration "
                                     "row (rl.masa's template answered by the world: sft/masa_demos.py); 0 = none")
    meta_prediction_fit: MetaPredictionFitSpec | None = Field(
        None, description="calibrate the demonstrations' pass rates to the init model's sampled solutions "
                          "(sft/masa_demos.py); unset: the world's declared proxy (worlds.arith.SLIP_BY_RISK)")
    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=16)

    @model_validator(mode="after")
    def _blocks_to_form(self) -> "SFTSpec":
        if self.strip_meta and self.meta_blocks != "as_written":
            raise ValueError(f"meta_blocks '{self.meta_blocks}' reshapes meta blocks, but strip_meta trains on the "
                             f"no-meta twin, which has none: remove one of them")
        if self.strip_meta and self.meta_predictions:
            raise ValueError("meta_predictions demonstrations think in a meta block, but strip_meta trains on the "
                             "no-meta twin, which has none: remove one of them")
        if self.meta_prediction_fit is not None and not self.meta_predictions:
            raise ValueError("meta_prediction_fit calibrates the meta-prediction demonstrations, but "
                             "meta_predictions is 0 (there are none): set meta_predictions or remove it")
        return self


# ---------------------------------------------------------------- RL

class PMIShiftParams(Strict):
    """PMI-shift (DESIGN §6), o/c = belief before/after the block: R = scale·clip(c − o, ±kappa)
    + save_bonus·[o < −eps ∧ c > eps] − derail_penalty·[o > eps ∧ c < −eps]."""

    scale: float = 1.0
    kappa: float = Field(2.0, gt=0)
    save_bonus: float = 1.0
    derail_penalty: float = 2.0
    eps: float = Field(0.0, ge=0)
    position: Literal["natural", "matched"] = Field(
        "natural", description="natural: o = B(x∘p); matched: o = B(x∘p∘placebo block), so o and c are both "
                               "measured right after a closed block (ARITH-NOTES position confound)")


class PMIParams(Strict):
    """PMI (DESIGN §6): per-token log-prob gain of the continuation from the block, summed or averaged, clipped to
    ±clip, signed by correctness; placebo: the baseline context holds a neutral block."""

    aggregate: Literal["sum", "mean"] = "sum"
    clip: float = Field(2.0, gt=0, description="G of the gate: +clip(agg, 0, G) if correct, −clip(agg, 0, G) if "
                                                "wrong")
    placebo: bool = False
    copy_ngram: int = Field(8, ge=1, description="n of the copy check: a block whose token n-grams reappear in "
                                                 "the continuation is not scored")
    copy_share: float = Field(0.25, gt=0, le=1, description="share of the block's n-grams that makes it a copy")


class GMParams(Strict):
    """gm (DESIGN §6): each per-token gold/decoy difference-in-differences is clipped to ±clip, then gated."""

    clip: float = Field(2.0, gt=0, description="each per-token δ is clipped to ±clip")
    gate: float = Field(2.0, gt=0, description="G of the gate: +clip(agg, 0, G) if correct, −clip(agg, 0, G) "
                                               "if wrong")


class AsymCFParams(Strict):
    """asym_cf (DESIGN §6), c1/c0 = group accuracy with/without the block: alpha·max(0, c1 − c0)
    − [c0 − c1 > margin]·min(beta·(c0 − c1), cap) − gamma·[c0 ≥ saturated ∧ c1 ≥ saturated]."""

    alpha: float = 1.0
    beta: float = 2.5
    gamma: float = 0.5
    cap: float = Field(1.0, gt=0)
    margin: float = 0.1
    saturated: float = 0.99


class MASAParams(Strict):
    """MASA (DESIGN §6): r_difficulty = difficulty_base^|predicted pass / 8 − pass rate|."""

    difficulty_base: float = Field(0.01, gt=0, lt=1)


class SignalParams(Strict):
    """Parameters of the reward signals (rewards/signals.py), one section per signal."""

    pmishift: PMIShiftParams = PMIShiftParams()
    pmi: PMIParams = PMIParams()
    gm: GMParams = GMParams()
    asym_cf: AsymCFParams = AsymCFParams()
    masa: MASAParams = MASAParams()


HEADS = ("correctness", "meta", "calibration", "format", "emission")
REGIONS = ("answer", "meta", "confidence", "format")


def _default_routing() -> dict[str, dict[str, float]]:
    # Which token regions each head's advantage reaches. Correctness reaches the whole response (plain GRPO).
    return {
        "correctness": {"answer": 1.0, "meta": 1.0, "confidence": 1.0, "format": 1.0},
        "meta": {"answer": 0.0, "meta": 1.0, "confidence": 0.0, "format": 1.0},
        "calibration": {"answer": 0.0, "meta": 0.0, "confidence": 1.0, "format": 0.0},
        "format": {"answer": 0.0, "meta": 0.0, "confidence": 0.0, "format": 1.0},
        "emission": {"answer": 0.0, "meta": 0.0, "confidence": 0.0, "format": 1.0},
    }


class HeadsSpec(Strict):
    """Reward heads (rewards/heads.py): A_t = Σ_h w_h(step)·A_h·routing[h][region(t)], w_h = weights[h] ramped
    linearly over warmup_steps[h] RL steps. Unknown head or region names are refused."""

    weights: dict[str, float] = Field(
        default_factory=lambda: {"correctness": 1.0, "meta": 1.0, "calibration": 0.0, "format": 0.0,
                                 "emission": 0.0})
    routing: dict[str, dict[str, float]] = Field(default_factory=_default_routing)
    warmup_steps: dict[str, int] = Field(
        default_factory=lambda: {"correctness": 0, "meta": 0, "calibration": 0, "format": 0, "emission": 0},
        description="linear ramp of each head's weight from 0 over this many RL steps")

    @model_validator(mode="after")
    def _known_names(self) -> "HeadsSpec":
        for field in ("weights", "routing", "warmup_steps"):
            unknown = set(getattr(self, field)) - set(HEADS)
            if unknown:
                raise ValueError(f"{field}: unknown head(s) {sorted(unknown)}; heads are {list(HEADS)}")
        for head, regions in self.routing.items():
            unknown = set(regions) - set(REGIONS)
            if unknown:
                raise ValueError(f"routing.{head}: unknown region(s) {sorted(unknown)}; regions are {list(REGIONS)}")
        return self


class FilterGroupsSpec(Strict):
    """DAPO dynamic sampling (verl `algorithm.filter_groups`): a prompt whose rollouts all have the same accuracy
    (all correct or all wrong: zero variance, no learning signal) is dropped and more prompts are generated until
    the step has batch_size informative groups, at most max_num_gen_batches generation rounds (0 = no cap)."""

    enable: bool = False
    max_num_gen_batches: int = Field(10, ge=0, description="generation rounds per step at most; 0 = no cap")


class OverlongBufferSpec(Strict):
    """DAPO soft overlong punishment (verl's DAPO reward manager, `overlong_buffer_cfg`): a response longer than
    max_response_length − len tokens gets min(−(length − (max_response_length − len)) / len · penalty_factor, 0)
    added to its correctness reward."""

    enable: bool = False
    len: int = Field(1024, ge=1, description="the buffer, in tokens, before max_response_length")
    penalty_factor: float = Field(1.0, ge=0, description="the penalty at max_response_length")


class MASAExpertSpec(Strict):
    """MASA's expert SFT (DAgger-style): per prompt the best meta-prediction, with the true pass rate and correct
    length substituted, enters a buffer; once it holds buffer_size items, bc_updates behaviour-cloning steps of
    beta · token-mean NLL on them, then those items leave the buffer."""

    enable: bool = False
    buffer_size: int = Field(32, ge=1, description="N_expert: expert items that trigger behaviour cloning")
    bc_updates: int = Field(5, ge=1, description="behaviour-cloning optimiser steps per flush (the paper: 5)")
    beta: float = Field(1.0, gt=0, description="weight of the behaviour-cloning loss")


class MASAEfficientSpec(Strict):
    """MASA-efficient, on steps after start_step: predictive gating (a prompt whose M predicted pass rates agree,
    std < gate_std, on all-correct or all-wrong gets no solution rollouts), early cutoff (solution rollouts
    stop at cutoff_factor × the mean predicted length) and notion hints (the notions at least half the valid
    predictions name, appended to the solution prompt). audit_prompts prompts per step are also sampled in full,
    not trained on, to measure the gating and cutoff decisions against the truth."""

    gate: bool = False
    gate_std: float = Field(0.1, gt=0, description="predicted pass rates (as fractions) must agree within this std")
    cutoff: bool = False
    cutoff_factor: float = Field(2.0, gt=0, description="max new tokens = factor × mean predicted length")
    hints: bool = Field(False, description="add the notions most predictions name to the solution prompt")
    start_step: int = Field(0, ge=0, description="k: gating, cutoff and hints act on steps after k")
    audit_prompts: int = Field(0, ge=0, description="prompts per step sampled in full to audit the decisions")


class MASASpec(Strict):
    """MASA (arXiv 2510.03259): each prompt also gets m meta-prediction rollouts (rl/masa.py), rewarded by
    rewards.masa.meta_reward against the same prompt's solution rollouts, group-centred within the meta group
    and scaled by meta_weight, in the same PPO update as the solutions; expert SFT and MASA-efficient below."""

    enable: bool = False
    m: int = Field(8, ge=2, description="meta-prediction rollouts per prompt (a group of one has no baseline)")
    meta_weight: float = Field(1.0, gt=0, description="scale of the meta rollouts' advantages in the update")
    max_meta_length: int = Field(256, ge=8, description="max new tokens of a meta-prediction rollout")
    expert: MASAExpertSpec = MASAExpertSpec()
    efficient: MASAEfficientSpec = MASAEfficientSpec()

    @model_validator(mode="after")
    def _acting(self) -> "MASASpec":
        if not self.enable and self.model_dump() != MASASpec.model_construct().model_dump():  # no re-validation
            raise ValueError("masa.* keys are read only with masa.enable: true")
        if not self.expert.enable and self.expert != MASAExpertSpec():
            raise ValueError("masa.expert.buffer_size, .bc_updates and .beta are read only with masa.expert.enable: "
                             "true")
        e = self.efficient
        if not e.gate and e.gate_std != MASAEfficientSpec().gate_std:
            raise ValueError("masa.efficient.gate_std is read only with masa.efficient.gate: true")
        if not e.cutoff and e.cutoff_factor != MASAEfficientSpec().cutoff_factor:
            raise ValueError("masa.efficient.cutoff_factor is read only with masa.efficient.cutoff: true")
        if not (e.gate or e.cutoff or e.hints) and (e.start_step, e.audit_prompts) != (0, 0):
            raise ValueError("masa.efficient.start_step and .audit_prompts are read only with masa.efficient.gate, "
                             ".cutoff or .hints: true")
        return self


class RLSpec(Strict):
    """The GRPO stage: data, reward signal and heads, optimiser, rollouts (n samples per prompt), PPO ratio clip
    [1 − clip_low, 1 + clip_high], lengths in tokens, frequencies in steps. batch_size must be a multiple of
    mini_batch_size."""

    data: DataSourceSpec = DataSourceSpec()
    val: DataSourceSpec = DataSourceSpec()
    reward: str = Field("vanilla", description="reward signal from the registry: vanilla, pmishift, pmi, gm, cf, "
                                               "asym_cf (masa is refused: MASA runs as rl.masa.enable)")
    signal: SignalParams = SignalParams()
    heads: HeadsSpec = HeadsSpec()
    adv_norm_std: bool = Field(False, description="divide group-centred advantages by the group std (every arm alike)")
    lr: float = Field(1e-6, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="verl's actor schedules (rl/schedule.py)")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up steps; 0 = use warmup_ratio")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warm-up steps as a share of steps (when "
                                                               "lr_warmup_steps is 0)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a share of lr")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1, description="prompts per step")
    mini_batch_size: int = Field(8, ge=1, description="prompts per PPO mini-batch")
    n: int = Field(8, ge=1, description="samples per prompt")
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="rollout top-k; -1 = off (verl's convention)")
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.28, ge=0)
    entropy_coeff: float = Field(0.0, ge=0, description="loss = pg_loss − entropy_coeff · entropy (verl's actor)")
    kl_loss: bool = Field(False, description="KL(π‖π_ref) as a loss term (verl use_kl_loss, low_var_kl), "
                                             "weighted by kl_coef; the reference is the arm's SFT model")
    kl_coef: float = Field(0.0, ge=0)
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    max_prompt_length: int = Field(1024, ge=8)
    max_response_length: int = Field(4096, ge=8)
    steps: int = Field(300, ge=1)
    save_freq: int = Field(50, ge=1)
    test_freq: int = Field(10, ge=1)
    val_temperature: float = Field(0.0, ge=0, description="0 = greedy validation")
    val_n: int = Field(1, ge=1)
    rollout_engine: Literal["hf", "vllm"] = Field(
        "hf", description="the local executor's rollout engine: hf (in process) or vllm (its own process, "
                          "`make setup-vllm`; the policy's weights reloaded into it after every update). The "
                          "verl executor's rollouts are executor.verl.rollout_engine")
    filter_groups: FilterGroupsSpec = FilterGroupsSpec()
    overlong_buffer: OverlongBufferSpec = OverlongBufferSpec()
    masa: MASASpec = MASASpec()

    @model_validator(mode="after")
    def _batches(self) -> "RLSpec":
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size "
                             f"{self.mini_batch_size}")
        if self.top_k == 0:
            raise ValueError("top_k: 0 is not a top-k; use -1 for no top-k filtering")
        if self.reward == "masa":
            raise ValueError("reward 'masa' scores meta-prediction rollouts in a solution group, and no executor puts "
                             "any there (every rollout would be skipped: vanilla GRPO under another name); MASA runs "
                             "as rl.masa.enable: true, which rewards its own meta rollouts, next to any rl.reward")
        if not self.masa.enable and self.signal.masa != MASAParams():
            raise ValueError("signal.masa is read only with masa.enable: true (rl.masa's meta rollouts)")
        if not self.filter_groups.enable and self.filter_groups != FilterGroupsSpec():
            raise ValueError("filter_groups.max_num_gen_batches is read only with filter_groups.enable: true")
        if self.filter_groups.enable and self.n < 2:
            raise ValueError(f"filter_groups.enable with n {self.n}: a group of one rollout always has zero "
                             f"variance, so dynamic sampling would keep no group (and never stop with "
                             f"max_num_gen_batches 0); set n ≥ 2")
        if not self.overlong_buffer.enable and self.overlong_buffer != OverlongBufferSpec():
            raise ValueError("overlong_buffer.len and .penalty_factor are read only with overlong_buffer.enable: true")
        if self.overlong_buffer.enable and self.overlong_buffer.len > self.max_response_length:
            raise ValueError(f"overlong_buffer.len {self.overlong_buffer.len} exceeds max_response_length "
                             f"{self.max_response_length}")
        e = self.masa.efficient
        if (e.gate or e.cutoff or e.hints) and e.start_step >= self.steps:
            raise ValueError(f"masa.efficient.start_step {e.start_step}: gating, cutoff and hints act on steps after "
                             f"it, and steps is {self.steps} (none would act)")
        if e.audit_prompts > self.batch_size:
            raise ValueError(f"masa.efficient.audit_prompts {e.audit_prompts} exceeds batch_size {self.batch_size} "
                             f"(a step audits its own prompts)")
        if (e.gate or e.cutoff or e.hints) and self.filter_groups.enable:
            raise ValueError("masa.efficient (gate/cutoff/hints) with filter_groups.enable is not implemented: "
                             "dynamic sampling picks a step's prompts after their solution rollouts, MASA-efficient "
                             "decides before them")
        if self.kl_coef > 0 and not self.kl_loss:
            raise ValueError(f"kl_coef {self.kl_coef} without kl_loss: true (KL acts only as a loss term; "
                             f"in-reward KL is not supported)")
        return self


# ---------------------------------------------------------------- grader / eval

class GraderSpec(Strict):
    """The correctness grader: math-verify, a hard per-item timeout in seconds (a timeout grades incorrect), worker
    processes, and the decimals floats are rounded to before comparing."""

    backend: Literal["math_verify"] = "math_verify"
    timeout_s: float = Field(5.0, gt=0, description="hard per-item timeout; a timeout grades as incorrect")
    workers: int = Field(2, ge=1)
    # Grading conventions (docs/method-cards.md "Grader conventions"); defaults follow verl / Qwen2.5-Math.
    unclosed_last_box: Literal["no_answer", "previous_box"] = Field(
        "no_answer", description="a response whose last box never closes: no answer (counted as truncated), or "
                                 "the last complete box before it")
    braceless_box: bool = Field(True, description="read `\\boxed 5` as the answer 5")
    fbox: bool = Field(True, description="`\\fbox{...}` is an answer box like `\\boxed{...}`")
    join_boxes: bool = Field(True, description="when the gold is a list, join the response's last boxes that "
                                               "form one list (`\\boxed{3}, \\boxed{5}`)")
    percent: Literal["strip", "scaled"] = Field(
        "strip", description="strip: a percent sign is dropped on both sides (10\\% = 10); scaled: also accept "
                             "the gold ×100 and ÷100 (Qwen2.5-Math include_percentage)")
    rel_tol: float = Field(1e-4, gt=0, lt=1, description="relative tolerance when either side is a decimal "
                                                          "(Qwen2.5-Math numeric_equal)")
    numeric_precision: int = Field(15, ge=1, le=100, description="exact values (no decimal) must agree to this "
                                                                   "many significant digits")


class EvalSpec(Strict):
    """Held-out evaluation: the manifest (or the arith world's held-out), sampling (n per problem, per-suite
    overrides, max_new_tokens), the checkpoint sweep on val, bootstrap resamples and ECE bins."""

    heldout: str = Field("datasets/heldout-1030.yaml", description="a held-out manifest path, or 'arith'")
    data_dir: str | None = Field(None, description="local directory with the held-out files (else the hub)")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    n: int = Field(8, ge=1)
    n_per_suite: dict[str, int] = Field(default_factory=lambda: {"aime24": 16})
    seed: int = 0
    max_new_tokens: int = Field(4096, ge=8)
    engine: Literal["hf", "vllm"] = Field("hf", description="generation engine of the held-out job and the "
                                          "sweeps: hf (transformers, in process) or vllm (`make setup-vllm`)")
    sweep: bool = Field(True, description="score every saved checkpoint on the val mix")
    bootstrap_resamples: int = Field(1000, ge=10)
    ece_bins: int = Field(15, ge=2)
    equivalence_margin: float | None = Field(
        None, gt=0, lt=1, description="Δ accuracy (fraction, 0.02 = 2 pp) within which the report calls two arms "
                                      "equivalent when their 95% CI holds 0 and lies inside ±margin (TOST); unset: "
                                      "such a CI reads 'inconclusive'")


class BaseSpec(Strict):
    """The config every arm shares and resolves to: distinct seeds and one section per concern. `world` is refused
    when no data source is 'arith', eval.data_dir when eval.heldout is 'arith'."""

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    tool: Literal["none", "arith_check"] = Field(
        "none", description="the environment's tool (evals/tools.py) in every generation of RL, sweeps and held-out: "
                            "none, or arith_check (a check inside a meta block gets its exact value appended). Part "
                            "of the environment, like the grader: the same for every arm")
    executor: ExecutorSpec = ExecutorSpec()
    world: ArithWorldSpec = ArithWorldSpec()
    model: ModelSpec = ModelSpec()
    sft: SFTSpec = SFTSpec()
    rl: RLSpec = RLSpec()
    grader: GraderSpec = GraderSpec()
    eval: EvalSpec = EvalSpec()

    @model_validator(mode="after")
    def _read_somewhere(self) -> "BaseSpec":
        sources = [self.sft.sft1, self.sft.sft2, self.rl.data, self.rl.val]
        if self.world != ArithWorldSpec() and not any(s is not None and s.kind == "arith" for s in sources):
            raise ValueError("world is read only when a data source has kind 'arith' (none has)")
        if self.eval.heldout == "arith" and self.eval.data_dir is not None:
            raise ValueError("eval.data_dir is read only for a held-out manifest; eval.heldout 'arith' comes from "
                             "the world")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once (got {self.seeds})")
        if self.sft.meta_blocks == "tool" and self.tool == "none":
            raise ValueError("sft.meta_blocks 'tool' teaches checks that call the environment's calculator, but tool "
                             "is 'none' (no environment answers them): set tool: arith_check")
        if self.rl.rollout_engine != "hf" and self.executor.kind == "verl":
            raise ValueError("rl.rollout_engine is read only by the local executor; verl's rollouts are "
                             "executor.verl.rollout_engine")
        fit = self.sft.meta_prediction_fit
        if fit is not None and (fit.temperature, fit.max_new_tokens) != (self.rl.temperature,
                                                                          self.rl.max_response_length):
            raise ValueError(f"sft.meta_prediction_fit samples at temperature {fit.temperature} with at most "
                             f"{fit.max_new_tokens} tokens, but RL's rollouts (what a predicted pass rate is scored "
                             f"against) use rl.temperature {self.rl.temperature} and rl.max_response_length "
                             f"{self.rl.max_response_length}: set them equal")
        if fit is not None and self.tool != "none":
            raise ValueError(f"sft.meta_prediction_fit samples without the environment's tool, but tool is "
                             f"'{self.tool}' (RL's rollouts use it): use tool: none or remove the fit")
        if self.tool != "none" and self.executor.kind == "verl":
            raise ValueError(f"tool '{self.tool}': the verl executor's rollouts have no tool loop yet (the local "
                             f"executor's have); use executor.kind: local or tool: none")
        return self


class ArmSpec(Strict):
    """One arm: overrides of base by dotted key (load_spec requires at least one) and a description."""

    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys of base -> value")
    description: str = ""


class ContrastSpec(Strict):
    """A declared comparison treatment − control of two arms, its question, and the mechanisms it changes."""

    treatment: str
    control: str
    question: str = ""
    mechanisms: list[str] = Field(default_factory=list,
                                  description="mechanisms this contrast is declared to change (package effects)")


NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # ablation and arm names end up in paths, run names and role keys


class AblationSpec(Strict):
    """The spec document: a path-safe name, the shared `base`, at least one arm (path-safe names) and contrasts."""

    name: str = Field(pattern=NAME)
    description: str = ""
    base: BaseSpec = BaseSpec()
    arms: dict[str, ArmSpec]
    contrasts: dict[str, ContrastSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _arm_names(self) -> "AblationSpec":
        import re

        bad = [a for a in self.arms if not re.match(NAME, a)]
        if bad:
            raise ValueError(f"arm names must be letters, digits, '_', '.', '-' (got {bad})")
        if not self.arms:
            raise ValueError("an ablation needs at least one arm")
        return self


# ---------------------------------------------------------------- mechanisms

# Which mechanism a dotted key belongs to; the audit names package effects by these.
_MECHANISMS = [
    ("sft.strip_meta", "meta_sft"),
    ("sft.meta_blocks", "meta_blocks"),
    ("sft.meta_predictions", "masa_prediction_sft"),
    ("sft.meta_prediction_fit", "masa_prediction_sft"),
    ("sft.sft1", "sft_data"),
    ("sft.sft2", "sft_data"),
    ("rl.reward", "meta_reward"),
    ("rl.signal", "meta_reward"),
    ("rl.heads", "meta_reward"),
    ("rl.filter_groups", "dynamic_sampling"),
    ("rl.overlong_buffer", "overlong_punishment"),
    ("rl.masa.expert", "masa_expert_sft"),
    ("rl.masa.efficient.gate", "masa_gating"),
    ("rl.masa.efficient.gate_std", "masa_gating"),
    ("rl.masa.efficient.cutoff", "masa_cutoff"),
    ("rl.masa.efficient.cutoff_factor", "masa_cutoff"),
    ("rl.masa.efficient.hints", "masa_hints"),
    ("rl.masa.efficient", "masa_efficient_schedule"),  # start_step, audit_prompts: when and how they are measured
    ("rl.masa", "masa_meta_rollouts"),
]
# Keys whose mechanism depends on the value: value -> mechanism (None: the value changes no mechanism). Every value
# of the key's Literal is listed (tests/test_meta_blocks.py keeps them equal).
_VALUE_MECHANISMS: dict[str, dict[str, str | None]] = {
    "sft.meta_blocks": {"as_written": None, "fixed": "placebo_blocks", "empty": "placebo_blocks",
                        "line_end": "placebo_blocks", "response_end": "placebo_blocks", "shuffled": "placebo_blocks",
                        "tool": "tool"},
}
MECHANISMS = frozenset({name for _, name in _MECHANISMS}
                       | {m for table in _VALUE_MECHANISMS.values() for m in table.values() if m})


def mechanism_of(key: str) -> str:
    """The mechanism a differing key belongs to: a named mechanism, else the key itself (a hyperparameter)."""
    for prefix, name in _MECHANISMS:
        if key == prefix or key.startswith(prefix + "."):
            return name
    return key


def model_problems(cfg: "BaseSpec") -> list[str]:
    """What a resolved arm asks of its model that the model cannot give (checked by tasks.stages.load_checked_spec;
    not a BaseSpec validator, because the RL defaults are sized for hub models, not the toy one):
    a toy model must have positions for the longest sequence a stage generates (rl.max_prompt_length plus
    rl.max_response_length, or plus eval.max_new_tokens); the HF engine would run past the positions the model was
    built and trained for without a word, vLLM would fail mid-run. `tool` writes marker tokens only twinarm's own
    tokenizer has (model.source toy). Hub models' positions are read from their config at run time."""
    out: list[str] = []
    if cfg.model.source != "toy":
        if cfg.tool != "none":
            out.append(f"tool '{cfg.tool}' needs the calculator markers of twinarm's own tokenizer (model.source: "
                       f"toy); model.source is '{cfg.model.source}'")
        return out
    limit = cfg.model.toy.max_position
    for what, new in (("rl.max_response_length", cfg.rl.max_response_length),
                      ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if cfg.rl.max_prompt_length + new > limit:
            out.append(f"rl.max_prompt_length {cfg.rl.max_prompt_length} + {what} {new} = "
                       f"{cfg.rl.max_prompt_length + new} exceeds model.toy.max_position {limit}: raise "
                       f"model.toy.max_position or shorten them")
    return out


def mechanisms_of(key: str, values: tuple[Any, ...] = ()) -> tuple[str, ...]:
    """The mechanisms a differing key belongs to, given the values that differ (e.g. the two arms'), sorted: for a
    key whose mechanism depends on its value (sft.meta_blocks), the mechanisms those values name (fixed, shuffled
    → placebo_blocks); otherwise, or without values, (mechanism_of(key),)."""
    if key in _VALUE_MECHANISMS and values:
        table = _VALUE_MECHANISMS[key]
        return tuple(sorted({table[v] for v in values if table.get(v)}))
    return (mechanism_of(key),)


def contrast_mechanisms(name: str, contrast: "ContrastSpec", diff: dict[str, tuple[Any, Any]]
                        ) -> tuple[list[str], list[str]]:
    """(the mechanisms the arm diff changes, sorted; the problems with the contrast's declaration) for a contrast
    and the keys that differ between its arms (key -> (treatment value, control value)). Problems: a
    hyperparameter that differs without being named in `mechanisms`; a changed mechanism not declared, when
    `mechanisms` is given, or two or more changed mechanisms with none declared (a package effect must be named);
    a declared name that is neither a known mechanism (MECHANISMS) nor a differing key, or that the diff does not
    change."""
    where = f"contrast {name} ({contrast.treatment} − {contrast.control})"
    changed = {k: mechanisms_of(k, v) for k, v in diff.items()}
    mechanisms = sorted({m for k, ms in changed.items() for m in ms if m != k})
    problems = [f"{where} changes hyperparameter {k}, which is no mechanism" for k, ms in changed.items()
                if ms == (k,) and k not in contrast.mechanisms]
    declared = contrast.mechanisms
    problems += [f"{where} declares {m} {declared.count(m)} times in contrasts.{name}.mechanisms"
                 for m in sorted(set(declared)) if declared.count(m) > 1]
    if declared:
        problems += [f"{where} changes mechanism {m} ({', '.join(k for k, ms in changed.items() if m in ms)}), not "
                     f"declared in contrasts.{name}.mechanisms {declared}" for m in mechanisms if m not in declared]
        for m in declared:
            if m not in MECHANISMS and m not in diff:
                problems.append(f"{where} declares '{m}', which is neither a mechanism "
                                f"({', '.join(sorted(MECHANISMS))}) nor a key the arms differ in")
            elif m not in mechanisms and m not in diff:
                differ = mechanisms + [k for k, ms in changed.items() if ms == (k,)]
                problems.append(f"{where} declares mechanism {m}, but its arms do not differ in it (they differ in "
                                f"{', '.join(differ) or 'nothing'})")
    elif len(mechanisms) > 1:
        problems.append(f"{where} changes {len(mechanisms)} mechanisms ({', '.join(mechanisms)}) without naming "
                        f"them in contrasts.{name}.mechanisms")
    return mechanisms, problems


# ---------------------------------------------------------------- loading and errors

def yaml_key_lines(text: str) -> dict[tuple, int]:
    """Map key paths to 1-based line numbers, so errors can point at the line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = path + (str(key_node.value),)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _where(file: str, lines: dict[tuple, int], path: tuple) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return f"{file}:{lines[path[:n]]}"
    return file


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":  # a validator's own sentence: it names the keys; the input is the whole section
        return msg.removeprefix("Value error, ")
    got = err.get("input")
    got_s = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"{msg} (got {got_s})"


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _submodel(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model class inside an annotation (X, X | None, dict[str, X]) and whether a free dict key precedes it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    args = getattr(annotation, "__args__", ())
    is_dict = getattr(annotation, "__origin__", None) is dict
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, is_dict
    return None, False


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """The field names allowed at the parent of `path`, for 'did you mean' hints."""
    current: type[BaseModel] | None = model
    parts = list(path[:-1])
    while parts and current is not None:
        field = current.model_fields.get(parts.pop(0))
        if field is None:
            return []
        current, keyed = _submodel(field.annotation)
        if keyed and parts:
            parts.pop(0)
    return list(current.model_fields) if current is not None else []


def format_validation_errors(exc: ValidationError, file: str, lines: dict[tuple, int], prefix: tuple = (),
                       model: type[BaseModel] = AblationSpec) -> list[str]:
    """One `file:line: dotted.key: problem` message per pydantic error (`prefix` + its location; line from `lines`),
    with a 'did you mean' hint for an unknown key among `model`'s allowed keys."""
    problems = []
    for err in exc.errors():
        path = prefix + tuple(p for p in err["loc"] if p not in ("function-after",))
        dotted = _dotted(path)
        hint = ""
        if err["type"] == "extra_forbidden":
            hint = _suggest(str(path[-1]), _allowed_keys(model, path))
        problems.append(f"{_where(file, lines, path)}: {dotted}: {_describe(err)}{hint}")
    return problems


ENVIRONMENT_KEYS = {"tool"}  # what every arm is generated and measured in: base only, never an arm's override


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: `1e-6` is a number (YAML 1.1, PyYAML's default, reads it as the
    string '1e-6', which the strict spec would refuse), as it is in 1.0e-6."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_spec(path: str | Path) -> AblationSpec:
    """Load, validate and check an ablation spec; every arm is resolved once so bad overrides fail here."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise SpecError(f"{file}: spec file not found")
    text = path.read_text()
    try:
        raw = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader (below)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else file
        raise SpecError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: expected a mapping with keys name, base, arms, contrasts")
    lines = yaml_key_lines(text)
    try:
        spec = AblationSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError("invalid spec:\n  " + "\n  ".join(format_validation_errors(exc, file, lines))) from None
    problems = []
    for arm_name, arm in spec.arms.items():
        if not arm.overrides:
            problems.append(f"{_where(file, lines, ('arms', arm_name))}: arms.{arm_name}: an arm must declare at "
                            f"least one override of base (an arm identical to base measures nothing)")
            continue
        if ENVIRONMENT_KEYS & set(arm.overrides):
            problems.append(f"{_where(file, lines, ('arms', arm_name, 'overrides'))}: arms.{arm_name}.overrides: "
                            f"{', '.join(sorted(ENVIRONMENT_KEYS & set(arm.overrides)))} is the environment, the "
                            f"same for every arm (an arm without a tool would differ in what it is measured on); "
                            f"set it in base")
            continue
        try:
            resolve_arm(spec, arm_name)
        except SpecError as exc:
            problems.append(str(exc).replace("<spec>", _where(file, lines, ("arms", arm_name, "overrides"))))
    for c_name, contrast in spec.contrasts.items():
        for role in ("treatment", "control"):
            arm = getattr(contrast, role)
            if arm not in spec.arms:
                problems.append(f"{_where(file, lines, ('contrasts', c_name, role))}: contrasts.{c_name}.{role}: "
                                f"unknown arm '{arm}' (arms: {', '.join(spec.arms)})")
    if problems:
        raise SpecError("invalid spec:\n  " + "\n  ".join(problems))
    return spec


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a nested dict (lists are leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def flatten(config: BaseModel | dict) -> dict[str, Any]:
    """Dotted leaf keys of a config (a model is dumped in JSON mode): {"rl.lr": 1e-06, ...}; lists and empty dicts
    are leaves."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return _flatten(data)


def resolve_arm(spec: AblationSpec, arm: str) -> BaseSpec:
    """base with the arm's overrides applied, validated. Overriding a key base does not have is an error."""
    if arm not in spec.arms:
        raise SpecError(f"unknown arm '{arm}' (arms: {', '.join(spec.arms)})")
    data = spec.base.model_dump(mode="json")
    known = set(flatten(data))
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
    for key, value in spec.arms[arm].overrides.items():
        if key not in prefixes:
            hint = _suggest(key, sorted(prefixes))
            raise SpecError(f"<spec>: arms.{arm}.overrides.{key}: no such key in base{hint}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = copy.deepcopy(value)
    try:
        return BaseSpec.model_validate(data)
    except ValidationError as exc:
        problems = [f"<spec>: arms.{arm}.overrides: {_dotted(tuple(e['loc'])) + ': ' if e['loc'] else ''}"
                    f"{_describe(e)}" for e in exc.errors()]
        raise SpecError("\n  ".join(problems)) from None


def resolved_arms(spec: AblationSpec) -> dict[str, BaseSpec]:
    """Every arm resolved over base: {arm: BaseSpec}. Raises SpecError as resolve_arm does."""
    return {arm: resolve_arm(spec, arm) for arm in spec.arms}


def config_hash(config: BaseModel | dict) -> str:
    """Stable under key order and re-serialisation (canonical JSON of the validated, dumped model)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return hash_json(data)


def config_diff(a: BaseModel | dict, b: BaseModel | dict) -> dict[str, tuple[Any, Any]]:
    """Leaf keys whose values differ between two configs: key -> (a value, b value)."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def declared_keys(spec: AblationSpec, arm: str) -> set[str]:
    """Leaf keys an arm's overrides name (an override of a section names every leaf under it)."""
    base_leaves = flatten(spec.base)
    out = set()
    for key in spec.arms[arm].overrides:
        out |= {k for k in base_leaves if k == key or k.startswith(key + ".")} or {key}
    return out


# ---------------------------------------------------------------- stage projections

# Keys that decide only where stages run, never what they compute: in no stage's compute key. Ray and inline
# placement give byte-identical outputs (tests/test_ray_exec.py, scripts/bench_rl.py demo) because every body sets
# its torch threads from executor.compute, which is a numerics key.
PLACEMENT_KEYS = ("executor.use_ray", "executor.ray_address", "executor.cpus_per_arm", "executor.gpus_per_arm")


def leaf(data: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a dumped config."""
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def stage_config(resolved: BaseSpec, keys: tuple[str, ...], seed: int | None = None,
                 shared: bool = False) -> dict[str, Any]:
    """The slice of a resolved arm config a stage reads: {dotted key: value} for each declared key (a key may name
    a whole section), plus "seed" (the arm's seed, default its first) when declared. A stage body receives only
    this dict, so its compute key covers everything that can change its output. `shared`: the stage runs once for
    every arm (alone on the machine), which decides its thread count (stage_compute). Raises KeyError for a key
    the config does not have."""
    data = resolved.model_dump(mode="json")
    data["seed"] = seed if seed is not None else resolved.seeds[0]
    out = {key: leaf(data, key) for key in keys}
    if "executor.compute" in out:
        out["executor.compute"] = stage_compute(out["executor.compute"], shared)
    return out


def stage_compute(compute: dict[str, Any], shared: bool) -> dict[str, Any]:
    """The executor.compute section as one stage sees it: `cpu_threads` is the count that stage runs with
    (shared_cpu_threads for a shared stage when set, else cpu_threads) and shared_cpu_threads is dropped, so a
    stage's compute key holds exactly its own thread count: the base model's changes with shared_cpu_threads, the
    per-arm stages' do not. Likewise shared_cpu_processes is kept for a shared stage only, and only when > 1."""
    out = {k: v for k, v in compute.items() if k not in ("shared_cpu_threads", "shared_cpu_processes")}
    if shared and compute.get("shared_cpu_threads") is not None:
        out["cpu_threads"] = compute["shared_cpu_threads"]
    if shared and compute.get("shared_cpu_processes", 1) > 1:  # absent at 1, so keys made before it stay valid
        out["shared_cpu_processes"] = compute["shared_cpu_processes"]
    return out


class ConfigSlice:
    """Attribute view of the keys of a stage's config slice under one section: `ConfigSlice(cfg, "rl").val_n` is
    `cfg["rl.val_n"]`. Reading a key the stage did not declare raises KeyError naming it, so a body cannot depend
    on a value its compute key does not cover (a model filled with defaults would hide that)."""

    def __init__(self, config: dict[str, Any], section: str):
        self._config, self._section = config, section

    def __getattr__(self, name: str) -> Any:
        key = f"{self._section}.{name}"
        if key not in self._config:
            raise KeyError(f"{key}: not in this stage's config slice (declared: {', '.join(self._config)})")
        return self._config[key]
