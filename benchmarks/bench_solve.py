"""`bnaudit solve`: the runs its staged search makes against the full product, and its wall time.

Target: the search (baseline, screens, confirmation, partition: everything before the timing
and the verification) makes at most a tenth of the runs that every combination of the
feasible levers on every machine would need.  Both counts come from the solve's own answer
(``search_runs``, ``exhaustive_runs``); the wall time is the real CLI's, in a fresh folder.

    python benchmarks/bench_solve.py --jobs 2                       # the census set, 1000-epoch verify
    python benchmarks/bench_solve.py --machines Nehalem,EPYC-Rome --verify-epochs 2 --cost-epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SHARE = 0.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--machines", default=None, help="solve --machines (default: native and the census set)")
    parser.add_argument("--verify-epochs", type=int, default=None)
    parser.add_argument("--cost-epochs", type=int, default=None)
    parser.add_argument("--cost-repeats", type=int, default=3)
    args = parser.parse_args()
    argv = ["solve", "-j", str(args.jobs), "--cost-repeats", str(args.cost_repeats), "--json"]
    for flag, value in (("--machines", args.machines), ("--verify-epochs", args.verify_epochs),
                        ("--cost-epochs", args.cost_epochs)):
        if value is not None:
            argv += [flag, str(value)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bnaudit", *argv, "--out", str(Path(tmp) / "s")], check=True,
                       capture_output=True)
        wall = time.perf_counter() - start
        doc = json.loads((Path(tmp) / "s" / "solve.json").read_text())
    share = doc["search_runs"] / doc["exhaustive_runs"]
    print(f"solve of {len(doc['machines'])} machines at -j {args.jobs}: {wall:.1f} s wall; best: {doc['best']}; "
          f"search {doc['search_runs']} runs of {doc['screen_epochs']} epoch(s) against {doc['exhaustive_runs']} for "
          f"the full product: share {share:.3f} (target at most {TARGET_SHARE}); runs by stage {doc['runs']}")
    return 0 if share <= TARGET_SHARE else 1


if __name__ == "__main__":
    raise SystemExit(main())
