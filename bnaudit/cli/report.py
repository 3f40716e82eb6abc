"""`bnaudit report`: figures, index.html and report.md over runs and matrices; a terminal view."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli._options import SameLengthOption


def report(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="RUN_OR_MATRIX_DIR [...]", help="Record folders, matrix folders, or folders of records.",
        show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Report folder to write (index.html, report.md, figures/ with "
                                                  "each figure as SVG and 2x PNG); with --single-file, the one "
                                                  "HTML file to write (NAME.html).")] = None,
    single_file: Annotated[bool, typer.Option("--single-file", help="Write --out as one self-contained HTML file, "
                                                                    "its figures inlined as SVG: no folder, no "
                                                                    "report.md, nothing else.")] = False,
    terminal: Annotated[bool, typer.Option("--terminal", help="Print the key table and a coarse heatmap.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report folder or single-file report "
                                                         "(only ever one bnaudit wrote).")] = False,
    same_length: SameLengthOption = False,
) -> int:
    """Draw the report of runs of one experiment: where and when they part, and how well BN is conditioned.

    --out FOLDER writes FOLDER/index.html (showing 2x PNGs, linking each figure's SVG), report.md and figures/.
    --out NAME.html --single-file writes that one page alone, every figure inlined as a data: URI, so it can be
    mailed or attached as it is; the safety rules of a folder hold: an existing file is replaced only with
    --force, and only if bnaudit wrote it; a folder, link or FIFO at NAME.html is refused.

    Runs of different lengths are classed and compared over the epochs they all ran (the header says so).

    Exit codes: 0 written, 2 neither --out nor --terminal, or --single-file without --out NAME.html, 3 an input is
    missing, partial or unusable, 4 runs of different experiments (refused) or of different lengths with
    --same-length, 5 --out exists (use --force), is not bnaudit's, is not a plain file (--single-file) or cannot
    be written.
    """
    from bnaudit.errors import UsageError
    from bnaudit.report import build, escape, writer
    from bnaudit.report import terminal as terminal_view

    if out is None and not terminal:
        raise UsageError("report: give --out FOLDER for the HTML/Markdown report, or --terminal, or both")
    # A name without .html would most likely be a folder name given out of habit (an existing folder is
    # refused by the writer, with its own line).
    if single_file and (out is None or (out.suffix.lower() not in (".html", ".htm") and not out.is_dir())):
        raise UsageError("report: --single-file writes one HTML file: give it --out NAME.html")
    if out is None:
        content = build.build_report(inputs, same_length=same_length)
    elif single_file:
        written = writer.write_single_file(inputs, out, force=force, same_length=same_length)
        content = written.report
        typer.echo(f"wrote {escape.printable(written.out)} (one self-contained page, {written.figures} figures "
                   f"inlined) in {written.seconds:.1f} s")
    else:
        written = writer.write_report(inputs, out, force=force, same_length=same_length)
        content = written.report
        typer.echo(f"wrote {escape.printable(written.out)}/index.html, report.md and {written.figures} figures "
                   f"(SVG and PNG) in {written.seconds:.1f} s")
    if terminal:
        terminal_view.render(content)
    return 0


def register(app: typer.Typer) -> None:
    app.command("report")(report)
