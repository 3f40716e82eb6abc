"""Exact bit helpers: ulp distances in the run's dtype, bfloat16 rounding, hex round trips."""

from __future__ import annotations

import warnings

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


# --------------------------------------------------------------------------- pinned edge cases
#
# Every expected value below is written out (hex bit patterns, exact binary fractions), never
# computed by bnaudit.bits itself.

def _f32(*patterns: int) -> np.ndarray:
    return np.array(patterns, "<u4").view("<f4")


def _f64(*patterns: int) -> np.ndarray:
    return np.array(patterns, "<u8").view("<f8")


@pytest.mark.parametrize("dtype, a, b", [
    ("float32", _f32(0x7FC00000), _f32(0x7FC00001)),                        # two quiet NaNs, payloads differ
    ("float32", _f32(0x7FC00000), _f32(0xFFC00000)),                        # NaN and -NaN
    ("float32", _f32(0x7F800001), _f32(0x7FC00000)),                        # signalling and quiet NaN
    ("float64", _f64(0x7FF8000000000000), _f64(0x7FF8000000000001)),
    ("bfloat16", np.array([0x7FC0], "<u2"), np.array([0x7FC1], "<u2")),
    ("bfloat16", np.array([0x7FC0], "<u2"), np.array([0xFF81], "<u2")),
])
def test_two_different_nans_are_never_at_distance_zero(dtype, a, b):
    """``ulps:N`` would otherwise pass a run whose NaN changed into another NaN."""
    assert bits.ulp_distance(a, b, dtype)[0] == bits.NAN_DISTANCE, "different NaN bit patterns must differ"
    assert bits.ulp_distance(b, a, dtype)[0] == bits.NAN_DISTANCE, "different NaN bit patterns must differ"
    assert bits.ulp_distance(a, a, dtype)[0] == 0, "a NaN is at distance 0 from its own bits"
    assert bits.ulp_distance(b, b, dtype)[0] == 0, "a NaN is at distance 0 from its own bits"


def test_nan_bits_are_told_from_infinities_and_numbers():
    f32 = np.array([0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x3F800000, 0x00000001], "<u4")
    assert bits.is_nan_bits(f32, "float32").tolist() == [False, False, True, True, True, False, False]
    bf16 = np.array([0x7F80, 0xFF80, 0x7F81, 0xFFC0, 0x0001, 0x7F7F], "<u2")
    assert bits.is_nan_bits(bf16, "bfloat16").tolist() == [False, False, True, True, False, False]
    f64 = np.array([0x7FF0000000000000, 0x7FF0000000000001, 0xFFF8000000000000, 0x7FEFFFFFFFFFFFFF], "<u8")
    assert bits.is_nan_bits(f64, "float64").tolist() == [False, True, True, False]
    # an infinity is a number to ulp_distance: one step above the largest finite value
    assert bits.ulp_distance(_f32(0x7F800000), _f32(0x7F7FFFFF), "float32")[0] == 1
    assert bits.ulp_distance(_f32(0x7F800000), _f32(0x7FC00000), "float32")[0] == bits.NAN_DISTANCE


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_float32_distance_of_any_two_bit_patterns_nans_included(x, y):
    a, b = np.array([x], "<u4").view("<f4"), np.array([y], "<u4").view("<f4")
    d = int(bits.ulp_distance(a, b, "float32")[0])
    nan = [(p & 0x7F800000) == 0x7F800000 and (p & 0x007FFFFF) != 0 for p in (x, y)]
    if any(nan):
        assert d == (0 if x == y else bits.NAN_DISTANCE), (hex(x), hex(y), d)
    else:
        key = [-(p & 0x7FFFFFFF) if p >> 31 else p for p in (x, y)]
        assert d == abs(key[0] - key[1]), (hex(x), hex(y), d)


@pytest.mark.parametrize("value, pattern", [
    (2.0**-133, 0x0001),                    # the smallest bfloat16 subnormal
    (1.5 * 2.0**-133, 0x0002),              # a tie between subnormals: to even
    (2.5 * 2.0**-133, 0x0002),
    (3.5 * 2.0**-133, 0x0004),
    (0.75 * 2.0**-133, 0x0001),
    (0.5 * 2.0**-133, 0x0000),              # half the smallest subnormal: to even, zero
    (0.25 * 2.0**-133, 0x0000),
    (-1.5 * 2.0**-133, 0x8002),
    (2.0**-127 + 2.0**-135, 0x0040),        # a subnormal whose float32 rounding would differ
    (2.0**-126 - 2.0**-133, 0x007F),        # the largest subnormal
    (2.0**-126, 0x0080),                    # the smallest normal
    (1.0 + 2.0**-8, 0x3F80),                # a tie between normals: to even
    (1.0 + 3 * 2.0**-8, 0x3F82),
    ((2 - 2.0**-7) * 2.0**127, 0x7F7F),     # the largest finite value
    ((2 - 2.0**-8) * 2.0**127, 0x7F80),     # halfway to the next power of two: overflows to inf
    (1e300, 0x7F80),
    (-1e300, 0xFF80),
    (float("inf"), 0x7F80),
    (float("-inf"), 0xFF80),
    (float("nan"), 0x7FC0),
    (-0.0, 0x8000),
])
def test_bfloat16_rounding_pinned(value, pattern):
    got = bits.from_float64(np.array([value]), "bfloat16")
    assert got.dtype == np.dtype("<u2") and int(got[0]) == pattern, f"{value!r}: {int(got[0]):#06x} != {pattern:#06x}"


def test_bfloat16_rounding_of_huge_values_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in the cast must stay silent: inf is the answer
        got = bits.from_float64(np.array([1e300, -1e300, np.inf, np.nan, 0.0]), "bfloat16")
    assert got.tolist() == [0x7F80, 0xFF80, 0x7F80, 0x7FC0, 0x0000]


@pytest.mark.parametrize("dtype, want", [
    ("float32", _f32(0x3FC00000, 0xC0000000, 0x00000001)),
    ("float64", np.array([1.5, -2.0, 2.0**-149])),
    ("bfloat16", np.array([0x3FC0, 0xC000, 0x0000], "<u2")),
])
def test_from_float64_takes_any_float_input_and_returns_the_storage_dtype(dtype, want):
    for given_values in (np.array([1.5, -2.0, 2.0**-149], "<f4"), np.array([1.5, -2.0, 2.0**-149]),
                         [1.5, -2.0, 2.0**-149]):
        got = bits.from_float64(given_values, dtype)
        assert got.dtype == np.dtype(bits.storage(dtype).numpy_dtype), f"{dtype}: stored as {got.dtype}"
        assert got.tobytes() == want.tobytes(), f"{dtype}: {got!r}"


def test_from_float64_rounds_float32_to_nearest_even():
    got = bits.from_float64(np.array([1.0 + 2.0**-24, 1.0 + 3 * 2.0**-24, 2.0**-150, 3 * 2.0**-150]), "float32")
    assert got.view("<u4").tolist() == [0x3F800000, 0x3F800002, 0x00000000, 0x00000002]


@pytest.mark.parametrize("dtype, stored", [
    ("float32", _f32(0x3F800001, 0x80000001, 0x7F800000)),
    ("float64", _f64(0x3FF0000000000001, 0x8000000000000001, 0xFFF0000000000000)),
])
def test_to_float64_of_float32_and_float64_is_exact_and_float64(dtype, stored):
    got = bits.to_float64(stored, dtype)
    assert got.dtype == np.dtype("<f8"), f"{dtype}: {got.dtype}"
    want = {"float32": [1.0 + 2.0**-23, -(2.0**-149), float("inf")],
            "float64": [1.0 + 2.0**-52, -5e-324, float("-inf")]}[dtype]
    assert got.tolist() == want


@pytest.mark.parametrize("dtype, stored", [
    ("float32", _f32(0x7F810000, 0xFF800001)),
    ("bfloat16", np.array([0x7F81, 0xFF81], "<u2")),
])
def test_to_float64_quiets_a_signalling_nan_without_a_warning(dtype, stored):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = bits.to_float64(stored, dtype)
    assert np.isnan(got).all(), f"{dtype}: {got}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_from_float64_rounds_past_the_range_to_infinity_without_a_warning(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = bits.to_float64(bits.from_float64(np.array([1e39, -1e39, 1.0]), dtype), dtype)
    assert got.tolist() == [float("inf"), float("-inf"), 1.0]


def test_ordered_keys_and_steps_across_zero():
    f32 = np.array([0x80000000, 0x00000000, 0x80000001, 0x00000001, 0x3F800000, 0xBF800000], "<u4")
    assert bits.ordered(f32, "float32").tolist() == [0, 0, -1, 1, 0x3F800000, -0x3F800000]
    assert bits.ordered(np.array([0x8001, 0x7F80], "<u2"), "bfloat16").tolist() == [-1, 0x7F80]
    assert bits.step_ulps(_f32(0x00000000), -1, "float32").view("<u4").tolist() == [0x80000001]
    assert bits.step_ulps(_f32(0x80000000), 1, "float32").view("<u4").tolist() == [0x00000001]
    assert bits.step_ulps(_f32(0x00000001), -2, "float32").view("<u4").tolist() == [0x80000001]
    # a step that lands on zero lands on +0, from either side
    assert bits.step_ulps(_f32(0x00000001, 0x80000001), 0, "float32").view("<u4").tolist() == [1, 0x80000001]
    assert bits.step_ulps(_f32(0x00000001), -1, "float32").view("<u4").tolist() == [0x00000000]
    assert bits.step_ulps(_f32(0x80000001), 1, "float32").view("<u4").tolist() == [0x00000000]
    assert bits.step_ulps(_f32(0x7F7FFFFF), 1, "float32").view("<u4").tolist() == [0x7F800000]
    assert bits.step_ulps(_f64(0x3FF0000000000000), -1, "float64").view("<u8").tolist() == [0x3FEFFFFFFFFFFFFF]
    moved = bits.step_ulps(np.array([0x3F80, 0x0000], "<u2"), 3, "bfloat16")
    assert moved.dtype == np.dtype("<u2") and moved.tolist() == [0x3F83, 0x0003]


def test_hex_text_is_pinned_and_strict():
    assert bits.to_hex(np.array([1.0, -0.0], "<f4"), "float32") == ["3f800000", "80000000"]
    assert bits.to_hex(np.array([-0.0]), "float64") == ["8000000000000000"]
    assert bits.to_hex(np.array([0x3F80, 0x0001], "<u2"), "bfloat16") == ["3f80", "0001"]
    back = bits.from_hex(["3f80", "ff80"], "bfloat16")
    assert back.dtype == np.dtype("<u2") and back.tolist() == [0x3F80, 0xFF80]
    assert bits.from_hex(["3ff8000000000000"], "float64").tolist() == [1.5]
    for bad in (["3f8"], ["3f800"], ["3F80"], [" 3f8"], ["+3f8"], [0x3F80], ["3f80", "xyz!"]):
        with pytest.raises(ValueError, match="expected 4-digit hex strings"):
            bits.from_hex(bad, "bfloat16")


def test_bit_views_of_strided_arrays_and_unknown_dtypes():
    values = np.array([1.0, 2.0, -1.0, 4.0], "<f4")[::2]  # not contiguous
    assert bits.as_bits(values, "float32").tolist() == [0x3F800000, 0xBF800000]
    assert bits.to_hex(values, "float32") == ["3f800000", "bf800000"]
    with pytest.raises(ValueError, match="unknown storage dtype 'float16'"):
        bits.storage("float16")
    assert bits.storage("bfloat16") == bits.Storage("bfloat16", "<u2", "<u2", 8)
