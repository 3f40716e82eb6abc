"""Divergence of a run from the mpmath reference, per layer and epoch row (numpy only).

For each layer with state (each Linear and each BatchNorm1d) two series are measured
at every epoch row that both the run and the reference store:

* ``weights``: the layer's weight and bias together (params.npy columns);
* ``activations``: the layer's output on the probe batch (probe.npy block).

Per series and row:

* ``max_abs``: max_k |run_k - ref_k| (the reference is a double-double hi + lo, and
  the error is formed as (run - hi) - lo in float64: exact enough, since the run's
  error is far above 2^-106 relative);
* ``max_rel``: max_k |run_k - ref_k| / |ref_k| (elementwise; inf where the reference
  is exactly 0 and the run is not);
* ``max_ulps``: max_k ulp distance between run_k and ref_k rounded to nearest in the
  run's dtype, counted on bit patterns in that dtype (``bnaudit.bits``);
* ``correct_bits``: -log2 of the *normwise* relative error max_abs / max_k |ref_k|,
  capped at the dtype's precision (24 float32, 53 float64, 8 bfloat16).  Normwise,
  because one weight crossing zero would make an elementwise relative error
  meaningless for the whole layer.

The block is compact JSON (base64 arrays, float32 and float16) so that it fits in a
fingerprint's ``extra``: about 80 kB for a 1000-epoch run of the default spec.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from bnaudit import bits, record
from bnaudit.blocks import ENCODING, METRICS, DivergenceBlock, LossBits, Series
from bnaudit.errors import InputError
from bnaudit.layout import TraceLayout
from bnaudit.spec import ExperimentSpec


def series_for(spec: ExperimentSpec, layout: TraceLayout) -> list[dict[str, Any]]:
    """The measured series: (layer, kind, what) with their column ranges."""
    slices = layout.param_slices()
    width = spec.train.batch_size
    probe_offsets: dict[str, slice] = {}
    offset = 0
    for name, units in zip(layout.modules, layout.probe_width):
        probe_offsets[name] = slice(offset, offset + units * width)
        offset += units * width
    out = []
    for name, kind, _, _ in spec.layers():
        ws, bs = slices[f"{name}.weight"], slices[f"{name}.bias"]
        out.append({"layer": name, "kind": kind, "what": "weights", "section": "params",
                    "cols": np.r_[ws.start:ws.stop, bs.start:bs.stop]})
        p = probe_offsets[name]
        out.append({"layer": name, "kind": kind, "what": "activations", "section": "probe",
                    "cols": np.arange(p.start, p.stop)})
    return out


def measure(run_values: np.ndarray, ref_hi: np.ndarray, ref_lo: np.ndarray, storage: str) -> dict[str, float]:
    """The four metrics of one series at one row (run values in storage form)."""
    cap = bits.storage(storage).mantissa_bits
    v = bits.to_float64(np.asarray(run_values), storage)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs((v - ref_hi) - ref_lo)
        max_abs = float(err.max()) if err.size else 0.0
        rel = np.where(err == 0, 0.0, err / np.abs(ref_hi))
        max_rel = float(rel.max()) if rel.size else 0.0
        scale = float(np.abs(ref_hi).max()) if ref_hi.size else 0.0
    ref_rounded = bits.from_float64(ref_hi, storage)
    ulps = bits.ulp_distance(np.asarray(run_values), ref_rounded, storage)
    max_ulps = float(ulps.max()) if ulps.size else 0.0
    if not math.isfinite(max_abs) or np.isnan(err).any():
        return {"max_abs": math.inf, "max_rel": math.inf, "max_ulps": math.inf, "correct_bits": 0.0}
    correct = correct_bits(max_abs, scale, cap)
    return {"max_abs": max_abs, "max_rel": max_rel, "max_ulps": max_ulps, "correct_bits": correct}


def correct_bits(abs_error: float, scale: float, cap: int) -> float:
    """-log2(abs_error / scale), capped to [0, cap]; exact agreement gives cap."""
    if abs_error == 0:
        return float(cap)
    if scale == 0 or not math.isfinite(abs_error):
        return 0.0
    return float(min(cap, max(0.0, math.log2(scale) - math.log2(abs_error))))  # no underflow of the ratio


def versus_reference(spec: ExperimentSpec, storage: str, params: np.ndarray, probe_rows: Any, probe: np.ndarray,
                     layout: TraceLayout, *, losses: np.ndarray | None = None,
                     reference: Any = None) -> dict[str, Any] | None:
    """The divergence block of a run, or None when the spec has no stored reference.

    ``params`` (epochs+1, n_params) and ``probe`` (len(probe_rows), n_probe) are in the
    run's storage form; ``losses`` (epochs+1, 2) float64 is optional.  ``reference`` is
    a loaded ``StoredReference`` (default: the one stored for ``spec``).
    """
    from bnaudit.reference import store

    if reference is None:
        if not store.exists(spec):
            return None
        reference = store.load(spec)
    if reference.spec.hash != spec.hash:
        raise InputError(f"reference {reference.path} is of spec {reference.spec.short_hash}, not {spec.short_hash}")
    cap = bits.storage(storage).mantissa_bits
    probe_index = {int(r): i for i, r in enumerate(probe_rows)}
    rows = [int(r) for r in reference.rows if int(r) < params.shape[0] and int(r) in probe_index]
    ref_index = reference.row_index()
    series = series_for(spec, layout)
    values = {m: np.zeros((len(series), len(rows))) for m in METRICS}
    p_hi, p_lo = reference.section("params")
    a_hi, a_lo = reference.section("probe")
    for j, row in enumerate(rows):
        i = ref_index[row]
        for s, ser in enumerate(series):
            cols = ser["cols"]
            if ser["section"] == "params":
                m = measure(params[row, cols], p_hi[i, cols], p_lo[i, cols], storage)
            else:
                m = measure(probe[probe_index[row], cols], a_hi[i, cols], a_lo[i, cols], storage)
            for k in METRICS:
                values[k][s, j] = m[k]
    series_info = []
    for s, ser in enumerate(series):
        first, kept = half_bits_rows(values["correct_bits"][s], rows, cap)
        series_info.append(Series(layer=ser["layer"], kind=ser["kind"], what=ser["what"], half_bits_row=first,
                                  half_bits_kept_row=kept))
    loss_bits = None
    if losses is not None:
        l_hi, l_lo = reference.section("losses")
        lrows = [r for r in rows if r < losses.shape[0]]
        loss_bits = LossBits(
            rows=tuple(lrows),
            train=np.array([_loss_bits(losses[r, 0], l_hi[ref_index[r], 0], l_lo[ref_index[r], 0]) for r in lrows]),
            test=np.array([_loss_bits(losses[r, 1], l_hi[ref_index[r], 1], l_lo[ref_index[r], 1]) for r in lrows]))
    # Stored as float32/float16 (``blocks.ENCODING``): round here, so that the block in
    # memory is the block every reader of the file gets.
    stored = {k: values[k].astype(ENCODING[k]).astype(np.float64) for k in METRICS}
    return DivergenceBlock(
        storage=storage, precision_bits=cap, rows=tuple(rows), series=tuple(series_info), losses=loss_bits,
        reference={"spec_hash": reference.spec.hash, "digest": reference.digest, "epochs": reference.epochs,
                   "precision": reference.precision, "check_precision": reference.check_precision,
                   "agreement_digits_min": round(float(reference.agreement.min()), 2)},
        max_abs=stored["max_abs"], max_rel=stored["max_rel"], max_ulps=stored["max_ulps"],
        correct_bits=stored["correct_bits"]).to_json()


def from_record(rec: record.Record, *, reference: Any = None) -> dict[str, Any] | None:
    """``versus_reference`` for a loaded record folder."""
    return versus_reference(rec.spec, rec.storage, rec.arrays["params"], rec.meta["probe_rows"],
                            rec.arrays["probe"], rec.layout, losses=rec.arrays["losses"], reference=reference)


def attach(rec: record.Record) -> record.Record:
    """The record, its divergence from the stored reference in its fingerprint's ``extra`` if it lacks one.

    Records made before a reference was stored (or by a process that did not measure it)
    carry no ``extra["divergence"]``; the block is a function of the record's exact arrays
    and the reference, so it can be computed afterwards.  Unchanged without a reference.
    """
    if rec.fingerprint.divergence is not None:
        return rec
    block = from_record(rec)
    if block is None:
        return rec
    fp = dataclasses.replace(rec.fingerprint, extra={**rec.fingerprint.extra, "divergence": block},
                             divergence=DivergenceBlock.from_json(block, str(rec.path)))
    return dataclasses.replace(rec, fingerprint=fp)


def _loss_bits(run: float, hi: float, lo: float) -> float:
    err = abs((float(run) - hi) - lo)
    return round(correct_bits(err, abs(hi), 53), 1)


def half_bits_rows(bits_row: np.ndarray, rows: list[int], cap: int) -> tuple[int | None, int | None]:
    """(first row with fewer than cap/2 correct bits, first row from which it stays below)."""
    below = np.asarray(bits_row, dtype=np.float64) < cap / 2
    if not below.any():
        return None, None
    first = rows[int(np.argmax(below))]
    kept = None
    if below[-1]:
        above = np.flatnonzero(~below)
        kept = rows[int(above[-1]) + 1] if above.size else rows[0]
    return first, kept


def closer(a: DivergenceBlock, b: DivergenceBlock) -> dict[str, str] | None:
    """layer -> "a" | "b" | "tie": whose weights keep more correct bits at the last epoch row both measured.

    The one definition of "closer to exact arithmetic" that compare, matrix and the
    reports use; None when the two blocks share no row or no layer.
    """
    common = sorted(set(a.rows) & set(b.rows))
    if not common:
        return None
    ia, ib = a.rows.index(common[-1]), b.rows.index(common[-1])
    weights_b = {s.layer: k for k, s in enumerate(b.series) if s.what == "weights"}
    out = {}
    for k, s in enumerate(a.series):
        if s.what == "weights" and s.layer in weights_b:
            x, y = a.correct_bits[k, ia], b.correct_bits[weights_b[s.layer], ib]
            out[s.layer] = "tie" if x == y else ("a" if x > y else "b")
    return out or None
