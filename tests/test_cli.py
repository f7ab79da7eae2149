"""The command line: exit codes 0/1/2 and one clear line instead of a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def twinarm(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={"TWINARM_HOME": str(home), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}, timeout=120)


def test_validate_ok_and_bad_spec_exit_codes(tmp_path):
    ok = twinarm("validate", "configs/demo.yaml", home=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "control" in ok.stdout and "pmishift" in ok.stdout and "sft.strip_meta" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase:\n  rl:\n    stepz: 3\narms:\n  a:\n    overrides: {rl.lr: 1.0e-5}\n")
    res = twinarm("validate", str(bad), home=tmp_path)
    assert res.returncode == 2
    assert "base.rl.stepz" in res.stderr and "Traceback" not in res.stderr


def test_validate_lists_departures_from_the_manifests_published_protocol(tmp_path):
    spec = tmp_path / "masa.yaml"
    spec.write_text("name: m\nbase:\n  eval: {heldout: datasets/masa-suite.yaml}\narms:\n"
                    "  paper: {overrides: {eval.temperature: 1.0, eval.top_p: 1.0, eval.n: 32, eval.n_per_suite: {}}}\n"
                    "  cheap: {overrides: {eval.n: 4}}\n")
    res = twinarm("validate", str(spec), home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "arm paper: held-out protocol matches datasets/masa-suite.yaml's published protocol" in res.stdout
    assert "arm cheap: held-out protocol departs from" in res.stdout
    assert "suite 'amc23': eval.n is 4, the published protocol samples 32 per problem" in res.stdout


def test_lineage_without_store_and_bad_sql(tmp_path):
    res = twinarm("lineage", "SELECT 1", home=tmp_path / "empty")
    assert res.returncode == 1 and "no lineage yet" in res.stderr and "Traceback" not in res.stderr
    from infra.lineage import Lineage

    Lineage(tmp_path / "h" / "lineage.duckdb").init()
    res = twinarm("lineage", "SELEC nonsense", home=tmp_path / "h")
    assert res.returncode == 1 and "lineage query failed" in res.stderr
    res = twinarm("lineage", "SELECT count(*) AS n FROM runs", "--format", "csv", home=tmp_path / "h")
    assert res.returncode == 0 and res.stdout.splitlines() == ["n", "0"]


def test_run_logs_reach_prefect_and_only_run_failures_leave_the_console():
    """`twinarm run` keeps a failing run's traceback off the terminal (one line is printed instead), but the run's
    logs (the Prefect UI, `prefect flow-run logs`) must keep every record: progress lines and the failure."""
    import logging

    from infra.home import configure_environment

    configure_environment()
    from prefect import flow  # noqa: F401  (configures Prefect's logging)
    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import quiet_prefect_failures

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):  # stands for Prefect's API handler on the run loggers
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    quiet_prefect_failures()
    quiet_prefect_failures()  # idempotent: one filter per handler
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles and all(len(h.filters) == 1 for h in consoles)
    run_logger = logging.getLogger("prefect.flow_runs")
    keep = Keep()
    run_logger.addHandler(keep)
    try:
        run_logger.info("[rl/control/seed0] GRPO steps 3/60")
        run_logger.error("Finished in state Failed('boom')")
    finally:
        run_logger.removeHandler(keep)
    assert [r.levelname for r in seen] == ["INFO", "ERROR"]
    console = consoles[0]
    assert console.filter(seen[0]) and not console.filter(seen[1])
    other = logging.LogRecord("prefect.server", logging.ERROR, __file__, 1, "server error", None, None)
    assert console.filter(other)  # errors that are not the run's own failure still reach the terminal
