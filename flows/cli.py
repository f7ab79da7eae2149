"""The `twinarm` command line. Exit codes: 0 ok, 1 a problem was found (failed stage, violated check),
2 the command could not run as asked (bad spec, bad input, bad arguments)."""
from __future__ import annotations

import errno
import json
import logging
import shutil
import sys
import traceback
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from infra.errors import TwinarmError, UsageError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Matched twin-arm ablations of RL training, and the proof that the arms were matched.")
out = Console()
err = Console(stderr=True)


def _guard(fn: Callable[[], int | None]) -> None:
    """Run a command body: user errors become one red line and their exit code, never a traceback."""
    try:
        code = fn() or 0
    except TwinarmError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: completed stages are kept; run the same command again to resume.")
        code = 130
    except Exception as exc:  # a bug or an environment failure: one line here, the traceback in a file
        code = 1
        if _disk_full(exc):
            from infra.home import home

            root = home().root
            free = shutil.disk_usage(root).free / 2**20 if root.exists() else 0
            err.print(f"[bold red]error:[/] no space left on the disk of {root} ({free:.0f} MiB free). Nothing "
                      f"half-written is used: completed stages are kept. Free space (or point TWINARM_HOME "
                      f"elsewhere) and run the same command again to resume.", highlight=False, soft_wrap=True)
            raise typer.Exit(code)
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        try:
            from infra.home import home

            path = home().root / "last-error.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(traceback.format_exc())
            err.print(f"  (traceback saved to {path})")
        except OSError:
            pass
    raise typer.Exit(code)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when a library (safetensors, sqlite, duckdb) re-raises it as its own exception type."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen) or \
                "database or disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _csv_list(value: Optional[str], cast: type = str) -> Optional[list]:
    return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None


def _print_protocol_differences(arms: dict) -> None:
    """`twinarm validate`: where each arm's eval.* protocol departs from its held-out manifest's published one."""
    from evals.suites import load_manifest, protocol_differences
    from infra.code import REPO_ROOT

    for name, cfg in arms.items():
        ev = cfg.eval
        if ev.heldout == "arith":
            continue
        path = Path(ev.heldout)
        manifest = load_manifest(path if path.is_file() or path.is_absolute() else REPO_ROOT / path)
        if manifest.protocol is None:
            continue
        diffs = protocol_differences(manifest, ev.temperature, ev.top_p, ev.n, ev.n_per_suite)
        out.print(f"arm {name}: held-out protocol " + ("[green]matches[/] " if not diffs else "[yellow]departs from[/] ")
                  + f"{ev.heldout}'s published protocol ({manifest.protocol.reference})"
                  + "".join(f"\n  {d}" for d in diffs))


@app.command()
def validate(spec: Path = typer.Argument(..., help="ablation spec (YAML)")) -> None:
    """Check a spec; print the resolved arms and the declared differences between them."""

    def body() -> int:
        from infra.spec import config_diff, config_hash, contrast_mechanisms, declared_keys, mechanisms_of, \
            resolved_arms
        from tasks.stages import load_checked_spec

        s = load_checked_spec(spec)
        arms = resolved_arms(s)
        out.print(f"[green]✓[/] {spec}: ablation [bold]{s.name}[/], spec hash {config_hash(s)}")
        table = Table("arm", "resolved config hash", "declared overrides", title="arms")
        for name, cfg in arms.items():
            overrides = ", ".join(f"{k}={json.dumps(v)}" for k, v in s.arms[name].overrides.items())
            table.add_row(name, config_hash(cfg), overrides)
        out.print(table)
        _print_protocol_differences(arms)
        for c_name, c in s.contrasts.items():
            diff = config_diff(arms[c.treatment], arms[c.control])
            declared = declared_keys(s, c.treatment) | declared_keys(s, c.control)
            # keys and mechanism names are never cut ("rl.masa.efficient.…" names no key); values may fold
            t = Table(Column("key", no_wrap=True, min_width=max(map(len, diff), default=3)),
                      Column("mechanism", overflow="fold"), Column(c.treatment, overflow="fold"),
                      Column(c.control, overflow="fold"), "declared",
                      title=f"contrast {c_name}: {c.treatment} − {c.control}" + (f" ({c.question})" if c.question
                                                                                 else ""))
            for key, (a, b) in diff.items():
                t.add_row(key, ", ".join(mechanisms_of(key, (a, b))), json.dumps(a), json.dumps(b),
                          "yes" if key in declared else "[red]NO[/]")
            out.print(t)
            changed, _ = contrast_mechanisms(c_name, c, diff)  # load_checked_spec refused any problem
            out.print(f"  declared mechanisms: {', '.join(c.mechanisms) or 'none'} · the arm diff changes: "
                      f"{', '.join(changed) or 'no mechanism'}"
                      + (f" (package effect of {len(changed)} mechanisms)" if len(changed) > 1 else ""))
        return 0

    _guard(body)


@app.command()
def run(spec: Path = typer.Argument(..., help="ablation spec (YAML)"),
        arms: Optional[str] = typer.Option(None, help="comma-separated arms to run (default: all)"),
        seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (replaces base.seeds)"),
        rl_steps: Optional[int] = typer.Option(None, help="replace base.rl.steps"),
        fresh: bool = typer.Option(False, "--fresh", help="recompute every stage, ignoring caches")) -> None:
    """Run an ablation (or resume it: completed stages are served from cache)."""

    def body() -> int:
        from flows.ui import run_server

        with interruptible(), run_server(while_starting=prepare_flow):
            from flows.ablation import RunOverrides, ablation

            quiet_prefect_failures()
            result = ablation(spec_file=str(spec), overrides=RunOverrides(arms=_csv_list(arms),
                                                                          seeds=_csv_list(seeds, int),
                                                                          rl_steps=rl_steps), fresh=fresh)
            print_summary(result)
        return 0

    _guard(body)


def prepare_flow() -> None:
    """What a flow needs before its first stage and can do while the Prefect server starts: import the flows (and so
    prefect, which reads its settings then) and create the MLflow store (a fresh SQLite store migrates for ~3 s)."""
    import importlib

    from infra.home import configure_environment
    from infra.tracking import Tracker

    for module in ("flows.ablation", "flows.heldout"):
        importlib.import_module(module)
    Tracker(configure_environment())


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM during a flow: every running stage stops at its next step (infra.progress.STOP),
    the flow run is recorded as Crashed, and KeyboardInterrupt reaches _guard (exit 130, "interrupted")."""
    import signal

    from infra.progress import STOP

    def stop(signum: int, frame: object) -> None:
        STOP.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _not_a_run_failure(record: logging.LogRecord) -> bool:
    return not (record.levelno >= 40 and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


def quiet_prefect_failures() -> None:
    """A failing flow is reported once on the terminal, as one line, by _guard; Prefect's console handler would
    also print the run's traceback. Drop run errors from the console handlers only: the run's logs (the Prefect
    UI, `prefect flow-run logs`) keep every record, progress lines and the failure included. Call after prefect
    is imported (its logging is configured then)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        if isinstance(handler, PrefectConsoleHandler) and _not_a_run_failure not in handler.filters:
            handler.addFilter(_not_a_run_failure)


def print_summary(result: dict) -> None:
    from infra.home import home
    from infra.tracking import Tracker, runs_url, tracking_uri

    h = home()
    stages = result.get("stages", {})
    t = Table("stage", "status", "numbers", title=f"ablation {result.get('ablation')}")
    for label, status in stages.items():
        nums = result.get("summaries", {}).get(label, {})
        t.add_row(label, status, ", ".join(f"{k}={v}" for k, v in nums.items()))
    out.print(t)
    out.print(f"TWINARM_HOME  {h.root}")
    out.print(f"lineage       {h.lineage_db}   (twinarm lineage \"SELECT * FROM runs\")")
    if result.get("ablation"):
        experiment = Tracker(h).experiment(result["ablation"])
        out.print(f"MLflow        {runs_url(experiment)}   (with `twinarm ui`; store {tracking_uri(h)})",
                  soft_wrap=True)
    if result.get("ledger"):
        counts = result["ledger"]
        verdict = f"[bold red]✗ {', '.join(result['violated'])}[/]" if result["violated"] else "[green]no ✗[/]"
        out.print(f"audit         ✓ {counts['✓']}  ✗ {counts['✗']}  ☐ {counts['☐']}   {verdict}   "
                  f"(twinarm audit {result['ablation']})")
    if result.get("report"):
        out.print(f"report        {result['report']}")


@app.command()
def lineage(sql: str = typer.Argument(..., help="SQL over runs, artifacts, edges, facts and the views"),
            fmt: str = typer.Option("table", "--format", help="table | csv | json")) -> None:
    """Query the lineage store (read-only). Views: run_inputs, run_outputs, artifact_parents,
    artifact_ancestry, run_config, arm_config_diff, run_facts."""

    def body() -> int:
        from infra.home import home
        from infra.lineage import Lineage

        columns, rows = Lineage(home().lineage_db).query(sql)
        if fmt == "json":
            out.print_json(data=[dict(zip(columns, r)) for r in rows], default=str)
        elif fmt == "csv":
            import csv

            writer = csv.writer(sys.stdout)
            writer.writerow(columns)
            writer.writerows(rows)
        elif fmt == "table":
            t = Table(*columns)
            for r in rows:
                t.add_row(*("" if v is None else str(v) for v in r))
            out.print(t)
        else:
            raise UsageError(f"--format: expected table, csv or json, got '{fmt}'")
        return 0

    _guard(body)


@app.command()
def heldout(ablation: str = typer.Argument(..., help="a registered ablation (its ablation flow has run)")) -> None:
    """Held-out evaluation of every saved checkpoint of an ablation that has no result yet (what the nightly
    deployment does for every ablation)."""

    def body() -> int:
        from flows.ui import run_server
        from infra.home import home
        from infra.lineage import Lineage

        with interruptible(), run_server(while_starting=prepare_flow):
            from flows.heldout import line, nightly_heldout, registered

            known = registered(Lineage(home().lineage_db))
            if ablation not in known:
                raise UsageError(f"ablation '{ablation}' has no held-out job yet; registered: "
                                 f"{', '.join(known) or 'none'}")
            quiet_prefect_failures()
            result = nightly_heldout(ablations=[ablation])["ablations"][ablation]
        if "skipped" in result:
            raise TwinarmError(result["skipped"])
        out.print(line(ablation, result))
        return 0

    _guard(body)


@app.command()
def audit(ablation: str = typer.Argument(..., help="an ablation whose flow has run"),
          as_json: bool = typer.Option(False, "--json", help="print the ledger as JSON (checks with evidence)")
          ) -> None:
    """The matched-ness ledger of the ablation's latest flow run (read-only): every check ✓ verified,
    ✗ violated or ☐ open, and the resolved-config keys that differ between arms. Exit code 1 when any is ✗."""

    def body() -> int:
        from rich.markup import escape

        from audit.ledger import run_ledger
        from infra.home import home
        from infra.lineage import Lineage

        ledger = run_ledger(Lineage(home().lineage_db), ablation)
        if as_json:
            out.print_json(data=ledger.to_json())
            return 1 if ledger.failed else 0
        colour = {"✓": "green", "✗": "bold red", "☐": "yellow"}
        t = Table("", "check", "finding", title=f"audit ledger: {ablation} (flow run {ledger.flow_run_id})")
        for c in ledger.checks:
            t.add_row(f"[{colour[c.status]}]{c.status}[/]", escape(c.name), escape(c.summary))
        out.print(t)
        diff = Table("key", *map(escape, ledger.arms), "declared by", "mechanism",
                     title="resolved configs: keys that differ between arms")
        for row in ledger.config_diff:
            diff.add_row(escape(row["key"]), *(escape(json.dumps(row[a], default=str)) for a in ledger.arms),
                         escape(", ".join(row["declared_by"])) or "[red]nobody[/]", escape(row["mechanism"]))
        out.print(diff)
        return 1 if ledger.failed else 0

    _guard(body)


@app.command()
def report(ablation: str = typer.Argument(..., help="an ablation whose flow has run"),
           out_dir: Optional[Path] = typer.Option(None, "--out",
                                                  help="output directory (default TWINARM_HOME/reports/ABLATION)")
           ) -> None:
    """Build the ablation report (HTML + Markdown + figures + ledger) from its latest flow run and log it to the
    ablation's MLflow parent run (artifact folder report/)."""

    def body() -> int:
        from audit.report import build_report
        from infra.errors import TwinarmError
        from infra.home import home
        from infra.tracking import Tracker, tracking_uri

        h = home()
        tracker = Tracker(h)
        if (parent := tracker.find_parent(ablation)) is None:
            raise TwinarmError(f"ablation '{ablation}' has no MLflow parent run in {tracking_uri(h)} (is "
                               f"MLFLOW_TRACKING_URI pointing at the store its flow used?)")
        report = build_report(h, ablation, out_dir)
        tracker.log_files(parent, report.files, "report")
        page = report.html
        out.print(f"report    {page}", soft_wrap=True)  # paths stay whole for copy and paste
        out.print(f"markdown  {page.with_suffix('.md')}   (figures and ledger.json beside it)", soft_wrap=True)
        out.print(f"MLflow    {tracking_uri(h)}   (parent run of '{ablation}', artifacts report/)", soft_wrap=True)
        return 0

    _guard(body)


@app.command()
def belief(ablation: str = typer.Argument(..., help="an ablation whose RL stage has run"),
           arm: Optional[str] = typer.Option(None, help="arm (default: the first contrast's treatment)"),
           step: Optional[int] = typer.Option(None, help="RL step (default: the last)"),
           rollout: Optional[int] = typer.Option(None, help="rollout index within the step (default: one with a "
                                                            "usable decoy, a closed meta block, most boundaries)"),
           out_png: Optional[Path] = typer.Option(None, "--out", help="PNG path; the numbers go beside it (.json)")
           ) -> None:
    """Replay one RL rollout: the belief log p(gold) − log p(decoy) under the arm's frozen SFT model at every
    sentence boundary and meta-block edge; draw it and write the numbers."""

    def body() -> int:
        from rich.markup import escape

        from audit.belief import tail_text, write_replay
        from infra.home import configure_environment

        rep, png, numbers = write_replay(configure_environment(), ablation, arm, step, rollout, out_png)
        t = Table("#", "char", "kind", "belief", "text read since the previous boundary",
                  title=f"{ablation} · {rep.arm} seed {rep.seed} · step {rep.step} · rollout {rep.rollout}: "
                        f"gold {rep.gold}, decoy {rep.decoy}")
        for i, p in enumerate(rep.points):
            t.add_row(str(i), str(p["pos"]), p["kind"], f"{p['belief']:+.3f}", escape(tail_text(p["piece"])))
        out.print(t)
        out.print(f"figure   {png}", soft_wrap=True)
        out.print(f"numbers  {numbers}", soft_wrap=True)
        return 0

    _guard(body)


@app.command()
def serve(spec: str = typer.Option("configs/demo.yaml", help="the spec file the ablation form starts with"),
          cron: str = typer.Option("0 3 * * *", help="schedule of the nightly held-out deployment"),
          interval: Optional[float] = typer.Option(None, min=1, help="run the nightly held-out deployment every "
                                                                     "INTERVAL seconds instead of on --cron"),
          replace: bool = typer.Option(False, "--replace", hidden=True,
                                       help="serve even if another process serves the deployments (twinarm ui's "
                                            "own child)")) -> None:
    """Serve the ablation and nightly held-out deployments to a running Prefect server (PREFECT_API_URL). One
    process serves them: refused while another (`twinarm ui`, another `serve`) does."""

    def body() -> int:
        import os

        from infra.home import configure_environment

        # before anything reads Prefect's settings: the runner hands its settings to each flow run's process, so
        # settings read before TWINARM_HOME is applied would send results to another home's storage
        configure_environment()
        api = os.environ.get("PREFECT_API_URL")
        if not api:
            raise UsageError("PREFECT_API_URL is not set: start the server with `twinarm ui` (it serves the "
                             "deployments itself) or point PREFECT_API_URL at your Prefect server")
        from flows.deploy import check_api, served_elsewhere, serve as serve_deployments

        check_api(api)
        busy = [] if replace else served_elsewhere()
        if busy:
            raise TwinarmError(f"{', '.join(busy)} already served on {api} by another process (`twinarm ui` or "
                               f"`twinarm serve`): stop it first; one process owns the deployments and their "
                               f"schedules")
        serve_deployments(spec, cron, interval)
        return 0

    _guard(body)


@app.command()
def ui(prefect_port: int = typer.Option(4200, help="Prefect UI/API port on 127.0.0.1"),
       mlflow_port: int = typer.Option(5000, help="MLflow UI port on 127.0.0.1"),
       spec: str = typer.Option("configs/demo.yaml", help="the spec file the ablation form starts with"),
       deployments: bool = typer.Option(True, help="also serve the ablation and nightly deployments")) -> None:
    """Start the Prefect UI and the MLflow UI on 127.0.0.1 (and serve the deployments) until Ctrl-C."""

    def body() -> int:
        from flows.ui import run_ui

        return run_ui(prefect_port, mlflow_port, spec, deployments, out)

    _guard(body)


@app.command()
def plan(spec: Path = typer.Argument(..., help="ablation spec (YAML) with executor.kind: verl"),
         address: Optional[str] = typer.Option(None, help="Ray Jobs address (default: executor.ray_address)"),
         root: Optional[str] = typer.Option(None, help="TWINARM_HOME as the cluster mounts it")) -> None:
    """Dry run of the verl cluster executor: each arm's `ray job submit` line and verl overrides, and the diff
    between arms checked against the declared diff (flows/plan.py). Nothing is submitted."""
    from flows.plan import print_plan

    _guard(lambda: print_plan(str(spec), address, root, out))


@app.command()
def doctor(spec: Path = typer.Argument(..., help="ablation spec (YAML) with executor.kind: verl"),
           address: Optional[str] = typer.Option(None, help="Ray Jobs address (default: executor.ray_address)")
           ) -> None:
    """Check a cluster for the verl executor: Ray address, GPUs per node, vLLM, CUDA torch, shared TWINARM_HOME
    (rl/verl_doctor.py). Exit code 1 when a check fails."""
    from rl.verl_doctor import print_doctor

    _guard(lambda: print_doctor(str(spec), address, out))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
