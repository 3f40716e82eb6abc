"""The matrix folder: one owner at a time, the plan it holds (resume or refuse), and its finished records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bnaudit import divergence, fileio, record
from bnaudit.errors import InputError, OutputError
from bnaudit.matrix.plan import Plan, PlannedRun
from bnaudit.spec import ExperimentSpec

LOCK_NAME = ".matrix.lock"


def spec_toml(spec: ExperimentSpec) -> str:
    """A complete TOML file of a spec (``bnaudit run --spec`` reads it back to the same hash)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(type(v))  # pragma: no cover - spec fields are scalars and lists

    d = spec.to_dict()
    lines = [f"# spec {spec.short_hash}, written by bnaudit matrix", f"name = {value(d['name'])}"]
    for section in ("data", "model", "train"):
        lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in d[section].items()]
    return "\n".join(lines) + "\n"


def lock(out: Path) -> fileio.OutputLock:
    """One bnaudit matrix per folder at a time: ``fileio.OutputLock`` on ``.matrix.lock`` inside the folder.

    The lock file lives inside the matrix folder (``prepare`` ignores it), where earlier bnaudit
    versions put theirs, so an older and a newer bnaudit never work in one folder at once.
    """
    return fileio.OutputLock(out / LOCK_NAME, f"matrix folder {out}")


def create(out: Path) -> None:
    """The matrix folder exists (created if need be) and is a folder."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None


def _check_plan(plan: Plan, out: Path, *, force: bool) -> None:
    """A folder that holds files must hold this plan's matrix (resume), or be started over with ``force``."""
    manifest_path = out / "matrix.json"
    if not manifest_path.exists():
        raise OutputError(f"--out {out} holds files but no matrix.json: not a bnaudit matrix folder; "
                          "choose another folder")
    stored = fileio.read_json(manifest_path, "matrix manifest")
    mine = plan.identity()
    differ = [k for k, v in mine.items() if stored.get(k) != v]
    if differ and not force:
        raise OutputError(f"--out {out} holds a matrix of another experiment or grid ({', '.join(differ)} "
                          "differ); choose another folder, or pass --force to start it over")
    if differ:
        for name in ("runs", "specs"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("summary.json", "summary.md", "matrix.json"):
            (out / name).unlink(missing_ok=True)
    elif force:
        shutil.rmtree(out / "runs", ignore_errors=True)
        for name in ("summary.json", "summary.md"):
            (out / name).unlink(missing_ok=True)


def prepare(plan: Plan, out: Path, *, force: bool) -> None:
    """Create the matrix folder, or check that it holds this plan's matrix (resume); write its plan."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        _check_plan(plan, out, force=force)
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "specs").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    for v in plan.variants:
        fileio.write_text_atomic(out / "specs" / f"{v.name}.toml", spec_toml(v.spec))
    fileio.write_text_atomic(out / "matrix.json", fileio.dumps(plan.manifest()))


def clean_partials(out: Path) -> None:
    """Remove the temporary folders of records whose writing was interrupted (ours, in runs/)."""
    level = [out / "runs"]
    for _ in range(3):  # runs/, runs/<variant or host>/, runs/<host>/<variant>/
        for parent in level:
            for p in parent.glob(".*.partial-*"):
                shutil.rmtree(p, ignore_errors=True)
        level = [p for parent in level for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]


def finished(plan: Plan, run: PlannedRun, out: Path, *, with_reference: bool = True) -> record.Record | None:
    """The run's record if its folder holds a complete, intact record of this spec and config.

    ``with_reference``: with its divergence from the mpmath reference attached (computed
    here for records that lack it; the resume check does not need it).
    """
    folder = out / run.folder
    if not (folder / "record.json").exists():
        return None
    try:
        rec = record.load_record(folder)
    except InputError:
        return None
    if rec.spec.hash != plan.spec_of(run.variant).hash or rec.fingerprint.config != run.config.to_dict():
        return None
    return divergence.attach(rec) if with_reference else rec
