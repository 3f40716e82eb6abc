"""Growth windows and the exact sensitivity beside every measured divergence.

Windows and their arithmetic are checked against numbers worked by hand; the stored
sensitivity against a fresh run of the real mpmath engine; the beside figures on real
3-epoch runs (a --perturb run and its twin: a difference every host has) against the
shipped sensitivity's own windows, through the real CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

from bnaudit import amplification, compare, frozen, record
from bnaudit.errors import InputError
from bnaudit.reference import sensitivity
from bnaudit.spec import default_spec, load_spec

# --------------------------------------------------------------------------- windows


def test_a_window_has_its_endpoint_rate_its_slope_and_the_range_of_its_sub_windows():
    # ln d = 0, 1, 4, 5 at rows 0..3: end to end 5/3; slope over x = 0..3 is 1.8;
    # sub-windows at least 2 rows apart: (0,2) 2, (0,3) 5/3, (1,3) 2.
    w = amplification.fit([0, 1, 2, 3], [0.0, 1.0, 4.0, 5.0], 0, 3)
    assert (w.start, w.end) == (0, 3)
    assert w.rate == pytest.approx(5 / 3) and w.slope == pytest.approx(1.8)
    assert w.low == pytest.approx(5 / 3) and w.high == pytest.approx(2.0)
    assert w.amplification == pytest.approx(5.0)


def test_a_window_of_a_sparse_series_uses_the_rows_it_has():
    # rows 0, 2, 10: end to end (7 - 1) / 10; sub-windows 5+ apart: (0,10) and (2,10) only.
    w = amplification.fit([0, 2, 10], [1.0, 3.0, 7.0], 0, 10)
    assert w.rate == pytest.approx(0.6)
    assert w.low == pytest.approx(0.5) and w.high == pytest.approx(0.6)
    one = amplification.fit([0, 1], [0.0, 2.0], 0, 1)
    assert one.rate == one.slope == 2.0 and one.low is None and one.high is None  # one sub-window: no range


def test_a_zero_distance_inside_a_window_leaves_it_unmeasured_and_bad_bounds_are_refused():
    w = amplification.fit([0, 1, 2], [0.0, None, 2.0], 0, 2)
    assert (w.rate, w.slope, w.low, w.high) == (None, None, None, None) and w.amplification is None
    for start, end in ((2, 2), (0, 3), (1, 0)):
        with pytest.raises(ValueError, match=r"is not a window of rows 0\.\.2"):
            amplification.fit([0, 1, 2], [0.0, 1.0, 2.0], start, end)


@pytest.mark.parametrize("values, last, saturation, limit, expected", [
    ([0, 1e-7, 1e-6, 1e-5, 1e-4], 4, None, 1.0, (1, 4)),     # starts where the runs first differ
    ([1e-8, 1e-7, 1e-6, 1e-5, 1e-4], 4, 2, 1.0, (0, 2)),     # ends at saturation
    ([1e-8, 1e-7, 1e-6, 1e-5, 1e-4], 3, None, 1.0, (0, 3)),  # ... or where the exact series ends
    ([1e-8, 1e-7, math.inf, 1e-5, 1e-4], 4, None, 1.0, (0, 1)),  # ... or before a NaN on one side
    ([1e-8, 1e-7, 1e-6, 1e-2, 1e-1], 4, None, 1e-3, (0, 2)),  # ... or before the difference is large
    ([1e-8, 1e-7, 1e-6, 1e-3, 1e-1], 4, None, 1e-3, (0, 3)),  # (the limit itself is still small)
    ([0, 0, 0, 1e-5, 0], 4, None, 1.0, None),                # one row: no window
    ([0, 0, 0, 0, 0], 4, None, 1.0, None),
])
def test_the_window_to_compare_over(values, last, saturation, limit, expected):
    assert amplification.window_of(range(5), values, last=last, saturation=saturation, limit=limit) == expected


def test_a_small_difference_is_measured_against_the_largest_initial_parameter():
    assert amplification.small_limit(np.array([0.25, -2.0, 1.0])) == 2e-3
    assert amplification.small_limit(np.array([0.0, 0.0])) == 0.0 == amplification.small_limit(np.zeros(0))
    assert amplification.small_limit(np.array([np.nan, 0.5])) == 5e-4


# --------------------------------------------------------------------------- beside

def _sensitivity(log_overall, spec_hash="s" * 64):
    rows = tuple(range(len(log_overall)))
    return sensitivity.Sensitivity(spec_hash=spec_hash, tensor="linear1.weight", index=(0, 0), scale=200,
                                   precision=512, rows=rows, layers=("linear1",),
                                   log_distance=tuple((v,) for v in log_overall), log_overall=tuple(log_overall),
                                   seconds=0.0)


def test_beside_is_what_float_rounding_adds_to_the_exact_amplification():
    exact = _sensitivity([-140.0, -139.0, -138.5, -137.0, -136.0])
    seen = np.array([0.0, 1e-7, 1e-6, 1e-4, 1e-3])
    b = amplification.beside(exact, range(5), seen, saturation=3, initial=np.ones(3))
    assert (b.seen.start, b.seen.end) == (b.exact.start, b.exact.end) == (1, 3)
    assert b.exact.amplification == pytest.approx(2.0)              # -137 - (-139)
    assert b.seen.amplification == pytest.approx(3 * math.log(10))  # 1e-7 -> 1e-4
    assert b.added == pytest.approx(3 * math.log(10) - 2.0)
    assert amplification.beside_from_dict(json.loads(json.dumps(b.to_dict())), "x") == b
    assert amplification.beside(exact, range(5), np.array([0, 0, 0, 0, 1e-3]), initial=np.ones(3)) is None
    # 1e-4 is more than 1e-3 of initial parameters of at most 0.01: the window stops at row 2.
    small = amplification.beside(exact, range(5), seen, saturation=3, initial=np.full(3, 0.01))
    assert (small.seen.start, small.seen.end) == (1, 2)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["seen"].update(start=2), "malformed exact-arithmetic comparison"),
    (lambda d: d.update(end=9), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact_perturbation"].update(relative="tiny"), "malformed exact-arithmetic comparison"),
    (lambda d: d["exact"].update(rate="fast"), "field 'rate' has the wrong type"),
    (lambda d: d["exact"].update(extra=1), "malformed window"),
    (lambda d: d["seen"].update(start=3, end=3), "a window must end after it starts"),
    (lambda d: d.pop("exact"), "missing field 'exact'"),
])
def test_a_malformed_beside_is_refused(edit, message):
    b = amplification.beside(_sensitivity([-140.0, -139.0, -138.0, -137.0]), range(4), [1e-8, 1e-7, 1e-6, 1e-5],
                             initial=np.ones(1))
    raw = json.loads(json.dumps(b.to_dict()))
    edit(raw)
    with pytest.raises(InputError, match=message):
        amplification.beside_from_dict(raw, "comparison JSON: exact")


# --------------------------------------------------------------------------- the stored sensitivity

def test_the_shipped_sensitivity_covers_the_whole_default_run_and_its_first_rows_are_recomputed_bit_for_bit():
    """The shipped file is what the real engine gives: rows 0..3 recomputed here, every float equal."""
    spec = default_spec()
    shipped = sensitivity.stored(spec)
    assert shipped is not None and shipped.rows == tuple(range(spec.train.epochs + 1))
    assert (shipped.tensor, shipped.index, shipped.scale, shipped.precision) == ("linear1.weight", (0, 0), 200, 512)
    fresh = sensitivity.measure(spec, frozen.load(spec), epochs=3)
    assert shipped.log_overall[:4] == fresh.log_overall
    assert shipped.log_distance[:4] == fresh.log_distance
    # The independently measured exact growth (issue 14): about 1.15 ln per epoch over rows 0..7.
    w = shipped.window(0, 7)
    assert w.rate == pytest.approx(1.15, abs=0.01) and w.low < 1.15 < w.high


def test_save_and_stored_round_trip_and_a_missing_file_is_none(tmp_path):
    spec = default_spec()
    s = _sensitivity([-140.0, -139.0, -137.5], spec_hash=spec.hash)
    s = dataclasses.replace(s, layers=sensitivity.stored(spec).layers,
                            log_distance=tuple((v,) + (None,) * 10 for v in s.log_overall))
    path = tmp_path / "s.json"
    sensitivity.save(s, [(0, 2)], path)
    assert sensitivity.stored(spec, path) == s
    assert not list(tmp_path.glob(".s.json.partial-*"))
    assert sensitivity.stored(spec, tmp_path / "absent.json") is None


def _shipped_document():
    return json.loads(sensitivity.path_for(default_spec()).read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema="bnaudit.sensitivity/9"), "not a bnaudit.sensitivity/1 document"),
    (lambda d: d.update(spec_hash="0" * 64), "measured for another experiment"),
    (lambda d: d["perturbation"].update(tensor="linear9.weight"), "not a parameter of the spec"),
    (lambda d: d["perturbation"].update(index=[16, 0]), "not a parameter of the spec"),
    (lambda d: d["perturbation"].update(relative="2^-5"), "perturbation.relative is not 2^-N"),
    (lambda d: d.update(precision_bits=250), "field 'precision_bits' is out of range"),
    (lambda d: d.update(rows=d["rows"][1:]), "rows are not 0..N"),
    (lambda d: d.update(layers=d["layers"][::-1]), "layers are not the spec's"),
    (lambda d: d["log_overall"].__setitem__(3, "nan"), "a distance is not a finite number"),
    (lambda d: d["log_distance"][2].__setitem__(0, True), "a distance is not a finite number"),
    (lambda d: d["log_distance"].pop(), "do not match its rows and layers"),
    (lambda d: d.pop("log_overall"), "missing field 'log_overall'"),
])
def test_an_edited_or_foreign_sensitivity_is_one_clear_error(tmp_path, edit, message):
    doc = _shipped_document()
    edit(doc)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=re.escape(message)):
        sensitivity.stored(default_spec(), path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_in_place_of_the_sensitivity_is_refused_without_blocking(tmp_path):
    path = tmp_path / "s.json"
    os.mkfifo(path)
    with pytest.raises(InputError, match="not a regular file"):
        sensitivity.stored(default_spec(), path)


# --------------------------------------------------------------------------- beside every comparison

def test_compare_sets_a_perturbation_beside_exact_arithmetic(compare_runs, cli):
    """The --perturb pair (it parts on every host) against the shipped sensitivity over the same rows."""
    code, out, err = cli("compare", str(compare_runs["t1"]), str(compare_runs["perturb"]), "--json")
    assert code == 1, err
    pair = json.loads(out)["pair"]
    exact, window = pair["exact"], pair["growth_window"]
    shipped = sensitivity.stored(default_spec())
    start, end = exact["start"], exact["end"]
    assert start == 0 and end >= 1  # a perturbation differs from row 0 on
    assert exact["exact"] == shipped.window(start, end).to_dict()
    rows = pair["divergence"]["rows"]
    overall = np.max(np.array(pair["divergence"]["max_abs"], dtype=np.float64), axis=1)
    assert exact["seen"] == amplification.fit(rows, list(np.log(overall)), start, end).to_dict()
    assert exact["added_ln"] == pytest.approx(
        (exact["seen"]["rate"] - exact["exact"]["rate"]) * (end - start), rel=1e-12)
    # Three epochs stay small (far below 1e-3 of the largest initial parameter): the window beside
    # is the whole growing phase.
    assert window == exact["seen"]
    fp = record.load(compare_runs["t1"])
    assert max(overall[: end + 1]) <= amplification.small_limit(fp.keyframes[0])
    code, out, err = cli("compare", str(compare_runs["t1"]), str(compare_runs["perturb"]))
    assert "exact arithmetic (mpmath, linear1.weight[0,0] moved by 2^-200) grows a difference" in out
    assert "float32 rounding adds e^" in out or "less than exact arithmetic does" in out
    code, md, err = cli("compare", str(compare_runs["t1"]), str(compare_runs["perturb"]), "--markdown")
    assert "exact arithmetic (mpmath, linear1.weight\\[0,0\\] moved by 2^-200)" in md or \
        "exact arithmetic (mpmath, linear1.weight[0,0] moved by 2^-200)" in md


def test_compare_says_when_no_sensitivity_is_stored_for_the_experiment(compare_runs):
    """Without a stored sensitivity there is nothing beside the growth, and compare says how to measure it."""
    from bnaudit.report import compare_view

    assert sensitivity.stored(record.load(compare_runs["nobn"]).spec) is None  # no-BN: nothing shipped
    pc = compare.compare_pair(record.load(compare_runs["t1"]), record.load(compare_runs["perturb"]))
    assert pc.exact is None and pc.growth_window is not None
    line = compare_view.exact_line(pc)
    assert line is not None and "no sensitivity measured for this experiment" in line
    assert "`bnaudit reference sensitivity --save`" in line
    other = sensitivity.Sensitivity(**{**dataclasses.asdict(sensitivity.stored(default_spec())),
                                       "spec_hash": "0" * 64})
    assert compare.compare_pair(record.load(compare_runs["t1"]), record.load(compare_runs["perturb"]),
                                exact=other).exact is None  # another experiment's is never used


def test_a_custom_spec_measured_with_save_is_set_beside_its_runs(tmp_path, make_run, cli, bnaudit_cache):
    """`reference sensitivity --save` for a custom spec writes into the cache, and compare finds it."""
    path = tmp_path / "nobn.toml"
    path.write_text("[model]\nbatchnorm = false\n[train]\nepochs = 40\n")
    spec = load_spec(path)
    code, out, err = cli("reference", "sensitivity", "--spec", str(path), "--epochs", "3", "--save")
    assert code == 0, err
    saved = sensitivity.path_for(spec)
    assert saved.is_file() and saved.parent == bnaudit_cache / "sensitivity" and f"saved {saved}" in out
    base = make_run(3, spec_path=path)
    moved = make_run(3, spec_path=path, perturb="linear1.weight[0,0]:1")
    code, out, err = cli("compare", str(base), str(moved), "--json")
    assert code == 1, err
    exact = json.loads(out)["pair"]["exact"]
    assert exact["exact"] == sensitivity.stored(spec).window(exact["start"], exact["end"]).to_dict()
    code, out, err = cli("run", "--spec", str(path), "--epochs", "3", "--perturb", "linear1.weight[0,0]:1",
                         "--audit-every", "0", "--out", str(tmp_path / "p"), "--json")
    assert code == 0, err
    assert json.loads(out)["exact"]["exact"]["start"] == 0


def test_a_corrupt_stored_sensitivity_stops_a_perturb_run_before_it_starts(tmp_path, cli, bnaudit_cache):
    path = tmp_path / "spec.toml"
    path.write_text("[model]\nbatchnorm = false\n[train]\nepochs = 41\n")
    spec = load_spec(path)
    target = sensitivity.path_for(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("{not json")
    code, out, err = cli("run", "--spec", str(path), "--epochs", "2", "--perturb", "linear1.weight[0,0]:1",
                         "--out", str(tmp_path / "run"))
    assert code == 3 and not (tmp_path / "run").exists()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(target) in lines[0] and "Traceback" not in err


def test_the_report_sets_the_perturbation_beside_exact_arithmetic(compare_runs, tmp_path):
    from bnaudit.report import build, figures, tables

    rep = build.build_report([compare_runs["t1"], compare_runs["perturb"]])
    (pair,) = [p for p in rep.pairs if p.kind == "perturb"]
    b = pair.exact
    assert b is not None and b.exact == sensitivity.stored(default_spec()).window(b.seen.start, b.seen.end)
    headers, rows = tables.pair_table(rep)
    (row,) = [r for r in rows if r[1] == "1-ulp baseline"]
    assert row[headers.index("beyond exact arithmetic")] == f"x{math.exp(b.added):.3g} over epochs 1-{b.seen.end}"
    assert rep.exact_rows is not None and list(rep.exact_rows) == list(range(1001))
    (info,) = figures.growth_figures(rep, tmp_path)
    assert "The dotted grey lines are exact arithmetic" in info.caption and (tmp_path / "growth.png").is_file()


def test_a_bfloat16_pair_is_small_against_the_values_of_its_parameters_not_their_bit_patterns(make_run):
    """bfloat16 parameters are stored as uint16 bit patterns; "small" is measured on their values.

    One bfloat16 ulp of a weight near 0.25 is 2^-10, already about 1e-3 of the largest initial
    parameter (the BN weights, 1): a bfloat16 perturbation leaves the small regime in its first
    epoch, so there is no window to set beside exact arithmetic, and compare says why.
    """
    from bnaudit import bits
    from bnaudit.report import compare_view

    base, moved = record.load(make_run(3, dtype="bfloat16")), record.load(make_run(3, dtype="bfloat16",
                                                                                   perturb="linear1.weight[0,0]:1"))
    pc = compare.compare_pair(base, moved, exact=sensitivity.stored(default_spec()))
    values = bits.to_float64(base.keyframes[0], "bfloat16")
    limit = amplification.small_limit(values)
    assert limit == 1e-3 * float(np.max(np.abs(values))) and limit < 0.01
    overall = pc.divergence.overall()
    assert overall[0] > 0 and overall[1] > limit  # small at row 0 only
    assert pc.exact is None and pc.exact_known and pc.growth_window is not None
    assert "no window of one epoch or more where the difference is still small" in compare_view.exact_line(pc)
    # Measured on the bit patterns (tens of thousands), the same pair would have had a window.
    assert amplification.beside(sensitivity.stored(default_spec()), pc.divergence.rows, overall,
                                initial=base.keyframes[0].astype(np.float64)) is not None
