"""compare's probe pass: the train-mode forward of a fixed batch, compared bit for bit between records.

Real 3-epoch runs.  float32 against bf16-mixed (both store float32) differ in the probe
from its first row on every machine (bf16 autocast matmuls); a run and its rerun never do.
Expected shares and ulps are recomputed here from probe.npy with integer arithmetic of
their own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnaudit import compare, record
from bnaudit.layout import TraceLayout, probe_schedule
from bnaudit.report import compare_view


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 bit patterns as integers in the order of the values (-0 and +0 both 0)."""
    i = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def _first_probe_split(a: record.Record, b: record.Record):
    """(row, module, differing, elements, max ulps) of the first probe block whose bits differ, by hand."""
    layout = TraceLayout.for_spec(a.spec)
    batch = a.spec.train.batch_size
    pa, pb = np.load(a.path / "probe.npy"), np.load(b.path / "probe.npy")
    for k, row in enumerate(probe_schedule(a.fingerprint.epochs)):
        start = 0
        for module, width in zip(layout.modules, layout.probe_width):
            xa, xb = pa[k, start:start + batch * width], pb[k, start:start + batch * width]
            start += batch * width
            diff = xa.view(np.uint32) != xb.view(np.uint32)
            if diff.any():
                return row, module, int(diff.sum()), batch * width, int(np.abs(_ordered(xa) - _ordered(xb)).max())
    return None


@pytest.fixture(scope="module")
def mixed(make_run):
    return make_run(3, dtype="bf16-mixed")


def test_the_probe_pass_is_compared_between_records_and_its_split_is_exact(compare_runs, mixed):
    a, b = record.load_record(compare_runs["t1"]), record.load_record(mixed)
    c = compare.compare_pair(a.fingerprint, b.fingerprint)
    expected = _first_probe_split(a, b)
    assert expected is not None and expected[0] == 0  # autocast: the probe differs over the initial parameters
    row, module, differing, elements, ulps = expected
    d = c.probe_first
    assert c.probe_compared and d is not None
    assert (d.phase, d.row, d.epoch, d.step, d.layer, d.tensor) == ("probe", row, 0, None, module, f"probe.{module}")
    assert d.elements == elements and round(d.fraction_differing * elements) == differing and d.max_ulps == ulps
    text = compare_view.first_text(d)
    assert text.startswith("probe pass (train mode, the fixed probe batch) over the initial parameters, layer ")
    assert f"{differing} of {elements} elements differ" in text
    lines = compare_view.split_lines(c)
    assert any(line.startswith("also differs: probe pass") for line in lines)
    back = compare_view.from_json(compare_view.to_json(c))
    assert back.probe_first == d and back.probe_compared


def test_a_rerun_has_the_same_probe_and_a_fingerprint_file_has_none_to_compare(compare_runs, cli):
    a, same = record.load(compare_runs["t1"]), record.load(compare_runs["rerun"])
    c = compare.compare_pair(a, same)
    assert c.identical and c.probe_compared and c.probe_first is None and compare_view.split_lines(c) == []
    fp = record.load(compare_runs["t1"] / "fingerprint.json")
    assert fp.probe is None and fp.probe_rows is None
    c = compare.compare_pair(fp, record.load(compare_runs["perturb"]))
    assert not c.probe_compared and c.probe_first is None
    code, out, err = cli("compare", str(compare_runs["t1"] / "fingerprint.json"), str(compare_runs["perturb"]))
    assert code == 1, err
    assert "probe pass: not compared (a fingerprint file keeps no probe activations; compare the two record " \
           "folders)" in out


def test_a_probe_difference_past_the_compared_prefix_is_not_reported(compare_runs, mixed):
    """Runs of different lengths are compared over the shorter one: so is the probe."""
    a, b = record.load(compare_runs["t1"]), record.load(mixed)
    short = record.prefix(b, 1)
    assert list(short.probe_rows) == [0, 1] and short.probe.shape[0] == 2
    c = compare.compare_pair(record.prefix(a, 1), short)
    assert c.probe_first is not None and c.probe_first.row <= 1


def test_the_json_of_an_older_bnaudit_without_probe_fields_still_reads(compare_runs, mixed):
    c = compare.compare_pair(record.load(compare_runs["t1"]), record.load(mixed))
    doc = json.loads(compare_view.to_json(c))
    for key in ("probe_first", "probe_compared", "growth_window", "exact"):
        doc["pair"].pop(key)
    back = compare_view.from_json(json.dumps(doc))
    assert back.probe_first is None and not back.probe_compared and back.exact is None
    assert back.first == c.first and back.identical == c.identical
