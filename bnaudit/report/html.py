"""index.html: the report as one page that opens from disk (no scripts, no network).

Figures are the PNG files beside it (``figures/``), referenced by relative paths, each
caption linking the figure's SVG, so the folder can be zipped, attached or served as it
is; every other byte (style, tables, captions) is inline.  A single-file report is the
same page with each figure inlined as a ``data:`` URI instead, and nothing linked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bnaudit._version import __version__
from bnaudit.report import escape, story
from bnaudit.report.model import SECTIONS, FigureInfo, Report
from bnaudit.report.tables import (
    Table,
    class_colour,
    class_table,
    environment_table,
    header_facts,
    key_table,
    pair_table,
)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1380px;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dl.facts dt { font-weight: bold; } dl.facts dd { margin: 0; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #333; max-width: 1100px; }
figcaption b { display: block; margin-bottom: 0.2em; }
.notes li { color: #6b4e00; }
ul.findings { font-size: 1.05em; } ul.findings li { margin: 0.3em 0; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em; vertical-align: middle; }
"""


def _table(table: Table, *, swatches: dict[str, str] | None = None) -> str:
    headers, rows = table
    head = "".join(f"<th>{escape.html(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = escape.html(cell)
            if swatches and i == 0 and cell in swatches:
                text = f'<span class="swatch" style="background:{swatches[cell]}"></span>{text}'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


SINGLE_FILE = "single-file report"
"""Ends the generator meta tag of a single-file report: what marks a file ``report --force`` may replace."""


def generator(single_file: bool) -> str:
    """The page's generator meta tag (the third line of the page)."""
    kind = f"; {SINGLE_FILE}" if single_file else ""
    return f'<meta name="generator" content="bnaudit {escape.html(__version__)}{kind}">'


def _figure(f: FigureInfo, src: str | None) -> str:
    """A figure: its PNG at its CSS size (``src``: a data: URI shown instead) and, in a folder, its SVG's link."""
    vector = "" if src is not None else f' <a href="{escape.html(f.svg)}">Vector version (SVG).</a>'
    return (f'<figure><img src="{escape.html(src or f.path)}" alt="{escape.html(f.title)}" width="{f.width}" '
            f'height="{f.height}" loading="eager"><figcaption><b>{escape.html(f.title)}</b>'
            f"{escape.html(f.caption)}{vector}</figcaption></figure>")


def render(report: Report, figs: Sequence[FigureInfo], *, inline: Mapping[str, str] | None = None) -> str:
    """The whole report as one HTML page; figures are linked relative to the report folder.

    ``inline``: each figure's path -> the data: URI shown in its place, for a single-file report.
    """
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', generator(inline is not None),
             f"<title>bnaudit report: {escape.html(report.spec.name)}</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>bnaudit report</h1>", '<dl class="facts">']
    parts += [f"<dt>{escape.html(k)}</dt><dd>{escape.html(v)}</dd>" for k, v in header_facts(report)]
    parts.append("</dl>")
    parts += ['<h2 id="findings">Findings</h2><ul class="findings">']
    parts += [f"<li>{escape.html(s)}</li>" for s in story.sentences(report)] + ["</ul>"]
    parts += ['<nav><ul>'] + [f'<li><a href="#{key}">{escape.html(title)}</a></li>'
                                for key, title in SECTIONS.items()] + ["</ul></nav>"]
    parts += ["<h2>Environment</h2>", _table(environment_table(report))]
    parts += ["<h2>Runs</h2>", _table(key_table(report))]
    if report.pairs:
        parts += ["<h2>Pairs compared</h2>", _table(pair_table(report))]
    if report.notes:
        parts += ['<h2>Notes</h2><ul class="notes">'] + [f"<li>{escape.html(n)}</li>" for n in report.notes]
        parts.append("</ul>")
    colours = {c.name: class_colour(report, c.name) for c in report.classes}
    for key, title in SECTIONS.items():
        section = [f for f in figs if f.section == key]
        parts.append(f'<h2 id="{key}">{escape.html(title)}</h2>')
        if key == "matrix":
            parts.append(_table(class_table(report), swatches=colours))
            if report.findings:
                parts.append("<p>Findings of the matrix (its summary.json):</p><ul>")
                parts += [f"<li>{escape.html(f)}</li>" for f in report.findings] + ["</ul>"]
        if not section and key != "matrix":
            parts.append("<p>Nothing to draw for these inputs (see Notes).</p>")
        parts += [_figure(f, None if inline is None else inline[f.path]) for f in section]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
