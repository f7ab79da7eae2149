"""The audit ledger on a real tiny ablation: the clean run has no ✗, and every check fails on its own planted
confound. Confounds are planted into a copy of the run's lineage (facts, edges, configs, or artifact uris
re-pointed at altered data files), so the shared run is never touched and nothing is retrained."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import duckdb
import pytest
import yaml

from audit.ledger import Ledger, run_ledger
from infra.artifacts import read_parquet, uri_path, write_parquet
from infra.lineage import Lineage

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
Plant = Callable[[duckdb.DuckDBPyConnection, Path], None]


@pytest.fixture(scope="module")
def clean(tiny_run, flow_home) -> Ledger:
    return run_ledger(Lineage(flow_home.lineage_db), "tiny")


def planted(flow_home, tmp_path: Path, plant: Plant) -> Path:
    """A home whose lineage is a copy of the tiny run's with `plant(connection, tmp_path)` applied."""
    db = tmp_path / "home" / "lineage.duckdb"
    db.parent.mkdir(parents=True)
    for suffix in ("", ".wal"):  # a WAL left beside the file holds committed rows too
        if (src := Path(f"{flow_home.lineage_db}{suffix}")).exists():
            shutil.copyfile(src, f"{db}{suffix}")
    with duckdb.connect(str(db)) as con:
        plant(con, tmp_path)
    return db.parent


def ledger_of(home: Path) -> Ledger:
    return run_ledger(Lineage(home / "lineage.duckdb"), "tiny")


def run_id(con: duckdb.DuckDBPyConnection, stage: str, arm: str) -> str:
    (rid,), = con.execute("SELECT run_id FROM runs WHERE ablation = 'tiny' AND stage = ? AND arm = ?",
                          [stage, arm]).fetchall()
    return rid


def set_fact(stage: str, arm: str, name: str, change: Callable[[Any], Any]) -> Plant:
    def plant(con: duckdb.DuckDBPyConnection, _: Path) -> None:
        rid = run_id(con, stage, arm)
        (value,), = con.execute("SELECT value_json FROM facts WHERE run_id = ? AND name = ?", [rid, name]).fetchall()
        con.execute("UPDATE facts SET value_json = ? WHERE run_id = ? AND name = ?",
                    [json.dumps(change(json.loads(value))), rid, name])
    return plant


def sql(statement: str, *params: Any) -> Plant:
    return lambda con, _: con.execute(statement, list(params))


def set_config(arm: str, key: str, value: Any) -> Plant:
    """Change a leaf of an arm's resolved config (its resolve run)."""
    def plant(con: duckdb.DuckDBPyConnection, _: Path) -> None:
        rid = run_id(con, "resolve", arm)
        (config,), = con.execute("SELECT config_json FROM runs WHERE run_id = ?", [rid]).fetchall()
        config = json.loads(config)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        con.execute("UPDATE runs SET config_json = ? WHERE run_id = ?", [json.dumps(config, sort_keys=True), rid])
    return plant


def repoint(con: duckdb.DuckDBPyConnection, artifact_id: str, path: Path) -> None:
    con.execute("UPDATE artifacts SET uri = ? WHERE artifact_id = ?", [path.resolve().as_uri(), artifact_id])


def edited_artifact(stage: str, arm: str, role: str, direction: str,
                    edit: Callable[[list[dict[str, Any]]], None]) -> Plant:
    """Re-point a dataset artifact at an edited copy of its parquet file (same artifact id)."""
    def plant(con: duckdb.DuckDBPyConnection, tmp: Path) -> None:
        (aid, uri), = con.execute("SELECT a.artifact_id, a.uri FROM edges e JOIN artifacts a USING (artifact_id) "
                                  "WHERE e.run_id = ? AND e.role = ? AND e.direction = ?",
                                  [run_id(con, stage, arm), role, direction]).fetchall()
        rows = read_parquet(uri_path(uri))
        edit(rows)
        write_parquet(rows, tmp / f"{role}.parquet")
        repoint(con, aid, tmp / f"{role}.parquet")
    return plant


def spec_variant(change: Callable[[dict[str, Any]], None]) -> Plant:
    """Re-point the stored spec at an edited copy (the declared overrides and contrasts the audit reads)."""
    def plant(con: duckdb.DuckDBPyConnection, tmp: Path) -> None:
        (aid, uri), = con.execute("SELECT DISTINCT a.artifact_id, a.uri FROM edges e JOIN artifacts a "
                                  "USING (artifact_id) WHERE e.role = 'spec'").fetchall()
        spec = yaml.safe_load(uri_path(uri).read_text())
        change(spec)
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        repoint(con, aid, tmp / "spec.yaml")
    return plant


def both(*plants: Plant) -> Plant:
    def plant(con: duckdb.DuckDBPyConnection, tmp: Path) -> None:
        for p in plants:
            p(con, tmp)
    return plant


def split_heldout_job(con: duckdb.DuckDBPyConnection, tmp: Path) -> None:
    """The control arm evaluated in a second held-out job, on a different version of the suite file."""
    rid = run_id(con, "heldout", "*")
    (uri,), = con.execute("SELECT a.uri FROM edges e JOIN artifacts a USING (artifact_id) WHERE e.run_id = ? "
                          "AND e.role = 'heldout:arith'", [rid]).fetchall()
    rows = read_parquet(uri_path(uri))
    rows[0]["answer"] = "12345"
    write_parquet(rows, tmp / "suite.parquet")
    con.execute("INSERT INTO artifacts SELECT 'other-suite', kind, uri, bytes, rows, created_at, facets_json "
                "FROM artifacts WHERE uri = ?", [uri])
    repoint(con, "other-suite", tmp / "suite.parquet")
    con.execute("INSERT INTO runs SELECT 'second-job' AS run_id, * EXCLUDE (run_id) FROM runs WHERE run_id = ?", [rid])
    con.execute("INSERT INTO facts SELECT 'second-job', name, value_json FROM facts WHERE run_id = ?", [rid])
    con.execute("UPDATE edges SET run_id = 'second-job' WHERE run_id = ? AND role LIKE 'checkpoint:control:%'", [rid])
    con.execute("INSERT INTO edges VALUES ('second-job', 'other-suite', 'in', 'heldout:arith')")


def leak_tag(rows: list[dict[str, Any]]) -> None:
    rows[3]["messages"][-1]["content"] += " <|meta|>"


def heldout_in_rl_prompts(rows: list[dict[str, Any]]) -> None:
    rows[5]["prompt"] = "  compute 9-6-8+1+9-9. "  # arith-heldout-000000, in other case and spacing


def declare_sft_lr(spec: dict[str, Any]) -> None:
    spec["arms"]["control"]["overrides"]["sft.lr"] = 5.0e-4


def declare_only_reward(spec: dict[str, Any]) -> None:
    spec["contrasts"]["meta"]["mechanisms"] = ["meta_reward"]


def reordered_prompts(con: duckdb.DuckDBPyConnection, tmp: Path) -> None:
    """Control's RL reads the same prompts in another order: a copy stored under its own content hash."""
    from infra.artifacts import ArtifactStore

    rid = run_id(con, "rl", "control")
    (uri,), = con.execute("SELECT a.uri FROM edges e JOIN artifacts a USING (artifact_id) WHERE e.run_id = ? "
                          "AND e.role = 'prompts' AND e.direction = 'in'", [rid]).fetchall()
    write_parquet(read_parquet(uri_path(uri))[::-1], tmp / "prompts.parquet")
    art = ArtifactStore(tmp / "store").put(tmp / "prompts.parquet", kind="dataset")
    con.execute("INSERT INTO artifacts VALUES (?, 'dataset', ?, ?, NULL, now(), '{}')",
                [art.artifact_id, art.uri, art.bytes])
    con.execute("UPDATE edges SET artifact_id = ? WHERE run_id = ? AND role = 'prompts' AND direction = 'in'",
                [art.artifact_id, rid])


SECOND_LAW = "second law: inputs differ only where lineage explains"
CONFOUNDS: dict[str, tuple[str, Plant, tuple[str, ...]]] = {
    # id: (the check that must fail, the plant, words its summary must name)
    "val file": (SECOND_LAW, sql(
        "UPDATE edges SET artifact_id = (SELECT artifact_id FROM edges WHERE role = 'heldout:arith' LIMIT 1) "
        "WHERE role = 'val' AND run_id IN (SELECT run_id FROM runs WHERE stage = 'rl' AND arm = 'control')"),
        ("rl/seed0 `val`: control reads", "outputs `heldout:arith` and `val` of one data run")),
    "held-out files": (SECOND_LAW, split_heldout_job, ("heldout `heldout:arith`: control reads other-suite",
                                                      "made by no run")),
    "prompts order": (SECOND_LAW, reordered_prompts, ("rl/seed0 `prompts`: control reads", "made by no run")),
    "init skips SFT": (SECOND_LAW, sql(
        "UPDATE edges SET artifact_id = (SELECT artifact_id FROM edges WHERE direction = 'out' AND role = 'model' "
        "AND run_id IN (SELECT run_id FROM runs WHERE stage = 'base_model')) WHERE role = 'init' AND run_id IN "
        "(SELECT run_id FROM runs WHERE stage = 'rl' AND arm = 'control')"),
        ("rl/seed0 `init`", "made by different stages (base_model vs sft)")),
    "grader call path": ("same grader", set_fact("sweep", "control", "grader",
                                                 lambda g: {**g, "call_path": "evals.quick_grade"}),
                         ("call_path", "sweep control/seed0", "evals.quick_grade")),
    "undeclared lr": ("first law: configs differ only in declared keys", set_config("control", "sft.lr", 5.0e-4),
                      ("sft.lr", "0.0005")),
    "hyperparameter in contrast": ("package effects named",
                                   both(spec_variant(declare_sft_lr), set_config("control", "sft.lr", 5.0e-4)),
                                   ("hyperparameter sft.lr",)),
    "undeclared mechanism": ("package effects named", spec_variant(declare_only_reward), ("meta_sft",)),
    "adv norm in one arm": ("advantage normalisation applied alike",
                            set_fact("rl", "pmishift", "adv_norm_std_applied", lambda v: True),
                            ("adv_norm_std_applied", "pmishift/seed0=true")),
    "save_freq": ("save_freq and LR schedule per step", set_fact("rl", "pmishift", "save_freq", lambda v: v + 1),
                  ("save_freq",)),
    "lr schedule": ("save_freq and LR schedule per step",
                    set_fact("sft", "control", "lr_per_step", lambda v: v[:3] + [x * 2 for x in v[3:]]),
                    ("sft lr_per_step", "from step 4")),
    "scorer in control": ("control arm made zero scorer calls", set_fact("rl", "control", "scorer_calls", lambda v: 7),
                          ("control/seed0 (vanilla): 7 calls",)),
    "meta rollouts in control": ("MASA-off arms made zero meta rollouts",
                                 set_fact("rl", "control", "masa", lambda v: {**v, "meta_rollouts": 5}),
                                 ("control/seed0: 5 meta rollouts",)),
    "tag leak": ("SFT twins 1:1", edited_artifact("sft", "control", "sft1", "in", leak_tag),
                 ("sft1 no_tag_leakage", "arith-sft1-")),
    "unequal SFT rows": ("corpus sizes equal", set_fact("sft", "control", "rows_seen", lambda v: v - 60),
                         ("sft rows_seen",)),
    "regrade flips": ("meta-strip regrade flips 0", set_fact("heldout", "*", "regrade_flips", lambda v: 3),
                      ("3 graded samples",)),
    "contamination": ("held-out disjoint from training",
                      edited_artifact("rl", "control", "prompts", "in", heldout_in_rl_prompts),
                      ("1 held-out problem(s)", "arith:arith-heldout-000000 (in")),
    "seeds differ": ("seeds per arm", sql("UPDATE runs SET seed = 1 WHERE stage = 'rl' AND arm = 'control'"),
                     ("control=[1]",)),
    "code version": ("same code version",
                     sql("UPDATE runs SET code_version = 'other:commit' WHERE stage = 'rl' AND arm = 'control'"),
                     ("rl:", "other:commit")),
}


def statuses(ledger: Ledger) -> dict[str, str]:
    return {c.name: c.status for c in ledger.checks}


def test_clean_run_has_no_violation_and_names_its_evidence(clean, flow_home):
    assert not clean.failed, clean.to_markdown()
    assert statuses(clean) == {c.name: "☐" if c.name == "seeds per arm" else "✓" for c in clean.checks}
    assert {c.name for c in clean.checks} == {check for check, _, _ in CONFOUNDS.values()}  # each check planted
    assert all(c.evidence and all(e.query.startswith(("SELECT", "WITH")) for e in c.evidence) for c in clean.checks)
    assert [(r["key"], r["control"], r["pmishift"], r["declared_by"], r["mechanism"]) for r in clean.config_diff] == [
        ("rl.reward", "vanilla", "pmishift", ["control", "pmishift"], "meta_reward"),
        ("sft.strip_meta", True, False, ["control"], "meta_sft")]
    # the evidence query runs as is on the lineage and returns what the check saw
    evidence = clean.check(SECOND_LAW).evidence[0]
    assert Lineage(flow_home.lineage_db).rows(evidence.query) == evidence.values
    data = json.loads(json.dumps(clean.to_json()))
    assert data["failed"] is False and len(data["checks"]) == len(clean.checks)
    assert f"| ✓ | {SECOND_LAW} |" in clean.to_markdown()


@pytest.mark.parametrize("confound", CONFOUNDS)
def test_planted_confound_fails_its_own_check(clean, flow_home, tmp_path, confound):
    name, plant, words = CONFOUNDS[confound]
    ledger = ledger_of(planted(flow_home, tmp_path, plant))
    got = ledger.check(name)
    assert got.status == "✗", got
    assert all(w in got.summary for w in words), got.summary
    assert ledger.failed
    others = {k: v for k, v in statuses(ledger).items() if k != name}
    assert others == {k: v for k, v in statuses(clean).items() if k != name}


def test_missing_facts_leave_checks_open_never_verified(clean, flow_home, tmp_path):
    ledger = ledger_of(planted(flow_home, tmp_path, sql("DELETE FROM facts")))
    needs_facts = ["same grader", "advantage normalisation applied alike", "save_freq and LR schedule per step",
                   "control arm made zero scorer calls", "MASA-off arms made zero meta rollouts", "SFT twins 1:1",
                   "corpus sizes equal",
                   "meta-strip regrade flips 0"]
    assert {n: ledger.check(n).status for n in needs_facts} == dict.fromkeys(needs_facts, "☐")
    assert all("missing" in ledger.check(n).summary for n in needs_facts)
    assert not ledger.failed


def test_latest_flow_run_is_audited(clean, flow_home, tmp_path):
    """An older flow run of the ablation with a confound does not count; the latest one does."""
    def older_flow_with_confound(con: duckdb.DuckDBPyConnection, _: Path) -> None:
        con.execute("INSERT INTO runs SELECT run_id || '-old', 'old-flow', ablation, arm, stage, seed, config_json, "
                    "config_hash, 'old:code', status, started_at - INTERVAL 1 DAY, ended_at - INTERVAL 1 DAY, "
                    "mlflow_run_id FROM runs WHERE ablation = 'tiny'")
        con.execute("INSERT INTO edges SELECT run_id || '-old', artifact_id, direction, role FROM edges "
                    "WHERE run_id IN (SELECT run_id FROM runs WHERE ablation = 'tiny' AND flow_run_id <> 'old-flow')")

    ledger = ledger_of(planted(flow_home, tmp_path, older_flow_with_confound))
    assert ledger.flow_run_id == clean.flow_run_id and statuses(ledger) == statuses(clean)


def twinarm_audit(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "audit", "tiny", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "TWINARM_HOME": str(home), "COLUMNS": "200"}, timeout=120)


def test_cli_exit_codes(clean, flow_home, tmp_path):
    ok = twinarm_audit(flow_home.root)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "second law" in ok.stdout and "sft.strip_meta" in ok.stdout
    home = planted(flow_home, tmp_path, CONFOUNDS["scorer in control"][1])
    bad = twinarm_audit(home, "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    data = json.loads(bad.stdout)
    assert data["failed"] and {c["name"]: c["status"] for c in data["checks"]}[
        "control arm made zero scorer calls"] == "✗"
