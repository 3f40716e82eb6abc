"""report.md: the report as Markdown (for a repository or a pull request), and the tables every view shares.

The tables are built here once, as headers and rows of plain strings, and rendered by
this module, ``html`` and ``terminal`` alike, so the three views say the same thing.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np

from bnaudit import __version__
from bnaudit.report.build import Report
from bnaudit.report.figures import SECTIONS, FigureInfo

Table = tuple[list[str], list[list[str]]]


def _num(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else str(value)


def key_table(report: Report) -> Table:
    """One row per run: configuration, class, final errors, BN conditioning, reference bits."""
    headers = ["run", "class", "configuration", "epochs", "final train MSE", "final test MSE",
               "min BN var / eps", "non-finite"]
    if report.references:
        headers.append("fewest correct bits (final)")
    rows = []
    for r in report.runs:
        losses = r.record.arrays["losses"][-1]
        mv = r.record.arrays["min_var"][1:]
        low = float(np.nanmin(mv)) if mv.size and np.isfinite(mv).any() else float("nan")
        nf = r.record.fingerprint.nonfinite
        row = [r.label, r.class_name, r.config_text, str(r.epochs), _num(losses[0]), _num(losses[1]),
               _num(low) if np.isfinite(low) else "-",
               "none" if not nf else f"epoch {nf.get('epoch')} {nf.get('phase')} {nf.get('tensor')}"]
        if report.references:
            ref = report.references.get(r.label)
            row.append(f"{ref.correct_bits[-1].min():.1f} of {ref.precision}" if ref is not None else "-")
        rows.append(row)
    return headers, rows


def pair_table(report: Report) -> Table:
    """One row per compared pair: identical or where they part, final divergence, growth."""
    headers = ["pair", "kind", "verdict", "first difference", "final max |Δ parameter|", "max ulps (final)",
               "growth / epoch", "saturates at", "environment differs in"]
    rows = []
    for p in report.pairs:
        final_abs = float(np.nanmax(p.max_abs[-1])) if p.max_abs.size else 0.0
        final_ulps = float(np.nanmax(p.max_ulps[-1])) if p.max_ulps.size else 0.0
        env = ", ".join(str(k) for k, _, _ in p.environment_diff[:3]) or "-"
        rows.append([p.title, "1-ulp baseline" if p.kind == "perturb" else "configurations",
                     "bit-identical" if p.identical else "differ",
                     (p.first_text + (f" ({p.first_detail})" if p.first_detail else "")) or "-",
                     f"{final_abs:.3g}", f"{final_ulps:.0f}",
                     f"{p.growth_rate:.3g}" if p.growth_rate is not None else "-",
                     str(p.saturation_epoch) if p.saturation_epoch is not None else "-", env])
    return headers, rows


def class_table(report: Report) -> Table:
    """Equivalence classes of bit-identical runs."""
    headers = ["class", "runs", "storage", "members", "members share", "digest"]
    rows = [[c.name, str(len(c.members)), c.storage, ", ".join(c.members), c.shared, c.digest[:16]]
            for c in report.classes]
    return headers, rows


def header_facts(report: Report) -> list[tuple[str, str]]:
    spec = report.spec
    epochs = sorted({r.epochs for r in report.runs})
    facts = [
        ("experiment", f"{spec.name} (spec {spec.short_hash})"),
        ("runs", f"{len(report.runs)} in {len(report.classes)} class(es) of bit-identical results"),
        ("epochs", ", ".join(str(e) for e in epochs) + f" of {spec.train.epochs}"),
        ("inputs", ", ".join(report.sources)),
        ("generated", f"bnaudit {__version__}, "
                      f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}"),
    ]
    return facts


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(report: Report, figs: Sequence[FigureInfo]) -> str:
    """The whole report as Markdown; figures are linked relative to the report folder."""
    out = ["# bnaudit report", ""]
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in header_facts(report)]
    out += ["", "## Runs", "", md_table(key_table(report)), ""]
    if report.pairs:
        out += ["## Pairs compared", "", md_table(pair_table(report)), ""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in report.notes] + [""]
    for key, title in SECTIONS.items():
        section = [f for f in figs if f.section == key]
        if key == "matrix":
            out += [f"## {title}", "", md_table(class_table(report)), ""]
            if report.findings:
                out += ["Findings of the matrix (its summary.json):", ""]
                out += [f"- {_md_escape(f)}" for f in report.findings] + [""]
        elif not section:
            continue
        else:
            out += [f"## {title}", ""]
        for f in section:
            out += [f"### {f.title}", "", f"![{_md_escape(f.title)}]({f.path})", "", f"*{f.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"
