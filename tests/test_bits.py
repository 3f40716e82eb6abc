"""Exact bit helpers: ulp distances in the run's dtype, bfloat16 rounding, hex round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnaudit import bits


def test_pinned_ulp_distances():
    one = np.array([1.0], "<f4")
    assert bits.ulp_distance(one, np.nextafter(one, np.float32(2)), "float32")[0] == 1
    # +0 and -0 are the same value: distance 0; the smallest subnormals straddle them.
    assert bits.ulp_distance(np.array([0.0], "<f8"), np.array([-0.0], "<f8"), "float64")[0] == 0
    tiny = np.array([np.float32(1e-45)], "<f4")
    assert bits.ulp_distance(tiny, -tiny, "float32")[0] == 2
    inf = np.array([np.inf], "<f4")
    maxf = np.array([np.finfo(np.float32).max], "<f4")
    assert bits.ulp_distance(inf, maxf, "float32")[0] == 1
    nan = np.array([np.nan], "<f4")
    assert bits.ulp_distance(nan, one, "float32")[0] == bits.NAN_DISTANCE
    assert bits.ulp_distance(nan, nan, "float32")[0] == 0


@given(st.floats(width=32, allow_nan=False), st.floats(width=32, allow_nan=False))
def test_ulp_distance_is_symmetric_and_zero_only_for_equal_values(x, y):
    a, b = np.array([x], "<f4"), np.array([y], "<f4")
    d = bits.ulp_distance(a, b, "float32")[0]
    assert d == bits.ulp_distance(b, a, "float32")[0]
    assert (d == 0) == (x == y)


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.integers(-1000, 1000))
def test_step_ulps_moves_by_exactly_that_many_ulps(x, n):
    a = np.array([x], "<f4")
    moved = bits.step_ulps(a, n, "float32")
    if np.isfinite(moved[0]):
        assert bits.ulp_distance(a, moved, "float32")[0] == abs(n)


@given(st.floats(allow_nan=False, allow_infinity=True))
def test_bfloat16_rounding_matches_torch(x):
    ours = bits.from_float64(np.array([x]), "bfloat16")[0]
    theirs = torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")[0]
    if x == 0:
        assert ours & 0x7FFF == 0 == theirs & 0x7FFF
    else:
        assert ours == theirs, (x, hex(ours), hex(theirs))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_hex_round_trip(dtype):
    values = bits.from_float64(np.array([1.5, -0.0, 3e-39, np.inf, -2.75e10]), dtype)
    again = bits.from_hex(bits.to_hex(values, dtype), dtype)
    assert again.tobytes() == values.tobytes()
    with pytest.raises(ValueError):
        bits.from_hex(["xyz"], dtype)


def test_to_float64_is_exact_for_bfloat16():
    b = np.array([0x3F81, 0xC2F7, 0x0001], "<u2")
    assert bits.to_float64(b, "bfloat16").tolist() == [1.0078125, -123.5, 2.0**-133]


@pytest.mark.parametrize("dtype, a, b, want", [
    ("float64", 2.0, -2.0, bits.NAN_DISTANCE - 1),  # 2^63 apart: saturates, never wraps negative
    ("float64", 5e-324, -5e-324, 2),
    ("float64", 1.0, -1.0, 2 * 0x3FF0000000000000),
    ("bfloat16", 1.0, -1.0, 2 * 0x3F80),
])
def test_opposite_signs_never_overflow(dtype, a, b, want):
    x, y = bits.from_float64(np.array([a]), dtype), bits.from_float64(np.array([b]), dtype)
    assert bits.ulp_distance(x, y, dtype)[0] == want
    assert bits.ulp_distance(y, x, dtype)[0] == want


@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_float64_ulp_distance_is_symmetric_nonnegative_and_zero_only_for_equal(x, y):
    a, b = np.array([x]), np.array([y])
    d = bits.ulp_distance(a, b, "float64")[0]
    assert d >= 0 and d == bits.ulp_distance(b, a, "float64")[0]
    assert (d == 0) == (x == y)
