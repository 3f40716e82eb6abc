"""Wall time of `bnaudit check --profile smoke`, end to end: what its integrity checks cost, as a ratio.

Targets: the smoke check takes under 15 s on the project's 2-core machine, so that it can
run on every commit, and its integrity checks keep it within 1.1x of the same check
without them.  Each repeat starts fresh processes, as CI does: the CLI (which starts
the run's own process), the run, the comparison and the report.  Three commands,
alternating, each through the same small launcher (``bnaudit.cli.main`` in a fresh
interpreter):

- check: ``bnaudit check --baseline signed.json --profile smoke`` with
  ``BNAUDIT_SIGNING_KEY`` set: the baseline's seal and signature, the run's record.json
  checksum and every parameter and running statistic against its state digest, the
  non-finite guard (and under ``--tolerance bits:N`` the divergence recomputed from the
  record's arrays);
- unverified: the same check of the unsigned baseline without a key, with those checks
  patched out in the launcher (record.json's content_sha256 taken as given,
  ``record.verify_state_rows`` and ``check.nonfinite_parameters`` no-ops, and under
  bits:N the carried divergence block used as is): what the check cost before issue 11,
  measured on today's code;
- run: ``bnaudit run`` of the smoke profile's epochs: what checking adds to running;
- check --record, unverified --record: the two checks of a smoke record made once in the
  set-up, without a run: the part of the check that the integrity checks change, with
  the run's own variation (most of the end-to-end time) left out.

Prints the minimum and median of each and the ratios check / unverified of the medians and
of the minima (the least disturbed by other work on the machine).

    python benchmarks/bench_check_smoke.py --repeats 5
    python benchmarks/bench_check_smoke.py --repeats 5 --tolerance bits:1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 15.0
TARGET_RATIO = 1.10
KEY = "bench-only-signing-key-" + "0" * 41

LAUNCHER = """
import sys
if sys.argv[1] == "unverified":
    from bnaudit import check, divergence, gate, record
    record.verify_state_rows = lambda *args, **kwargs: None
    record.record_sha256 = lambda meta: meta.get("content_sha256")
    check.nonfinite_parameters = lambda *args, **kwargs: None
    attach = gate.with_reference
    gate.with_reference = lambda fp: fp if fp.divergence is not None else attach(fp)
from bnaudit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[3:])} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return took


def _summary(name: str, times: list[float]) -> str:
    return f"{name:<20} min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", default="exact")
    args = parser.parse_args()

    from bnaudit.gate import SMOKE_EPOCHS

    plain = {k: v for k, v in os.environ.items() if k != "BNAUDIT_SIGNING_KEY"}
    keyed = dict(plain, BNAUDIT_SIGNING_KEY=KEY)
    launch = [sys.executable, "-c", LAUNCHER]
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        unsigned, signed = Path(tmp) / "unsigned.json", Path(tmp) / "signed.json"
        _timed([*launch, "now", "baseline", "create", "--profile", "smoke", "--out", str(unsigned)], plain)
        _timed([*launch, "now", "baseline", "create", "--record", str(unsigned), "--out", str(signed)], keyed)
        rec = Path(tmp) / "smoke-record"
        _timed([*launch, "now", "run", "--epochs", str(SMOKE_EPOCHS), "--out", str(rec), "--json"], plain)
        check = ["check", "--tolerance", args.tolerance]
        smoke = [*check, "--profile", "smoke"]
        given = [*check, "--record", str(rec)]
        times: dict[str, list[float]] = {k: [] for k in ("check", "unverified", "run", "check --record",
                                                         "unverified --record")}
        commands = {
            "check": ([*launch, "now", *smoke, "--baseline", str(signed)], keyed),
            "unverified": ([*launch, "unverified", *smoke, "--baseline", str(unsigned)], plain),
            "check --record": ([*launch, "now", *given, "--baseline", str(signed)], keyed),
            "unverified --record": ([*launch, "unverified", *given, "--baseline", str(unsigned)], plain),
        }
        order = list(commands)
        for i in range(args.repeats):
            for name in order:
                times[name].append(_timed(*commands[name]))
            times["run"].append(_timed([*launch, "now", "run", "--epochs", str(SMOKE_EPOCHS),
                                        "--out", str(Path(tmp) / f"run{i}"), "--json"], plain))
            order = [order[1], order[0], order[3], order[2]]  # each of a pair goes first every other repeat
    print(f"bnaudit check --tolerance {args.tolerance}, smoke profile ({SMOKE_EPOCHS} epochs), "
          f"{args.repeats} repeats each:")
    for name, values in times.items():
        print(_summary(name, values))
    median = {k: statistics.median(v) for k, v in times.items()}
    for what in ("", " --record"):
        a, b = times[f"check{what}"], times[f"unverified{what}"]
        print(f"check{what} / unverified{what}: {median[f'check{what}'] / median[f'unverified{what}']:.3f} "
              f"(medians), {min(a) / min(b):.3f} (minima); target <= {TARGET_RATIO:.2f}")
    met = median["check"] < TARGET_SECONDS and median["check"] / median["unverified"] <= TARGET_RATIO
    print(f"check / run: {median['check'] / median['run']:.2f}; check under {TARGET_SECONDS:.0f} s and "
          f"end-to-end ratio: {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
