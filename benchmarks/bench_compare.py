"""`bnaudit compare` of two full 1000-epoch records: target under 2 s, against simply loading them.

Makes two real records once (``bnaudit run --epochs 1000``: one plain, one with an initial
weight moved by one ulp, so that they differ from row 0 and the whole comparison runs:
first difference, per-layer divergence over all 1001 rows, growth, environment diff; both
single-threaded, so a busy machine does not stretch the set-up), in a temporary folder
unless ``--keep DIR`` names one (reused if it already holds them).  Then, in this one process and alternating:

- load: ``record.load`` of both record folders (sha256 of every array, validation);
- compare: what ``bnaudit compare A B --json`` does, load included, through the real CLI
  (``bnaudit.cli.main``), output discarded.

Prints the median of each and their ratio.

    python benchmarks/bench_compare.py --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 2.0


def make(folder: Path, epochs: int, name: str, *extra: str) -> Path:
    out = folder / f"{name}-{epochs}"
    if not (out / "record.json").exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bnaudit", "run", "--epochs", str(epochs), "--threads", "1",
                        "--out", str(out), "--force", "--json", *extra], check=True, stdout=subprocess.DEVNULL)
        print(f"made {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="Folder to make (or reuse) the two records in.")
    args = parser.parse_args()

    from bnaudit import record
    from bnaudit.cli import main as cli

    with contextlib.ExitStack() as stack:
        folder = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnaudit-bench-")))
        folder.mkdir(parents=True, exist_ok=True)
        a = make(folder, args.epochs, "t1")
        b = make(folder, args.epochs, "perturbed", "--perturb", "linear1.weight[0,0]:1")

        def load() -> None:
            record.load(a)
            record.load(b)

        def compare() -> None:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = cli(["compare", str(a), str(b), "--json"])
            if code not in (0, 1) or not out.getvalue():
                raise SystemExit(f"compare failed with exit code {code}")

        compare()  # warm: imports, first-touch of the files
        loads, compares = [], []
        for _ in range(args.repeats):
            for fn, times in ((load, loads), (compare, compares)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        t_load, t_compare = statistics.median(loads), statistics.median(compares)
        verdict = "OK" if t_compare < TARGET_SECONDS else "TOO SLOW"
        print(f"records: 2 x {args.epochs} epochs ({sum(f.stat().st_size for f in a.iterdir()) / 1e6:.1f} MB each)")
        print(f"load both:        median {t_load:.3f} s over {args.repeats}")
        print(f"compare (CLI):    median {t_compare:.3f} s  (target < {TARGET_SECONDS:.0f} s: {verdict})")
        print(f"ratio compare / load: {t_compare / t_load:.2f}")
        return 0 if t_compare < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
