"""`bnaudit matrix -j 2` against `-j 1` on a grid of single-thread runs: the wall-time ratio.

Both matrices are the same grid (default: float32, float64, bfloat16 x isa default, avx2,
1 thread each), run by ``bnaudit.matrix.execute.execute`` from this one process into fresh
folders, alternating -j 1 and -j 2 so that machine noise hits both alike.  Each run's
thread settings are checked from its record's read-back.  Prints the wall time of each
matrix, the median ratio (target: at most 0.6 on a 2-core machine) and the machine's
load (``uptime``) before and after, since other work on the machine moves the figure.

    python benchmarks/bench_matrix.py --epochs 50 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32,float64,bfloat16")
    parser.add_argument("--isa", default="default,avx2")
    args = parser.parse_args()

    from bnaudit.cli.lists import split_list
    from bnaudit.matrix.execute import execute, threads_honoured
    from bnaudit.matrix.plan import Grid, Variant, make_plan
    from bnaudit.spec import default_spec

    grid = Grid(dtype=tuple(split_list(args.dtype, "--dtype")), threads=(1,), isa=tuple(split_list(args.isa, "--isa")))
    plan = make_plan([Variant("default", default_spec())], grid, epochs=args.epochs, audit_every=0)
    root = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    print(f"grid: {len(plan.runs)} single-thread runs of {args.epochs} epochs ({args.dtype} x isa {args.isa})")
    print(f"before: {uptime()}")
    walls: dict[int, list[float]] = {1: [], 2: []}
    try:
        for r in range(args.repeats):
            for jobs in (1, 2):
                out = root / f"j{jobs}-{r}"
                done = execute(plan, out, jobs=jobs)
                if done.failures:
                    raise SystemExit(f"-j {jobs}: {done.failures[0].key} failed: {done.failures[0].message}")
                for run in plan.runs:
                    effective = json.loads((out / run.folder / "record.json").read_text())["effective"]
                    assert threads_honoured(1, effective) is None, (run.key, effective)
                walls[jobs].append(done.wall_seconds)
                print(f"  -j {jobs}: {done.wall_seconds:.1f} s")
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = [b / a for a, b in zip(walls[1], walls[2], strict=True)]
    print(f"after: {uptime()}")
    print(f"-j 1 median {statistics.median(walls[1]):.1f} s, -j 2 median {statistics.median(walls[2]):.1f} s, "
          f"ratio -j2/-j1 {statistics.median(ratios):.2f} (target <= 0.60); every run read back 1 thread")


if __name__ == "__main__":
    main()
