"""The matched-ness ledger (DESIGN §9) of an ablation's latest flow run: every check of audit.checks with its
status and evidence, and the first law's table of resolved-config keys that differ between arms.

    ledger = run_ledger(Lineage(home().lineage_db), "demo")
    ledger.failed            # any ✗
    ledger.to_markdown()     # status table, config diff, evidence queries
    ledger.to_json()         # the same as a JSON-ready dict
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from audit.checks import CHECKS, FAIL, Check, Evidence, Scope
from audit.flowrun import latest_flow
from infra.lineage import Lineage

__all__ = ["Check", "Evidence", "Ledger", "run_ledger"]

VALUES_SHOWN = 400  # characters of evidence values in the Markdown (the JSON has them all)


@dataclass
class Ledger:
    ablation: str
    flow_run_id: str | None
    arms: list[str]
    checks: list[Check]
    config_diff: list[dict[str, Any]]  # rows {key, <arm>: value..., declared_by: [arms], mechanism}

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> dict[str, Any]:
        data = {"ablation": self.ablation, "flow_run_id": self.flow_run_id, "arms": self.arms,
                "failed": self.failed, "checks": [asdict(c) for c in self.checks], "config_diff": self.config_diff}
        return json.loads(json.dumps(data, default=str))  # lineage values (timestamps) as plain JSON

    def to_markdown(self) -> str:
        lines = [f"## Audit ledger — {self.ablation}", "",
                 f"flow run `{self.flow_run_id}` · arms {', '.join(self.arms)} · ✓ verified · ✗ violated · ☐ open",
                 "", "| | check | finding |", "|---|---|---|"]
        lines += [f"| {c.status} | {_cell(c.name)} | {_cell(c.summary)} |" for c in self.checks]
        lines += ["", "### Resolved configs: keys that differ between arms", ""]
        if self.config_diff:
            columns = ["key", *self.arms, "declared_by", "mechanism"]
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row[c] if c in ("key", "mechanism") else json.dumps(row[c], default=str))
                                        for c in columns) + " |" for row in self.config_diff]
        else:
            lines.append("none")
        lines += ["", "### Evidence", ""]
        for c in self.checks:
            lines.append(f"**{c.status} {c.name}**")
            for e in c.evidence:
                values = json.dumps(e.values, default=str)
                if len(values) > VALUES_SHOWN:
                    values = values[:VALUES_SHOWN] + f"… ({len(values)} characters)"
                lines += ["", "```sql", e.query, "```", "", f"values: `{values}`"]
            lines.append("")
        return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def run_ledger(lineage: Lineage, ablation: str) -> Ledger:
    """Every check on the ablation's latest flow run (UsageError when lineage has no run of the ablation)."""
    flow = latest_flow(lineage, ablation)
    scope = Scope(lineage, ablation, flow.flow_run_id, flow.arms)
    return Ledger(ablation=ablation, flow_run_id=flow.flow_run_id, arms=flow.arms,
                  checks=[check(scope) for check in CHECKS], config_diff=scope.config_diff[0])
