"""Stage: the audit ledger and the report of the flow run that just finished. Not cached: both read the lineage
this flow has just written (a rerun served entirely from cache still gets its own ledger and report)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task


def audit_and_report_body(home_root: str, ablation: str) -> dict[str, Any]:
    """Build the ledger and the report of the ablation's latest flow run; returns the report path, the ledger
    counts by status and the names of violated checks."""
    from audit.report import build_report
    from infra.errors import TwinarmError
    from infra.home import Home
    from infra.tracking import Tracker

    home = Home(Path(home_root))
    report = build_report(home, ablation)
    tracker = Tracker(home)  # TODO(lead): the Session's call, s.tracker.log_files(s.parent_run, report.files, "report")
    if (parent := tracker.find_parent(ablation)) is None:
        raise TwinarmError(f"ablation '{ablation}' has no MLflow parent run to log its report to")
    tracker.log_files(parent, report.files, "report")
    page = report.html
    ledger = json.loads(report.ledger_json.read_text())
    counts = Counter(c["status"] for c in ledger["checks"])
    return {"report": str(page), "ledger": {status: counts.get(status, 0) for status in "✓✗☐"},
            "violated": [c["name"] for c in ledger["checks"] if c["status"] == "✗"]}


@task(name="audit-and-report")
def audit_and_report(home_root: str, ablation: str) -> dict[str, Any]:
    """Prefect task around audit_and_report_body (not cached: it reads the lineage this flow just wrote)."""
    return audit_and_report_body(home_root, ablation)
