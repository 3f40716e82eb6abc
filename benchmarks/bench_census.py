"""`bnaudit census` of the default machine set against one emulated run, as a ratio in one command.

Target: the census of N machines at J jobs costs at most 1.5x the ideal N / J emulated runs,
i.e. its orchestration (planning, the matrix folder, the comparisons, the CPU-feature probes
under qemu) adds at most half again.  Both are timed here as wall time of the real CLI in
subprocesses, in a fresh folder each: first one ``bnaudit run --cpu-model Nehalem --epochs 1``
(the baseline: qemu start-up and torch's import dominate a census run), then the census.

    python benchmarks/bench_census.py --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.5


def _timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bnaudit", *argv], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--models", default=None, help="census --models (default: the census set)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = _timed(["run", "--cpu-model", "Nehalem", "--epochs", "1", "--audit-every", "0",
                      "--out", str(Path(tmp) / "one"), "--json"])
        models = [] if args.models is None else ["--models", args.models]
        whole = _timed(["census", *models, "-j", str(args.jobs), "--out", str(Path(tmp) / "census"), "--json"])
        doc = json.loads((Path(tmp) / "census" / "census.json").read_text())
    n = len(doc["machines"]) + len(doc["missing"])
    ideal = n / args.jobs * one
    ratio = whole / ideal
    print(f"one emulated run {one:.1f} s; census of {n} machines at -j {args.jobs}: {whole:.1f} s "
          f"({len(doc['classes'])} classes); ideal {n}/{args.jobs} runs {ideal:.1f} s: ratio {ratio:.2f} "
          f"(target at most {TARGET_RATIO})")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
