"""Write a report folder: build the model, then every file format into one atomic folder.

The writer owns the output folder: it refuses an output that overlaps an input or
already holds files (unless forced), and writes through ``fileio.atomic_folder``, so
the folder appears complete (``index.html`` written last) or not at all.  The formats
it calls only return text or write their figures where they are told.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    """The report folder."""
    files: tuple[str, ...]
    """Files in it, relative to it."""
    seconds: float
    """Wall time of building and writing."""
    report: Report
    """The report's content (for the terminal view)."""


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


def write_report(paths: Sequence[Path], out: Path, *, force: bool = False) -> WrittenReport:
    """Build the report of ``paths`` and write it to ``out`` atomically (temp folder, then rename)."""
    started = time.perf_counter()
    out = Path(out)
    report = build.build_report(paths)  # inputs first: a bad input never leaves an output folder behind
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
    return WrittenReport(out=out, files=files, seconds=time.perf_counter() - started, report=report)
