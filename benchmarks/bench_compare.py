"""`bnaudit compare` of two full 1000-epoch records: what the integrity checks cost, as a ratio in one process.

Targets: the checks that make an edited record fail to load cost at most 10% on top of
the comparison without them, and the whole comparison stays under 2 s.

Makes two real records once (``bnaudit run --epochs 1000``: one plain, one with an initial
weight moved by one ulp, so that they differ from row 0 and the whole comparison runs:
first difference, per-layer divergence over all 1001 rows, growth, environment diff; both
single-threaded, so a busy machine does not stretch the set-up), in a temporary folder
unless ``--keep DIR`` names one (reused if it already holds them).  Then, in this one
process, alternating, each repeat timing all three in turn:

- compare: what ``bnaudit compare A B --json`` does, load included, through the real CLI
  (``bnaudit.cli.main``), output discarded.  Loading verifies every array file's sha256,
  record.json's own ``content_sha256`` and every epoch row of parameters and running
  statistics against its state digest (``record.verify_state_rows``);
- unverified: the same command with those last two checks patched out (the checks that
  issue 11 added; what compare cost before them, measured on today's code: every other
  difference between then and now is in both);
- load: ``record.load`` of both record folders, with every check.

Prints the minimum and median of each, and the ratio compare / unverified of the medians
and of the minima (the minima are the least disturbed by other work on the machine).

Then the same pair as whole commands, as a user or a CI job runs them: a fresh
interpreter for each, imports included, alternating, ``--repeats`` times each (this
script run with ``--once``, with and without ``--unverified``).  The target is the
in-process ratio; the whole-command ratio says what the checks cost the person waiting.

    python benchmarks/bench_compare.py --repeats 7 --keep /tmp/bench-compare
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bnaudit.record import RECORD_SCHEMA

TARGET_SECONDS = 2.0
TARGET_RATIO = 1.10


def make(folder: Path, epochs: int, name: str, *extra: str) -> Path:
    out = folder / f"{name}-{epochs}"
    if not (out / "record.json").exists() or json.loads((out / "record.json").read_text())["schema"] != RECORD_SCHEMA:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bnaudit", "run", "--epochs", str(epochs), "--threads", "1",
                        "--out", str(out), "--force", "--json", *extra], check=True, stdout=subprocess.DEVNULL)
        print(f"made {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def _no_state_digests(*args: Any, **kwargs: Any) -> None:
    return None


def _as_given(meta: dict[str, Any]) -> str:
    return str(meta.get("content_sha256"))


@contextlib.contextmanager
def unverified() -> Iterator[None]:
    """Loading without record.json's content_sha256 check and without the per-row state digests."""
    from bnaudit import record

    saved = record.verify_state_rows, record.record_sha256
    record.verify_state_rows, record.record_sha256 = _no_state_digests, _as_given
    try:
        yield
    finally:
        record.verify_state_rows, record.record_sha256 = saved


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(name: str, times: list[float]) -> str:
    return f"{name:<13} min {min(times):.3f} s, median {statistics.median(times):.3f} s over {len(times)}"


def once(a: Path, b: Path, verified: bool) -> int:
    """One ``bnaudit compare A B --json`` in this process, checked or not: a whole command's work."""
    from bnaudit.cli import main as cli

    with contextlib.ExitStack() as stack:
        if not verified:
            stack.enter_context(unverified())
        out = stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        code = cli(["compare", str(a), str(b), "--json"])
    return 0 if code in (0, 1) and out.getvalue() else 1


def commands(a: Path, b: Path, repeats: int) -> dict[str, list[float]]:
    """Whole-command timings, alternating: fresh interpreters, imports included."""
    times: dict[str, list[float]] = {"command": [], "command unverified": []}
    for _ in range(repeats):
        for name, extra in (("command", []), ("command unverified", ["--unverified"])):
            argv = [sys.executable, __file__, "--once", str(a), str(b), *extra]
            start = time.perf_counter()
            subprocess.run(argv, check=True)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="Folder to make (or reuse) the two records in.")
    parser.add_argument("--once", type=Path, nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--unverified", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once is not None:
        return once(*args.once, verified=not args.unverified)

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

        def compare_unverified() -> None:
            with unverified():
                compare()

        compare()  # warm: imports, first-touch of the files
        compare_unverified()
        times: dict[str, list[float]] = {"compare": [], "unverified": [], "load": []}
        for _ in range(args.repeats):
            for name, fn in (("compare", compare), ("unverified", compare_unverified), ("load", load)):
                times[name].append(_timed(fn))
        median = {k: statistics.median(v) for k, v in times.items()}
        ratio, ratio_min = median["compare"] / median["unverified"], min(times["compare"]) / min(times["unverified"])
        fast, cheap = median["compare"] < TARGET_SECONDS, ratio <= TARGET_RATIO
        print(f"records: 2 x {args.epochs} epochs ({sum(f.stat().st_size for f in a.iterdir()) / 1e6:.1f} MB each)")
        for name in times:
            print(_summary(name, times[name]))
        print(f"compare / unverified: {ratio:.3f} (medians), {ratio_min:.3f} (minima); "
              f"target <= {TARGET_RATIO:.2f}: {'met' if cheap else 'NOT met'}")
        print(f"compare / load: {median['compare'] / median['load']:.2f}; "
              f"target compare < {TARGET_SECONDS:.0f} s: {'met' if fast else 'NOT met'}")
        whole = commands(a, b, args.repeats)
        for name in whole:
            print(_summary(name, whole[name]))
        w = {k: statistics.median(v) for k, v in whole.items()}
        print(f"whole command / unverified: {w['command'] / w['command unverified']:.3f} (medians), "
              f"{min(whole['command']) / min(whole['command unverified']):.3f} (minima)")
        return 0 if fast and cheap else 1


if __name__ == "__main__":
    sys.exit(main())
