"""flows.ui.run_server with PREFECT_API_URL already set (a user's own server): an unreachable one is a clear
error naming the variable, not prefect's RuntimeError minutes into a run."""
from __future__ import annotations

import socket

import pytest


def test_an_unreachable_prefect_api_url_is_named(monkeypatch):
    from flows.ui import run_server
    from infra.errors import TwinarmError

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    with pytest.raises(TwinarmError, match="PREFECT_API_URL"):
        with run_server():
            pass
