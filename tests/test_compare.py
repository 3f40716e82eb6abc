"""bnaudit.compare on real short runs: identical, first difference, divergence, environment, classes."""

from __future__ import annotations

import base64
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from bnaudit import compare, record
from bnaudit.blocks import DivergenceBlock
from bnaudit.errors import InputError, MismatchError
from bnaudit.layout import TensorKey, keyframe_schedule
from bnaudit.report import compare_view

EPOCHS = 3


@pytest.fixture(scope="module")
def runs(compare_runs):
    return compare_runs


def load(runs, name: str, kind: str = "record") -> record.Fingerprint:
    return record.load(runs[name] if kind == "record" else runs[name] / "fingerprint.json")


KINDS = [("record", "record"), ("fingerprint", "fingerprint"), ("record", "fingerprint"), ("fingerprint", "record")]


def oracle_first_step_tensor(a: record.Fingerprint, b: record.Fingerprint) -> tuple[int, int, TensorKey]:
    """First differing tensor of the traced steps, straight from the digest arrays."""
    for i in range(len(a.step_rows)):
        cols = np.flatnonzero(a.step_digests[i] != b.step_digests[i])
        if cols.size:
            return int(a.step_rows[i, 0]), int(a.step_rows[i, 1]), a.step_tensors[cols[0]]
    raise AssertionError("no step differs")


# --------------------------------------------------------------------------- identical

@pytest.mark.parametrize("ka, kb", KINDS)
def test_a_run_and_a_rerun_of_its_configuration_are_identical(runs, ka, kb):
    for other in ("t1", "same", "rerun"):
        c = compare.compare_pair(load(runs, "t1", ka), load(runs, other, kb))
        assert c.identical, other
        assert c.first is None and c.divergence is None and c.growth_rate is None
        assert c.environment_diff == ()
        assert c.rows_compared == EPOCHS + 1
        assert c.steps_compared == load(runs, "t1").spec.steps_per_epoch
        assert c.granularity == ("epoch-tensor" if ka == kb == "record" else "epoch-group")


# --------------------------------------------------------------------------- one ulp at the initial state

@pytest.mark.parametrize("ka, kb", KINDS)
def test_one_ulp_perturbation_is_named_at_epoch_0_step_0(runs, ka, kb):
    for a, b in ((load(runs, "t1", ka), load(runs, "perturb", kb)), (load(runs, "perturb", kb), load(runs, "t1", ka))):
        c = compare.compare_pair(a, b)
        d = c.first
        assert not c.identical and d is not None
        assert (d.epoch, d.step, d.phase, d.layer, d.tensor, d.row) == (0, 0, "init", "linear1", "linear1.weight", 0)
        # linear1.weight is 16 x 5 (five inputs): one element of 80 moved by one ulp.
        assert d.max_ulps == 1 and d.elements == 80
        assert d.fraction_differing == 0.0125
        assert c.environment_diff[0][0].startswith("config.perturb")
        div = c.divergence
        assert div is not None and div.rows[0] == 0
        # At the initial state only linear1 differs, by one float32 ulp of the moved value.
        row0 = div.max_ulps[0]
        assert row0[div.layers.index("linear1")] == 1 and row0.sum() == 1
        moved = a.keyframes[0, 0]
        assert div.max_abs[0, 0] == abs(float(np.nextafter(moved, np.float32(np.inf))) - float(moved))


# --------------------------------------------------------------------------- threads 1 vs 2

@pytest.mark.parametrize("ka, kb", KINDS)
def test_float32_and_bf16_mixed_part_from_the_start_and_the_divergence_grows(runs, make_run, ka, kb):
    """float32 vs bf16-mixed (both store float32 parameters): they part at once on every machine.

    The eval-mode pass over the (identical) initial parameters already differs, at epoch
    row 0, and compare names that; the training itself parts inside step 0 at the first
    autocast matmul, which the step digests show.
    """
    a = load(runs, "t1", ka)
    mixed = make_run(3, dtype="bf16-mixed")
    b = record.load(mixed if kb == "record" else mixed / "fingerprint.json")
    assert a.keyframes[0].tobytes() == b.keyframes[0].tobytes()  # same initial parameters
    epoch, step, tensor = oracle_first_step_tensor(a, b)
    assert (epoch, step, tensor.phase, tensor.key) == (0, 0, "forward", "linear1.out")
    c = compare.compare_pair(a, b)
    d = c.first
    assert d is not None and (d.epoch, d.step, d.row, d.phase) == (0, 0, 0, "init")
    # per tensor (two records): an eval-mode activation; per (phase, layer) group otherwise
    assert (d.tensor or "eval.").startswith("eval.") and d.granularity in ("epoch-tensor", "epoch-group"), d
    div = c.divergence
    assert div is not None and div.layers[0] == "linear1" and div.layers[-1] == "linear6"
    overall = div.overall()
    assert overall[0] == 0  # same initial state
    assert np.all(np.diff(overall[1:]) > 0), overall  # grows over the epochs
    assert c.growth_rate is not None and c.growth_rate > 0
    assert c.environment_diff[0][0] == "config.controls.dtype"


@pytest.mark.parametrize("ka, kb", KINDS)
def test_threads_1_vs_2_are_judged_by_their_digests(runs, ka, kb):
    """Whether 1 and 2 threads differ is this machine's fact; what compare says of it must follow the digests."""
    a, b = load(runs, "t1", ka), load(runs, "t2", kb)
    c = compare.compare_pair(a, b)
    keys = [k for k, _, _ in c.environment_diff]
    assert ("config.controls.threads", 1, 2) in c.environment_diff
    if a.digest == b.digest:
        assert c.identical and c.first is None and c.divergence is None
        return
    epoch, step, tensor = oracle_first_step_tensor(a, b)
    assert c.first is not None and (c.first.epoch, c.first.step, c.first.tensor) == (epoch, step, tensor.key)
    assert keys[0] in ("config.controls.threads", "effective.intra_op_threads", "effective.inter_op_threads")


def test_compare_a_b_and_b_a_agree(runs):
    names = ["t1", "t2", "perturb", "rerun"]
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            for ka, kb in KINDS:
                ab = compare.compare_pair(load(runs, x, ka), load(runs, y, kb))
                ba = compare.compare_pair(load(runs, y, kb), load(runs, x, ka))
                assert ab.identical == ba.identical and ab.first == ba.first
                assert ab.growth_rate == ba.growth_rate and ab.saturation_epoch == ba.saturation_epoch
                assert [(k, vb, va) for k, va, vb in ab.environment_diff] == list(ba.environment_diff)
                if ab.divergence is not None:
                    assert ba.divergence is not None
                    for field in ("max_abs", "max_rel", "max_ulps"):
                        assert np.array_equal(getattr(ab.divergence, field), getattr(ba.divergence, field))


def test_record_and_fingerprint_divergences_agree_on_common_rows(runs):
    full = compare.compare_pair(load(runs, "t1"), load(runs, "t2")).divergence
    light = compare.compare_pair(load(runs, "t1", "fingerprint"), load(runs, "t2", "fingerprint")).divergence
    assert full is not None and light is not None
    assert light.rows == tuple(keyframe_schedule(EPOCHS))
    idx = [full.rows.index(r) for r in light.rows]
    assert np.array_equal(full.max_ulps[idx], light.max_ulps) and np.array_equal(full.max_abs[idx], light.max_abs)


def test_divergence_matches_an_elementwise_oracle(runs):
    a, b = record.load_record(runs["t1"]), record.load_record(runs["t2"])
    div = compare.layer_divergence(a.fingerprint, b.fingerprint)
    assert div is not None
    pa, pb = a.arrays["params"].astype(np.float64), b.arrays["params"].astype(np.float64)
    ia = a.arrays["params"].view(np.int32).astype(np.int64)
    ib = b.arrays["params"].view(np.int32).astype(np.int64)
    # float32 ulps by the classic sign-magnitude-to-two's-complement trick, independent of bits.ulp_distance
    ka = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    kb = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    for j, layer in enumerate(div.layers):
        cols = np.concatenate([np.arange(s.start, s.stop) for name, s in a.layout.param_slices().items()
                               if name.split(".")[0] == layer])
        assert np.array_equal(div.max_abs[:, j], np.abs(pa[:, cols] - pb[:, cols]).max(axis=1)), layer
        assert np.array_equal(div.max_ulps[:, j], np.abs(ka[:, cols] - kb[:, cols]).max(axis=1)), layer


# --------------------------------------------------------------------------- refusals

def test_a_different_spec_is_refused_naming_what_differs(runs):
    a, b = load(runs, "t1"), load(runs, "nobn", "fingerprint")
    with pytest.raises(MismatchError) as err:
        compare.compare_pair(a, b)
    message = err.value.message
    assert "\n" not in message and "different spec" in message and "model.batchnorm" in message
    assert "--allow-different-spec" in message
    c = compare.compare_pair(a, b, allow_different_spec=True)
    assert not c.identical and c.first is not None
    assert any(s.startswith("model.batchnorm") for s in c.spec_differences)
    assert c.divergence is not None and set(c.divergence.layers) <= {f"linear{i}" for i in range(1, 7)}


def test_different_storage_dtype_and_epochs_are_refused_then_compared_without_values(runs):
    a, b = load(runs, "t1"), load(runs, "bf16")
    with pytest.raises(MismatchError, match=r"storage dtype \(float32 vs bfloat16\).*epoch counts \(3 vs 2\)"):
        compare.ensure_comparable(a, b)
    c = compare.compare_pair(a, b, allow_different_spec=True)
    assert not c.identical and c.divergence is None and c.value_rows == 0
    assert c.rows_compared == 3 and c.storage == "float32/bfloat16"
    assert c.first is not None and c.first.row == 0


def test_inconsistent_digests_are_refused_as_an_edited_input(runs):
    a = load(runs, "t1", "fingerprint")
    groups = a.group_digests.copy()
    groups[2, 3] ^= np.uint32(1)
    with pytest.raises(InputError, match="edited or corrupt"):
        compare.compare_pair(a, dataclasses.replace(a, group_digests=groups))
    snaps = a.keyframes.copy()
    snaps[1, 7] = np.nextafter(snaps[1, 7], np.float32(np.inf))
    with pytest.raises(InputError, match="parameter snapshots"):
        compare.compare_pair(a, dataclasses.replace(a, keyframes=snaps))


# --------------------------------------------------------------------------- timeline (property)

@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_first_edited_digest_in_timeline_order_is_reported(runs, data):
    """Edit digests of a copy at random places: the report names the earliest in timeline order."""
    a = load(runs, "t1", "fingerprint")
    rows, groups = a.group_digests.shape
    n_steps, n_tensors = a.step_digests.shape
    row_edit = data.draw(st.none() | st.tuples(st.integers(0, rows - 1), st.integers(0, groups - 1)))
    step_edit = data.draw(st.none() | st.tuples(st.integers(0, n_steps - 1), st.integers(0, n_tensors - 1)))
    gd, rd, sd = a.group_digests.copy(), a.row_digests.copy(), a.step_digests.copy()
    state = a.state_digests.copy()
    if row_edit:
        gd[row_edit] ^= np.uint32(0x80)
        rd[row_edit[0]] ^= np.uint64(1)
        if a.groups[row_edit[1]][0] == "forward" and a.groups[row_edit[1]][1].startswith("bn"):
            state[row_edit[0]] ^= np.uint64(1)  # running statistics only: a genuine difference there is one of state
    if step_edit:
        sd[step_edit] ^= np.uint64(1)
    b = dataclasses.replace(a, group_digests=gd, row_digests=rd, step_digests=sd, state_digests=state)
    c = compare.compare_pair(a, b)
    if not row_edit and not step_edit:
        assert c.identical and compare.compare_pair(b, b).identical
        return
    # Timeline position: row r -> (r, -1); step (e, s) -> (e, s).
    candidates = []
    if row_edit:
        candidates.append(((row_edit[0], -1), "row"))
    if step_edit:
        e, s = (int(v) for v in a.step_rows[step_edit[0]])
        candidates.append(((e, s), "step"))
    (pos, kind) = min(candidates)
    d = c.first
    assert d is not None
    if kind == "step":
        t = a.step_tensors[step_edit[1]]
        assert (d.epoch, d.step, d.tensor, d.granularity) == (pos[0], pos[1], t.key, "step")
    else:
        r = row_edit[0]
        phase, layer = a.groups[row_edit[1]]
        assert (d.row, d.layer, d.granularity) == (r, layer, "epoch-group")
        assert d.phase == ("init" if r == 0 else phase)
        assert (d.epoch, d.step) == ((0, 0) if r == 0 else (r - 1, None))


# --------------------------------------------------------------------------- growth

def test_growth_of_an_exponential_that_saturates():
    epochs = np.arange(0, 101)
    # e^(0.5 t) from 1e-8 until it reaches 1, then flat: rate 0.5, saturation where within 10x of 1.
    values = np.minimum(1e-8 * np.exp(0.5 * epochs), 1.0)
    rate, sat = compare.growth(epochs, values)
    assert rate is not None and math.isclose(rate, 0.5, rel_tol=0.02)
    # 1e-8 e^(0.5 t) >= 0.1  <=>  t >= 2 ln(1e7) = 32.236...
    assert sat == 33


def test_growth_still_rising_at_the_end_has_no_saturation():
    epochs = np.arange(0, 30)
    rate, sat = compare.growth(epochs, 1e-9 * np.exp(0.7 * epochs))
    assert rate is not None and math.isclose(rate, 0.7, rel_tol=1e-9) and sat is None


def test_growth_of_nothing_or_one_point():
    assert compare.growth(np.arange(5), np.zeros(5)) == (None, None)
    assert compare.growth(np.arange(5), np.array([0, 0, 0, 0, 1e-3])) == (None, None)
    rate, _ = compare.growth(np.arange(4), np.array([0, np.nan, 1e-3, np.e * 1e-3]))
    assert rate is not None and math.isclose(rate, 1.0)


# --------------------------------------------------------------------------- environment, reference

def test_environment_diff_lists_likely_causes_first(runs):
    a = load(runs, "t1", "fingerprint")
    env = dict(a.environment, cpu_model="Other CPU", python="3.99.0",
               environment=dict(a.environment.get("environment", {}), MKL_CBWR="AVX2", SOME_OTHER="1"))
    b = dataclasses.replace(a, environment=env, effective=dict(a.effective, cpu_capability="AVX2"))
    keys = [k for k, _, _ in compare.environment_diff(a, b)]
    assert keys.index("effective.cpu_capability") < keys.index("environment.cpu_model")
    assert keys.index("env.MKL_CBWR") < keys.index("environment.cpu_model") < keys.index("environment.python")
    assert compare.compare_pair(a, b).identical  # the facts differ, the bits do not


def test_closer_to_reference_when_both_carry_a_reference_block(runs):
    a = load(runs, "t1", "fingerprint")
    b = load(runs, "t2", "fingerprint")
    a, b = dataclasses.replace(a, divergence=None), dataclasses.replace(b, divergence=None)
    assert compare.compare_pair(a, b).closer_to_reference is None  # absent: no opinion

    def block(rows, correct_bits, what="weights"):  # bnaudit.divergence/1: one series per layer, arrays base64
        layers = ["linear1", "bn1", "linear6"]
        table = np.array(correct_bits, dtype=float).T  # (series, rows)
        enc = lambda a, dt: base64.b64encode(np.ascontiguousarray(a, dtype=dt).tobytes()).decode()  # noqa: E731
        raw = {"schema": "bnaudit.divergence/1", "rows": rows, "storage": "float32", "precision_bits": 24,
               "reference": {}, "series": [{"layer": name, "kind": "linear", "what": what} for name in layers],
               "max_abs": enc(np.zeros_like(table), "<f4"), "max_rel": enc(np.zeros_like(table), "<f4"),
               "max_ulps": enc(np.zeros_like(table), "<f4"), "correct_bits": enc(table, "<f2")}
        return DivergenceBlock.from_json(raw, "test")

    ra = dataclasses.replace(a, divergence=block([0, 3], [[24, 24, 24], [20, 18, 9]]))
    rb = dataclasses.replace(b, divergence=block([0, 1, 3], [[24, 24, 24], [23, 23, 23], [19, 18, 11]]))
    assert compare.compare_pair(ra, rb).closer_to_reference == {"linear1": "a", "bn1": "tie", "linear6": "b"}
    assert compare.compare_pair(rb, ra).closer_to_reference == {"linear1": "b", "bn1": "tie", "linear6": "a"}
    # Only weights series vote (the one definition, divergence.closer, that matrix and reports share) ...
    activations = block([0, 3], [[24, 24, 24], [1, 1, 1]], what="activations")
    only_activations = dataclasses.replace(a, divergence=activations)
    assert compare.compare_pair(only_activations, rb).closer_to_reference is None
    # ... no common row, no opinion ...
    late = dataclasses.replace(a, divergence=block([5], [[20, 18, 9]]))
    assert compare.compare_pair(late, rb).closer_to_reference is None
    # ... and a block with NaN bits never decodes: a file carrying one does not load.
    with pytest.raises(InputError, match="NaN"):
        block([0, 3], [[24, 24, 24], [float("nan"), 18, 9]])


# --------------------------------------------------------------------------- many inputs

def test_equivalence_classes_and_pairs_of_classes(runs):
    names = ["t1", "t2", "same", "perturb", "rerun"]
    fps = [load(runs, n, "fingerprint" if i % 2 else "record") for i, n in enumerate(names)]
    m = compare.compare_many(fps)
    distinct_t2 = fps[0].digest != fps[1].digest
    expected = [(0, 2, 4), (1,), (3,)] if distinct_t2 else [(0, 1, 2, 4), (3,)]
    assert [cls.indices for cls in m.classes] == expected
    assert not m.identical and len(m.pairs) == len(expected) * (len(expected) - 1) // 2
    for p in m.pairs:
        direct = compare.compare_pair(fps[m.classes[p.i].indices[0]], fps[m.classes[p.j].indices[0]])
        assert p.first == direct.first
    if distinct_t2:
        assert ("config.controls.threads", 2) in m.classes[1].common
        assert ("config.controls.threads", 1) in m.classes[0].common
    # Input order changes the numbering, not the partition.
    again = compare.compare_many(fps[::-1])
    assert {frozenset(c.members) for c in again.classes} == {frozenset(c.members) for c in m.classes}
    assert compare.compare_many(fps[:1] + fps[2:3]).identical


def test_many_inputs_of_different_experiments_are_refused(runs):
    with pytest.raises(MismatchError, match="different spec"):
        compare.compare_many([load(runs, "t1"), load(runs, "t2"), load(runs, "nobn")])


# --------------------------------------------------------------------------- views

def test_json_round_trips_and_views_say_the_same(runs):
    pair = compare.compare_pair(load(runs, "t1"), load(runs, "perturb", "fingerprint"))
    many = compare.compare_many([load(runs, n) for n in ("t1", "t2", "perturb", "same")])
    for result in (pair, many, compare.compare_pair(load(runs, "t1"), load(runs, "rerun"))):
        text = compare_view.to_json(result)
        back = compare_view.from_json(text)
        assert compare_view.to_json(back) == text
    back = compare_view.from_json(compare_view.to_json(pair))
    assert isinstance(back, compare.PairComparison) and back.first == pair.first
    assert back.divergence is not None and pair.divergence is not None
    assert np.array_equal(back.divergence.max_abs, pair.divergence.max_abs)
    md = compare_view.markdown(pair)
    console = Console(record=True, width=100)
    compare_view.render(pair, console)
    terminal = console.export_text()
    for text in (md, terminal):
        assert "DIFFERENT" in text and "linear1.weight" in text and "1 of 80 elements differ" in text
        assert "config.perturb" in text
    assert "| layer |" in md and "| all |" in md


def test_divergence_cells_are_log10_with_identical_marked():
    assert compare_view.log_cell(0.0) == "="
    assert compare_view.log_cell(1e-7) == "-7.0"
    assert compare_view.log_cell(float("inf")) == "inf"
    assert compare_view.selected_rows(list(range(4))) == [0, 1, 2, 3]
    picked = compare_view.selected_rows(list(range(1001)))
    assert picked[0] == 0 and picked[-1] == 1000 and len(picked) <= compare_view.MAX_COLUMNS
    # A full record and a fingerprint of the same 1000-epoch run show the same round columns.
    light = keyframe_schedule(1000)
    assert picked == [light[i] for i in compare_view.selected_rows(light)] == [0, 1, 3, 10, 30, 100, 300, 1000]


# --------------------------------------------------------------------------- the experiment, in words

def test_facts_flatten_nested_mappings_and_lists_of_them_by_their_names():
    out: dict = {}
    compare._flat({"b": {"y": 2, "x": 1}, "libs": [{"name": "mkl", "v": 1}, {"prefix": "/opt", "name": "z"},
                                                   {"v": 3}], "plain": [1, 2], "empty": [], "a": None}, "", out)
    assert out == {"a": None, "b.x": 1, "b.y": 2, "empty": [], "libs[mkl].name": "mkl", "libs[mkl].v": 1,
                   "libs[/opt].prefix": "/opt", "libs[/opt].name": "z", "libs[2].v": 3, "plain": [1, 2]}
    assert list(out)[:3] == ["a", "b.x", "b.y"]  # keys sorted at every level
    top: dict = {}
    compare._flat({"k": 1}, "config", top)
    assert top == {"config.k": 1}


def _spec_with(tmp_path, name: str, text: str):
    from bnaudit.spec import load_spec

    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_spec(path)


def test_spec_and_experiment_differences_say_each_field(tmp_path):
    from bnaudit.spec import load_spec

    default = load_spec(None)
    one = _spec_with(tmp_path, "lr", "[train]\nlr = 0.02\n")
    assert compare.spec_differences(default, default) == ()
    assert compare.spec_differences(default, one) == ("train.lr: 0.01 vs 0.02",)
    many = _spec_with(tmp_path, "many", "[train]\nlr = 0.02\nmomentum = 0.5\nbatch_size = 20\n"
                                        "[model]\nbn_eps = 0.001\n")
    assert compare.spec_differences(default, many) == (
        "model.bn_eps: 1e-05 vs 0.001", "train.batch_size: 10 vs 20", "train.lr: 0.01 vs 0.02",
        "train.momentum: 0.9 vs 0.5")
    assert compare.experiment_differences(default, many) == [
        f"different spec ({default.short_hash} vs {many.short_hash}: model.bn_eps: 1e-05 vs 0.001; "
        "train.batch_size: 10 vs 20; train.lr: 0.01 vs 0.02; and 1 more)"]
    assert compare.experiment_differences(default, one) == [
        f"different spec ({default.short_hash} vs {one.short_hash}: train.lr: 0.01 vs 0.02)"]
    assert compare.experiment_differences(default, default, "a" * 64, "b" * 64) == [
        f"different frozen inputs ({'a' * 12} vs {'b' * 12})"]
    assert compare.experiment_differences(default, default, "a" * 64, None) == []
    assert compare.experiment_differences(default, default, None, "b" * 64) == []
    assert compare.experiment_differences(default, default, "a" * 64, "a" * 64) == []


def test_what_compare_refuses_is_named_in_one_message(runs):
    t1, bf16, nobn = load(runs, "t1"), load(runs, "bf16"), load(runs, "nobn")
    assert compare.mismatches(t1, load(runs, "same")) == []
    assert compare.mismatches(t1, bf16) == ["different storage dtype (float32 vs bfloat16)",
                                            "different epoch counts (3 vs 2)"]
    found = compare.mismatches(t1, nobn)
    assert len(found) == 2 and found[0].startswith(f"different spec ({t1.spec.short_hash} vs {nobn.spec.short_hash}: "
                                                   "model.batchnorm: True vs False)")
    assert found[1].startswith("different frozen inputs (")
    with pytest.raises(MismatchError) as exc:
        compare.ensure_comparable(t1, bf16)
    assert exc.value.message == (f"refusing to compare {t1.source} with {bf16.source}: different storage dtype "
                                 "(float32 vs bfloat16); different epoch counts (3 vs 2) (--allow-different-spec "
                                 "compares what still can be)")
    assert compare.ensure_comparable(t1, bf16, allow_different_spec=True) is None
    assert compare.ensure_comparable(t1, load(runs, "same")) is None


def test_common_keys_keep_the_first_inputs_order():
    keys, ia, ib = compare._common_keys(["a", "b", "c", "d"], ["d", "x", "b"])
    assert keys == ["b", "d"] and ia.tolist() == [1, 3] and ib.tolist() == [2, 0]
    assert ia.dtype == np.intp and ib.dtype == np.intp
    keys, ia, ib = compare._common_keys(["a"], ["b"])
    assert keys == [] and ia.tolist() == [] and ib.tolist() == []


def test_overall_divergence_is_the_largest_layer_per_row():
    div = compare.LayerDivergence(rows=(0, 1), layers=("l1", "l2"), max_abs=np.array([[1.0, 3.0], [5.0, 2.0]]),
                                  max_rel=np.zeros((2, 2)), max_ulps=np.zeros((2, 2), np.int64))
    assert div.overall().tolist() == [3.0, 5.0]
    none = compare.LayerDivergence(rows=(0, 1, 2), layers=(), max_abs=np.zeros((3, 0)), max_rel=np.zeros((3, 0)),
                                   max_ulps=np.zeros((3, 0), np.int64))
    assert none.overall().tolist() == [0.0, 0.0, 0.0]
