"""Our prompt rows (evals.suites.PROMPT_ROW_SCHEMA: id, prompt, answer, domain, level, source, suite) in verl's
RL parquet layout (verl.utils.dataset.rl_dataset.RLHFDataset; the layout of verl's examples/data_preprocess):

    data_source            str    our row's `source` (verl's reward_fn_key)
    prompt                 list   chat messages [{"role": "user", "content": <prompt>}] (verl applies the model's
                                  chat template, as the local executor's evals.engine.render_prompt does)
    ability                str    the row's domain
    reward_model           struct {"style": "rule", "ground_truth": <answer>}
    extra_info             struct {"id", "domain", "level", "split", "index"}

`write_verl_parquet` validates every row (a DataError names the file, the row and the field) and returns the
output's content hash, which the lineage records as the artifact of the verl-layout file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from infra.artifacts import write_parquet
from infra.errors import DataError
from infra.hashing import hash_file

REQUIRED = ("id", "prompt", "answer")


def verl_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("id", pa.string()), ("domain", pa.string()), ("level", pa.int64()),
                                  ("split", pa.string()), ("index", pa.int64())])),
    ])


def verl_rows(rows: Sequence[dict[str, Any]], split: str, where: str) -> list[dict[str, Any]]:
    """Prompt rows → verl rows. Raises DataError naming `where`, the row and the field that is missing or empty."""
    out = []
    for i, row in enumerate(rows):
        for field in REQUIRED:
            value = row.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{where}: row {i} (id {row.get('id')!r}): field '{field}': expected a non-empty "
                                f"string, got {value!r}")
        out.append({
            "data_source": str(row.get("source") or "twinarm"),
            "prompt": [{"role": "user", "content": str(row["prompt"])}],
            "ability": str(row.get("domain") or ""),
            "reward_model": {"style": "rule", "ground_truth": str(row["answer"])},
            "extra_info": {"id": str(row["id"]), "domain": row.get("domain"), "level": row.get("level"),
                           "split": split, "index": i},
        })
    return out


def write_verl_parquet(rows: Sequence[dict[str, Any]], path: Path, split: str, where: str) -> str:
    """Write the rows in verl's layout at `path` (atomic, deterministic bytes); returns its content hash."""
    write_parquet(verl_rows(rows, split, where), Path(path), schema=verl_schema())
    return hash_file(Path(path))
