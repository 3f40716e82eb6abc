"""The process a run happens in: started by ``launch.py`` with its environment already set.

Protocol: one JSON request on stdin ({"spec", "config", "out", "force"}); JSON lines on
stdout: {"event": "progress", ...} per epoch, then {"event": "done", "summary": ...} or
{"event": "error", "exit_code": N, "message": ...}.  Warnings go to stderr.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from bnaudit.errors import BnauditError, ExitCode


def _emit(stream: Any, event: dict[str, Any]) -> None:
    stream.write(json.dumps(event) + "\n")
    stream.flush()


def chaos_floor(twin: Any, perturbed: Any, storage: str) -> dict[str, Any]:
    """How a perturbation grows: max parameter divergence from the unperturbed twin per epoch row."""
    import numpy as np

    from bnaudit import bits, compare, record

    a, b = twin.params, perturbed.params
    max_abs = np.abs(bits.to_float64(a, storage) - bits.to_float64(b, storage)).max(axis=1)
    max_ulps = bits.ulp_distance(a, b, storage).max(axis=1)
    rows = np.arange(len(max_abs))
    rate, saturation = compare.growth(rows, max_abs)
    return {
        "twin_digest_rows": [format(int(d), "016x") for d in record.row_digests(twin.epoch_digests)],
        "max_abs": bits.to_hex(max_abs, "float64"),
        "max_ulps": [int(u) for u in max_ulps],
        "growth_rate": rate,
        "saturation_row": saturation,
    }


def execute(request: dict[str, Any], stream: Any) -> dict[str, Any]:
    """Run one request in this process; return the summary."""
    started = time.perf_counter()
    from bnaudit import controls, envinfo, frozen, record
    from bnaudit.spec import spec_from_record_dict

    spec = spec_from_record_dict(request["spec"])
    config = controls.RunConfig.from_dict(request["config"])
    controls.validate(config, spec, check_cpu=False)

    import numpy as np
    import torch  # first import of torch in this process: the environment is already set

    from bnaudit import audit, divergence, runner

    controls.apply(config.controls, torch)
    effective = controls.readback(torch)
    controls.verify(config.controls, effective)
    inputs = frozen.load(spec)
    meta = record.new_meta(
        spec=spec, frozen_digest=inputs.digest, config=config.to_dict(), storage=config.controls.storage,
        effective=effective, environment=envinfo.snapshot(torch),
        created=datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat())

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
    for observer in observers:
        meta["extra"][observer.name] = observer.result()
    if twin is not None:
        meta["extra"]["perturbation"] = chaos_floor(twin, result, config.controls.storage)
    layout = record.TraceLayout.for_spec(spec)
    block = divergence.versus_reference(
        spec, config.controls.storage, result.params, result.probe_rows, result.probe, layout,
        losses=np.stack([result.train_loss, result.test_loss], axis=1))
    if block is not None:
        meta["extra"]["divergence"] = block
    out = Path(request["out"])
    fp = record.write_record(out, meta, result, layout, force=bool(request.get("force")))
    return {
        "out": str(out),
        "extra": {k: v for k, v in meta["extra"].items() if k != "perturbation"} | (
            {"perturbation": {k: meta["extra"]["perturbation"][k] for k in ("growth_rate", "saturation_row")}}
            if "perturbation" in meta["extra"] else {}),
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


def main() -> int:
    stream = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the protocol
    try:
        request = json.loads(sys.stdin.read())
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
    sys.exit(main())
