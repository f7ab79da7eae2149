"""Rendering of the report: a small document model (headings, paragraphs, tables, figures, code, foldable details)
and its two renderings, one standalone HTML page (figures embedded) and its Markdown twin (figures beside it).
Plain functions of the blocks; what the report says is assembled in audit.report."""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


# ---------------------------------------------------------------- document model

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    cls: str = ""  # an HTML class: "note", "bad", "good"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Code:
    text: str
    lang: str = "sql"


@dataclass
class Details:
    summary: str
    blocks: list["Block"] = field(default_factory=list)


Block = Union[Heading, Para, Table, Figure, Code, Details]


# ---------------------------------------------------------------- formatting (fractions shown as percent)

def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal (0.1234 -> "12.3%"); None -> "—"."""
    return "—" if x is None else f"{100 * x:.1f}%"


def ci(lo: float | None, hi: float | None) -> str:
    """An interval of fractions in percent (points): "[lo, hi]"; "—" when either end is None."""
    return "—" if lo is None or hi is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def pp(x: float | None) -> str:
    """A difference of fractions in signed percentage points (0.012 -> "+1.2 pp"); None -> "—"."""
    return "—" if x is None else f"{100 * x:+.1f} pp"


def num(x: float | None, digits: int = 3) -> str:
    """A plain number with `digits` decimals; None -> "—"."""
    return "—" if x is None else f"{x:.{digits}f}"


def value_text(value: Any, limit: int = 400) -> str:
    """A value as text (JSON for non-strings), cut at `limit` characters with " …"."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + " …"


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 28px;color:#1d2330;max-width:1200px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:14px 0 6px;border-bottom:1px solid #dde}
h3{font-size:14px;margin:12px 0 4px}p{margin:4px 0}
table{border-collapse:collapse;margin:4px 0 8px;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d6d9e0;padding:2px 7px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f1f3f7}img{max-width:100%}
caption{caption-side:bottom;text-align:left;color:#667;font-size:12px;padding-top:2px}
.note{color:#667;font-size:12px}.bad{color:#b3261e;font-weight:600}.good{color:#1e7b34;font-weight:600}
.s-ok{color:#1e7b34;font-weight:700}.s-bad{color:#b3261e;font-weight:700}.s-open{color:#8a6d00;font-weight:700}
pre{background:#f6f7f9;padding:6px;white-space:pre-wrap;font-size:12px;margin:2px 0}
figure{margin:6px 0}figcaption{color:#667;font-size:12px}summary{cursor:pointer}
"""
_STATUS_CLASS = {"✓": "s-ok", "✗": "s-bad", "☐": "s-open"}


def _cell(text: str, tag: str) -> str:
    cls = _STATUS_CLASS.get(text)
    return f"<{tag}{f' class={cls}' if cls else ''}>{html.escape(text)}</{tag}>"


def block_html(b: Block) -> str:
    """One block as HTML; figures are embedded as base64 PNG so the page stands alone (reads the PNG file)."""
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p{f' class={b.cls}' if b.cls else ''}>{html.escape(b.text)}</p>"
    if isinstance(b, Table):
        head = "".join(_cell(c, "th") for c in b.columns) if any(b.columns) else ""
        body = "".join("<tr>" + "".join(_cell(c, "td") for c in row) + "</tr>" for row in b.rows)
        caption = f"<caption>{html.escape(b.caption)}</caption>" if b.caption else ""
        return f"<table>{caption}{f'<tr>{head}</tr>' if head else ''}{body}</table>"
    if isinstance(b, Figure):  # embedded, so the page stands alone (MLflow's artifact viewer, a copied file)
        data = base64.b64encode(b.path.read_bytes()).decode()
        return (f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    if isinstance(b, Code):
        return f"<pre>{html.escape(b.text)}</pre>"
    return (f"<details><summary>{html.escape(b.summary)}</summary>" + "".join(block_html(x) for x in b.blocks)
            + "</details>")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def block_md(b: Block) -> str:
    """One block as Markdown; figures are linked by file name (the PNG lies beside the Markdown file)."""
    if isinstance(b, Heading):
        return f"{'#' * b.level} {b.text}"
    if isinstance(b, Para):
        return b.text
    if isinstance(b, Table):
        lines = ["| " + " | ".join(_md_cell(c) for c in b.columns) + " |", "|" + "---|" * len(b.columns)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        return "\n".join(lines) + (f"\n\n*{b.caption}*" if b.caption else "")
    if isinstance(b, Figure):
        return f"![{b.caption}]({b.path.name})"
    if isinstance(b, Code):
        return f"```{b.lang}\n{b.text}\n```"
    return f"**{b.summary}**\n\n" + "\n\n".join(block_md(x) for x in b.blocks)


def render(title: str, subtitle: str, screen: list[Block], rest: list[Block]) -> tuple[str, str]:
    """(HTML page, Markdown text) of a document: the first screen's blocks, a rule, then the rest."""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=note>{html.escape(subtitle)}</p>"
            + "".join(block_html(b) for b in screen) + "<hr>" + "".join(block_html(b) for b in rest)
            + "</body></html>")
    md = f"# {title}\n\n*{subtitle}*\n\n" + "\n\n".join(block_md(b) for b in [*screen, *rest]) + "\n"
    return page, md


def walk(blocks: list[Block]) -> list[Block]:
    """Every block, the contents of Details included, in document order."""
    return [x for b in blocks for x in ([b, *walk(b.blocks)] if isinstance(b, Details) else [b])]
