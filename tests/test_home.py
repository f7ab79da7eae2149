"""Derived Prefect/MLflow locations follow TWINARM_HOME, also into subprocesses; a user's own settings stay."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = ("import json, os; from infra.home import configure_environment; configure_environment(); "
         "print(json.dumps({k: os.environ[k] for k in ('MLFLOW_TRACKING_URI', 'PREFECT_HOME', 'OMP_WAIT_POLICY')}))")


def _child_env(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_subprocess_with_another_home_moves_the_derived_locations(home, tmp_path):
    parent = dict(os.environ)  # configured for `home` by the fixture
    child = _child_env({**parent, "TWINARM_HOME": str(tmp_path / "other")})
    assert child["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    assert child["PREFECT_HOME"] == str(tmp_path / "other" / "prefect")


def test_a_users_own_setting_is_kept(home, tmp_path):
    child = _child_env({**os.environ, "TWINARM_HOME": str(tmp_path / "other"),
                        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"})
    assert child["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert child["PREFECT_HOME"] == str(tmp_path / "other" / "prefect")


def test_idle_openmp_threads_sleep_unless_the_user_says_otherwise(home, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _child_env({**env, "TWINARM_HOME": str(tmp_path / "a")})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert _child_env({**env, "TWINARM_HOME": str(tmp_path / "b"),
                       "OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
