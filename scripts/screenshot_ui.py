"""Open the Prefect UI headless, find the ablation deployment and its parameter form, and screenshot the form.

    .venv/bin/python scripts/screenshot_ui.py [docs/prefect-ablation-form.png] [--port 4310]

Starts `twinarm ui` (Prefect server + MLflow UI + served deployments) in a scratch TWINARM_HOME, asks the Prefect
API for the deployment named 'ablation', loads its "custom run" page in Debian's Chromium (headless) until the
form is rendered, checks the DOM holds the form's fields (spec_file, overrides), and saves the screenshot. Exit
code 1 when the deployment or its form is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from headless_chromium import chromium  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
RENDER_MS = 20000  # virtual time for the Prefect UI (a single-page app) to render the form
FORM_FIELDS = ("spec_file", "overrides")


def _api(port: int, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def find_deployment(port: int, name: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = [d for d in _api(port, "/deployments/filter", {}) if d["name"] == name]
            if found:
                return found[0]
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"no deployment named '{name}' appeared on the Prefect API at port {port} within {timeout_s:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("png", type=Path, nargs="?", default=REPO / "docs" / "prefect-ablation-form.png")
    ap.add_argument("--port", type=int, default=4310)
    ap.add_argument("--mlflow-port", type=int, default=5310)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="twinarm-ui-"))
    env = {**os.environ, "TWINARM_HOME": str(home)}  # derived settings follow it (infra.home)
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(args.port),
                           "--mlflow-port", str(args.mlflow_port)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deployment = find_deployment(args.port, "ablation", 180)
        url = f"http://127.0.0.1:{args.port}/deployments/deployment/{deployment['id']}/run"
        dom = chromium(url, "--dump-dom", budget_ms=RENDER_MS).stdout
        missing = [f for f in FORM_FIELDS if f not in dom]
        if missing:
            sys.exit(f"{url}: the parameter form did not render the fields {missing}")
        args.png.parent.mkdir(parents=True, exist_ok=True)
        args.png.unlink(missing_ok=True)  # so a stale file never passes for a new screenshot
        shot = chromium(url, f"--screenshot={args.png.resolve()}", "--window-size=1400,1000", budget_ms=RENDER_MS)
        if shot.returncode != 0 or not args.png.is_file():
            sys.exit(f"chromium failed (exit {shot.returncode}):\n{shot.stderr[-2000:]}")
        print(f"{url}\nform fields found: {', '.join(FORM_FIELDS)}\nscreenshot: {args.png}")
    finally:
        os.killpg(ui.pid, 2)  # Ctrl-C: `twinarm ui` stops its servers
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, 9)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
