"""report.md: the report as Markdown, for a repository or a pull request.

The same content as ``index.html``: the findings (``story``), the shared tables (``tables``), the notes, and each
figure with its caption, linked relative to the report folder.
"""

from __future__ import annotations

from collections.abc import Sequence

from bnaudit.report import escape, story
from bnaudit.report.model import SECTIONS, FigureInfo, Report
from bnaudit.report.tables import Table, class_table, environment_table, header_facts, key_table, pair_table


def _cell(text: str) -> str:
    return escape.markdown(text, cell=True)


def _item(text: str) -> str:
    """A list item's text (it opens the item: a leading ``#`` or ``1.`` would start a block)."""
    return escape.markdown(text, block_start=True)


def md_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(report: Report, figs: Sequence[FigureInfo]) -> str:
    """The whole report as Markdown; figures are linked relative to the report folder."""
    out = ["# bnaudit report", ""]
    out += [f"- **{k}**: {escape.markdown(v)}" for k, v in header_facts(report)]
    out += ["", "## Findings", ""] + [f"- {_item(s)}" for s in story.sentences(report)]
    out += ["", "## Environment", "", md_table(environment_table(report)), ""]
    out += ["## Runs", "", md_table(key_table(report)), ""]
    if report.pairs:
        out += ["## Pairs compared", "", md_table(pair_table(report)), ""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {_item(n)}" for n in report.notes] + [""]
    for key, title in SECTIONS.items():
        section = [f for f in figs if f.section == key]
        if key == "matrix":
            out += [f"## {title}", "", md_table(class_table(report)), ""]
            if report.findings:
                out += ["Findings of the matrix (its summary.json):", ""]
                out += [f"- {_item(f)}" for f in report.findings] + [""]
        elif not section:
            continue
        else:
            out += [f"## {title}", ""]
        for f in section:
            out += [f"### {escape.markdown(f.title)}", "", f"![{escape.markdown(f.title, link=True)}]({f.path})", "",
                    f"*{escape.markdown(f.caption)}*", ""]
    return "\n".join(out).rstrip() + "\n"
