"""`bnaudit report`: figures, index.html and report.md over runs and matrices; a terminal view."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="RUN_OR_MATRIX_DIR [...]", help="Record folders, matrix folders, or folders of records.",
        show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Report folder to write (index.html, report.md, figures/).")] = None,
    terminal: Annotated[bool, typer.Option("--terminal", help="Print the key table and a coarse heatmap.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report folder (only ever one bnaudit "
                                                         "wrote).")] = False,
) -> int:
    """Draw the report of runs of one experiment: where and when they part, and how well BN is conditioned.

    Exit codes: 0 written, 2 neither --out nor --terminal, 3 an input is missing, partial or unusable,
    4 runs of different experiments (refused), 5 --out exists (use --force) or cannot be written.
    """
    from bnaudit.errors import UsageError
    from bnaudit.report import build, escape, writer
    from bnaudit.report import terminal as terminal_view

    if out is None and not terminal:
        raise UsageError("report: give --out FOLDER for the HTML/Markdown report, or --terminal, or both")
    if out is None:
        content = build.build_report(inputs)
    else:
        written = writer.write_report(inputs, out, force=force)
        content = written.report
        n_figs = sum(1 for f in written.files if f.endswith(".png"))
        typer.echo(f"wrote {escape.printable(written.out)}/index.html, report.md and {n_figs} figures in "
                   f"{written.seconds:.1f} s")
    if terminal:
        terminal_view.render(content)
    return 0


def register(app: typer.Typer) -> None:
    app.command("report")(report)
