"""Divergence of real runs from the mpmath reference: per layer, per row, per dtype."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnaudit import bits, controls, divergence, fileio, frozen, launch, record, runner
from bnaudit.blocks import DivergenceBlock
from bnaudit.errors import InputError
from bnaudit.layout import TraceLayout, probe_schedule
from bnaudit.reference import build, store
from bnaudit.spec import default_spec

EPOCHS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The default experiment, a 2-epoch reference at 128/192 bits, and short runs in three dtypes."""
    spec = default_spec()
    fz = frozen.load(spec)
    ref = build.build(spec, fz, tmp_path_factory.mktemp("ref") / "r", precision=128, check_precision=192,
                      epochs=EPOCHS)
    layout = TraceLayout.for_spec(spec)
    torch.set_num_threads(1)
    blocks = {}
    for dtype in ("float64", "float32", "bfloat16"):
        config = controls.RunConfig(controls.Controls(dtype=dtype), epochs=EPOCHS, audit_every=0)
        result = runner.run(spec, fz, config)
        blocks[dtype] = divergence.versus_reference(
            spec, config.controls.storage, result.params, result.probe_rows, result.probe, layout,
            losses=np.stack([result.train_loss, result.test_loss], axis=1), reference=ref)
    return spec, ref, blocks


def _bits_by_series(block):
    d = DivergenceBlock.from_json(block, "test")
    return {name: list(d.correct_bits[k]) for k, name in enumerate(d.names)}


def test_more_precision_gives_more_correct_bits_at_every_layer(setup):
    spec, _, blocks = setup
    b64, b32, b16 = (_bits_by_series(blocks[d]) for d in ("float64", "float32", "bfloat16"))
    assert set(b64) == {f"{n} {w}" for n, _, _, _ in spec.layers() for w in ("weights", "activations")}
    for series in b64:
        for row, (x64, x32, x16) in enumerate(zip(b64[series], b32[series], b16[series])):
            assert x64 > x32 > x16, f"{series} at row {row}: float64 {x64}, float32 {x32}, bfloat16 {x16}"
            assert x64 > 35 and x32 > 8, f"{series} at row {row}: float64 {x64}, float32 {x32}"


def test_caps_and_row_zero(setup):
    _, _, blocks = setup
    for dtype, cap in (("float64", 53), ("float32", 24), ("bfloat16", 8)):
        d = DivergenceBlock.from_json(blocks[dtype], "test")
        assert d.precision_bits == cap and (d.correct_bits <= cap).all()
        weights = [i for i, s in enumerate(d.series) if s.what == "weights"]
        # row 0: the run holds the frozen init rounded to its dtype: within half an ulp, all bits kept
        assert (d.max_ulps[weights, 0] == 0).all(), f"{dtype}: initial weights are the rounded init"
        assert (d.correct_bits[weights, 0] >= cap - 1).all()
    loss = blocks["float64"]["losses"]
    assert loss["rows"] == [0, 1, 2] and min(loss["train_bits"]) > 35


def test_block_is_json_and_names_the_reference(setup):
    _, ref, blocks = setup
    block = blocks["float32"]
    assert json.loads(json.dumps(block)) == block
    assert block["reference"]["digest"] == ref.digest and block["reference"]["precision"] == 128
    assert block["rows"] == [0, 1, 2]
    decoded = DivergenceBlock.from_json(block, "test")
    assert decoded.series[0].name == "linear1 weights"
    assert decoded.series[0].half_bits_row is None  # 24-bit float32 keeps > 12 bits over two epochs


def test_record_folder_from_a_launched_run(tmp_path, setup):
    """The same measurement from a record written by `bnaudit run` (child process)."""
    spec, ref, blocks = setup
    config = controls.RunConfig(controls.Controls(dtype="float32"), epochs=EPOCHS, audit_every=0)
    launch.run(spec, config, tmp_path / "rec")
    block = divergence.from_record(record.load_record(tmp_path / "rec"), reference=ref)
    assert block is not None and block["max_abs"] == blocks["float32"]["max_abs"]


def test_no_reference_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("BNAUDIT_CACHE", str(tmp_path))
    from bnaudit.spec import from_dict

    spec = from_dict({"model": {"hidden_units": 3}}, base=default_spec())
    layout = TraceLayout.for_spec(spec)
    assert divergence.versus_reference(spec, "float32", np.zeros((2, layout.n_params), "<f4"), [0, 1],
                                       np.zeros((2, 1)), layout) is None


def _synthetic_reference(spec, epochs: int, rng) -> store.StoredReference:
    cols = store.Columns.for_spec(spec)
    rows = probe_schedule(epochs)
    hi = rng.normal(size=(len(rows), cols.total))
    lo = hi * 2.0**-60 * rng.uniform(-1, 1, size=hi.shape)
    return store.StoredReference(path=store.folder_for(spec), spec=spec, frozen="0" * 64, precision=512,
                                 check_precision=640, epochs=epochs, rows=np.array(rows), hi=hi, lo=lo,
                                 columns=cols, agreement=np.full(len(rows), 100.0), min_digits=30.0,
                                 digest="1" * 64, build={})


def test_block_for_1000_epochs_is_under_100_kB():
    spec = default_spec()
    rng = np.random.default_rng(0)
    ref = _synthetic_reference(spec, 1000, rng)
    layout = TraceLayout.for_spec(spec)
    p_hi, _ = ref.section("params")
    a_hi, _ = ref.section("probe")
    params = np.zeros((1001, layout.n_params), "<f4")
    params[ref.rows] = (p_hi * (1 + rng.normal(size=p_hi.shape) * 1e-5)).astype("<f4")
    block = divergence.versus_reference(spec, "float32", params, ref.rows, a_hi.astype("<f4"), layout,
                                        losses=np.ones((1001, 2)), reference=ref)
    size = len(json.dumps(block))
    assert size < 100_000, f"{size} bytes"
    assert len(block["rows"]) == len(probe_schedule(1000))


def test_exact_run_keeps_every_bit_and_one_bit_off_costs_bits():
    spec = default_spec()
    ref = _synthetic_reference(spec, 3, np.random.default_rng(1))
    layout = TraceLayout.for_spec(spec)
    p_hi, _ = ref.section("params")
    a_hi, _ = ref.section("probe")
    params = p_hi.copy()
    params[3] = bits.step_ulps(params[3], 2**20, "float64")  # every parameter 2^20 ulps off at row 3
    block = divergence.versus_reference(spec, "float64", params, ref.rows, a_hi.copy(), layout, reference=ref)
    d = DivergenceBlock.from_json(block, "test")
    weights = [i for i, s in enumerate(d.series) if s.what == "weights"]
    assert (d.correct_bits[:, :3] == 53).all() and (d.max_ulps[:, :3] == 0).all()
    assert (d.max_ulps[weights, 3] == 2**20).all()
    assert ((d.correct_bits[weights, 3] > 30) & (d.correct_bits[weights, 3] < 34)).all()


def test_half_bits_rows():
    rows = [0, 1, 2, 3, 4]
    # "fewer than half": 12 of 24 bits is not fewer
    assert divergence.half_bits_rows(np.array([24, 20, 12, 11.5, 11]), rows, 24) == (3, 3)
    assert divergence.half_bits_rows(np.array([24, 11, 13, 11, 10]), rows, 24) == (1, 3)
    assert divergence.half_bits_rows(np.array([24, 11, 13, 11, 13]), rows, 24) == (1, None)
    assert divergence.half_bits_rows(np.array([24, 23, 22, 21, 20]), rows, 24) == (None, None)
    assert divergence.half_bits_rows(np.array([11, 10, 9, 8, 7]), rows, 24) == (0, 0)  # below from the start


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-300, max_value=1e300), st.floats(min_value=1e-300, max_value=1e300))
def test_correct_bits_is_bounded_and_monotone(err, scale):
    b = divergence.correct_bits(err, scale, 24)
    assert 0 <= b <= 24
    assert divergence.correct_bits(err / 2, scale, 24) >= b
    assert math.isclose(divergence.correct_bits(0.0, scale, 53), 53)


def test_rendering(setup):
    from rich.console import Console

    from bnaudit.report import reference_view

    console = Console(record=True, width=160)
    reference_view.render_divergence(DivergenceBlock.from_json(setup[2]["bfloat16"], "test"), out=console)
    reference_view.render_divergence(None, out=console)
    text = console.export_text()
    assert "correct bits vs the mpmath reference (bfloat16, cap 8; eN: after epoch N, e0: the initial state)" in \
        " ".join(text.split())
    assert "linear6" in text and "activations" in text and "e2" in text
    assert "reference: none for this spec" in text


@pytest.mark.parametrize("damage", ["schema", "rows", "max_abs", "negative bits", "bits above the cap", "series"])
def test_malformed_blocks_are_rejected(setup, damage):
    block = dict(setup[2]["float32"])
    n = len(block["series"]) * len(block["rows"])
    block.update({
        "schema": {"schema": "nope"}, "rows": {"rows": [0]}, "max_abs": {"max_abs": "!!"},
        "negative bits": {"correct_bits": fileio.b64encode(np.full(n, -1, "<f2"))},
        "bits above the cap": {"correct_bits": fileio.b64encode(np.full(n, 25, "<f2"))},
        "series": {"series": [{"layer": 1}]},
    }[damage])
    with pytest.raises(InputError, match="divergence block"):
        DivergenceBlock.from_json(block, "test")


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_block_round_trips_exactly(setup, dtype):
    """The one decoder and the one encoder: from_json(to_json(x)) is x, to the bit."""
    block = setup[2][dtype]
    decoded = DivergenceBlock.from_json(block, "test")
    assert decoded.to_json() == block
    again = DivergenceBlock.from_json(json.loads(json.dumps(decoded.to_json())), "test")
    for k in ("max_abs", "max_rel", "max_ulps", "correct_bits"):
        assert getattr(again, k).tobytes() == getattr(decoded, k).tobytes(), k


# --------------------------------------------------------------------------- closer and attach

def _with_bits(block: DivergenceBlock, rows: tuple[int, ...], bits: np.ndarray) -> DivergenceBlock:
    return dataclasses.replace(block, rows=rows, correct_bits=np.asarray(bits, dtype=np.float64))


def test_closer_votes_by_weights_at_the_last_common_row(setup):
    _, _, blocks = setup
    b64, b32 = (DivergenceBlock.from_json(blocks[d], "test") for d in ("float64", "float32"))
    layers = [s.layer for s in b64.series if s.what == "weights"]
    assert divergence.closer(b64, b32) == {layer: "a" for layer in layers}
    assert divergence.closer(b32, b64) == {layer: "b" for layer in layers}
    assert divergence.closer(b32, b32) == {layer: "tie" for layer in layers}

    # a measured rows 0..2, b rows 0..1: row 1 decides, where b is ahead for linear1 only
    n = len(b64.series)
    a_bits = np.full((n, 3), 20.0)
    a_bits[:, 2] = 0.0  # a's last row (which b lacks) would say b everywhere
    b_bits = np.full((n, 2), 20.0)
    b_bits[0, 1] = 21.0  # linear1 weights
    b_bits[1, 1] = 99.0  # linear1 activations: they do not vote
    assert b64.series[0].name == "linear1 weights" and b64.series[1].name == "linear1 activations"
    got = divergence.closer(_with_bits(b64, (0, 1, 2), a_bits), _with_bits(b64, (0, 1), b_bits))
    assert got == {"linear1": "b", **{layer: "tie" for layer in layers[1:]}}


def test_closer_matches_layers_by_name_not_position(setup):
    _, _, blocks = setup
    b64, b32 = (DivergenceBlock.from_json(blocks[d], "test") for d in ("float64", "float32"))
    keep = [k for k, s in enumerate(b32.series) if s.layer == "bn2"]
    only_bn2 = dataclasses.replace(b32, series=tuple(b32.series[k] for k in keep),
                                   correct_bits=b32.correct_bits[keep])
    assert divergence.closer(b64, only_bn2) == {"bn2": "a"}
    assert divergence.closer(only_bn2, b64) == {"bn2": "b"}


def test_closer_without_a_common_row_or_layer_is_none(setup):
    _, _, blocks = setup
    b64 = DivergenceBlock.from_json(blocks["float64"], "test")
    later = _with_bits(b64, (5, 6, 7), b64.correct_bits)
    assert divergence.closer(b64, later) is None
    acts = [k for k, s in enumerate(b64.series) if s.what == "activations"]
    no_weights = dataclasses.replace(b64, series=tuple(b64.series[k] for k in acts),
                                     correct_bits=b64.correct_bits[acts])
    assert divergence.closer(b64, no_weights) is None
    assert divergence.closer(no_weights, b64) is None


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    config = controls.RunConfig(controls.Controls(dtype="float32"), epochs=EPOCHS, audit_every=0)
    out = tmp_path_factory.mktemp("attach") / "rec"
    launch.run(default_spec(), config, out)
    return record.load_record(out)


def _without_divergence(rec: record.Record) -> record.Record:
    extra = {k: v for k, v in rec.fingerprint.extra.items() if k != "divergence"}
    return dataclasses.replace(rec, fingerprint=dataclasses.replace(rec.fingerprint, extra=extra, divergence=None))


def test_attach_computes_the_block_the_run_itself_stored(launched):
    stored = launched.fingerprint.extra["divergence"]
    bare = _without_divergence(launched)
    got = divergence.attach(bare)
    assert got.fingerprint.extra["divergence"] == stored
    assert got.fingerprint.divergence is not None and got.fingerprint.divergence.to_json() == stored
    assert {k: v for k, v in got.fingerprint.extra.items() if k != "divergence"} == bare.fingerprint.extra
    assert got.arrays is launched.arrays and got.path == launched.path


def test_attach_keeps_a_block_the_record_has(launched):
    assert divergence.attach(launched) is launched


def test_attach_without_a_stored_reference_changes_nothing(tmp_path):
    from bnaudit.spec import from_dict

    spec = from_dict({"model": {"hidden_units": 3}}, base=default_spec())
    config = controls.RunConfig(controls.Controls(dtype="float32"), epochs=1, audit_every=0)
    launch.run(spec, config, tmp_path / "rec")
    rec = record.load_record(tmp_path / "rec")
    assert rec.fingerprint.divergence is None
    assert divergence.attach(rec) is rec


def test_loss_bits_subtract_the_low_part_of_the_double_double_reference():
    """run = 1 + 2^-52 against hi + lo = 1 + 2^-53: the error is 2^-53 (53 - 1 bits kept), not 1.5 * 2^-52."""
    got = divergence._loss_bits(1.0 + 2.0**-52, 1.0, 2.0**-53)
    assert got == round(divergence.correct_bits(2.0**-53, 1.0, 53), 1)
    assert got != round(divergence.correct_bits(1.5 * 2.0**-52, 1.0, 53), 1)
    assert divergence._loss_bits(1.0, 1.0, 0.0) == 53.0, "an exact loss keeps a float64's 53 bits, no more"


def test_measure_pins_one_ulp_and_gives_up_on_non_finite_values():
    ref_lo = np.zeros(2)
    one_ulp = divergence.measure(np.array([1.0 + 2.0**-23, 2.0], dtype="<f4"), np.array([1.0, 2.0]), ref_lo,
                                 "float32")
    assert one_ulp == {"max_abs": 2.0**-23, "max_rel": 2.0**-23, "max_ulps": 1.0, "correct_bits": 24.0}
    lost = {"max_abs": math.inf, "max_rel": math.inf, "max_ulps": math.inf, "correct_bits": 0.0}
    for bad in (np.nan, np.inf, -np.inf):  # a NaN alone, or an infinity alone, loses every bit
        run = np.array([1.0, bad], dtype="<f4")
        assert divergence.measure(run, np.array([1.0, 2.0]), ref_lo, "float32") == lost, bad


@pytest.mark.parametrize("error, scale, want", [
    (0.0, 1.0, 24.0),  # exact: the cap
    (2.0**-10, 1.0, 10.0),  # an error of 2^-10 of the scale: 10 bits
    (2.0**-10, 4.0, 12.0),
    (4.0, 1.0, 0.0),  # an error larger than the value: no bit, never negative
    (1.0, 0.0, 0.0),  # a zero reference and a nonzero error: no bit
    (math.inf, 1.0, 0.0),
])
def test_correct_bits_values(error, scale, want):
    assert divergence.correct_bits(error, scale, 24) == want


def test_a_run_shorter_than_the_reference_is_measured_at_its_own_rows(setup):
    """A 1-epoch run against the 2-epoch reference: rows 0 and 1, where both exist, and no further."""
    spec, ref, _ = setup
    fz = frozen.load(spec)
    config = controls.RunConfig(controls.Controls(dtype="float32"), epochs=1, audit_every=0)
    result = runner.run(spec, fz, config)
    block = divergence.versus_reference(spec, "float32", result.params, result.probe_rows, result.probe,
                                        TraceLayout.for_spec(spec), reference=ref)
    assert block is not None and block["rows"] == [0, 1]
    assert result.params.shape[0] == 2 and list(ref.rows)[:3] == [0, 1, 2]
