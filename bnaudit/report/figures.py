"""The report's figures: matplotlib with the Agg backend, each written as SVG and as PNG.

The SVG is the figure for publication (vector, text drawn as outlines); the PNG, at
``PNG_SCALE`` pixels per layout pixel, is what index.html and report.md show.  Both are
byte-for-byte the same for the same inputs (no dates, fixed SVG ids).

Each figure comes with its title and a caption that says what to look at; the HTML and
Markdown views show them in the order ``render_all`` returns them.  Runs of one
equivalence class are bit-identical, so curves are drawn once per class and labelled
with its members.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # non-interactive: never opens a window, works without a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axis import Tick
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, MaxNLocator

from bnaudit.amplification import Beside
from bnaudit.report import escape
from bnaudit.report.model import FigureInfo, FloorView, PairView, Report, RunEntry, promote_text
from bnaudit.report.tables import CLASS_COLOURS, class_colour, text_colour

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

DPI = 100
"""Layout pixels per inch: a figure of W inches is shown W * DPI CSS pixels wide."""
PNG_SCALE = 2
"""PNG pixels per layout pixel (2x: sharp on high-density screens and in print, same page layout)."""
SAVE_RC: dict[RcKeyType, Any] = {"svg.hashsalt": "bnaudit", "svg.fonttype": "path", "svg.image_inline": True,
                                  "svg.id": None}
"""SVG settings fixed whatever the user's matplotlibrc says: the same inputs give the same bytes (ids
hashed with a fixed salt), text drawn as outlines (no font needed to view it), rasters (colour bars, heatmap
cells) inside."""
MAX_PANELS = 12


def _members_text(members: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(members[:limit])
    return shown + (f" +{len(members) - limit} more" if len(members) > limit else "")


def class_representatives(report: Report) -> list[tuple[RunEntry, str]]:
    """The first run of each class and its legend text."""
    out = []
    for c in report.classes:
        rep = report.run(c.members[0])
        out.append((rep, f"class {c.name}: {_members_text(c.members)}"))
    return out


def _new(width: float, height: float, nrows: int = 1, ncols: int = 1, *, left: float = 0.85, right: float = 0.25,
         top: float = 0.75, bottom: float = 0.6, wspace: float = 0.22, hspace: float = 0.5,
         sharey: bool = False) -> tuple[Figure, np.ndarray]:
    """A figure with fixed margins in inches (constrained layout costs more than the drawing itself)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, sharey=sharey)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=wspace, hspace=hspace)
    return fig, axes


def _texts(artist: Artist) -> list[Text]:
    """The texts of a figure that bnaudit wrote (titles, labels, legends), not the ticks' formatted numbers."""
    out: list[Text] = []
    for child in artist.get_children():
        if isinstance(child, Tick):  # a tick formatter writes these at draw time (log axes as mathtext)
            continue
        if isinstance(child, Text):
            out.append(child)
        out += _texts(child)
    return out


def _save(fig: Figure, folder: Path, name: str, section: str, title: str, caption: str) -> FigureInfo:
    fig.suptitle(title, fontsize=12, fontweight="bold")
    # Titles and legends quote run labels and names from the records: drawn as they are.
    for text in {id(t): t for t in _texts(fig)}.values():
        text.set_text(escape.figure_text(text.get_text()))
    # Agg truncates W * dpi to whole pixels, and W * dpi in floating point can fall just below a whole
    # number: a quarter layout pixel over it makes the PNG exactly PNG_SCALE times the layout size.
    width, height = (int(v * DPI) for v in fig.get_size_inches())
    fig.set_size_inches((width + 0.25) / DPI, (height + 0.25) / DPI)
    png, svg = folder / f"{name}.png", folder / f"{name}.svg"
    with plt.rc_context(SAVE_RC):
        # No date in either file (matplotlib's PNG carries none unless asked); the SVG's would be today's.
        fig.savefig(png, dpi=DPI * PNG_SCALE, metadata={"Software": "bnaudit"})
        # A heatmap's thousands of cells are one embedded 2x raster in the SVG (axes and text stay vector):
        # as a path per cell they made it 6 MB.
        fig.savefig(svg, dpi=DPI * PNG_SCALE, metadata={"Creator": "bnaudit", "Date": None})
    plt.close(fig)
    with png.open("rb") as fh:  # the PNG's own IHDR: what the browser decodes, shown at 1/PNG_SCALE
        width, height = (v // PNG_SCALE for v in struct.unpack(">II", fh.read(24)[16:24]))
    return FigureInfo(path=f"{folder.name}/{name}.png", svg=f"{folder.name}/{name}.svg", section=section,
                      title=title, caption=caption, width=width, height=height)


def _milestones(ax: plt.Axes, report: Report, epochs: int) -> None:
    """Vertical lines at the learning-rate drops (MultiStepLR milestones within the run)."""
    gamma = report.spec.train.lr_gamma
    first = True
    for m in report.spec.train.lr_milestones:
        if 0 < m <= epochs:
            ax.axvline(m, color="0.45", linestyle=":", linewidth=1.2,
                       label=f"lr drop (×{gamma:g})" if first else None)
            first = False


def epoch_axis(ax: plt.Axes, epochs: int) -> None:
    """The one epoch axis of every figure: linear up to 10 (a tick at every epoch) and logarithmic beyond,
    the break marked by a grey line: runs part in the first epochs, then drift for hundreds."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if epochs > 20:
        ax.set_xscale("symlog", linthresh=10, linscale=1.0)
        ticks = [t for t in (*range(11), 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if t <= epochs]
        if epochs >= 1.4 * ticks[-1]:
            ticks.append(epochs)
        ax.set_xticks(ticks, [str(t) if t in (0, 1, 2, 5) or t >= 10 else "" for t in ticks])
        minor = [m * d for d in (10, 100, 1000) for m in range(2, 10) if m * d <= epochs]
        ax.xaxis.set_minor_locator(FixedLocator(minor))
        ax.axvline(10, color="0.6", linewidth=0.8, linestyle=(0, (1, 2)), zorder=0)
        ax.text(10, 1.0, " log →", transform=ax.get_xaxis_transform(), fontsize=7, color="0.4", va="bottom")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, epochs + 0.5)


EPOCHS_LABEL = "epochs trained (0 = the initial state)"
"""The epoch axis's label, the same in every figure."""
EPOCH_AXIS_NOTE = (" The epoch axis is linear up to 10 (every epoch ticked) and logarithmic beyond the dotted line "
                   "at 10.")


# --------------------------------------------------------------------------- 1. seed figures


def _function_panel(ax: plt.Axes, report: Report, runs: Sequence[tuple[RunEntry, str, str]]) -> None:
    n = report.n_train
    ax.scatter(report.x[:n], report.targets[:n], s=14, color="0.2", marker="o", label="train samples", zorder=3)
    ax.scatter(report.x[n:], report.targets[n:], s=16, facecolors="none", edgecolors="0.35", marker="s",
               label="test samples", zorder=3)
    if runs:
        grid = report.learned[runs[0][0].label].grid_x
        truth = np.polynomial.polynomial.polyval(grid, report.spec.data.target)
        ax.plot(grid, truth, color="black", linewidth=1.0, linestyle=(0, (4, 2)), zorder=4,
                label=f"ground truth y = {polynomial_text(report.spec.data.target)} (without noise)")
    for run, colour, legend in runs:
        lf = report.learned[run.label]
        ax.plot(lf.grid_x, lf.grid_y, color=colour, linewidth=1.8,
                label=f"{legend} (noise feature 0)" if len(runs) == 1 else None)
        ax.scatter(report.x, lf.sample_y, s=7, color=colour, alpha=0.6, marker="x", zorder=2)
    if len(runs) > 1:  # the classes' colours are named once, in the error panel's legend
        ax.plot([], [], color="0.3", linewidth=1.8, label="learned function, noise feature 0 (class colours: right)")
    ax.scatter([], [], s=7, color="0.3", marker="x", label="output at each sample")
    ax.set_xlabel("input x (dimensionless)")
    ax.set_ylabel("target y / network output (dimensionless)")
    ax.set_title("learned function at the final parameters", fontsize=10)
    lo, hi = np.nanmin(report.targets), np.nanmax(report.targets)
    pad = 0.25 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.13), frameon=False, ncols=2)
    ax.grid(alpha=0.3)


def polynomial_text(coefficients: Sequence[float]) -> str:
    """c0 + c1 x + c2 x² ... as people write it, highest power first (x³ − 2x)."""
    sup = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
    terms = []
    for k in range(len(coefficients) - 1, -1, -1):
        c = float(coefficients[k])
        if c == 0:
            continue
        power = "" if k == 0 else "x" if k == 1 else "x" + str(k).translate(sup)
        size = f"{abs(c):g}" if abs(c) != 1 or k == 0 else ""
        sign = "−" if c < 0 else "+"
        terms.append((sign, size + power))
    if not terms:
        return "0"
    first_sign, first = terms[0]
    return ("−" if first_sign == "−" else "") + first + "".join(f" {sg} {t}" for sg, t in terms[1:])


def _error_panel(ax: plt.Axes, report: Report, runs: Sequence[tuple[RunEntry, str, str]]) -> None:
    epochs = 0
    for run, colour, legend in runs:
        losses = run.record.arrays["losses"]
        rows = np.arange(len(losses))
        epochs = max(epochs, len(losses) - 1)
        with np.errstate(invalid="ignore"):
            train = np.where(losses[:, 0] > 0, losses[:, 0], np.nan)
            test = np.where(losses[:, 1] > 0, losses[:, 1], np.nan)
        ax.plot(rows, train, color=colour, linewidth=1.4, label=legend)
        ax.plot(rows, test, color=colour, linewidth=1.4, linestyle="--")
    ax.set_yscale("log")
    _milestones(ax, report, epochs)
    ax.plot([], [], color="0.3", linewidth=1.4, label="train (solid)")
    ax.plot([], [], color="0.3", linewidth=1.4, linestyle="--", label="test (dashed)")
    ax.set_xlabel(EPOCHS_LABEL)
    epoch_axis(ax, epochs)
    ax.set_ylabel("eval-mode MSE (target units²)")
    ax.set_title("train (solid) and test (dashed) error", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.13), frameon=False, ncols=2)
    ax.grid(alpha=0.3, which="major")


def seed_figures(report: Report, folder: Path) -> list[FigureInfo]:
    out = []
    reps = class_representatives(report)
    if len(reps) > 1:
        shown = [(run, class_colour(report, run.class_name), legend) for run, legend in reps[:len(CLASS_COLOURS)]]
        below = 0.55 + 0.16 * ((len(shown) + 4) // 2)  # the legends' rows, under the panels
        fig, axes = _new(13, 4.8 + below, 1, 2, bottom=0.6 + below)
        left, right = axes[0]
        _function_panel(left, report, shown)
        _error_panel(right, report, shown)
        more = (f" Only the first {len(CLASS_COLOURS)} classes are drawn."
                if len(reps) > len(CLASS_COLOURS) else "")
        out.append(_save(
            fig, folder, "seed_overlay", "seed",
            f"All runs overlaid: {len(report.runs)} runs in {len(reps)} classes of bit-identical results",
            "Left: the data (train dots, test squares) and each class's learned function, a float64 evaluation "
            "of the run's final parameters with BatchNorm in eval mode (running statistics); the curve sets the "
            "noise feature to 0, the small crosses are the output at each sample with its real noise feature. "
            "Right: eval-mode train and test MSE per epoch on a log axis, learning-rate drops dotted. Look for "
            "where the curves of different classes separate: identical bits draw one curve, and runs that "
            "parted early can still end with visibly different functions and test errors." + more))
    if len(reps) == 1:  # one class: its own full figure is the overlay
        run = reps[0][0]
        fig, axes = _new(13, 5.3, 1, 2, bottom=1.5)
        left, right = axes[0]
        colour = class_colour(report, run.class_name)
        _function_panel(left, report, [(run, colour, run.label)])
        _error_panel(right, report, [(run, colour, run.label)])
        losses = run.record.arrays["losses"][-1]
        out.append(_save(
            fig, folder, "seed_overlay", "seed", f"All {len(report.runs)} runs are bit-identical: {run.label}",
            f"{run.config_text}; {run.epochs} epochs; final train MSE {losses[0]:.4g}, test MSE {losses[1]:.4g}. "
            "Left: learned function (float64 evaluation of the run's final parameters, BN in eval mode, noise "
            "feature 0 for the curve) against the ground truth. Right: train/test MSE per epoch, learning-rate "
            "drops dotted. Look for a test error that rises while the train error falls: the noisy feature being "
            "fitted." + EPOCH_AXIS_NOTE))
        return out
    out.append(_small_multiples(report, folder, reps[:SMALL_MULTIPLES]))
    return out


SMALL_MULTIPLES = 24
"""Classes drawn as small panels (the tables list every class)."""


def _small_multiples(report: Report, folder: Path, reps: Sequence[tuple[RunEntry, str]]) -> FigureInfo:
    """Each class's learned function in a small panel of its own, on shared axes, against the ground truth."""
    ncols = min(4, len(reps))
    nrows = (len(reps) + ncols - 1) // ncols
    fig, axes = _new(13, 0.9 + 2.3 * nrows, nrows, ncols, left=0.6, top=0.85, bottom=0.5, wspace=0.08,
                     hspace=0.45, sharey=True)
    grid = report.learned[reps[0][0].label].grid_x
    truth = np.polynomial.polynomial.polyval(grid, report.spec.data.target)
    lo, hi = np.nanmin(report.targets), np.nanmax(report.targets)
    for k, (run, _) in enumerate(reps):
        ax = axes[k // ncols, k % ncols]
        lf = report.learned[run.label]
        ax.scatter(report.x, report.targets, s=3, color="0.75", zorder=1)
        ax.plot(grid, truth, color="black", linewidth=0.8, linestyle=(0, (4, 2)), zorder=2)
        ax.plot(lf.grid_x, lf.grid_y, color=class_colour(report, run.class_name), linewidth=1.6, zorder=3)
        losses = run.record.arrays["losses"][-1]
        ax.set_title(f"class {run.class_name}: test MSE {losses[1]:.3g}", fontsize=8, loc="left")
        ax.set_ylim(lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(reps), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    more = f" Only the first {SMALL_MULTIPLES} classes are drawn." if len(report.classes) > SMALL_MULTIPLES else ""
    return _save(
        fig, folder, "seed_classes", "seed", "Each class's learned function, side by side",
        "One small panel per class of bit-identical runs (its members are in the classes table): the learned "
        "function at the final parameters (float64, BN in eval mode, noise feature 0) in the class's colour, "
        "the ground truth dashed, the samples grey; the title gives the final test MSE. Look for classes whose "
        "functions differ where the data is sparse, at the ends of the range." + more)


# --------------------------------------------------------------------------- 2. heatmaps


def _heat_axes(n: int, width: float = 13.0) -> tuple[Figure, list[plt.Axes]]:
    fig, axes = _new(width, 1.5 + 2.1 * n, n, 1, left=1.0, right=0.2, top=1.05, bottom=0.65, hspace=0.55)
    return fig, list(axes[:, 0])


def _pair_heatmap(report: Report, folder: Path) -> list[FigureInfo]:
    pairs = [p for p in report.pairs if p.kind == "pair"] + [p for p in report.pairs if p.kind == "perturb"]
    if not pairs:
        return []
    shown = pairs[:MAX_PANELS]
    fig, axes = _heat_axes(len(shown))
    logs = []
    for p in shown:
        with np.errstate(divide="ignore", invalid="ignore"):
            logs.append(np.where(p.max_abs > 0, np.log10(p.max_abs), np.nan))
    finite = np.concatenate([v[np.isfinite(v)] for v in logs]) if logs else np.zeros(0)
    vmin = float(np.floor(finite.min())) if finite.size else -8.0
    vmax = float(np.ceil(finite.max())) if finite.size else 0.0
    vmax = max(vmax, vmin + 1)
    cmap = plt.get_cmap("magma").with_extremes(bad="#d9ecd0")  # bit-identical cells: pale green
    mesh = None
    for ax, p, values in zip(axes, shown, logs):
        mesh = ax.pcolormesh(np.append(p.rows, p.rows[-1] + 1) - 0.5, np.arange(len(p.layers) + 1) - 0.5,
                             np.ma.masked_invalid(values.T), cmap=cmap, vmin=vmin, vmax=vmax, shading="flat",
                             rasterized=True)
        ax.set_yticks(range(len(p.layers)), [escape.figure_text(x) for x in p.layers], fontsize=7)
        ax.invert_yaxis()
        ax.set_ylabel("layer (forward order)")
        kind = " (1-ulp perturbation vs its twin)" if p.kind == "perturb" else ""
        ax.set_title(f"{p.title}{kind}" + ("  —  bit-identical" if p.identical else ""), fontsize=9, loc="left")
        _mark_first(ax, p)
        epoch_axis(ax, int(p.rows[-1]))
    axes[-1].set_xlabel(EPOCHS_LABEL)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, label="log10 max |Δ parameter| (parameter units)", shrink=0.9)
    more = f" {len(pairs) - len(shown)} more pairs are listed in the table but not drawn." \
        if len(pairs) > len(shown) else ""
    return [_save(
        fig, folder, "heatmap_pairs", "heatmap", "Where runs part: divergence between runs, layer by epoch",
        "Colour: log10 of the largest absolute difference between the two runs' parameters in each layer at "
        "the end of each epoch (pale green: bit-identical). The cross marks the first difference found by "
        "bnaudit compare (its epoch and layer). Look at how fast a difference that starts in one layer "
        "spreads to all layers, and at which epoch the colour stops rising (saturation)." + EPOCH_AXIS_NOTE
        + more)]


def _reference_heatmap(report: Report, folder: Path) -> list[FigureInfo]:
    refs = [(label, report.references[label]) for label in report.references]
    if not refs:
        return []
    shown_refs = refs[:MAX_PANELS]
    fig, axes = _heat_axes(len(shown_refs))
    mesh = None
    top = max(ref.precision for _, ref in shown_refs)  # one absolute scale: 26 float64 bits outrank 24 float32 ones
    for ax, (label, ref) in zip(axes, shown_refs):
        mesh = ax.pcolormesh(np.append(ref.rows, ref.rows[-1] + 1) - 0.5, np.arange(len(ref.layers) + 1) - 0.5,
                             ref.correct_bits.T, cmap="viridis", vmin=0, vmax=top, shading="flat", rasterized=True)
        ax.set_yticks(range(len(ref.layers)), [escape.figure_text(x) for x in ref.layers], fontsize=7)
        ax.invert_yaxis()
        ax.set_ylabel("layer")
        ax.set_title(f"{label} vs mpmath reference ({ref.precision}-bit significand)", fontsize=9, loc="left")
        ax.set_xlabel("")
        below = np.argwhere(ref.correct_bits < ref.precision / 2)
        if len(below):
            i, j = below[np.argmin(below[:, 0])]
            ax.plot([ref.rows[i]], [j], marker="X", color="red", markersize=10, markeredgecolor="white",
                    linestyle="none")
            mark = f"✕ first below half the bits: {ref.layers[j]}, " + (
                "the initial state" if ref.rows[i] == 0 else f"after {ref.rows[i]} epochs")
        else:
            mark = "no layer falls below half its bits"
        ax.set_title(f"{ax.get_title(loc='left')}\n{mark}", fontsize=8, loc="left")
        epoch_axis(ax, int(ref.rows[-1]))
    axes[-1].set_xlabel(EPOCHS_LABEL)
    if mesh is not None:
        bar = fig.colorbar(mesh, ax=axes, label="correct bits (of the significand)", shrink=0.9)
        for precision in sorted({ref.precision for _, ref in shown_refs}):
            bar.ax.axhline(precision, color="white" if precision < top else "red", linewidth=2)
            bar.ax.text(1.6, precision, f"{precision}", transform=bar.ax.get_yaxis_transform(), fontsize=7,
                        va="center", color="red")
    return [_save(
        fig, folder, "heatmap_reference", "heatmap", "How many bits are still right: divergence from the reference",
        "Colour: correct bits of each layer's parameters against the mpmath high-precision reference, on one "
        "absolute scale for every dtype (the lines on the colour bar mark each run dtype's significand: 24 "
        "bits for float32, 53 for float64, 8 for bfloat16). The cross marks the first cell with fewer than "
        "half its dtype's bits right. Look for the layer that loses its bits first." + EPOCH_AXIS_NOTE)]


def heatmap_figures(report: Report, folder: Path) -> list[FigureInfo]:
    """Layer-by-epoch heatmaps: divergence between the compared runs, then correct bits against the reference."""
    return _pair_heatmap(report, folder) + _reference_heatmap(report, folder)


def _mark_first(ax: plt.Axes, p: PairView) -> None:
    """The first difference: a cross at its epoch and layer, named above the panel (never over the cells)."""
    if p.identical or p.first_epoch_row is None:
        return
    label = f"✕ first difference: {p.first_text}"
    label = label if len(label) <= 140 else label[:139] + "…"
    if p.first_layer in p.layers:
        ax.plot([p.first_epoch_row], [p.layers.index(p.first_layer)], marker="X", color="#00e5ff", markersize=11,
                markeredgecolor="black", linestyle="none")
    else:
        ax.axvline(p.first_epoch_row, color="#00e5ff", linewidth=1.5)
    ax.set_title(f"{ax.get_title(loc='left')}\n{label}", fontsize=8, loc="left")


# --------------------------------------------------------------------------- 3. growth


def _growth_between(ax: plt.Axes, report: Report, pairs: Sequence[PairView], perturb: Sequence[PairView],
                    floors: dict[str, FloorView], below_axes: float, epochs: int) -> None:
    """Left panel: the largest parameter difference per epoch of each pair, and the chaos floors dashed."""
    drawn = False
    exact_label = ["exact arithmetic (mpmath) from the same start, while the difference is small"]

    def exact_line(rows: np.ndarray, series: np.ndarray, b: Beside | None) -> None:
        """The growth exact arithmetic gives the curve from its window's start, dotted grey."""
        if b is None or report.exact_rows is None or report.exact_log is None:
            return
        at = np.flatnonzero(np.asarray(rows) == b.seen.start)
        if not at.size:
            return
        xs = report.exact_rows[b.seen.start:b.seen.end + 1]  # only where the difference is small
        ys = series[at[0]] * np.exp(report.exact_log[xs] - report.exact_log[b.seen.start])
        ax.plot(xs, ys, color="0.45", linestyle=":", linewidth=1.4, label=exact_label.pop() if exact_label else None)

    for i, p in enumerate([*pairs, *perturb]):
        with np.errstate(invalid="ignore"):
            series = np.nanmax(p.max_abs, axis=1) if p.max_abs.size else np.zeros(0)
        series = np.where(series > 0, series, np.nan)
        if not np.isfinite(series).any():
            continue
        rate = f", growth {p.growth_rate:.3g}/epoch" if p.growth_rate is not None else ""
        sat = f", saturates after epoch {p.saturation_epoch}" if p.saturation_epoch is not None else ""
        if p.kind == "perturb":
            ax.plot(p.rows, series, color="black", linestyle="--", linewidth=1.6,
                    label=f"1-ulp sensitivity baseline: {p.b}{rate}{sat}")
        else:
            ax.plot(p.rows, series, color=CLASS_COLOURS[i % len(CLASS_COLOURS)], linewidth=1.5,
                    label=f"{p.title}{rate}{sat}"[:120])
        exact_line(p.rows, series, p.exact)
        drawn = True
    for label, f in floors.items():
        series = np.where(f.max_abs > 0, f.max_abs, np.nan)
        if not np.isfinite(series).any():
            continue
        rate = f", growth {f.growth_rate:.3g}/epoch" if f.growth_rate is not None else ""
        sat = f", saturates after {f.saturation_row} epochs" if f.saturation_row is not None else ""
        ax.plot(f.rows, series, color="black", linestyle="--", linewidth=1.6,
                label=f"1-ulp sensitivity baseline: {label} vs its twin{rate}{sat}"[:120])
        exact_line(f.rows, series, f.exact)
        drawn = True
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "all compared runs are bit-identical:\nno divergence to draw", ha="center", va="center",
                transform=ax.transAxes)
    _milestones(ax, report, epochs)
    epoch_axis(ax, epochs)
    ax.set_xlabel(EPOCHS_LABEL)
    ax.set_ylabel("max |Δ parameter| over all layers (parameter units)")
    ax.set_title("between runs", fontsize=10)
    if ax.get_legend_handles_labels()[0]:  # under the axes, never over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -below_axes), frameon=False)
    ax.grid(alpha=0.3, which="major")


def _growth_reference(ax: plt.Axes, report: Report, epochs: int, below_axes: float) -> None:
    """Right panel: each run's worst layer against the mpmath reference, as a relative error."""
    for label, ref in report.references.items():
        run = report.run(label)
        worst = np.fmin(ref.correct_bits.min(axis=1), np.nanmin(np.fmin(ref.activation_bits, ref.precision),
                                                                 axis=1))
        ax.plot(ref.rows, np.exp2(-worst), color=class_colour(report, run.class_name), linewidth=1.4,
                label=f"{label} ({run.storage})")
    ax.set_yscale("log")
    _milestones(ax, report, epochs)
    epoch_axis(ax, epochs)
    ax.set_xlabel(EPOCHS_LABEL)
    ax.set_ylabel("2^−(fewest correct bits: any layer, weights or activations)")
    ax.set_title("against the mpmath reference", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -below_axes), frameon=False)
    ax.grid(alpha=0.3, which="major")


def growth_figures(report: Report, folder: Path) -> list[FigureInfo]:
    """Divergence per epoch on a log axis: between runs (with the chaos floor), and against the reference."""
    pairs = [p for p in report.pairs if p.kind == "pair"]
    perturb = [p for p in report.pairs if p.kind == "perturb"]
    paired = {p.b for p in perturb}
    floors = {label: f for label, f in report.floors.items() if label not in paired}
    refs = report.references
    if not pairs and not perturb and not floors and not refs:
        return []
    ncols = 1 + (1 if refs else 0)
    n_lines = max(len(pairs) + 2 * len(perturb) + 2 * len(floors) + 2, len(refs) + 1)
    below = 0.17 * n_lines + 0.2  # the legends go under the axes, not over the curves
    fig, axes = _new(13 if ncols == 2 else 11, 4.8 + below, 1, ncols, wspace=0.2, bottom=0.6 + below)
    epochs = max(r.epochs for r in report.runs)
    height = (4.8 + below) - 0.75 - (0.6 + below)  # the axes' height in inches
    _growth_between(axes[0, 0], report, pairs, perturb, floors, 0.55 / height, epochs)
    if refs:
        _growth_reference(axes[0, 1], report, epochs, 0.55 / height)
    caption = ("Largest parameter difference over all layers, per epoch, on a log axis: how fast two runs move "
               "apart once they have parted. ")
    if perturb or floors:
        caption += ("The dashed black line is the chaos floor: the same configuration started with one initial "
                    "value moved by 1 ulp (--perturb). A platform difference that grows along that line is "
                    "ordinary chaotic amplification of rounding, not a bug in one machine. ")
    if report.exact_rows is not None:
        caption += ("The dotted grey lines are exact arithmetic: how the training itself (mpmath, no rounding) "
                    "amplifies a difference from each curve's start, drawn while the difference is still small "
                    "(at most 1e-3 of the largest initial parameter), where that linearised growth applies; the "
                    "gap between a curve and its dotted line is what float rounding adds. ")
    if refs:
        caption += ("Right: each run's worst layer (weights or probe-batch activations) against the mpmath "
                    "reference, as a relative error 2^−(correct bits). ")
    caption += ("A straight rise on the log axis is exponential growth; where it flattens the runs are unrelated."
                + EPOCH_AXIS_NOTE)
    return [_save(fig, folder, "growth", "growth", "How fast divergence grows over epochs", caption)]


# --------------------------------------------------------------------------- 4. BN conditioning


def _bn_conditioning(report: Report, folder: Path) -> list[FigureInfo]:
    bn_layers = report.runs[0].record.layout.bn_layers
    if not bn_layers:
        return []
    reps = class_representatives(report)[:len(CLASS_COLOURS)]
    n = len(bn_layers)
    ncols = min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = _new(13, 1.2 + 3.2 * nrows, nrows, ncols, wspace=0.08, hspace=0.4, sharey=True)
    lowest = np.inf
    for k, layer in enumerate(bn_layers):
        ax = axes[k // ncols, k % ncols]
        for run, legend in reps:
            mv = run.record.arrays["min_var"][:, k]
            rows = np.arange(len(mv))
            ax.plot(rows[1:], mv[1:], color=class_colour(report, run.class_name), linewidth=1.2, label=legend)
            if np.isfinite(mv[1:]).any():
                lowest = min(lowest, float(np.nanmin(mv[1:])))
        ax.axhline(1.0, color="black", linewidth=1.4, linestyle="-.", label="variance = eps")
        ax.axhspan(1e-3, 100.0, color="red", alpha=0.07, label="within 100× eps")
        ax.set_yscale("log")
        _milestones(ax, report, max(r.epochs for r in report.runs))
        epoch_axis(ax, max(r.epochs for r in report.runs))
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("epochs trained")
        if k % ncols == 0:
            ax.set_ylabel("smallest unit batch variance / eps (ratio)")
        ax.grid(alpha=0.3, which="major")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if n < nrows * ncols:  # the legend goes into the first empty panel
        spare = axes[n // ncols, n % ncols]
        spare.axis("off")
        spare.legend(handles, labels, fontsize=8, loc="center", title="legend")
        for k in range(n + 1, nrows * ncols):
            axes[k // ncols, k % ncols].set_visible(False)
    else:
        axes[0, 0].legend(fontsize=7, loc="lower right")
    low = f" The smallest ratio seen is {lowest:.3g}." if np.isfinite(lowest) else ""
    return [_save(
        fig, folder, "bn_conditioning", "bn", "BN conditioning: smallest batch variance against eps",
        "For each BatchNorm layer, the smallest per-unit batch variance of its input seen during each epoch "
        "(over all steps), divided by eps. BN divides by sqrt(var + eps): near or below the red band a "
        "unit's output is dominated by eps and rounding in its input is amplified by up to 1/sqrt(eps) (the "
        f"seed's 'division by sigma' caution).{low} Look for a layer whose curve falls toward the band."
        + EPOCH_AXIS_NOTE)]


def _minor_ulps(v: float, _: object) -> str:
    """Minor ticks of a log ulps axis labelled where their leading digit is 1, 2, 3 or 5 (0.5 included)."""
    text = f"{v:g}"
    return text if text.lstrip("0.")[:1] in ("1", "2", "3", "5") else ""


AUDIT_STYLES = {"linear.out": ("tab:blue", "-"), "bn.mean": ("tab:orange", "--"), "bn.var": ("tab:green", "-."),
                "bn.invstd": ("tab:red", ":"), "bn.out": ("tab:purple", "-")}
"""Colour and line style of each audited operator (Linear drawn thicker)."""


def _operator_audit(report: Report, folder: Path) -> list[FigureInfo]:
    if not report.audits:
        return []
    items = list(report.audits.items())[:4]
    has_bn = bool(report.runs[0].record.layout.bn_layers)  # a spec without BN: no BN words, no flag counts
    fig, axes = _new(min(13, 2 + 5 * len(items)), 5.4, 1, len(items), top=0.95, bottom=1.2, wspace=0.08,
                     sharey=True)
    for ax, (label, audit) in zip(axes[0], items):
        for i, (op, values) in enumerate(audit.operators.items()):
            colour, style = AUDIT_STYLES.get(op, (CLASS_COLOURS[i % len(CLASS_COLOURS)], "-"))
            ax.plot(audit.rows, np.where(values > 0, values, np.nan), linestyle=style, color=colour,
                    marker="o", markersize=3, linewidth=2.2 if op.startswith("linear") else 1.4, label=op)
        ax.axhline(0.5, color="0.35", linewidth=1.0, linestyle=(0, (5, 3)), zorder=0,
                   label="0.5 ulp: correctly rounded")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_ulps))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(audit.rows) == 1:  # one audited epoch: a visible span around it, not ±0.04
            ax.set_xlim(float(audit.rows[0]) - 1, float(audit.rows[0]) + 1)
        ax.set_xlabel(EPOCHS_LABEL)
        if ax is axes[0][0]:
            ax.set_ylabel("largest local error (ulps at the operator's scale)")
        amp = f", max BN amplification {audit.max_amplification:.3g}" if np.isfinite(audit.max_amplification) \
            else ""
        flagged = f"{audit.flags} BN unit{'' if audit.flags == 1 else 's'} flagged{amp}"
        ax.set_title(f"{label}\n{flagged}" if has_bn else label, fontsize=9)
        ax.grid(alpha=0.3, which="major")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncols=len(labels), frameon=False)
    more = f" {len(report.audits) - len(items)} more audited runs are not drawn." \
        if len(report.audits) > len(items) else ""
    head = ("At the audited epochs each operator is recomputed in mpmath from the run's own inputs to it: the "
            "largest error of the run's result, in ulps of its dtype at the operator's scale (zero errors are "
            "not drawn on the log axis). ")
    if not has_bn:
        return [_save(fig, folder, "operator_audit", "bn", "Operator audit: local rounding error of the Linear layers",
                      head + "Linear outputs should stay at a few ulps. The dashed line is 0.5 ulp, a correctly "
                      "rounded result." + more)]
    return [_save(
        fig, folder, "operator_audit", "bn", "Operator audit: local rounding error of BN vs Linear",
        head + "Linear outputs should stay at a few ulps; BN's batch statistics and "
        "1/sqrt(var + eps) stay small too, and the title counts the BN units flagged for a variance near eps "
        "or a large |mean|/std, with the largest amplification max|x|/sqrt(var + eps) of input rounding. "
        "The dashed line is 0.5 ulp, a correctly rounded result. Look for BN lines far above the Linear line."
        + more)]


def bn_figures(report: Report, folder: Path) -> list[FigureInfo]:
    """BN conditioning (smallest batch variance over eps per layer), then the operator audit."""
    return _bn_conditioning(report, folder) + _operator_audit(report, folder)


# --------------------------------------------------------------------------- 5. matrix grid


def _value_text(key: str, value: object) -> str:
    if key == "threads":
        return f"t{value}"
    if key == "deterministic":
        return "det" if value else "nondet"
    if key == "promote":
        return promote_text(tuple(value))  # type: ignore[arg-type]
    if value is None:
        return "-"
    return str(value)


def grid_axes(report: Report) -> tuple[list[str], list[str]]:
    """Controls on the grid's rows and columns: dtype (and determinism) down, the rest across."""
    varying = report.varying_controls or ["dtype"]
    rows = [k for k in varying if k in ("dtype", "deterministic")]
    cols = [k for k in varying if k not in rows]
    if not rows:
        rows, cols = cols[:1], cols[1:]
    return rows, cols


def _key_of(run: RunEntry, keys: Sequence[str], sep: str = " ") -> str:
    parts = []
    for k in keys:
        value = (run.perturb_text or "no perturb") if k == "perturb" else getattr(run.controls, k)
        parts.append(_value_text(k, value))
    return sep.join(parts) if parts else "all"


def matrix_figures(report: Report, folder: Path) -> list[FigureInfo]:
    if len(report.runs) < 2:
        return []
    row_keys, col_keys = grid_axes(report)
    row_vals = list(dict.fromkeys(_key_of(r, row_keys) for r in report.runs))
    col_vals = list(dict.fromkeys(_key_of(r, col_keys, "\n") for r in report.runs))  # one line per control
    cells: dict[tuple[int, int], list[RunEntry]] = {}
    for r in report.runs:
        cells.setdefault((row_vals.index(_key_of(r, row_keys)), col_vals.index(_key_of(r, col_keys, "\n"))),
                         []).append(r)
    fig, axes = _new(min(14, 4.5 + 1.6 * len(col_vals)), 1.8 + 0.7 * len(row_vals), left=1.1, right=2.4,
                     top=0.55, bottom=0.45 + 0.16 * max(1, len(col_keys)))
    ax = axes[0, 0]
    for (i, j), runs in cells.items():
        names = list(dict.fromkeys(r.class_name for r in runs))
        for k, name in enumerate(names):  # a cell of several classes is split in vertical bands
            ax.add_patch(plt.Rectangle((j - 0.5 + k / len(names), i - 0.5), 1 / len(names), 1,
                                       color=class_colour(report, name), linewidth=0))
        ax.text(j, i, "/".join(names), ha="center", va="center", fontsize=11, fontweight="bold",
                color=text_colour(class_colour(report, names[0])) if len(names) == 1 else "black",
                bbox=None if len(names) == 1 else {"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    for i in range(len(row_vals)):
        for j in range(len(col_vals)):
            if (i, j) not in cells:
                ax.text(j, i, "not run", ha="center", va="center", fontsize=8, color="0.5")
    ax.set_xlim(-0.5, len(col_vals) - 0.5)
    ax.set_ylim(len(row_vals) - 0.5, -0.5)
    ax.set_xticks(range(len(col_vals)), [escape.figure_text(x) for x in col_vals], fontsize=8)
    ax.set_yticks(range(len(row_vals)), [escape.figure_text(x) for x in row_vals], fontsize=8)
    ax.set_xlabel(" × ".join(col_keys) if col_keys else "(one configuration per row)")
    ax.set_ylabel(" × ".join(row_keys))
    handles = [plt.Rectangle((0, 0), 1, 1, color=class_colour(report, c.name), label=f"class {c.name} "
                             f"({len(c.members)} run{'s' if len(c.members) > 1 else ''}, {c.storage})")
               for c in report.classes[:len(CLASS_COLOURS)]]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    varying = ", ".join(report.varying_controls) or "nothing"
    return [_save(
        fig, folder, "matrix_grid", "matrix", "Configurations coloured by class of bit-identical results",
        f"Each cell is one configuration (controls that vary across the inputs: {varying}); its colour and letter "
        "name its class: cells of one colour produced the same bits at every epoch. Look along a row: a change "
        "of colour between two columns means that control changes the bits on this machine.")]


def render_all(report: Report, folder: Path) -> list[FigureInfo]:
    """Write every figure of the report into ``folder`` (which exists); return them in reading order."""
    with plt.rc_context({"font.size": 9, "axes.titlesize": 10, "figure.facecolor": "white"}):
        out: list[FigureInfo] = []
        out += seed_figures(report, folder)
        out += heatmap_figures(report, folder)
        out += growth_figures(report, folder)
        out += bn_figures(report, folder)
        out += matrix_figures(report, folder)
    return out
