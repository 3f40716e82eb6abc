"""Time `bnaudit report` over a 12-run matrix (target: under 30 s).

The matrix is made once (float32/float64/bfloat16/bf16-mixed x isa native,avx2,default,
one thread, ``--epochs`` each, through the real ``bnaudit matrix`` CLI) in a cache folder
that later invocations reuse.  Single-threaded runs because making 2-thread runs on a
busy 2-core machine is slow (OpenMP barriers stall), and the report's cost depends on
the number of runs, classes and epochs, not on which controls vary; this grid gives
about one class per run, the report's worst case (one seed figure per class).

Then the report is generated ``--repeats`` times in this process (loading and checking
the 12 records, comparing the pairs, drawing every figure, writing index.html and
report.md), and once through the CLI in a fresh process (imports included).  As a
baseline in the same process it also times loading the 12 records alone, the floor any
report pays.

    python benchmarks/bench_report.py                 # 12 runs x 300 epochs, cached in reports/tmp/
    python benchmarks/bench_report.py --epochs 1000   # the full-length matrix
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 30.0


def make_matrix(folder: Path, epochs: int, jobs: int) -> None:
    cmd = [sys.executable, "-m", "bnaudit", "matrix", "--dtype", "float32,float64,bfloat16,bf16-mixed",
           "--threads", "1", "--isa", "native,avx2,default", "--epochs", str(epochs), "--out", str(folder),
           "-j", str(jobs)]
    print("making the matrix (once):", " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bnaudit matrix failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    print(f"  matrix made in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="matrix -j while making the runs")
    parser.add_argument("--cache", type=Path, default=None, help="matrix folder (default: reports/tmp/matrix-E)")
    args = parser.parse_args()
    folder = args.cache or Path("reports") / "tmp" / f"matrix-{args.epochs}"
    make_matrix(folder, args.epochs, args.jobs)  # resumes: finished runs are not redone

    from bnaudit import record
    from bnaudit.report import writer

    runs = sorted(p for p in (folder / "runs").iterdir() if (p / "record.json").exists())
    assert len(runs) == 12, f"expected 12 runs in {folder}, found {len(runs)}"
    load_times, report_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            started = time.perf_counter()
            for r in runs:
                record.load_record(r)
            load_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            written = writer.write_report([folder], Path(tmp) / f"rep{i}")
            report_times.append(time.perf_counter() - started)
        figures = [f for f in written.files if f.endswith(".png")]
        size = sum((written.out / f).stat().st_size for f in written.files)
        started = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "bnaudit", "report", str(folder), "--out", str(Path(tmp) / "cli")],
                             capture_output=True, text=True)
        cli_seconds = time.perf_counter() - started
        if cli.returncode != 0:
            sys.exit(f"bnaudit report failed: {cli.stderr.strip()}")
        shutil.rmtree(Path(tmp) / "cli")
    best, median = min(report_times), statistics.median(report_times)
    print(f"12 runs x {args.epochs} epochs, {len(written.report.classes)} classes, {len(figures)} figures, "
          f"{size / 1e6:.2f} MB written")
    print(f"loading the 12 records alone: median {statistics.median(load_times):.2f} s")
    print(f"report in process:            median {median:.2f} s, best {best:.2f} s "
          f"({median / statistics.median(load_times):.1f}x the loading floor)")
    print(f"bnaudit report (fresh process, imports included): {cli_seconds:.2f} s")
    verdict = "meets" if max(median, cli_seconds) < TARGET_SECONDS else "MISSES"
    print(f"{verdict} the target of {TARGET_SECONDS:.0f} s")


if __name__ == "__main__":
    main()
