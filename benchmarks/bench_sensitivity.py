"""`bnaudit reference sensitivity` against the reference build of the same length, as a ratio in one process.

Target: the sensitivity of N epochs (default 100) costs at most 2x the reference build of
N epochs.  Both run here, in one process on one core (the build with ``jobs=1``, into a
temporary folder), alternating, ``--repeats`` times each.  Times are CPU time
(time.process_time), so that other work on a shared machine does not inflate them; on an
idle core they equal wall time.

What each does: the build trains the trajectory at its two precisions (512 and 640 bits)
and stores and compares 100+ rows; the sensitivity trains two copies at 512 bits (one
with the perturbation) and compares their parameters at every row.

    python benchmarks/bench_sensitivity.py --epochs 100 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from bnaudit import frozen
    from bnaudit.reference import build, sensitivity
    from bnaudit.spec import load_spec

    spec = load_spec(None)
    inputs = frozen.load(spec)
    times: dict[str, list[float]] = {"build": [], "sensitivity": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.process_time()
            build.build(spec, inputs, Path(tmp) / "ref", epochs=args.epochs, jobs=1)
            times["build"].append(time.process_time() - start)
        start = time.process_time()
        result = sensitivity.measure(spec, inputs, epochs=args.epochs)
        times["sensitivity"].append(time.process_time() - start)
    for name, values in times.items():
        print(f"{name:12} min {min(values):.1f} s, median {statistics.median(values):.1f} s CPU over {len(values)}")
    ratio = statistics.median(times["sensitivity"]) / statistics.median(times["build"])
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"sensitivity / build, {args.epochs} epochs: {ratio:.3f} (medians); target <= {TARGET_RATIO}: {verdict}")
    w = result.window(0, min(7, args.epochs))
    total = sensitivity.amplification(result)
    print(f"growth over rows 0..{w.end}: {w.rate:.3f} ln per epoch; over the run e^{total:.2f}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
