"""The Prefect artifact of an ablation flow run: one Markdown page on the flow run's Artifacts tab with the verdict,
the audit ledger's counts, every stage's status and numbers, and the links to the report and the MLflow runs."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def summary_markdown(result: dict[str, Any], mlflow_runs: str) -> str:
    """Markdown for a finished ablation flow (`result`: the ablation flow's return value)."""
    counts, violated = result.get("ledger") or {}, result.get("violated") or []
    verdict = f"✗ violated: {', '.join(violated)}" if violated else "no ✗ (every check ✓ verified or ☐ open)"
    lines = [f"# Ablation `{result['ablation']}`", "", f"**Verdict:** {verdict}", ""]
    if counts:
        lines += ["| ✓ verified | ✗ violated | ☐ open |", "|---|---|---|",
                  f"| {counts.get('✓', 0)} | {counts.get('✗', 0)} | {counts.get('☐', 0)} |", ""]
    lines += ["| stage | status | numbers |", "|---|---|---|"]
    for label, status in result.get("stages", {}).items():
        numbers = ", ".join(f"{k}={v}" for k, v in result.get("summaries", {}).get(label, {}).items())
        lines.append(f"| `{label}` | {status} | {numbers} |")
    lines += ["", f"- MLflow runs: [{mlflow_runs}]({mlflow_runs})"]
    if result.get("report"):
        report = Path(result["report"])
        lines.append(f"- report: [{report}]({report.as_uri()}) (Markdown beside it)")
    lines.append(f"- audit: `twinarm audit {result['ablation']}`; lineage: `twinarm lineage \"SELECT * FROM runs "
                 f"WHERE ablation = '{result['ablation']}'\"` (TWINARM_HOME {result['home']})")
    return "\n".join(lines) + "\n"


def publish_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Attach the summary to the current flow run as a Markdown artifact (nothing outside a flow run); returns
    `result` unchanged."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from infra.home import Home
    from infra.tracking import Tracker, runs_url

    markdown = summary_markdown(result, runs_url(Tracker(Home(Path(result["home"]))).experiment(result["ablation"])))
    if FlowRunContext.get() is not None:
        key = "twinarm-" + re.sub(r"[^a-z0-9-]+", "-", result["ablation"].lower()).strip("-")
        create_markdown_artifact(markdown=markdown, key=key, description=f"ablation {result['ablation']}: verdict, "
                                                                         f"ledger, stages, links")
    return result
