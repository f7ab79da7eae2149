"""The stage declarations: compute keys cover the real import closure of each stage body, and every spec key acts
(or is declared placement-only, read by the flow or the report, or refused)."""
from __future__ import annotations

import ast
import copy
import shutil
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from infra.code import REPO_ROOT, closure_hash, import_closure, project_packages
from infra.errors import SpecError
from infra.spec import PLACEMENT_KEYS, BaseSpec, flatten, load_spec, resolve_arm, resolved_arms
from infra.spec import ComputeSpec
from tasks.common import CONTRACT_MODULE, StageCall
from tasks.stages import FLOW_KEYS, REPORT_KEYS, STAGES, load_checked_spec

DEMO = REPO_ROOT / "configs" / "demo.yaml"
# resolve records the whole resolved config as an artifact; the others compute from their declared slice
COMPUTING = {name: stage for name, stage in STAGES.items() if name != "resolve"}


def closure(stage: str, root: Path = REPO_ROOT) -> list[str]:
    return [p.relative_to(root).as_posix()
            for p in import_closure((STAGES[stage].body.__module__,), root, stop=(CONTRACT_MODULE,))]


def test_stage_config_is_the_declared_slice():
    spec = load_spec(DEMO)
    control, pmishift = resolve_arm(spec, "control"), resolve_arm(spec, "pmishift")
    # the arms differ in sft.strip_meta and rl.reward: SFT and RL slices differ, the shared stages' do not
    for shared in ("data", "base_model", "twins", "heldout"):
        assert STAGES[shared].config(control) == STAGES[shared].config(pmishift)
    assert STAGES["sft"].config(control) != STAGES["sft"].config(pmishift)
    assert STAGES["rl"].config(control) != STAGES["rl"].config(pmishift)
    assert STAGES["sft"].config(control, seed=1)["seed"] == 1


def _key(stage: str, resolved: BaseSpec) -> str:
    return StageCall(home="h", ablation="a", arm="*", seed=None, stage=stage, config=STAGES[stage].config(resolved),
                     inputs={}, code="c").key


@pytest.mark.parametrize("shared_threads, base_threads", [(None, 1), (2, 2), (3, 3)])
def test_shared_stages_key_holds_its_own_thread_count(shared_threads, base_threads):
    """The base model and held-out (run alone) get shared_cpu_threads; the per-arm stages (side by side) keep
    cpu_threads: the base model's key changes with its thread count, RL's does not."""
    spec = load_spec(DEMO)
    one = resolve_arm(spec, "control").model_copy(deep=True)
    one.executor.compute.cpu_threads, one.executor.compute.shared_cpu_threads = 1, None
    other = one.model_copy(deep=True)
    other.executor.compute.shared_cpu_threads = shared_threads
    for shared in ("base_model", "heldout"):
        compute = ComputeSpec(**STAGES[shared].config(other)["executor.compute"])
        assert (compute.cpu_threads, compute.shared_cpu_threads) == (base_threads, None)  # the count its body sets
        assert (_key(shared, one) == _key(shared, other)) == (base_threads == 1)
    for per_arm in ("sft", "rl", "sweep"):
        assert STAGES[per_arm].config(other)["executor.compute"]["cpu_threads"] == 1
        assert _key(per_arm, one) == _key(per_arm, other)
    more = other.model_copy(deep=True)
    more.executor.compute.cpu_threads = 2  # the per-arm count moves the per-arm keys, not a set shared count
    assert _key("rl", more) != _key("rl", other)
    assert (_key("base_model", more) == _key("base_model", other)) == (shared_threads is not None)


def test_shared_stages_key_holds_its_process_count():
    """shared_cpu_processes reaches the base model and held-out only, and only when > 1 (1 is the layout every
    key had before the field existed); a CUDA device refuses it (data-parallel ranks are CPU processes)."""
    from pydantic import ValidationError

    one = resolve_arm(load_spec(DEMO), "control").model_copy(deep=True)
    one.executor.compute.shared_cpu_processes = 1
    three = one.model_copy(deep=True)
    three.executor.compute.shared_cpu_processes = 3
    for shared in ("base_model", "heldout"):
        assert "shared_cpu_processes" not in STAGES[shared].config(one)["executor.compute"]
        assert ComputeSpec(**STAGES[shared].config(three)["executor.compute"]).shared_cpu_processes == 3
        assert _key(shared, one) != _key(shared, three)
    for per_arm in ("sft", "rl", "sweep"):
        assert "shared_cpu_processes" not in STAGES[per_arm].config(three)["executor.compute"]
        assert _key(per_arm, one) == _key(per_arm, three)
    with pytest.raises(ValidationError, match="with device cuda set it to 1"):
        ComputeSpec(device="cuda", shared_cpu_processes=2)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stage", ["sweep", "heldout"])
def test_result_store_key_holds_the_compute_the_stage_ran_with(stage, monkeypatch):
    """The sweep and held-out stages keep per-checkpoint results in a store keyed by the protocol: a result computed
    on 1 thread must never answer for 2 threads (bf16 numerics differ), so the protocol holds the stage's
    resolved device, precision and CPU threads."""
    import evals.evaluate
    from rewards import grader as grader_module

    seen = []

    def capture(todo, suites, protocol, *args, **kwargs):
        seen.append(protocol)
        raise _Stop

    monkeypatch.setattr(evals.evaluate, "evaluate_checkpoints", capture)
    monkeypatch.setattr(evals.evaluate, "checkpoint_entries", lambda refs: [])
    monkeypatch.setattr(grader_module, "get_grader", lambda spec: type("G", (), {"facts": lambda self: {
        "grader_version": "v", "config": {}, "call_path": "p"}})())
    monkeypatch.setitem(STAGES[stage].body.__globals__, "read_parquet", lambda path: [])
    spec = load_spec(DEMO)
    for threads in (1, 2):
        resolved = resolve_arm(spec, "control").model_copy(deep=True)
        resolved.executor.compute.cpu_threads = resolved.executor.compute.shared_cpu_threads = threads
        val = type("A", (), {"artifact_id": "val-id"})()
        call = StageCall(home="h", ablation="a", arm="*", seed=None, stage=stage,
                         config=STAGES[stage].config(resolved), inputs={"val": val}, code="c")
        monkeypatch.setattr(StageCall, "input_path", lambda self, role: Path("/nonexistent"))
        with pytest.raises(_Stop):
            STAGES[stage].body(call)
    one, two = seen
    assert one.compute["cpu_threads"] == 1 and two.compute["cpu_threads"] == 2
    assert one.compute["device"] == "cpu" and one.compute["precision"] in ("bf16", "fp32")
    assert one.key != two.key


def test_closures_hold_the_modules_that_decide_numbers():
    for stage in ("sft", "rl"):  # resume restores optimizer state and RNG from infra.checkpoints
        assert "infra/checkpoints.py" in closure(stage)
    for stage in ("base_model", "sft", "rl", "sweep", "heldout"):
        assert "worlds/model.py" in closure(stage)  # seeding, precision, threads
    assert "rewards/golds.py" in closure("data")  # gold extraction decides the prompt rows
    assert "evals/evaluate.py" in closure("sweep") and "evals/evaluate.py" in closure("heldout")
    assert "rl/grpo.py" not in closure("base_model")  # an RL edit never retrains the base model
    assert all(not f.startswith(("audit/", "flows/")) for s in STAGES for f in closure(s))
    assert "tasks/common.py" not in closure("rl")  # the contract records and places; it computes nothing


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for pkg in project_packages():
        shutil.copytree(REPO_ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("stage", list(STAGES))
def test_key_changes_with_every_package_in_the_closure_and_no_other(tree_copy, stage):
    def key() -> str:
        closure_hash.cache_clear()
        return STAGES[stage].code(tree_copy)

    files = closure(stage, tree_copy)
    packages = sorted({f.split("/")[0] for f in files})
    base = key()
    assert base == STAGES[stage].code(REPO_ROOT)  # the copy is the tree
    for pkg in packages:
        target = tree_copy / next(f for f in files if f.startswith(pkg + "/"))
        original = target.read_text()
        target.write_text(original + "\n# edited\n")
        try:
            assert key() != base, f"{stage}: editing {target.relative_to(tree_copy)} left the key unchanged"
        finally:
            target.write_text(original)
    for pkg in sorted(set(project_packages()) - set(packages)):
        target = next((tree_copy / pkg).rglob("*.py"))
        original = target.read_text()
        target.write_text(original + "\n# edited\n")
        try:
            assert key() == base, f"{stage}: editing {target.relative_to(tree_copy)} (not imported) changed the key"
        finally:
            target.write_text(original)
    assert key() == base


# ---------------------------------------------------------------- every spec key acts

def _field(path: list[str]) -> typing.Any:
    """The pydantic field annotation at a dotted path of BaseSpec (None inside free dicts)."""
    model: typing.Any = BaseSpec
    annotation = None
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = next((a for a in (annotation, *typing.get_args(annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return annotation


def _mutations(key: str, value: typing.Any) -> list[typing.Any]:
    """Other values for a leaf, most plausible first."""
    literals = [a for a in typing.get_args(_field(key.split("."))) if isinstance(a, str)]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):  # other values only: 0 · 2 and max(0 − 1, 0) are 0 again
        return [v for v in dict.fromkeys([value + 1, value * 2, max(value - 1, 0)]) if v != value]
    if isinstance(value, float):
        return [value * 0.5, value + 0.1, value * 2, 0.0] if value else [0.1, 1.0]
    if isinstance(value, str):
        return [v for v in literals if v != value] or [value + "-x"]
    if isinstance(value, list):
        return [value + [max(value, default=0) + 1]]
    if value is None:
        return ["127.0.0.1:1" if key.endswith("address") else "x"]
    return []


def _set(data: dict, key: str, value: typing.Any) -> dict:
    data = copy.deepcopy(data)
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def _names_read(stage_modules: list[str]) -> set[str]:
    """Attribute names and string constants in the closure of the given modules (spec.py excluded: it defines
    the fields, it does not read them)."""
    names: set[str] = set()
    files = import_closure(tuple(stage_modules), stop=(CONTRACT_MODULE,))
    for path in files:
        if path.relative_to(REPO_ROOT).as_posix() == "infra/spec.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update({node.value, *node.value.split(".")})  # cfg["eval.data_dir"] reads data_dir
    return names


# keys Stage.config folds into another before a body sees them (infra.spec.stage_compute: a shared stage's
# cpu_threads); that they act is test_every_leaf_of_the_demo_spec_acts_or_is_declared's and
# test_shared_stages_key_holds_its_own_thread_count's
PROJECTED = {"executor.compute.shared_cpu_threads", "executor.compute.shared_cpu_processes"}


def _covered_by(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_every_leaf_of_the_demo_spec_acts_or_is_declared():
    spec = load_spec(DEMO)
    arms = resolved_arms(spec)
    base = next(iter(arms.values())).model_dump(mode="json")
    inert, outcome = [], {}
    before = {s.name: s.config(BaseSpec.model_validate(base)) for s in COMPUTING.values()}
    for key, value in sorted(flatten(base).items()):
        if _covered_by(key, PLACEMENT_KEYS):
            assert not any(_covered_by(key, s.config_keys) for s in COMPUTING.values()), key
            outcome[key] = "placement"
            continue
        if key in FLOW_KEYS or key in REPORT_KEYS:
            outcome[key] = "flow" if key in FLOW_KEYS else "report"
            continue
        for candidate in _mutations(key, value):
            try:
                mutated = BaseSpec.model_validate(_set(base, key, candidate))
            except ValidationError:
                outcome[key] = "refused"
                continue
            changed = [s.name for s in COMPUTING.values() if s.config(mutated) != before[s.name]]
            outcome[key] = changed or None
            break
        if outcome.get(key) is None:
            inert.append(key)
    assert not inert, f"spec keys that change no stage's compute key and are not declared: {inert}"
    # spot checks of the walk itself
    assert outcome["rl.kl_loss"] == ["rl"] and outcome["sft.epochs"] == ["sft"]
    assert outcome["rl.kl_coef"] == "refused"  # kl_coef > 0 acts only with kl_loss on: refused alone
    assert set(outcome["grader.timeout_s"]) >= {"base_model", "rl", "sweep", "heldout"}
    assert outcome["world.n_rl"] == ["data"] and outcome["executor.use_ray"] == "placement"
    assert outcome["model.revision"] == "refused"
    # each stage's key holds the thread count it runs with: shared stages run alone, per-arm ones side by side
    assert sorted(outcome["executor.compute.shared_cpu_threads"]) == ["base_model", "heldout"]
    assert sorted(outcome["executor.compute.cpu_threads"]) == ["rl", "sft", "sweep"]
    assert sorted(outcome["executor.compute.shared_cpu_processes"]) == ["base_model", "heldout"]


def test_every_stage_config_key_is_read_by_a_stage_that_declares_it():
    """Static: each leaf under a stage's declared keys is named (attribute or string) somewhere in the import
    closure of a stage that declares it — a key nothing reads (rl.kl_coef once) fails here. A field with a single
    allowed value cannot be set to anything else and is skipped."""
    base = BaseSpec().model_dump(mode="json")
    base["seed"] = 0
    names = {name: _names_read([stage.body.__module__]) for name, stage in COMPUTING.items()}
    unread = []
    for leaf_key in sorted(flatten(base)):
        if leaf_key in PROJECTED:
            continue
        declaring = [n for n, s in COMPUTING.items() if _covered_by(leaf_key, s.config_keys)]
        if not declaring:
            continue  # placement, flow and report keys: test_every_leaf_of_the_demo_spec_acts_or_is_declared
        parts = leaf_key.split(".")
        # the deepest part that is a spec field (free dict keys such as head names are not)
        depth = next(i for i in range(len(parts) - 1, -1, -1) if parts[i] == "seed" or _field(parts[:i + 1]))
        if len([a for a in typing.get_args(_field(parts[:depth + 1])) if isinstance(a, str)]) == 1:
            continue
        if not any(parts[depth] in names[n] for n in declaring):
            unread.append(f"{leaf_key} (declared by {', '.join(declaring)})")
    assert not unread, f"declared but never read: {unread}"


def test_flow_and_report_keys_are_read_where_declared():
    flow_names = {n.attr for n in ast.walk(ast.parse((REPO_ROOT / "flows" / "ablation.py").read_text()))
                  if isinstance(n, ast.Attribute)}
    assert all(key.split(".")[-1] in flow_names for key in FLOW_KEYS)
    report_names = _names_read(["audit.report"])
    assert all(key.split(".")[-1] in report_names for key in REPORT_KEYS)


def test_unknown_reward_is_refused_when_the_spec_loads(tmp_path):
    text = DEMO.read_text().replace("overrides: {rl.reward: pmishift}", "overrides: {rl.reward: pmishfit}")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_checked_spec(path)
    msg = str(exc.value)
    assert "pmishfit" in msg and "arm pmishift" in msg and f"{path}:" in msg and "pmishift" in msg


@pytest.mark.parametrize("changes, words", [
    ({"rl": {"max_response_length": 300}}, ["rl.max_prompt_length 96 + rl.max_response_length 300 = 396 exceeds "
                                           "model.toy.max_position 320"]),
    ({"eval": {"max_new_tokens": 225}}, ["rl.max_prompt_length 96 + eval.max_new_tokens 225 = 321 exceeds "
                                         "model.toy.max_position 320"]),
    ({"model": {"source": "Qwen/Qwen3-8B"}, "tool": "arith_check"},
     ["tool 'arith_check' needs the calculator markers of twinarm's own tokenizer"]),
    ({"eval": {"max_new_tokens": 224}}, []),  # 96 + 224 = 320: exactly the positions there are
])
def test_what_an_arm_generates_must_fit_its_model(tmp_path, changes, words):
    import yaml

    spec = yaml.safe_load(DEMO.read_text())
    for section, value in changes.items():
        if isinstance(value, dict):
            spec["base"].setdefault(section, {}).update(value)
        else:
            spec["base"][section] = value
    if spec["base"]["model"]["source"] != "toy":
        spec["base"]["model"] = {"source": spec["base"]["model"]["source"]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    if not words:
        load_checked_spec(path)
        return
    with pytest.raises(SpecError) as exc:
        load_checked_spec(path)
    assert all(f"arm control: {w}" in str(exc.value) for w in words), str(exc.value)


@pytest.mark.parametrize("override, words", [
    ("{executor: {verl: {nnodes: 2}}}", "executor.verl is read only when executor.kind is 'verl'"),
    ("{rl: {data: {kind: arith, path: x.jsonl}}}", "does not read path"),
    ("{model: {revision: main}}", "revision is read only for a hub model"),
    ("{eval: {data_dir: /tmp}}", "eval.data_dir is read only for a held-out manifest"),
])
def test_keys_read_only_in_another_setting_are_refused(tmp_path, override, words):
    import yaml

    data = yaml.safe_load(DEMO.read_text())
    patch = yaml.safe_load(override)

    def merge(a: dict, b: dict) -> None:
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v

    merge(data["base"], patch)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert words in str(exc.value)


def test_architecture_doc_shows_the_declared_stages():
    from tasks.stages import markdown_table

    assert markdown_table() in (REPO_ROOT / "docs" / "architecture.md").read_text(), \
        "docs/architecture.md is stale: paste the output of `python -m tasks.stages`"
