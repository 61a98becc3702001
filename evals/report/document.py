"""The report as a small document (sections of paragraphs, tables and figures) and its two renderings.

Both renderers read the same document, so the Markdown and the HTML always say the same thing, and escaping
happens here alone. Nothing in this module knows about models or metrics."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

MISSING = "—"


@dataclass
class DocTable:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class DocFigure:
    path: Path  # the PNG under out_dir/plots
    caption: str


Block = str | DocTable | DocFigure  # a str is a paragraph; `backticks` mark code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


def _numeric_columns(table: DocTable) -> list[bool]:
    """Columns whose filled cells all start like a number: right-aligned, so digits line up."""

    def numeric(cell: str) -> bool:
        return cell == MISSING or cell[:1].isdigit() or (cell[:1] in "+-" and cell[1:2].isdigit())

    return [i > 0 and all(numeric(row[i]) for row in table.rows) for i in range(len(table.columns))]


# --- Markdown ------------------------------------------------------------------------------------------------


def _md_text(text: str) -> str:
    # Data-borne text (subject names, quantization configs) must not become Markdown/HTML markup.
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _md_paragraph(text: str) -> str:
    parts = text.split("`")
    return "`".join(p if i % 2 else _md_text(p) for i, p in enumerate(parts))


def render_markdown(title: str, sections: list[Section], out_dir: Path) -> str:
    lines = [f"# {_md_text(title)}", ""]
    for section in sections:
        lines += [f"{'#' * section.level} {_md_text(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, DocTable):
                lines.append("| " + " | ".join(_md_text(c) for c in block.columns) + " |")
                lines.append("|" + "|".join("---:" if num else "---" for num in _numeric_columns(block)) + "|")
                lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in block.rows]
                if block.caption:
                    lines += ["", f"*{_md_text(block.caption)}*"]
            elif isinstance(block, DocFigure):
                lines.append(f"![{_md_text(block.caption)}]({block.path.relative_to(out_dir).as_posix()})")
            else:
                lines.append(_md_paragraph(block))
            lines.append("")
    return "\n".join(lines)


# --- HTML: one self-contained file (inline CSS, plots as base64 PNG) -------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;white-space:nowrap}
th{background:#f0f0f0;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}caption{caption-side:bottom;font-size:.85em;color:#555;text-align:left}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}
"""


def _html_paragraph(text: str) -> str:
    parts = text.split("`")
    out = "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))
    # **bold** is the only other markup the sections use.
    bold = out.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(bold))


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        for block in section.blocks:
            if isinstance(block, DocTable):
                caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
                align = [' class="num"' if num else "" for num in _numeric_columns(block)]
                head = "".join(f"<th{a}>{html.escape(c)}</th>" for a, c in zip(align, block.columns, strict=True))
                rows = "".join(
                    "<tr>" + "".join(f"<td{a}>{html.escape(c)}</td>" for a, c in zip(align, row, strict=True)) + "</tr>"
                    for row in block.rows
                )
                body.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(block, DocFigure):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                alt = html.escape(block.caption)
                body.append(
                    f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{alt}</figcaption></figure>"
                )
            else:
                body.append(f"<p>{_html_paragraph(block)}</p>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
