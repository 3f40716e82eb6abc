"""Rendering of `bnaudit matrix`: one overall progress display, rich tables, Markdown.

Everything here reads a ``matrix.results.MatrixSummary`` (JSON is its ``to_dict``), so the
terminal tables, summary.md and summary.json always say the same thing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from bnaudit.layout import after
from bnaudit.matrix.execute import MatrixEvent
from bnaudit.matrix.plan import CONTROL_FIELDS, Plan
from bnaudit.matrix.results import MatrixSummary, shown
from bnaudit.report import console as console_policy
from bnaudit.report import escape

console = console_policy.stdout()
err_console = console_policy.stderr()


@contextlib.contextmanager
def progress(plan: Plan, *, enabled: bool = True) -> Iterator[Callable[[MatrixEvent], None]]:
    """One bar over every epoch of every configuration, on stderr; yields the event callback."""
    shown = enabled and err_console.is_terminal
    bar = Progress(TextColumn("[bold]matrix"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[runs]}"),
                   TimeElapsedColumn(), TextColumn("{task.fields[running]}"), console=err_console, transient=True,
                   disable=not shown)
    total_runs = len(plan.runs)
    lock = threading.Lock()
    done: dict[str, int] = {}
    running: dict[str, int] = {}
    finished = [0]
    with bar:
        task = bar.add_task("matrix", total=total_runs * plan.epochs, runs=f"0/{total_runs} runs", running="")

        def on_event(event: MatrixEvent) -> None:
            key = event.run.key
            with lock:
                if event.kind == "start":
                    running[key] = 0
                elif event.kind == "epoch":
                    running[key] = event.epoch
                elif event.kind in ("resumed", "done", "failed"):
                    running.pop(key, None)
                    done[key] = plan.epochs
                    finished[0] += 1
                completed = sum(done.values()) + sum(running.values())
                names = ", ".join(sorted(running))
                bar.update(task, completed=completed, runs=f"{finished[0]}/{total_runs} runs",
                           running=(names[:60] + "...") if len(names) > 63 else names)
                if event.kind == "failed" and shown:
                    bar.console.print(Text.assemble(("failed", "red"), " ", escape.terminal(f"{key}: {event.message}")))

        yield on_event


def _value(v: Any, field: str = "") -> str:
    """A table cell: a control's value as ``results.shown`` writes it; for anything else None is "-"."""
    if field in CONTROL_FIELDS:
        return shown(field, v)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _controls_text(controls: dict[str, Any], fields: tuple[str, ...] = CONTROL_FIELDS) -> str:
    return ", ".join(f"{f}={_value(controls[f], f)}" for f in fields if f in controls) or "-"


def _sci(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.3g}"


def verdict_rows(summary: MatrixSummary) -> list[list[str]]:
    rows = []
    for v in summary.verdicts:
        largest = "-"
        if v.largest is not None:
            ulps = f" ({v.largest.max_ulps} ulp)" if v.largest.max_ulps is not None else ""
            largest = f"{_sci(v.largest.max_abs)}{ulps} in {v.largest.layer}, {after(v.largest.row)}"
        first = "-" if v.first is None else f"{v.first.layer} / {v.first.tensor or '(group)'} ({v.first.where})"
        pairs = f"{v.differing}/{v.pairs}"
        if len(v.by_dtype) > 1:
            pairs += " (" + ", ".join(f"{d} {n}/{m}" for d, n, m in v.by_dtype) + ")"
        rows.append([v.variant, v.control, ", ".join(_value(x, v.control) for x in v.values),
                     "changes the bits" if v.changes_bits else "does not", pairs, largest, first])
    return rows


def class_rows(summary: MatrixSummary) -> list[list[str]]:
    rows = []
    for c in summary.classes:
        ref = "-" if not c.reference or c.reference_row is None else f"{after(c.reference_row)}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in c.reference.items())
        rows.append([c.variant, str(c.index), c.digest[:12], str(len(c.members)), ", ".join(c.members),
                     _controls_text(c.shared, tuple(c.shared)) if c.shared else "-", ref])
    return rows


def machine_rows(summary: MatrixSummary) -> list[list[str]]:
    rows = []
    for m in summary.machines:
        closer = "-"
        if m.closer_to_reference:
            votes = {k: sum(1 for x in m.closer_to_reference.values() if x == k) for k in ("a", "b", "tie")}
            closer = f"{m.cpu_a} {votes['a']}, {m.cpu_b} {votes['b']}, tie {votes['tie']}"
        series = "; ".join(f"{r}: {_sci(v)}" for r, v in m.series)  # after epoch r (0: the initial state)
        rows.append([m.variant, f"{m.controls['dtype']} t{m.controls['threads']} {m.controls['isa']}",
                     f"{m.cpu_a} vs {m.cpu_b}", "identical" if m.identical else (m.first.where if m.first else "?"),
                     _sci(m.growth_rate), _value(m.saturation_epoch), series or "-", closer,
                     f"{m.final_train_loss[0]:.4g} / {m.final_train_loss[1]:.4g}"])
    return rows


def run_rows(summary: MatrixSummary) -> list[list[str]]:
    rows = []
    for r in summary.runs:
        rows.append([r.key, r.status, _value(r.class_index), _value(r.capability), _value(r.threads_read_back),
                     _value(r.emulated_model, "cpu_model"), _sci(r.train_seconds),
                     "-" if r.slowdown is None else f"{r.slowdown:.1f}x",
                     _sci(r.final_train_loss), _sci(r.final_test_loss), r.error or ""])
    return rows


VERDICT_HEAD = ["variant", "control", "values", "verdict", "differing pairs", "largest divergence",
                "first layer / tensor it changes"]
CLASS_HEAD = ["variant", "class", "digest", "runs", "members", "shared controls",
              "correct bits vs mpmath reference"]
MACHINE_HEAD = ["variant", "configuration", "CPUs", "first part", "growth (ln/epoch)", "saturates after epoch",
                "max |a-b| after epoch (0: initial)", "closer to reference (layers)", "final train MSE"]
RUN_HEAD = ["run", "status", "class", "capability", "threads", "emulated CPU", "train s", "slowdown",
            "train MSE", "test MSE", "error"]
ISA_HEAD = ["variant", "ISA settings", "combinations tried", "agree bit for bit under"]


def isa_rows(summary: MatrixSummary) -> list[list[str]]:
    return [[a.variant, f"{a.a} vs {a.b}", str(a.compared),
             "; ".join(_controls_text(c, tuple(c)) if c else "the grid's settings" for c in a.agree) or "none"]
            for a in summary.isa_agreement]


def _header(summary: MatrixSummary) -> list[str]:
    variants = ", ".join(f"{n} (spec {h[:12]})" for n, h in summary.variants)
    grid = "; ".join(f"{k} {', '.join(_value(x, k) for x in v)}" for k, v in summary.grid.items())
    lines = [f"experiments: {variants}", f"epochs: {summary.epochs}", f"grid: {grid}",
             f"runs: {len(summary.runs)} ({sum(r.status == 'ran' for r in summary.runs)} run now, "
             f"{sum(r.status == 'resumed' for r in summary.runs)} resumed, "
             f"{sum(r.status == 'failed' for r in summary.runs)} failed)"]
    if summary.hosts:
        lines.append(f"host: {', '.join(escape.printable(h) for h in summary.hosts)} (the CPU that ran the runs)")
    if summary.wall_seconds is not None:
        lines.append(f"wall time: {summary.wall_seconds:.1f} s")
    return lines


def render(summary: MatrixSummary) -> None:
    """The terminal view: findings, then the tables."""
    title = f"bnaudit matrix {summary.plan_id}" + (f" (preset {summary.preset})" if summary.preset else "")
    console.print(Text.assemble((title, "bold"), "  ", escape.terminal(summary.folder)))
    for line in _header(summary):
        console.print(Text.assemble("  ", escape.terminal(line)))
    for heading, head, rows in (("Controls", VERDICT_HEAD, verdict_rows(summary)),
                                ("Equivalence classes", CLASS_HEAD, class_rows(summary)),
                                ("ISA settings", ISA_HEAD, isa_rows(summary)),
                                ("CPUs", MACHINE_HEAD, machine_rows(summary)),
                                ("Runs", RUN_HEAD, run_rows(summary))):
        if not rows:
            continue
        table = Table(title=heading, title_justify="left", show_lines=False)
        for h in head:
            table.add_column(h, overflow="fold")
        for row in rows:
            table.add_row(*(escape.terminal(cell) for cell in row))  # a str cell would be read as markup
        console.print(table)
    if summary.findings:
        console.print(Text("Findings", style="bold"))
        for f in summary.findings:
            console.print(Text.assemble("  - ", escape.terminal(f)))
    for note in summary.notes:
        console.print(Text.assemble(("note:", "yellow"), " ", escape.terminal(note)))


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        # The cells are bnaudit's own text (labels of validated controls, numbers, sentences
        # whose Markdown is meant); only what could break the table or the terminal is escaped.
        return escape.printable(text.replace("\n", " ")).replace("|", "\\|")

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def markdown(summary: MatrixSummary) -> str:
    """summary.md: the same findings and tables as the terminal view."""
    title = f"# bnaudit matrix {summary.plan_id}" + (f" (preset `{summary.preset}`)" if summary.preset else "")
    lines = [title, ""] + [f"- {line}" for line in _header(summary)] + [""]
    if summary.findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in summary.findings] + [""]
    for heading, head, rows in (("Controls: do they change the bits?", VERDICT_HEAD, verdict_rows(summary)),
                                ("Equivalence classes of identical fingerprints", CLASS_HEAD, class_rows(summary)),
                                ("ISA settings that agree bit for bit", ISA_HEAD, isa_rows(summary)),
                                ("The same configuration on two CPUs", MACHINE_HEAD, machine_rows(summary)),
                                ("Runs", RUN_HEAD, run_rows(summary))):
        if rows:
            lines += [f"## {heading}", "", *_md_table(head, rows), ""]
    if summary.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary.notes] + [""]
    return "\n".join(lines)
