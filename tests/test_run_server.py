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


def test_a_prefect_api_url_that_answers_is_used(monkeypatch):
    """An answering server passes the check, even with an HTTP error (a cloud workspace's 401, a proxy's 404), and
    run_server then starts nothing of its own."""
    import http.server
    import threading

    from flows.ui import run_server

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    ran = []
    try:
        with run_server(while_starting=lambda: ran.append(True)):
            import os

            assert os.environ["PREFECT_API_URL"] == url and ran == [True]
    finally:
        server.shutdown()
