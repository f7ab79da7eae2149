"""The ablation spec: errors name the file, the line and the dotted key; hashes are stable; arms resolve."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from infra.errors import SpecError
from infra.spec import (MECHANISMS, ContrastSpec, config_diff, config_hash, contrast_mechanisms, declared_keys,
                        load_spec, mechanism_of, mechanisms_of, resolve_arm, resolved_arms)

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
name: t
base:
  rl:
    lr: 2.0e-5
    reward: pmishift
arms:
  control:
    overrides: {sft.strip_meta: true, rl.reward: vanilla}
  pmishift:
    overrides: {rl.reward: pmishift}
contrasts:
  meta: {treatment: pmishift, control: control}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    return str(exc.value)


def test_good_spec_resolves_arms_with_declared_differences(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    arms = resolved_arms(spec)
    assert arms["control"].sft.strip_meta is True and arms["pmishift"].sft.strip_meta is False
    assert arms["control"].rl.lr == arms["pmishift"].rl.lr == 2e-5
    diff = config_diff(arms["pmishift"], arms["control"])
    assert set(diff) == {"sft.strip_meta", "rl.reward"}
    assert diff["rl.reward"] == ("pmishift", "vanilla")
    assert declared_keys(spec, "control") == {"sft.strip_meta", "rl.reward"}
    assert {mechanism_of(k) for k in diff} == {"meta_sft", "meta_reward"}


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, GOOD.replace("    lr: 2.0e-5", "    lrr: 2.0e-5"))
    msg = error_of(path)
    assert f"{path}:4" in msg and "base.rl.lrr" in msg and "unknown key" in msg and "did you mean 'lr'" in msg


def test_wrong_type_names_file_key_and_expectation(tmp_path):
    path = write(tmp_path, GOOD.replace("lr: 2.0e-5", "lr: fast"))
    msg = error_of(path)
    assert f"{path}:4" in msg and "base.rl.lr" in msg and "number" in msg and "'fast'" in msg


@pytest.mark.parametrize("line,key,shown", [
    ("    steps: '60'", "base.rl.steps", "'60'"),  # was 60: a quoted number passed for an integer
    ("    steps: 60.0", "base.rl.steps", "60.0"),
    ("    kl_loss: 1", "base.rl.kl_loss", "1"),  # was true
    ("    kl_loss: 'yes'", "base.rl.kl_loss", "'yes'"),
    ("    entropy_coeff: '0.3'", "base.rl.entropy_coeff", "'0.3'"),
    ("    entropy_coeff: true", "base.rl.entropy_coeff", "True"),  # was 1.0
])
def test_a_value_of_another_type_is_refused_not_coerced(tmp_path, line, key, shown):
    path = write(tmp_path, GOOD.replace("    reward: pmishift", f"    reward: pmishift\n{line}"))
    msg = error_of(path)
    assert f"{path}:6" in msg and key in msg and f"(got {shown})" in msg


@pytest.mark.parametrize("levels,shown", [("[true]", "True"), ("[1.0]", "1.0"), ("['2']", "'2'"),
                                          ("[1, true]", "True")])
def test_world_levels_are_integers_not_values_equal_to_one(tmp_path, levels, shown):
    # Literal[1, 2, 3] matches by equality: true and 1.0 passed as level 1 (and '2' is no level)
    text = GOOD.replace("base:\n", f"base:\n  world:\n    levels: {levels}\n")
    msg = error_of(write(tmp_path, text))
    assert "base.world.levels" in msg and "expected integers among 1, 2, 3" in msg and shown in msg
    arm = GOOD.replace("rl.reward: pmishift}", f"rl.reward: pmishift, world.levels: {levels}}}")
    assert "arms.pmishift.overrides: world.levels" in error_of(write(tmp_path, arm))
    assert load_spec(write(tmp_path, text.replace(levels, "[2, 1]"))).base.world.levels == [2, 1]


def test_exponent_floats_without_a_point_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-6 as a string; the spec reads it as YAML 1.2 does
    text = GOOD.replace("lr: 2.0e-5", "lr: 2e-5\n    entropy_coeff: 1E-3\n    kl_coef: +1e-2\n    kl_loss: true")
    text = text.replace("rl.reward: vanilla}", "rl.reward: vanilla, rl.lr: 3e-6}")
    spec = load_spec(write(tmp_path, text))
    rl = spec.base.rl
    assert (rl.lr, rl.entropy_coeff, rl.kl_coef) == (2e-5, 1e-3, 1e-2)
    assert resolve_arm(spec, "control").rl.lr == 3e-6 and isinstance(resolve_arm(spec, "control").rl.lr, float)


def test_override_of_missing_key_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("rl.reward: vanilla}", "rl.rewrd: vanilla}"))
    msg = error_of(path)
    assert str(path) in msg and "arms.control.overrides.rl.rewrd" in msg and "no such key in base" in msg
    assert "did you mean 'rl.reward'" in msg


def test_override_with_wrong_type_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("sft.strip_meta: true", "sft.strip_meta: maybe"))
    msg = error_of(path)
    assert str(path) in msg and "arms.control.overrides" in msg and "sft.strip_meta" in msg


def test_a_cross_key_rule_reads_as_its_own_sentence_without_pydantic_noise(tmp_path):
    # base-level rule (BaseSpec validator): the section is named, not "Value error, ... (got dict)"
    msg = error_of(write(tmp_path, GOOD.replace("    reward: pmishift", "    reward: pmishift\n  sft: {meta_blocks: tool}")))
    assert f"{tmp_path / 'spec.yaml'}:2: base: sft.meta_blocks 'tool' teaches checks" in msg
    assert "Value error" not in msg and "(got dict)" not in msg
    # the same rule reached through an arm's override (error at the model's root: no empty dotted key)
    msg = error_of(write(tmp_path, GOOD.replace("{rl.reward: pmishift}", "{rl.reward: pmishift, sft.meta_blocks: tool}")))
    assert "arms.pmishift.overrides: sft.meta_blocks 'tool' teaches checks" in msg
    assert "Value error" not in msg and "(got dict)" not in msg and ": :" not in msg
    # a section-level rule through an override names the section
    msg = error_of(write(tmp_path, GOOD.replace("{rl.reward: pmishift}", "{rl.reward: pmishift, rl.masa.m: 4}")))
    assert "arms.pmishift.overrides: rl.masa: masa.* keys are read only with masa.enable: true" in msg
    assert msg.count("\n") == 1  # "invalid spec:" and one problem line


def test_arm_without_overrides_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("    overrides: {rl.reward: pmishift}", "    description: same as base"))
    msg = error_of(path)
    assert f"{path}:9" in msg and "arms.pmishift" in msg and "at least one override" in msg


def test_contrast_naming_unknown_arm_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("treatment: pmishift", "treatment: pmi_shift"))
    msg = error_of(path)
    assert f"{path}:12" in msg and "contrasts.meta.treatment" in msg and "unknown arm 'pmi_shift'" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    assert "spec file not found" in error_of(tmp_path / "nope.yaml")
    msg = error_of(write(tmp_path, "name: t\nbase: [1,\n"))
    assert "not valid YAML" in msg and str(tmp_path / "spec.yaml") in msg


def test_config_hash_is_stable_under_key_order_and_reserialisation(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    cfg = resolve_arm(spec, "control")
    h = config_hash(cfg)
    data = cfg.model_dump(mode="json")
    reordered = json.loads(json.dumps(dict(reversed(list(data.items())))))
    assert config_hash(reordered) == h
    # YAML round trip of the resolved config (floats, nested dicts) gives the same hash
    assert config_hash(type(cfg).model_validate(yaml.safe_load(yaml.safe_dump(data)))) == h
    # and a real change does not
    data["rl"]["lr"] = 3e-5
    assert config_hash(data) != h


@pytest.mark.parametrize("name", ["demo.yaml", "qwen3-8b.yaml", "masa.yaml"])
def test_shipped_specs_validate(name):
    spec = load_spec(REPO / "configs" / name)
    assert len(resolved_arms(spec)) >= 2


def test_masa_spec_arms_and_mechanisms():
    """configs/masa.yaml: the five arms, MASA on exactly where declared, and each contrast's differing keys map
    onto the mechanisms it declares."""
    from infra.spec import config_diff, mechanism_of

    spec = load_spec(REPO / "configs" / "masa.yaml")
    arms = resolved_arms(spec)
    assert sorted(arms) == ["dapo", "dapo_masa", "grpo", "grpo_masa", "masa_efficient"]
    assert {a: cfg.rl.masa.enable for a, cfg in arms.items()} == {
        "grpo": False, "grpo_masa": True, "masa_efficient": True, "dapo": False, "dapo_masa": True}
    assert arms["masa_efficient"].rl.masa.efficient.gate and arms["masa_efficient"].rl.masa.efficient.cutoff
    for name, c in spec.contrasts.items():
        diff = config_diff(arms[c.treatment], arms[c.control])
        assert {mechanism_of(k) for k in diff} == set(c.mechanisms), name


@pytest.mark.parametrize("masa,match", [
    ({"m": 4}, "read only with masa.enable"),
    ({"enable": True, "m": 1}, "greater than or equal to 2"),
    ({"enable": True, "expert": {"beta": 0.5}}, "read only with masa.expert.enable"),
    ({"enable": True, "efficient": {"gate_std": 0.2}}, "gate_std is read only with masa.efficient.gate"),
    ({"enable": True, "efficient": {"cutoff_factor": 3.0}}, "cutoff_factor is read only with masa.efficient.cutoff"),
    ({"enable": True, "efficient": {"start_step": 5}}, "start_step and .audit_prompts are read only"),
    ({"enable": True, "efficient": {"audit_prompts": 1}}, "start_step and .audit_prompts are read only"),
])
def test_masa_keys_that_would_not_act_are_refused(masa, match):
    from infra.spec import RLSpec

    with pytest.raises(ValueError, match=match):
        RLSpec(masa=masa)


@pytest.mark.parametrize("rl,match", [
    ({"steps": 10, "masa": {"enable": True, "efficient": {"gate": True, "start_step": 10}}},
     "masa.efficient.start_step 10: gating, cutoff and hints act on steps after it, and steps is 10"),
    ({"batch_size": 8, "masa": {"enable": True, "efficient": {"cutoff": True, "audit_prompts": 9}}},
     "masa.efficient.audit_prompts 9 exceeds batch_size 8"),
])
def test_masa_efficient_values_that_could_not_act_are_refused(rl, match):
    from infra.spec import RLSpec

    with pytest.raises(ValueError, match=match):
        RLSpec(**rl)
    ok = RLSpec(steps=11, batch_size=8, masa={"enable": True, "efficient": {"gate": True, "start_step": 10,
                                                                            "audit_prompts": 8}})
    assert (ok.masa.efficient.start_step, ok.masa.efficient.audit_prompts) == (10, 8)


def test_masa_reward_signal_and_its_parameters_without_masa_arms_are_refused(tmp_path):
    # rl.reward 'masa' skipped every rollout of a GRPO group (no meta-prediction row is ever in one): the arm ran
    # vanilla GRPO under MASA's name; rl.signal.masa is read only by rl.masa's meta rollouts
    from infra.spec import RLSpec

    msg = error_of(write(tmp_path, GOOD.replace("{rl.reward: pmishift}", "{rl.reward: masa}")))
    assert "arms.pmishift.overrides: rl: reward 'masa' scores meta-prediction rollouts" in msg
    assert "rl.masa.enable: true" in msg
    with pytest.raises(ValueError, match=r"signal.masa is read only with masa.enable: true"):
        RLSpec(signal={"masa": {"difficulty_base": 0.5}})
    assert RLSpec(signal={"masa": {"difficulty_base": 0.5}}, masa={"enable": True}).signal.masa.difficulty_base == 0.5


def test_masa_efficient_with_dynamic_sampling_is_refused():
    from infra.spec import RLSpec

    with pytest.raises(ValueError, match="with filter_groups.enable is not implemented"):
        RLSpec(masa={"enable": True, "efficient": {"gate": True}}, filter_groups={"enable": True})
    assert RLSpec(masa={"enable": True}, filter_groups={"enable": True}).masa.enable  # dapo+masa is fine
def test_readme_lists_the_whole_mechanism_vocabulary():
    readme = " ".join((REPO / "README.md").read_text().split())
    listed = readme.split("the vocabulary is `infra.spec.MECHANISMS` (")[1].split(")")[0]
    assert set(re.findall(r"`(\w+)`", listed)) == set(MECHANISMS)


def test_mechanism_of_a_value_keyed_key_comes_from_its_values():
    assert MECHANISMS >= {"meta_sft", "meta_blocks", "placebo_blocks", "sft_data", "meta_reward"}
    assert mechanisms_of("sft.meta_blocks", ("fixed", "as_written")) == ("placebo_blocks",)
    assert mechanisms_of("sft.meta_blocks", ("shuffled", "fixed")) == ("placebo_blocks",)
    assert mechanisms_of("sft.meta_blocks") == ("meta_blocks",)
    assert mechanisms_of("rl.signal.pmishift.kappa", (1.0, 2.0)) == ("meta_reward",)
    assert mechanisms_of("rl.lr", (1e-5, 2e-5)) == ("rl.lr",)


@pytest.mark.parametrize("declared,diff,problems", [
    (["meta_sft", "placebo_blocks"], {"sft.strip_meta": (False, True), "sft.meta_blocks": ("fixed", "as_written")},
     []),
    ([], {"rl.reward": ("pmishift", "vanilla")}, []),
    ([], {"sft.strip_meta": (False, True), "rl.reward": ("pmishift", "vanilla")},
     ["changes 2 mechanisms (meta_reward, meta_sft) without naming them in contrasts.c.mechanisms"]),
    (["meta_reward"], {"sft.strip_meta": (False, True), "rl.reward": ("pmishift", "vanilla")},
     ["changes mechanism meta_sft (sft.strip_meta), not declared in contrasts.c.mechanisms ['meta_reward']"]),
    (["meta_reward", "tool_use"], {"rl.reward": ("pmishift", "vanilla")},
     [f"declares 'tool_use', which is neither a mechanism ({', '.join(sorted(MECHANISMS))}) nor a key the arms "
      "differ in"]),
    (["meta_reward", "meta_sft"], {"rl.reward": ("pmishift", "vanilla")},
     ["declares mechanism meta_sft, but its arms do not differ in it (they differ in meta_reward)"]),
    ([], {"rl.lr": (1e-5, 2e-5)}, ["changes hyperparameter rl.lr, which is no mechanism"]),
    (["rl.lr"], {"rl.lr": (1e-5, 2e-5)}, []),
    (["meta_sft", "meta_sft"], {"sft.strip_meta": (False, True)},
     ["declares meta_sft 2 times in contrasts.c.mechanisms"]),
])
def test_declared_mechanisms_must_match_the_arm_diff(declared, diff, problems):
    c = ContrastSpec(treatment="t", control="k", mechanisms=declared)
    mechanisms, found = contrast_mechanisms("c", c, diff)
    assert found == [f"contrast c (t − k) {p}" for p in problems]
    assert mechanisms == sorted({m for k, v in diff.items() for m in mechanisms_of(k, v) if m != k})
