"""The process a run happens in: started by ``launch.py`` with its environment already set.

Protocol: one JSON request on stdin ({"spec", "config", "out", "force"}); JSON lines on
stdout: {"event": "progress", ...} per epoch, then {"event": "done", "summary": ...} or
{"event": "error", "exit_code": N, "message": ...}.  Warnings go to stderr.
"""

from __future__ import annotations

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


def execute(request: dict[str, Any], stream: Any) -> dict[str, Any]:
    """Run one request in this process; return the summary."""
    started = time.perf_counter()
    from bnaudit import controls, envinfo, frozen, record
    from bnaudit.spec import spec_from_record_dict

    spec = spec_from_record_dict(request["spec"])
    config = controls.RunConfig.from_dict(request["config"])
    controls.validate(config, spec, check_cpu=False)

    import torch  # first import of torch in this process: the environment is already set

    from bnaudit import runner

    controls.apply(config.controls, torch)
    effective = controls.readback(torch)
    controls.verify(config.controls, effective)
    inputs = frozen.load(spec)
    meta = record.new_meta(
        spec=spec, frozen_digest=inputs.digest, config=config.to_dict(), storage=config.controls.storage,
        effective=effective, environment=envinfo.snapshot(torch),
        created=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat())

    def progress(epoch: int, epochs: int, train: float, test: float) -> None:
        _emit(stream, {"event": "progress", "epoch": epoch, "epochs": epochs, "train_loss": train, "test_loss": test})

    result = runner.run(spec, inputs, config, progress=progress)
    layout = record.TraceLayout.for_spec(spec)
    out = Path(request["out"])
    fp = record.write_record(out, meta, result, layout, force=bool(request.get("force")))
    return {
        "out": str(out),
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
