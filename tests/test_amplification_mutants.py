"""Pure checks of bnaudit.amplification's edges: exact figures, error locations, defaults.

No torch and no real runs: windows of series worked by hand, the serialised forms of
``Window`` and ``Beside``, and ``small_limit`` on unusual arrays (NaN, inf, integers).
These pin what tests/test_amplification.py leaves loose (mutation/modules.toml lists both).
"""

from __future__ import annotations

import json
import math
import types
import warnings

import numpy as np
import pytest

from bnaudit import amplification
from bnaudit.amplification import Window
from bnaudit.errors import InputError

# --------------------------------------------------------------------------- fit


def test_a_window_with_a_zero_distance_keeps_its_bounds():
    assert amplification.fit([0, 1, 2], [0.0, None, 2.0], 0, 2) == Window(0, 2, None, None, None, None)
    assert amplification.fit([3, 4, 5, 6], [1.0, None, 2.0, 3.0], 4, 6) == Window(4, 6, None, None, None, None)
    # A zero distance outside the window does not matter.
    w = amplification.fit([0, 1, 2, 3], [None, 0.0, 1.0, 3.0], 1, 3)
    assert (w.start, w.end, w.rate) == (1, 3, 1.5)


def test_the_slope_of_a_window_away_from_row_0_and_from_ln_0():
    # rows 10..14, ln d = 3, 3, 7, 7, 7: mean row 12, mean ln 5.4;
    # slope = sum((x - 12)(y - 5.4)) / sum((x - 12)^2) = 12 / 10.
    w = amplification.fit(range(10, 15), [3.0, 3.0, 7.0, 7.0, 7.0], 10, 14)
    assert (w.start, w.end) == (10, 14)
    assert w.rate == pytest.approx(1.0)
    assert w.slope == pytest.approx(1.2)
    # Sub-windows at least (14 - 10 + 1) // 2 = 2 rows apart: (10,12) 2, (11,13) 2, (12,14) 0,
    # (10,13) 4/3, (11,14) 4/3, (10,14) 1: the extremes are both two rows long.
    assert w.low == pytest.approx(0.0, abs=1e-15) and w.high == pytest.approx(2.0)


def test_the_slope_is_exact_however_far_the_series_lies_from_0():
    # The same shape as 0, 1, 4, 5 (slope 1.8), shifted by 2^52: centring both rows and
    # values keeps every product exact, so the slope is unchanged.
    c = 2.0 ** 52
    w = amplification.fit([0, 1, 2, 3], [c, c + 1, c + 4, c + 5], 0, 3)
    assert w.slope == 1.8
    assert w.rate == pytest.approx(5 / 3) and w.low == pytest.approx(5 / 3) and w.high == 2.0
    # ... and the rows may lie far from 0 too.
    far = amplification.fit([1000, 1001, 1002, 1003], [-140.0, -139.0, -136.0, -135.0], 1000, 1003)
    assert far.slope == pytest.approx(1.8)


def test_a_two_epoch_window_ranges_over_its_one_epoch_sub_windows():
    # (2 - 0 + 1) // 2 = 1: every pair counts, (0,1) 1, (0,2) 1.5, (1,2) 2.
    w = amplification.fit([0, 1, 2], [0.0, 1.0, 3.0], 0, 2)
    assert (w.rate, w.low, w.high) == (1.5, 1.0, 2.0)
    assert w.slope == pytest.approx(1.5)


def test_sub_windows_are_at_least_half_the_window_s_rows_rounded_down():
    # rows 0..5 (6 rows): sub-windows at least 6 // 2 = 3 rows apart.
    ln = [0.0, 0.0, 0.0, 6.0, 6.0, 6.0]
    w = amplification.fit(range(6), ln, 0, 5)
    # (0,3) 2, (0,4) 1.5, (0,5) 1.2, (1,4) 2, (1,5) 1.5, (2,5) 2.
    assert (w.low, w.high) == (1.2, 2.0)
    # rows 0..4 (5 rows): at least 5 // 2 = 2 apart, so (0,2) 0 and (1,3) 3 count
    # (without them the range would be 1.5..2).
    v = amplification.fit(range(5), [0.0, 0.0, 0.0, 6.0, 6.0], 0, 4)
    assert (v.low, v.high) == (0.0, 3.0)


# --------------------------------------------------------------------------- window_of, observed


def test_a_difference_back_at_0_ends_the_window_before_it():
    assert amplification.window_of(range(5), [1e-8, 1e-7, 0.0, 1e-5, 1e-4], last=4) == (0, 1)
    assert amplification.window_of(range(5), [0.0, 1e-7, 1e-6, 0.0, 1e-4], last=4) == (1, 2)
    assert amplification.window_of(range(5), [1e-8, 0.0, 1e-6, 1e-5, 1e-4], last=4) is None


def test_observed_runs_to_the_last_row_unless_told_otherwise():
    values = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4]
    ln = [math.log(v) for v in values]
    assert amplification.observed(range(5), values) == amplification.fit(range(5), ln, 0, 4)
    assert amplification.observed(np.arange(5), np.array(values)) == amplification.fit(range(5), ln, 0, 4)
    assert amplification.observed(range(5), values, last=2) == amplification.fit(range(5), ln, 0, 2)
    assert amplification.observed(range(5), values, last=3, saturation=1) == amplification.fit(range(5), ln, 0, 1)
    assert amplification.observed(range(5), values, last=0) is None
    # Sparse rows: the default is the last row itself, not its index.
    assert amplification.observed([0, 2, 7], [1e-8, 1e-6, 1e-3]) == amplification.fit(
        [0, 2, 7], [math.log(1e-8), math.log(1e-6), math.log(1e-3)], 0, 7)


# --------------------------------------------------------------------------- beside


def _exact(log_overall, scale=7):
    return types.SimpleNamespace(rows=tuple(range(len(log_overall))), log_overall=tuple(log_overall),
                                 tensor="linear1.weight", index=(2, 3), scale=scale)


def test_beside_stops_where_the_exact_series_ends():
    exact = _exact([-140.0, -139.0, -137.0])  # rows 0..2 only
    b = amplification.beside(exact, range(5), [1e-8, 1e-7, 1e-6, 1e-5, 1e-4], initial=np.ones(2))
    assert (b.seen.start, b.seen.end) == (b.exact.start, b.exact.end) == (0, 2)
    assert b.exact.amplification == pytest.approx(3.0)
    assert b.seen.amplification == pytest.approx(2 * math.log(10))


def test_beside_serialises_every_field_under_its_name():
    exact = _exact([-140.0, -139.0, -137.0, -136.5])
    b = amplification.beside(exact, range(4), [1e-8, 1e-7, 1e-6, 1e-5], initial=np.ones(2))
    d = b.to_dict()
    assert set(d) == {"start", "end", "seen", "exact", "added_ln", "exact_perturbation"}
    assert (d["start"], d["end"]) == (0, 3)
    assert d["added_ln"] == b.added == pytest.approx(3 * math.log(10) - 3.5)
    assert d["seen"] == b.seen.to_dict() and d["exact"] == b.exact.to_dict()
    assert d["exact_perturbation"] == {"tensor": "linear1.weight", "index": [2, 3], "relative": "2^-7"}
    assert set(d["seen"]) == {"start", "end", "rate", "slope", "low", "high"}
    # A one-digit scale reads back too.
    back = amplification.beside_from_dict(json.loads(json.dumps(d)), "here")
    assert back == b and back.scale == 7 and back.index == (2, 3)


def _raw(scale=7):
    exact = _exact([-140.0, -139.0, -137.0, -136.5], scale=scale)
    b = amplification.beside(exact, range(4), [1e-8, 1e-7, 1e-6, 1e-5], initial=np.ones(2))
    return json.loads(json.dumps(b.to_dict()))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("seen"), "missing field 'seen'"),
    (lambda d: d.update(start="0"), "field 'start' has the wrong type"),
    (lambda d: d["seen"].update(extra=1), "malformed window"),
    (lambda d: d["exact"].update(extra=1), "malformed window"),
    (lambda d: d["seen"].update(end="3"), "field 'end' has the wrong type"),
    (lambda d: d["exact"].update(slope="steep"), "field 'slope' has the wrong type"),
    (lambda d: d["exact_perturbation"].pop("relative"), "missing field 'relative'"),
    (lambda d: d["exact_perturbation"].update(tensor=5), "field 'tensor' has the wrong type"),
    (lambda d: d["exact_perturbation"].update(relative="2^-x"), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact_perturbation"].update(relative="2^-x5"), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact_perturbation"].update(relative="3^-5"), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact_perturbation"].update(relative="2^-\u00b2"), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact_perturbation"].update(relative="2^-" + "9" * 5000), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact_perturbation"].update(relative="2^-5\n"), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact_perturbation"].update(relative="2^-"), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact"].update(start=1), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact"].update(end=2), "malformed exact-arithmetic comparison"),
    (lambda d: d["seen"].update(end=2), "malformed exact-arithmetic comparison"),
])
def test_a_malformed_beside_names_where_it_came_from(edit, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(InputError, match="^here: " + message):
        amplification.beside_from_dict(raw, "here")


# --------------------------------------------------------------------------- window_from_dict


def test_a_window_without_figures_reads_back():
    for w in (Window(0, 2, None, None, None, None), Window(1, 3, 0.5, None, 0.25, None),
              Window(0, 1, 2.0, 2.0, None, None)):
        assert amplification.window_from_dict(json.loads(json.dumps(w.to_dict())), "here") == w


@pytest.mark.parametrize("raw, message", [
    ({"start": "0", "end": 2, "rate": None, "slope": None, "low": None, "high": None},
     "field 'start' has the wrong type"),
    ({"start": 0, "end": None, "rate": None, "slope": None, "low": None, "high": None},
     "field 'end' has the wrong type"),
    ({"start": -1, "end": 2, "rate": None, "slope": None, "low": None, "high": None},
     "field 'start' is out of range"),
    ({"start": 0, "end": 2, "rate": "fast", "slope": None, "low": None, "high": None},
     "field 'rate' has the wrong type"),
    ({"start": 0, "end": 2, "rate": None, "slope": None, "low": None, "high": math.inf},
     "field 'high' is not finite"),
    ({"start": 2, "end": 2, "rate": None, "slope": None, "low": None, "high": None},
     "a window must end after it starts"),
    ({"start": 0, "end": 2}, "malformed window"),
    ([0, 2], "malformed window"),
])
def test_a_malformed_window_names_where_it_came_from(raw, message):
    with pytest.raises(InputError, match="^here: " + message):
        amplification.window_from_dict(raw, "here")


# --------------------------------------------------------------------------- small_limit


def test_no_difference_is_small_against_an_infinite_or_all_nan_initial_parameter():
    assert amplification.small_limit(np.array([math.inf, 1.0])) == 0.0
    assert amplification.small_limit(np.array([-math.inf])) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "All-NaN slice encountered"
        assert amplification.small_limit(np.array([math.nan, math.nan])) == 0.0


def test_small_limit_reads_values_of_any_dtype_as_float64():
    assert amplification.small_limit(np.array([-128, 1], dtype=np.int8)) == pytest.approx(0.128)
    assert amplification.small_limit(np.array([np.iinfo(np.int64).min, 1], dtype=np.int64)) == \
        pytest.approx(1e-3 * 2.0 ** 63)
    assert amplification.small_limit(np.array([0.5, -2.0], dtype=np.float16)) == 2e-3
    assert amplification.small_limit(np.array([0.5, -0.25], dtype=np.float32)) == 5e-4
    assert amplification.small_limit([0.5, -4.0]) == 4e-3


def test_a_signalling_nan_initial_parameter_is_skipped_without_a_warning():
    snan = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    initial = np.concatenate([snan, np.array([0.5, -0.25], dtype=np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert amplification.small_limit(initial) == 5e-4
