"""`bnaudit matrix`: a grid of controlled runs, and what in it changes the bits.

The pipeline of one matrix:

    options -> Grid (one tuple of values per control) -> Plan (every configuration of every
    experiment variant, with its record folder) -> execute (each configuration in its own
    process through ``launch.run``, ``jobs`` at a time) -> summarise (records only: classes
    of identical fingerprints, a verdict per control, ISA agreement, emulated machine pairs,
    slowdown of emulation) -> MatrixSummary (JSON here; rich tables and Markdown in
    ``report.matrix_view``).

A matrix folder holds ``matrix.json`` (the plan: which experiment, which grid), ``runs/``
(one complete record per configuration, named by ``Controls.label()``, under
``runs/<variant>/`` when the matrix has several experiment variants), ``summary.json`` and
``summary.md``.  Re-running the same command resumes: a configuration whose folder holds a
complete record of the same spec and config is not run again.  A folder holding a matrix of
another experiment or grid is refused (``--force`` starts it over).

This module imports neither torch nor mpmath: runs happen in child processes, and the
summary is numpy-only (``bnaudit.compare``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import bits, controls, divergence, emulate, frozen, record
from bnaudit.controls import Controls, RunConfig
from bnaudit.errors import BnauditError, InputError, Interrupted, OutputError, RunFailed, UsageError
from bnaudit.spec import ExperimentSpec

MATRIX_SCHEMA = "bnaudit.matrix/1"
SUMMARY_SCHEMA = "bnaudit.matrix-summary/1"

# Controls in the order they are reported; each is a field of ``Controls``.
CONTROL_FIELDS = ("dtype", "threads", "isa", "deterministic", "onednn_isa", "mkl_cbwr", "cpu_model")

# In lever lists, this token means "no override: what --isa sets" (``None`` in Controls).
INHERIT = "inherit"

# Epochs of the seed-machines preset.  Emulation is ~25x slower than native: about 0.25 s per float32
# epoch on an idle core of this project's machine, ~2 s per epoch with 5 engineers sharing its 2 cores,
# plus 12-60 s to import torch under qemu.  Its 8 emulated runs of 60 epochs take ~5 min at -j 1 on an
# idle machine and ~25 min on a busy one.  The machines' float32 gap grows by ~1.7 (ln) per epoch from
# the first epoch (measured), so 60 epochs show where they part, the growth and, in float32, the
# saturation.  --epochs overrides it (up to the spec's 1000: about 35 min at -j 1 on an idle machine).
SEED_MACHINES_EPOCHS = 60


# --------------------------------------------------------------------------- parsing

def split_list(text: str, option: str) -> list[str]:
    """A comma-separated option value as a list of distinct, non-empty tokens (order kept)."""
    tokens = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in tokens):
        raise UsageError(f"{option} {text!r}: expected a comma-separated list without empty items")
    out: list[str] = []
    for t in tokens:
        if t not in out:
            out.append(t)
    return out


def parse_threads(text: str) -> tuple[int, ...]:
    values = []
    for t in split_list(text, "--threads"):
        try:
            values.append(int(t))
        except ValueError:
            raise UsageError(f"--threads {text!r}: {t!r} is not a whole number") from None
    return tuple(dict.fromkeys(values))


def parse_deterministic(text: str) -> tuple[bool, ...]:
    """``off``, ``on``, ``both`` (= off,on), or a comma list of on/off/true/false."""
    words = {"off": False, "false": False, "no": False, "0": False, "on": True, "true": True, "yes": True, "1": True}
    out: list[bool] = []
    for t in split_list(text, "--deterministic"):
        low = t.lower()
        if low == "both":
            values = [False, True]
        elif low in words:
            values = [words[low]]
        else:
            raise UsageError(f"--deterministic {text!r}: use off, on, both, or a list such as off,on")
        out += [v for v in values if v not in out]
    return tuple(out)


def parse_onednn(text: str) -> tuple[str | None, ...]:
    """oneDNN ISA caps; ``inherit`` keeps the one --isa sets."""
    return tuple(dict.fromkeys(None if t.lower() == INHERIT else t.upper() for t in split_list(text, "--onednn-isa")))


def parse_mkl_cbwr(text: str) -> tuple[str | None, ...]:
    """MKL_CBWR values.  ``STRICT`` binds to the branch before it, so ``COMPATIBLE,AVX2,STRICT``
    is the two values COMPATIBLE and AVX2,STRICT (MKL's own spelling); ``none`` removes the
    variable; ``inherit`` keeps the one --isa sets."""
    split_list(text, "--mkl-cbwr")  # no empty items
    tokens = [t.strip() for t in text.split(",")]  # not de-duplicated: STRICT may follow several branches
    values: list[str] = []
    for t in tokens:
        if t.upper() == "STRICT":
            if not values or values[-1].lower() in (INHERIT, "none") or values[-1].upper().endswith(",STRICT"):
                raise UsageError(f"--mkl-cbwr {text!r}: STRICT must follow a branch name, e.g. AVX2,STRICT")
            values[-1] = f"{values[-1]},STRICT"
        else:
            values.append(t.upper() if t.lower() not in (INHERIT, "none") else t.lower())
    values = list(dict.fromkeys(values))
    return tuple(None if v == INHERIT else v for v in values)


def parse_cpu_models(text: str) -> tuple[str | None, ...]:
    """CPU models (or presets) to emulate; ``native`` runs on this machine's own CPU."""
    return tuple(dict.fromkeys(None if emulate.is_native(t) else t for t in split_list(text, "--cpu-model")))


# --------------------------------------------------------------------------- grid and plan

@dataclasses.dataclass(frozen=True)
class Grid:
    """The values each control takes; the matrix is their cartesian product."""

    dtype: tuple[str, ...] = ("float32",)
    """Run dtypes."""
    threads: tuple[int, ...] = (1,)
    """Thread counts."""
    isa: tuple[str, ...] = ("native",)
    """ISA caps."""
    deterministic: tuple[bool, ...] = (False,)
    """Deterministic-algorithm settings."""
    onednn_isa: tuple[str | None, ...] = (None,)
    """oneDNN ISA overrides (None: what --isa sets)."""
    mkl_cbwr: tuple[str | None, ...] = (None,)
    """MKL_CBWR overrides (None: what --isa sets; "none": removed)."""
    cpu_model: tuple[str | None, ...] = (None,)
    """Emulated CPU models (None: this machine)."""

    def controls(self) -> list[Controls]:
        """Every configuration, in a stable order (last control varies fastest)."""
        axes = [getattr(self, f) for f in CONTROL_FIELDS]
        return [Controls(**dict(zip(CONTROL_FIELDS, values, strict=True))) for values in itertools.product(*axes)]

    def varying(self) -> tuple[str, ...]:
        """Controls that take more than one value."""
        return tuple(f for f in CONTROL_FIELDS if len(getattr(self, f)) > 1)

    def to_dict(self) -> dict[str, list[Any]]:
        return {f: list(getattr(self, f)) for f in CONTROL_FIELDS}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One experiment of the matrix (the preset runs the spec with and without BatchNorm)."""

    name: str
    """Short name, used in folder names and tables ("bn", "no-bn")."""
    spec: ExperimentSpec
    """The experiment."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One configuration of one variant, and where its record goes."""

    variant: str
    """Name of the experiment variant."""
    config: RunConfig
    """What the run's process is asked to do."""
    folder: str
    """Record folder, relative to the matrix folder (``runs/<label>`` or ``runs/<variant>/<label>``)."""

    @property
    def label(self) -> str:
        return self.config.controls.label()

    @property
    def key(self) -> str:
        """Unique name within the matrix."""
        return self.folder.removeprefix("runs/")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A whole matrix: experiments, grid, epochs, and every run."""

    variants: tuple[Variant, ...]
    """The experiments (one unless a preset adds a baseline)."""
    grid: Grid
    """The controls' values."""
    epochs: int
    """Epochs of every run."""
    trace_epochs: tuple[int, ...]
    """Epochs digested step by step (0 always)."""
    audit_every: int
    """Operator-audit interval passed to every run (0 = off)."""
    preset: str | None
    """The preset this plan came from, if any."""
    runs: tuple[PlannedRun, ...]
    """Every configuration, in grid order."""

    def spec_of(self, variant: str) -> ExperimentSpec:
        return next(v.spec for v in self.variants if v.name == variant)

    def identity(self) -> dict[str, Any]:
        """What makes two matrix folders the same experiment and grid."""
        return {
            "schema": MATRIX_SCHEMA,
            "variants": [{"name": v.name, "spec_hash": v.spec.hash} for v in self.variants],
            "grid": self.grid.to_dict(),
            "epochs": self.epochs,
            "trace_epochs": list(self.trace_epochs),
            "audit_every": self.audit_every,
        }

    @property
    def plan_id(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def manifest(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "plan_id": self.plan_id,
            "preset": self.preset,
            "specs": {v.name: v.spec.to_dict() for v in self.variants},
            "runs": [{"variant": r.variant, "folder": r.folder, "config": r.config.to_dict()} for r in self.runs],
        }


def no_bn_variant(spec: ExperimentSpec) -> ExperimentSpec:
    """The seed's baseline network: the same experiment with ``[model] batchnorm = false``."""
    from bnaudit.spec import from_dict

    return from_dict({"model": {"batchnorm": False}}, base=spec)


def make_plan(variants: Sequence[Variant], grid: Grid, *, epochs: int | None = None,
              trace_epochs: tuple[int, ...] = (0,), audit_every: int = 10, preset: str | None = None,
              check_cpu: bool = True) -> Plan:
    """Validate every configuration (UsageError, exit 2, before anything runs) and name its folder."""
    if not variants:
        raise UsageError("a matrix needs at least one experiment")
    n_epochs = epochs if epochs is not None else min(v.spec.train.epochs for v in variants)
    emulated = sorted({m for m in grid.cpu_model if m is not None})
    for model in emulated:
        emulate.resolve(model)  # MissingTool (7) without qemu, UsageError (2) for an unknown model
    nested = len(variants) > 1
    runs = []
    for variant in variants:
        for c in grid.controls():
            config = RunConfig(controls=c, epochs=n_epochs, trace_epochs=trace_epochs, audit_every=audit_every)
            controls.validate(config, variant.spec, check_cpu=check_cpu)
            folder = f"runs/{variant.name}/{c.label()}" if nested else f"runs/{c.label()}"
            runs.append(PlannedRun(variant=variant.name, config=config, folder=folder))
    keys = [r.folder for r in runs]
    if len(set(keys)) != len(keys):  # e.g. --mkl-cbwr avx2,AVX2: same label twice
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise UsageError(f"two configurations of the grid share the folder {dup}; remove the repeated value")
    return Plan(variants=tuple(variants), grid=grid, epochs=n_epochs, trace_epochs=trace_epochs,
                audit_every=audit_every, preset=preset, runs=tuple(runs))


PRESETS = {
    "seed-machines": "the BN noisy-feature experiment on the seed's two CPUs emulated (seed-i7 = Haswell, "
                     "seed-i5 = IvyBridge) and natively, with and without BatchNorm, float32 and float64, "
                     f"{SEED_MACHINES_EPOCHS} epochs",
}


def preset_plan(name: str, spec: ExperimentSpec, *, epochs: int | None, overrides: dict[str, tuple[Any, ...]],
                trace_epochs: tuple[int, ...] = (0,), audit_every: int = 10) -> Plan:
    """A named plan; explicit grid options (``overrides``) replace the preset's values."""
    if name != "seed-machines":
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    grid = Grid(dtype=("float32", "float64"), cpu_model=("seed-i7", "seed-i5", None))
    grid = dataclasses.replace(grid, **overrides)
    variants = (Variant("bn", spec), Variant("no-bn", no_bn_variant(spec)))
    return make_plan(variants, grid, epochs=SEED_MACHINES_EPOCHS if epochs is None else epochs,
                     trace_epochs=trace_epochs, audit_every=audit_every, preset=name)


# --------------------------------------------------------------------------- the folder

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


class FolderLock:
    """One bnaudit matrix per folder at a time: an flock on ``.matrix.lock`` (which holds the owner's pid).

    The kernel drops the lock when its owner dies, however it dies, so a stale file is
    simply taken over; a live owner makes the second matrix stop with one line.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".matrix.lock"
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write to {self.path.parent}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.path.parent} is in use by another bnaudit matrix (pid {owner})") from None
            try:  # the previous owner may have removed the file between our open and our lock
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = -1
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)  # while still locked: the next owner then locks a new file
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def prepare_folder(plan: Plan, out: Path, *, force: bool) -> None:
    """Create the matrix folder, or check that it holds this plan's matrix (resume)."""
    manifest_path = out / "matrix.json"
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.exists() and any(p.name != ".matrix.lock" for p in out.iterdir()):
        if not manifest_path.exists():
            raise OutputError(f"--out {out} holds files but no matrix.json: not a bnaudit matrix folder; "
                              "choose another folder")
        try:
            stored = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict):
                raise ValueError("not an object")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{manifest_path}: unreadable matrix manifest ({str(exc)[:80]})") from None
        mine = plan.identity()
        if any(stored.get(k) != v for k, v in mine.items()):
            if not force:
                what = [k for k, v in mine.items() if stored.get(k) != v]
                raise OutputError(f"--out {out} holds a matrix of another experiment or grid ({', '.join(what)} "
                                  "differ); choose another folder, or pass --force to start it over")
            for name in ("runs", "specs"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("summary.json", "summary.md", "matrix.json"):
                (out / name).unlink(missing_ok=True)
        elif force:
            shutil.rmtree(out / "runs", ignore_errors=True)
            for name in ("summary.json", "summary.md"):
                (out / name).unlink(missing_ok=True)
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "specs").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    for v in plan.variants:
        record.write_text_atomic(out / "specs" / f"{v.name}.toml", spec_toml(v.spec))
    record.write_text_atomic(manifest_path, json.dumps(plan.manifest(), sort_keys=True, indent=1) + "\n")


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


def _clean_partials(out: Path) -> None:
    """Remove the temporary folders of records whose writing was interrupted (ours, in runs/)."""
    for parent in [out / "runs", *[p for p in (out / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")]]:
        for p in parent.glob(".*.partial-*"):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- execution

@dataclasses.dataclass(frozen=True)
class MatrixEvent:
    """Something that happened to one run of the matrix (for progress displays)."""

    kind: str
    """"resumed", "start", "epoch", "done" or "failed"."""
    run: PlannedRun
    """Which run."""
    epoch: int = 0
    """Epochs finished so far (for "epoch")."""
    message: str = ""
    """Error message (for "failed")."""


EventFn = Callable[[MatrixEvent], None]


@dataclasses.dataclass(frozen=True)
class Failure:
    """A configuration that did not produce a record."""

    key: str
    """The run's key (folder below runs/)."""
    exit_code: int
    """The exit code its error maps to."""
    message: str
    """The error's one line."""


@dataclasses.dataclass(frozen=True)
class Execution:
    """What ``execute`` did."""

    ran: tuple[str, ...]
    """Keys of the runs made now."""
    resumed: tuple[str, ...]
    """Keys of the runs found complete and not redone."""
    failures: tuple[Failure, ...]
    """Runs that failed."""
    wall_seconds: float
    """Wall time of the whole execution."""


def threads_honoured(threads: int, effective: dict[str, Any]) -> str | None:
    """None if the run's read-back shows its thread settings, else what differs."""
    if effective.get("intra_op_threads") != threads:
        return f"intra-op threads {effective.get('intra_op_threads')} instead of {threads}"
    for pool in effective.get("threadpools", []):
        if pool.get("user_api") == "openmp" or pool.get("internal_api") == "mkl":
            if pool.get("num_threads") != threads:
                return f"{pool.get('internal_api')} pool has {pool.get('num_threads')} threads instead of {threads}"
    return None


def execute(plan: Plan, out: Path, *, jobs: int = 1, force: bool = False, on_event: EventFn | None = None,
            base_env: dict[str, str] | None = None) -> Execution:
    """Run every configuration not already finished, ``jobs`` at a time, each in its own process."""
    import time

    from bnaudit import launch

    if not 1 <= jobs <= 64:
        raise UsageError(f"-j/--jobs must be between 1 and 64, got {jobs}")
    started = time.perf_counter()
    out = Path(out)
    stopping = threading.Event()  # after an interrupt, runs still winding down report nothing

    def emit(event: MatrixEvent) -> None:
        if on_event is not None and not stopping.is_set():
            on_event(event)

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    with FolderLock(out):
        prepare_folder(plan, out, force=force)
        _clean_partials(out)
        for variant in plan.variants:
            frozen.load(variant.spec)  # generate a custom spec's frozen inputs once, not in racing children
        pending, resumed = [], []
        for run in plan.runs:
            if finished(plan, run, out, with_reference=False) is not None:
                resumed.append(run.key)
                emit(MatrixEvent("resumed", run))
            else:
                pending.append(run)
        failures: list[Failure] = []
        ran: list[str] = []
        lock = threading.Lock()

        def one(run: PlannedRun) -> None:
            emit(MatrixEvent("start", run))
            folder = out / run.folder
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                summary = launch.run(plan.spec_of(run.variant), run.config, folder, force=folder.exists(),
                                     on_progress=lambda e: emit(MatrixEvent("epoch", run, epoch=int(e["epoch"]))),
                                     base_env=base_env)
                wrong = threads_honoured(run.config.controls.threads, summary["effective"])
                if wrong is not None:
                    shutil.rmtree(folder, ignore_errors=True)  # not what the configuration says: not finished
                    raise RunFailed(f"thread settings not honoured: {wrong}")
            except BnauditError as exc:
                with lock:
                    failures.append(Failure(run.key, int(exc.exit_code), exc.message))
                emit(MatrixEvent("failed", run, message=exc.message))
                return
            with lock:
                ran.append(run.key)
            emit(MatrixEvent("done", run, epoch=run.config.epochs))

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="bnaudit-matrix")
        futures = [pool.submit(one, run) for run in pending]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except KeyboardInterrupt:
            stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            done = len(resumed) + len(ran)
            raise Interrupted(f"interrupted with {done} of {len(plan.runs)} configurations finished; "
                              "re-run the same command to resume") from None
        pool.shutdown(wait=True)
    order = {r.key: i for i, r in enumerate(plan.runs)}
    return Execution(ran=tuple(sorted(ran, key=order.__getitem__)), resumed=tuple(resumed),
                     failures=tuple(sorted(failures, key=lambda f: order[f.key])),
                     wall_seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------- summary

def _num(x: float | int | None) -> float | int | str | None:
    """A number for JSON: non-finite floats as the strings "inf", "-inf", "nan"."""
    if x is None or isinstance(x, int):
        return x
    x = float(x)
    if np.isnan(x):
        return "nan"
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


@dataclasses.dataclass(frozen=True)
class Change:
    """Where one configuration first parts from another (a ``compare.Difference``, flattened)."""

    epoch: int
    """0-based epoch."""
    step: int | None
    """Step within the epoch, or None for an epoch-level difference."""
    phase: str
    """init, forward, backward, update or eval."""
    layer: str
    """Module name or "loss"."""
    tensor: str | None
    """Tensor name, when known."""
    where: str
    """One line for people."""
    a: str
    """Key of the first run of the pair."""
    b: str
    """Key of the second run."""

    def position(self) -> tuple[int, int, int, int]:
        """Timeline order: initial state < steps of epoch e < end of epoch e < steps of epoch e+1."""
        if self.phase == "init":
            return (self.epoch, 0, 0, 0)
        if self.step is not None:
            return (self.epoch, 1, self.step, _PHASE_ORDER.get(self.phase, 9))
        return (self.epoch, 2, 0, _PHASE_ORDER.get(self.phase, 9))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PHASE_ORDER = {p: i for i, p in enumerate(record.PHASES)}


@dataclasses.dataclass(frozen=True)
class Largest:
    """The largest parameter divergence between two configurations."""

    max_abs: float
    """Largest |a - b| over parameters and epoch rows (float64 of the stored values)."""
    max_ulps: int | None
    """Largest ulp distance in the storage dtype (None across storage dtypes)."""
    row: int
    """Epoch row where max_abs is reached."""
    layer: str
    """Layer where max_abs is reached."""
    a: str
    """Key of the first run."""
    b: str
    """Key of the second run."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_abs"] = _num(self.max_abs)
        return d


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One configuration of the matrix and what became of it."""

    key: str
    """Folder below runs/."""
    variant: str
    """Experiment variant."""
    controls: dict[str, Any]
    """The controls asked for."""
    status: str
    """"ran" (now), "resumed" (found complete), "failed" or "pending"."""
    digest: str | None
    """Overall fingerprint digest."""
    class_index: int | None
    """1-based equivalence class within the variant."""
    capability: str | None
    """torch's effective CPU capability."""
    threads_read_back: int | None
    """Intra-op threads read back in the run's process."""
    emulated_model: str | None
    """qemu CPU model the run's process saw (resolved: Haswell for seed-i7)."""
    train_seconds: float | None
    """Wall time of the training loop."""
    slowdown: float | None
    """train_seconds over the native twin's (emulated runs with a native twin in the grid)."""
    final_train_loss: float | None
    """Eval-mode training MSE at the last epoch."""
    final_test_loss: float | None
    """Eval-mode test MSE at the last epoch."""
    nonfinite: bool
    """Whether a non-finite value appeared."""
    error: str | None
    """The failure's one line."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("train_seconds", "slowdown", "final_train_loss", "final_test_loss"):
            d[k] = _num(d[k])
        return d


@dataclasses.dataclass(frozen=True)
class ClassRow:
    """An equivalence class: configurations whose fingerprints are identical bit for bit."""

    variant: str
    """Experiment variant."""
    index: int
    """1-based, in grid order of first member."""
    digest: str
    """The shared digest."""
    members: tuple[str, ...]
    """Run keys."""
    shared: dict[str, Any]
    """Controls every member has in common but the variant's runs do not all share."""
    reference: dict[str, float] | None
    """Correct bits against the mpmath reference per layer series ("linear1 weights", ...) at the last
    epoch row the first member's divergence block holds (record extra "divergence"), when present."""
    reference_row: int | None = None
    """The epoch row of ``reference``."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["members"] = list(self.members)
        d["reference"] = None if self.reference is None else {k: _num(v) for k, v in self.reference.items()}
        return d


@dataclasses.dataclass(frozen=True)
class ControlVerdict:
    """Does one control change the bits? From pairs of configurations that differ in it alone."""

    variant: str
    """Experiment variant."""
    control: str
    """Controls field (dtype, threads, isa, deterministic, onednn_isa, mkl_cbwr, cpu_model)."""
    values: tuple[Any, ...]
    """The values it takes in the grid."""
    pairs: int
    """Pairs compared."""
    differing: int
    """Pairs whose fingerprints differ."""
    largest: Largest | None
    """Largest divergence among the differing pairs."""
    first: Change | None
    """The earliest first difference among the differing pairs (its layer and tensor)."""
    firsts: tuple[tuple[str, int], ...]
    """Every distinct first (phase layer tensor) among the differing pairs, with how many pairs."""
    by_dtype: tuple[tuple[str, int, int], ...] = ()
    """(dtype, differing pairs, pairs) for each dtype of the grid (dtype itself excepted)."""

    @property
    def changes_bits(self) -> bool:
        return self.differing > 0

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "control": self.control, "values": list(self.values), "pairs": self.pairs,
                "differing": self.differing, "changes_bits": self.changes_bits,
                "largest": None if self.largest is None else self.largest.to_dict(),
                "first": None if self.first is None else self.first.to_dict(),
                "firsts": [[w, n] for w, n in self.firsts],
                "by_dtype": [[d, n, m] for d, n, m in self.by_dtype]}


@dataclasses.dataclass(frozen=True)
class IsaAgreement:
    """Two ``--isa`` settings compared under every combination of the other controls."""

    variant: str
    """Experiment variant."""
    a: str
    """First --isa value, e.g. "default"."""
    b: str
    """Second ISA setting."""
    compared: int
    """Combinations of the other controls under which both ran."""
    agree: tuple[dict[str, Any], ...]
    """The combinations (other controls' values) under which a and b agree bit for bit."""

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "a": self.a, "b": self.b, "compared": self.compared,
                "agree": [dict(c) for c in self.agree]}


@dataclasses.dataclass(frozen=True)
class MachinePair:
    """Two CPUs (emulated or this one) running the same configuration: where and how they part."""

    variant: str
    """Experiment variant."""
    a: str
    """Run key on the first CPU."""
    b: str
    """Run key on the second CPU."""
    cpu_a: str
    """First CPU (cpu_model value, or "native")."""
    cpu_b: str
    """Second CPU."""
    controls: dict[str, Any]
    """The controls both share (cpu_model aside)."""
    identical: bool
    """Bit-identical fingerprints."""
    first: Change | None
    """Where they first part."""
    growth_rate: float | None
    """ln(max parameter divergence) per epoch before saturation (compare.growth)."""
    saturation_epoch: int | None
    """Epoch row where the divergence stops growing, if it does."""
    series: tuple[tuple[int, float], ...]
    """(epoch row, max |a - b| over all parameters) at a few rows."""
    closer_to_reference: dict[str, str] | None
    """layer -> "a" | "b" | "tie", when both records carry a reference divergence."""
    final_train_loss: tuple[float, float]
    """Eval-mode training MSE at the last epoch on a and on b."""
    float64_distance: tuple[tuple[int, float, float], ...] = ()
    """(epoch row, max |a - a64|, max |b - b64|): each run's parameter distance from the float64 run of the
    same configuration on its own CPU, when the grid has one (a proxy for exact arithmetic while the
    trajectory stays well-conditioned; empty for float64 pairs or without float64 runs)."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["float64_distance"] = [[r, _num(x), _num(y)] for r, x, y in self.float64_distance]
        d["first"] = None if self.first is None else self.first.to_dict()
        d["growth_rate"] = _num(self.growth_rate)
        d["series"] = [[r, _num(v)] for r, v in self.series]
        d["final_train_loss"] = [_num(v) for v in self.final_train_loss]
        return d


@dataclasses.dataclass(frozen=True)
class MatrixSummary:
    """Everything `bnaudit matrix` reports; JSON, tables and Markdown all come from it."""

    plan_id: str
    """Hash of the matrix's experiment and grid."""
    preset: str | None
    """The preset, if any."""
    folder: str
    """The matrix folder."""
    epochs: int
    """Epochs of every run."""
    variants: tuple[tuple[str, str], ...]
    """(name, spec hash) of each experiment variant."""
    grid: dict[str, list[Any]]
    """The controls' values."""
    runs: tuple[RunRow, ...]
    """Every configuration."""
    classes: tuple[ClassRow, ...]
    """Equivalence classes of identical fingerprints, per variant."""
    verdicts: tuple[ControlVerdict, ...]
    """For each control that varies: does it change the bits."""
    isa_agreement: tuple[IsaAgreement, ...]
    """Which combination makes two ISA settings agree bit for bit."""
    machines: tuple[MachinePair, ...]
    """Pairs of configurations that differ in the CPU (cpu_model) alone."""
    wall_seconds: float | None
    """Wall time of this invocation's execution (None when only summarised)."""
    notes: tuple[str, ...]
    """Caveats (failed runs, missing reference, ...)."""
    findings: tuple[str, ...] = ()
    """The answers in sentences (``findings``), derived from the fields above."""

    @property
    def complete(self) -> bool:
        return all(r.status in ("ran", "resumed") for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SUMMARY_SCHEMA,
            "plan_id": self.plan_id,
            "preset": self.preset,
            "folder": self.folder,
            "epochs": self.epochs,
            "variants": [{"name": n, "spec_hash": h} for n, h in self.variants],
            "grid": self.grid,
            "complete": self.complete,
            "runs": [r.to_dict() for r in self.runs],
            "classes": [c.to_dict() for c in self.classes],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "isa_agreement": [a.to_dict() for a in self.isa_agreement],
            "machines": [m.to_dict() for m in self.machines],
            "wall_seconds": _num(self.wall_seconds),
            "notes": list(self.notes),
            "findings": list(self.findings),
        }


def _change(diff: Any, a: str, b: str) -> Change:
    return Change(epoch=int(diff.epoch), step=None if diff.step is None else int(diff.step), phase=str(diff.phase),
                  layer=str(diff.layer), tensor=diff.tensor, where=str(diff.where), a=a, b=b)


def _largest(pc: Any, fa: record.Fingerprint, fb: record.Fingerprint, a: str, b: str) -> Largest | None:
    """The largest divergence of a differing pair (across storage dtypes: |a - b| in float64 only)."""
    div = pc.divergence
    if div is not None and div.rows and div.layers:
        i, j = np.unravel_index(int(np.argmax(div.max_abs)), div.max_abs.shape)
        return Largest(max_abs=float(div.max_abs[i, j]), max_ulps=int(div.max_ulps.max()), row=int(div.rows[i]),
                       layer=str(div.layers[j]), a=a, b=b)
    # Different storage dtypes: compare the stored values as float64 (exact for every storage).
    rows, ia, ib = np.intersect1d(fa.snapshot_rows, fb.snapshot_rows, return_indices=True)
    if not len(rows) or [n for n, _ in fa.params] != [n for n, _ in fb.params]:
        return None
    va = bits.to_float64(fa.snapshots[ia], fa.storage)
    vb = bits.to_float64(fb.snapshots[ib], fb.storage)
    with np.errstate(invalid="ignore"):
        d = np.abs(va - vb)
    d = np.where(np.isnan(d), np.inf, d)
    i, k = np.unravel_index(int(np.argmax(d)), d.shape)
    layer_of = [name.split(".")[0] for name, shape in fa.params for _ in range(int(np.prod(shape)))]
    return Largest(max_abs=float(d[i, k]), max_ulps=None, row=int(rows[i]), layer=layer_of[k], a=a, b=b)


def _distance_rows(fa: record.Fingerprint, fb: record.Fingerprint) -> dict[int, float]:
    """Epoch row -> largest |a - b| over all parameters, as float64 (exact for every storage dtype)."""
    rows, ia, ib = np.intersect1d(fa.snapshot_rows, fb.snapshot_rows, return_indices=True)
    if not len(rows) or [n for n, _ in fa.params] != [n for n, _ in fb.params]:
        return {}
    with np.errstate(invalid="ignore"):
        d = np.abs(bits.to_float64(fa.snapshots[ia], fa.storage) - bits.to_float64(fb.snapshots[ib], fb.storage))
    d = np.where(np.isnan(d), np.inf, d).max(axis=1)
    return {int(r): float(v) for r, v in zip(rows, d, strict=True)}


def _float64_distance(plan: Plan, variant: str, a: PlannedRun, b: PlannedRun,
                      fps: dict[str, record.Fingerprint]) -> tuple[tuple[int, float, float], ...]:
    """Each run's distance from the float64 run of its configuration on its own CPU (see MachinePair)."""
    if a.config.controls.dtype == "float64":
        return ()
    twins = []
    for run in (a, b):
        want = dataclasses.replace(run.config.controls, dtype="float64")
        twin = next((r for r in plan.runs if r.variant == variant and r.config.controls == want), None)
        if twin is None or twin.key not in fps:
            return ()
        twins.append(_distance_rows(fps[run.key], fps[twin.key]))
    marks = set(record.fingerprint_rows(plan.epochs))
    return tuple((r, twins[0][r], twins[1][r]) for r in sorted(set(twins[0]) & set(twins[1]) & marks))


def _series(pc: Any) -> tuple[tuple[int, float], ...]:
    div = pc.divergence
    if div is None or not div.rows:
        return ()
    overall = div.overall()
    marks = set(record.fingerprint_rows(max(div.rows))) | {div.rows[-1]}
    return tuple((int(r), float(v)) for r, v in zip(div.rows, overall, strict=True) if r in marks)


def reference_bits(fp: record.Fingerprint) -> tuple[int, dict[str, float]] | None:
    """(last row, correct bits per series there) from the run's divergence block; None if absent or unreadable."""
    block = fp.extra.get("divergence")
    if not isinstance(block, dict):
        return None
    try:
        table = divergence.bits_table(block)
    except InputError:
        return None
    if not table.rows:
        return None
    return table.rows[-1], {name: float(b) for name, b in zip(table.series, table.bits[:, -1])}


def _cpu(value: str | None) -> str:
    return "native" if value is None else value


def summarise(plan: Plan, out: Path, execution: Execution | None = None) -> MatrixSummary:
    """Read every record of the matrix folder and answer: which controls change the bits, and how."""
    from bnaudit import compare

    out = Path(out)
    statuses: dict[str, str] = {}
    errors: dict[str, str] = {}
    if execution is not None:
        statuses.update({k: "ran" for k in execution.ran})
        statuses.update({k: "resumed" for k in execution.resumed})
        for f in execution.failures:
            statuses[f.key], errors[f.key] = "failed", f.message
    fps: dict[str, record.Fingerprint] = {}
    metas: dict[str, dict[str, Any]] = {}
    for run in plan.runs:
        rec = finished(plan, run, out)
        if rec is not None:
            fps[run.key], metas[run.key] = rec.fingerprint, rec.meta
            statuses.setdefault(run.key, "resumed")
        elif statuses.get(run.key) != "failed":
            statuses[run.key] = "pending"
    by_key = {r.key: r for r in plan.runs}
    notes: list[str] = []

    classes: list[ClassRow] = []
    class_of: dict[str, int] = {}
    verdicts: list[ControlVerdict] = []
    agreements: list[IsaAgreement] = []
    machines: list[MachinePair] = []
    pair_cache: dict[tuple[str, str], Any] = {}

    def pair(a: str, b: str) -> Any:
        """compare.compare_pair, once per pair (dtype pairs have different storage: allowed, values aside)."""
        if (a, b) not in pair_cache:
            pair_cache[(a, b)] = compare.compare_pair(fps[a], fps[b], allow_different_spec=True)
        return pair_cache[(a, b)]

    for variant in plan.variants:
        keys = [r.key for r in plan.runs if r.variant == variant.name and r.key in fps]
        if not keys:
            continue
        eq = compare.equivalence_classes([fps[k] for k in keys])
        eq = sorted(eq, key=lambda c: min(c.indices))
        all_controls = [dataclasses.asdict(by_key[k].config.controls) for k in keys]
        for n, cls in enumerate(eq, start=1):
            members = tuple(keys[i] for i in cls.indices)
            for m in members:
                class_of[m] = n
            mine = [all_controls[i] for i in cls.indices]
            shared = {f: mine[0][f] for f in CONTROL_FIELDS
                      if all(c[f] == mine[0][f] for c in mine) and not all(c[f] == mine[0][f] for c in all_controls)}
            ref = reference_bits(fps[members[0]])
            classes.append(ClassRow(variant=variant.name, index=n, digest=cls.digest, members=members, shared=shared,
                                    reference=None if ref is None else ref[1],
                                    reference_row=None if ref is None else ref[0]))
        for control in plan.grid.varying():
            groups: dict[tuple[Any, ...], list[str]] = {}
            for k in keys:
                c = dataclasses.asdict(by_key[k].config.controls)
                groups.setdefault(tuple(c[f] for f in CONTROL_FIELDS if f != control), []).append(k)
            n_pairs, differing = 0, 0
            largest: Largest | None = None
            first: Change | None = None
            firsts: Counter[str] = Counter()
            per_dtype: dict[str, list[int]] = {}
            for group in groups.values():
                for a, b in itertools.combinations(group, 2):
                    n_pairs += 1
                    fa, fb = fps[a], fps[b]
                    tally = per_dtype.setdefault(by_key[a].config.controls.dtype, [0, 0])
                    tally[1] += 1
                    if fa.digest == fb.digest:
                        continue
                    differing += 1
                    tally[0] += 1
                    pc = pair(a, b)
                    if pc.first is not None:
                        ch = _change(pc.first, a, b)
                        firsts[f"{ch.phase} {ch.layer} {ch.tensor or '(group)'}"] += 1
                        if first is None or ch.position() < first.position():
                            first = ch
                    big = _largest(pc, fa, fb, a, b)
                    if big is not None and (largest is None or not big.max_abs <= largest.max_abs):
                        largest = big
            verdicts.append(ControlVerdict(
                variant=variant.name, control=control, values=tuple(getattr(plan.grid, control)), pairs=n_pairs,
                differing=differing, largest=largest, first=first, firsts=tuple(firsts.most_common()),
                by_dtype=() if control == "dtype" else tuple((d, n, m) for d, (n, m) in per_dtype.items())))

        # Which combination of the other controls makes two ISA settings agree bit for bit.
        if len(plan.grid.isa) > 1:
            others = [f for f in CONTROL_FIELDS if f != "isa"]
            table: dict[tuple[str, str], tuple[int, list[dict[str, Any]]]] = {}
            groups = {}
            for k, c in zip(keys, all_controls, strict=True):
                groups.setdefault(tuple(c[f] for f in others), []).append(k)
            for combo, group in groups.items():
                for a, b in itertools.combinations(group, 2):
                    sa, sb = by_key[a].config.controls.isa, by_key[b].config.controls.isa
                    n, agree = table.get((sa, sb), (0, []))
                    if fps[a].digest == fps[b].digest:  # name the controls that vary in the grid
                        agree.append({f: v for f, v in zip(others, combo, strict=True) if f in plan.grid.varying()})
                    table[(sa, sb)] = (n + 1, agree)
            for (sa, sb), (n, agree) in table.items():
                agreements.append(IsaAgreement(variant=variant.name, a=sa, b=sb, compared=n, agree=tuple(agree)))

        # CPU pairs: the same configuration on two CPUs.
        if len(plan.grid.cpu_model) > 1:
            groups = {}
            for k, c in zip(keys, all_controls, strict=True):
                groups.setdefault(tuple(c[f] for f in CONTROL_FIELDS if f != "cpu_model"), []).append(k)
            for group in groups.values():
                for a, b in itertools.combinations(group, 2):
                    ca, cb = by_key[a].config.controls, by_key[b].config.controls
                    pc = pair(a, b)
                    common = {f: v for f, v in dataclasses.asdict(ca).items() if f != "cpu_model"}
                    machines.append(MachinePair(
                        variant=variant.name, a=a, b=b, cpu_a=_cpu(ca.cpu_model), cpu_b=_cpu(cb.cpu_model),
                        controls=common, identical=pc.identical,
                        first=None if pc.first is None else _change(pc.first, a, b),
                        growth_rate=pc.growth_rate, saturation_epoch=pc.saturation_epoch, series=_series(pc),
                        closer_to_reference=pc.closer_to_reference,
                        final_train_loss=(float(pc.final_train_loss[0]), float(pc.final_train_loss[1])),
                        float64_distance=_float64_distance(plan, variant.name, by_key[a], by_key[b], fps)))

    # Runs, with the slowdown of emulation against the native twin of the same configuration.
    rows: list[RunRow] = []
    for run in plan.runs:
        meta = metas.get(run.key)
        fp = fps.get(run.key)
        slowdown = None
        if meta is not None and run.config.controls.cpu_model is not None:
            twin_controls = dataclasses.replace(run.config.controls, cpu_model=None)
            twin = next((r for r in plan.runs if r.variant == run.variant and r.config.controls == twin_controls), None)
            if twin is not None and twin.key in metas:
                slowdown = emulate.Slowdown(float(meta["train_seconds"]),
                                            float(metas[twin.key]["train_seconds"])).factor
        eff = meta.get("effective", {}) if meta else {}
        env = meta.get("environment", {}) if meta else {}
        rows.append(RunRow(
            key=run.key, variant=run.variant, controls=dataclasses.asdict(run.config.controls),
            status=statuses[run.key], digest=None if fp is None else fp.digest, class_index=class_of.get(run.key),
            capability=eff.get("cpu_capability"), threads_read_back=eff.get("intra_op_threads"),
            emulated_model=env.get("emulated_cpu_model"),
            train_seconds=None if meta is None else float(meta["train_seconds"]), slowdown=slowdown,
            final_train_loss=None if fp is None else float(fp.train_loss[-1]),
            final_test_loss=None if fp is None else float(fp.test_loss[-1]),
            nonfinite=bool(fp is not None and fp.nonfinite), error=errors.get(run.key)))
    failed = [r for r in rows if r.status == "failed"]
    pending = [r for r in rows if r.status == "pending"]
    if failed:
        notes.append(f"{len(failed)} configuration(s) failed and are left out of the comparisons; "
                     "re-run the same command to retry them")
    if pending:
        notes.append(f"{len(pending)} configuration(s) have not run yet")
    if fps and not any(c.reference for c in classes):
        notes.append("no record carries a divergence from the mpmath reference (extra \"divergence\"): "
                     "closeness to the reference is not reported")
    summary = MatrixSummary(
        plan_id=plan.plan_id, preset=plan.preset, folder=str(out), epochs=plan.epochs,
        variants=tuple((v.name, v.spec.hash) for v in plan.variants), grid=plan.grid.to_dict(), runs=tuple(rows),
        classes=tuple(classes), verdicts=tuple(verdicts), isa_agreement=tuple(agreements), machines=tuple(machines),
        wall_seconds=None if execution is None else execution.wall_seconds, notes=tuple(notes))
    return dataclasses.replace(summary, findings=findings(summary))


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _growth_text(m: MachinePair) -> str:
    parts = []
    if m.growth_rate is not None:
        parts.append(f"grows by ln {m.growth_rate:.3g} per epoch (x{math.exp(m.growth_rate):.3g} per epoch)"
                     if m.growth_rate < 50 else f"grows by ln {m.growth_rate:.3g} per epoch")
    parts.append(f"saturates at epoch {m.saturation_epoch}" if m.saturation_epoch is not None
                 else "does not saturate within the run")
    if m.series:
        parts.append(f"largest parameter difference {_sci(m.series[-1][1])} at epoch {m.series[-1][0]}")
    return ", ".join(parts)


def _closer_text(m: MachinePair) -> str:
    if not m.closer_to_reference:
        return "closeness to the mpmath reference: not available (no reference divergence in the records)"
    votes = Counter(m.closer_to_reference.values())
    return (f"closer to the mpmath reference: {m.cpu_a} in {votes.get('a', 0)} layers, {m.cpu_b} in "
            f"{votes.get('b', 0)}, tied in {votes.get('tie', 0)}")


def _shown(control: str, value: Any) -> str:
    """A control's value for people: native CPU, inherited caps, on/off."""
    if value is None:
        return "native" if control == "cpu_model" else INHERIT
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def findings(summary: MatrixSummary) -> tuple[str, ...]:
    """The matrix's answers in sentences (the same facts as the tables)."""
    out: list[str] = []
    nested = len(summary.variants) > 1
    for v in summary.verdicts:
        where = f"[{v.variant}] " if nested else ""
        name = v.control.replace("_", " ")
        if not v.changes_bits:
            shown = ", ".join(_shown(v.control, x) for x in v.values)
            out.append(f"{where}{name} ({shown}) does not change the bits "
                       f"({v.pairs} pairs compared, all identical)")
            continue
        text = f"{where}{name} changes the bits in {v.differing} of {v.pairs} pairs"
        if len(v.by_dtype) > 1:
            text += " (" + ", ".join(f"{d}: {n}/{m}" for d, n, m in v.by_dtype) + ")"
        if v.first is not None:
            text += f"; first change: {v.first.where}"
        if v.largest is not None:
            ulps = f" ({v.largest.max_ulps} ulps)" if v.largest.max_ulps is not None else ""
            text += f"; largest divergence {_sci(v.largest.max_abs)}{ulps} in {v.largest.layer} at epoch row " \
                    f"{v.largest.row}"
        out.append(text)
    for a in summary.isa_agreement:
        where = f"[{a.variant}] " if nested else ""
        if a.agree:
            combos = "; ".join(", ".join(f"{k}={_shown(k, val)}" for k, val in c.items()) or "the grid's settings"
                               for c in a.agree)
            out.append(f"{where}--isa {a.a} and --isa {a.b} agree bit for bit in {len(a.agree)} of {a.compared} "
                       f"combinations: {combos}")
        else:
            out.append(f"{where}--isa {a.a} and --isa {a.b} never agree bit for bit "
                       f"({a.compared} combinations of the other controls tried)")
    for m in summary.machines:
        where = f"[{m.variant}] " if nested else ""
        what = f"{m.controls['dtype']}, {m.controls['threads']} thread(s), isa {m.controls['isa']}"
        if m.identical:
            out.append(f"{where}{m.cpu_a} and {m.cpu_b} agree bit for bit ({what})")
        else:
            assert m.first is not None
            out.append(f"{where}{m.cpu_a} and {m.cpu_b} ({what}) first part at {m.first.where}; the gap "
                       f"{_growth_text(m)}; {_closer_text(m)}")
    if summary.preset == "seed-machines":
        out += _seed_findings(summary)
    return tuple(out)


def _seed_findings(summary: MatrixSummary) -> list[str]:
    """The seed's question: where its two machines part, how the gap grows, and whether BN matters."""
    pairs = {(m.variant, m.controls["dtype"]): m for m in summary.machines
             if (m.cpu_a, m.cpu_b) == ("seed-i7", "seed-i5")}
    out = []
    for dtype in summary.grid.get("dtype", []):
        bn, plain = pairs.get(("bn", dtype)), pairs.get(("no-bn", dtype))
        if bn is None or plain is None:
            continue

        def state(m: MachinePair) -> str:
            if m.identical:
                return "are bit-identical"
            assert m.first is not None
            return f"part at {m.first.where}, and the gap {_growth_text(m)}"

        text = (f"seed machines, {dtype}: with BN the i7 (Haswell) and the i5 (IvyBridge) {state(bn)}; "
                f"without BN they {state(plain)}")
        if bn.first is not None and plain.first is not None:
            same_place = (bn.first.epoch, bn.first.step, bn.first.phase, bn.first.tensor) == \
                (plain.first.epoch, plain.first.step, plain.first.phase, plain.first.tensor)
            text += "; so without BN they part " + ("at the same place" if same_place else "elsewhere")
            if bn.growth_rate and plain.growth_rate:
                text += (f", but the gap grows {bn.growth_rate / plain.growth_rate:.3g} times faster (in ln units "
                         f"per epoch) with BN" if bn.growth_rate >= plain.growth_rate else
                         f", and the gap grows {plain.growth_rate / bn.growth_rate:.3g} times faster without BN")
        elif bn.identical != plain.identical:
            text += "; so BN decides whether they part at all"
        text += (f"; final train MSE with BN {bn.final_train_loss[0]:.4g} (i7) vs {bn.final_train_loss[1]:.4g} (i5), "
                 f"without BN {plain.final_train_loss[0]:.4g} vs {plain.final_train_loss[1]:.4g}")
        out.append(text)
        for name, m in (("with BN", bn), ("without BN", plain)):
            if m.closer_to_reference:
                out.append(f"seed machines, {dtype}, {name}: {_closer_text(m)}")
            elif m.float64_distance:
                at = [(r, x, y) for r, x, y in m.float64_distance if r > 0]
                if at:
                    wins = sum(x < y for _, x, y in at), sum(y < x for _, x, y in at)
                    shown = "; ".join(f"{r}: {x:.3g} vs {y:.3g}" for r, x, y in at)
                    out.append(f"seed machines, {dtype}, {name}: no mpmath reference divergence in the records; "
                               f"distance from the float64 run on the same CPU (i7 vs i5) by epoch row: {shown}: "
                               f"the i7 is closer at {wins[0]} of {len(at)} rows, the i5 at {wins[1]}")
    return out


def write_summary(summary: MatrixSummary, out: Path, markdown: str) -> None:
    """summary.json and summary.md, each written under a temporary name and renamed."""
    record.write_text_atomic(Path(out) / "summary.json", json.dumps(summary.to_dict(), sort_keys=True, indent=1) + "\n")
    record.write_text_atomic(Path(out) / "summary.md", markdown)


def run_matrix(plan: Plan, out: Path, *, render_markdown: Callable[[MatrixSummary], str], jobs: int = 1,
               force: bool = False, on_event: EventFn | None = None) -> MatrixSummary:
    """Execute (resuming), summarise, and write summary.json and summary.md beside the runs."""
    execution = execute(plan, out, jobs=jobs, force=force, on_event=on_event)
    summary = summarise(plan, out, execution)
    write_summary(summary, out, render_markdown(summary))
    return summary
