"""The second law on a demo-shaped lineage built in seconds (real spec, real content-hashed files, no training):
the honest lineage is ✓, and every input planted to differ between the arms without a declared reason is ✗,
naming the stage, the role, both arms, both artifact ids and the first ancestor where the two diverge."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import duckdb
import pytest

from audit.checks import Scope, role_key, second_law
from infra.artifacts import Artifact, ArtifactStore, read_parquet, uri_path, write_parquet
from infra.lineage import Lineage
from lineage_builder import ARMS, FLOW, Builder, build


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Builder:
    return build(tmp_path_factory.mktemp("second-law"))


def law(db: Path) -> Any:
    return second_law(Scope(Lineage(db), "demo", FLOW, ARMS))


def planted(honest: Builder, tmp_path: Path, plant: Callable[[duckdb.DuckDBPyConnection, Builder, Path], None]
            ) -> Path:
    db = tmp_path / "lineage.duckdb"
    shutil.copyfile(honest.lineage.path, db)
    with duckdb.connect(str(db)) as con:
        plant(con, honest, tmp_path)
    return db


def edge(con: duckdb.DuckDBPyConnection, run_id: str, role: str) -> tuple[str, str]:
    (aid, uri), = con.execute("SELECT a.artifact_id, a.uri FROM edges e JOIN artifacts a USING (artifact_id) "
                              "WHERE e.run_id = ? AND e.role = ? AND e.direction = 'in'", [run_id, role]).fetchall()
    return aid, uri


def add_artifact(con: duckdb.DuckDBPyConnection, art: Artifact) -> None:
    con.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, now(), '{}') ON CONFLICT DO NOTHING",
                [art.artifact_id, art.kind, art.uri, art.bytes, art.rows])


def repoint_input(con: duckdb.DuckDBPyConnection, run_id: str, role: str, artifact_id: str) -> None:
    con.execute("UPDATE edges SET artifact_id = ? WHERE run_id = ? AND role = ? AND direction = 'in'",
                [artifact_id, run_id, role])


def reordered_copy(con: duckdb.DuckDBPyConnection, b: Builder, tmp: Path, run_id: str, role: str) -> Artifact:
    """The same rows as the run's input, in reverse order, stored content-addressed (so under a new id)."""
    _, uri = edge(con, run_id, role)
    rows = read_parquet(uri_path(uri))[::-1]
    write_parquet(rows, tmp / f"{role}-reordered.parquet")
    art = ArtifactStore(tmp / "store").put(tmp / f"{role}-reordered.parquet", kind="dataset", rows=len(rows))
    add_artifact(con, art)
    return art


def prompts_reordered(con, b, tmp) -> None:
    repoint_input(con, "rl-control-0", "prompts", reordered_copy(con, b, tmp, "rl-control-0", "prompts").artifact_id)


def prompts_reordered_by_a_data_run(con, b, tmp) -> None:
    """The reordered prompts written by a second data run with the same config and inputs (a rerun whose output
    changed): lineage names a producer, but nothing declared explains the other output."""
    art = reordered_copy(con, b, tmp, "rl-control-0", "prompts")
    con.execute("INSERT INTO runs SELECT 'data-rerun' AS run_id, * EXCLUDE (run_id) FROM runs WHERE run_id = 'data-*-None'")
    con.execute("INSERT INTO edges VALUES ('data-rerun', ?, 'out', 'rl_prompts')", [art.artifact_id])
    repoint_input(con, "rl-control-0", "prompts", art.artifact_id)


def val_is_heldout(con, b, tmp) -> None:
    suite, _ = edge(con, "heldout-*-None", "heldout:arith")
    repoint_input(con, "rl-control-0", "val", suite)


def other_val_in_sweep(con, b, tmp) -> None:
    repoint_input(con, "sweep-control-0", "val", reordered_copy(con, b, tmp, "sweep-control-0", "val").artifact_id)


def other_init(con, b, tmp) -> None:
    """Control's SFT starts from a base model (another tokenizer/vocabulary) trained with an undeclared config."""
    other = b.model("base-wide", "base weights, wider vocabulary")
    add_artifact(con, other)
    config = b.config("control", "base_model")
    config["model"] = {**config["model"], "vocab_size": 999}
    con.execute("INSERT INTO runs SELECT 'base-wide' AS run_id, flow_run_id, ablation, 'control' AS arm, stage, seed, "
                "? AS config_json, * EXCLUDE (run_id, flow_run_id, ablation, arm, stage, seed, config_json) "
                "FROM runs WHERE run_id = 'base_model-*-None'", [json.dumps(config)])
    con.execute("INSERT INTO edges SELECT 'base-wide', artifact_id, direction, role FROM edges "
                "WHERE run_id = 'base_model-*-None' AND direction = 'in'")
    con.execute("INSERT INTO edges VALUES ('base-wide', ?, 'out', 'model')", [other.artifact_id])
    repoint_input(con, "sft-control-0", "init", other.artifact_id)


def init_from_reordered_corpus(con, b, tmp) -> None:
    """Control's SFT starts from a base model trained with the same config on a reordered copy of the corpus."""
    corpus = reordered_copy(con, b, tmp, "base_model-*-None", "sft1")
    other = b.model("base-reordered", "base weights from another data order")
    add_artifact(con, other)
    con.execute("INSERT INTO runs SELECT 'base-reordered' AS run_id, * EXCLUDE (run_id) FROM runs "
                "WHERE run_id = 'base_model-*-None'")
    con.execute("INSERT INTO edges SELECT 'base-reordered', CASE WHEN role = 'sft1' THEN ? ELSE artifact_id END, "
                "direction, role FROM edges WHERE run_id = 'base_model-*-None' AND direction = 'in'",
                [corpus.artifact_id])
    con.execute("INSERT INTO edges VALUES ('base-reordered', ?, 'out', 'model')", [other.artifact_id])
    repoint_input(con, "sft-control-0", "init", other.artifact_id)


def heldout_suite_copy(con, b, tmp) -> None:
    """Control's checkpoints evaluated by a second held-out job on a reordered copy of the suite."""
    art = reordered_copy(con, b, tmp, "heldout-*-None", "heldout:arith")
    con.execute("INSERT INTO runs SELECT 'heldout-2' AS run_id, * EXCLUDE (run_id) FROM runs "
                "WHERE run_id = 'heldout-*-None'")
    con.execute("UPDATE edges SET run_id = 'heldout-2' WHERE run_id = 'heldout-*-None' "
                "AND role LIKE 'checkpoint:control:%'")
    con.execute("INSERT INTO edges VALUES ('heldout-2', ?, 'in', 'heldout:arith')", [art.artifact_id])


def twins_misaligned(con, b, tmp) -> None:
    """The twins stage's no-meta side replaced by a file whose rows are in another order."""
    art = reordered_copy(con, b, tmp, "sft-control-0", "sft1")
    con.execute("UPDATE edges SET artifact_id = ? WHERE run_id = 'twins-*-None' AND role = 'sft1_nometa'",
                [art.artifact_id])
    repoint_input(con, "sft-control-0", "sft1", art.artifact_id)


def sft_lr_undeclared(con, b, tmp) -> None:
    """Control's SFT ran with twice the learning rate, which no arm declares."""
    (config,), = con.execute("SELECT config_json FROM runs WHERE run_id = 'sft-control-0'").fetchall()
    config = json.loads(config)
    config["sft"]["lr"] = config["sft"]["lr"] * 2
    con.execute("UPDATE runs SET config_json = ? WHERE run_id = 'sft-control-0'", [json.dumps(config)])


PLANTS = {  # id: (plant, words the ✗ summary must hold)
    "prompts order (no producer)": (prompts_reordered, (
        "rl/seed0 `prompts`: control reads", "pmishift reads", "control's", "was made by no run in lineage")),
    "prompts order (data rerun)": (prompts_reordered_by_a_data_run, (
        "rl/seed0 `prompts`", "data runs data-rerun", "same config and inputs but different outputs")),
    "val is the held-out suite": (val_is_heldout, (
        "rl/seed0 `val`", "outputs `heldout:arith` and `val` of one data run")),
    "sweep val copy": (other_val_in_sweep, ("sweep/seed0 `val`", "made by no run")),
    "other init/tokenizer": (other_init, (
        "sft/seed0 `init`", "base_model runs base-wide (control) and base_model-*-None (*)",
        "undeclared config model.vocab_size")),
    "init from a reordered corpus": (init_from_reordered_corpus, (
        "sft/seed0 `init`", "first divergence at ancestors", "was made by no run in lineage")),
    "held-out suite copy": (heldout_suite_copy, ("heldout `heldout:arith`: control reads", "made by no run")),
    "twins misaligned": (twins_misaligned, ("sft/seed0 `sft1`", "not row-for-row twins: ids not aligned")),
    "undeclared sft lr": (sft_lr_undeclared, (
        "rl/seed0 `init`", "sft runs sft-control-0 (control/seed0) and sft-pmishift-0 (pmishift/seed0) differ in "
        "undeclared config sft.lr")),
}


def test_honest_lineage_is_verified_and_names_what_explained_each_difference(honest):
    check = law(honest.lineage.path)
    print(f"\n[honest] {check.status} {check.summary}")
    assert check.status == "✓", check.summary
    assert "sft.strip_meta" in check.summary and "rl.reward" in check.summary
    assert "twin side of sft1 (sft.strip_meta)" in check.summary
    assert all(e.query.startswith("SELECT") for e in check.evidence)


@pytest.mark.parametrize("plant", PLANTS)
def test_planted_input_difference_is_violated(honest, tmp_path, plant):
    fn, words = PLANTS[plant]
    check = law(planted(honest, tmp_path, fn))
    print(f"\n[{plant}] {check.status} {check.summary}")
    assert check.status == "✗", check.summary
    missing = [w for w in words if w not in check.summary]
    assert not missing, (missing, check.summary)


def test_a_divergence_is_named_once_at_the_first_input_it_reaches(honest, tmp_path):
    """Control's other base model reaches sft init, rl init (via SFT), sweep and held-out checkpoints: one finding."""
    check = law(planted(honest, tmp_path, other_init))
    assert check.summary.count("base-wide") == 1, check.summary


def test_a_checkpoint_saved_under_several_roles_is_compared_with_its_own_step(tmp_path):
    """pmishift's RL never moved: its step-3 and step-6 checkpoints are one artifact. With control's prompts
    reordered, the checkpoints differ for that reason only; no second finding from pairing step 3 with step 6."""
    stuck = build(tmp_path / "stuck", stuck="pmishift")
    assert law(stuck.lineage.path).status == "✓"
    check = law(planted(stuck, tmp_path, prompts_reordered))
    assert check.status == "✗" and check.summary.count(" reads ") == 2, check.summary


def test_unequal_seeds_are_left_to_the_seeds_check(tmp_path):
    b = build(tmp_path / "a", seeds=[0, 1])
    assert law(b.lineage.path).status == "✓"
    with duckdb.connect(str(b.lineage.path)) as con:  # pmishift lost its seed 1 runs
        con.execute("DELETE FROM runs WHERE arm = 'pmishift' AND seed = 1")
        con.execute("DELETE FROM edges WHERE role LIKE 'checkpoint:pmishift:1:%'")
    assert law(b.lineage.path).status == "✓"


def test_role_key_compares_like_with_like():
    assert role_key("checkpoint:control:0:6", "control") == role_key("checkpoint:pmishift:0:6", "pmishift")
    assert role_key("checkpoint:control:1:6", "control") != role_key("checkpoint:pmishift:0:6", "pmishift")
    assert role_key("prompts", "control") == "prompts"


def test_seeds_check_needs_the_same_two_or_more_seeds_in_every_arm(honest, tmp_path):
    from audit.checks import seeds_per_arm

    one = seeds_per_arm(Scope(honest.lineage, "demo", FLOW, ARMS))
    assert one.status == "☐" and "one seed per arm (0)" in one.summary
    b = build(tmp_path / "two", seeds=[0, 1])
    two = seeds_per_arm(Scope(b.lineage, "demo", FLOW, ARMS))
    assert two.status == "✓" and "seeds [0, 1] in every arm's rl, sft, sweep" in two.summary, two.summary
    with duckdb.connect(str(b.lineage.path)) as con:
        con.execute("DELETE FROM runs WHERE arm = 'pmishift' AND seed = 1 AND stage = 'rl'")
    unequal = seeds_per_arm(Scope(b.lineage, "demo", FLOW, ARMS))
    assert unequal.status == "✗" and "rl pmishift=[0]" in unequal.summary, unequal.summary
