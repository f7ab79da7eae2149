"""Data-parallel start-up (sft.ranks): rank 0 must never wait out COLLECTIVE_TIMEOUT for a follower that is gone,
whenever it dies: while building its model (SIGKILL), or after its ready file, before or in the rendezvous."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SlowModel(torch.nn.Module):
    """A follower's model that takes `seconds` to build (a follower still starting)."""

    def __init__(self, seconds):
        super().__init__()
        time.sleep(seconds)
        self.w = torch.nn.Linear(1, 1)


class DiesAfterReady(torch.nn.Module):
    """A follower's model that is built at once; the follower then dies (SIGKILL) as soon as its ready file exists,
    before it joins the rendezvous (as a follower killed there, or failing inside init_process_group, would)."""

    def __init__(self, _config):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)
        store = Path(sys.argv[1]).parent / "store"

        def die():
            while not Path(f"{store}.rank1.ready").exists():
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=die, daemon=True).start()


def _followers():
    import psutil

    return [c for c in psutil.Process().children(recursive=True) if "twinarm-ranks-" in " ".join(c.cmdline())]


@pytest.fixture
def followers_import_this_module(monkeypatch):
    """The followers unpickle this module's model classes: put tests/ on their path."""
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))


def test_a_follower_killed_while_starting_is_named(tmp_path, followers_import_this_module):
    from infra.errors import TwinarmError
    from sft.ranks import Ranks

    job = {"model_class": SlowModel, "model_config": 30, "threads": 1, "device": "cpu"}

    def kill_when_started():
        while not _followers():
            time.sleep(0.01)
        time.sleep(1.0)  # importing torch, or building its model: not ready yet
        for child in _followers():
            child.kill()

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(TwinarmError, match=r"rank 1 exited with code -9 while starting: .*rank-1.log"):
        with Ranks(2, job, tmp_path):
            pass
    killer.join(5)
    assert time.monotonic() - t0 < 20
    assert not _followers()


def test_a_follower_that_dies_after_its_ready_file_does_not_hang_rank_0(tmp_path, monkeypatch,
                                                                      followers_import_this_module):
    """A follower that dies after its ready file, before or in the rendezvous: rank 0 waits there at most
    RENDEZVOUS_TIMEOUT (30 s; 2 s here), never COLLECTIVE_TIMEOUT (30 minutes), and names the dead rank
    (TwinarmError, its exit code and log), not gloo's RuntimeError."""
    import sft.ranks
    from infra.errors import TwinarmError
    from sft.ranks import Ranks

    monkeypatch.setattr(sft.ranks, "RENDEZVOUS_TIMEOUT", timedelta(seconds=2))
    job = {"model_class": DiesAfterReady, "model_config": None, "threads": 1, "device": "cpu"}
    ready_at = []
    scratch = tmp_path / "scratch"  # where Ranks makes its temporary directory (tempfile.mkdtemp)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def watch():
        while not ready_at:
            if list(scratch.glob("twinarm-ranks-*/store.rank1.ready")):
                ready_at.append(time.monotonic())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    with pytest.raises(TwinarmError, match=r"rank 1 exited with code -9.*rank-1.log"):
        with Ranks(2, job, tmp_path / "logs"):
            pass
    waited = time.monotonic() - ready_at[0]
    assert waited < 10, f"rank 0 waited {waited:.0f} s for a dead follower"
    assert not _followers()
