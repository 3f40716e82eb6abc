"""Write a report folder, or one self-contained HTML file: build the model, then the formats.

The writer owns the output: it refuses an output that overlaps an input or already
holds files (unless forced, and then only what bnaudit wrote), and writes a folder
through ``fileio.atomic_folder``, so the folder appears complete (``index.html`` written
last) or not at all; a single file is written under a temporary name beside it and
renamed into place.  The formats it calls only return text or write their figures where
they are told.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bnaudit import fileio
from bnaudit._version import __version__
from bnaudit.errors import OutputError
from bnaudit.report import build, figures, html, markdown
from bnaudit.report.model import Report

REPORT_SCHEMA = "bnaudit.report/1"
MANIFEST = "report.json"


@dataclasses.dataclass(frozen=True)
class WrittenReport:
    """What ``write_report`` produced."""

    out: Path
    """The report folder, or the single HTML file."""
    files: tuple[str, ...]
    """Files in the folder, relative to it (a single file: its own name)."""
    seconds: float
    """Wall time of building and writing."""
    report: Report
    """The report's content (for the terminal view)."""
    figures: int
    """Figures drawn (each an SVG and a PNG in a folder, inlined in a single file)."""


def _refuse_overlap(report: Report, out: Path) -> None:
    """An output folder inside an input, or around one, would be replaced or read as an input."""
    target = out.resolve()
    for r in report.runs:
        folder = r.path.resolve()
        if target == folder or target in folder.parents or folder in target.parents:
            raise OutputError(f"--out {out} overlaps the input {r.path}; write the report elsewhere")


def manifest(folder: Path, report: Report) -> dict[str, object]:
    """report.json: what made the folder, and the sha256 of every file in it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"schema": REPORT_SCHEMA, "bnaudit": __version__, "spec_hash": report.spec.hash,
            "sources": list(report.sources),
            "files": {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}


def write_report(paths: Sequence[Path], out: Path, *, force: bool = False, same_length: bool = False) -> WrittenReport:
    """Build the report of ``paths`` and write it to ``out`` atomically (temp folder, then rename)."""
    started = time.perf_counter()
    out = Path(out)
    report = build.build_report(paths, same_length=same_length)  # inputs first: a bad input leaves no output folder
    _refuse_overlap(report, out)
    with fileio.OutputLock.beside(out, f"--out {out}"):
        fileio.prepare_output(out, force=force, kind="report")
        with fileio.atomic_folder(out, "report") as tmp:
            (tmp / "figures").mkdir()
            figs = figures.render_all(report, tmp / "figures")
            (tmp / "report.md").write_text(markdown.render(report, figs), encoding="utf-8")
            (tmp / "index.html").write_text(html.render(report, figs), encoding="utf-8")
            # report.json last: it marks the folder as a complete bnaudit report (the one
            # kind of folder ``report --force`` may replace).
            (tmp / MANIFEST).write_text(fileio.dumps(manifest(tmp, report)), encoding="utf-8")
    files = tuple(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    return WrittenReport(out=out, files=files, seconds=time.perf_counter() - started, report=report,
                         figures=len(figs))


# --------------------------------------------------------------------------- one self-contained file

SINGLE_FILE_MARK = re.compile(r'<meta name="generator" content="bnaudit [^"<>]*; ' + re.escape(html.SINGLE_FILE)
                              + r'">')
"""The third line of a single-file report (``html.generator``): the one kind of file ``--force`` replaces."""
INLINE_MIME = "image/svg+xml"
"""Figures are inlined as their SVG: vector (sharp at any zoom, printable) and in total smaller than the 2x PNGs."""


def _written_by_bnaudit(out: Path) -> bool:
    """Whether the plain file ``out`` opens as a single-file report (its first lines; never follows a link)."""
    try:
        fd = os.open(out, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise OutputError(f"--out {out} exists and cannot be read ({exc.strerror or exc}); refusing to replace "
                          "it") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since it was looked at
            return False
        lines = os.read(fd, 4096).decode("utf-8", errors="replace").split("\n")
    finally:
        os.close(fd)
    return len(lines) > 3 and lines[0] == "<!DOCTYPE html>" and SINGLE_FILE_MARK.fullmatch(lines[2]) is not None


def _prepare_single_file(out: Path, *, force: bool) -> None:
    """Check that ``out`` may receive a single-file report; remove what an interrupted write left beside it.

    The rules of a report folder, for a file: a missing name is taken; a single-file
    report bnaudit wrote is replaced only with ``force``; anything else (a folder, a
    link, a FIFO or device, a file bnaudit did not write) is refused with or without
    ``force`` (exit 5).  Call it under the output's lock.
    """
    fileio.refuse_installation(out)
    try:
        mode: int | None = os.lstat(out).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutputError(f"--out {out} cannot be examined: {exc.strerror or exc}") from None
    if mode is not None:
        if stat.S_ISLNK(mode):
            raise OutputError(f"--out {out} is a symbolic link; --single-file never writes through one: "
                              "give the file's own name")
        if stat.S_ISDIR(mode):
            raise OutputError(f"--out {out} is a folder; --single-file writes one HTML file (--out NAME.html), "
                              "or drop --single-file to write a report folder")
        if not stat.S_ISREG(mode):
            raise OutputError(f"--out {out} exists and is not a plain file; refusing to replace it")
        if not _written_by_bnaudit(out):
            raise OutputError(f"--out {out} is not a single-file report bnaudit wrote; refusing to replace it "
                              "(with or without --force): choose another name")
        if not force:
            raise OutputError(f"--out {out} already holds a single-file report; choose another name or pass --force")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    fileio.remove_leftovers(out)  # under the lock: no other writer's


def write_single_file(paths: Sequence[Path], out: Path, *, force: bool = False,
                      same_length: bool = False) -> WrittenReport:
    """Build the report of ``paths`` and write it to the one HTML file ``out``, figures inlined.

    The figures are drawn into a temporary folder beside ``out`` (removed whatever
    happens), and the page is written under a temporary name and renamed into place:
    ``out`` is the old file or the complete new one, never a part.
    """
    started = time.perf_counter()
    out = Path(out)
    report = build.build_report(paths, same_length=same_length)  # inputs first: a bad input never leaves an output
    _refuse_overlap(report, out)
    with fileio.OutputLock.beside(out, f"--out {out}"):
        _prepare_single_file(out, force=force)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        except OSError as exc:
            raise OutputError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
        try:
            (tmp / "figures").mkdir()
            figs = figures.render_all(report, tmp / "figures")
            inline = {f.path: f"data:{INLINE_MIME};base64," + base64.b64encode((tmp / f.svg).read_bytes()).decode()
                      for f in figs}
            page = html.render(report, figs, inline=inline)
        except OSError as exc:  # a full disk while drawing: one line, as for a folder
            raise OutputError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fileio.write_text_atomic(out, page)
    return WrittenReport(out=out, files=(out.name,), seconds=time.perf_counter() - started, report=report,
                         figures=len(figs))
