"""The process a run happens in: started by ``launch.py`` with its environment already set.

Protocol: one JSON request on stdin ({"spec", "config", "out", "force"}); JSON lines on
stdout: {"event": "progress", ...} per epoch, then {"event": "done", "summary": ...} or
{"event": "error", "exit_code": N, "message": ...}.  Warnings go to stderr.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit import interrupts
from bnaudit.errors import BnauditError, ExitCode

if TYPE_CHECKING:  # numpy, torch and the stages load inside execute, once the environment is checked

    from bnaudit.controls import RunConfig
    from bnaudit.frozen import FrozenInputs
    from bnaudit.record import RunResult
    from bnaudit.spec import ExperimentSpec


def _emit(stream: Any, event: dict[str, Any]) -> None:
    stream.write(json.dumps(event) + "\n")
    stream.flush()


def chaos_floor(twin: RunResult, perturbed: RunResult, storage: str) -> dict[str, Any]:
    """The chaos-floor block (``extra["perturbation"]``, read by ``blocks.ChaosFloor``).

    How a perturbation grows: the largest parameter distance from the unperturbed twin
    at each epoch row, over all parameters, by the per-element rules of
    ``compare.layer_divergence``: identical bits (NaN and inf included) are 0 apart, an
    element that is NaN in one run only is an infinite |Δ| and ``bits.NAN_DISTANCE``
    ulps, so a row's largest |Δ| is never NaN.
    """
    import numpy as np

    from bnaudit import compare, record
    from bnaudit.blocks import ChaosFloor

    max_abs, _, ulps = compare.element_distances(twin.params, perturbed.params, storage)
    row_abs = max_abs.max(axis=1)
    rate, saturation = compare.growth(np.arange(len(row_abs)), row_abs)
    return ChaosFloor(twin_digest_rows=tuple(format(int(d), "016x") for d in record.row_digests(twin.epoch_digests)),
                      max_abs=row_abs, max_ulps=tuple(int(u) for u in ulps.max(axis=1)), growth_rate=rate,
                      saturation_row=saturation).to_json()


def execute(request: dict[str, Any], stream: Any) -> dict[str, Any]:
    """Run one request in this process; return the summary (decoded by ``blocks.RunSummary``)."""
    started = time.perf_counter()
    from bnaudit import controls, envinfo, frozen, record
    from bnaudit.spec import spec_from_record_dict

    spec = spec_from_record_dict(request["spec"])
    config = controls.RunConfig.from_dict(request["config"])
    controls.validate(config, spec, check_cpu=False)

    import torch  # first import of torch in this process: the environment is already set

    from bnaudit.layout import TraceLayout

    controls.apply(config.controls, torch)
    effective = controls.readback(torch)
    controls.verify(config.controls, effective)
    unverified = controls.unverified(config.controls)
    if unverified:
        effective["unverified"] = unverified
    inputs = frozen.load(spec)
    meta = record.new_meta(
        spec=spec, frozen_digest=inputs.digest, config=config.to_dict(), storage=config.controls.storage,
        effective=effective, environment=envinfo.snapshot(torch),
        created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat())
    result, blocks = _train(spec, inputs, config, stream)
    meta["extra"].update(blocks)
    stage_reporter(stream, (2 if config.perturb is not None else 1) * config.epochs, result)("writing record")
    out = Path(request["out"])
    fp = record.write_record(out, meta, result, TraceLayout.for_spec(spec), force=bool(request.get("force")))
    return {
        "out": str(out),
        "extra": meta["extra"],
        "digest": fp["digest"],
        "spec_hash": spec.hash,
        "config": config.to_dict(),
        "effective": effective,
        "epochs": config.epochs,
        "train_loss": float(result.train_loss[-1]),
        "test_loss": float(result.test_loss[-1]),
        "nonfinite": result.nonfinite,
        "train_seconds": result.train_seconds,
        "process_seconds": time.perf_counter() - started,
        "cpu_model": envinfo.emulated_model(),
    }


def _train(spec: ExperimentSpec, inputs: FrozenInputs, config: RunConfig,
           stream: Any) -> tuple[RunResult, dict[str, Any]]:
    """The run (after its unperturbed twin, for a --perturb run) and the blocks derived from it, by name."""
    import numpy as np

    from bnaudit import audit, divergence, runner
    from bnaudit.layout import TraceLayout

    stages = 2 if config.perturb is not None else 1
    done = 0

    def progress(epoch: int, epochs: int, train: float, test: float) -> None:
        _emit(stream, {"event": "progress", "epoch": done + epoch, "epochs": stages * epochs,
                       "train_loss": train, "test_loss": test})

    twin = None
    if config.perturb is not None:
        # The chaos floor: the same run without the perturbation, in this same process.
        twin = runner.run(spec, inputs, dataclasses.replace(config, perturb=None), progress=progress)
        done = config.epochs
    observers = audit.observers_for(spec, config)
    result = runner.run(spec, inputs, config, progress=progress, observers=observers)
    after_training = stage_reporter(stream, stages * config.epochs, result)
    if observers:
        after_training("audit")
    extra = {observer.name: observer.result() for observer in observers}
    if twin is not None:
        after_training("chaos floor")
        extra["perturbation"] = chaos_floor(twin, result, config.controls.storage)
    after_training("vs reference")
    block = divergence.versus_reference(
        spec, config.controls.storage, result.params, result.probe_rows, result.probe, TraceLayout.for_spec(spec),
        losses=np.stack([result.train_loss, result.test_loss], axis=1))
    if block is not None:
        extra["divergence"] = block
    return result, extra


def stage_reporter(stream: Any, total: int, result: RunResult) -> Any:
    """What the run does after its last epoch, as progress events at the full count with a ``stage``: the bar
    then says what it waits for instead of sitting at N/N."""
    def stage(what: str) -> None:
        _emit(stream, {"event": "progress", "epoch": total, "epochs": total, "stage": what,
                       "train_loss": float(result.train_loss[-1]), "test_loss": float(result.test_loss[-1])})
    return stage


def die_with_parent(parent: int | None) -> None:
    """Ask the kernel to kill this process when the one that started it dies (Linux), and check it still lives.

    A run's process must never outlive the bnaudit that launched it, however that one
    ends (SIGKILL included): its parent's lock on the output is gone then, and a second
    run could write the same folder.  PR_SET_PDEATHSIG fires when the parent exits; the
    parent may already have exited before the call, which the parent pid tells.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the parent still kills it on Ctrl-C and SIGTERM
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(int(ExitCode.INTERRUPTED))


def main() -> int:
    stream = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the protocol
    interrupts.install()  # SIGTERM ends a run as Ctrl-C does; never inside torch's import
    try:
        request = json.loads(sys.stdin.read())
        die_with_parent(request.get("parent_pid"))
        summary = execute(request, stream)
    except BnauditError as exc:
        _emit(stream, {"event": "error", "exit_code": int(exc.exit_code), "kind": type(exc).__name__,
                       "message": exc.message})
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    _emit(stream, {"event": "done", "summary": summary})
    return 0


if __name__ == "__main__":
    code = main()
    interrupts.hold_for_exit()
    sys.exit(code)
