"""The `twinarm` command line. Exit codes: 0 ok, 1 a problem was found (failed stage, violated check),
2 the command could not run as asked (bad spec, bad input, bad arguments)."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

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


def _csv_list(value: Optional[str], cast: type = str) -> Optional[list]:
    return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None


@app.command()
def validate(spec: Path = typer.Argument(..., help="ablation spec (YAML)")) -> None:
    """Check a spec; print the resolved arms and the declared differences between them."""

    def body() -> int:
        from infra.spec import config_diff, config_hash, declared_keys, load_spec, mechanism_of, resolved_arms

        s = load_spec(spec)
        arms = resolved_arms(s)
        out.print(f"[green]✓[/] {spec}: ablation [bold]{s.name}[/], spec hash {config_hash(s)}")
        table = Table("arm", "resolved config hash", "declared overrides", title="arms")
        for name, cfg in arms.items():
            overrides = ", ".join(f"{k}={json.dumps(v)}" for k, v in s.arms[name].overrides.items())
            table.add_row(name, config_hash(cfg), overrides)
        out.print(table)
        for c_name, c in s.contrasts.items():
            diff = config_diff(arms[c.treatment], arms[c.control])
            declared = declared_keys(s, c.treatment) | declared_keys(s, c.control)
            t = Table("key", "mechanism", c.treatment, c.control, "declared",
                      title=f"contrast {c_name}: {c.treatment} − {c.control}" + (f" ({c.question})" if c.question
                                                                                 else ""))
            for key, (a, b) in diff.items():
                t.add_row(key, mechanism_of(key), json.dumps(a), json.dumps(b),
                          "yes" if key in declared else "[red]NO[/]")
            out.print(t)
            mechanisms = sorted({mechanism_of(k) for k in diff})
            if len(mechanisms) > 1:
                named = set(c.mechanisms) >= set(mechanisms)
                out.print(f"  package effect: {len(mechanisms)} mechanisms ({', '.join(mechanisms)}) — "
                          + ("declared in contrasts." + c_name + ".mechanisms" if named
                             else "[red]not declared[/] (list them in contrasts." + c_name + ".mechanisms)"))
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
        from flows.ablation import RunOverrides, ablation

        result = ablation(spec_file=str(spec), overrides=RunOverrides(arms=_csv_list(arms),
                                                                      seeds=_csv_list(seeds, int),
                                                                      rl_steps=rl_steps), fresh=fresh)
        print_summary(result)
        return 0

    _guard(body)


def print_summary(result: dict) -> None:
    from infra.home import home
    from infra.tracking import tracking_uri

    h = home()
    stages = result.get("stages", {})
    t = Table("stage", "status", "numbers", title=f"ablation {result.get('ablation')}")
    for label, status in stages.items():
        nums = result.get("summaries", {}).get(label, {})
        t.add_row(label, status, ", ".join(f"{k}={v}" for k, v in nums.items()))
    out.print(t)
    out.print(f"TWINARM_HOME  {h.root}")
    out.print(f"lineage       {h.lineage_db}   (twinarm lineage \"SELECT * FROM runs\")")
    out.print(f"MLflow        {tracking_uri(h)}   (artifacts {h.mlflow_artifacts}; `make ui`)")
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
        from flows.heldout import nightly_heldout, registered
        from infra.home import home
        from infra.lineage import Lineage

        known = registered(Lineage(home().lineage_db))
        if ablation not in known:
            raise UsageError(f"ablation '{ablation}' has no held-out job yet; registered: {', '.join(known) or 'none'}")
        result = nightly_heldout(ablations=[ablation])["ablations"][ablation]
        if "skipped" in result:
            raise TwinarmError(result["skipped"])
        out.print(f"{ablation}: {result['checkpoints']} checkpoints, {result['evaluated_now']} evaluated now")
        return 0

    _guard(body)


@app.command()
def serve(spec: str = typer.Option("configs/demo.yaml", help="the spec file the ablation form starts with"),
          cron: str = typer.Option("0 3 * * *", help="schedule of the nightly held-out deployment")) -> None:
    """Serve the ablation and nightly held-out deployments to a running Prefect server (PREFECT_API_URL)."""

    def body() -> int:
        import os

        if not os.environ.get("PREFECT_API_URL"):
            raise UsageError("PREFECT_API_URL is not set: start the server with `twinarm ui` (it serves the "
                             "deployments itself) or point PREFECT_API_URL at your Prefect server")
        from flows.deploy import serve as serve_deployments

        serve_deployments(spec, cron)
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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
