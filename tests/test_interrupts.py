"""Signals and ownership, black-box (subprocess + os.kill), with the cases of scripts/signal_cases.py: Ctrl-C on
`twinarm run` stops the stages, records the flow run as Crashed and exits 130 with the documented line; SIGTERM
and Ctrl-C on `twinarm ui` stop every child and free the ports; `serve` beside `ui` is refused; `serve` with an
unreachable API names the URL; `ui` writes nothing into the virtualenv."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import signal_cases  # noqa: E402

INTERRUPTED = "interrupted: completed stages are kept; run the same command again to resume."


def test_ctrl_c_on_run_stops_the_stages_records_a_crash_and_exits_130(tmp_path):
    row = signal_cases.ctrl_c_run(REPO, sys.executable, tmp_path)
    print({k: v for k, v in row.items() if k != "output"})
    assert row["exit"] == 130, row["output"]
    assert row["last line"] == INTERRUPTED, row["output"]
    assert row["progress lines before the signal"] > 0, row["output"]  # progress on the terminal, inline placement
    assert row["seconds"] < 60 and row["training lines after the signal"] == 0, row
    assert row["files written after exit"] == 0, row
    assert row["flow run"] == "Crashed", row
    assert row["left running"] == 0, row
    for noise in ("Traceback", "ConnectError", "EventsWorker", "was never awaited"):
        assert noise not in row["output"], row["output"]


@pytest.mark.parametrize("sig, group, serve_beside", [(signal.SIGTERM, False, True), (signal.SIGINT, True, False)],
                         ids=["sigterm-with-serve-beside", "ctrl-c"])
def test_ui_stops_every_child_and_frees_its_ports(tmp_path, sig, group, serve_beside):
    rows = signal_cases.ui_cases(REPO, sys.executable, tmp_path, sig, group, serve_beside)
    print(rows)
    if serve_beside:
        serve = rows.pop(0)
        assert serve["exit"] == 1 and "already served" in serve["last line"], serve
    (ui,) = rows
    assert ui["processes before"] >= 3, ui  # ui, the Prefect server, MLflow (and their workers), the runner
    assert ui["exit"] == 0 and ui["seconds"] < 60, ui
    assert ui["left running"] == 0 and ui["ports still answering"] == 0, ui
    assert ui["files written in the venv"] == 0, ui
    assert (tmp_path / f"ui-home-{sig.name}" / "prefect" / "ui-build").is_dir()  # the UI build went here


def test_serve_with_an_unreachable_api_names_the_url(tmp_path):
    row = signal_cases.serve_unreachable(REPO, sys.executable, tmp_path)
    print(row)
    assert row["exit"] == 1 and row["names the URL"] and row["seconds"] < 30, row
    assert row["last line"].startswith("error: the Prefect API http://127.0.0.1:"), row
