"""Rendering of `bnaudit ensemble`: the verdict of each pair, the distributions, the floor, the figures.

Everything here reads a ``matrix.ensemble.Ensemble`` (and, for the figures, its tables of
outcomes); ensemble.md, the terminal lines and the JSON say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from bnaudit.blocks import OUTCOME_WORDS
from bnaudit.matrix.ensemble import Ensemble, Interval, Outcome, Paired
from bnaudit.report import console as console_policy
from bnaudit.report import escape

console = console_policy.stdout()

WHAT = OUTCOME_WORDS


def _cell(text: object) -> str:
    return escape.markdown(text, cell=True)


def _num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _ci(ci: Interval | None) -> str:
    return "" if ci is None else f" [{_num(ci.low)}, {_num(ci.high)}]"


def headline(e: Ensemble) -> str:
    n = len(e.seeds)
    done = len({s for d in e.distributions for s in d.seeds})
    partial = f" ({done} finished)" if e.missing else ""
    return (f"{len(e.configs)} configuration{'' if len(e.configs) == 1 else 's'} x {n} seed{'' if n == 1 else 's'}"
            f"{partial}, {e.epochs} epoch{'' if e.epochs == 1 else 's'} each (seeds draw {'+'.join(e.scope)})")


def pair_line(p: Paired) -> str:
    return f"{p.a} vs {p.b}, {WHAT[p.outcome]}: {p.verdict}"


def markdown(e: Ensemble) -> str:
    out = [f"### bnaudit ensemble: {headline(e)}", ""]
    if e.missing:
        out += [f"Partial: {len(e.missing)} run{'' if len(e.missing) == 1 else 's'} not finished (first: "
                f"{escape.markdown_code(e.missing[0])}); every statistic below uses the seeds that finished.", ""]
    out += ["#### Verdicts", ""]
    out += [f"- {escape.markdown(pair_line(p))}" for p in sorted(e.pairs, key=lambda p: p.outcome != "test_mse")]
    out += ["", "#### Distributions over seeds", "",
            "| configuration | outcome | seeds | mean | sd | median | 5% | 25% | 75% | 95% | non-finite |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in e.distributions:
        out.append(f"| {_cell(d.config)} | {WHAT[d.outcome]} | {len(d.seeds)} | {_num(d.mean)} | {_num(d.sd)} | "
                   f"{_num(d.median)} | {_num(d.q05)} | {_num(d.q25)} | {_num(d.q75)} | {_num(d.q95)} | "
                   f"{d.nonfinite} |")
    out += ["", "#### Paired by seed (d = a - b; lower MSE is better)", "",
            "| a | b | outcome | seeds | identical | mean d [95% CI] | median d [95% CI] | a better | b better | "
            "Wilcoxon p | sign p | d_z | rank-biserial | median abs d | floor median abs e | vs floor p |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in e.pairs:
        out.append(f"| {_cell(p.a)} | {_cell(p.b)} | {WHAT[p.outcome]} | {p.n} | {p.identical} | "
                   f"{_num(p.mean)}{_ci(p.mean_ci)} | {_num(p.median)}{_ci(p.median_ci)} | {p.a_better} | "
                   f"{p.b_better} | {_num(p.wilcoxon_p)} | {_num(p.sign_p)} | {_num(p.cohen_dz)} | "
                   f"{_num(p.rank_biserial)} | {_num(p.median_abs)} | {_num(p.floor_median_abs)} | "
                   f"{_num(p.floor_mwu_p)} |")
    if e.floors:
        out += ["", "#### The 1-ulp floor (e = perturbed - unperturbed, same seed and configuration)", "",
                "| configuration | perturbation | outcome | seeds | median abs e | outcome bits unchanged |",
                "| --- | --- | --- | --- | --- | --- |"]
        for f in e.floors:
            out.append(f"| {_cell(f.config)} | {escape.markdown_code(f.perturb, cell=True)} | {WHAT[f.outcome]} | "
                       f"{len(f.seeds)} | {_num(f.median_abs)} | {f.identical} |")
    out += ["", f"Tests at alpha = {e.alpha:g}: Wilcoxon signed-rank and sign tests of d, bootstrap intervals "
            "(BCa for the mean, percentile for the median), Mann-Whitney U of |d| against the floor's |e|.", ""]
    return "\n".join(out)


def render(e: Ensemble) -> None:
    console.print(f"bnaudit ensemble: {escape.printable(headline(e))}", markup=False, highlight=False)
    if e.missing:
        console.print(f"partial: {len(e.missing)} runs not finished; the statistics use the seeds that did",
                      markup=False, highlight=False)
    for p in e.pairs:
        if p.outcome == "test_mse":
            console.print(f"  {escape.printable(pair_line(p))}", markup=False, highlight=False)
    console.print(f"full tables: {escape.printable(Path(e.folder) / 'ensemble.md')}", markup=False, highlight=False)


# --- figures ----------------------------------------------------------------------------------------

def figures(e: Ensemble, table: Mapping[str, Mapping[int, Outcome]], folder: Path) -> list[Path]:
    """distributions.png (each configuration's outcomes over seeds), differences.png (the paired
    differences beside the floor) and epochs.png (median and quartiles per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    configs = list(e.configs)

    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(configs) + 3), 4.2), squeeze=False)
    for ax, outcome in zip(axes[0], ("test_mse", "train_mse"), strict=True):
        data = [[o.final(outcome) for o in table[c].values() if math.isfinite(o.final(outcome))] for c in configs]
        ax.boxplot(data, showfliers=False, widths=0.5)
        for k, values in enumerate(data, start=1):
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(np.asarray(jitter) + k, values, s=12, alpha=0.7, color="C0", zorder=3)
        ax.set_xticks(range(1, len(configs) + 1), [escape.figure_text(c) for c in configs], rotation=20, ha="right")
        ax.set_ylabel(WHAT[outcome])
    fig.suptitle(f"Outcomes over {len(e.seeds)} seeds, {e.epochs} epochs", fontweight="bold")
    fig.tight_layout()
    written.append(_save(fig, folder / "distributions.png"))

    pairs = [p for p in e.pairs if p.outcome == "test_mse"]
    if pairs:
        fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * (len(pairs) + 1) + 3), 4.2))
        labels = []
        for k, p in enumerate(pairs, start=1):
            d = [table[p.a][s].final("test_mse") - table[p.b][s].final("test_mse") for s in table[p.a]
                 if s in table[p.b]]
            ax.scatter(np.full(len(d), k) + np.linspace(-0.12, 0.12, len(d)), d, s=12, alpha=0.7, color="C0")
            ax.hlines(np.median(d) if d else np.nan, k - 0.25, k + 0.25, color="k", linewidth=2)
            labels.append(escape.figure_text(f"{p.a}\n- {p.b}"))
        for f in e.floors:
            if f.outcome == "test_mse":
                k = len(labels) + 1
                diffs = [x for x in f.differences if math.isfinite(x)]
                ax.scatter(np.full(len(diffs), k) + np.linspace(-0.12, 0.12, len(diffs)), diffs, s=12, alpha=0.7,
                           color="C3")
                labels.append(escape.figure_text(f"floor: {f.config}\n{f.perturb}"))
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.set_ylabel("final test MSE, a − b, seed by seed\n(below 0: a is better)")
        floor = any(f.outcome == "test_mse" for f in e.floors)
        fig.suptitle("Paired differences (blue)" + (" and the 1-ulp floor (red)" if floor else "") + "; bar: median",
                     fontweight="bold")
        fig.tight_layout()
        written.append(_save(fig, folder / "differences.png"))

    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    from bnaudit.report.figures import EPOCH_AXIS_NOTE, epoch_axis

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, outcome in zip(axes[0], ("test_mse", "train_mse"), strict=True):
        for k, c in enumerate(configs):
            series = np.array([o.series(outcome) for o in table[c].values()])
            q25, median, q75 = np.nanquantile(series, [0.25, 0.5, 0.75], axis=0)
            rows = np.arange(series.shape[1])
            ax.plot(rows, median, color=f"C{k % 10}", linewidth=1.2, label=escape.figure_text(c))
            ax.fill_between(rows, q25, q75, color=f"C{k % 10}", alpha=0.2, linewidth=0)
        epoch_axis(ax, e.epochs)
        if e.epochs <= 20:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("after epoch (0: the initial state)")
        ax.set_ylabel(WHAT[outcome].replace("final ", ""))
    axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.suptitle("Median (line) and quartiles (band) over seeds, after every epoch", fontweight="bold")
    if e.epochs > 20:
        fig.text(0.01, 0.01, EPOCH_AXIS_NOTE.strip(), fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    written.append(_save(fig, folder / "epochs.png"))
    return written


def _save(fig: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150, metadata={"Software": "bnaudit"})  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path
