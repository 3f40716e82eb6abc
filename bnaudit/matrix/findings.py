"""The matrix's answers in sentences: the same facts as its tables, from a ``MatrixSummary`` alone."""

from __future__ import annotations

import math
from collections import Counter

from bnaudit.layout import after, at
from bnaudit.matrix.results import ControlVerdict, IsaAgreement, MachinePair, MatrixSummary, shown


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _growth_text(m: MachinePair) -> str:
    parts = []
    if m.growth_rate is not None:
        parts.append(f"grows by ln {m.growth_rate:.3g} per epoch (x{math.exp(m.growth_rate):.3g} per epoch)"
                     if m.growth_rate < 50 else f"grows by ln {m.growth_rate:.3g} per epoch")
    parts.append(f"saturates {after(m.saturation_epoch)}" if m.saturation_epoch is not None
                 else "does not saturate within the run")
    if m.series:
        parts.append(f"largest parameter difference {_sci(m.series[-1][1])} {after(m.series[-1][0])}")
    return ", ".join(parts)


def _closer_text(m: MachinePair) -> str:
    if not m.closer_to_reference:
        return "closeness to the mpmath reference: not available (no reference divergence in the records)"
    votes = Counter(m.closer_to_reference.values())
    return (f"closer to the mpmath reference: {m.cpu_a} in {votes.get('a', 0)} layers, {m.cpu_b} in "
            f"{votes.get('b', 0)}, tied in {votes.get('tie', 0)}")


def verdict_sentence(v: ControlVerdict) -> str:
    name = v.control.replace("_", " ")
    if not v.changes_bits:
        values = ", ".join(shown(v.control, x) for x in v.values)
        return f"{name} ({values}) does not change the bits ({v.pairs} pairs compared, all identical)"
    text = f"{name} changes the bits in {v.differing} of {v.pairs} pairs"
    if len(v.by_dtype) > 1:
        text += " (" + ", ".join(f"{d}: {n}/{m}" for d, n, m in v.by_dtype) + ")"
    if v.first is not None:
        text += f"; first change: {v.first.where}"
    if v.largest is not None:
        ulps = f" ({v.largest.max_ulps} ulps)" if v.largest.max_ulps is not None else ""
        text += f"; largest divergence {_sci(v.largest.max_abs)}{ulps} in {v.largest.layer}, {after(v.largest.row)}"
    return text


def isa_sentence(a: IsaAgreement) -> str:
    if not a.agree:
        return (f"--isa {a.a} and --isa {a.b} never agree bit for bit "
                f"({a.compared} combinations of the other controls tried)")
    combos = "; ".join(", ".join(f"{k}={shown(k, val)}" for k, val in c.items()) or "the grid's settings"
                       for c in a.agree)
    return f"--isa {a.a} and --isa {a.b} agree bit for bit in {len(a.agree)} of {a.compared} combinations: {combos}"


def machine_sentence(m: MachinePair) -> str:
    what = f"{m.controls['dtype']}, {m.controls['threads']} thread(s), isa {m.controls['isa']}"
    if m.identical:
        return f"{m.cpu_a} and {m.cpu_b} agree bit for bit ({what})"
    assert m.first is not None
    return (f"{m.cpu_a} and {m.cpu_b} ({what}) first part {at(m.first.where)}; the gap {_growth_text(m)}; "
            f"{_closer_text(m)}")


def findings(summary: MatrixSummary) -> tuple[str, ...]:
    """The matrix's answers in sentences (the same facts as the tables)."""
    nested = len(summary.variants) > 1

    def where(variant: str) -> str:
        return f"[{variant}] " if nested else ""

    out = [where(v.variant) + verdict_sentence(v) for v in summary.verdicts]
    out += [where(a.variant) + isa_sentence(a) for a in summary.isa_agreement]
    out += [where(m.variant) + machine_sentence(m) for m in summary.machines]
    if summary.preset == "seed-machines":
        out += seed_findings(summary)
    return tuple(out)


# --------------------------------------------------------------------------- the seed-machines preset

def _seed_state(m: MachinePair) -> str:
    if m.identical:
        return "are bit-identical"
    assert m.first is not None
    return f"part {at(m.first.where)}, and the gap {_growth_text(m)}"


def _seed_comparison(dtype: str, bn: MachinePair, plain: MachinePair) -> str:
    """Where the i7 and the i5 part with BN and without, how the gaps compare, and the final losses."""
    text = (f"seed machines, {dtype}: with BN the i7 (Haswell) and the i5 (IvyBridge) {_seed_state(bn)}; "
            f"without BN they {_seed_state(plain)}")
    if bn.first is not None and plain.first is not None:
        same_place = (bn.first.epoch, bn.first.step, bn.first.phase, bn.first.tensor) == \
            (plain.first.epoch, plain.first.step, plain.first.phase, plain.first.tensor)
        text += "; so without BN they part " + ("at the same place" if same_place else "elsewhere")
        if bn.growth_rate and plain.growth_rate:
            text += (f", but the gap grows {bn.growth_rate / plain.growth_rate:.3g} times faster (in ln units "
                     f"per epoch) with BN" if bn.growth_rate >= plain.growth_rate else
                     f", and the gap grows {plain.growth_rate / bn.growth_rate:.3g} times faster without BN")
    elif bn.identical != plain.identical:
        text += "; so BN decides whether they part at all"
    return text + (f"; final train MSE with BN {bn.final_train_loss[0]:.4g} (i7) vs {bn.final_train_loss[1]:.4g} "
                   f"(i5), without BN {plain.final_train_loss[0]:.4g} vs {plain.final_train_loss[1]:.4g}")


def _seed_exactness(dtype: str, name: str, m: MachinePair) -> str | None:
    """Which machine is nearer exact arithmetic: the mpmath reference, else the float64 run on its own CPU."""
    if m.closer_to_reference:
        return f"seed machines, {dtype}, {name}: {_closer_text(m)}"
    at = [(r, x, y) for r, x, y in m.float64_distance if r > 0]
    if not at:
        return None
    wins = sum(x < y for _, x, y in at), sum(y < x for _, x, y in at)
    rows = "; ".join(f"{r}: {x:.3g} vs {y:.3g}" for r, x, y in at)
    return (f"seed machines, {dtype}, {name}: no mpmath reference divergence in the records; "
            f"distance from the float64 run on the same CPU (i7 vs i5) after epoch {rows}: "
            f"the i7 is closer after {wins[0]} of {len(at)} of those epochs, the i5 after {wins[1]}")


def seed_findings(summary: MatrixSummary) -> list[str]:
    """The seed's question: where its two machines part, how the gap grows, and whether BN matters."""
    pairs = {(m.variant, m.controls["dtype"]): m for m in summary.machines
             if (m.cpu_a, m.cpu_b) == ("seed-i7", "seed-i5")}
    out = []
    for dtype in summary.grid.get("dtype", []):
        bn, plain = pairs.get(("bn", dtype)), pairs.get(("no-bn", dtype))
        if bn is None or plain is None:
            continue
        out.append(_seed_comparison(dtype, bn, plain))
        for name, m in (("with BN", bn), ("without BN", plain)):
            sentence = _seed_exactness(dtype, name, m)
            if sentence is not None:
                out.append(sentence)
    return out
