"""The form of the meta blocks an SFT arm trains on (`sft.meta_blocks`), applied to the META side of the twins in
the sft stage; the no-meta twin has no blocks, so a form never changes it (the spec refuses a form other than
`as_written` with `sft.strip_meta`). The placebo forms change only the text between the tags or where a block
stands, never the text outside the blocks, so the stripped twin of a placebo row is the stripped twin of the
original row. Which placebo reads null, measured: docs/method-cards.md, placebo card.

Each form is one entry of META_BLOCK_FORMS: (rows, where, seed) -> (rows, facts).
- `as_written`: the rows as the data source wrote them (the default).
- `fixed` (placebo): every block's content is one constant, NEUTRAL_CONTENT: no digit, no cue word of
  meta.grammar.CUES, no confidence, no decision, about the mean token length of the arith world's block contents
  (32 tokens under the demo tokenizer; SFT-1 blocks average 32.3, SFT-2 37.1). It carries no information about
  the problem by construction, and keeps the positions and the length the model spends on a block.
- `empty` (placebo): every block keeps its place with no content.
- `line_end` (placebo): every block, emptied, moves to the end of the line it opened (before the line break).
- `response_end` (placebo): every block, emptied, moves to the end of the response, after the answer: the
  solution the model learns is token for token the stripped twin's, so the expected effect is 0 by construction
  (the placebo of configs/sensitivity.yaml and configs/ladder.yaml). Blocks in the wrong prefix stay there,
  emptied, for both relocating forms (the prefix is context, and must stay a prefix).
- `shuffled` (placebo): block contents permuted across rows with a seeded RNG, each block receiving the content of
  a block of ANOTHER row (row order shuffled, then contents rotated by the largest per-row block count). Same
  content distribution as written, no information about the row it sits in.

Only the final message (the trained response) and its `wrong_prefix` are changed; blocks elsewhere in a row are
context the model reads and stay as written. Placebo content is trained like any block content (sft.masks): the
point is a model that writes blocks that carry nothing.

Adding a form is one entry here, one value in the Literal of infra.spec.SFTSpec.meta_blocks and one in
infra.spec._VALUE_MECHANISMS (tests/test_meta_blocks.py keeps the three equal).
"""
from __future__ import annotations

import random
from typing import Any, Callable

from infra.errors import DataError
from meta.grammar import META_CLOSE, META_OPEN, MetaBlock, find_blocks

Row = dict[str, Any]
Rows = list[Row]
NEUTRAL_CONTENT = "nothing to note at this point, carrying on as planned"


def _replace_contents(text: str, contents: list[str]) -> str:
    """`text` with the content of its closed blocks replaced, in order, by `contents` (one per block)."""
    out, last = [], 0
    for block, content in zip(find_blocks(text, META_OPEN, META_CLOSE), contents):
        out += [text[last:block.content_start], content]
        last = block.content_end
    return "".join(out) + text[last:]


def _blocks_beside_prefix(row: Row, where: str) -> list[MetaBlock]:
    """The blocks of the row's response; raises DataError for one that straddles the end of its wrong prefix."""
    blocks = find_blocks(row["messages"][-1]["content"], META_OPEN, META_CLOSE)
    end = len(row.get("wrong_prefix") or "")
    if any(b.start < end < b.end for b in blocks):
        raise DataError(f"{where}: row id {row.get('id')!r}: a meta block straddles the end of wrong_prefix; "
                        f"a block must lie wholly inside or after the wrong prefix")
    return blocks


def _paired_tags(row: Row, form: str, where: str) -> None:
    """Raises DataError when the row's response holds a meta tag outside a closed, un-nested block (an unclosed or
    doubled open tag, a stray close, a nested block): a form rewrites closed blocks only, so such a tag and the
    text after it would stay as written (a placebo that still carries the row's meta content)."""
    text = row["messages"][-1]["content"]
    tags = text.count(META_OPEN) + text.count(META_CLOSE)
    blocks = len(find_blocks(text, META_OPEN, META_CLOSE))
    if tags != 2 * blocks:
        raise DataError(f"{where}: row id {row.get('id')!r}: field 'messages[-1].content': {tags} meta tags make "
                        f"{blocks} closed block(s); expected every tag in a closed, un-nested block (an unclosed, "
                        f"doubled or stray tag would keep its text as written under sft.meta_blocks '{form}')")


def _with_contents(row: Row, contents: list[str], where: str) -> Row:
    """The row with its response's block contents replaced; the wrong prefix (a prefix of the response) gets the
    same contents for the blocks it holds. Raises DataError for a block that straddles the wrong prefix's end."""
    response = row["messages"][-1]["content"]
    new = _replace_contents(response, contents)
    wp = row.get("wrong_prefix")
    if wp:
        blocks = _blocks_beside_prefix(row, where)
        wp = _replace_contents(wp, contents[:sum(b.end <= len(wp) for b in blocks)])
    return {**row, "messages": [*row["messages"][:-1], {**row["messages"][-1], "content": new}], "wrong_prefix": wp}


def _moved(text: str, prefix_len: int, content: str, to_line_end: bool) -> str:
    """`text` with every closed block after the first `prefix_len` characters (the wrong prefix) moved, holding
    `content`, to the end of its line (before the next line break; `to_line_end`) or to the end of the text; blocks
    inside the prefix stay where they are, holding `content`. The text outside the blocks is unchanged."""
    pieces, anchors, last = [], [], 0
    for b in find_blocks(text, META_OPEN, META_CLOSE):
        pieces.append(text[last:b.start])
        if b.end <= prefix_len:
            pieces.append(META_OPEN + content + META_CLOSE)
        else:
            anchors.append(sum(map(len, pieces)))
        last = b.end
    out = "".join(pieces) + text[last:]
    ends = [out.find("\n", a) if to_line_end else -1 for a in anchors]
    for at in sorted((len(out) if e < 0 else e for e in ends), reverse=True):
        out = out[:at] + META_OPEN + content + META_CLOSE + out[at:]
    return out


def _relocated(to_line_end: bool) -> Callable[[Rows, str, int], tuple[Rows, dict[str, Any]]]:
    """The form in which every trained block is empty and moved to the end of its line (`to_line_end`) or of the
    response; see _moved. The wrong prefix stays a prefix: its blocks, emptied, stay in it. Raises DataError
    for a block that straddles the end of the wrong prefix."""
    def form(rows: Rows, where: str, seed: int) -> tuple[Rows, dict[str, Any]]:
        out, n = [], 0
        for r in rows:
            response, wp = r["messages"][-1]["content"], r.get("wrong_prefix") or ""
            blocks = _blocks_beside_prefix(r, where)
            new = _moved(response, len(wp), "", to_line_end)
            new_wp = _moved(wp, len(wp), "", to_line_end) if wp else r.get("wrong_prefix")
            out.append({**r, "messages": [*r["messages"][:-1], {**r["messages"][-1], "content": new}],
                        "wrong_prefix": new_wp})
            n += len(blocks)
        return out, {"placebo_blocks": n}
    return form


def _as_written(rows: Rows, where: str, seed: int) -> tuple[Rows, dict[str, Any]]:
    return rows, {}


def _constant(content: str) -> Callable[[Rows, str, int], tuple[Rows, dict[str, Any]]]:
    """The form in which every block of every response holds `content`."""
    def form(rows: Rows, where: str, seed: int) -> tuple[Rows, dict[str, Any]]:
        out = [_with_contents(r, [content] * len(find_blocks(r["messages"][-1]["content"])), where) for r in rows]
        return out, {"placebo_blocks": sum(len(find_blocks(r["messages"][-1]["content"])) for r in rows)}
    return form


def _shuffled(rows: Rows, where: str, seed: int) -> tuple[Rows, dict[str, Any]]:
    """Block contents permuted across rows: rows with blocks in a random order (seeded), every block content moved
    forward by m places in that order (m: the largest block count of one row), so no block keeps a content of its
    own row. Raises DataError when the rows hold too few blocks for that (fewer than 2·m)."""
    counts = [len(find_blocks(r["messages"][-1]["content"])) for r in rows]
    order = [i for i, c in enumerate(counts) if c]
    random.Random(f"meta_blocks/shuffled/{seed}").shuffle(order)
    pool = [b.content for i in order for b in find_blocks(rows[i]["messages"][-1]["content"])]
    m = max(counts, default=0)
    if m and len(pool) < 2 * m:
        raise DataError(f"{where}: sft.meta_blocks 'shuffled' needs at least {2 * m} blocks across rows to give "
                        f"every block another row's content (found {len(pool)})")
    moved = pool[m:] + pool[:m]
    out, at = list(rows), 0
    for i in order:
        out[i] = _with_contents(rows[i], moved[at:at + counts[i]], where)
        at += counts[i]
    return out, {"placebo_blocks": len(pool)}


def _tool(rows: Rows, where: str, seed: int) -> tuple[Rows, dict[str, Any]]:
    from worlds.arith import tool_form_rows

    out, calls = tool_form_rows(rows, where)
    return out, {"tool_calls_written": calls}


META_BLOCK_FORMS: dict[str, Callable[[Rows, str, int], tuple[Rows, dict[str, Any]]]] = {
    "as_written": _as_written,
    "fixed": _constant(NEUTRAL_CONTENT),
    "empty": _constant(""),
    "line_end": _relocated(to_line_end=True),
    "response_end": _relocated(to_line_end=False),
    "shuffled": _shuffled,
    "tool": _tool,
}


def meta_block_form(rows: Rows, form: str, where: str = "sft rows", seed: int = 0) -> tuple[Rows, dict[str, Any]]:
    """(rows with their meta blocks in `form`, facts of the transform: form, and e.g. blocks changed). `seed` seeds a
    random form (the arm's seed, so each seed draws its own placebo). Rows keep their order and ids. Raises
    ValueError for an unknown form; DataError for rows a form cannot handle (a tag outside a closed, un-nested
    block; a block straddling the wrong prefix's end), naming `where` and the row id."""
    if form not in META_BLOCK_FORMS:
        raise ValueError(f"sft.meta_blocks: unknown form {form!r}; expected one of {', '.join(META_BLOCK_FORMS)}")
    if form != "as_written":
        for r in rows:
            _paired_tags(r, form, where)
    out, facts = META_BLOCK_FORMS[form](rows, where, seed)
    return out, {"meta_blocks": form, **facts}
