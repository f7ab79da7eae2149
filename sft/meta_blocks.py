"""What the meta side's block contents are (`sft.meta_blocks`), applied by the SFT stage to the meta twin's rows
before training. The tags and positions of every block stay; only the text between the tags may change, so the
stripped twin of a transformed row is the stripped twin of the original row (the control arm is unchanged).

- `as_written`: the rows as the data stage wrote them (the default).
- `fixed` (placebo): every block's content is one constant, NEUTRAL_CONTENT: no digit, no cue word of
  meta.grammar.CUES, no confidence, no decision, about the mean token length of the arith world's block contents
  (32 tokens under the demo tokenizer; SFT-1 blocks average 32.3, SFT-2 37.1). It carries no information about
  the problem by construction, and keeps the positions and the length the model spends on a block.
- `shuffled` (placebo): block contents permuted across rows with a seeded RNG, each block receiving the content of
  a block of ANOTHER row (row order shuffled, then contents rotated by the largest per-row block count). Same
  content distribution as written, no information about the row it sits in.

Only the final message (the trained response) and its `wrong_prefix` are changed; blocks elsewhere in a row are
context the model reads and stay as written. Placebo content is trained like any block content (sft.masks): the
point is a model that writes blocks that carry nothing.

Adding a value is one line in META_BLOCKS here and one in infra.spec.MetaBlocks (a test keeps them equal).
"""
from __future__ import annotations

import random
from typing import Any, Callable

from infra.errors import DataError
from meta.grammar import META_CLOSE, META_OPEN, find_blocks

Row = dict[str, Any]
NEUTRAL_CONTENT = "nothing to note at this point, carrying on as planned"


def _replace_contents(text: str, contents: list[str]) -> str:
    """`text` with the content of its closed blocks replaced, in order, by `contents` (one per block)."""
    out, last = [], 0
    for block, content in zip(find_blocks(text, META_OPEN, META_CLOSE), contents):
        out += [text[last:block.content_start], content]
        last = block.content_end
    return "".join(out) + text[last:]


def _with_contents(row: Row, contents: list[str], where: str) -> Row:
    """The row with its response's block contents replaced; the wrong prefix (a prefix of the response) gets the
    same contents for the blocks it holds. Raises DataError for a block that straddles the wrong prefix's end."""
    response = row["messages"][-1]["content"]
    new = _replace_contents(response, contents)
    wp = row.get("wrong_prefix")
    if wp:
        blocks = find_blocks(response, META_OPEN, META_CLOSE)
        if any(b.start < len(wp) < b.end for b in blocks):
            raise DataError(f"{where}: row id {row.get('id')!r}: a meta block straddles the end of wrong_prefix; "
                            f"a block must lie wholly inside or after the wrong prefix")
        wp = _replace_contents(wp, contents[:sum(b.end <= len(wp) for b in blocks)])
    return {**row, "messages": [*row["messages"][:-1], {**row["messages"][-1], "content": new}], "wrong_prefix": wp}


def as_written(rows: list[Row], rng: random.Random, where: str) -> list[Row]:
    """The rows unchanged."""
    return rows


def fixed(rows: list[Row], rng: random.Random, where: str) -> list[Row]:
    """Every block of every response holds NEUTRAL_CONTENT."""
    return [_with_contents(r, [NEUTRAL_CONTENT] * len(find_blocks(r["messages"][-1]["content"])), where)
            for r in rows]


def shuffled(rows: list[Row], rng: random.Random, where: str) -> list[Row]:
    """Block contents permuted across rows: rows with blocks in a random order, every block content moved forward
    by m places in that order (m: the largest block count of one row), so no block keeps a content of its own row.
    Raises DataError when the rows hold too few blocks for that (fewer than 2·m)."""
    counts = [len(find_blocks(r["messages"][-1]["content"])) for r in rows]
    order = [i for i, c in enumerate(counts) if c]
    rng.shuffle(order)
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
    return out


META_BLOCKS: dict[str, Callable[[list[Row], random.Random, str], list[Row]]] = {
    "as_written": as_written,
    "fixed": fixed,
    "shuffled": shuffled,
}


def apply_meta_blocks(kind: str, rows: list[Row], seed: int, where: str = "sft rows") -> list[Row]:
    """The meta-side rows with their block contents as `kind` (a META_BLOCKS name) says; `seed` seeds the RNG of a
    random kind (the arm's seed, so each seed draws its own placebo). Rows keep their order and ids. Raises
    DataError naming `where` and the row id for rows a kind cannot transform."""
    return META_BLOCKS[kind](rows, random.Random(f"meta_blocks/{kind}/{seed}/{where}"), where)
