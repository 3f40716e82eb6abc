"""Terminal rendering of a run: progress over epochs and the closing summary table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bnaudit.report import reference_view

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def progress(epochs: int, label: str, *, enabled: bool = True) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over epochs on stderr; yields the callback for progress events."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("train {task.fields[train]}  test {task.fields[test]}"), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=not (enabled and err_console.is_terminal))
    with bar:
        task = bar.add_task(label, total=epochs, train="-", test="-")

        def advance(event: dict[str, Any]) -> None:
            bar.update(task, completed=event["epoch"], train=f"{event['train_loss']:.4g}",
                       test=f"{event['test_loss']:.4g}")

        yield advance


def render(summary: dict[str, Any]) -> None:
    """The closing table of `bnaudit run`."""
    c = summary["config"]["controls"]
    e = summary["effective"]
    table = Table(title="bnaudit run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("configuration", f"dtype {c['dtype']}, threads {c['threads']}, isa {c['isa']}, "
                                   f"{'deterministic' if c['deterministic'] else 'non-deterministic'}")
    if summary.get("cpu_model"):
        table.add_row("emulated CPU", summary["cpu_model"])
    table.add_row("effective", f"capability {e['cpu_capability']}, intra-op threads {e['intra_op_threads']}, "
                               f"inter-op threads {e['inter_op_threads']}, "
                               f"deterministic {e['deterministic_algorithms']}")
    pools = ", ".join(f"{p.get('internal_api')} {p.get('num_threads')}" for p in e.get("threadpools", []))
    table.add_row("thread pools", pools or "-")
    if summary["config"].get("perturb"):
        p = summary["config"]["perturb"]
        table.add_row("perturbation", f"{p['tensor']}{p['index']} moved {p['ulps']:+d} ulp")
    floor = summary.get("extra", {}).get("perturbation")
    if floor:
        rate, row = floor["growth_rate"], floor["saturation_row"]
        growth = "no growth measured" if rate is None else f"ln(divergence) grows {rate:.3g} per epoch"
        sat = "does not saturate" if row is None else f"saturates at the end of epoch {row - 1}"
        table.add_row("chaos floor", f"vs the unperturbed twin: {growth}, {sat}")
    table.add_row("epochs", str(summary["epochs"]))
    table.add_row("final train MSE", f"{summary['train_loss']:.6g}")
    table.add_row("final test MSE", f"{summary['test_loss']:.6g}")
    nf = summary.get("nonfinite")
    table.add_row("non-finite", "none" if not nf else
                  f"first at epoch {nf['epoch']} step {nf['step']}: {nf['phase']} {nf['tensor']}")
    table.add_row("fingerprint", summary["digest"])
    table.add_row("spec", summary["spec_hash"][:16])
    table.add_row("time", f"{summary['train_seconds']:.1f} s training, {summary['process_seconds']:.1f} s in all")
    table.add_row("record", summary["out"])
    console.print(table)
    extra = summary.get("extra", {})
    if extra.get("divergence") is None:
        console.print("no stored mpmath reference for this spec and length: `bnaudit reference build` makes one")
    else:
        reference_view.render_divergence(extra["divergence"], out=console)
    if extra.get("operator_audit") is not None:
        reference_view.render_audit(extra["operator_audit"], out=console)


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
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    for key, value in snap.get("torch_build", {}).items():
        table.add_row(f"torch build: {key}", str(value))
    env = snap.get("environment") or {}
    table.add_row("numerics variables", ", ".join(f"{k}={v}" for k, v in env.items()) or "none set")
    console.print(table)
