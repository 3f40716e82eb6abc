"""How much the training itself amplifies a perturbation, measured in exact arithmetic.

Two copies of the reference engine train in lock step at ``precision`` bits from the
frozen inputs.  In the second, one initial parameter w (``linear1.weight[0,0]`` unless
told) is moved to w (1 + 2^-scale), exactly (2^-200 by default: hundreds of bits below
every value and hundreds above the engine's rounding, so that the difference stays in
the linear regime for a hundred epochs and rounding adds nothing measurable).  At every
epoch row r the distance of the two states is

    d_r = max |p'_i - p_i|          over the parameters of a layer, or of the network,

and the finite-time growth rate over a window a..b of rows is

    rate(a, b) = (ln d_b - ln d_a) / (b - a)        ln per epoch.

In the linear regime d_r is proportional to the perturbation, so the rates do not
depend on ``scale``: they are the training's own sensitivity, with no float rounding in
it.  A float32 ``--perturb`` run measures this amplification *and* the rounding noise
the perturbation seeds; set beside it, the difference is what rounding adds.

The series is irregular (some epochs amplify far more than others), so one rate is never
reported alone: ``Window`` gives the endpoint rate of a window, the least-squares slope
of ln d over it, and the range of the endpoint rates of all its sub-windows at least
half as long.

Only ``measure`` needs mpmath (the engine, imported there): the results and their
arithmetic are plain Python, for the report to render.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.amplification import Window, fit

if TYPE_CHECKING:
    from bnaudit.frozen import FrozenInputs
    from bnaudit.spec import ExperimentSpec

SENSITIVITY_SCHEMA = "bnaudit.sensitivity/1"
"""``bnaudit reference sensitivity --json``: ``Sensitivity.to_dict``."""
DEFAULT_SCALE = 200
"""The perturbation is relative 2^-200."""
DEFAULT_PRECISION = 512
"""Bits of the engine: 2^-512 rounding under a 2^-200 perturbation leaves 312 bits of margin."""


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """The distances of the perturbed trajectory from the unperturbed one, row by row."""

    spec_hash: str
    tensor: str
    """The perturbed parameter, e.g. linear1.weight."""
    index: tuple[int, ...]
    scale: int
    """The perturbation is relative 2^-scale (absolute 2^-scale for a zero weight)."""
    precision: int
    rows: tuple[int, ...]
    """Epoch rows 0..epochs (0 = initial state)."""
    layers: tuple[str, ...]
    """Layers with parameters, in forward order."""
    log_distance: tuple[tuple[float | None, ...], ...]
    """(rows, layers) ln of the largest |difference| of the layer's parameters; None where it is 0."""
    log_overall: tuple[float, ...]
    """(rows,) ln of the largest |difference| of any parameter."""
    seconds: float

    def window(self, start: int, end: int, series: Sequence[float | None] | None = None) -> Window:
        """The growth over rows ``start``..``end`` of ``series`` (default: the whole network)."""
        ln = list(self.log_overall if series is None else series)
        if not 0 <= start < end <= len(ln) - 1:
            raise ValueError(f"window {start}..{end} is not inside rows 0..{len(ln) - 1}")
        return fit(self.rows, ln, start, end)

    def layer_window(self, layer: str, start: int, end: int) -> Window:
        j = self.layers.index(layer)
        return self.window(start, end, [row[j] for row in self.log_distance])

    def to_dict(self, windows: Sequence[tuple[int, int]]) -> dict[str, Any]:
        return {
            "spec_hash": self.spec_hash,
            "perturbation": {"tensor": self.tensor, "index": list(self.index), "relative": f"2^-{self.scale}"},
            "precision_bits": self.precision, "rows": list(self.rows), "layers": list(self.layers),
            "log_distance": [list(r) for r in self.log_distance], "log_overall": list(self.log_overall),
            "windows": [self.window(a, b).to_dict() for a, b in windows],
            "layer_windows": {layer: [self.layer_window(layer, a, b).to_dict() for a, b in windows]
                              for layer in self.layers},
            "seconds": self.seconds,
        }


def _perturb(net: Any, tensor: str, index: tuple[int, ...], scale: int) -> None:
    """w -> w (1 + 2^-scale) (w = 0: 2^-scale), exactly at the engine's precision."""
    layer_name, key = tensor.split(".")
    layer = next(layer for layer in net.layers if layer.name == layer_name)
    value = getattr(layer, key)
    tiny = net.ctx.ldexp(net.ctx.mpf(1), -scale)
    if len(index) == 2:
        row, col = index
        w = value[row][col]
        value[row][col] = w + w * tiny if w != 0 else tiny
    else:
        (i,) = index
        w = value[i]
        value[i] = w + w * tiny if w != 0 else tiny


def _layer_distances(a: Any, b: Any, layers: Sequence[str]) -> tuple[list[Any], Any]:
    """Largest |difference| of each layer's parameters (two ``engine.Network``), and of all of them (mpf)."""
    zero = a.ctx.mpf(0)
    per = {name: zero for name in layers}
    for (name, va), (_, vb) in zip(a.parameters(), b.parameters()):
        layer = name.split(".")[0]
        flat_a = va if not va or not isinstance(va[0], list) else [x for row in va for x in row]
        flat_b = vb if not vb or not isinstance(vb[0], list) else [x for row in vb for x in row]
        for x, y in zip(flat_a, flat_b):
            d = abs(x - y)
            if d > per[layer]:
                per[layer] = d
    out = [per[name] for name in layers]
    return out, max(out)


def measure(spec: ExperimentSpec, frozen: FrozenInputs, *, epochs: int, tensor: str = "linear1.weight",
            index: tuple[int, ...] = (0, 0), scale: int = DEFAULT_SCALE, precision: int = DEFAULT_PRECISION,
            progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """Train both copies for ``epochs`` epochs; the distances at every epoch row.

    The precision must leave the perturbation far above rounding: ``precision - scale``
    of at least 100 bits (ValueError otherwise).
    """
    from bnaudit.reference import engine

    if precision - scale < 100:
        raise ValueError(f"precision {precision} leaves only {precision - scale} bits under a 2^-{scale} "
                         "perturbation; use at least scale + 100")
    start = time.perf_counter()
    ctx = engine.new_context(precision)
    base = engine.Network(spec, ctx, frozen.init, frozen.inputs, frozen.targets)
    moved = engine.Network(spec, ctx, frozen.init, frozen.inputs, frozen.targets)
    _perturb(moved, tensor, index, scale)
    layers = tuple(dict.fromkeys(name.split(".")[0] for name, _ in base.parameters()))

    def ln(x: Any) -> float | None:
        return float(ctx.log(x)) if x > 0 else None

    per_rows, overall = [], []
    for row in range(epochs + 1):
        if row:
            base.train_epoch(row - 1, frozen.batches[row - 1])
            moved.train_epoch(row - 1, frozen.batches[row - 1])
        per, worst = _layer_distances(base, moved, layers)
        per_rows.append(tuple(ln(d) for d in per))
        whole = ln(worst)
        if whole is None:  # the perturbation vanished: only possible with a zero learning signal
            raise ValueError(f"the trajectories are identical at epoch row {row}")
        overall.append(whole)
        if progress is not None:
            progress(row, epochs)
    return Sensitivity(spec_hash=spec.hash, tensor=tensor, index=tuple(index), scale=scale, precision=precision,
                       rows=tuple(range(epochs + 1)), layers=layers, log_distance=tuple(per_rows),
                       log_overall=tuple(overall), seconds=time.perf_counter() - start)


def amplification(s: Sensitivity) -> float:
    """ln of the factor by which the training amplified the perturbation over the whole run."""
    return s.log_overall[-1] - s.log_overall[0]


def default_windows(epochs: int) -> list[tuple[int, int]]:
    """0..min(7, epochs) (the window of the first measurement), and the whole run."""
    out = [(0, min(7, epochs))]
    if epochs > 7:
        out.append((0, epochs))
    return out


def bits_per_epoch(rate: float) -> float:
    """A rate in ln per epoch as bits per epoch."""
    return rate / math.log(2)


# --------------------------------------------------------------------------- stored measurements

MAX_FILE_BYTES = 16 * 1024 * 1024
"""A stored measurement is about 30 kB per 100 epochs of the default spec."""


def path_for(spec: ExperimentSpec) -> Path:
    """Where the sensitivity of ``spec`` is kept: shipped beside the default spec's reference
    (``reference/sensitivity/<short hash>.json``), in the cache for a custom spec."""
    from bnaudit.frozen import cache_root, shipped_root
    from bnaudit.spec import default_spec

    if spec.hash == default_spec().hash:
        return shipped_root() / "sensitivity" / f"{spec.short_hash}.json"
    return cache_root() / "sensitivity" / f"{spec.hash}.json"


def document(result: Sensitivity, windows: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The ``--json`` output and the stored file: schema, writer's version, then ``to_dict``."""
    from bnaudit._version import __version__

    return {"schema": SENSITIVITY_SCHEMA, "bnaudit": __version__, **result.to_dict(windows)}


def save(result: Sensitivity, windows: Sequence[tuple[int, int]], out: Path) -> None:
    """Write the measurement atomically (never a half-written file that parses)."""
    from bnaudit import fileio

    fileio.write_text_atomic(out, fileio.dumps(document(result, windows)))


def from_document(raw: Any, where: str, spec: ExperimentSpec) -> Sensitivity:
    """Decode a stored measurement of ``spec``, checking every field (InputError otherwise).

    The windows in the file are derived figures and are not read: they are recomputed
    from the distances.
    """
    from bnaudit.blocks import Fields
    from bnaudit.errors import InputError

    f = Fields(raw, where)
    if f.get("schema", str) != SENSITIVITY_SCHEMA:
        raise InputError(f"{where}: not a {SENSITIVITY_SCHEMA} document")
    if f.get("spec_hash", str) != spec.hash:
        raise InputError(f"{where}: measured for another experiment (spec {str(raw['spec_hash'])[:12]}, "
                         f"not {spec.short_hash})")
    p = Fields(f.get("perturbation", dict), f"{where}: perturbation")
    tensor = p.get("tensor", str)
    index = p.integers("index")
    shapes = dict(spec.parameters())
    if tensor not in shapes or len(index) != len(shapes[tensor]) \
            or not all(i < n for i, n in zip(index, shapes[tensor])):
        raise InputError(f"{where}: the perturbed element is not a parameter of the spec")
    relative = p.get("relative", str)
    scale_text = relative.removeprefix("2^-")
    if not (relative.startswith("2^-") and scale_text.isdigit() and 20 <= int(scale_text) <= 100_000):
        raise InputError(f"{where}: perturbation.relative is not 2^-N")
    scale = int(scale_text)
    precision = f.integer("precision_bits", low=scale + 100, high=100_000)
    rows = f.integers("rows")
    if not rows or len(rows) < 2 or list(rows) != list(range(len(rows))) or rows[-1] > spec.train.epochs:
        raise InputError(f"{where}: rows are not 0..N within the spec's epochs")
    layers = tuple(dict.fromkeys(name.split(".")[0] for name, _ in spec.parameters()))
    if tuple(f.get("layers", list)) != layers:
        raise InputError(f"{where}: layers are not the spec's")

    def ln(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"{where}: a distance is not a finite number")
        return float(value)

    overall = f.get("log_overall", list)
    per = f.get("log_distance", list)
    if len(overall) != len(rows) or len(per) != len(rows) \
            or not all(isinstance(r, list) and len(r) == len(layers) for r in per):
        raise InputError(f"{where}: its distance series do not match its rows and layers")
    return Sensitivity(spec_hash=spec.hash, tensor=tensor, index=index, scale=scale,
                       precision=int(precision or 0), rows=tuple(rows), layers=layers,
                       log_distance=tuple(tuple(None if v is None else ln(v) for v in r) for r in per),
                       log_overall=tuple(ln(v) for v in overall),
                       seconds=float(f.number("seconds") or 0.0))


def stored(spec: ExperimentSpec, path: Path | None = None) -> Sensitivity | None:
    """The stored sensitivity of ``spec``, or None where none was measured (InputError if unreadable)."""
    from bnaudit import fileio

    path = path_for(spec) if path is None else Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    where = f"sensitivity {path}"
    return from_document(fileio.read_json(path, "sensitivity file", max_bytes=MAX_FILE_BYTES), where, spec)
