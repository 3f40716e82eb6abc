"""Speed of the mpmath reference: operations per second, dot products, epochs, the full build.

Everything runs on one core in this process (the pure-Python backend is measured in a
child process, since mpmath picks its backend when it is imported).  Times are the
process's CPU time (time.process_time), so that other users of a shared machine do not
inflate them; on an idle core they equal wall time.

1. scalar mpf multiply and add per second at 128, 512 and 640 bits, gmpy2 backend and
   pure-Python backend (MPMATH_NOGMPY=1);
2. a 17-term dot product (a Linear row with its bias): a Python loop of mpf
   multiply-adds, ``ctx.fdot``, mpmath's ``mpf_sum`` of exact ``mpf_mul`` products, and the
   engine's ``_dot`` (the vectors as integers at a common exponent: products and sum
   in Python integers, one rounding), with and without converting the vectors (the
   engine converts each weight row once per step and reuses it for the whole batch);
3. one training epoch and one stored row (probe + eval losses) of the default spec at
   the build's two precisions;
4. the full build: measured, if ``--full`` (a 1000-epoch build takes about 13 minutes
   on one core), else EXTRAPOLATED from (3) and printed as such:
       1000 epochs x (train at p1 + train at p2) + 191 rows x (row at p1 + row at p2 + compare).
   ``--jobs 2`` builds with the check precision in a second process (wall time and the
   CPU time of both processes are printed).

    python benchmarks/bench_reference.py                    # about a minute
    python benchmarks/bench_reference.py --full --jobs 2    # the real full build, into a temp folder
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS_SCRIPT = r"""
import json, time, random, mpmath
from mpmath import libmp
out = {"backend": libmp.BACKEND}
for prec in (128, 512, 640):
    ctx = mpmath.MPContext(); ctx.prec = prec
    a, b = ctx.mpf(random.random()), ctx.mpf(random.random())
    n = 100000
    t = time.process_time()
    for _ in range(n): a * b
    mul = n / (time.process_time() - t)
    t = time.process_time()
    for _ in range(n): a + b
    add = n / (time.process_time() - t)
    out[str(prec)] = {"mul_per_s": mul, "add_per_s": add}
print(json.dumps(out))
"""


def scalar_ops(gmpy: bool) -> dict:
    env = dict(os.environ)
    if not gmpy:
        env["MPMATH_NOGMPY"] = "1"
    done = subprocess.run([sys.executable, "-c", OPS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def dot_products(prec: int) -> dict:
    import random

    from mpmath.libmp import mpf_mul, mpf_sum

    from bnaudit.reference import engine

    ctx = engine.new_context(prec)
    a = [ctx.mpf(random.uniform(-1, 1)) for _ in range(17)]
    b = [ctx.mpf(random.uniform(-1, 1)) for _ in range(17)]
    n = 20000
    out = {}
    t = time.process_time()
    for _ in range(n):
        s = ctx.zero
        for x, y in zip(a, b):
            s += x * y
    out["loop_terms_per_s"] = 17 * n / (time.process_time() - t)
    t = time.process_time()
    for _ in range(n):
        ctx.fdot(a, b)
    out["fdot_terms_per_s"] = 17 * n / (time.process_time() - t)
    t = time.process_time()
    for _ in range(n):
        ctx.make_mpf(mpf_sum([mpf_mul(x._mpf_, y._mpf_) for x, y in zip(a, b)], *ctx._prec_rounding))
    out["mpf_sum_terms_per_s"] = 17 * n / (time.process_time() - t)
    t = time.process_time()
    for _ in range(n):
        engine._dot(ctx, a, b)
    out["engine_dot_terms_per_s"] = 17 * n / (time.process_time() - t)
    fa, fb = engine._fixed(a), engine._fixed(b)
    t = time.process_time()
    for _ in range(n):
        engine._dot_fixed(ctx, fa, fb)
    out["engine_dot_converted_terms_per_s"] = 17 * n / (time.process_time() - t)
    return out


def epoch_costs(precisions: tuple[int, int], epochs: int) -> dict:
    from bnaudit import frozen
    from bnaudit.reference import build
    from bnaudit.spec import default_spec

    spec = default_spec()
    fz = frozen.load(spec)
    out = {}
    for prec in precisions:
        traj = build.Trajectory(spec, fz, prec)
        t = time.process_time()
        for e in range(epochs):
            traj.net.train_epoch(e, fz.batches[e])
        train = (time.process_time() - t) / epochs
        t = time.process_time()
        values = traj.row_values()
        row = time.process_time() - t
        out[prec] = {"train_epoch_s": train, "row_s": row, "values": values, "ctx": traj.ctx}
    hi = max(precisions)
    t = time.process_time()
    build.agreement_digits(out[hi]["ctx"], out[min(precisions)]["values"], out[hi]["values"], 150.0)
    compare = time.process_time() - t
    return {str(p): {k: v for k, v in d.items() if k.endswith("_s")} for p, d in out.items()} | {"compare_s": compare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per precision for the extrapolation")
    parser.add_argument("--precision", type=int, default=512)
    parser.add_argument("--check-precision", type=int, default=640)
    parser.add_argument("--full", action="store_true", help="run the real 1000-epoch build (long)")
    parser.add_argument("--jobs", type=int, default=1, help="processes for --full (2: one per precision)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    print("== scalar mpf operations per second (one core)")
    for gmpy in (True, False):
        r = scalar_ops(gmpy)
        for prec in ("128", "512", "640"):
            print(f"  backend {r['backend']:7s} {prec:>4} bits: mul {r[prec]['mul_per_s'] / 1e6:.2f} M/s, "
                  f"add {r[prec]['add_per_s'] / 1e6:.2f} M/s")
    print("== 17-term dot product, multiply-add terms per second")
    for prec in (args.precision, args.check_precision):
        d = dot_products(prec)
        print(f"  {prec} bits: python loop {d['loop_terms_per_s'] / 1e6:.2f} M/s, ctx.fdot "
              f"{d['fdot_terms_per_s'] / 1e6:.2f} M/s, mpf_sum of mpf_mul {d['mpf_sum_terms_per_s'] / 1e6:.2f} M/s, "
              f"engine._dot {d['engine_dot_terms_per_s'] / 1e6:.2f} M/s "
              f"({d['engine_dot_terms_per_s'] / d['loop_terms_per_s']:.1f}x the loop), "
              f"on converted vectors {d['engine_dot_converted_terms_per_s'] / 1e6:.2f} M/s")
    print(f"== default spec, {args.epochs} epochs per precision")
    precisions = (args.precision, args.check_precision)
    c = epoch_costs(precisions, args.epochs)
    for p in precisions:
        print(f"  {p} bits: {c[str(p)]['train_epoch_s']:.2f} s per training epoch, "
              f"{c[str(p)]['row_s']:.2f} s per stored row (probe + eval losses)")
    print(f"  agreement check of one row: {c['compare_s']:.2f} s")
    rows = 191
    train = sum(c[str(p)]["train_epoch_s"] for p in precisions)
    row = sum(c[str(p)]["row_s"] for p in precisions) + c["compare_s"]
    estimate = 1000 * train + rows * row
    print(f"  EXTRAPOLATED full build (1000 epochs x {train:.2f} s + {rows} rows x {row:.2f} s): "
          f"{estimate / 60:.1f} min on one core (not measured)")
    if args.full:
        from bnaudit import frozen
        from bnaudit.reference import build
        from bnaudit.spec import default_spec

        spec = default_spec()
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            ref = build.build(spec, frozen.load(spec), Path(tmp) / "ref", precision=args.precision,
                              check_precision=args.check_precision, jobs=args.jobs)
            wall = time.perf_counter() - t
            cpu = json.loads((ref.path / "manifest.json").read_text())["build"]["cpu_seconds"]
            print(f"== MEASURED full build, {args.jobs} process(es): {wall / 60:.1f} min wall, "
                  f"{cpu / 60:.1f} min of CPU in all, agreement >= {ref.agreement.min():.1f} digits")


if __name__ == "__main__":
    main()
