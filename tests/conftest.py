"""Shared fixtures. Every test that touches state gets its own TWINARM_HOME; nothing reaches the network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh TWINARM_HOME for one test (lineage, MLflow store, artifacts); the environment it derives
    (MLflow URI, Prefect home) is restored afterwards, so later tests see their own stores."""
    saved = dict(os.environ)
    monkeypatch.setenv("TWINARM_HOME", str(tmp_path / "home"))
    from infra.home import configure_environment

    yield configure_environment()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: the box is shared, and spinning OpenMP threads on busy cores are 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def flow_home(tmp_path_factory):
    """One TWINARM_HOME for every test that runs a Prefect flow (Prefect's settings are per process)."""
    path = tmp_path_factory.mktemp("flow-home")
    old = os.environ.get("TWINARM_HOME")
    os.environ["TWINARM_HOME"] = str(path)
    from infra.home import configure_environment

    yield configure_environment()
    if old is None:
        os.environ.pop("TWINARM_HOME", None)
    else:
        os.environ["TWINARM_HOME"] = old


def tiny_spec_dict(name: str = "tiny") -> dict:
    """The demo spec shrunk to CI size: same world, same model family, same stages, minutes → seconds."""
    import yaml

    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["name"] = name
    base = spec["base"]
    # levels [1]: the easiest problems of every domain (world.levels), so a model this small gets some right
    base["world"].update(n_base=2000, n_sft1=200, n_sft2=60, n_rl=200, n_val_per_domain=4, n_heldout=36, levels=[1])
    # 200 base steps with a short warm-up (60 steps with the default 50-step warm-up left the model writing noise:
    # 0.13 % of sampled RL responses right); with them ~2-3 % of sampled responses are right, and groups of 8 then
    # hold right and wrong samples at some steps of both arms, so GRPO advantages are non-zero (tests/test_e2e.py
    # checks train/adv_nonzero_rate) and the SIGKILL-resume test compares states that a lost optimizer state,
    # weights, step counter would change (scripts/mutation_resume.py)
    base["model"] = {"source": "toy",
                     "toy": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                             "intermediate_size": 128},
                     "base_training": {"max_steps": 200, "warmup_steps": 10, "eval_every": 100, "batch_size": 32,
                                       "target_val_accuracy": 0.99}}
    base["sft"].update(epochs=1, batch_size=32)
    # entropy_coeff > 0: most groups are still all wrong (zero advantage); the entropy bonus (verl's actor term, in
    # both arms) gives every step a gradient, so the weights move at every step of both arms (tests/test_e2e.py
    # checks actor/param_norm_change). configs/qwen3-8b.yaml uses the same 1e-3; the demo keeps 0.
    base["rl"].update(steps=6, save_freq=2, test_freq=2, batch_size=4, mini_batch_size=2, n=8,
                      max_response_length=96, entropy_coeff=1e-3)
    base["executor"]["use_ray"] = False
    return spec


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("specs") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_run(flow_home, tiny_spec):
    """The tiny ablation, run once through the real flow; tests read its lineage, MLflow store and outputs."""
    from flows.ablation import ablation

    return ablation(spec_file=str(tiny_spec))


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    if not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark files not found at {BENCHMARKS}")
    return BENCHMARKS
