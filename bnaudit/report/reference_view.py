"""Terminal rendering of the mpmath reference, its sensitivity, a run's divergence from it, and the operator audit.

rich only (no torch, no mpmath): the blocks rendered here are the decoded
``blocks.DivergenceBlock`` (measured by ``bnaudit.divergence.versus_reference``) and
``blocks.AuditBlock`` (measured by ``bnaudit.audit``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from bnaudit.bits import correct_bits_text
from bnaudit.blocks import AUDIT_OPS, AuditBlock, DivergenceBlock
from bnaudit.layout import after, epochs_text
from bnaudit.reference.sensitivity import Sensitivity, Window, bits_per_epoch
from bnaudit.report import console as console_policy
from bnaudit.report import escape

console = console_policy.stdout()
err_console = console_policy.stderr()


@contextlib.contextmanager
def build_progress(epochs: int, label: str, *, enabled: bool = True,
                   agreement: bool = True) -> Iterator[Callable[[int, int, dict[str, Any]], None]]:
    """A progress bar over the reference engine's epochs (with the build's agreement); yields its callback."""
    detail = [TextColumn("agreement {task.fields[agree]} digits")] if agreement else []
    bar = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                   *detail, TimeElapsedColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=not (enabled and err_console.is_terminal))
    with bar:
        task = bar.add_task(escape.printable(label), total=epochs, agree="-")

        def advance(done: int, total: int, info: dict[str, Any]) -> None:
            agree = info.get("agreement")
            bar.update(task, completed=done, total=total, agree="-" if agree is None else f"{agree:.1f}")

        yield advance


def render_reference(ref: Any) -> None:
    """Summary of a stored reference (a ``bnaudit.reference.store.StoredReference``)."""
    table = Table(title="bnaudit reference", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("folder", escape.terminal(ref.path))
    table.add_row("spec", escape.terminal(f"{ref.spec.name} {ref.spec.short_hash}"))
    table.add_row("epochs", f"{ref.epochs} (the state stored after {len(ref.rows) - 1} of them, and the initial state)")
    table.add_row("precisions", f"{ref.precision} bits, checked at {ref.check_precision} bits")
    worst = int(ref.agreement.argmin())
    table.add_row("agreement", f"min {ref.agreement.min():.1f} digits ({after(int(ref.rows[worst]))}), "
                               f"required {ref.min_digits:g}")
    seconds = ref.build.get("seconds")
    if seconds is not None:
        cpu, jobs = ref.build.get("cpu_seconds"), ref.build.get("jobs")
        table.add_row("build", escape.terminal(  # the manifest's words, not markup
            f"{seconds:.0f} s wall{'' if cpu is None else f', {cpu:.0f} s CPU'}"
            f"{f' in {jobs} processes' if isinstance(jobs, int) and jobs > 1 else ''}, "
            f"mpmath {ref.build.get('mpmath')} ({ref.build.get('backend')})"))
    console.print(table)


# --------------------------------------------------------------------------- divergence


def _title(text: str) -> Text:
    """A table title that quotes a block's fields: a ``Text`` in the style rich gives a ``str`` title."""
    return escape.terminal(text, style="table.title")


def _bits_cell(bits: float, cap: float) -> str:
    if not math.isfinite(bits):
        return "-"
    colour = "green" if bits >= 0.75 * cap else "yellow" if bits >= 0.5 * cap else "red"
    return f"[{colour}]{bits:.0f}[/{colour}]"


def divergence_table(block: DivergenceBlock, *, max_columns: int = 12) -> Table:
    """Per series: first epoch with fewer than half its bits, and correct bits after sampled epochs."""
    rows = block.rows
    cap = block.precision_bits
    pick = _sample_columns(list(rows), max_columns)
    table = Table(title=_title(f"correct bits vs the mpmath reference ({block.storage}, cap {cap}; "
                               "eN: after epoch N, e0: the initial state)"), title_justify="left")
    table.add_column("layer")
    table.add_column("what")
    table.add_column("< half bits", justify="right")
    for i in pick:
        table.add_column(f"e{rows[i]}", justify="right")
    for s, series in enumerate(block.series):
        half = series.half_bits_row
        cells = [_bits_cell(float(block.correct_bits[s, i]), cap) for i in pick]
        table.add_row(escape.terminal(series.layer), escape.terminal(series.what),
                      "never" if half is None else f"e{half}", *cells)
    return table


def _sample_columns(rows: list[int], limit: int) -> list[int]:
    """Indices of roughly log-spaced rows (0, 1, 2, 3, 5, 10, 20, ...) and the last one.

    Runs lose their bits within a few epochs in float32 and within tens to hundreds in
    float64, so evenly spaced columns would hide the transition.
    """
    if len(rows) <= limit:
        return list(range(len(rows)))
    marks = [0, 1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 200, 300, 500, 700, 1000, 2000, 5000, 10000]
    index = {r: i for i, r in enumerate(rows)}
    present = [index[m] for m in marks if m in index]
    if limit - 1 < min(len(present), 11):  # a narrow terminal: spread the few columns over the marks
        step = (len(present) - 1) / max(1, limit - 2)
        pick = [present[round(k * step)] for k in range(limit - 1)]
    else:
        pick = present[: limit - 1]
    return sorted(set(pick) | {len(rows) - 1})


def render_divergence(block: DivergenceBlock | None, *, out: Console | None = None) -> None:
    """Print the divergence block of a run (or a line saying there is no reference)."""
    out = out or console
    if block is None:
        out.print("reference: none for this spec (build one with `bnaudit reference build --spec FILE`)")
        return
    # On a terminal, as many epoch columns as its width holds (80 columns: 6); off one, the usual 12.
    out.print(divergence_table(block, max_columns=max(3, min(12, (out.width - 40) // 6)) if out.is_terminal else 12))
    if block.correct_bits.size:
        out.print(escape.terminal(block.fewest().text))
    loss = block.losses
    if loss is not None and loss.rows:
        out.print(f"loss vs reference {after(int(loss.rows[-1]))}: train {correct_bits_text(loss.train[-1])} "
                  f"correct bits, test {correct_bits_text(loss.test[-1])}")


# --------------------------------------------------------------------------- audit


def audited_text(rows: Sequence[int]) -> str:
    """The epochs an operator audit covered, as they were (not its period): "the initial state and after
    epochs 10, 20 and 30"."""
    if not rows:
        return "no epoch audited"
    initial, later = rows[0] == 0, [str(r) for r in (rows[1:] if rows[0] == 0 else rows)]
    if not later:
        return "the initial state"
    shown = later if len(later) <= 8 else [*later[:6], "...", later[-1]]
    text = f"after epoch {shown[0]}" if len(shown) == 1 else f"after epochs {', '.join(shown[:-1])} and {shown[-1]}"
    return f"the initial state and {text}" if initial else text


def audit_operators(block: AuditBlock) -> tuple[str, ...]:
    """The operators the run has: no bn.* for a spec without batch norm."""
    seen = {op for ops in block.errors.values() for op in ops}
    return tuple(op for op in AUDIT_OPS if op in seen)


def audit_table(block: AuditBlock) -> Table:
    """Per layer and operator: worst local error in ulps over the audited epochs."""
    ops_shown = audit_operators(block)
    table = Table(title=_title(f"operator audit ({block.storage}), {audited_text(block.rows)}: worst local "
                               "error in ulps"), title_justify="left")
    table.add_column("layer")
    for op in ops_shown:
        table.add_column(op, justify="right")
    for layer, ops in block.worst().items():
        table.add_row(escape.terminal(layer), *[("-" if ops.get(op) is None else f"{ops[op]:.2f}") for op in ops_shown])
    return table


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_audit(block: AuditBlock | None, *, out: Console | None = None) -> None:
    """Print the operator-audit block of a run: worst errors, then flagged BN units."""
    out = out or console
    if block is None:
        return
    out.print(audit_table(block))
    if not block.max_amplification:  # no BN layer: nothing to flag, so no line about flags
        return
    if not block.flags:
        out.print("flagged BN units: none (variance > 100 eps and |mean|/std < "
                  f"{block.mean_over_std_flag:g} at every audited epoch)")
        return
    table = Table(title=f"flagged BN units ({block.n_flags} in all)", title_justify="left")
    for col in ("after epoch", "layer", "unit", "var/eps", "|mean|/std", "amplification", "why"):
        table.add_column(col, justify="right" if col not in ("layer", "why") else "left")
    for f in block.flags[:20]:
        table.add_row(str(f.row), escape.terminal(f.layer), str(f.unit), f"{f.var_over_eps:.3g}",
                      _ratio(f.mean_over_std), f"{f.amplification:.3g}", escape.terminal(", ".join(f.why)))
    out.print(table)


# --------------------------------------------------------------------------- sensitivity

def _ln(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _window_line(w: Window, what: str) -> str:
    if w.rate is None or w.slope is None:
        return f"{what} over {epochs_text(w.start, w.end)}: not measured (a distance of 0 in the window)"
    spread = "" if w.low is None or w.high is None else (
        f"; sub-windows of at least {max(1, (w.end - w.start + 1) // 2)} epochs: {w.low:.3f} to {w.high:.3f}")
    return (f"{what} over {epochs_text(w.start, w.end)}: {w.rate:.3f} ln per epoch "
            f"({bits_per_epoch(w.rate):.2f} bits), "
            f"least-squares slope {w.slope:.3f}{spread}")


def render_sensitivity(s: Sensitivity, windows: list[tuple[int, int]], *, out: Console | None = None) -> None:
    """The distances row by row (ln of the largest |difference| per layer), then the growth over each window."""
    out = out or console
    element = f"{s.tensor}[{','.join(map(str, s.index))}]"
    out.print(_title(f"bnaudit reference sensitivity: {element} moved by a relative 2^-{s.scale}, both copies "
                     f"at {s.precision} bits, {s.rows[-1]} epochs ({s.seconds:.1f} s)"))
    keep = set(_sample_columns(list(s.rows), 24)) | {r for w in windows for r in w}
    table = Table(title="ln max |perturbed - unperturbed| of the parameters, after each epoch (0: the initial "
                        "state)", title_justify="left")
    for name in ("epoch", "all", "per epoch", *s.layers):
        table.add_column(escape.terminal(name), justify="right")
    for i, row in enumerate(s.rows):
        if i not in keep:
            continue
        step = "-" if i == 0 else f"{s.log_overall[i] - s.log_overall[i - 1]:+.2f}"
        table.add_row(str(row), _ln(s.log_overall[i]), step, *(_ln(v) for v in s.log_distance[i]))
    out.print(table)
    for a, b in windows:
        out.print(Text(_window_line(s.window(a, b), "growth")))
    total = s.log_overall[-1] - s.log_overall[0]
    out.print(Text(f"over the {s.rows[-1]} epochs the training amplified the perturbation by e^{total:.2f} "
                   f"(x{math.exp(total):.3g}); in exact arithmetic, so no float rounding is in these rates"))
