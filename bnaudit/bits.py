"""Exact bit-level arithmetic on stored floats: storage formats and ulp distances.

A run stores its tensors in its own dtype.  numpy has no bfloat16, so bfloat16 values
travel as their uint16 bit patterns.  Ulp distances are computed on those bit patterns
in the run's dtype (never after converting to float64): map each pattern to an integer
that is monotone in the float's value, then subtract.  -0.0 and +0.0 map to the same
integer, so their distance is 0; NaN has no distance (reported as ``NAN_DISTANCE``).
Numpy only: comparison and reporting use this module, and must not need torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

NAN_DISTANCE = np.iinfo(np.int64).max
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Storage:
    """How a dtype's values are stored in .npy files and serialised as text."""

    name: str
    """The run dtype's name (float32, float64, bfloat16)."""
    numpy_dtype: str
    """numpy dtype of the stored array: the float itself, or its bit pattern for bfloat16."""
    bits_dtype: str
    """Unsigned integer dtype of the bit pattern."""
    mantissa_bits: int
    """Significand precision p in bits, the implicit bit included (24, 53, 8)."""


STORAGES = {
    "float32": Storage("float32", "<f4", "<u4", 24),
    "float64": Storage("float64", "<f8", "<u8", 53),
    "bfloat16": Storage("bfloat16", "<u2", "<u2", 8),
}


def storage(name: str) -> Storage:
    try:
        return STORAGES[name]
    except KeyError:
        raise ValueError(f"unknown storage dtype {name!r}") from None


def as_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """The bit patterns of stored values (a view, no copy)."""
    return np.ascontiguousarray(values).view(storage(dtype).bits_dtype)


def to_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float64 (exact: every float32 and bfloat16 value is a float64).

    A signalling NaN comes out quiet, with no warning: the cast is exact for every other
    value, and comparisons of NaNs go by their stored bits (``as_bits``), never by this.
    """
    with np.errstate(invalid="ignore"):
        if dtype == "bfloat16":
            wide = values.astype("<u4") << np.uint32(16)
            return wide.view("<f4").astype("<f8")
        return values.astype("<f8")


def from_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to nearest-even in ``dtype``, in that dtype's storage."""
    values = np.asarray(values, dtype="<f8")
    if dtype == "float64":
        return values.copy()
    if dtype == "float32":
        with np.errstate(over="ignore"):  # past float32's range: inf, the nearest-even result
            return values.astype("<f4")
    # bfloat16: round the float64 to float32 first would double-round; round directly.
    bits = values.view("<u8")
    sign = (bits >> np.uint64(63)).astype("<u2")
    out = np.empty(values.shape, dtype="<u2")
    finite = np.isfinite(values)
    mag = np.abs(values)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # Exponent of each value and the bfloat16 quantum at that exponent.
        _, exp = np.frexp(np.where(finite & (mag > 0), mag, 1.0))
        exp = np.maximum(exp - 1, -126)  # subnormals share the smallest normal exponent
        quantum = np.ldexp(1.0, exp - 7)
        rounded = np.round(mag / quantum) * quantum  # np.round is round-half-even; division exact
        f32 = rounded.astype("<f4")  # exact unless overflow, which gives inf as it should
        f32 = np.where(finite, f32, mag.astype("<f4"))
    hi = (f32.view("<u4") >> np.uint32(16)).astype("<u2")
    nan = np.isnan(values)
    out[...] = hi | (sign << np.uint16(15))
    out[nan] = 0x7FC0
    return out


def ordered(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Map bit patterns to int64 keys, monotone in value; +0 and -0 share key 0."""
    width = np.dtype(storage(dtype).bits_dtype).itemsize * 8
    u = bits.astype(np.uint64)
    sign_mask = np.uint64(1) << np.uint64(width - 1)
    mag = (u & (sign_mask - np.uint64(1))).astype(np.int64)
    negative = (u & sign_mask) != 0
    return np.where(negative, -mag, mag)


def is_nan_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    width = np.dtype(storage(dtype).bits_dtype).itemsize * 8
    mantissa = storage(dtype).mantissa_bits - 1
    u = bits.astype(np.uint64)
    exp_mask = ((np.uint64(1) << np.uint64(width - 1 - mantissa)) - np.uint64(1)) << np.uint64(mantissa)
    man_mask = (np.uint64(1) << np.uint64(mantissa)) - np.uint64(1)
    return ((u & exp_mask) == exp_mask) & ((u & man_mask) != 0)


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """Number of representable ``dtype`` values between a and b (int64; NaN -> NAN_DISTANCE).

    A float64 distance above 2^63 - 2 (values of opposite sign far from zero) saturates there.

    a and b are stored values (floats, or bfloat16 bit patterns).  Two NaNs are at
    distance 0 only if their bits are identical.
    """
    ba, bb = as_bits(a, dtype), as_bits(b, dtype)
    ka, kb = ordered(ba, dtype), ordered(bb, dtype)
    # Across zero a float64 distance can exceed 2^63: subtract in uint64 (exact, since the
    # true difference is below 2^64) and saturate just below the NaN marker.
    d = np.maximum(ka, kb).astype(np.uint64) - np.minimum(ka, kb).astype(np.uint64)
    dist = np.minimum(d, np.uint64(NAN_DISTANCE - 1)).astype(np.int64)
    nan_a, nan_b = is_nan_bits(ba, dtype), is_nan_bits(bb, dtype)
    either = nan_a | nan_b
    dist = np.where(either, np.where(nan_a & nan_b & (ba == bb), 0, NAN_DISTANCE), dist)
    return dist


def step_ulps(value: np.ndarray, ulps: int, dtype: str) -> np.ndarray:
    """Move stored values by ``ulps`` representable steps (positive: towards +inf)."""
    bits = as_bits(np.asarray(value), dtype)
    width = np.dtype(storage(dtype).bits_dtype).itemsize * 8
    key = ordered(bits, dtype) + ulps
    sign_mask = np.uint64(1) << np.uint64(width - 1)
    mag = np.abs(key).astype(np.uint64)
    out = np.where(key < 0, mag | sign_mask, mag).astype(storage(dtype).bits_dtype)
    return out.view(storage(dtype).numpy_dtype)


def to_hex(values: np.ndarray, dtype: str) -> list[str]:
    """Exact text form: the bit pattern of each value as fixed-width hex."""
    width = np.dtype(storage(dtype).bits_dtype).itemsize * 2
    return [format(int(v), f"0{width}x") for v in as_bits(np.asarray(values), dtype).ravel()]


def from_hex(items: list[str], dtype: str) -> np.ndarray:
    """Inverse of ``to_hex``; raises ValueError on anything malformed."""
    st = storage(dtype)
    width = np.dtype(st.bits_dtype).itemsize * 2
    if any(not isinstance(s, str) or len(s) != width or not _HEX.fullmatch(s) for s in items):
        raise ValueError(f"expected {width}-digit hex strings")
    ints = [int(s, 16) for s in items]
    return np.array(ints, dtype=st.bits_dtype).view(st.numpy_dtype)


def correct_bits_text(value: float) -> str:
    """A correct-bit count for people: rounded down to a tenth, so that a shown count never passes a
    threshold the count itself fails (10.97 shows as 10.9, not 11.0)."""
    return f"{math.floor(value * 10 + 1e-9) / 10:.1f}"
