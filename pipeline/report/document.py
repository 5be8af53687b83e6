"""A tiny document model rendered to Markdown and to self-contained HTML.

A report is a list of :class:`Section`; a section holds blocks (text, table,
figure). Later stages add sections without touching the renderers.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Text:
    markdown: str  # plain paragraphs; `code`, **bold** and [links](url) are rendered in HTML


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""
    floatfmt: str = "{:.4f}"
    formats: dict[str, str] = field(default_factory=dict)  # column -> format, overrides floatfmt

    def fmt(self, column: str) -> str:
        return self.formats.get(column, self.floatfmt)


@dataclass
class Figure:
    path: Path  # PNG on disk inside the report folder
    caption: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)


def _fmt(value, floatfmt: str) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else floatfmt.format(value)
    return "" if value is None else str(value)


def _md_table(t: Table) -> str:
    df = t.frame
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, t.fmt(c)).replace("|", "\\|") for c, v in zip(cols, row)) + " |")
    out = "\n".join(lines)
    return f"{out}\n\n*{t.caption}*" if t.caption else out


def to_markdown(title: str, sections: list[Section], root: Path) -> str:
    parts = [f"# {title}"]
    for sec in sections:
        parts.append(f"## {sec.title}")
        for b in sec.blocks:
            if isinstance(b, Text):
                parts.append(b.markdown)
            elif isinstance(b, Table):
                parts.append(_md_table(b))
            elif isinstance(b, Figure):
                rel = b.path.resolve().relative_to(root)
                parts.append(f"![{b.caption}]({rel.as_posix()})\n\n*{b.caption}*")
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)


def _html_text(md: str) -> str:
    out = []
    for para in md.strip().split("\n\n"):
        lines = para.splitlines()
        if all(line.lstrip().startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #333}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}caption{caption-side:bottom;font-style:italic;padding:.4em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-style:italic;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em}
"""


def to_html(title: str, sections: list[Section], root: Path) -> str:
    """One self-contained page: figures are embedded as base64 PNG."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        for b in sec.blocks:
            if isinstance(b, Text):
                parts.append(_html_text(b.markdown))
            elif isinstance(b, Table):
                shown = b.frame.copy()
                for col in shown.columns:
                    shown[col] = [_inline(_fmt(v, b.fmt(str(col)))) for v in shown[col]]
                body = shown.to_html(index=False, border=0, na_rep="", escape=False)
                if b.caption:
                    body = body.replace(">\n  <thead>", f">\n<caption>{html.escape(b.caption)}</caption>\n  <thead>", 1)
                parts.append(body)
            elif isinstance(b, Figure):
                path = b.path
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b.caption)}'>"
                             f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
