"""Start a run in a fresh process whose environment carries its controls.

The parent never imports torch: it validates the request, builds the child's
environment (``controls.child_environment``), optionally wraps the command in qemu
(``emulate``), streams the child's progress events and turns its failure into the
matching ``BnauditError``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnaudit import controls, envinfo, errors, record
from bnaudit.controls import RunConfig
from bnaudit.errors import BnauditError, Interrupted, RunFailed
from bnaudit.spec import ExperimentSpec

ProgressFn = Callable[[dict[str, Any]], None]

_ERRORS = {cls.__name__: cls for cls in (
    errors.UsageError, errors.InputError, errors.MismatchError, errors.OutputError, errors.RunFailed,
    errors.MissingTool, errors.ReferenceFailure)}


def worker_command(config: RunConfig) -> list[str]:
    """The argv of the run's process (qemu-wrapped when a CPU model is emulated)."""
    argv = [sys.executable, "-m", "bnaudit.worker"]
    if config.controls.cpu_model:
        from bnaudit import emulate

        argv = emulate.wrap(argv, config.controls.cpu_model)
    return argv


def run(spec: ExperimentSpec, config: RunConfig, out: Path, *, force: bool = False,
        on_progress: ProgressFn | None = None, base_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one configuration in its own process; return its summary."""
    controls.validate(config, spec)
    record.prepare_output(Path(out), force=force)  # fail now, not after the training
    env = controls.child_environment(config.controls, envinfo.environ() if base_env is None else base_env)
    argv = worker_command(config)
    request = json.dumps({"spec": spec.to_dict(), "config": config.to_dict(), "out": str(out), "force": force})
    # stderr goes to a file, not a pipe: a child that writes much to stderr while the
    # parent reads stdout would otherwise block both.
    with tempfile.TemporaryFile(mode="w+") as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    env=env, text=True)
        except OSError as exc:
            raise RunFailed(f"cannot start the run process ({exc.strerror or exc})") from None
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
            raise Interrupted("interrupted; no record was written") from None
        err.seek(0)
        stderr = err.read()
    if failure is not None:
        cls = _ERRORS.get(str(failure.get("kind")), RunFailed)
        raise cls(str(failure.get("message")))
    if code != 0 or result is None:
        lines = [ln for ln in stderr.strip().splitlines()
                 if ln.strip() and not ln.startswith("qemu-x86_64: warning:")]  # qemu's harmless CPUID notes
        tail = lines[-1:] or ["no output"]
        raise RunFailed(f"the run process exited with code {code}: {tail[0][:300]}")
    return result


__all__ = ["BnauditError", "run", "worker_command"]
