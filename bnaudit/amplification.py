"""How much a difference grew over a window of epoch rows, and how much exact arithmetic grows it.

A difference d_r between two trajectories (a run and its perturbed twin, two machines,
or two exact trajectories of the reference engine) is known at some epoch rows r.  Over
a window a..b of rows, with ln d at the rows inside it,

    rate(a, b)  = (ln d_b - ln d_a) / (b - a)              ln per epoch (endpoint rate)
    slope(a, b) = least-squares slope of ln d over the window's rows
    range(a, b) = the smallest and largest endpoint rate of the sub-windows
                  at least half as long (rows apart >= max(1, (b - a + 1) // 2))

A growth series is irregular (some epochs amplify far more than others), so a rate is
never reported alone: ``Window`` carries all three.

``beside`` sets a measured difference beside the training's own sensitivity (the
exact-arithmetic amplification of ``bnaudit.reference.sensitivity``) over the same rows:

    exact  = ln d_b - ln d_a of the exact trajectories
    seen   = ln d_b - ln d_a of the measured difference
    added  = seen - exact     what float rounding adds to the exact amplification

The exact sensitivity is a linearisation: it says how the training amplifies a
difference that is small.  So the window starts at the first row where the measured
difference is not 0 and ends at the last row, before saturation and before any
non-finite difference, where the difference is still small (at most ``SMALL`` of the
largest |initial parameter|) and the exact series has a value.  Plain Python and numpy:
no torch, no mpmath.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

SMALL = 1e-3
"""A difference counts as small, so that the linearised (exact) growth applies, while its
largest |Δ parameter| is at most this share of the largest |initial parameter|."""


@dataclasses.dataclass(frozen=True)
class Window:
    """The growth of ln d over epoch rows ``start`` to ``end``."""

    start: int
    end: int
    rate: float | None
    """(ln d_end - ln d_start) / (end - start), ln per epoch; None where a distance is 0."""
    slope: float | None
    """Least-squares slope of ln d over the window's rows."""
    low: float | None
    """Smallest endpoint rate of the sub-windows at least half as long (None with fewer than 2 of them)."""
    high: float | None
    """Largest such rate."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def amplification(self) -> float | None:
        """ln d_end - ln d_start: the ln of the factor the difference grew by over the window."""
        return None if self.rate is None else self.rate * (self.end - self.start)


def fit(rows: Sequence[int] | np.ndarray, ln: Sequence[float | None], start: int, end: int) -> Window:
    """The window ``start``..``end`` of a series ``ln`` known at ``rows`` (ascending).

    Both ends must be rows of the series (ValueError otherwise); a None (a distance of 0)
    anywhere inside makes every figure None.
    """
    rows = [int(r) for r in rows]
    if not start < end or start not in rows or end not in rows:
        raise ValueError(f"window {start}..{end} is not a window of rows {rows[0]}..{rows[-1]}")
    inside = [(r, v) for r, v in zip(rows, ln) if start <= r <= end]
    if any(v is None for _, v in inside):
        return Window(start, end, None, None, None, None)
    xs = [float(r) for r, _ in inside]
    ys = [float(v) for _, v in inside if v is not None]
    rate = (ys[-1] - ys[0]) / (end - start)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    shortest = max(1, (end - start + 1) // 2)
    subs = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
            if xs[j] - xs[i] >= shortest]
    return Window(start, end, rate, slope, min(subs) if len(subs) > 1 else None,
                  max(subs) if len(subs) > 1 else None)


@dataclasses.dataclass(frozen=True)
class Beside:
    """A measured difference set beside the exact-arithmetic amplification over the same rows."""

    seen: Window
    """ln of the measured difference (largest |Δ parameter|) over the window."""
    exact: Window
    """ln of the exact trajectories' distance (``Sensitivity.log_overall``) over the same rows."""
    tensor: str
    """The exact measurement's perturbed parameter, e.g. linear1.weight."""
    index: tuple[int, ...]
    scale: int
    """Its perturbation was relative 2^-scale."""

    @property
    def added(self) -> float | None:
        """ln of the factor float rounding adds to the exact amplification over the window."""
        seen, exact = self.seen.amplification, self.exact.amplification
        return None if seen is None or exact is None else seen - exact

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.seen.start, "end": self.seen.end, "seen": self.seen.to_dict(),
                "exact": self.exact.to_dict(), "added_ln": self.added,
                "exact_perturbation": {"tensor": self.tensor, "index": list(self.index),
                                       "relative": f"2^-{self.scale}"}}


def small_limit(initial: np.ndarray) -> float:
    """The largest difference that counts as small, for runs whose initial parameters are ``initial``
    (values, not storage bit patterns: ``bits.to_float64`` of a bfloat16 row)."""
    with np.errstate(invalid="ignore"):
        scale = float(np.nanmax(np.abs(np.asarray(initial, dtype=np.float64)))) if np.size(initial) else 0.0
    return SMALL * scale if math.isfinite(scale) and scale > 0 else 0.0


def window_of(rows: Sequence[int] | np.ndarray, values: Sequence[float], *, last: int,
              saturation: int | None = None, limit: float = math.inf) -> tuple[int, int] | None:
    """The rows a..b to compare over: the rule in the module docstring (None if shorter than one epoch).

    ``values`` are the measured differences (largest |Δ|, >= 0, inf where one side is NaN),
    ``last`` the last row the exact series has, ``limit`` the largest small difference.
    """
    bound = last if saturation is None else min(last, saturation)
    start = end = None
    for r, v in zip(rows, values):
        r = int(r)
        if r > bound or not math.isfinite(v) or v > limit:
            break
        if v > 0 and start is None:
            start = r
        if start is not None:
            if v <= 0:
                break
            end = r
    if start is None or end is None or end <= start:
        return None
    return start, end


def observed(rows: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray, *, last: int | None = None,
             saturation: int | None = None, limit: float = math.inf) -> Window | None:
    """The measured difference's window (``window_of``; ``last`` defaults to the series' last row), or None."""
    values = [float(v) for v in values]
    span = window_of(rows, values, last=int(rows[-1]) if last is None else last, saturation=saturation,
                     limit=limit)
    if span is None:
        return None
    return fit(rows, [math.log(v) if v > 0 else None for v in values], *span)


def beside(exact: Any, rows: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray, *,
           initial: np.ndarray, saturation: int | None = None) -> Beside | None:
    """Set a measured difference (``values`` at ``rows``) beside ``exact`` (a ``Sensitivity``), over the
    window where it is small against ``initial`` (the runs' initial parameters).

    None where no window of at least one epoch exists.
    """
    seen = observed(rows, values, last=exact.rows[-1], saturation=saturation, limit=small_limit(initial))
    if seen is None:
        return None
    return Beside(seen=seen, exact=fit(exact.rows, exact.log_overall, seen.start, seen.end),
                  tensor=exact.tensor, index=tuple(exact.index), scale=exact.scale)


def window_from_dict(raw: Any, where: str) -> Window:
    """Inverse of ``Window.to_dict`` for untrusted data (InputError otherwise)."""
    from bnaudit.blocks import Fields
    from bnaudit.errors import InputError

    f = Fields(raw, where)
    if set(f.raw) != {field.name for field in dataclasses.fields(Window)}:
        raise InputError(f"{where}: malformed window")
    start, end = f.integer("start"), f.integer("end")
    if start is None or end is None or not start < end:
        raise InputError(f"{where}: a window must end after it starts")
    return Window(start, end, *(f.number(k, optional=True) for k in ("rate", "slope", "low", "high")))


def beside_from_dict(raw: Any, where: str) -> Beside:
    """Inverse of ``Beside.to_dict`` for untrusted data (InputError otherwise)."""
    from bnaudit.blocks import Fields
    from bnaudit.errors import InputError

    f = Fields(raw, where)
    seen, exact = window_from_dict(f.get("seen", dict), where), window_from_dict(f.get("exact", dict), where)
    p = Fields(f.get("exact_perturbation", dict), where)
    relative = p.get("relative", str)
    span = (f.integer("start"), f.integer("end"))
    if (seen.start, seen.end) != span or (exact.start, exact.end) != span \
            or not re.fullmatch(r"2\^-[0-9]{1,4}", relative):  # ASCII digits only: int() refuses '²'
        raise InputError(f"{where}: malformed exact-arithmetic comparison")
    return Beside(seen=seen, exact=exact, tensor=p.get("tensor", str), index=p.integers("index"),
                  scale=int(relative[3:]))
