"""Start a run in a fresh process whose environment carries its controls.

The parent never imports torch: it validates the request, builds the child's
environment (``controls.child_environment``), optionally wraps the command in qemu
(``emulate``), streams the child's progress events and turns its failure into the
matching ``BnauditError``.

A cluster host may stand for a real machine of another CPU (``host_cpu_model``, read by
``bnaudit.cluster`` from the worker's environment): its runs are that host's native
runs, so their config keeps ``cpu_model=None``, yet their process runs under
``qemu-x86_64 -cpu MODEL`` exactly as a ``--cpu-model`` run's does, and its environment
snapshot names the emulated model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnaudit import controls, envinfo, errors, fileio
from bnaudit.controls import RunConfig
from bnaudit.errors import BnauditError, Interrupted, RunFailed
from bnaudit.spec import ExperimentSpec

ProgressFn = Callable[[dict[str, Any]], None]

_LIVE: set[subprocess.Popen[str]] = set()
"""The run processes now running, started by this process (any thread)."""
_LIVE_LOCK = threading.Lock()

_ERRORS = {cls.__name__: cls for cls in (
    errors.UsageError, errors.InputError, errors.MismatchError, errors.OutputError, errors.RunFailed,
    errors.MissingTool, errors.ReferenceFailure)}


def error_of(kind: str, message: str) -> BnauditError:
    """The error a run's process reported, by its class name (RunFailed for a name not known here)."""
    return _ERRORS.get(kind, RunFailed)(message)


def emulated_config(config: RunConfig, host_cpu_model: str | None) -> RunConfig:
    """The config as the run's process is started and checked: on a host that stands for a CPU model, under it.

    ``validate`` checks this config, so that ``--isa`` caps on such a host are checked
    against the model's features, as for ``--cpu-model``; the request (and the record)
    keeps the config as asked.  A config's own ``cpu_model`` wins: qemu's emulation of a
    model does not depend on the CPU beneath it.
    """
    if host_cpu_model is None or config.controls.cpu_model is not None:
        return config
    return dataclasses.replace(config, controls=dataclasses.replace(config.controls, cpu_model=host_cpu_model))


def worker_command(config: RunConfig) -> list[str]:
    """The argv of the run's process (qemu-wrapped when a CPU model is emulated).

    Python's isolated mode (-I): the run ignores PYTHONPATH, PYTHONSTARTUP and every
    other PYTHON* variable, the user's site-packages and the current folder, so no
    module the environment slips in (a sitecustomize.py on PYTHONPATH, say) can change
    its bits unrecorded.  What isolation cannot exclude (LD_PRELOAD, LD_LIBRARY_PATH, a
    sitecustomize installed in site-packages) is recorded in the environment snapshot.
    """
    argv = [sys.executable, "-I", "-m", "bnaudit.worker"]
    if config.controls.cpu_model:
        from bnaudit import emulate

        argv = emulate.wrap(argv, config.controls.cpu_model)
    return argv


def run(spec: ExperimentSpec, config: RunConfig, out: Path, *, force: bool = False,
        on_progress: ProgressFn | None = None, base_env: dict[str, str] | None = None,
        stop: threading.Event | None = None, host_cpu_model: str | None = None) -> dict[str, Any]:
    """Run one configuration in its own process; return its summary.

    ``stop``: once set (a matrix's interrupt), a process this call starts is killed at
    once, so that no run begins after the interrupt (``stop_all`` ends those running).
    ``host_cpu_model``: the qemu model this host stands for (``emulated_config``); None: its own CPU.
    """
    controls.validate(emulated_config(config, host_cpu_model), spec)
    with fileio.OutputLock.beside(Path(out), f"--out {out}"):  # one run per --out; held until its record is written
        fileio.prepare_output(Path(out), force=force, kind="record")  # fail now, not after the training
        return _run_child(spec, config, out, force=force, on_progress=on_progress, base_env=base_env, stop=stop,
                          host_cpu_model=host_cpu_model)


def _run_child(spec: ExperimentSpec, config: RunConfig, out: Path, *, force: bool, on_progress: ProgressFn | None,
               base_env: dict[str, str] | None, stop: threading.Event | None,
               host_cpu_model: str | None = None) -> dict[str, Any]:
    """Start the run's process with its environment, relay its progress, return its summary."""
    env = controls.child_environment(config.controls, envinfo.environ() if base_env is None else base_env)
    argv = worker_command(emulated_config(config, host_cpu_model))  # qemu's -E names the model in the guest
    request = json.dumps({"spec": spec.to_dict(), "config": config.to_dict(), "out": str(out), "force": force,
                          "parent_pid": os.getpid()})
    before = _record_stamp(Path(out))
    # stderr goes to a file, not a pipe: a child that writes much to stderr while the
    # parent reads stdout would otherwise block both.
    with tempfile.TemporaryFile(mode="w+") as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    env=env, text=True)
        except OSError as exc:
            raise RunFailed(f"cannot start the run process ({exc.strerror or exc})") from None
        with _LIVE_LOCK:
            _LIVE.add(proc)
            if stop is not None and stop.is_set():  # started by a thread that had not yet seen the interrupt
                proc.kill()
        result: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(request)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died at start: its exit code and stderr say why, below
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # native libraries may print to fd 1
                if not isinstance(event, dict):
                    continue
                kind = event.get("event")
                if kind == "progress" and on_progress is not None:
                    on_progress(event)
                elif kind == "done" and isinstance(event.get("summary"), dict):
                    result = event["summary"]
                elif kind == "error":
                    failure = event
            code = proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise Interrupted(_interrupted_message(Path(out), before)) from None
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
        err.seek(0)
        stderr = err.read()
    if failure is not None:
        raise error_of(str(failure.get("kind")), str(failure.get("message")))
    if code != 0 or result is None:
        lines = [ln for ln in stderr.strip().splitlines()
                 if ln.strip() and not ln.startswith("qemu-x86_64: warning:")]  # qemu's harmless CPUID notes
        tail = lines[-1:] or ["no output"]
        raise RunFailed(f"the run process exited with code {code}: {tail[0][:300]}")
    return result


def stop_all() -> None:
    """Kill every run process this process started that is still running (a matrix's interrupt).

    Only the main thread sees Ctrl-C or SIGTERM; the threads of ``bnaudit matrix -j N``
    wait in ``run`` for their processes, which end here, so that each thread returns
    at once and the matrix keeps its folder's lock until no run of it is left.
    """
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        proc.kill()


def _record_stamp(out: Path) -> tuple[int, int] | None:
    """(inode, mtime) of the record.json at ``out``, or None: to tell afterwards whether the run wrote one."""
    try:
        info = (out / "record.json").stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


def _interrupted_message(out: Path, before: tuple[int, int] | None) -> str:
    """An interrupt can arrive after the run's process renamed its complete record into place."""
    after = _record_stamp(out)
    if after is not None and after != before:
        return f"interrupted after the run's record was complete; it is at {out}"
    return "interrupted; no record was written"


__all__ = ["BnauditError", "run", "worker_command"]
