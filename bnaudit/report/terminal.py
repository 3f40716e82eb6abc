"""`bnaudit report --terminal`: the key tables and a coarse divergence heatmap, for an SSH session."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnaudit import compare
from bnaudit.report import console as console_policy
from bnaudit.report import escape, story
from bnaudit.report.model import PairView, ReferenceView, Report
from bnaudit.report.tables import Table as RowsTable
from bnaudit.report.tables import class_table, key_table, pair_table

SHADES = " ░▒▓█"
COLUMNS = 60


def _rich_table(title: str, table: RowsTable) -> Table:
    headers, rows = table
    out = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))  # light: 80 columns
    for h in headers:
        out.add_column(h, overflow="fold")
    for row in rows:
        out.add_row(*(escape.terminal(cell) for cell in row))  # a str cell would be read as rich markup
    return out


TERMINAL_OMITS = ("configuration", "final train MSE", "min BN var / eps", "non-finite")
"""Runs-table columns the terminal leaves out to fit 80 columns (the HTML and Markdown keep them), unless
a run has something to say there (a non-finite value, say)."""


def _informative(table: RowsTable, column: int) -> bool:
    """Whether a column says anything but "none" or "-" (so that a non-finite run is never hidden)."""
    return column < len(table[0]) and table[0][column] == "non-finite" and any(
        row[column] not in ("none", "-") for row in table[1])


def _columns(table: RowsTable, names: Sequence[str]) -> RowsTable:
    """The named columns of a table (the terminal is narrower than a page)."""
    headers, rows = table
    keep = [i for i, h in enumerate(headers) if h in names]
    return [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]


def epoch_bins(n: int, columns: int = COLUMNS) -> list[np.ndarray]:
    """Row indices 0..n-1 in at most ``columns`` consecutive bins: one per row up to 10, log-spaced beyond.

    Runs part within a few epochs and then drift for hundreds, so a linear axis would
    squeeze the part where things happen into one character.
    """
    if n <= columns:
        return [np.array([i]) for i in range(n)]
    head = min(10, columns // 3)
    tail = np.unique(np.round(np.geomspace(head, n, columns - head + 1)).astype(np.int64))
    edges = np.unique(np.concatenate([np.arange(head), tail]))
    edges = edges[(edges >= 0) & (edges < n)]
    edges = np.append(edges, n)
    return [np.arange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def heatmap_lines(values: np.ndarray, rows: np.ndarray, layers: tuple[str, ...], lo: float, hi: float,
                  columns: int = COLUMNS) -> list[Text]:
    """Layer-by-epoch shading: each cell the largest value in its epoch bin, scaled from lo to hi.

    NaN cells (bit-identical) are a green dot; larger values are darker.  The last line is
    the epoch axis, with the epoch row at which 1, 10, 100, ... fall.
    """
    bins = epoch_bins(len(rows), columns)
    names = [escape.printable(layer) for layer in layers]
    width = max(len(name) for name in names)
    lines = []
    for j, name in enumerate(names):
        text = Text(f"{name:>{width}} ")
        for b in bins:
            cell = values[b, j]
            cell = cell[np.isfinite(cell)]
            if not cell.size:
                text.append("·", style="green")
                continue
            level = (float(cell.max()) - lo) / (hi - lo) if hi > lo else 1.0
            k = 1 + int(np.clip(level, 0, 1) * (len(SHADES) - 2) + 0.5)
            text.append(SHADES[min(k, len(SHADES) - 1)], style="magenta")
        lines.append(text)
    axis = [" "] * len(bins)
    for mark in (0, 10, 100, 1000, 10000):
        pos = next((i for i, b in enumerate(bins) if rows[b[0]] <= mark <= rows[b[-1]]), None)
        label = str(mark)
        if pos is not None and all(c == " " for c in axis[pos:pos + len(label) + 1]):
            axis[pos:pos + len(label)] = list(label)
    lines.append(Text(f"{'epoch':>{width}} " + "".join(axis)[:len(bins)], style="dim"))
    return lines


def _pair_heatmap(p: PairView) -> list[Text]:
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(p.max_abs > 0, np.log10(p.max_abs), np.nan)
    finite = logs[np.isfinite(logs)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    head = Text(f"{escape.printable(p.title)}\nlog10 max |Δ parameter|: ░ {lo:.1f} … █ {hi:.1f}, · identical",
                style="bold")
    return [head, *heatmap_lines(logs, p.rows, p.layers, lo, hi)]


def _reference_heatmap(label: str, ref: ReferenceView) -> list[Text]:
    lost = ref.precision - ref.correct_bits  # darker = more bits lost
    head = Text(f"{escape.printable(label)} vs reference: bits lost of {ref.precision} (░ few, █ all)", style="bold")
    return [head, *heatmap_lines(np.where(lost > 0, lost, np.nan), ref.rows, ref.layers, 0.0, float(ref.precision))]


def render(report: Report, console: Console | None = None) -> None:
    """Print the report's tables and one coarse heatmap (the first pair that differs, or the reference)."""
    console = console or console_policy.stdout()
    facts = ", ".join(f"{k} {v}" for k, v in (("experiment", f"{report.spec.name} ({report.spec.short_hash})"),
                                              ("runs", str(len(report.runs))),
                                              ("classes", str(len(report.classes)))))
    console.print(escape.terminal(f"bnaudit report: {facts}", style="bold"))
    if compare.prefix_text(report.lengths):
        console.print(escape.terminal(f"lengths: {compare.prefix_text(report.lengths)}"))
    for sentence in story.sentences(report):
        console.print(escape.terminal(f"- {sentence}"))
    runs = key_table(report)
    console.print(_rich_table("Runs", _columns(runs, [h for i, h in enumerate(runs[0]) if h not in TERMINAL_OMITS
                                                      or _informative(runs, i)])))
    classes = class_table(report)
    console.print(_rich_table("Classes of bit-identical runs", _columns(classes, [h for h in classes[0]
                                                                                 if h != "members share"])))
    if report.pairs:
        console.print(_rich_table("Pairs compared", _columns(pair_table(report), (
            "pair", "verdict", "first difference", "final max |Δ parameter|", "growth / epoch"))))
    differing = [p for p in report.pairs if not p.identical]
    lines: list[Text] = []
    if differing:
        lines = _pair_heatmap(differing[0])
    elif report.references:
        label, ref = next(iter(report.references.items()))
        lines = _reference_heatmap(label, ref)
    for line in lines:
        console.print(line)
    for finding in report.findings:
        console.print(escape.terminal(f"matrix: {finding}"))
    for note in report.notes:
        console.print(escape.terminal(f"note: {note}", style="yellow"))
