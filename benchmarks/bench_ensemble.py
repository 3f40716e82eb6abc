"""`bnaudit ensemble` of N seeds against the runs themselves, as a ratio in one command.

Target: an ensemble of N native runs at J jobs costs at most 1.05x the ideal N / J runs, i.e.
the ensemble's machinery (planning, the matrix folder and its summary, the statistics, the
figures, ensemble.json and .md) adds at most 5 % beyond the runs.  Both are timed here as wall
time of the real CLI in subprocesses, in a fresh folder each: first J ``bnaudit run --seed S``
side by side (the baseline: J runs as the ensemble runs them, so that the two cores' sharing is
in both), then the ensemble without its floor.

    python benchmarks/bench_ensemble.py                       # 32 seeds, 1000 epochs, -j 2
    python benchmarks/bench_ensemble.py --seeds 8 --epochs 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1000)
    args = parser.parse_args()
    bnaudit = [sys.executable, "-m", "bnaudit"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        procs = [subprocess.Popen([*bnaudit, "run", "--seed", str(1000 + k), "--epochs", str(args.epochs),
                                   "--audit-every", "0", "--out", str(Path(tmp) / f"one-{k}"), "--json"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in range(args.jobs)]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a baseline run failed")
        batch = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([*bnaudit, "ensemble", "--seeds", f"1..{args.seeds}", "--epochs", str(args.epochs),
                        "--no-floor", "-j", str(args.jobs), "--out", str(Path(tmp) / "e"), "--json"],
                       check=True, capture_output=True)
        whole = time.perf_counter() - start
        doc = json.loads((Path(tmp) / "e" / "ensemble.json").read_text())
    ideal = args.seeds / args.jobs * batch
    ratio = whole / ideal
    print(f"{args.jobs} runs side by side: {batch:.1f} s; ensemble of {args.seeds} seeds x {args.epochs} epochs at "
          f"-j {args.jobs}: {whole:.1f} s ({len(doc['missing'])} missing); ideal {args.seeds}/{args.jobs} batches "
          f"{ideal:.1f} s: ratio {ratio:.3f} (target at most {TARGET_RATIO})")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
