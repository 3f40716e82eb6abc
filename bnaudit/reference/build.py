"""Building the reference: the trajectory at two precisions, checked against each other.

The experiment is run twice in mpmath, at ``precision`` bits (the stored trajectory)
and at ``check_precision`` bits (an independent recomputation), epoch by epoch in
lock step.  At every stored row (``record.snapshot_rows``) the two are compared value
by value: the agreement of a row is the smallest number of decimal digits on which
they agree, -log10(|a - b| / |b|), over the row's parameters, running statistics,
probe activations and losses.

Why two precisions.  Rounding at p bits perturbs the trajectory by about 2^-p per
operation; training then amplifies a perturbation by a factor that we do not know in
advance (about 0.2 to 0.5 bits per epoch early on, measured).  The recomputation at a
higher precision carries the same amplification of a perturbation 2^(check - p) times
smaller, so |a - b| is the stored trajectory's error to within a factor
1 + 2^(p - check).  Requiring ``min_digits`` (default 30, ~100 bits) of agreement at
every row guarantees the stored double-double values are right to far more than a
float64 run can resolve.  If a row falls short the build stops with ReferenceFailure
(exit code 8) naming the row and a precision to try.

Two processes.  With ``jobs=2`` (``--jobs 2``, the default where two CPUs are
available) the check precision runs in ``check_process``, a child process started with
this interpreter, and sends each stored row back as exact mpmath tuples; the main
precision and the comparison stay here.  The values are the same bits as in one
process, the wall time about half.  A child that dies or fails is one ReferenceFailure
line (exit code 8); the checkpoint stays, so a rerun resumes.

Resuming.  The build works in ``.<out name>.partial/`` beside the output: ``job.json``
(what is being built), ``state.json`` (the exact state of both trajectories after the
last stored row: every mpf as mantissa:exponent, so resuming continues bit for bit) and
``rows/<row>.npz`` (the finished rows).  An interrupted build, rerun with the same
options, starts after the last finished row.  When every row is done the reference is
written to a temporary folder, its manifest last, and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mpmath
import numpy as np

from bnaudit import record
from bnaudit.errors import Interrupted, OutputError, ReferenceFailure, UsageError
from bnaudit.frozen import FrozenInputs
from bnaudit.reference import engine, store
from bnaudit.spec import ExperimentSpec

DEFAULT_PRECISION = 512
"""Bits of the stored trajectory.  Measured on the default spec: the 512- and 640-bit
trajectories agree on 151 digits at row 0 and on >= 136.6 digits (454 bits) at every
stored row to epoch 1000, so chaos cost about 50 bits over the run (most of it in the
first 100 epochs, 0.2-0.5 bits per epoch there).  Cost per operation hardly depends on
the precision at these sizes (Python overhead dominates), so the margin is cheap."""
DEFAULT_CHECK_PRECISION = 640
"""Bits of the recomputation that certifies it (must differ from the precision)."""
MIN_AGREEMENT_DIGITS = 30.0
"""Decimal digits both precisions must agree on at every stored row (~100 bits)."""
JOB_SCHEMA = "bnaudit.reference-job/2"  # 2: signed exact state text

ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""progress(epochs_done, epochs_total, info): info has "row", "agreement", "seconds"."""


@dataclass(frozen=True)
class RowResult:
    """One stored row of the trajectory."""

    row: int
    """Epoch row (0: initial state)."""
    hi: np.ndarray
    """(n_values,) float64 leading parts."""
    lo: np.ndarray
    """(n_values,) float64 trailing parts."""
    agreement: float
    """Decimal digits on which the two precisions agree (minimum over the row)."""
    worst: str
    """Which section (params, buffers, probe, losses) holds the least-agreeing value."""


class Trajectory:
    """The experiment at one precision, with the values a stored row holds."""

    def __init__(self, spec: ExperimentSpec, frozen: FrozenInputs, prec: int) -> None:
        self.spec = spec
        self.ctx = engine.new_context(prec)
        self.net = engine.Network(spec, self.ctx, frozen.init, frozen.inputs, frozen.targets)
        self.probe_x = [self.net.inputs[int(i)] for i in record.probe_indices(spec)]

    def row_values(self) -> list[Any]:
        """Parameters, buffers, probe activations (blocks per module, sample-major), losses."""
        probe = [v for block in self.net.probe(self.probe_x) for sample in block for v in sample]
        train, test = self.net.eval_losses()
        return self.net.flat_parameters() + self.net.flat_buffers() + probe + [train, test]

    def resume(self, state: dict[str, Any], key: str) -> None:
        """Continue from a checkpoint's exact state (``state[key]``: this precision's values)."""
        self.net.load_flat_state([engine.from_exact(self.ctx, t) for t in state[key]], int(state["steps"]))

    def walk(self, frozen: FrozenInputs, start: int, epochs: int, rows: set[int],
             resumed: bool) -> Iterator[tuple[int, list[Any]]]:
        """Train from epoch row ``start`` to ``epochs``; yield (row, row_values()) at each stored row.

        Row ``start`` itself is yielded only when not ``resumed`` (a checkpoint's row is already stored).
        """
        for row in range(start, epochs + 1):
            if row > start:
                self.net.train_epoch(row - 1, frozen.batches[row - 1])
            if row in rows and not (resumed and row == start):
                yield row, self.row_values()


def agreement_digits(ctx: mpmath.MPContext, a: list[Any], b: list[Any], cap: float) -> tuple[float, int]:
    """min over k of -log10(|a_k - b_k| / |b_k|) computed in ``ctx`` (the higher precision), and its k.

    Equal values (zeros of ReLU included) agree to ``cap`` digits; a zero facing a
    non-zero agrees to 0 digits.
    """
    worst, where = cap, -1
    for k, (x, y) in enumerate(zip(a, b)):
        x, y = ctx.mpf(x), ctx.mpf(y)
        if x == y:
            continue
        if y == 0:
            return 0.0, k
        digits = -float(ctx.log10(abs(x - y) / abs(y)))
        if digits < worst:
            worst, where = digits, k
    return worst, where


def _section_of(index: int, columns: store.Columns) -> str:
    for name, s in columns.slices().items():
        if s.start <= index < s.stop:
            return name
    return "-"


def suggest_precision(precision: int, digits: float, min_digits: float) -> int:
    """A precision that would leave ``min_digits`` where ``precision`` left ``digits`` (rounded up to 64)."""
    needed = precision + (min_digits - digits) / math.log10(2) + 64
    return int(math.ceil(needed / 64) * 64)


def check_options(precision: int, check_precision: int, min_digits: float, jobs: int = 1) -> None:
    """Reject precisions the build cannot certify anything with, and process counts it cannot use (exit code 2)."""
    if precision == check_precision:
        raise UsageError("--precision and --check-precision must differ (the check must be independent)")
    if min(precision, check_precision) < 64 or max(precision, check_precision) > 1 << 16:
        raise UsageError("--precision and --check-precision must be between 64 and 65536 bits")
    if not 0 < min_digits <= 10000:
        raise UsageError(f"--min-digits must be positive, got {min_digits:g}")
    if jobs not in (1, 2):
        raise UsageError(f"--jobs must be 1 or 2 (one process per precision), got {jobs}")


def default_jobs() -> int:
    """Processes for a build: the two precisions side by side where two CPUs are free to us."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


CheckRow = tuple[int, list[Any], list[str], float]
"""One stored row of the check trajectory: (row, values, exact state text, CPU seconds so far)."""


def _check_rows_here(traj: Trajectory, frozen: FrozenInputs, start: int, epochs: int, rows: set[int],
                     resumed: bool) -> Generator[CheckRow, None, None]:
    """The check trajectory in this process (lock step with the main one)."""
    for row, values in traj.walk(frozen, start, epochs, rows, resumed):
        yield row, values, [engine.to_exact(v) for v in traj.net.flat_state()], 0.0


def _check_rows_child(traj_ctx: mpmath.MPContext, spec: ExperimentSpec, frozen: FrozenInputs, prec: int,
                      start: int, epochs: int, rows: set[int],
                      resume: dict[str, Any] | None) -> Generator[CheckRow, None, None]:
    """The check trajectory in a second process (``check_process``), read back as exact mpf of ``traj_ctx``."""
    request = pickle.dumps((spec, frozen, prec, start, epochs, rows, resume))
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([sys.executable, "-m", "bnaudit.reference.check_process"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            try:
                proc.stdin.write(request)
                proc.stdin.close()
            except BrokenPipeError:  # it died at once: reported below, with what it said
                pass
            while True:
                try:
                    message = pickle.load(proc.stdout)
                except (EOFError, pickle.UnpicklingError):
                    proc.wait()
                    errors.seek(0)
                    said = [line for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
                    raise ReferenceFailure(
                        f"the {prec}-bit check process stopped without a result (exit code {proc.returncode}"
                        f"{': ' + said[-1].strip() if said else ''}); rerun to resume") from None
                if message[0] == "done":
                    return
                if message[0] == "error":
                    raise ReferenceFailure(f"the {prec}-bit check process failed: {message[1]}")
                _, row, values, state, cpu = message
                yield row, [traj_ctx.make_mpf(v) for v in values], state, cpu
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()


def trajectory(spec: ExperimentSpec, frozen: FrozenInputs, *, precision: int, check_precision: int,
               epochs: int, min_digits: float = MIN_AGREEMENT_DIGITS,
               resume: dict[str, Any] | None = None, jobs: int = 1) -> Iterator[tuple[RowResult, dict[str, Any]]]:
    """Yield each stored row up to ``epochs`` with the exact state after it (for checkpoints).

    ``jobs=2`` computes the check precision in a second process (same values, about
    half the wall time on two free cores); the state's "check_cpu_seconds" is that
    process's CPU time so far.  Raises ReferenceFailure at the first row where the
    precisions agree on fewer than ``min_digits`` digits.
    """
    check_options(precision, check_precision, min_digits, jobs)
    cap = min(precision, check_precision) * math.log10(2)
    columns = store.Columns.for_spec(spec)
    rows = set(store.reference_rows(spec, epochs))
    start = int(resume["epoch"]) if resume is not None else 0
    main = Trajectory(spec, frozen, precision)
    if resume is not None:
        main.resume(resume, "main")
    check_rows: Generator[CheckRow, None, None]
    if jobs == 1:
        check = Trajectory(spec, frozen, check_precision)
        if resume is not None:
            check.resume(resume, "check")
        check_ctx = check.ctx
        check_rows = _check_rows_here(check, frozen, start, epochs, rows, resume is not None)
    else:
        check_ctx = engine.new_context(check_precision)
        check_rows = _check_rows_child(check_ctx, spec, frozen, check_precision, start, epochs, rows, resume)
    hi_ctx = main.ctx if precision > check_precision else check_ctx
    try:
        for (row, a), (check_row, b, check_state, check_cpu) in zip(
                main.walk(frozen, start, epochs, rows, resume is not None), check_rows):
            assert row == check_row, (row, check_row)
            digits, where = agreement_digits(hi_ctx, a, b, cap)
            worst = _section_of(where, columns) if where >= 0 else "-"
            if digits < min_digits:
                suggested = suggest_precision(precision, digits, min_digits)
                raise ReferenceFailure(
                    f"reference precision check failed at epoch row {row}: {precision} and {check_precision} bits "
                    f"agree on only {digits:.1f} decimal digits (< {min_digits:g}, worst in {worst}); "
                    f"try --precision {suggested} --check-precision {suggested + 128}")
            pairs = [engine.double_double(v) for v in a]
            result = RowResult(row=row, hi=np.array([p[0] for p in pairs], dtype="<f8"),
                               lo=np.array([p[1] for p in pairs], dtype="<f8"), agreement=digits, worst=worst)
            state = {"epoch": row, "steps": main.net.steps,
                     "main": [engine.to_exact(v) for v in main.net.flat_state()],
                     "check": check_state, "check_cpu_seconds": check_cpu}
            yield result, state
    finally:
        check_rows.close()  # stops the child process, if any


# --------------------------------------------------------------------------- the build

def _job(spec: ExperimentSpec, frozen: FrozenInputs, precision: int, check_precision: int,
         min_digits: float) -> dict[str, Any]:
    return {"schema": JOB_SCHEMA, "spec_hash": spec.hash, "frozen": frozen.digest, "precision": precision,
            "check_precision": check_precision, "min_digits": min_digits}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _load_done(work: Path, job: dict[str, Any], columns: store.Columns) -> tuple[dict[str, Any] | None,
                                                                                  dict[int, RowResult]]:
    """The checkpoint and finished rows of an earlier build of the same job (or nothing).

    The checkpoint's "row_seconds" maps each finished row to the build time it took to reach it.
    """
    try:
        if json.loads((work / "job.json").read_text()) != job:
            return None, {}
        state = json.loads((work / "state.json").read_text())
    except (OSError, ValueError):
        return None, {}
    state.setdefault("row_seconds", {})
    done: dict[int, RowResult] = {}
    for path in sorted((work / "rows").glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as z:
                r = RowResult(int(z["row"]), z["hi"].copy(), z["lo"].copy(), float(z["agreement"]), str(z["worst"]))
                seconds = float(z["seconds"]) if "seconds" in z.files else None
        except (OSError, ValueError, KeyError):
            continue
        if r.row <= int(state.get("epoch", -1)) and r.hi.shape == (columns.total,):
            done[r.row] = r
            if seconds is not None:
                state["row_seconds"][str(r.row)] = seconds
    return state, done


def build(spec: ExperimentSpec, frozen: FrozenInputs, out: Path, *, precision: int = DEFAULT_PRECISION,
          check_precision: int = DEFAULT_CHECK_PRECISION, epochs: int | None = None,
          min_digits: float = MIN_AGREEMENT_DIGITS, progress: ProgressFn | None = None,
          force: bool = False, jobs: int = 1) -> store.StoredReference:
    """Build (or resume building) the reference of ``spec`` into ``out``; return it loaded.

    ``jobs=2`` computes the two precisions in two processes (bit-identical result).
    """
    out = Path(out)
    epochs = spec.train.epochs if epochs is None else epochs
    if not 1 <= epochs <= spec.train.epochs:
        raise UsageError(f"--epochs must be between 1 and the spec's {spec.train.epochs}, got {epochs}")
    check_options(precision, check_precision, min_digits, jobs)
    if (out / "manifest.json").exists() and not force:
        raise OutputError(f"{out} already holds a reference; pass --force to rebuild it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    columns = store.Columns.for_spec(spec)
    job = _job(spec, frozen, precision, check_precision, min_digits)
    work = work_folder(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        state, done = _load_done(work, job, columns)
        if state is None:
            shutil.rmtree(work, ignore_errors=True)
            (work / "rows").mkdir(parents=True)
            _write_json_atomic(work / "job.json", job)
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    rows = store.reference_rows(spec, epochs)
    started, cpu_started, last_child_cpu = time.perf_counter(), time.process_time(), 0.0
    seconds_before = float(state.get("seconds", 0.0)) if state else 0.0
    cpu_before = float(state.get("cpu_seconds", 0.0)) if state else 0.0
    # Every row already finished (a shorter prefix of an interrupted longer build): write it as is.
    prefix_ready = state is not None and all(r in done for r in rows)
    if state is not None and not prefix_ready and int(state["epoch"]) > epochs:
        state, done = None, {}
        shutil.rmtree(work / "rows", ignore_errors=True)
        (work / "rows").mkdir(parents=True)
    resume = state if state is not None and not prefix_ready else None
    first_todo = epochs if prefix_ready else int(resume["epoch"]) if resume else 0
    if progress is not None:
        progress(first_todo, epochs, {"row": first_todo, "agreement": None, "seconds": seconds_before,
                                      "resumed": state is not None})
    if not prefix_ready:
        try:
            for result, st in trajectory(spec, frozen, precision=precision, check_precision=check_precision,
                                         epochs=epochs, min_digits=min_digits, resume=resume, jobs=jobs):
                try:
                    tmp = work / "rows" / f".{result.row:06d}.tmp.npz"
                    st["seconds"] = seconds_before + time.perf_counter() - started
                    child_cpu = st.pop("check_cpu_seconds")
                    st["cpu_seconds"] = cpu_before + time.process_time() - cpu_started + child_cpu
                    last_child_cpu = child_cpu
                    np.savez(tmp, row=np.int64(result.row), hi=result.hi, lo=result.lo,
                             agreement=np.float64(result.agreement), worst=np.str_(result.worst),
                             seconds=np.float64(st["seconds"]))
                    os.replace(tmp, work / "rows" / f"{result.row:06d}.npz")
                    _write_json_atomic(work / "state.json", st)
                except OSError as exc:
                    raise OutputError(f"cannot write the build checkpoint in {work}: {exc.strerror or exc}") from None
                done[result.row] = result
                if progress is not None:
                    progress(result.row, epochs, {"row": result.row, "agreement": result.agreement,
                                                  "worst": result.worst, "seconds": st["seconds"]})
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted with {len(done)} of {len(rows)} stored rows done; rerun the same "
                              f"command to resume from the checkpoint in {work}") from None
    missing = [r for r in rows if r not in done]
    if missing:
        raise ReferenceFailure(f"build checkpoint in {work} lacks rows {missing[:5]}; delete it and rebuild")
    seconds = seconds_before + time.perf_counter() - started
    cpu_seconds: float | None = cpu_before + time.process_time() - cpu_started + last_child_cpu
    if prefix_ready and state is not None:
        seconds = float(state["row_seconds"].get(str(epochs), seconds_before))
        cpu_seconds = None if int(state["epoch"]) > epochs else cpu_seconds
    write(out, spec, frozen, [done[r] for r in rows], precision=precision, check_precision=check_precision,
          epochs=epochs, min_digits=min_digits, seconds=seconds, cpu_seconds=cpu_seconds, jobs=jobs)
    if not (state is not None and int(state["epoch"]) > epochs):
        shutil.rmtree(work, ignore_errors=True)  # keep the checkpoint of a longer build we took a prefix of
    return store.read(out, spec)


def write(out: Path, spec: ExperimentSpec, frozen: FrozenInputs, results: list[RowResult], *, precision: int,
          check_precision: int, epochs: int, min_digits: float, seconds: float,
          cpu_seconds: float | None = None, jobs: int = 1) -> None:
    """Write the reference folder atomically (temporary folder, manifest last, rename)."""
    from mpmath import libmp

    hi = np.stack([r.hi for r in results]).astype("<f8")
    lo = np.stack([r.lo for r in results]).astype("<f8")
    blobs = {"values_hi.npy": store.npy_bytes(hi), "values_lo.npy": store.npy_bytes(lo)}
    files = {name: store._sha(b) for name, b in sorted(blobs.items())}
    manifest = {
        "schema": store.REFERENCE_SCHEMA,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "frozen": frozen.digest,
        "precision": precision,
        "check_precision": check_precision,
        "min_digits": min_digits,
        "epochs": epochs,
        "rows": [r.row for r in results],
        "columns": {"n_params": 0, "n_buffers": 0, "n_probe": 0, "n_losses": 0} | _columns_dict(spec),
        "agreement": [round(r.agreement, 2) for r in results],
        "agreement_worst_section": [r.worst for r in results],
        "values": "double-double: value = hi + lo, hi = value rounded to nearest float64, lo = rest rounded",
        "rows_schedule": "record.snapshot_rows(epochs): every epoch row to 100, then every 10th, and the last",
        "build": {
            "mpmath": mpmath.__version__,
            "backend": libmp.BACKEND,
            "seconds": round(seconds, 1),
            "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
            "jobs": jobs,
            "created": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        },
        "files": files,
    }
    with record.atomic_folder(out, "the reference") as tmp:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")


def _columns_dict(spec: ExperimentSpec) -> dict[str, int]:
    c = store.Columns.for_spec(spec)
    return {"n_params": c.n_params, "n_buffers": c.n_buffers, "n_probe": c.n_probe, "n_losses": c.n_losses}


# --------------------------------------------------------------------------- verification

def verify(ref: store.StoredReference, frozen: FrozenInputs, *, epochs: int = 2) -> list[int]:
    """Recompute the first ``epochs`` epochs; every stored row up to there must match bit for bit.

    Returns the rows checked; raises ReferenceFailure naming the first mismatch.
    """
    if frozen.digest != ref.frozen:
        raise ReferenceFailure(f"reference {ref.path} was built from other frozen inputs "
                               f"({ref.frozen[:12]} != {frozen.digest[:12]})")
    epochs = min(epochs, ref.epochs)
    index = ref.row_index()
    checked = []
    for result, _ in trajectory(ref.spec, frozen, precision=ref.precision, check_precision=ref.check_precision,
                                epochs=epochs, min_digits=ref.min_digits):
        i = index[result.row]
        same = (np.array_equal(result.hi.view("<u8"), ref.hi[i].view("<u8"))
                and np.array_equal(result.lo.view("<u8"), ref.lo[i].view("<u8")))
        if not same:
            bad = int(np.flatnonzero((result.hi.view("<u8") != ref.hi[i].view("<u8"))
                                     | (result.lo.view("<u8") != ref.lo[i].view("<u8")))[0])
            raise ReferenceFailure(f"reference {ref.path}: row {result.row} value {bad} "
                                   f"({_section_of(bad, ref.columns)}) differs from its recomputation")
        checked.append(result.row)
    return checked


def build_cached(spec: ExperimentSpec, frozen: FrozenInputs, *, epochs: int | None = None,
                 progress: ProgressFn | None = None, jobs: int | None = None) -> store.StoredReference:
    """The reference of a spec from the cache, built there first if needed (custom specs)."""
    folder = store.folder_for(spec)
    if store.exists(spec, folder):
        ref = store.read(folder, spec)
        if epochs is None or ref.epochs >= epochs:
            return ref
    return build(spec, frozen, folder, epochs=epochs, progress=progress, force=True,
                 jobs=default_jobs() if jobs is None else jobs)
