"""The report and the belief replay on the tiny ablation: built from lineage, logged to MLflow, and the replayed
belief equal to an independent scorer call at every boundary."""
from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infra.artifacts import read_parquet, uri_path
from infra.lineage import Lineage
from infra.tracking import Tracker

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent


def _section(page: str, heading: str) -> str:
    """The HTML from a heading to the next heading of any level."""
    start = page.index(f">{heading}</h")
    end = re.search(r"<h\d>", page[start:])
    return page[start:start + end.start()] if end else page[start:]


def test_report_builds_from_lineage_and_is_logged_to_mlflow(tiny_run, flow_home, tmp_path):
    from audit.ledger import run_ledger
    from audit.report import build_report

    files = build_report(flow_home, "tiny", tmp_path / "report")
    page_path = files.html
    page = page_path.read_text()
    verdict = _section(page, "Verdict: held-out Δ at the final checkpoints")
    assert "pmishift" in verdict and "control" in verdict and "no held-out job" not in verdict
    heldout = _section(page, "Held-out evaluation")
    for arm in ("control", "pmishift"):  # both arms, at the SFT start and the final checkpoint
        assert re.search(rf"<td>arith</td><td>{arm}</td><td>0 \(SFT start\)</td>", heldout)
        assert re.search(rf"<td>arith</td><td>{arm}</td><td>6 \(final\)</td>", heldout)
    ledger = run_ledger(Lineage(flow_home.lineage_db), "tiny")
    audit = page[page.index("<h2>Audit ledger</h2>", page.index("<hr>")):]
    for check in ledger.checks:
        assert html.escape(check.name) in audit
    assert page.index("Verdict") < page.index("<hr>") and page.index("Audit ledger") < page.index("<hr>")
    md = page_path.with_suffix(".md").read_text()
    assert "## Held-out evaluation" in md and "![" in md and (page_path.parent / "val-accuracy.png").is_file()

    assert all(p.parent == tmp_path / "report" for p in files.files) and files.files[-1] == page_path
    tracker = Tracker(flow_home)  # the flow logged its own report (build_report uploads nothing itself)
    logged = {Path(f.path).name for f in tracker.client.list_artifacts(tracker.find_parent("tiny"), "report")}
    assert {"report.html", "report.md", "ledger.json", "val-accuracy.png"} <= logged


def test_belief_replay_equals_an_independent_scorer_call_per_boundary(tiny_run, flow_home, tmp_path):
    from audit.belief import write_replay
    from evals.engine import render_prompt
    from rewards.scorer import HFScorer

    rep, png, numbers = write_replay(flow_home, "tiny", arm="pmishift", out=tmp_path / "belief.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(numbers.read_text())["points"] == json.loads(json.dumps(rep.points))
    assert rep.points[0]["kind"] == "start" and rep.points[-1]["pos"] == len(rep.response)

    # independently: the arm's SFT model and prompts found in lineage, one scorer call per boundary and target
    inputs = {r["role"]: uri_path(r["uri"]) for r in Lineage(flow_home.lineage_db).rows(
        "SELECT role, uri FROM run_inputs WHERE ablation = 'tiny' AND stage = 'rl' AND arm = 'pmishift'")}
    prompt = next(p for p in read_parquet(inputs["prompts"]) if p["id"] == rep.prompt_id)
    scorer = HFScorer.from_pretrained(str(inputs["init"]))
    tok = scorer.tokenizer
    gold = tok.encode("\\boxed{" + rep.gold + "}", add_special_tokens=False)
    decoy = tok.encode("\\boxed{" + rep.decoy + "}", add_special_tokens=False)
    differ = [i for i, (g, d) in enumerate(zip(gold, decoy)) if g != d]
    assert len(gold) == len(decoy) and differ
    for point in rep.points:
        context = tok.encode(render_prompt(tok, prompt["prompt"]) + rep.response[:point["pos"]],
                             add_special_tokens=False)
        (lp_gold,) = scorer.target_logprobs([context], [gold])
        (lp_decoy,) = scorer.target_logprobs([context], [decoy])
        expected = sum(lp_gold[i] - lp_decoy[i] for i in differ)
        assert point["belief"] == pytest.approx(expected, abs=1e-4), point["kind"]


def test_cli_report_and_belief(tiny_run, flow_home, tmp_path):
    env = {"TWINARM_HOME": str(flow_home.root), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}

    def twinarm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                              env=env, timeout=300)

    ok = twinarm("report", "tiny", "--out", str(tmp_path / "r"))
    assert ok.returncode == 0, ok.stderr
    assert str(tmp_path / "r" / "report.html") in ok.stdout
    bad = twinarm("belief", "tiny", "--arm", "nope")
    assert bad.returncode == 2 and "arms with one: control, pmishift" in bad.stderr and "Traceback" not in bad.stderr
