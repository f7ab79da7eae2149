"""Stage: the audit ledger and the report of the flow run that just finished. Not cached: both read the lineage
this flow has just written (a rerun served entirely from cache still gets its own ledger and report)."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import Session


def audit_and_report_body(session: Session) -> dict[str, Any]:
    """Build the ledger and the report of the session's flow run (uploaded by the Session to its MLflow parent
    run); returns the report path, the ledger counts by status and the names of violated checks."""
    report = session.report()
    ledger = json.loads(report.ledger_json.read_text())
    counts = Counter(c["status"] for c in ledger["checks"])
    return {"report": str(report.html), "ledger": {status: counts.get(status, 0) for status in "✓✗☐"},
            "violated": [c["name"] for c in ledger["checks"] if c["status"] == "✗"]}


@task(name="audit-and-report", cache_policy=NONE)
def audit_and_report(session: Session) -> dict[str, Any]:
    """Prefect task around audit_and_report_body (not cached: it reads the lineage this flow just wrote)."""
    return audit_and_report_body(session)
