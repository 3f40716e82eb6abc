"""A matrix's runs on the hosts of a dask.distributed cluster, each record brought back whole.

A host is a dask worker started with ``--name HOST`` (its folder in the matrix, ``runs/<HOST>/``).
``Cluster.run`` has ``launch.run``'s contract (``matrix.execute.HostRunner``), in three steps:

* one task, pinned to the host's worker, calls ``launch.run`` *there*: a fresh process with
  the controls in its environment, on that host's python, torch and CPU, into a temporary
  folder of the worker, whose files it returns as bytes (a ``BnauditError`` as its class
  name and message, so that a UsageError on the host stays one here);
* meanwhile the client relays the run's progress (one event topic for all runs), stops
  waiting once ``stop`` is set, and fails the run when the host's worker leaves the
  scheduler: a task pinned to a lost worker would otherwise wait for it for ever;
* the client checks the answer (relative paths only, fileio's size limits) and writes it as
  ``record.write_record`` does: into a hidden partial folder beside the target, renamed into
  place only once it loads as a complete record of the requested spec and configuration.

A worker whose environment holds ``BNAUDIT_HOST_CPU_MODEL=MODEL`` stands for a machine of
that CPU: its runs stay native runs of that host (config ``cpu_model=None``) and are made
under ``qemu-x86_64 -cpu MODEL`` (``launch.emulated_config``), so their records name the
model as an emulated run's do.

The task's answer travels by dask's pickle, as everything does between the members of a
cluster: a cluster is trusted as a whole; what is checked is the record folder it carries.
A run already started on a host is not stopped by ``stop`` (dask cannot interrupt a running
task): it runs to its end there and its answer is dropped.  ``distributed`` is optional and
imported only by ``Cluster`` (and by the task, on the worker).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from bnaudit import controls, emulate, envinfo, fileio, launch, record
from bnaudit.controls import RunConfig
from bnaudit.errors import BnauditError, Interrupted, MissingTool, RunFailed, UsageError
from bnaudit.matrix import census
from bnaudit.matrix.plan import HOST_NAME
from bnaudit.spec import ExperimentSpec

if TYPE_CHECKING:
    import distributed

HOST_MODEL_VARIABLE = "BNAUDIT_HOST_CPU_MODEL"
"""In a worker's environment: the qemu CPU model the host stands for (its runs are made under it)."""
INSTALL_HINT = "pip install 'bnaudit[cluster]'"
PROGRESS_TOPIC = "bnaudit-progress"
"""The dask event topic of every run's progress (one topic: the scheduler keeps a bounded log per topic)."""
CONNECT_TIMEOUT_S = 10.0
POLL_S = 0.5
"""How often a waiting run looks at ``stop``; every ``LOST_POLLS`` polls it also checks its host is there."""
LOST_POLLS = 4
FETCH_TIMEOUT_S = 600.0
"""How long fetching a finished run's record from its worker may take."""
MAX_FILES = 64
"""More files than any record folder holds (13 today)."""


class Cluster:
    """A client of the dask scheduler at ``address``, whose named workers are bnaudit hosts (a context manager)."""

    def __init__(self, address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
        try:
            import distributed
            from distributed.comm.addressing import get_address_host_port
        except ImportError:
            raise MissingTool(f"--scheduler needs dask.distributed, which is not installed; {INSTALL_HINT}") from None
        try:
            get_address_host_port(address)  # a malformed address fails here, before a Client is half built
            self.client: distributed.Client = distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot reach the dask scheduler at {address}: {str(exc)[:200]}") from None
        self.address = address
        self._progress: dict[str, launch.ProgressFn] = {}
        self._lock = threading.Lock()
        self.client.subscribe_topic(PROGRESS_TOPIC, self._relay)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def _workers(self) -> dict[str, Any]:
        """Worker address -> name (a string, unless the worker was started from Python), as the scheduler has them."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]  # n_workers: 2025.4 to 2026.6 list 5 by default
        return {address: w.get("name") for address, w in info.items()}

    def hosts(self) -> tuple[str, ...]:
        """The workers' names, sorted: each one a host (UsageError for a worker without a usable name, or none)."""
        workers = self._workers()
        if not workers:
            raise UsageError(f"the dask scheduler at {self.address} has no workers; start one per host with "
                             f"`dask worker {self.address} --name HOST`")
        for address, name in sorted(workers.items()):
            if not isinstance(name, str) or not HOST_NAME.match(name):  # an unnamed worker's name is its address
                raise UsageError(f"the dask worker at {address} has no name bnaudit can use as a host ({name!r}); "
                                 "start each worker with --name HOST (letters, digits, '.', '_', '-')")
        return tuple(sorted(workers.values()))

    def _address_of(self, host: str) -> str | None:
        return next((a for a, name in self._workers().items() if name == host), None)

    def facts(self, hosts: Sequence[str]) -> dict[str, census.Facts]:
        """Each host's CPUID vendor and CPU features, read on the host (under its model, for a host that
        stands for one): a census or solve over the cluster separates its classes by them."""
        found = {}
        for host in hosts:
            address = self._address_of(host)
            if address is None:
                raise RunFailed(f"host {host}: no worker of that name is connected to {self.address}")
            future = self.client.submit(remote_facts, key=f"bnaudit-facts-{host}-{uuid.uuid4().hex}",
                                        workers=[address], allow_other_workers=False, pure=False)
            try:
                answer = future.result(timeout=FETCH_TIMEOUT_S)
            except Exception as exc:  # dask re-raises the task's own exception, of any class
                raise RunFailed(f"host {host}: cannot read its CPU ({type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0][:200]})") from None
            found[host] = _checked_facts(answer, f"host {host}")
        return found

    def _relay(self, event: tuple[float, Any]) -> None:
        """A progress event from a worker, to the run it belongs to (called on the client's event loop)."""
        msg = event[1]
        if isinstance(msg, dict):
            with self._lock:
                to = self._progress.get(str(msg.get("key")))
            if to is not None:
                to({k: v for k, v in msg.items() if k != "key"})

    def run(self, host: str, spec: ExperimentSpec, config: RunConfig, out: Path, *, force: bool = False,
            on_progress: launch.ProgressFn | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
        """Run one configuration on ``host``; its complete record is at ``out`` here when this returns its summary."""
        out, where = Path(out), f"host {host}"
        controls.validate(config, spec, check_cpu=False)  # the host checks its own CPU
        with fileio.OutputLock.beside(out, f"--out {out}"):
            fileio.prepare_output(out, force=force, kind="record")  # fail now, not after the run
            try:
                answer = self._wait(host, spec, config, on_progress, stop or threading.Event())
            except OSError as exc:  # the scheduler gone (CommClosedError), or the answer not fetched (TimeoutError)
                raise RunFailed(f"{where}: the cluster stopped answering ({type(exc).__name__}: "
                                f"{(str(exc).splitlines() or [''])[0][:200]})") from None
            error = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(error, dict):
                raise launch.error_of(str(error.get("kind")), f"{where}: {error.get('message')}")
            summary = answer.get("summary") if isinstance(answer, dict) else None
            if not isinstance(summary, dict):
                raise RunFailed(f"{where}: the worker's answer is not a run's result")
            install(out, answer.get("files"), where=where, spec_hash=spec.hash, config=config.to_dict())
        return {**summary, "out": str(out)}

    def _wait(self, host: str, spec: ExperimentSpec, config: RunConfig, on_progress: launch.ProgressFn | None,
              stop: threading.Event) -> Any:
        """Submit the run to its host's worker and wait for the answer (or the host's loss, or ``stop``)."""
        address = self._address_of(host)
        if address is None:
            raise RunFailed(f"host {host}: no worker of that name is connected to {self.address}")
        if stop.is_set():
            raise Interrupted("interrupted; no record was written")
        key = f"bnaudit-run-{host}-{uuid.uuid4().hex}"
        if on_progress is not None:
            with self._lock:
                self._progress[key] = on_progress
        future = self.client.submit(remote_run, spec.to_dict(), config.to_dict(), key, key=key, workers=[address],
                                    allow_other_workers=False, pure=False)
        try:
            polls = 0
            while not future.done():
                if stop.wait(POLL_S):
                    raise Interrupted(f"interrupted; no record was written (a run already started on host {host} "
                                      "runs to its end there)")
                polls += 1
                if polls % LOST_POLLS == 0 and self._address_of(host) != address:
                    raise RunFailed(f"host {host}: its worker left the scheduler during the run")
            if future.status != "finished":
                exc = future.exception() if future.status == "error" else None
                why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}" if exc else str(future.status)
                raise RunFailed(f"host {host}: the run's task failed ({why[:300]})")
            return future.result(timeout=FETCH_TIMEOUT_S)
        finally:
            with self._lock:
                self._progress.pop(key, None)
            with contextlib.suppress(OSError):
                future.cancel()  # frees the answer on the worker; a task not yet started never starts


def checked_files(files: object, where: str) -> dict[str, bytes]:
    """A record folder's files as a worker sent them: relative paths inside the folder, within fileio's limits."""
    if not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES:
        raise RunFailed(f"{where}: the worker sent back no record folder")
    for name, data in files.items():
        if not isinstance(name, str) or not isinstance(data, bytes):
            raise RunFailed(f"{where}: the worker sent back a record folder of the wrong types")
        parts = name.split("/")
        if PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts) or "\\" in name \
                or "\0" in name:
            raise RunFailed(f"{where}: the worker sent back a file outside the record folder ({name[:80]!r})")
        limit = fileio.MAX_JSON_BYTES if name.endswith(".json") else fileio.MAX_NPY_BYTES
        if len(data) > limit:
            raise RunFailed(f"{where}: the worker sent back {name} of {len(data)} bytes, more than bnaudit reads")
    if "record.json" not in files:
        raise RunFailed(f"{where}: the worker sent back a folder without record.json")
    return files


def install(out: Path, files: object, *, where: str, spec_hash: str, config: dict[str, Any]) -> None:
    """Write a record folder a worker sent back at ``out``, atomically, once it loads as the run asked for.

    The caller holds ``out``'s lock and has checked with ``prepare_output`` that it may be
    replaced.  Nothing is written for an answer ``checked_files`` refuses, and a folder that
    does not load is removed before anyone can find it.
    """
    checked = checked_files(files, where)
    with fileio.atomic_folder(out, "record") as tmp:
        for name in sorted(checked, key=lambda n: n == "record.json"):  # record.json, the completion mark, last
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(checked[name])
        try:
            rec = record.load_record(tmp)
        except BnauditError as exc:
            raise RunFailed(f"{where}: the record it sent back does not load ({exc.message})") from None
        if rec.spec.hash != spec_hash or rec.fingerprint.config != config:
            raise RunFailed(f"{where}: the record it sent back is of another spec or configuration than asked "
                            "(another bnaudit version on the host?)")


def host_cpu_model() -> str | None:
    """The qemu model this host stands for (``BNAUDIT_HOST_CPU_MODEL``, resolved), or None for its own CPU."""
    value = envinfo.host_cpu_model() or ""
    if emulate.is_native(value or None):
        return None
    try:
        return emulate.resolve(value)
    except BnauditError as exc:  # UsageError for an unknown model, MissingTool without qemu
        raise type(exc)(f"{HOST_MODEL_VARIABLE}={value}: {exc.message}") from None


def _checked_facts(answer: object, where: str) -> census.Facts:
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        raise launch.error_of(str(error.get("kind")), f"{where}: {error.get('message')}")
    vendor = answer.get("vendor") if isinstance(answer, dict) else None
    features = answer.get("features") if isinstance(answer, dict) else None
    if not isinstance(vendor, str) or not isinstance(features, list) or \
            not all(isinstance(f, str) for f in features):
        raise RunFailed(f"{where}: the worker's answer is not a CPU's vendor and features")
    return census.Facts(vendor=vendor, features=frozenset(features))


def remote_facts() -> dict[str, Any]:
    """The task, on the worker: this host's CPUID vendor and features (its model's, for a host that stands for one)."""
    try:
        model = host_cpu_model()
        if model is None:
            vendor, features = envinfo.cpu_vendor(), envinfo.cpu_features()
        else:
            vendor, features = census.vendor_of(model), emulate.model_features(model)
    except BnauditError as exc:
        return {"error": {"kind": type(exc).__name__, "message": exc.message}}
    return {"vendor": vendor, "features": sorted(k for k, v in features.items() if v)}


def remote_run(spec: dict[str, Any], config: dict[str, Any], key: str) -> dict[str, Any]:
    """The task, on the worker: the run made there; ``{"summary", "files"}`` of its record, or ``{"error"}``."""
    from distributed import get_worker

    from bnaudit.spec import spec_from_record_dict

    worker = get_worker()

    def progress(event: dict[str, Any]) -> None:
        worker.log_event(PROGRESS_TOPIC, {**event, "key": key})

    try:
        model = host_cpu_model()
        with tempfile.TemporaryDirectory(prefix="bnaudit-run-", dir=worker.local_directory) as tmp:
            folder = Path(tmp) / "record"
            summary = launch.run(spec_from_record_dict(spec), RunConfig.from_dict(config), folder,
                                 on_progress=progress, host_cpu_model=model)
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                     if p.is_file()}
    except BnauditError as exc:
        return {"error": {"kind": type(exc).__name__, "message": exc.message}}
    return {"summary": summary, "files": files}
