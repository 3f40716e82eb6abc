"""Running a matrix: every configuration not yet finished, each in its own process, ``jobs`` at a time."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from bnaudit import frozen, launch
from bnaudit.blocks import RunSummary
from bnaudit.controls import RunConfig
from bnaudit.errors import BnauditError, Interrupted, RunFailed, UsageError
from bnaudit.matrix import folder
from bnaudit.matrix.plan import Plan, PlannedRun
from bnaudit.spec import ExperimentSpec


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


class HostRunner(Protocol):
    """Runs one configuration on a cluster host, with ``launch.run``'s contract (``bnaudit.cluster``):
    the record is complete at ``out`` on this machine when it returns the run's summary, and a failure
    is a ``BnauditError``."""

    def __call__(self, host: str, spec: ExperimentSpec, config: RunConfig, out: Path, *, force: bool,
                 on_progress: launch.ProgressFn | None, stop: threading.Event) -> dict[str, Any]: ...


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


def threads_honoured(threads: int, effective: Mapping[str, Any]) -> str | None:
    """None if the run's read-back shows its thread settings, else what differs."""
    if effective.get("intra_op_threads") != threads:
        return f"intra-op threads {effective.get('intra_op_threads')} instead of {threads}"
    for pool in effective.get("threadpools", []):
        if pool.get("user_api") == "openmp" or pool.get("internal_api") == "mkl":
            if pool.get("num_threads") != threads:
                return f"{pool.get('internal_api')} pool has {pool.get('num_threads')} threads instead of {threads}"
    return None


class _Runs:
    """The runs of one execution: what is left to do, and what became of each (shared by the pool's threads)."""

    def __init__(self, plan: Plan, out: Path, on_event: EventFn | None, base_env: dict[str, str] | None,
                 runner: HostRunner | None) -> None:
        self.plan, self.out, self.on_event, self.base_env, self.runner = plan, out, on_event, base_env, runner
        self.stopping = threading.Event()  # after an interrupt, runs still winding down report nothing
        self.lock = threading.Lock()
        self.ran: list[str] = []
        self.resumed: list[str] = []
        self.failures: list[Failure] = []

    def emit(self, event: MatrixEvent) -> None:
        if self.on_event is not None and not self.stopping.is_set():
            self.on_event(event)

    def pending(self) -> list[PlannedRun]:
        """The runs without a finished record (the others are reported as resumed)."""
        todo = []
        for run in self.plan.runs:
            if folder.finished(self.plan, run, self.out, with_reference=False) is not None:
                self.resumed.append(run.key)
                self.emit(MatrixEvent("resumed", run))
            else:
                todo.append(run)
        return todo

    def one(self, run: PlannedRun) -> None:
        """Run one configuration; its failure is recorded, not raised."""
        if self.stopping.is_set():
            return
        self.emit(MatrixEvent("start", run))
        target = self.out / run.folder
        target.parent.mkdir(parents=True, exist_ok=True)
        progress = lambda e: self.emit(MatrixEvent("epoch", run, epoch=int(e["epoch"])))  # noqa: E731
        spec = self.plan.spec_of(run.variant)
        try:
            if run.host is None:
                raw = launch.run(spec, run.config, target, force=target.exists(), on_progress=progress,
                                 base_env=self.base_env, stop=self.stopping)
            else:
                assert self.runner is not None  # execute refuses a plan over hosts without one
                raw = self.runner(run.host, spec, run.config, target, force=target.exists(), on_progress=progress,
                                  stop=self.stopping)
            summary = RunSummary.from_json(raw, f"{run.key}: the run process's summary")
            wrong = threads_honoured(run.controls.threads, summary.effective)
            if wrong is not None:
                shutil.rmtree(target, ignore_errors=True)  # not what the configuration says: not finished
                raise RunFailed(f"thread settings not honoured: {wrong}")
        except BnauditError as exc:
            with self.lock:
                self.failures.append(Failure(run.key, int(exc.exit_code), exc.message))
            self.emit(MatrixEvent("failed", run, message=exc.message))
            return
        with self.lock:
            self.ran.append(run.key)
        self.emit(MatrixEvent("done", run, epoch=run.config.epochs))

    def run_all(self, todo: list[PlannedRun], jobs: int) -> None:
        """``one`` for each run, ``jobs`` at a time; Ctrl-C stops the matrix (Interrupted, exit 130)."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="bnaudit-matrix")
        futures = [pool.submit(self.one, run) for run in todo]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except KeyboardInterrupt:
            self.stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            launch.stop_all()  # the running configurations end now: their threads return at once
            pool.shutdown(wait=True)  # and the folder stays locked until they have
            done = len(self.resumed) + len(self.ran)
            raise Interrupted(f"interrupted with {done} of {len(self.plan.runs)} configurations finished; "
                              "re-run the same command to resume") from None
        pool.shutdown(wait=True)

    def execution(self, wall_seconds: float) -> Execution:
        order = {r.key: i for i, r in enumerate(self.plan.runs)}
        return Execution(ran=tuple(sorted(self.ran, key=order.__getitem__)), resumed=tuple(self.resumed),
                         failures=tuple(sorted(self.failures, key=lambda f: order[f.key])),
                         wall_seconds=wall_seconds)


def execute(plan: Plan, out: Path, *, jobs: int = 1, force: bool = False, on_event: EventFn | None = None,
            base_env: dict[str, str] | None = None, runner: HostRunner | None = None) -> Execution:
    """Run every configuration not already finished, ``jobs`` at a time, each in its own process.

    ``runner``: how runs pinned to a cluster host are made (``plan.hosts``); ``jobs`` is then the
    number of configurations in flight across the cluster.
    """
    if not 1 <= jobs <= 64:
        raise UsageError(f"-j/--jobs must be between 1 and 64, got {jobs}")
    if plan.hosts and runner is None:
        raise UsageError("this matrix runs on cluster hosts; give the scheduler's address (--scheduler)")
    started = time.perf_counter()
    out = Path(out)
    folder.create(out)
    with folder.lock(out):
        folder.prepare(plan, out, force=force)
        folder.clean_partials(out)
        for variant in plan.variants:
            frozen.load(variant.spec)  # generate a custom spec's frozen inputs once, not in racing children
        runs = _Runs(plan, out, on_event, base_env, runner)
        runs.run_all(runs.pending(), jobs)
    return runs.execution(time.perf_counter() - started)
