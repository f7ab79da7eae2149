"""Screenshots of the Prefect UI, headless: the ablation's parameter form, and a finished flow run's page.

    .venv/bin/python scripts/screenshot_ui.py [docs/prefect-ablation-form.png] [--port 4310]
    .venv/bin/python scripts/screenshot_ui.py --flow-run HOME [--out docs/] [--port 4310]

Form (default): starts `twinarm ui` (Prefect server + MLflow UI + served deployments) in a scratch TWINARM_HOME,
asks the Prefect API for the deployment named 'ablation', loads its "custom run" page in Debian's Chromium until
the form is rendered, checks the DOM holds the form's fields (spec_file, overrides), and saves the screenshot.

Flow run (--flow-run HOME): copies HOME's Prefect database (a home where `twinarm run` or `make demo` finished;
HOME itself is not touched) into a scratch home, starts `twinarm ui` on it, picks the newest Completed ablation
flow run that computed a stage and saves two pages: the run (prefect-flow-run.png: the timeline of task runs named stage/arm/seed and
the run's logs with twinarm's stage lines) and its markdown artifact (prefect-flow-run-artifact.png: verdict,
ledger counts, stage table, links). The API is asked first for task runs named stage/arm/seed and an artifact;
each page's DOM is checked for what the screenshot is meant to show.

Exit code 1 when the deployment, the form, the flow run or a checked element is missing.
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
from typing import Callable

from headless_chromium import chromium  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
RENDER_MS = 20000  # virtual time for the Prefect UI (a single-page app) to render the form
FORM_FIELDS = ("spec_file", "overrides")
ABLATION_FLOW = "twinarm-ablation"  # flows/ablation.py's @flow name


def _api(port: int, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _poll(fetch: Callable[[], dict | None], timeout_s: float, missing: str) -> dict:
    """fetch() every second until it returns a row (API errors count as not yet), else exit with `missing`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (found := fetch()) is not None:
                return found
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"{missing} within {timeout_s:.0f}s")


def find_deployment(port: int, name: str, timeout_s: float) -> dict:
    return _poll(lambda: next((d for d in _api(port, "/deployments/filter", {}) if d["name"] == name), None),
                 timeout_s, f"no deployment named '{name}' appeared on the Prefect API at port {port}")


def completed_runs(port: int, timeout_s: float) -> list[dict]:
    """The Completed flow runs of the ablation flow on the Prefect API at `port`, newest first (at least one)."""
    def fetch() -> list[dict] | None:
        runs = _api(port, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                                "sort": "START_TIME_DESC", "limit": 20})
        flows = {f["id"]: f["name"] for f in _api(port, "/flows/filter", {})}
        return [r for r in runs if flows.get(r["flow_id"]) == ABLATION_FLOW] or None

    return _poll(fetch, timeout_s, f"no Completed '{ABLATION_FLOW}' flow run on the Prefect API at port {port}")


def _logs(port: int, run: dict) -> list[dict]:
    return _api(port, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})


def shoot(url: str, png: Path, expect: list[str]) -> None:
    """Render `url`, check its DOM holds every string in `expect`, save the screenshot to `png`."""
    dom = chromium(url, "--dump-dom", budget_ms=RENDER_MS).stdout
    missing = [e for e in expect if e not in dom]
    if missing:
        sys.exit(f"{url}: the page did not render {missing}")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # so a stale file never passes for a new screenshot
    shot = chromium(url, f"--screenshot={png.resolve()}", "--window-size=1400,1000", budget_ms=RENDER_MS)
    if shot.returncode != 0 or not png.is_file():
        sys.exit(f"chromium failed (exit {shot.returncode}):\n{shot.stderr[-2000:]}")
    print(f"{url}\n  found: {', '.join(expect)}\n  screenshot: {png}")


def flow_run_pages(port: int, out: Path) -> None:
    # the newest run that computed a stage (a fully cached rerun after it has only 'cached' lines)
    for run in completed_runs(port, 180):  # newest first; falls through to the oldest, checked below
        logs = _logs(port, run)
        if any("] computed" in e["message"] for e in logs):
            break
    tasks = _api(port, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 200})
    named = sorted({t["name"] for t in tasks if t["name"].count("/") == 2})  # stage/arm/seed
    if not named:
        sys.exit(f"flow run {run['name']}: no task run is named stage/arm/seed ({len(tasks)} task runs)")
    artifacts = _api(port, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    if not any(a.get("type") == "markdown" for a in artifacts):
        sys.exit(f"flow run {run['name']}: no markdown artifact")
    stage_lines = [entry["message"] for entry in logs if "] computed" in entry["message"]]
    if not stage_lines:
        sys.exit(f"flow run {run['name']}: its logs hold no stage summary line ({len(logs)} log records)")
    # progress lines (Ray-placed stages' too) are logged under their own stage's task run
    progress = [e for e in logs if e.get("task_run_id") and " 100% " in e["message"]]
    print(f"flow run {run['name']} ({run['id']}): {len(tasks)} task runs, {len(named)} named stage/arm/seed "
          f"(e.g. {', '.join(named[:3])}), {len(logs)} log records (e.g. {stage_lines[0]!r}), "
          f"{len(progress)} finished progress lines under a task run (e.g. "
          f"{progress[0]['message'] if progress else None!r}), {len(artifacts)} artifact(s)")
    # the UI opens a run on its Logs tab (a ?tab= query is not honoured on first load), under the timeline,
    # which draws the task runs with their names on a canvas; the run's artifact has its own page
    shoot(f"http://127.0.0.1:{port}/runs/flow-run/{run['id']}", out / "prefect-flow-run.png",
          [run["name"], "Completed"])
    markdown = next(a for a in artifacts if a.get("type") == "markdown")
    shoot(f"http://127.0.0.1:{port}/artifacts/artifact/{markdown['id']}", out / "prefect-flow-run-artifact.png",
          ["Verdict", named[0]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("png", type=Path, nargs="?", default=REPO / "docs" / "prefect-ablation-form.png",
                    help="where the form's screenshot goes (default: docs/prefect-ablation-form.png)")
    ap.add_argument("--flow-run", type=Path, metavar="HOME", help="screenshot the latest completed run in HOME")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the flow-run screenshots")
    ap.add_argument("--port", type=int, default=4310, help="Prefect UI port on 127.0.0.1 (default: %(default)s)")
    ap.add_argument("--mlflow-port", type=int, default=5310, help="MLflow UI port on 127.0.0.1 (default: %(default)s)")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="twinarm-ui-"))
    if args.flow_run is not None:
        source = args.flow_run / "prefect" / "prefect.db"
        if not source.is_file():
            sys.exit(f"{source}: no Prefect database (run `make demo` or `twinarm run` with TWINARM_HOME={args.flow_run})")
        (home / "prefect").mkdir(parents=True)
        for part in source.parent.glob("prefect.db*"):  # the database with its write-ahead log
            shutil.copy2(part, home / "prefect" / part.name)
    env = {**os.environ, "TWINARM_HOME": str(home)}  # derived settings follow it (infra.home)
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(args.port),
                           "--mlflow-port", str(args.mlflow_port)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if args.flow_run is not None:
            flow_run_pages(args.port, args.out)
            return
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
