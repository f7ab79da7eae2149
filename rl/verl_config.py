"""One translation: a resolved arm config (infra.spec.BaseSpec) → verl 0.9.1 Hydra overrides (cluster executor).

`translate(cfg, ...)` returns {verl key: value} for data, actor (optimizer, loss, KL, entropy), rollout (sampling,
validation sampling), algorithm (advantage estimator), trainer (steps, save/test frequency, nodes, logger,
checkpoint directory, resume), reward (our reward manager) and checkpoint contents. Keys verl has no field for
(the reward signal, its parameters, the heads, the grader, the seed) go under a top-level `twinarm.` section that
our reward manager and trainer read back (rewards.verl_adapter.read_twinarm_section). `SOURCES` names the spec key
behind each translated key, so a diff of overrides maps back to a diff of spec keys (`twinarm plan`).

`compose(overrides)` composes verl's shipped `ppo_trainer` config with the overrides through Hydra, exactly as
`python -m verl.trainer.main_ppo` does; `check_types` compares every overridden value with the kind of verl's
shipped default (verl's dataclasses do not check types); `validate(config)` runs verl's own checks
(verl.utils.config.validate_config, which instantiates the actor config dataclass), instantiates the optimizer,
rollout and algorithm config dataclasses (omega_conf_to_dataclass) and resolves the reward manager class as
verl's reward loop does. An unknown key, a wrong type or a value a dataclass refuses is a VerlConfigError naming
the key and the spec key it came from. `load` runs all three.

Every arm — the control arm too — runs our estimator `twinarm_heads` through our trainer `twinarm_sync`, never
verl's stock GRPO path; `translate` asserts it (the research's worst confound was a control arm that fell through
to a stock trainer path).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from infra.errors import SpecError
from infra.spec import BaseSpec, flatten
from rewards.verl_adapter import ESTIMATOR, FILTER_METRIC, TWINARM_SECTION, read_twinarm_section
from rl.schedule import KL_LOSS_TYPE

TRAINER_MODE = "twinarm_sync"  # rl.verl_trainer registers it
REWARD_MANAGER = ("pkg://rewards.verl_adapter", "TwinarmRewardManager")
# keys that name a run rather than change it (left out of the arm diff)
LABEL_KEYS = ("trainer.project_name", "trainer.experiment_name", "trainer.default_local_dir")


class VerlConfigError(SpecError):
    """A translated config verl does not accept (unknown key, refused value)."""


@dataclass(frozen=True)
class RunPaths:
    """Where one arm × seed reads and writes, as the cluster sees it (on the filesystem every node mounts)."""

    train_files: str  # prompts parquet in verl's layout (rl/verl_data.py)
    val_files: str
    model: str  # the arm's SFT model (HF format)
    checkpoints: str  # trainer.default_local_dir


# verl's DAPO reward manager reads the soft overlong punishment here (verl.experimental.reward_loop.reward_manager.
# dapo); so does ours (rewards.verl_adapter.TwinarmRewardManager). Not in the shipped config: added with '+'.
OVERLONG = "reward.reward_kwargs.overlong_buffer_cfg."


def _rl_sources() -> dict[str, str]:
    p, a, r = "data.", "actor_rollout_ref.actor.", "actor_rollout_ref.rollout."
    return {
        p + "max_prompt_length": "rl.max_prompt_length", p + "max_response_length": "rl.max_response_length",
        p + "train_batch_size": "rl.batch_size",
        a + "optim.lr": "rl.lr", a + "optim.weight_decay": "rl.weight_decay", a + "optim.clip_grad": "rl.grad_clip",
        a + "optim.lr_scheduler_type": "rl.lr_schedule", a + "optim.lr_warmup_steps": "rl.lr_warmup_steps",
        a + "optim.lr_warmup_steps_ratio": "rl.warmup_ratio", a + "optim.min_lr_ratio": "rl.min_lr_ratio",
        a + "optim.total_training_steps": "rl.steps",
        a + "grad_clip": "rl.grad_clip", a + "ppo_mini_batch_size": "rl.mini_batch_size",
        a + "clip_ratio": "rl.clip_low", a + "clip_ratio_low": "rl.clip_low", a + "clip_ratio_high": "rl.clip_high",
        a + "loss_agg_mode": "rl.loss_agg", a + "entropy_coeff": "rl.entropy_coeff",
        a + "calculate_entropy": "rl.entropy_coeff", a + "use_kl_loss": "rl.kl_loss",
        a + "kl_loss_coef": "rl.kl_coef", a + "ppo_max_token_len_per_gpu": "rl.max_response_length",
        r + "n": "rl.n", r + "temperature": "rl.temperature", r + "top_p": "rl.top_p", r + "top_k": "rl.top_k",
        r + "val_kwargs.temperature": "rl.val_temperature", r + "val_kwargs.do_sample": "rl.val_temperature",
        r + "val_kwargs.n": "rl.val_n", r + "val_kwargs.top_p": "rl.top_p", r + "val_kwargs.top_k": "rl.top_k",
        "algorithm.norm_adv_by_std_in_grpo": "rl.adv_norm_std",
        "trainer.total_training_steps": "rl.steps", "trainer.save_freq": "rl.save_freq",
        "trainer.test_freq": "rl.test_freq",
        r + "name": "executor.verl.rollout_engine", r + "tensor_model_parallel_size": "executor.verl.tensor_parallel_size",
        r + "gpu_memory_utilization": "executor.verl.gpu_memory_utilization",
        "trainer.nnodes": "executor.verl.nnodes", "trainer.n_gpus_per_node": "executor.verl.n_gpus_per_node",
        "actor_rollout_ref.actor.fsdp_config.dtype": "executor.compute.precision",
        "data.train_files": "rl.data", "data.val_files": "rl.val", "actor_rollout_ref.model.path": "sft",
        "algorithm.filter_groups.enable": "rl.filter_groups.enable",
        "algorithm.filter_groups.metric": "rl.filter_groups.enable",
        "algorithm.filter_groups.max_num_gen_batches": "rl.filter_groups.max_num_gen_batches",
        OVERLONG + "enable": "rl.overlong_buffer.enable", OVERLONG + "len": "rl.overlong_buffer.len",
        OVERLONG + "penalty_factor": "rl.overlong_buffer.penalty_factor",
        "reward.reward_kwargs.max_resp_len": "rl.max_response_length",
    }


# verl key → the spec key (or stage slice) it is translated from; keys not listed are fixed settings
SOURCES: dict[str, str] = _rl_sources()


def _precision(cfg: BaseSpec) -> str:
    if cfg.executor.compute.precision == "fp32":
        return "float32"
    return "bfloat16"  # auto and bf16: verl's default on GPUs


def translate(cfg: BaseSpec, *, ablation: str, arm: str, seed: int, paths: RunPaths) -> dict[str, Any]:
    """The verl overrides of one arm × seed, {verl key: value} (before executor.verl.extra_overrides).

    Raises SpecError for a config the verl executor cannot run as specified (wrong executor kind, a device that is
    not CUDA)."""
    if cfg.executor.kind != "verl":
        raise SpecError(f"arm '{arm}': executor.kind is '{cfg.executor.kind}', not 'verl'")
    if cfg.executor.compute.device == "cpu":
        raise SpecError(f"arm '{arm}': executor.compute.device 'cpu': verl has no CPU training path")
    rl, v = cfg.rl, cfg.executor.verl
    if rl.filter_groups.enable and rl.filter_groups.max_num_gen_batches > 0:
        raise SpecError(f"arm '{arm}': rl.filter_groups.max_num_gen_batches {rl.filter_groups.max_num_gen_batches}: "
                        f"verl {verl_version()}'s v1 ReplayBuffer (the sync trainer twinarm runs) ignores it and "
                        f"refills without a cap; set it to 0 (no cap) for the verl executor")
    if rl.masa.enable:
        raise SpecError(f"arm '{arm}': rl.masa.enable: MASA (meta-prediction rollouts, expert SFT, gating, cutoff) "
                        f"runs on the local executor only (rl/masa.py); the verl executor does not implement it")
    a, r = "actor_rollout_ref.actor.", "actor_rollout_ref.rollout."
    greedy_val = rl.val_temperature == 0
    out: dict[str, Any] = {
        "data.train_files": paths.train_files, "data.val_files": paths.val_files,
        "data.prompt_key": "prompt", "data.reward_fn_key": "data_source",
        "data.max_prompt_length": rl.max_prompt_length, "data.max_response_length": rl.max_response_length,
        "data.train_batch_size": rl.batch_size, "data.seed": seed, "data.shuffle": True,
        "data.truncation": "error", "data.filter_overlong_prompts": True,
        "actor_rollout_ref.model.path": paths.model,
        a + "strategy": "fsdp", a + "fsdp_config.dtype": _precision(cfg),
        a + "optim.optimizer": "AdamW", a + "optim.lr": rl.lr, a + "optim.betas": [0.9, 0.999],
        a + "optim.weight_decay": rl.weight_decay, a + "optim.clip_grad": rl.grad_clip,
        a + "optim.lr_scheduler_type": rl.lr_schedule,
        a + "optim.lr_warmup_steps": rl.lr_warmup_steps if rl.lr_warmup_steps > 0 else -1,
        a + "optim.lr_warmup_steps_ratio": rl.warmup_ratio, a + "optim.min_lr_ratio": rl.min_lr_ratio,
        a + "optim.num_cycles": 0.5, a + "optim.total_training_steps": rl.steps,
        a + "grad_clip": rl.grad_clip,
        a + "ppo_mini_batch_size": rl.mini_batch_size, a + "ppo_epochs": 1, a + "shuffle": False,
        # placement, not numerics: token-budget micro-batches (the loss is aggregated over the mini-batch)
        a + "use_dynamic_bsz": True, a + "ppo_max_token_len_per_gpu": 2 * (rl.max_prompt_length
                                                                            + rl.max_response_length),
        a + "policy_loss.loss_mode": "vanilla",
        a + "clip_ratio": rl.clip_low, a + "clip_ratio_low": rl.clip_low, a + "clip_ratio_high": rl.clip_high,
        a + "loss_agg_mode": rl.loss_agg, a + "entropy_coeff": rl.entropy_coeff,
        a + "calculate_entropy": rl.entropy_coeff > 0,
        a + "use_kl_loss": rl.kl_loss, a + "kl_loss_coef": rl.kl_coef, a + "kl_loss_type": KL_LOSS_TYPE,
        # HF weights come from verl's model merger on read-back (rl.verl_run), not a full copy at every save
        a + "checkpoint.save_contents": ["model", "optimizer", "extra"],
        r + "name": v.rollout_engine, r + "n": rl.n, r + "temperature": rl.temperature, r + "top_p": rl.top_p,
        r + "top_k": rl.top_k, r + "seed": seed,
        r + "tensor_model_parallel_size": v.tensor_parallel_size,
        r + "gpu_memory_utilization": v.gpu_memory_utilization,
        r + "val_kwargs.do_sample": not greedy_val, r + "val_kwargs.temperature": rl.val_temperature,
        r + "val_kwargs.top_p": 1.0 if greedy_val else rl.top_p, r + "val_kwargs.top_k": -1 if greedy_val else rl.top_k,
        r + "val_kwargs.n": rl.val_n,
        "algorithm.adv_estimator": ESTIMATOR, "algorithm.norm_adv_by_std_in_grpo": rl.adv_norm_std,
        "algorithm.use_kl_in_reward": False,
        "algorithm.filter_groups.enable": rl.filter_groups.enable, "algorithm.filter_groups.metric": FILTER_METRIC,
        "algorithm.filter_groups.max_num_gen_batches": rl.filter_groups.max_num_gen_batches,
        "+" + OVERLONG + "enable": rl.overlong_buffer.enable, "+" + OVERLONG + "len": rl.overlong_buffer.len,
        "+" + OVERLONG + "penalty_factor": rl.overlong_buffer.penalty_factor, "+" + OVERLONG + "log": True,
        "+reward.reward_kwargs.max_resp_len": rl.max_response_length,
        "reward.reward_manager.source": "importlib", "reward.reward_manager.name": REWARD_MANAGER[1],
        "reward.reward_manager.module.path": REWARD_MANAGER[0],
        "trainer.v1.trainer_mode": TRAINER_MODE, "trainer.device": "cuda",
        "trainer.total_training_steps": rl.steps, "trainer.total_epochs": 1_000_000,
        "trainer.save_freq": rl.save_freq, "trainer.test_freq": rl.test_freq, "trainer.val_before_train": True,
        "trainer.nnodes": v.nnodes, "trainer.n_gpus_per_node": v.n_gpus_per_node,
        "trainer.logger": ["console", "mlflow"], "trainer.project_name": ablation,
        "trainer.experiment_name": f"{arm}-seed{seed}", "trainer.default_local_dir": paths.checkpoints,
        "trainer.resume_mode": "auto", "trainer.balance_batch": True, "trainer.critic_warmup": 0,
    }
    # every arm through our estimator and trainer: never verl's stock GRPO path (control arm included)
    assert out["algorithm.adv_estimator"] == ESTIMATOR and out["trainer.v1.trainer_mode"] == TRAINER_MODE
    for key, value in twinarm_section(cfg, seed).items():
        out[f"+{TWINARM_SECTION}.{key}"] = value
    return out


def twinarm_section(cfg: BaseSpec, seed: int) -> dict[str, Any]:
    """Our keys verl has no field for, flat: rl.reward, rl.signal.*, rl.heads.*, grader.*, seed (the meta tags
    are the grammar's constants, meta.grammar)."""
    keep = ("rl.reward", "rl.signal.", "rl.heads.", "grader.")
    flat = {k: v for k, v in flatten(cfg).items() if k.startswith(keep)}
    return {**flat, "seed": seed}


_PLAIN = re.compile(r"^[A-Za-z0-9_./:+@~-]+$")


def render_value(value: Any) -> str:
    """A value in Hydra's override grammar (strings quoted unless plain)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render_value(v)}" for k, v in value.items()) + "}"
    s = str(value)
    if _PLAIN.match(s) and s not in ("true", "false", "null") and not re.match(r"^[-+]?[0-9.]", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render(overrides: dict[str, Any], extra: list[str] = ()) -> list[str]:
    """Hydra override strings `key=value`, then the raw extra overrides (executor.verl.extra_overrides)."""
    return [f"{k}={render_value(v)}" for k, v in overrides.items()] + list(extra)


def overrides_for(cfg: BaseSpec, *, ablation: str, arm: str, seed: int, paths: RunPaths) -> list[str]:
    return render(translate(cfg, ablation=ablation, arm=arm, seed=seed, paths=paths), cfg.executor.verl.extra_overrides)


def config_dir() -> str:
    import verl

    return os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def _source(key: str) -> str:
    key = key.lstrip("+")
    src = SOURCES.get(key)
    return f" (from spec key {src})" if src else " (from executor.verl.extra_overrides or a fixed setting)"


def compose(overrides: list[str]) -> Any:
    """verl's `ppo_trainer` config with the overrides, composed by Hydra as verl's main_ppo does.
    Raises VerlConfigError naming an override verl's config has no key for."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, OverrideParseException

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            return hydra_compose("ppo_trainer", overrides=list(overrides))
    except (ConfigCompositionException, OverrideParseException) as exc:
        msg = str(exc)
        m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)'", msg)
        key = m.group(1) if m else next((o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] in msg), "?")
        first = msg.splitlines()[0]
        raise VerlConfigError(f"verl override '{key}'{_source(key)}: verl {verl_version()}'s ppo_trainer config "
                              f"has no such key ({first})") from None


@lru_cache(maxsize=1)
def _shipped() -> Any:
    return compose([])


def _kind(value: Any) -> str:
    from omegaconf import ListConfig

    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    return "str" if isinstance(value, str) else "other"


def check_types(config: Any, overrides: list[str]) -> None:
    """Each overridden value has the kind of verl's shipped default (bool, number, string, list): verl's config
    dataclasses do not check field types, so `ppo_epochs=abc` would otherwise pass. Unset defaults (null, ???)
    and our own `+twinarm.` keys are not checked. Raises VerlConfigError naming the key."""
    from omegaconf import OmegaConf

    shipped = _shipped()
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("+"):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(shipped, parent) if parent else shipped
        if node is None or OmegaConf.is_missing(node, leaf):
            continue
        default = OmegaConf.select(shipped, key, default=None)
        if default is None:
            continue
        value = OmegaConf.select(config, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        want, got = _kind(default), _kind(value)
        if want != got and want != "other":
            raise VerlConfigError(f"verl override '{key}'{_source(key)}: expected a {want} like verl's default "
                                  f"{default!r}, got {value!r}")


def validate(config: Any) -> dict[str, Any]:
    """verl's own validation of a composed config, and its config dataclasses instantiated.

    Returns {section: dataclass type name}. Raises VerlConfigError naming the config section and the value
    refused (an AssertionError/ValueError/TypeError of a verl dataclass, unwrapped)."""
    from hydra.errors import InstantiationException
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
    from verl.trainer.ppo.reward import resolve_reward_manager_cls
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    checked: dict[str, Any] = {}
    # verl 0.9.1 never instantiates `reward` as a dataclass (RewardManagerConfig's __post_init__ calls a missing
    # super().__post_init__); it resolves the manager class instead, and so do we
    sections = ("actor_rollout_ref.actor", "actor_rollout_ref.rollout", "algorithm", "actor_rollout_ref.actor.optim")
    try:
        validate_config(config=config, use_reference_policy=need_reference_policy(config),
                        use_critic=need_critic(config))
        for section in sections:
            node = config
            for part in section.split("."):
                node = node[part]
            checked[section] = type(omega_conf_to_dataclass(node)).__name__
        manager = resolve_reward_manager_cls(config)
        if not (isinstance(manager, type) and issubclass(manager, RewardManagerBase)):
            raise TypeError(f"reward.reward_manager resolves to {manager!r}, not a verl RewardManagerBase")
        checked["reward.reward_manager"] = manager.__name__
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        m = re.search(r"full_key: (\S+)", str(exc))
        raise VerlConfigError(f"verl config {m.group(1) if m else section}: {type(cause).__name__}: "
                              f"{str(cause).splitlines()[0]}") from None
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        raise VerlConfigError(f"verl config check failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                              ) from None
    if config.algorithm.adv_estimator != ESTIMATOR or config.trainer.v1.trainer_mode != TRAINER_MODE:
        raise VerlConfigError(f"the composed config runs adv_estimator '{config.algorithm.adv_estimator}' / "
                              f"trainer '{config.trainer.v1.trainer_mode}', not {ESTIMATOR} / {TRAINER_MODE} "
                              f"(an extra override replaced them: every arm must run our estimator)")
    try:
        read_twinarm_section(config)
    except ValueError as exc:
        raise VerlConfigError(str(exc)) from None
    return checked


def verl_version() -> str:
    from importlib.metadata import version

    return version("verl")


def load(overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """compose + check_types + validate: the config verl would run, and what was validated."""
    config = compose(overrides)
    check_types(config, overrides)
    return config, validate(config)


def check(overrides: list[str]) -> dict[str, Any]:
    """`load`, summarised as JSON-able facts (what the Ray Jobs entrypoint prints with --check)."""
    config, checked = load(overrides)
    return {"verl": verl_version(), "validated": checked, "overrides": len(overrides),
            "adv_estimator": config.algorithm.adv_estimator, "trainer_mode": config.trainer.v1.trainer_mode,
            "reward": read_twinarm_section(config)["rl"]["reward"]}
