"""Terminal rendering of a run: progress over epochs and the closing summary table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bnaudit import amplification
from bnaudit.amplification import Beside
from bnaudit.blocks import ChaosFloor, RunSummary
from bnaudit.controls import RunConfig
from bnaudit.layout import after, nonfinite_when
from bnaudit.report import compare_view, escape, reference_view
from bnaudit.report import console as console_policy

if TYPE_CHECKING:
    from bnaudit.reference.sensitivity import Sensitivity

console = console_policy.stdout()
err_console = console_policy.stderr()


@contextlib.contextmanager
def progress(epochs: int, label: str, *, enabled: bool = True) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over epochs on stderr; yields the callback for progress events (one with a ``stage``
    names what the run does after its last epoch)."""
    bar = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                   TextColumn("train {task.fields[train]}  test {task.fields[test]}"), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=not (enabled and err_console.is_terminal))
    with bar:
        task = bar.add_task(escape.printable(label), total=epochs, train="-", test="-")

        def advance(event: dict[str, Any]) -> None:
            stage = event.get("stage")
            bar.update(task, completed=event["epoch"], train=f"{event['train_loss']:.4g}",
                       test=f"{event['test_loss']:.4g}")
            if isinstance(stage, str):
                bar.update(task, description=escape.printable(f"{label}: {stage}"))

        yield advance


def _row(table: Table, key: str, value: str) -> None:
    """A two-column row; it may quote the user or the machine (a path, a CPU name, a variable): never markup."""
    table.add_row(escape.terminal(key), escape.terminal(value))


def floor_beside(floor: ChaosFloor, exact: Sensitivity | None, initial: np.ndarray) -> Beside | None:
    """A chaos floor beside the exact-arithmetic amplification over the same rows (None without both);
    ``initial``: the run's initial parameters (the scale of a small difference)."""
    if exact is None:
        return None
    return amplification.beside(exact, range(len(floor.max_abs)), floor.max_abs, saturation=floor.saturation_row,
                                initial=initial)


def floor_exact_text(floor: ChaosFloor, exact: Sensitivity | None, initial: np.ndarray, storage: str) -> str:
    """``floor_beside`` in words, or why there is none."""
    if exact is None:
        return "no sensitivity measured for this experiment (`bnaudit reference sensitivity --save`)"
    b = floor_beside(floor, exact, initial)
    if b is None:
        return (f"no window of one epoch or more where the difference is still small (at most "
                f"{amplification.SMALL:g} of the largest initial parameter) and the sensitivity covers "
                f"({exact.rows[-1]} epochs)")
    return compare_view.exact_text(b, storage)


def dispatch_text(e: Mapping[str, Any]) -> str:
    """The dispatch controls as the run's process read them back (a record from before them: "-")."""
    parts = []
    if "numpy_dispatch" in e:
        parts.append("numpy " + "/".join(e["numpy_dispatch"]))
    parts += [f"OpenBLAS {p['architecture']}" for p in e.get("threadpools", []) if p.get("architecture")]
    if e.get("omp_dynamic") is not None:
        parts.append(f"OMP_DYNAMIC {'on' if e['omp_dynamic'] else 'off'}")
    if "flush_denormal" in e:
        parts.append("subnormals " + ("flushed to zero" if e["flush_denormal"] else "kept"))
    return ", ".join(parts) or "-"


def render(summary: RunSummary, exact: Sensitivity | None = None, initial: np.ndarray | None = None) -> None:
    """The closing table of `bnaudit run`; a --perturb run's chaos floor is set beside ``exact``, the
    experiment's stored sensitivity, where there is one (``initial``: the run's initial parameters)."""
    config = RunConfig.from_dict(dict(summary.config))
    c, e = config.controls, summary.effective
    # No box: the widest word (the 64-digit fingerprint) and the widest key then fit 80 columns.
    table = Table(title="bnaudit run", show_header=False, title_justify="left", box=None, padding=(0, 1, 0, 0),
                  pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    _row(table, "configuration", f"dtype {c.dtype}, threads {c.threads}, isa {c.isa}, "
                                f"{'deterministic' if c.deterministic else 'non-deterministic'}")
    if c.promote:
        _row(table, "promoted", f"{', '.join(c.promote)}: computed in float64, each output rounded once to {c.dtype}")
    if summary.cpu_model:
        _row(table, "emulated CPU", summary.cpu_model)
    _row(table, "effective", f"capability {e['cpu_capability']}, intra-op threads {e['intra_op_threads']}, "
                            f"inter-op threads {e['inter_op_threads']}, "
                            f"deterministic {e['deterministic_algorithms']}")
    pools = ", ".join(f"{p.get('internal_api')} {p.get('num_threads')}" for p in e.get("threadpools", []))
    _row(table, "thread pools", pools or "-")
    _row(table, "dispatch", dispatch_text(e))
    for line in e.get("unverified", []):
        _row(table, "not verifiable", line)
    if config.perturb is not None:
        p = config.perturb
        _row(table, "perturbation", f"{p.tensor}{list(p.index)} moved {p.ulps:+d} ulp")
    if summary.floor is not None:
        floor = summary.floor
        window = amplification.observed(range(len(floor.max_abs)), floor.max_abs, saturation=floor.saturation_row)
        growth = ("no growth measured" if window is None and floor.growth_rate is None
                  else f"ln(divergence) grows {floor.growth_rate:.3g} per epoch" if window is None
                  else f"ln(divergence) grows {compare_view.window_text(window)}")
        row = floor.saturation_row
        sat = "does not saturate" if row is None else f"saturates {after(row)}"
        _row(table, "chaos floor", f"vs the unperturbed twin: {growth}, {sat}")
        _row(table, "sensitivity", floor_exact_text(floor, exact, np.zeros(0) if initial is None else initial,
                                                    c.storage))
    _row(table, "epochs", str(summary.epochs))
    _row(table, "final train MSE", f"{summary.train_loss:.6g}")
    _row(table, "final test MSE", f"{summary.test_loss:.6g}")
    nf = summary.nonfinite
    _row(table, "non-finite", "none" if not nf else
         f"first {nonfinite_when(nf)}: {nf['phase']} {nf['tensor']}")
    _row(table, "fingerprint", summary.digest)
    _row(table, "spec", summary.spec_hash[:16])
    _row(table, "time", f"{summary.train_seconds:.1f} s training, {summary.process_seconds:.1f} s in all")
    _row(table, "record", summary.out)
    console.print(table)
    if summary.divergence is None:
        console.print("no stored mpmath reference for this spec and length: `bnaudit reference build` makes one")
    else:
        reference_view.render_divergence(summary.divergence, out=console)
    reference_view.render_audit(summary.audit, out=console)


def render_env(snap: dict[str, Any]) -> None:
    """`bnaudit env` as a two-column table."""
    table = Table(title="bnaudit env", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key in ("cpu_model", "emulated_cpu_model", "machine", "cpu_capability", "supported_isas", "cpu_features",
                "logical_cpus", "os", "python", "numpy", "torch"):
        value = snap.get(key)
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        _row(table, key.replace("_", " "), "-" if value is None else str(value))
    for key, value in snap.get("torch_build", {}).items():
        _row(table, f"torch build: {key}", str(value))
    env = snap.get("environment") or {}
    _row(table, "numerics variables", ", ".join(f"{k}={v}" for k, v in env.items()) or "none set")
    console.print(table)
