"""Lineage in DuckDB (DESIGN §3), shaped on OpenLineage: runs, artifacts, in/out edges, runtime facts.

One writer: the flow process. It opens the file only for the length of one transaction, so a reader
(`twinarm lineage "SQL"`) gets in between stage records; both sides retry briefly on the file lock and then
say clearly who holds it. Every write is an upsert keyed by content (artifact ids are content hashes, run ids
are hashes of what defines the run), so recording the same stage twice adds no rows.
"""
from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb

from infra.artifacts import Artifact, uri_path
from infra.errors import LockedError, TwinarmError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
  run_id VARCHAR PRIMARY KEY, flow_run_id VARCHAR, ablation VARCHAR, arm VARCHAR, stage VARCHAR,
  seed INTEGER, config_json JSON, config_hash VARCHAR, code_version VARCHAR, status VARCHAR,
  started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ, mlflow_run_id VARCHAR);
CREATE TABLE IF NOT EXISTS artifacts(
  artifact_id VARCHAR PRIMARY KEY, kind VARCHAR, uri VARCHAR, bytes BIGINT, rows BIGINT,
  created_at TIMESTAMPTZ, facets_json JSON);
CREATE TABLE IF NOT EXISTS edges(
  run_id VARCHAR, artifact_id VARCHAR, direction VARCHAR CHECK (direction IN ('in', 'out')), role VARCHAR,
  PRIMARY KEY (run_id, artifact_id, direction, role));
CREATE TABLE IF NOT EXISTS facts(
  run_id VARCHAR, name VARCHAR, value_json JSON, PRIMARY KEY (run_id, name));

-- every input of every run, with the artifact it names
CREATE OR REPLACE VIEW run_inputs AS
SELECT r.ablation, r.arm, r.seed, r.stage, r.run_id, e.role, a.artifact_id, a.kind, a.uri, a.rows
FROM runs r JOIN edges e ON e.run_id = r.run_id AND e.direction = 'in'
JOIN artifacts a ON a.artifact_id = e.artifact_id;

-- every output of every run
CREATE OR REPLACE VIEW run_outputs AS
SELECT r.ablation, r.arm, r.seed, r.stage, r.run_id, e.role, a.artifact_id, a.kind, a.uri, a.rows
FROM runs r JOIN edges e ON e.run_id = r.run_id AND e.direction = 'out'
JOIN artifacts a ON a.artifact_id = e.artifact_id;

-- artifact -> artifacts it was made from (one hop), via the run that wrote it
CREATE OR REPLACE VIEW artifact_parents AS
SELECT o.artifact_id, i.artifact_id AS parent_id, o.run_id, r.stage, i.role
FROM edges o JOIN edges i ON i.run_id = o.run_id AND i.direction = 'in'
JOIN runs r ON r.run_id = o.run_id
WHERE o.direction = 'out';

-- artifact -> every ancestor at any depth ("what fed this checkpoint?")
CREATE OR REPLACE VIEW artifact_ancestry AS
WITH RECURSIVE anc(artifact_id, ancestor_id, depth, via_stage) AS (
  SELECT artifact_id, parent_id, 1, stage FROM artifact_parents
  UNION
  SELECT anc.artifact_id, p.parent_id, anc.depth + 1, p.stage
  FROM anc JOIN artifact_parents p ON p.artifact_id = anc.ancestor_id
  WHERE anc.depth < 64)
SELECT anc.artifact_id, anc.ancestor_id, min(anc.depth) AS depth, any_value(a.kind) AS ancestor_kind,
       any_value(a.uri) AS ancestor_uri
FROM anc JOIN artifacts a ON a.artifact_id = anc.ancestor_id
GROUP BY anc.artifact_id, anc.ancestor_id;

-- leaf keys of every run's config (arrays are leaves)
CREATE OR REPLACE VIEW run_config AS
SELECT r.ablation, r.arm, r.seed, r.stage, r.run_id,
       regexp_replace(t.fullkey, '^\\$\\.', '') AS key, t.value AS value_json
FROM runs r, json_tree(r.config_json) t
WHERE t.type <> 'OBJECT' AND NOT regexp_matches(t.fullkey, '\\]$');

-- keys whose resolved values differ between two arms of an ablation (the audit's first law reads this)
CREATE OR REPLACE VIEW arm_config_diff AS
WITH c AS (SELECT ablation, arm, key, value_json FROM run_config WHERE stage = 'resolve'),
pairs AS (SELECT DISTINCT a.ablation, a.arm AS arm_a, b.arm AS arm_b
          FROM c a JOIN c b ON a.ablation = b.ablation AND a.arm < b.arm),
keys AS (SELECT DISTINCT ablation, key FROM c)
SELECT p.ablation, p.arm_a, p.arm_b, k.key, x.value_json AS value_a, y.value_json AS value_b
FROM pairs p JOIN keys k ON k.ablation = p.ablation
LEFT JOIN c x ON x.ablation = p.ablation AND x.arm = p.arm_a AND x.key = k.key
LEFT JOIN c y ON y.ablation = p.ablation AND y.arm = p.arm_b AND y.key = k.key
WHERE x.value_json IS DISTINCT FROM y.value_json;

CREATE OR REPLACE VIEW run_facts AS
SELECT r.ablation, r.arm, r.seed, r.stage, r.run_id, f.name, f.value_json
FROM runs r JOIN facts f ON f.run_id = r.run_id;
"""

TABLES = ("runs", "artifacts", "edges", "facts")
def sql_literal(value: str | None) -> str:
    """A string as a SQL literal (for evidence queries meant to be re-run as printed, and generated views)."""
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


LOCK_WAIT_S = 30.0
_PID = re.compile(r"PID (\d+)")
_process_lock = threading.RLock()  # threads of the flow process take turns on the one connection


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


@dataclass
class Run:
    """One stage run as a row of `runs`: run_id hashes what defines the run, config is the stage's config slice,
    status is running, completed or failed."""

    run_id: str
    ablation: str
    arm: str
    stage: str
    seed: int | None
    config: dict[str, Any]
    config_hash: str
    code_version: str
    status: str = "running"
    started_at: datetime | None = None
    ended_at: datetime | None = None
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None


@dataclass
class StageRecord:
    """Everything one stage run contributes to lineage; recording it twice changes nothing."""

    run: Run
    inputs: list[tuple[Artifact, str]] = field(default_factory=list)
    outputs: list[tuple[Artifact, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


class Lineage:
    """The DuckDB lineage database at `path`, opened per transaction; a locked file is retried for `wait_s` seconds."""

    def __init__(self, path: Path, wait_s: float = LOCK_WAIT_S):
        self.path = Path(path)
        self.wait_s = wait_s

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for the block, retried with backoff (50 ms doubling to 1 s) while another process holds the file
        lock. Raises TwinarmError (read_only and no database yet), LockedError (still locked after wait_s seconds)."""
        if read_only and not self.path.exists():
            raise TwinarmError(f"{self.path}: no lineage yet (run an ablation first, or set TWINARM_HOME)")
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        with _process_lock:
            while True:
                try:
                    con = duckdb.connect(str(self.path), read_only=read_only)
                    break
                except duckdb.IOException as exc:
                    if "lock" not in str(exc).lower():
                        raise
                    if time.monotonic() > deadline:
                        pid = _PID.search(str(exc))
                        who = f"process {pid.group(1)}" if pid else "another process"
                        raise LockedError(
                            f"{self.path} is locked by {who} (a running flow, the only writer, holds it while it "
                            f"records a stage). Waited {self.wait_s:.0f}s; try again when it finishes.") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
            try:
                yield con
            finally:
                con.close()

    def init(self) -> None:
        """Create the database file (and its folder) if missing, and the tables and views; safe to repeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute(SCHEMA)

    def record(self, rec: StageRecord) -> None:
        """Upsert a stage run with its edges and facts in one transaction."""
        r = rec.run
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(
                    """INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (run_id) DO UPDATE SET
                         flow_run_id = coalesce(excluded.flow_run_id, runs.flow_run_id),
                         status = excluded.status,
                         started_at = coalesce(runs.started_at, excluded.started_at),
                         ended_at = coalesce(excluded.ended_at, runs.ended_at),
                         mlflow_run_id = coalesce(excluded.mlflow_run_id, runs.mlflow_run_id)""",
                    [r.run_id, r.flow_run_id, r.ablation, r.arm, r.stage, r.seed, json.dumps(r.config, sort_keys=True),
                     r.config_hash, r.code_version, r.status, r.started_at or utcnow(), r.ended_at,
                     r.mlflow_run_id])
                for art, role in rec.inputs:
                    self._artifact(con, art)
                    self._edge(con, r.run_id, art.artifact_id, "in", role)
                for art, role in rec.outputs:
                    self._artifact(con, art)
                    self._edge(con, r.run_id, art.artifact_id, "out", role)
                for name, value in rec.facts.items():
                    con.execute("INSERT INTO facts VALUES (?, ?, ?) ON CONFLICT (run_id, name) DO UPDATE SET "
                                "value_json = excluded.value_json",
                                [r.run_id, name, json.dumps(value, sort_keys=True, default=str)])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def refresh_result_view(self, view: str, stage: str, role: str) -> None:
        """(Re)create the view `view` (e.g. heldout_rows) over the result table that every completed run of `stage`
        wrote under output role `role` (one row per problem × sample, see evals.evaluate), with the run's ablation,
        run id and flow run id as columns. A nightly run re-reads checkpoints an ablation job read: filter by run
        or flow. Which stages have a view is declared by the stage (tasks/common.py Stage.result_view)."""
        with self.connect() as con:
            found = con.execute(
                "SELECT r.ablation, r.run_id, r.flow_run_id, a.uri FROM runs r JOIN edges e ON e.run_id = r.run_id "
                "AND e.direction = 'out' AND e.role = ? JOIN artifacts a ON a.artifact_id = e.artifact_id "
                "WHERE r.stage = ? AND r.status = 'completed' ORDER BY r.ablation, r.started_at",
                [role, stage]).fetchall()
            if found:
                con.execute(f"CREATE OR REPLACE VIEW {view} AS " + " UNION ALL BY NAME ".join(
                    f"SELECT {sql_literal(ablation)} AS ablation, {sql_literal(run_id)} AS run_id, "
                    f"{sql_literal(flow_run_id)} AS flow_run_id, * "
                    f"FROM read_parquet({sql_literal(str(uri_path(uri)))})"
                    for ablation, run_id, flow_run_id, uri in found))

    def set_status(self, run_id: str, status: str, ended: bool = True) -> None:
        """Set a run's status and, when `ended`, its ended_at to now (UTC)."""
        with self.connect() as con:
            con.execute("UPDATE runs SET status = ?, ended_at = CASE WHEN ? THEN ? ELSE ended_at END "
                        "WHERE run_id = ?", [status, ended, utcnow(), run_id])

    @staticmethod
    def _artifact(con: duckdb.DuckDBPyConnection, a: Artifact) -> None:
        con.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (artifact_id) DO NOTHING",
                    [a.artifact_id, a.kind, a.uri, a.bytes, a.rows, utcnow(),
                     json.dumps(a.facets, sort_keys=True, default=str)])

    @staticmethod
    def _edge(con: duckdb.DuckDBPyConnection, run_id: str, artifact_id: str, direction: str, role: str) -> None:
        con.execute("INSERT INTO edges VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [run_id, artifact_id, direction, role])

    def query(self, sql: str, params: list | None = None, read_only: bool = True) -> tuple[list[str], list[tuple]]:
        """Run one SQL statement: (column names, row tuples), both empty for a statement without a result. Raises
        TwinarmError with the first line of DuckDB's message when the SQL fails."""
        with self.connect(read_only=read_only) as con:
            try:
                cur = con.execute(sql, params or [])
            except duckdb.Error as exc:
                raise TwinarmError(f"lineage query failed: {str(exc).splitlines()[0]}") from None
            columns = [d[0] for d in cur.description] if cur.description else []
            return columns, cur.fetchall() if cur.description else []

    def rows(self, sql: str, params: list | None = None) -> list[dict[str, Any]]:
        """A read-only query's rows as {column: value} dicts."""
        columns, rows = self.query(sql, params)
        return [dict(zip(columns, row)) for row in rows]

    def output_ids(self, ablation: str | None = None) -> dict[str, str]:
        """{"stage/arm/seed/role": artifact id} of every recorded output (of one ablation): two homes that ran
        the same spec must agree on all of them."""
        rows = self.rows("SELECT stage, arm, seed, role, artifact_id FROM run_outputs"
                         + (" WHERE ablation = ?" if ablation else ""), [ablation] if ablation else None)
        return {f"{r['stage']}/{r['arm']}/{r['seed']}/{r['role']}": r["artifact_id"] for r in rows}

    def counts(self) -> dict[str, int]:
        """Row counts of the tables runs, artifacts, edges and facts."""
        return {t: self.query(f"SELECT count(*) FROM {t}")[1][0][0] for t in TABLES}

    def facts_of(self, run_id: str) -> dict[str, Any]:
        """A run's facts as {name: value} (decoded JSON); empty when it has none."""
        return {r["name"]: json.loads(r["value_json"])
                for r in self.rows("SELECT name, value_json FROM facts WHERE run_id = ?", [run_id])}
