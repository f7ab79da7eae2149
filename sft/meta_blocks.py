"""The form of the meta blocks an SFT arm trains on (`sft.meta_blocks`), applied to the META side of the twins in
the sft stage; the no-meta twin has no blocks, so a form never changes it (the spec refuses a form other than
`as_written` with `sft.strip_meta`).

Each form is one entry of META_BLOCK_FORMS: rows -> (rows, facts). `as_written` leaves the rows as the data source
wrote them; `tool` rewrites each recomputing check into a call of the environment's calculator and checks every
step line with one (worlds.arith.tool_form_rows: 'check 44-7<|calc|>=37<|/calc|>, not 36, redo'; the loss mask
leaves the environment's values untrained), the positive control of issue 14; it needs `tool: arith_check` at
generation time.
"""
from __future__ import annotations

from typing import Any, Callable

Rows = list[dict[str, Any]]


def _as_written(rows: Rows, where: str) -> tuple[Rows, dict[str, Any]]:
    return rows, {}


def _tool(rows: Rows, where: str) -> tuple[Rows, dict[str, Any]]:
    from worlds.arith import tool_form_rows

    out, calls = tool_form_rows(rows, where)
    return out, {"tool_calls_written": calls}


META_BLOCK_FORMS: dict[str, Callable[[Rows, str], tuple[Rows, dict[str, Any]]]] = {
    "as_written": _as_written,
    "tool": _tool,
}


def meta_block_form(rows: Rows, form: str, where: str = "sft rows") -> tuple[Rows, dict[str, Any]]:
    """(rows with their meta blocks in `form`, facts of the transform: form, and e.g. blocks converted). Raises
    ValueError for an unknown form; DataError (from the form) for rows it cannot handle, naming the row."""
    if form not in META_BLOCK_FORMS:
        raise ValueError(f"sft.meta_blocks: unknown form {form!r}; expected one of {', '.join(META_BLOCK_FORMS)}")
    out, facts = META_BLOCK_FORMS[form](rows, where)
    return out, {"meta_blocks": form, **facts}
