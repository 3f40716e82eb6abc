"""bnaudit run's recording overhead against a bare PyTorch loop of the same experiment.

Both loops run in this one process, with the same controls applied (1 thread by
default), alternating, so that machine noise hits both alike.  The bare loop is the
plain recipe: nn.Sequential forward, mse_loss, backward, SGD step, MultiStepLR, and the
per-epoch eval-mode train/test loss the experiment reports.  The recorded loop is
``bnaudit.runner.run`` with full recording (digests, values, probe), without the operator
audit; ``--audit`` also times it with the audit (every 10 epochs).  Prints median ratios
and the ratio of the fastest run of each (the one least disturbed by other load).

    python benchmarks/bench_run_overhead.py --epochs 1000 --repeats 3 --audit
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--audit", action="store_true", help="also time the run with the operator audit")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch
    import torch.nn.functional as F

    from bnaudit import controls, frozen, runner
    from bnaudit.spec import default_spec

    spec = default_spec()
    inputs = frozen.load(spec)
    config = controls.RunConfig(controls.Controls(dtype=args.dtype, threads=args.threads), epochs=args.epochs)
    controls.apply(config.controls, torch)
    dtype = runner.TORCH_DTYPES[args.dtype]

    def bare() -> float:
        model = runner.build_model(spec).to(dtype)
        runner.load_initial_state(model, spec, inputs, config)
        x = torch.from_numpy(inputs.inputs).to(dtype)
        y = torch.from_numpy(inputs.targets).to(dtype).unsqueeze(1)
        n = spec.data.train
        opt = torch.optim.SGD(model.parameters(), lr=spec.train.lr, momentum=spec.train.momentum, foreach=False)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(spec.train.lr_milestones), spec.train.lr_gamma)
        order = torch.from_numpy(inputs.batches.astype("int64"))
        bs = spec.train.batch_size
        start = time.perf_counter()
        losses = []
        for epoch in range(args.epochs):
            for step in range(spec.steps_per_epoch):
                idx = order[epoch][step * bs:(step + 1) * bs]
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(model(x[:n][idx]), y[:n][idx])
                loss.backward()
                opt.step()
            sched.step()
            model.eval()
            with torch.no_grad():
                pred = model(x)
                losses.append((float(F.mse_loss(pred[:n], y[:n])), float(F.mse_loss(pred[n:], y[n:]))))
            model.train()
        return time.perf_counter() - start

    def recorded() -> float:
        start = time.perf_counter()
        runner.run(spec, inputs, config)
        return time.perf_counter() - start

    def audited() -> float:
        from bnaudit import audit

        start = time.perf_counter()
        runner.run(spec, inputs, config, observers=audit.observers_for(spec, config))
        return time.perf_counter() - start

    bare()  # warm-up
    ratios, bares, recs, auds, audit_ratios = [], [], [], [], []
    for _ in range(args.repeats):
        b = bare()
        r = recorded()
        a = audited() if args.audit else float("nan")
        bares.append(b)
        recs.append(r)
        auds.append(a)
        ratios.append(r / b)
        audit_ratios.append(a / b)
    print(f"epochs={args.epochs} dtype={args.dtype} threads={args.threads} repeats={args.repeats}")
    print(f"bare loop     median {statistics.median(bares):.3f} s")
    print(f"bnaudit run   median {statistics.median(recs):.3f} s")
    print(f"ratio         median {statistics.median(ratios):.3f}  (all: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"ratio of the fastest runs {min(recs) / min(bares):.3f}  (least disturbed by other load)")
    if args.audit:
        print(f"with operator audit every 10 epochs: median {statistics.median(auds):.3f} s, "
              f"ratio {statistics.median(audit_ratios):.3f}")


if __name__ == "__main__":
    sys.exit(main())
