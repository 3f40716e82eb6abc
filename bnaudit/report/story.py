"""The report's story: what the runs show, in plain sentences computed from the model.

The report opens with these, before any table or figure: which runs are bit-identical;
where each compared pair first parts (the tensor, the step, the share of elements, the
ulps), how fast the gap grows and against what exact arithmetic gives over the same epochs;
how many correct bits each class keeps and which is closer to exact arithmetic; and the
likely cause in the environment, with its values.  Each sentence is built from the same
objects ``bnaudit compare`` prints (``compare.Difference``, ``divergence.closer``,
``amplification.Beside``), so the two never say different things.

Epoch words, here and in the tables: "the initial state" is before training, "after N
epochs" is the end of the N-th epoch (an epoch row N), and a step is named as ``compare``
names it.
"""

from __future__ import annotations

import math

from bnaudit import bits, compare
from bnaudit.report.model import PairView, ReferenceView, Report

CAUSES_SHOWN = 2
"""Environment facts named as the likely cause of a pair's split."""


def after(row: int) -> str:
    """An epoch row in words: the initial state, or after N epochs."""
    return "the initial state" if row == 0 else f"after {row} epoch{'' if row == 1 else 's'}"


def fewest_bits(ref: ReferenceView) -> tuple[float, int]:
    """The fewest correct bits over every layer's weights and biases at the last measured row, and that row
    (the one definition the report's sentences and its runs table use)."""
    return float(ref.correct_bits[-1].min()), int(ref.rows[-1])


def _factor(ln: float) -> str:
    return f"x{math.exp(min(ln, 700)):.3g}"


def classes_sentence(report: Report) -> str:
    n = len(report.runs)
    if len(report.classes) == 1:
        return "The run is its own class." if n == 1 else f"All {n} runs are bit-identical (one class)."
    parts = "; ".join(f"{c.name}: {', '.join(c.members)}" for c in report.classes)
    return f"The {n} runs fall into {len(report.classes)} classes of bit-identical results ({parts})."


def _growth(p: PairView, storage: str) -> str | None:
    if p.growth_rate is None:
        return None
    text = f"The gap then grows {_factor(p.growth_rate)} per epoch"
    text += (f" until it saturates {after(p.saturation_epoch)}" if p.saturation_epoch is not None
             else ", without saturating over the epochs compared")
    b = p.exact
    if b is not None and b.seen.amplification is not None and b.exact.amplification is not None:
        added = b.added or 0.0
        text += (f"; from {after(b.seen.start)} to {after(b.seen.end)} exact arithmetic (mpmath) grows a difference "
                 f"{_factor(b.exact.amplification)} where this one grew {_factor(b.seen.amplification)}, so "
                 + (f"{storage} rounding adds {_factor(added)}" if added >= 0
                    else f"it grew {_factor(-added)} less than exact arithmetic does"))
    return text + "."


def _cause(p: PairView) -> str | None:
    causes = [(k, va, vb) for k, va, vb in p.environment_diff if compare.is_cause(k)][:CAUSES_SHOWN]
    if not causes:
        return None
    return "Likely cause: " + "; ".join(f"{k} is {value_text(va)} in {p.a} and {value_text(vb)} in {p.b}"
                                        for k, va, vb in causes) + "."


def value_text(v: object) -> str:
    """An environment fact's value, short."""
    if v is None:
        return "unset"
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def closer_sentence(report: Report, p: PairView) -> str | None:
    """Which run of a pair keeps more correct bits per layer, after the last epoch both measured."""
    if not p.closer:
        return None
    ra, rb = report.references.get(p.a), report.references.get(p.b)
    common = sorted(set(ra.rows.tolist()) & set(rb.rows.tolist())) if ra is not None and rb is not None else []
    when = after(int(common[-1])) if common else "at the last common epoch"
    counts = {side: [layer for layer, who in p.closer.items() if who == side] for side in ("a", "b", "tie")}
    n = len(p.closer)
    if len(counts["a"]) == len(counts["b"]):
        lead = f"Neither {p.a} nor {p.b} is closer to exact arithmetic {when}"
    else:
        win, lose = ("a", "b") if len(counts["a"]) > len(counts["b"]) else ("b", "a")
        lead = f"{p.a if win == 'a' else p.b} is closer to exact arithmetic {when} than {p.a if lose == 'a' else p.b}"
    return (f"{lead}: more correct bits in {len(counts['a'])} of {n} layers for {p.a}, {len(counts['b'])} for "
            f"{p.b}, {len(counts['tie'])} tied (weights and biases against the mpmath reference).")


def pair_sentences(report: Report, p: PairView) -> list[str]:
    if p.identical:
        return [f"{p.b} and {p.a} are bit-identical."]
    what = "The 1-ulp perturbation of" if p.kind == "perturb" else ""
    lead = f"{what} {p.b} parts from {p.a}" if what else f"{p.b} parts from {p.a}"
    out = [f"{lead} at {p.first.text if p.first is not None else 'no training tensor (their digests differ)'}."]
    storage = report.run(p.a).storage
    out += [s for s in (_growth(p, storage), closer_sentence(report, p), _cause(p) if p.kind == "pair" else None)
            if s]
    return out


def bits_sentence(report: Report) -> str | None:
    """How many correct bits each class keeps (its first run with a reference)."""
    kept = []
    for c in report.classes:
        label = next((m for m in c.members if m in report.references), None)
        if label is None:
            continue
        ref = report.references[label]
        value, row = fewest_bits(ref)
        kept.append(f"{c.name} {bits.correct_bits_text(value)} of {ref.precision} {after(row)}")
    if not kept:
        return None
    return ("Fewest correct bits over every layer's weights and biases, against the mpmath reference: "
            + "; ".join(kept) + ".")


def sentences(report: Report) -> tuple[str, ...]:
    """The story, sentence by sentence."""
    out = [classes_sentence(report)]
    for p in report.pairs:
        out += pair_sentences(report, p)
    bits = bits_sentence(report)
    if bits:
        out.append(bits)
    return tuple(out)
