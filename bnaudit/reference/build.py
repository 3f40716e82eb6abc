"""Building the reference: the trajectory at two precisions, checked against each other.

The experiment is run twice in mpmath, at ``precision`` bits (the stored trajectory)
and at ``check_precision`` bits (an independent recomputation), epoch by epoch in
lock step.  At every stored row (``layout.probe_schedule``) the two are compared value
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
(what is being built), ``rows/<row>.npz`` (the finished rows), ``state.json`` (the exact
state of both trajectories after the last stored row, every mpf as mantissa:exponent so
that resuming continues bit for bit, and the sha256 of every finished row file; sealed
by a sha256 of the rest) and ``state.prev.json`` (the same one row earlier).  An
interrupted build, rerun with the same options, starts after the last finished row.  A
damaged checkpoint is one note, never an error: a changed or unreadable last row or
state.json falls back to state.prev.json and recomputes one row; a damaged earlier row
starts the build over (the exact state is kept for the last row only: a few hundred kB
per row would be hundreds of MB over the run).  When every row is done the reference is
written to a temporary folder, its manifest last, and renamed into place.

Verifying.  The stored rows are double-doubles, not exact states, so a row can only be
recomputed by replaying the stored precision from epoch 0: ``verify`` replays up to the
last row it checks, the first epochs and a few rows drawn at random, or all of them.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mpmath
import numpy as np

from bnaudit import fileio
from bnaudit.errors import InputError, Interrupted, OutputError, ReferenceFailure, UsageError
from bnaudit.frozen import FrozenInputs
from bnaudit.layout import after, probe_indices
from bnaudit.reference import engine, store
from bnaudit.reference.store import (
    DEFAULT_CHECK_PRECISION,
    DEFAULT_PRECISION,
    MIN_AGREEMENT_DIGITS,
    VERIFY_RANDOM_ROWS,
    VERIFY_RANDOM_WITHIN,
)
from bnaudit.spec import ExperimentSpec

JOB_SCHEMA = "bnaudit.reference-job/3"  # 3: sealed state with the sha256 of every row; state.prev.json

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
        self.probe_x = [self.net.inputs[int(i)] for i in probe_indices(spec)]

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
                    f"reference precision check failed ({after(row)}): {precision} and {check_precision} bits "
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

STATE_FILES = ("state.json", "state.prev.json")
"""The checkpoint after the last stored row, and the one before it (the fallback)."""


def _job(spec: ExperimentSpec, frozen: FrozenInputs, precision: int, check_precision: int,
         min_digits: float) -> dict[str, Any]:
    return {"schema": JOB_SCHEMA, "spec_hash": spec.hash, "frozen": frozen.digest, "precision": precision,
            "check_precision": check_precision, "min_digits": min_digits}


@dataclass(frozen=True)
class _Resume:
    """A checkpoint that was read back whole: the state, its file text and the finished rows it names."""

    state: dict[str, Any]
    """The sealed state document: "epoch", "steps", "main", "check", "rows" (row -> sha256 of its file), ..."""
    text: str
    """Its file text (becomes state.prev.json when the next row is stored)."""
    done: dict[int, RowResult]
    row_seconds: dict[int, float]
    """Build time (wall seconds) it took to reach each finished row."""


def _stored(row: int) -> str:
    """A stored state of the build in words: "the initial state", "the stored state after epoch 3"."""
    return after(row) if row == 0 else f"the stored state {after(row)}"


class _Unreadable(Exception):
    """A checkpoint file that cannot be used: what ``was`` wrong with it (the end of a one-line note)."""

    def __init__(self, was: str, row: int = -1) -> None:
        super().__init__(was)
        self.was, self.row = was, row

    @classmethod
    def reading(cls, path: Path, exc: InputError, row: int = -1) -> _Unreadable:
        """From fileio's error for a file that could not be read at all."""
        if not path.exists():
            return cls("was missing", row)
        return cls(f"was unreadable ({exc.message.removeprefix(f'{path}: ')})", row)


def _seal(doc: dict[str, Any]) -> str:
    """The file text of a state document with its "seal": the sha256 of the rest.

    The exact state is a few hundred kB of hexadecimal mantissas; a flipped digit still
    parses, and would resume a different trajectory.  The seal makes any change to it (or to
    the row table) one refusal instead.
    """
    body = {k: v for k, v in doc.items() if k != "seal"}
    return json.dumps(body | {"seal": fileio.canonical_sha256(body)}, sort_keys=True)


def _checkpoint(work: Path, result: RowResult, state: dict[str, Any], hashes: dict[str, str],
                prev_text: str | None) -> str:
    """Store one finished row, then the state that resumes after it; return that state's text.

    The order is what makes every interruption resumable.  The row file comes first (a
    row that state.json does not list yet is just recomputed), then the previous state
    as state.prev.json, then state.json; each is written under a hidden temporary name
    and renamed into place, so each file is old or new, never partial.  A power cut can
    still persist a rename before the data; then state.json or the last row is damaged
    and the resume falls back one row, to state.prev.json.  The sha256 of each row file
    in the sealed state lets a resume refuse a row changed after it was written.
    """
    buf = io.BytesIO()
    np.savez(buf, row=np.int64(result.row), hi=result.hi, lo=result.lo, agreement=np.float64(result.agreement),
             worst=np.str_(result.worst), seconds=np.float64(state["seconds"]))
    blob = buf.getvalue()
    fileio.write_bytes_atomic(work / "rows" / f"{result.row:06d}.npz", blob)
    hashes[str(result.row)] = hashlib.sha256(blob).hexdigest()
    text = _seal(state | {"rows": dict(hashes)})
    if prev_text is not None:
        fileio.write_text_atomic(work / STATE_FILES[1], prev_text)
    fileio.write_text_atomic(work / STATE_FILES[0], text)
    return text


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _state_limit(job: dict[str, Any], columns: store.Columns) -> int:
    """Most bytes a state file can hold: both precisions' exact state (hex mantissas) and the row table."""
    digits = max(int(job["precision"]), int(job["check_precision"])) // 4 + 32
    return 2 * (2 * columns.n_params + columns.n_buffers) * digits + (4 << 20)


def _read_state(path: Path, limit: int) -> tuple[dict[str, Any], str]:
    """A state document and its text; _Unreadable if it is missing, not JSON, unsealed or malformed."""
    try:
        blob = fileio.read_bounded(path, "build checkpoint", limit)
    except InputError as exc:
        raise _Unreadable.reading(path, exc) from None
    try:
        doc = fileio.parse_json(blob, str(path), "build checkpoint")
    except InputError:
        raise _Unreadable("was unreadable (not JSON: truncated or corrupt)") from None
    if doc.get("seal") != fileio.canonical_sha256({k: v for k, v in doc.items() if k != "seal"}):
        raise _Unreadable("was changed after it was written (its seal does not match its content)")
    ints = all(isinstance(doc.get(k), int) and not isinstance(doc.get(k), bool) and doc[k] >= 0
               for k in ("epoch", "steps"))
    texts = all(isinstance(doc.get(k), list) and all(isinstance(t, str) for t in doc[k]) for k in ("main", "check"))
    table = doc.get("rows")
    if not (ints and texts and isinstance(table, dict) and str(doc["epoch"]) in table
            and all(k.isdigit() and isinstance(v, str) for k, v in table.items())):
        raise _Unreadable("was unreadable (malformed)")
    return doc, blob.decode("utf-8")


def _read_row(path: Path, sha256: str, row: int, columns: store.Columns) -> tuple[RowResult, float | None]:
    """One finished row, refused (_Unreadable) unless its bytes are the ones the checkpoint recorded."""
    try:
        blob = fileio.read_bounded(path, "build checkpoint row", 16 * columns.total + (64 << 10))
    except InputError as exc:
        raise _Unreadable.reading(path, exc, row) from None
    # Parsed before the hash is compared only to tell a truncated file from an altered one.
    try:
        loaded = np.load(io.BytesIO(blob), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with loaded as z:
            r = RowResult(int(z["row"]), z["hi"].copy(), z["lo"].copy(), float(z["agreement"]), str(z["worst"]))
            seconds = float(z["seconds"]) if "seconds" in z.files else None
    except (OSError, ValueError, TypeError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile):
        raise _Unreadable("was unreadable (not an .npz: truncated or corrupt)", row) from None
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise _Unreadable("was changed after it was written (its sha256 is not the one recorded)", row)
    if r.row != row or r.hi.shape != (columns.total,) or r.lo.shape != (columns.total,):
        raise _Unreadable("was unreadable (another row or layout)", row)
    return r, seconds


def _read_rows(work: Path, table: dict[str, str], columns: store.Columns) -> tuple[dict[int, RowResult],
                                                                                  dict[int, float]]:
    """Every row a state lists (rows/NNNNNN.npz by name: a hidden temporary file is never read)."""
    done, seconds = {}, {}
    for row in sorted(int(k) for k in table):
        done[row], s = _read_row(work / "rows" / f"{row:06d}.npz", table[str(row)], row, columns)
        if s is not None:
            seconds[row] = s
    return done, seconds


def _load_done(work: Path, job: dict[str, Any], columns: store.Columns) -> tuple[_Resume | None, str | None]:
    """The checkpoint of an earlier build of the same job to resume from (or None), and a line on what was wrong.

    state.json is used when it and every row it lists read back as written; else
    state.prev.json (one row earlier), whose rows are the same but the last.  A damaged
    row before the last cannot be recomputed from a checkpoint (only the last row's exact
    state is kept), so then the build starts over.
    """
    where = f"build checkpoint in {work}"
    if not any((work / name).exists() for name in STATE_FILES):
        return None, None  # nothing finished yet (or no earlier build): nothing to say
    try:
        same_job = fileio.read_json(work / "job.json", "build job") == job
    except InputError:
        return None, f"{where}: job.json was unreadable; the build starts over from the initial state"
    if not same_job:
        return None, (f"{where} was for other options or another bnaudit version; the build starts over from the "
                      "initial state")
    problems: list[str] = []
    for name in STATE_FILES:
        try:
            state, text = _read_state(work / name, _state_limit(job, columns))
        except _Unreadable as exc:
            problems += [f"{name} {exc.was}"]
            continue
        try:
            done, seconds = _read_rows(work, state["rows"], columns)
        except _Unreadable as exc:
            problem = f"{_stored(exc.row)} {exc.was}"
            if exc.row != state["epoch"]:
                return None, (f"{where}: {problem}; the build starts over from the initial state (only the last stored "
                              "state can be recomputed from the checkpoint)")
            problems += [problem] if problem not in problems else []  # both checkpoints end at the same stored state
            continue
        note = f"{where}: {'; '.join(problems)}; resumed from {_stored(int(state['epoch']))}" if problems else None
        return _Resume(state, text, done, seconds), note
    return None, f"{where}: {'; '.join(problems)}; the build starts over from the initial state"


def _open_work(out: Path, work: Path, job: dict[str, Any], columns: store.Columns, rows: list[int],
               epochs: int) -> tuple[_Resume | None, str | None]:
    """The checkpoint to resume or take a prefix from, or a fresh work folder (None); and a note on the old one."""
    fileio.refuse_installation(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        resume, note = _load_done(work, job, columns)
        if resume is not None and int(resume.state["epoch"]) > epochs and not all(r in resume.done for r in rows):
            resume = None  # a longer build's checkpoint without this schedule's last row: cannot go back
        if resume is None:
            shutil.rmtree(work, ignore_errors=True)
            (work / "rows").mkdir(parents=True)
            fileio.write_text_atomic(work / "job.json", json.dumps(job, sort_keys=True))
        else:  # temporary files a kill left (never read, but not to pile up either)
            for leftover in [*work.glob(".*"), *(work / "rows").glob(".*")]:
                if leftover.is_file():
                    leftover.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    return resume, note


@dataclass
class _Clock:
    """Build time: earlier sessions' (from the checkpoint) plus this one's, the check process's CPU included."""

    seconds_before: float = 0.0
    cpu_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)
    child_cpu: float = 0.0
    """CPU seconds of this session's check process so far (0 in one process)."""

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def cpu_seconds(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_started + self.child_cpu


def _compute_rows(spec: ExperimentSpec, frozen: FrozenInputs, work: Path, resume: _Resume | None,
                  done: dict[int, RowResult], clock: _Clock, *, progress: ProgressFn | None, n_rows: int,
                  **options: Any) -> None:
    """Compute every row after the checkpoint (all of them without one), storing each as it is finished."""
    exact = None if resume is None else {k: resume.state[k] for k in ("epoch", "steps", "main", "check")}
    hashes: dict[str, str] = {} if resume is None else dict(resume.state["rows"])
    prev_text = None if resume is None else resume.text
    try:
        for result, st in trajectory(spec, frozen, resume=exact, **options):
            clock.child_cpu = st.pop("check_cpu_seconds")
            st["seconds"], st["cpu_seconds"] = clock.seconds(), clock.cpu_seconds()
            prev_text = _checkpoint(work, result, st, hashes, prev_text)
            done[result.row] = result
            if progress is not None:
                progress(result.row, options["epochs"], {"row": result.row, "agreement": result.agreement,
                                                         "worst": result.worst, "seconds": st["seconds"]})
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted with {len(done)} of {n_rows} stored states done; rerun the same "
                          f"command to resume from the checkpoint in {work}") from None


def build(spec: ExperimentSpec, frozen: FrozenInputs, out: Path, *, precision: int = DEFAULT_PRECISION,
          check_precision: int = DEFAULT_CHECK_PRECISION, epochs: int | None = None,
          min_digits: float = MIN_AGREEMENT_DIGITS, progress: ProgressFn | None = None,
          force: bool = False, jobs: int = 1) -> store.StoredReference:
    """Build (or resume building) the reference of ``spec`` into ``out``; return it loaded.

    ``jobs=2`` computes the two precisions in two processes (bit-identical result).  A
    damaged checkpoint is never an error: the first progress call's info has a one-line
    "note" saying what was unreadable and where the build resumed (or that it starts over).
    """
    out = Path(out)
    epochs = spec.train.epochs if epochs is None else epochs
    if not 1 <= epochs <= spec.train.epochs:
        raise UsageError(f"--epochs must be between 1 and the spec's {spec.train.epochs}, got {epochs}")
    check_options(precision, check_precision, min_digits, jobs)
    with fileio.OutputLock.beside(out, f"--out {out}"):  # one build per folder: the checkpoint is its alone
        if (out / "manifest.json").exists() and not force and fileio.folder_kind(out) == "reference":
            raise OutputError(f"{out} already holds a reference; pass --force to rebuild it")
        fileio.prepare_output(out, force=True, kind="reference")  # never a folder bnaudit did not write
        return _build(spec, frozen, out, precision=precision, check_precision=check_precision, epochs=epochs,
                      min_digits=min_digits, progress=progress, jobs=jobs)


def _build(spec: ExperimentSpec, frozen: FrozenInputs, out: Path, *, precision: int, check_precision: int,
           epochs: int, min_digits: float, progress: ProgressFn | None, jobs: int) -> store.StoredReference:
    """``build``, under the output's lock, once the output is known to be the build's to write."""
    rows = store.reference_rows(spec, epochs)
    work = work_folder(out)
    resume, note = _open_work(out, work, _job(spec, frozen, precision, check_precision, min_digits),
                              store.Columns.for_spec(spec), rows, epochs)
    done = {} if resume is None else dict(resume.done)
    # Every row already finished (a shorter prefix of an interrupted longer build): write it as is.
    prefix_ready = resume is not None and all(r in done for r in rows)
    longer = resume is not None and int(resume.state["epoch"]) > epochs
    clock = _Clock() if resume is None else _Clock(float(resume.state.get("seconds", 0.0)),
                                                   float(resume.state.get("cpu_seconds", 0.0)))
    first_todo = epochs if prefix_ready else int(resume.state["epoch"]) if resume else 0
    if progress is not None:
        progress(first_todo, epochs, {"row": first_todo, "agreement": None, "seconds": clock.seconds_before,
                                      "resumed": resume is not None, "note": note})
    if not prefix_ready:
        _compute_rows(spec, frozen, work, resume, done, clock, progress=progress, n_rows=len(rows),
                      precision=precision, check_precision=check_precision, epochs=epochs,
                      min_digits=min_digits, jobs=jobs)
    missing = [r for r in rows if r not in done]
    if missing:
        raise ReferenceFailure(f"build checkpoint in {work} lacks rows {missing[:5]}; delete it and rebuild")
    seconds = clock.seconds()
    cpu_seconds: float | None = clock.cpu_seconds()
    if prefix_ready and resume is not None:
        seconds = resume.row_seconds.get(epochs, clock.seconds_before)
        cpu_seconds = None if longer else cpu_seconds
    write(out, spec, frozen, [done[r] for r in rows], precision=precision, check_precision=check_precision,
          epochs=epochs, min_digits=min_digits, seconds=seconds, cpu_seconds=cpu_seconds, jobs=jobs)
    if not longer:
        shutil.rmtree(work, ignore_errors=True)  # keep the checkpoint of a longer build we took a prefix of
    return store.read(out, spec)


def write(out: Path, spec: ExperimentSpec, frozen: FrozenInputs, results: list[RowResult], *, precision: int,
          check_precision: int, epochs: int, min_digits: float, seconds: float,
          cpu_seconds: float | None = None, jobs: int = 1) -> None:
    """Write the reference folder atomically (temporary folder, manifest last, rename)."""
    from mpmath import libmp

    hi = np.stack([r.hi for r in results]).astype("<f8")
    lo = np.stack([r.lo for r in results]).astype("<f8")
    blobs = {"values_hi.npy": fileio.npy_bytes(hi), "values_lo.npy": fileio.npy_bytes(lo)}
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
    with fileio.atomic_folder(out, "the reference") as tmp:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")


def _columns_dict(spec: ExperimentSpec) -> dict[str, int]:
    c = store.Columns.for_spec(spec)
    return {"n_params": c.n_params, "n_buffers": c.n_buffers, "n_probe": c.n_probe, "n_losses": c.n_losses}


# --------------------------------------------------------------------------- verification

@dataclass(frozen=True)
class Verification:
    """What a verify recomputed: every row in ``rows`` matched bit for bit."""

    rows: list[int]
    """Every row recomputed, ascending."""
    epochs: int
    """Every stored row up to this epoch was recomputed."""
    drawn: list[int]
    """The rows drawn at random after it."""
    pool: tuple[int, int] | None
    """First and last stored row they were drawn from (None: none drawn)."""
    seed: int
    """Seed of the draw (``--seed`` repeats it)."""
    seconds: float
    """Wall time of the recomputation."""


def _spread_draw(pool: list[int], k: int, rng: random.Random) -> list[int]:
    """k of ``pool``, one at random from each of k consecutive stretches of it (all of it when k >= its size).

    Stratified rather than k independent draws, so that the rows spread over the range
    every time: one early, one late, and the replay always runs to near its end.
    """
    if k >= len(pool):
        return list(pool)
    bounds = [len(pool) * i // k for i in range(k + 1)]
    return [rng.choice(pool[bounds[i]:bounds[i + 1]]) for i in range(k)]


def _compare(ref: store.StoredReference, row: int, values: list[Any]) -> None:
    """ReferenceFailure naming the first value of ``row`` whose double-double differs from the stored one."""
    i = ref.row_index()[row]
    pairs = [engine.double_double(v) for v in values]
    hi = np.array([p[0] for p in pairs], dtype="<f8")
    lo = np.array([p[1] for p in pairs], dtype="<f8")
    differs = (hi.view("<u8") != ref.hi[i].view("<u8")) | (lo.view("<u8") != ref.lo[i].view("<u8"))
    if differs.any():
        k = int(np.flatnonzero(differs)[0])
        raise ReferenceFailure(
            f"reference {ref.path}: row {row} value {k} ({_section_of(k, ref.columns)}) differs from its "
            f"recomputation: stored {float(ref.hi[i, k])!r} + {float(ref.lo[i, k])!r}, "
            f"recomputed {float(hi[k])!r} + {float(lo[k])!r}")


def verify(ref: store.StoredReference, frozen: FrozenInputs, *, epochs: int | None = 2,
           random_rows: int = VERIFY_RANDOM_ROWS, within: int = VERIFY_RANDOM_WITHIN,
           seed: int | None = None) -> Verification:
    """Recompute stored rows from epoch 0 at the stored precision; each must match bit for bit.

    The rows: every stored row up to ``epochs`` (None: every row), and ``random_rows``
    more drawn from the stored rows after it up to epoch ``within`` (``_spread_draw``);
    ``seed`` repeats a draw (without it one is chosen, and returned).  Only the stored
    precision is replayed: the stored values are its double-doubles, and replaying the
    check precision too would double the time to re-derive agreement figures the build
    certified.  Raises ReferenceFailure naming the first row and value that differ.
    """
    if frozen.digest != ref.frozen:
        raise ReferenceFailure(f"reference {ref.path} was built from other frozen inputs "
                               f"({ref.frozen[:12]} != {frozen.digest[:12]})")
    if (epochs is not None and epochs < 0) or random_rows < 0:
        raise UsageError("--epochs and --random-rows must not be negative")
    prefix = ref.epochs if epochs is None else min(epochs, ref.epochs)
    seed = random.SystemRandom().randrange(1_000_000) if seed is None else seed
    stored = [int(r) for r in ref.rows]
    pool = [r for r in stored if prefix < r <= within] if random_rows else []
    drawn = sorted(_spread_draw(pool, random_rows, random.Random(seed)))
    check = sorted({r for r in stored if r <= prefix} | set(drawn))
    started = time.perf_counter()
    replay = Trajectory(ref.spec, frozen, ref.precision)
    for row, values in replay.walk(frozen, 0, check[-1], set(check), resumed=False):
        _compare(ref, row, values)
    return Verification(rows=check, epochs=prefix, drawn=drawn, pool=(pool[0], pool[-1]) if pool else None,
                        seed=seed, seconds=time.perf_counter() - started)
