"""Wall time of `bnaudit check --profile smoke`, end to end, against `bnaudit run` of the same epochs.

Target: the smoke check takes under 15 s on the project's 2-core machine, so that it can
run on every commit.  Each repeat starts fresh processes, as CI does: the CLI (which
starts the run's own process), the run, the comparison and the report.  The reference
command, measured alternately in the same way, is `bnaudit run` of the smoke profile's
epochs: the ratio is what checking adds to running.

    python benchmarks/bench_check_smoke.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 15.0


def _timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from bnaudit.check import SMOKE_EPOCHS

    cli = [sys.executable, "-m", "bnaudit"]
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        baseline = Path(tmp) / "baseline.json"
        _timed([*cli, "baseline", "create", "--profile", "smoke", "--out", str(baseline)])
        checks, runs = [], []
        for i in range(args.repeats):
            checks.append(_timed([*cli, "check", "--baseline", str(baseline), "--profile", "smoke"]))
            runs.append(_timed([*cli, "run", "--epochs", str(SMOKE_EPOCHS), "--out", str(Path(tmp) / f"run{i}"),
                                "--json"]))
    check_s, run_s = statistics.median(checks), statistics.median(runs)
    print(f"bnaudit check --profile smoke ({SMOKE_EPOCHS} epochs), {args.repeats} repeats: "
          f"median {check_s:.2f} s (min {min(checks):.2f}, max {max(checks):.2f})")
    print(f"bnaudit run --epochs {SMOKE_EPOCHS}, same repeats: median {run_s:.2f} s; "
          f"check / run = {check_s / run_s:.2f}")
    print(f"target: under {TARGET_SECONDS:.0f} s -> {'met' if check_s < TARGET_SECONDS else 'NOT met'}")


if __name__ == "__main__":
    main()
