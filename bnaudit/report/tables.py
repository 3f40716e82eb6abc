"""The tables and colours every report format shares, built once from the ``Report``.

Each table is headers and rows of plain strings; ``markdown``, ``html`` and ``terminal``
only lay them out, so the three views say the same thing.  A class has one colour in
every view: its curves in the figures and its swatch in the HTML class table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bnaudit import bits, compare
from bnaudit._version import __version__
from bnaudit.amplification import Beside
from bnaudit.layout import after, epochs_text, nonfinite_when
from bnaudit.report import story
from bnaudit.report.model import Report

Table = tuple[list[str], list[list[str]]]

CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#2525f4", "#f425f4", "#060679", "#596619", "#790653", "#256af4",
                 "#2eb88a", "#aa7409", "#f99379", "#da0b73")
"""20 colours that stay apart: matplotlib's tab10, then ten chosen one by one to be as far as possible
(CIELAB) from every colour before them, each at least 2:1 against the white page; no two of the 20 are
closer than 27 (CIE76 ΔE).  Text on a class's colour is black or white, whichever contrasts more
(``text_colour``: at least 4.6:1 on every one)."""


def _luminance(colour: str) -> float:
    """WCAG relative luminance of a #rrggbb colour."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(int(colour[k:k + 2], 16) / 255) for k in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two #rrggbb colours (1 to 21)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_colour(background: str) -> str:
    """Black or white, whichever reads better on ``background``."""
    return "#000000" if contrast(background, "#000000") >= contrast(background, "#ffffff") else "#ffffff"


def class_colour(report: Report, class_name: str) -> str:
    """The colour of a class (classes beyond 20 reuse the colours in order)."""
    names = [c.name for c in report.classes]
    return CLASS_COLOURS[names.index(class_name) % len(CLASS_COLOURS)]


def _num(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else str(value)


def key_table(report: Report) -> Table:
    """One row per run: configuration, class, final errors, BN conditioning, reference bits."""
    headers = ["run", "class", "configuration", "epochs", "final train MSE", "final test MSE",
               "min BN var / eps", "non-finite"]
    if report.references:
        headers.append("fewest correct bits (any layer or epoch)")
    rows = []
    for r in report.runs:
        losses = r.record.arrays["losses"][-1]
        mv = r.record.arrays["min_var"][1:]
        low = float(np.nanmin(mv)) if mv.size and np.isfinite(mv).any() else float("nan")
        nf = r.record.fingerprint.nonfinite
        row = [r.label, r.class_name, r.config_text, str(r.epochs), _num(losses[0]), _num(losses[1]),
               _num(low) if np.isfinite(low) else "-",
               "none" if not nf else f"{nonfinite_when(nf)} {nf.get('phase')} {nf.get('tensor')}"]
        if report.references:
            ref = report.references.get(r.label)
            row.append("-" if ref is None else
                       f"{bits.correct_bits_text(story.fewest_bits(ref)[0])} of {ref.precision}")
        rows.append(row)
    return headers, rows


def beyond_exact(b: Beside | None) -> str:
    """What float rounding adds to the exact amplification, for a table cell ("-" where not measured)."""
    if b is None or b.added is None:
        return "-"
    return f"x{math.exp(min(b.added, 700)):.3g} over {epochs_text(b.seen.start, b.seen.end)}"


def pair_table(report: Report) -> Table:
    """One row per compared pair: identical or where they part, final divergence, growth."""
    headers = ["pair", "kind", "verdict", "first difference", "final max |Δ parameter|", "max ulps (final)",
               "growth / epoch", "saturates at", "beyond exact arithmetic", "environment differs in"]
    rows = []
    for p in report.pairs:
        final_abs = float(np.nanmax(p.max_abs[-1])) if p.max_abs.size else 0.0
        final_ulps = float(np.nanmax(p.max_ulps[-1])) if p.max_ulps.size else 0.0
        env = "; ".join(f"{k}: {story.value_text(va)} vs {story.value_text(vb)}"
                        for k, va, vb in p.environment_diff[:3]) or "-"
        rows.append([p.title, "1-ulp baseline" if p.kind == "perturb" else "configurations",
                     "bit-identical" if p.identical else "differ",
                     (p.first_text + (f" ({p.first_detail})" if p.first_detail else "")) or "-",
                     f"{final_abs:.3g}", f"{final_ulps:.0f}",
                     f"{p.growth_rate:.3g}" if p.growth_rate is not None else "-",
                     after(p.saturation_epoch) if p.saturation_epoch is not None else "-", beyond_exact(p.exact),
                     env])
    return headers, rows


def environment_table(report: Report) -> Table:
    """One row per run: the machine, the library versions, and every numerics setting in effect."""
    headers = ["run", "CPU", "emulated CPU", "CPU features", "torch kernels", "torch", "numpy", "MKL", "oneDNN",
               "OpenMP", "numerics settings in effect"]
    rows = []
    for r in report.runs:
        env, eff = r.record.fingerprint.environment, r.record.fingerprint.effective
        build = _mapping(env.get("torch_build"))
        rows.append([r.label, str(env.get("cpu_model") or "?"), str(env.get("emulated_cpu_model") or "-"),
                     " ".join(str(f) for f in env.get("cpu_features") or ()) or "-",
                     str(eff.get("cpu_capability", "?")), str(env.get("torch", "?")), str(env.get("numpy", "?")),
                     str(build.get("mkl", "-")), str(build.get("onednn", "-")), str(build.get("openmp", "-")),
                     settings_text(env, eff)])
    return headers, rows


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def settings_text(env: dict[str, Any], eff: dict[str, Any]) -> str:
    """The numerics variables a run's process had, and the in-process settings it read back."""
    variables = _mapping(env.get("environment"))
    parts = [f"{k}={v}" for k, v in sorted(variables.items()) if k != "KMP_DUPLICATE_LIB_OK"]
    for key, word in (("deterministic_algorithms", "deterministic algorithms"),
                      ("mkldnn_deterministic", "oneDNN deterministic"), ("flush_denormal", "flush denormals")):
        if eff.get(key):
            parts.append(word)
    if "intra_op_threads" in eff:
        parts.append(f"torch threads {eff['intra_op_threads']}")
    dispatch = eff.get("numpy_dispatch")
    if isinstance(dispatch, list) and dispatch:
        parts.append("numpy " + " ".join(str(d) for d in dispatch))
    for pool in eff.get("threadpools") or ():
        if isinstance(pool, dict) and pool.get("internal_api") == "openblas" and pool.get("architecture"):
            parts.append(f"OpenBLAS {pool['architecture']}")
    return ", ".join(parts) or "-"


def class_table(report: Report) -> Table:
    """Equivalence classes of bit-identical runs."""
    headers = ["class", "runs", "storage", "members", "members share", "digest"]
    rows = [[c.name, str(len(c.members)), c.storage, ", ".join(c.members), c.shared, c.digest[:16]]
            for c in report.classes]
    return headers, rows


def header_facts(report: Report) -> list[tuple[str, str]]:
    """The page header: experiment, runs and classes, epochs, inputs, host, and the bnaudit that wrote it."""
    spec = report.spec
    epochs = sorted({r.epochs for r in report.runs})
    return [
        ("experiment", f"{spec.name} (spec {spec.short_hash})"),
        ("runs", f"{story.count(len(report.runs), 'run')} in "
                 f"{story.count(len(report.classes), 'class', 'classes')} of bit-identical results"),
        ("epochs", ", ".join(str(e) for e in epochs) + f" of {spec.train.epochs}"
         + (f"; {compare.prefix_text(report.lengths)}" if compare.prefix_text(report.lengths) else "")),
        ("inputs", ", ".join(report.sources)),
        ("host", ", ".join(sorted({str(r.record.fingerprint.environment.get("cpu_model") or "unknown CPU")
                                   for r in report.runs})) + " (the CPU that ran the runs)"),
        # No clock time: the same inputs give the same bytes (the records carry when they were made).
        ("generated", f"bnaudit {__version__}"),
    ]
