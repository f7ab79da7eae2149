"""Stage bodies run inline or as Ray tasks; a body's clear error surfaces unchanged through Ray."""
from __future__ import annotations

import os
import sys

import pytest
from ray import cloudpickle

from infra.errors import DataError
from infra.ray_exec import call
from infra.spec import ExecutorSpec


# Ray workers cannot import test modules: ship these functions by value (stage bodies live in packages).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def body(x: int) -> tuple[int, int]:
    return os.getpid(), x * 2


def failing_body(path: str) -> None:
    raise DataError(f"{path}: row 3: field 'answer': expected a string")


def test_inline_and_ray_give_the_same_result_and_errors():
    inline = ExecutorSpec(use_ray=False)
    assert call(body, 21, executor=inline) == (os.getpid(), 42)
    with pytest.raises(DataError, match="row 3: field 'answer'"):
        call(failing_body, "data.parquet", executor=inline)

    remote = ExecutorSpec(use_ray=True, cpus_per_arm=1)
    pid, value = call(body, 21, executor=remote)
    assert value == 42 and pid != os.getpid()  # it really ran in a Ray worker
    with pytest.raises(DataError, match="row 3: field 'answer'"):
        call(failing_body, "data.parquet", executor=remote)


def test_unreachable_cluster_is_one_clear_error(monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from infra.errors import TwinarmError

    with pytest.raises(TwinarmError, match="could not connect to the Ray cluster at 127.0.0.1:1"):
        call(body, 1, executor=ExecutorSpec(use_ray=True, ray_address="127.0.0.1:1"))


def test_a_local_instance_outlives_the_thread_that_first_needed_it():
    """Ray binds its local processes to the thread that ran ray.init (PR_SET_PDEATHSIG): started from a thread that
    then ends (a Prefect task runner's), the GCS server would be killed with it. ensure_ray starts it on a thread
    that parks, so the instance keeps serving after the caller's thread is gone."""
    import threading
    import time

    import psutil
    import ray

    from infra.ray_exec import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    spec = ExecutorSpec(use_ray=True, cpus_per_arm=1)
    caller = threading.Thread(target=ensure_ray, args=(spec,))
    caller.start()
    caller.join()
    time.sleep(1.0)  # a parent-death signal is delivered at once
    assert any("gcs_server" in p.name() for p in psutil.Process().children(recursive=True))
    pid, value = call(body, 4, executor=spec)
    assert value == 8 and pid != os.getpid()
