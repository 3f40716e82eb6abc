"""bnaudit.compare on real short runs: identical, first difference, divergence, environment, classes."""

from __future__ import annotations

import base64
import dataclasses
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from bnaudit import bits, compare, record
from bnaudit.blocks import DivergenceBlock
from bnaudit.errors import InputError, MismatchError
from bnaudit.layout import TensorKey, after, keyframe_schedule
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

    The training parts inside step 0 at the first autocast matmul, and compare names that
    as the training split; the eval-mode pass over the (identical) initial parameters
    differs too, at epoch row 0, and compare lists it apart, as the eval pass.
    """
    a = load(runs, "t1", ka)
    mixed = make_run(3, dtype="bf16-mixed")
    b = record.load(mixed if kb == "record" else mixed / "fingerprint.json")
    assert a.keyframes[0].tobytes() == b.keyframes[0].tobytes()  # same initial parameters
    epoch, step, tensor = oracle_first_step_tensor(a, b)
    assert (epoch, step, tensor.phase, tensor.key) == (0, 0, "forward", "linear1.out")
    c = compare.compare_pair(a, b)
    d = c.first
    assert d is not None and (d.epoch, d.step, d.row, d.phase, d.tensor, d.granularity) == (
        0, 0, None, "forward", "linear1.out", "step")
    # linear1.out is float32 in a and bfloat16 in b: no element counts across dtypes
    assert d.fraction_differing is None and d.max_ulps is None
    e = c.eval_first
    assert e is not None and (e.epoch, e.step, e.row, e.phase) == (0, None, 0, "eval")
    # per tensor (two records): an eval-mode activation; per (phase, layer) group otherwise
    assert (e.tensor or "eval.").startswith("eval.") and e.granularity in ("epoch-tensor", "epoch-group"), e
    assert e.where.startswith("eval pass over the initial parameters, layer ")
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


def test_different_storage_dtype_is_refused_then_compared_without_values_over_the_common_epochs(runs):
    a, b = load(runs, "t1"), load(runs, "bf16")
    with pytest.raises(MismatchError, match=r"storage dtype \(float32 vs bfloat16\) \(--allow-different-spec"):
        compare.ensure_comparable(a, b)
    c = compare.compare_pair(a, b, allow_different_spec=True)
    assert not c.identical and c.divergence is None and c.value_rows == 0
    assert c.rows_compared == 3 and c.storage == "float32/bfloat16" and c.lengths == (3, 2)
    assert c.first is not None and c.first.row == 0
    with pytest.raises(MismatchError, match=r"^refusing runs of different lengths \(2 and 3 epochs\) with "
                                            r"--same-length; without it they are compared over their first 2 epochs$"):
        compare.compare_pair(a, b, allow_different_spec=True, same_length=True)


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
    # Timeline position of the training: row r -> (r, -1); step (e, s) -> (e, s).  The eval pass is apart.
    edited_eval = bool(row_edit) and a.groups[row_edit[1]][0] == "eval"
    candidates = []
    if row_edit and not edited_eval:
        candidates.append(((row_edit[0], -1), "row"))
    if step_edit:
        e, s = (int(v) for v in a.step_rows[step_edit[0]])
        candidates.append(((e, s), "step"))
    if edited_eval:
        r = row_edit[0]
        ev = c.eval_first
        assert ev is not None and (ev.row, ev.layer, ev.phase, ev.granularity) == (r, a.groups[row_edit[1]][1], "eval",
                                                                                   "epoch-group")
        assert (ev.epoch, ev.step) == ((0, None) if r == 0 else (r - 1, None))
    else:
        assert c.eval_first is None
    if not candidates:
        assert c.first == c.eval_first  # nothing of the training differs: the eval pass leads
        return
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
    other = "DEFAULT" if a.effective.get("cpu_capability") != "DEFAULT" else "AVX2"  # a change on any host
    b = dataclasses.replace(a, environment=env, effective=dict(a.effective, cpu_capability=other))
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
    for text in (md, " ".join(terminal.split())):
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
    assert compare.mismatches(t1, bf16) == ["different storage dtype (float32 vs bfloat16)"]
    found = compare.mismatches(t1, nobn)
    assert len(found) == 2 and found[0].startswith(f"different spec ({t1.spec.short_hash} vs {nobn.spec.short_hash}: "
                                                   "model.batchnorm: True vs False)")
    assert found[1].startswith("different frozen inputs (")
    with pytest.raises(MismatchError) as exc:
        compare.ensure_comparable(t1, bf16)
    assert exc.value.message == (f"refusing to compare {t1.source} with {bf16.source}: different storage dtype "
                                 "(float32 vs bfloat16) (--allow-different-spec compares what still can be)")
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


# =========================================================================== exact results, edited inputs
#
# Inputs below are real runs' fingerprints and records with digests or values edited through
# ``dataclasses.replace``; every expected value is worked out from the edit itself.

def _flip(arr: np.ndarray, index, bit: int = 1) -> np.ndarray:
    out = arr.copy()
    out[index] ^= out.dtype.type(bit)
    return out


def _param_cols(fp: record.Fingerprint, name: str) -> np.ndarray:
    """Columns of parameter ``name`` in the keyframes: the parameters one after another, C order."""
    offset = 0
    for n, shape in fp.params:
        size = int(np.prod(shape, dtype=np.int64))
        if n == name:
            return np.arange(offset, offset + size)
        offset += size
    raise KeyError(name)


def _f32_key(values) -> np.ndarray:
    """float32 values as ordered integers (sign-magnitude to two's complement): adjacent floats differ by 1."""
    i = np.ascontiguousarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def _bf16_key(patterns) -> np.ndarray:
    u = np.asarray(patterns, dtype=np.uint16).astype(np.int64)
    return np.where(u & 0x8000, -(u & 0x7FFF), u & 0x7FFF)


def _bf16_value(patterns) -> np.ndarray:
    return (np.asarray(patterns, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _move_ulps(kf: np.ndarray, row: int, col: int, ulps: int) -> None:
    """Move one stored float32 value by ``ulps`` representable steps away from zero."""
    kf.view(np.int32)[row, col] += ulps


def _tensor_col(fp: record.Fingerprint, key: str) -> int:
    return [t.key for t in fp.epoch_tensors].index(key)


def _diff(**fields) -> compare.Difference:
    base = dict(fraction_differing=None, max_ulps=None, row=None, elements=None)
    base.update(fields)
    return compare.Difference(**base)


# --------------------------------------------------------------------------- where, in words

def test_where_tells_each_kind_of_place_in_one_line():
    D = _diff
    assert D(epoch=0, step=None, phase="eval", layer="bn2", tensor="eval.bn2", granularity="epoch-tensor",
             row=0).where == "eval pass over the initial parameters, layer bn2, tensor eval.bn2"
    assert D(epoch=2, step=None, phase="eval", layer="bn2", tensor=None, granularity="epoch-group",
             row=3).where == "eval pass after epoch 3, layer bn2 (eval group)"
    assert D(epoch=0, step=0, phase="init", layer="linear1", tensor="linear1.weight", granularity="epoch-group",
             row=0).where == "the initial state (phase init), layer linear1, tensor linear1.weight"
    assert D(epoch=1, step=None, phase="update", layer="linear3", tensor=None, granularity="epoch-group",
             row=2).where == "after epoch 2 (phase update), layer linear3 (update group)"
    assert D(epoch=0, step=4, phase="backward", layer="bn1", tensor="bn1.weight.grad", granularity="step",
             row=None).where == "epoch 1, step 5, phase backward, layer bn1, tensor bn1.weight.grad"
    # a step inside epoch 1 is not the initial state, even though its row field is unset
    assert D(epoch=1, step=0, phase="forward", layer="linear1", tensor=None, granularity="step",
             row=None).where == "epoch 2, step 1, phase forward, layer linear1 (forward group)"
    assert D(epoch=0, step=None, phase="eval", layer="loss", tensor=None, granularity="epoch-group",
             row=1).where == "eval pass after epoch 1, layer loss (eval group)"


# --------------------------------------------------------------------------- a pair, every field

@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_a_perturbed_run_is_reported_field_by_field(runs, kind):
    a, b = load(runs, "t1", kind), load(runs, "perturb", kind)
    c = compare.compare_pair(a, b)
    gran = "epoch-tensor" if kind == "record" else "epoch-group"
    assert c.a == a.source and c.b == b.source and not c.identical
    assert c.first == compare.Difference(epoch=0, step=0, phase="init", layer="linear1", tensor="linear1.weight",
                                         granularity=gran, fraction_differing=1 / 80, max_ulps=1, row=0,
                                         elements=80)
    assert c.eval_first == compare.Difference(
        epoch=0, step=None, phase="eval", layer="linear1", tensor="eval.linear1" if kind == "record" else None,
        granularity=gran, fraction_differing=None, max_ulps=None, row=0)
    assert (c.granularity, c.steps_compared, c.rows_compared, c.value_rows) == (gran, 10, EPOCHS + 1, EPOCHS + 1)
    assert c.storage == "float32" and c.labels == ("float32_t1_native_nondet", "float32_t1_native_nondet_perturb")
    assert c.final_train_loss == (float(a.train_loss[EPOCHS]), float(b.train_loss[EPOCHS]))
    assert c.nonfinite == (None, None) and c.spec_differences == ()
    assert c.environment_diff == (("config.perturb.index", None, [0, 0]),
                                  ("config.perturb.tensor", None, "linear1.weight"),
                                  ("config.perturb.ulps", None, 1))
    assert c.divergence is not None and c.divergence.rows == (0, 1, 2, 3)
    assert c.growth_rate is not None and c.growth_rate > 0


def test_identical_runs_report_no_step_deltas_and_the_common_facts(runs):
    a, b = load(runs, "t1"), load(runs, "same", "fingerprint")
    c = compare.compare_pair(a, b)
    assert c.identical and c.first is None and c.eval_first is None and c.first_step is None
    assert c.value_rows == EPOCHS + 1 and c.storage == "float32" and c.saturation_epoch is None
    assert c.final_train_loss == (float(a.train_loss[EPOCHS]), float(b.train_loss[EPOCHS]))


def test_nonfinite_tensors_of_each_run_are_passed_on(runs):
    a = load(runs, "t1", "fingerprint")
    found = {"epoch": 2, "tensor": "bn1.out"}
    c = compare.compare_pair(a, dataclasses.replace(a, nonfinite=found))
    assert c.nonfinite == (None, found)


def test_a_different_spec_lists_its_differences_and_compares_common_layers(runs):
    a, b = load(runs, "t1"), load(runs, "nobn")
    c = compare.compare_pair(a, b, allow_different_spec=True)
    assert c.spec_differences == ("model.batchnorm: True vs False",)
    assert c.divergence is not None and c.divergence.layers == tuple(f"linear{i}" for i in range(1, 7))
    assert c.storage == "float32" and c.value_rows == EPOCHS + 1


def _truncated(fp: record.Fingerprint, epochs: int) -> record.Fingerprint:
    """The same run as if it had stopped after ``epochs`` epochs."""
    n = epochs + 1
    keep = fp.keyframe_rows <= epochs
    return dataclasses.replace(
        fp, epochs=epochs, row_digests=fp.row_digests[:n], group_digests=fp.group_digests[:n],
        epoch_digests=None if fp.epoch_digests is None else fp.epoch_digests[:n],
        state_digests=None if fp.state_digests is None else fp.state_digests[:n],
        keyframe_rows=fp.keyframe_rows[keep], keyframes=fp.keyframes[keep],
        train_loss=fp.train_loss[:n], test_loss=fp.test_loss[:n])


@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_a_longer_run_is_compared_over_the_shorter_runs_rows(runs, kind):
    a, b = load(runs, "t1", kind), _truncated(load(runs, "perturb", kind), 2)
    c = compare.compare_pair(a, b, allow_different_spec=True)
    assert (c.rows_compared, c.value_rows, c.steps_compared) == (3, 3, 10)
    assert c.final_train_loss == (float(a.train_loss[2]), float(b.train_loss[2]))
    assert c.divergence is not None and c.divergence.rows == (0, 1, 2)
    assert c.first is not None and (c.first.row, c.first.tensor) == (0, "linear1.weight")
    same = compare.compare_pair(a, _truncated(a, 1), allow_different_spec=True)
    assert same.identical and (same.rows_compared, same.value_rows) == (2, 2)
    assert compare.split(a, _truncated(a, 1))[2:] == ("epoch-tensor" if kind == "record" else "epoch-group", 10, 2)


# --------------------------------------------------------------------------- the first traced step, exactly

def _oracle_step_deltas(a: record.Fingerprint, b: record.Fingerprint) -> list[tuple]:
    """(phase, layer, tensor, differing, elements, max ulps, max |a-b|, scale) of each same-dtype tensor differing."""
    out = []
    in_b = {t.key for t in b.step_tensors}
    for t in a.step_tensors:
        if t.key not in in_b:
            continue
        va, da = a.first_step.values[t.key], a.first_step.dtypes[t.key]
        vb, db = b.first_step.values[t.key], b.first_step.dtypes[t.key]
        if da != db or va.shape != vb.shape:
            continue
        va, vb = va.reshape(-1), vb.reshape(-1)
        if da == "float32":
            ka, kb, fa, fb = _f32_key(va), _f32_key(vb), va.astype(np.float64), vb.astype(np.float64)
            differ = va.view(np.uint32) != vb.view(np.uint32)
        else:
            assert da == "bfloat16"
            ka, kb, fa, fb = _bf16_key(va), _bf16_key(vb), _bf16_value(va), _bf16_value(vb)
            differ = va != vb
        if differ.any():
            out.append((t.phase, t.layer, t.key, int(differ.sum()), va.size, int(np.abs(ka - kb).max()),
                        float(np.abs(fa - fb).max()), float(max(np.abs(fa).max(), np.abs(fb).max()))))
    return out


@pytest.mark.parametrize("other, kb", [("perturb", "fingerprint"), ("nobn", "record"), ("mixed", "record")])
def test_the_first_steps_differing_tensors_match_an_elementwise_oracle(runs, make_run, other, kb):
    a = load(runs, "t1", "fingerprint")
    path = make_run(3, dtype="bf16-mixed") if other == "mixed" else runs[other]
    b = record.load(path if kb == "record" else path / "fingerprint.json")
    c = compare.compare_pair(a, b, allow_different_spec=True)
    expected = _oracle_step_deltas(a, b)
    assert expected and c.first_step is not None
    assert [dataclasses.astuple(d) for d in c.first_step] == expected
    assert [dataclasses.astuple(d) for d in compare.first_step_deltas(a, b)] == expected
    if other == "mixed":  # activations are bfloat16 in b: only the tensors both keep in float32 are counted
        assert "linear1.out" not in {d.tensor for d in c.first_step}
        assert c.first is not None and c.first.tensor == "linear1.out" and c.first.fraction_differing is None
    if other == "nobn":  # the training parts at the first module that differs: a step tensor with exact counts
        first = expected[0]
        assert c.first == compare.Difference(epoch=0, step=0, phase=first[0], layer=first[1], tensor=first[2],
                                             granularity="step", fraction_differing=first[3] / first[4],
                                             max_ulps=first[5], row=None, elements=first[4])


def test_step_deltas_need_both_inputs_values(runs):
    a, b = load(runs, "t1", "fingerprint"), load(runs, "perturb", "fingerprint")
    assert compare.first_step_deltas(a, dataclasses.replace(b, first_step=None)) is None
    assert compare.first_step_deltas(dataclasses.replace(a, first_step=None), b) is None
    c = compare.compare_pair(dataclasses.replace(a, first_step=None), b)
    assert c.first_step is None and not c.identical
    assert compare.first_step_deltas(a, a) == ()


def test_step_tensors_of_another_shape_are_left_out(runs):
    from bnaudit import firststep

    a = load(runs, "t1", "fingerprint")
    values = dict(a.first_step.values)
    out = values["linear1.out"].copy()
    out.reshape(-1)[0] = np.float32(123.0)
    values["linear1.out"] = out.reshape(out.shape[1], out.shape[0])  # same elements, another shape
    values["bn1.out"] = values["bn1.out"].copy()
    values["bn1.out"].reshape(-1)[5] = np.float32(-7.5)
    b = dataclasses.replace(a, first_step=firststep.FirstStep(dtypes=a.first_step.dtypes, values=values))
    deltas = compare.first_step_deltas(a, b)
    assert deltas is not None and [d.tensor for d in deltas] == ["bn1.out"]
    old = float(a.first_step.values["bn1.out"].reshape(-1)[5])
    assert deltas[0].differing == 1 and deltas[0].max_abs == abs(old + 7.5)
    assert deltas[0].scale == max(7.5, float(np.abs(a.first_step.values["bn1.out"]).max()))


def test_bfloat16_step_tensors_are_counted_in_their_own_dtype(runs):
    from bnaudit import firststep

    a = load(runs, "bf16", "fingerprint")
    values = dict(a.first_step.values)
    out = values["linear1.out"].copy().reshape(-1)
    old = out[:3].copy()
    out[0] ^= np.uint16(1)  # one bfloat16 ulp
    out[2] ^= np.uint16(0x8000)  # the sign
    values["linear1.out"] = out.reshape(a.first_step.values["linear1.out"].shape)
    b = dataclasses.replace(a, first_step=firststep.FirstStep(dtypes=a.first_step.dtypes, values=values))
    deltas = compare.first_step_deltas(a, b)
    assert deltas is not None and len(deltas) == 1
    d = deltas[0]
    both = np.concatenate([_bf16_value(a.first_step.values["linear1.out"]).ravel(), _bf16_value(out)])
    assert (d.phase, d.layer, d.tensor, d.differing, d.elements) == ("forward", "linear1", "linear1.out", 2, out.size)
    assert d.max_ulps == max(1, 2 * abs(int(_bf16_key(old[2:3])[0])))
    assert d.max_abs == max(float(abs(_bf16_value(old[0:1]) - _bf16_value(out[0:1]))[0]),
                            2 * abs(float(_bf16_value(old[2:3])[0])))
    assert d.scale == float(np.abs(both).max())


def _with_step_values(fp: record.Fingerprint, values: np.ndarray, dtype: str = "float32") -> record.Fingerprint:
    from bnaudit import firststep

    return dataclasses.replace(fp, first_step=firststep.FirstStep(dtypes={"linear1.out": dtype},
                                                                  values={"linear1.out": values}))


def test_step_delta_counts_with_nan_signed_zero_and_empty_tensors(runs):
    base = load(runs, "t1", "fingerprint")
    key = TensorKey(phase="forward", layer="linear1", key="linear1.out")

    def delta(va, vb):
        return compare._first_step_delta(_with_step_values(base, va), _with_step_values(base, vb), key)

    f = np.float32
    nan = np.array([np.nan], f)
    other_nan = nan.view(np.uint32).copy()
    other_nan[0] |= 1
    d = delta(np.array([1.0, -0.0, np.nan, 2.0], f), np.array([1.0, 0.0, np.nan, 2.5], f))
    # -0 and +0 differ in bits but are 0 ulps and 0 apart; the NaNs are the same NaN
    assert dataclasses.astuple(d) == ("forward", "linear1", "linear1.out", 2, 4, 0x200000, 0.5, 2.5)
    d = delta(np.array([np.nan, np.nan], f), np.concatenate([nan, other_nan.view(f)]))
    assert (d.differing, d.elements, d.max_ulps, d.max_abs, d.scale) == (1, 2, np.iinfo(np.int64).max, math.inf, 0.0)
    d = delta(np.zeros((0, 16), f), np.zeros((0, 16), f))
    assert (d.differing, d.elements, d.max_ulps, d.max_abs, d.scale) == (0, 0, 0, 0.0, 0.0)
    d = delta(np.array([[3.0, -1.0]], f), np.array([[3.0, -1.0]], f))
    assert (d.differing, d.elements, d.max_ulps, d.max_abs, d.scale) == (0, 2, 0, 0.0, 3.0)
    d = delta(np.array([[3.0], [-4.0]], f), np.array([[3.0], [-1.0]], f))
    assert (d.differing, d.elements, d.max_abs, d.scale) == (1, 2, 3.0, 4.0)
    # another dtype or shape on one side, or no values: nothing to count
    a = _with_step_values(base, np.zeros(2, f))
    assert compare._first_step_delta(a, _with_step_values(base, np.zeros(2, np.uint16), "bfloat16"), key) is None
    assert compare._first_step_delta(a, _with_step_values(base, np.zeros(3, f)), key) is None
    assert compare._first_step_delta(a, _with_step_values(base, np.zeros((1, 2), f)), key) is None
    assert compare._first_step_delta(a, dataclasses.replace(a, first_step=None), key) is None
    assert compare._first_step_delta(dataclasses.replace(a, first_step=None), a, key) is None
    assert compare._first_step_delta(a, a, TensorKey(phase="forward", layer="bn1", key="bn1.out")) is None
    assert compare._first_step_delta(a, a, key) == compare.StepTensorDelta(
        phase="forward", layer="linear1", tensor="linear1.out", differing=0, elements=2, max_ulps=0, max_abs=0.0,
        scale=0.0)


# --------------------------------------------------------------------------- element distances

def test_element_distances_of_float32_special_values():
    f = np.float32
    tiny = np.array([1], np.uint32).view(f)[0]  # smallest subnormal, 2^-149
    big = np.finfo(f).max
    a = np.array([1.0, -0.0, np.nan, np.inf, np.inf, np.inf, tiny, tiny, 3.0, big, 1.0, np.nan, 5.0], f)
    b = np.array([np.nextafter(f(1), f(2)), 0.0, np.nan, 1.0, -np.inf, np.inf, 0.0, -tiny, -1.0, -big, np.nan,
                  1.0, 5.0], f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no floating-point warnings escape
        absd, rel, ulps = compare.element_distances(a, b, "float32")
    inf = math.inf
    eps = 2.0 ** -23
    assert absd.tolist() == [eps, 0.0, 0.0, inf, inf, 0.0, 2.0 ** -149, 2.0 ** -148, 4.0, 2 * float(big), inf, inf, 0.0]
    assert rel.tolist() == [eps / (1 + eps), 0.0, 0.0, inf, inf, 0.0, 1.0, 2.0, 4.0 / 3.0, 2.0, inf, inf, 0.0]
    nan_distance = np.iinfo(np.int64).max
    expected_ulps = np.abs(_f32_key(a) - _f32_key(b))
    expected_ulps[[2]] = 0  # the same NaN
    expected_ulps[[10, 11]] = nan_distance
    assert ulps.tolist() == expected_ulps.tolist()
    assert ulps[:10].tolist() == [1, 0, 0, 0x7F800000 - 0x3F800000, 2 * 0x7F800000, 0, 1, 2,
                                  0x40400000 + 0x3F800000, 2 * 0x7F7FFFFF]
    assert absd.dtype == rel.dtype == np.float64


def test_element_distances_of_bfloat16_patterns_and_float64():
    # 1.0, 1.0 + 2^-7, -1.0, +inf, NaN, smallest subnormal (2^-133), -0.0
    pa = np.array([0x3F80, 0x3F80, 0x3F80, 0x7F80, 0x7FC0, 0x0001, 0x8000, 0x7FC0], np.uint16)
    pb = np.array([0x3F81, 0x3F80, 0xBF80, 0x3F80, 0x3F80, 0x0000, 0x0000, 0x7FC0], np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        absd, rel, ulps = compare.element_distances(pa, pb, "bfloat16")
    step = 2.0 ** -7
    inf = math.inf
    assert absd.tolist() == [step, 0.0, 2.0, inf, inf, 2.0 ** -133, 0.0, 0.0]
    assert rel.tolist() == [step / (1 + step), 0.0, 2.0, inf, inf, 1.0, 0.0, 0.0]
    assert ulps.tolist() == [1, 0, 2 * 0x3F80, 0x7F80 - 0x3F80, np.iinfo(np.int64).max, 1, 0, 0]
    big = np.finfo(np.float64).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        absd, rel, ulps = compare.element_distances(np.array([big, 1.0, 0.0]), np.array([-big, np.inf, -0.0]),
                                                    "float64")
    # big - (-big) overflows float64: as far apart as can be
    assert absd.tolist() == [inf, inf, 0.0] and rel.tolist() == [inf, inf, 0.0]
    assert ulps[2] == 0


@pytest.mark.parametrize("storage, a, b", [
    ("float32", np.array([0x7F810000, 0x7F810000, 0x3F800000], "<u4").view("<f4"),
     np.array([0x7F810000, 0x7FC00000, 0x7F810000], "<u4").view("<f4")),
    ("bfloat16", np.array([0x7F81, 0x7F81, 0x3F80], "<u2"), np.array([0x7F81, 0x7FC0, 0x7F81], "<u2")),
])
def test_element_distances_of_a_signalling_nan(storage, a, b):
    # the same signalling NaN is 0 apart; against a quiet NaN or a number it is as far as can be
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        absd, rel, ulps = compare.element_distances(a, b, storage)
    assert absd.tolist() == [0.0, math.inf, math.inf] and rel.tolist() == [0.0, math.inf, math.inf]
    assert ulps.tolist() == [0, bits.NAN_DISTANCE, bits.NAN_DISTANCE]


# --------------------------------------------------------------------------- collisions, eval pass, timeline

@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_a_row_digest_differing_where_no_column_does_counts_as_training(runs, kind):
    a = load(runs, "t1", kind)
    steps = len(a.step_rows)
    gran = "epoch-tensor" if kind == "record" else "epoch-group"
    b = dataclasses.replace(a, row_digests=_flip(a.row_digests, 2))
    assert compare.split(a, b) == (
        compare.Difference(epoch=1, step=None, phase="unknown", layer="unknown", tensor=None,
                           granularity="epoch-row", fraction_differing=None, max_ulps=None, row=2),
        None, gran, steps, EPOCHS + 1)
    c = compare.compare_pair(a, b)
    assert not c.identical and c.first is not None and c.first.granularity == "epoch-row"
    assert c.first_step == () and c.growth_rate is None and c.saturation_epoch is None
    assert c.divergence is not None and c.divergence.overall().tolist() == [0.0] * (EPOCHS + 1)
    b0 = dataclasses.replace(a, row_digests=_flip(a.row_digests, 0))
    assert compare.split(a, b0)[0] == compare.Difference(
        epoch=0, step=0, phase="init", layer="unknown", tensor=None, granularity="epoch-row",
        fraction_differing=None, max_ulps=None, row=0)


def _edit_eval(fp: record.Fingerprint, row: int, layer: str) -> record.Fingerprint:
    """fp with the eval pass of ``layer`` differing at epoch ``row`` (its digests, as a real difference shows)."""
    if fp.epoch_digests is not None:
        ed = _flip(fp.epoch_digests, (row, _tensor_col(fp, f"eval.{layer}")))
        fp = dataclasses.replace(fp, epoch_digests=ed)
    gd = _flip(fp.group_digests, (row, fp.groups.index(("eval", layer))), 0x80)
    return dataclasses.replace(fp, group_digests=gd, row_digests=_flip(fp.row_digests, row))


def _edit_update(fp: record.Fingerprint, row: int, tensor: str = "linear1.weight") -> record.Fingerprint:
    """fp with parameter ``tensor`` (its digests and the state digest) differing at epoch ``row``."""
    layer = tensor.split(".")[0]
    if fp.epoch_digests is not None:
        fp = dataclasses.replace(fp, epoch_digests=_flip(fp.epoch_digests, (row, _tensor_col(fp, tensor))))
    gd = _flip(fp.group_digests, (row, fp.groups.index(("update", layer))), 0x80)
    return dataclasses.replace(fp, group_digests=gd, row_digests=_flip(fp.row_digests, row),
                               state_digests=_flip(fp.state_digests, row))


@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_an_eval_pass_difference_is_told_apart_from_the_training(runs, kind):
    a = load(runs, "t1", kind)
    gran = "epoch-tensor" if kind == "record" else "epoch-group"
    tensor = "eval.bn2" if kind == "record" else None
    b = _edit_eval(_edit_eval(a, 3, "linear4"), 2, "bn2")
    training, ev, granularity, steps, rows = compare.split(a, b)
    expected = compare.Difference(epoch=1, step=None, phase="eval", layer="bn2", tensor=tensor, granularity=gran,
                                  fraction_differing=None, max_ulps=None, row=2)
    assert training is None and ev == expected and (granularity, rows) == (gran, EPOCHS + 1)
    c = compare.compare_pair(a, b)
    assert c.first == expected and c.eval_first == expected and not c.identical
    at0 = compare.split(a, _edit_eval(a, 0, "loss"))[1]
    assert at0 == compare.Difference(epoch=0, step=None, phase="eval", layer="loss",
                                     tensor="eval.loss" if kind == "record" else None, granularity=gran,
                                     fraction_differing=None, max_ulps=None, row=0)
    # a later training difference is still the training split; the eval pass is reported beside it
    both = _edit_update(_edit_eval(a, 1, "bn1"), 3, "linear2.weight")
    training, ev, *_ = compare.split(a, both)
    assert ev is not None and (ev.row, ev.layer, ev.phase) == (1, "bn1", "eval")
    assert training == compare.Difference(
        epoch=2, step=None, phase="update", layer="linear2", tensor="linear2.weight" if kind == "record" else None,
        granularity=gran, fraction_differing=0.0 if kind == "record" else None,
        max_ulps=0 if kind == "record" else None, row=3, elements=256 if kind == "record" else None)
    assert compare.compare_pair(a, both).first == training


def _with_steps_of_two_epochs(fp: record.Fingerprint) -> record.Fingerprint:
    """fp as if steps 0-4 of epochs 0 and 1 had been traced (--trace-epochs 0,1)."""
    rows = np.array([[0, s] for s in range(5)] + [[1, s] for s in range(5)], dtype=fp.step_rows.dtype)
    return dataclasses.replace(fp, step_rows=rows)


def test_steps_are_compared_in_timeline_order_up_to_the_epochs_asked_for(runs):
    a = _with_steps_of_two_epochs(load(runs, "t1", "fingerprint"))
    col = 5
    t = a.step_tensors[col]
    sd = _flip(_flip(a.step_digests, (7, col)), (9, 2))  # epoch 1, steps 2 and 4
    b = dataclasses.replace(a, step_digests=sd)
    assert compare.split(a, b, epochs=1) == (None, None, "epoch-group", 5, 2)
    training, ev, gran, steps, rows = compare.split(a, b, epochs=2)
    assert ev is None and (steps, rows) == (10, 3)
    assert training == compare.Difference(epoch=1, step=2, phase=t.phase, layer=t.layer, tensor=t.key,
                                          granularity="step", fraction_differing=None, max_ulps=None, row=None)
    assert compare.split(a, b)[0] == training
    # two steps of epoch 0: the earlier one; a step of epoch 0 comes before the end of epoch 0 ...
    early = dataclasses.replace(_edit_update(a, 1), step_digests=_flip(_flip(a.step_digests, (4, 3)), (1, col)))
    got = compare.split(a, early)[0]
    assert got is not None and (got.epoch, got.step, got.tensor) == (0, 1, t.key)
    # ... and the end of epoch 0 before every step of epoch 1
    late = dataclasses.replace(_edit_update(a, 1), step_digests=_flip(a.step_digests, (5, col)))
    got = compare.split(a, late)[0]
    assert got == compare.Difference(epoch=0, step=None, phase="update", layer="linear1", tensor=None,
                                     granularity="epoch-group", fraction_differing=None, max_ulps=None, row=1)
    # the last traced step of epoch 0 still comes before the end of epoch 0
    last = dataclasses.replace(_edit_update(a, 1), step_digests=_flip(a.step_digests, (4, col)))
    got = compare.split(a, last)[0]
    assert got is not None and (got.epoch, got.step, got.granularity) == (0, 4, "step")
    # the initial state before the first step
    init = dataclasses.replace(_edit_update(a, 0), step_digests=_flip(a.step_digests, (0, col)))
    got = compare.split(a, init)[0]
    assert got is not None and (got.row, got.phase, got.granularity) == (0, "init", "epoch-group")


def test_a_step_difference_at_the_first_step_has_exact_counts_and_a_later_one_has_none(runs):
    a = load(runs, "t1", "fingerprint")
    col = [t.key for t in a.step_tensors].index("bn2.out")
    n = a.first_step.values["bn2.out"].size
    first = compare.split(a, dataclasses.replace(a, step_digests=_flip(a.step_digests, (0, col))))[0]
    # only the digest was edited: the values agree, every element the same
    assert first == compare.Difference(epoch=0, step=0, phase="forward", layer="bn2", tensor="bn2.out",
                                       granularity="step", fraction_differing=0.0, max_ulps=0, row=None, elements=n)
    later = compare.split(a, dataclasses.replace(a, step_digests=_flip(a.step_digests, (3, col))))[0]
    assert later == compare.Difference(epoch=0, step=3, phase="forward", layer="bn2", tensor="bn2.out",
                                       granularity="step", fraction_differing=None, max_ulps=None, row=None)
    c = compare.compare_pair(a, dataclasses.replace(a, step_digests=_flip(a.step_digests, (3, col))))
    assert c.first == later and c.first_step == () and c.eval_first is None


def test_inputs_without_common_step_tensors_compare_no_steps(runs):
    a = load(runs, "t1", "fingerprint")
    b = dataclasses.replace(a, step_tensors=(), step_digests=np.zeros((len(a.step_rows), 0), np.uint64))
    assert compare.split(a, b) == (None, None, "epoch-group", 0, EPOCHS + 1)
    assert compare.split(b, a)[3] == 0
    c = dataclasses.replace(a, step_rows=np.zeros((0, 2), a.step_rows.dtype),
                            step_digests=np.zeros((0, len(a.step_tensors)), np.uint64))
    assert compare.split(a, c)[3] == 0 and compare.split(c, a)[3] == 0
    assert compare.split(a, a)[3] == len(a.step_rows)


# --------------------------------------------------------------------------- digests that contradict each other

def _corrupt(a, b, row: int, what: str) -> str:
    return f"{a.source} / {b.source}, {after(row)}: {what} (an edited or corrupt input)"


@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_row_digests_that_contradict_the_column_digests_are_refused_at_the_first_such_row(runs, kind):
    a = load(runs, "t1", kind)
    if kind == "record":
        cols = a.epoch_digests.copy()
        cols[1, 4] ^= np.uint64(1)
        cols[3, 4] ^= np.uint64(1)
        b = dataclasses.replace(a, epoch_digests=cols)
    else:
        b = dataclasses.replace(a, group_digests=_flip(_flip(a.group_digests, (1, 4)), (3, 4)))
    gran = "epoch-tensor" if kind == "record" else "epoch-group"
    with pytest.raises(InputError) as err:
        compare.split(a, b)
    assert err.value.message == _corrupt(a, b, 1, f"equal whole-state digests but different {gran} digests")


@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_state_digests_must_agree_with_the_parameter_and_statistics_digests(runs, kind):
    a = load(runs, "t1", kind)
    hidden = "equal state digests but different parameter or running-statistics digests"
    unseen = "different state digests but equal parameter and running-statistics digests"

    def edit(row, *, group=None, tensor=None, state=False):
        fp = a
        if group is not None:
            fp = dataclasses.replace(fp, group_digests=_flip(fp.group_digests, (row, a.groups.index(group)), 0x80))
        if tensor is not None and fp.epoch_digests is not None:
            fp = dataclasses.replace(fp, epoch_digests=_flip(fp.epoch_digests, (row, _tensor_col(a, tensor))))
        if group is not None or tensor is not None:
            fp = dataclasses.replace(fp, row_digests=_flip(fp.row_digests, row))
        if state:
            fp = dataclasses.replace(fp, state_digests=_flip(fp.state_digests, row))
        return fp

    def refused(b, row, what):
        with pytest.raises(InputError) as err:
            compare.split(a, b)
        assert err.value.message == _corrupt(a, b, row, what)

    # only the state digest differs
    refused(edit(2, state=True), 2, unseen)
    # running statistics differ, the state does not
    refused(edit(2, group=("forward", "bn1"), tensor="bn1.running_mean"), 2, hidden)
    # a gradient differs with the state: nothing the state covers shows it
    refused(edit(2, group=("backward", "linear1"), tensor="linear1.weight.grad", state=True), 2, unseen)
    # consistent: a gradient without the state, running statistics with it, a parameter with it
    grad = compare.split(a, edit(2, group=("backward", "linear1"), tensor="linear1.weight.grad"))[0]
    assert grad is not None and (grad.row, grad.phase, grad.layer) == (2, "backward", "linear1")
    assert grad.tensor == ("linear1.weight.grad" if kind == "record" else None) and grad.fraction_differing is None
    stats = compare.split(a, edit(2, group=("forward", "bn1"), tensor="bn1.running_mean", state=True))[0]
    assert stats is not None and (stats.row, stats.phase, stats.layer) == (2, "forward", "bn1")
    param = compare.split(a, edit(1, group=("update", "bn2"), tensor="bn2.bias", state=True))[0]
    assert param is not None and (param.row, param.phase, param.layer) == (1, "update", "bn2")
    # the first contradicting row is named
    both = dataclasses.replace(edit(1, state=True), state_digests=_flip(a.state_digests, [1, 3]))
    refused(both, 1, unseen)
    if kind == "fingerprint":
        # a momentum buffer shares the update group with its parameter: that group may differ without the state
        moment = compare.split(a, edit(2, group=("update", "linear3")))[0]
        assert moment is not None and (moment.row, moment.phase, moment.layer, moment.tensor) == (
            2, "update", "linear3", None)
    else:
        moment = compare.split(a, edit(2, group=("update", "linear3"), tensor="linear3.weight.momentum_buffer"))[0]
        assert moment is not None and moment.tensor == "linear3.weight.momentum_buffer"
        refused(edit(2, group=("update", "linear3"), tensor="linear3.weight"), 2, hidden)


def test_state_digests_are_checked_only_when_both_inputs_have_them(runs):
    a = load(runs, "t1", "fingerprint")
    b = dataclasses.replace(a, state_digests=None, row_digests=_flip(a.row_digests, 2))
    training = compare.split(a, b)[0]
    assert training is not None and (training.row, training.granularity) == (2, "epoch-row")
    assert compare.split(b, a)[0] == training
    assert compare.split(a, dataclasses.replace(a, state_digests=None)) == (None, None, "epoch-group", 10, 4)


@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_snapshots_of_rows_with_equal_digests_must_be_equal(runs, kind):
    a = load(runs, "t1", kind)
    kf = a.keyframes.copy()
    _move_ulps(kf, 2, 100, 1)
    b = dataclasses.replace(a, keyframes=kf)
    with pytest.raises(InputError) as err:
        compare.split(a, b)
    assert err.value.message == _corrupt(a, b, 2, "identical digests but different parameter snapshots")
    # rows whose digests differ may differ in their snapshots; the first equal row that does not is named
    kf = a.keyframes.copy()
    _move_ulps(kf, 1, 7, 3)
    _move_ulps(kf, 3, 7, 1)
    b = dataclasses.replace(_edit_update(a, 1), keyframes=kf)
    with pytest.raises(InputError) as err:
        compare.split(a, b)
    assert err.value.message == _corrupt(a, b, 3, "identical digests but different parameter snapshots")
    # a shorter comparison checks only its own rows
    assert compare.split(a, dataclasses.replace(_edit_update(a, 1), keyframes=kf), epochs=2)[0] is not None
    assert compare.split(a, dataclasses.replace(a, keyframes=kf), epochs=0) == (
        None, None, "epoch-tensor" if kind == "record" else "epoch-group", 0, 1)


def test_snapshots_are_not_matched_across_parameter_layouts_or_storage_dtypes(runs):
    a = load(runs, "t1", "fingerprint")
    kf = a.keyframes.copy()
    _move_ulps(kf, 2, 100, 1)
    renamed = tuple((("x" + n) if i == 0 else n, s) for i, (n, s) in enumerate(a.params))
    assert compare.split(a, dataclasses.replace(a, params=renamed, keyframes=kf)) == (
        None, None, "epoch-group", 10, 4)
    assert compare.split(a, dataclasses.replace(a, storage="float64")) == (None, None, "epoch-group", 10, 4)


# --------------------------------------------------------------------------- the row where they part, with values

def test_an_initial_update_group_names_the_parameter_whose_values_differ(runs):
    a = load(runs, "t1", "fingerprint")
    bias = _param_cols(a, "linear1.bias")
    kf = a.keyframes.copy()
    _move_ulps(kf, 0, bias[3], 2)
    b = dataclasses.replace(_edit_update(a, 0, "linear1.bias"), keyframes=kf)
    assert compare.split(a, b)[0] == compare.Difference(
        epoch=0, step=0, phase="init", layer="linear1", tensor="linear1.bias", granularity="epoch-group",
        fraction_differing=1 / 16, max_ulps=2, row=0, elements=16)
    # both of the layer's parameters differ: the first in parameter order
    _move_ulps(kf, 0, _param_cols(a, "linear1.weight")[9], 1)
    b = dataclasses.replace(b, keyframes=kf)
    assert compare.split(a, b)[0] == compare.Difference(
        epoch=0, step=0, phase="init", layer="linear1", tensor="linear1.weight", granularity="epoch-group",
        fraction_differing=1 / 80, max_ulps=1, row=0, elements=80)
    # another layer's parameter differs (linear2 follows bn1 in the layout): only the digest of linear1's group
    kf = a.keyframes.copy()
    _move_ulps(kf, 0, _param_cols(a, "bn1.weight")[0], 1)
    b = dataclasses.replace(_edit_update(a, 0, "linear1.bias"), keyframes=kf)
    assert compare.split(a, b)[0] == compare.Difference(
        epoch=0, step=0, phase="init", layer="linear1", tensor=None, granularity="epoch-group",
        fraction_differing=None, max_ulps=None, row=0)


def test_an_initial_statistics_group_is_named_as_a_group(runs):
    a = load(runs, "t1", "fingerprint")
    kf = a.keyframes.copy()
    _move_ulps(kf, 0, _param_cols(a, "bn1.weight")[0], 1)
    bn1 = (0, a.groups.index(("forward", "bn1")))
    b = dataclasses.replace(a, keyframes=kf, group_digests=_flip(a.group_digests, bn1),
                            row_digests=_flip(a.row_digests, 0), state_digests=_flip(a.state_digests, 0))
    assert compare.split(a, b)[0] == compare.Difference(
        epoch=0, step=0, phase="init", layer="bn1", tensor=None, granularity="epoch-group",
        fraction_differing=None, max_ulps=None, row=0)


def test_a_later_update_group_has_no_values_to_count(runs):
    a = load(runs, "t1", "fingerprint")
    kf = a.keyframes.copy()
    _move_ulps(kf, 2, _param_cols(a, "linear2.weight")[0], 1)
    b = dataclasses.replace(_edit_update(a, 2, "linear2.weight"), keyframes=kf)
    assert compare.split(a, b)[0] == compare.Difference(
        epoch=1, step=None, phase="update", layer="linear2", tensor=None, granularity="epoch-group",
        fraction_differing=None, max_ulps=None, row=2)


def test_a_parameter_differing_after_an_epoch_is_counted_from_the_snapshots(runs):
    a = load(runs, "t1")
    cols = _param_cols(a, "linear2.weight")
    kf = a.keyframes.copy()
    for col, ulps in ((cols[0], 1), (cols[17], 5), (cols[255], 2)):
        _move_ulps(kf, 2, col, ulps)
    b = dataclasses.replace(_edit_update(a, 2, "linear2.weight"), keyframes=kf)
    expected = compare.Difference(epoch=1, step=None, phase="update", layer="linear2", tensor="linear2.weight",
                                  granularity="epoch-tensor", fraction_differing=3 / 256, max_ulps=5, row=2,
                                  elements=256)
    assert compare.split(a, b)[0] == expected
    assert compare.split(b, a)[0] == expected
    # no snapshot of that row on one side: where, but no counts
    keep = np.array([0, 1, 3])
    gap = dataclasses.replace(b, keyframe_rows=b.keyframe_rows[keep], keyframes=b.keyframes[keep])
    assert compare.split(a, gap)[0] == dataclasses.replace(expected, fraction_differing=None, max_ulps=None,
                                                           elements=None)
    assert compare.split(gap, a)[0] == dataclasses.replace(expected, fraction_differing=None, max_ulps=None,
                                                           elements=None)
    # the parameter missing on one side, or another storage dtype: no counts either
    renamed = tuple(("other.weight" if n == "linear2.weight" else n, s) for n, s in b.params)
    assert compare.split(a, dataclasses.replace(b, params=renamed))[0] == dataclasses.replace(
        expected, fraction_differing=None, max_ulps=None, elements=None)
    assert compare._values(a, dataclasses.replace(b, storage="float64"), 2, "linear2.weight") is None
    assert compare._values(a, b, 2, "linear2.weight") == (3 / 256, 5, 256)
    assert compare._values(a, b, 7, "linear2.weight") is None


# --------------------------------------------------------------------------- per-layer divergence

def _oracle_divergence(a: record.Fingerprint, b: record.Fingerprint, rows: list[int]) -> dict[str, tuple]:
    """layer -> (max |a-b|, max rel, max ulps) per row, over the parameters both have, straight from the snapshots."""
    out: dict[str, list] = {}
    names_b = dict(b.params)
    for name, shape in a.params:
        if names_b.get(name) != shape:
            continue
        layer = name.split(".")[0]
        ia = [int(np.flatnonzero(a.keyframe_rows == r)[0]) for r in rows]
        ib = [int(np.flatnonzero(b.keyframe_rows == r)[0]) for r in rows]
        va, vb = a.keyframes[np.ix_(ia, _param_cols(a, name))], b.keyframes[np.ix_(ib, _param_cols(b, name))]
        fa, fb = va.astype(np.float64), vb.astype(np.float64)
        absd = np.abs(fa - fb)
        scale = np.maximum(np.abs(fa), np.abs(fb))
        rel = np.divide(absd, scale, out=np.zeros_like(absd), where=scale > 0)
        ulps = np.abs(_f32_key(va) - _f32_key(vb))
        out.setdefault(layer, []).append((absd.max(axis=1), rel.max(axis=1), ulps.max(axis=1)))
    return {layer: tuple(np.max([p[k] for p in parts], axis=0) for k in range(3)) for layer, parts in out.items()}


@pytest.mark.parametrize("x, y", [("t1", "perturb"), ("t1", "nobn"), ("nobn", "t1"), ("t1", "t2")])
def test_layer_divergence_matches_the_snapshots_layer_by_layer(runs, x, y):
    a, b = load(runs, x), load(runs, y, "fingerprint")
    div = compare.layer_divergence(a, b)
    assert div is not None and div.rows == (0, 1, 2, 3)
    expected = _oracle_divergence(a, b, list(div.rows))
    assert div.layers == tuple(expected)
    assert div.max_ulps.dtype == np.int64 and div.max_abs.dtype == div.max_rel.dtype == np.float64
    for j, layer in enumerate(div.layers):
        absd, rel, ulps = expected[layer]
        assert div.max_abs[:, j].tolist() == absd.tolist(), layer
        assert div.max_rel[:, j].tolist() == rel.tolist(), layer
        assert div.max_ulps[:, j].tolist() == ulps.tolist(), layer
    short = compare.layer_divergence(a, b, epochs=1)
    assert short is not None and short.rows == (0, 1) and short.max_abs.shape == (2, len(div.layers))
    assert np.array_equal(short.max_ulps, div.max_ulps[:2]) and np.array_equal(short.max_rel, div.max_rel[:2])


def test_layer_divergence_does_not_depend_on_the_order_of_parameters(runs):
    a, b = load(runs, "t1", "fingerprint"), load(runs, "perturb", "fingerprint")
    order = list(range(len(a.params)))
    order[1], order[2] = order[2], order[1]  # linear1.weight, bn1.weight, linear1.bias, ...: layers interleaved
    params = tuple(a.params[i] for i in order)
    cols = np.concatenate([_param_cols(a, a.params[i][0]) for i in order])

    def shuffled(fp):
        return dataclasses.replace(fp, params=params, keyframes=fp.keyframes[:, cols])

    plain, mixed = compare.layer_divergence(a, b), compare.layer_divergence(shuffled(a), shuffled(b))
    assert plain is not None and mixed is not None and mixed.layers == plain.layers
    for field in ("max_abs", "max_rel", "max_ulps"):
        assert np.array_equal(getattr(mixed, field), getattr(plain, field)), field
    assert mixed.max_ulps.dtype == np.int64
    assert mixed.max_ulps[0].tolist() == [1] + [0] * (len(plain.layers) - 1)


def test_layer_divergence_without_common_parameters_or_rows(runs):
    a = load(runs, "t1", "fingerprint")
    other = dataclasses.replace(a, params=tuple(("x" + n, s) for n, s in a.params))
    div = compare.layer_divergence(a, other)
    assert div is not None and div.rows == (0, 1, 2, 3) and div.layers == ()
    assert div.max_abs.shape == div.max_rel.shape == div.max_ulps.shape == (4, 0)
    assert div.overall().tolist() == [0.0] * 4
    late = dataclasses.replace(a, keyframe_rows=np.array([7, 8, 9, 10]))
    div = compare.layer_divergence(a, late)
    assert div is not None and div.rows == () and div.max_abs.shape == (0, len(div.layers))
    c = compare.compare_pair(a, dataclasses.replace(late, row_digests=_flip(a.row_digests, 1)))
    assert c.divergence is not None and c.divergence.rows == () and c.value_rows == 0
    assert c.growth_rate is None and c.saturation_epoch is None
    assert compare.layer_divergence(a, dataclasses.replace(a, storage="bfloat16")) is None


# --------------------------------------------------------------------------- growth and saturation, by hand

def test_growth_of_two_points_is_their_slope():
    rate, sat = compare.growth(np.array([0, 1]), np.array([1e-6, 1e-3]))
    assert math.isclose(rate, math.log(1e3), rel_tol=1e-12) and sat is None
    # both points within a factor of ten of the largest: the top band alone, still rising
    rate, sat = compare.growth(np.array([3, 5]), np.array([0.5, 1.0]))
    assert math.isclose(rate, math.log(2) / 2, rel_tol=1e-12) and sat is None


def test_growth_of_points_at_one_epoch_has_no_slope():
    assert compare.growth(np.array([2, 2]), np.array([1e-4, 1e-2])) == (None, None)
    assert compare.growth(np.array([2, 2, 2]), np.array([1.0, 1.0, 1.0])) == (None, None)


def test_a_flat_series_is_saturated_from_its_first_row():
    # every row within the band: no growing phase, and a flat tail of three rows is saturated
    assert compare.growth(np.array([1, 2, 3]), np.array([1.0, 1.0, 1.0])) == (None, 1)
    assert compare.growth(np.array([1, 2]), np.array([1.0, 1.0])) == (0.0, None)


def test_saturation_needs_three_rows_from_the_saturation_row_on():
    # ln: -12, -9, -6, -3, 0, 0, 0: growth 3 per epoch; the first row within ln 10 of the top is epoch 4
    y = np.array([-12.0, -9.0, -6.0, -3.0, 0.0, 0.0, 0.0])
    rate, sat = compare.growth(np.arange(7), np.exp(y))
    assert math.isclose(rate, 3.0, rel_tol=1e-9) and sat == 4
    rate, sat = compare.growth(np.arange(6), np.exp(y[:6]))  # two rows from epoch 4 on: not yet saturated
    assert math.isclose(rate, 3.0, rel_tol=1e-9) and sat is None


def test_saturation_allows_a_tail_slope_up_to_a_quarter_of_the_growth_rate():
    # growth 3 per epoch up to epoch 4 (ln 0), then rising by h per epoch for three more epochs
    def series(h):
        return np.exp(np.array([-12.0, -9.0, -6.0, -3.0, 0.0, h, 2 * h, 3 * h]))

    # h = 0.5: top 1.5; the first row within ln 10 of it is epoch 4 (ln 0 >= 1.5 - 2.30; ln -3 is not)
    rate, sat = compare.growth(np.arange(8), series(0.5))
    assert math.isclose(rate, 3.0, rel_tol=1e-9) and sat == 4  # tail slope 0.5 <= 0.75
    rate, sat = compare.growth(np.arange(8), series(0.7))
    assert math.isclose(rate, 3.0, rel_tol=1e-9) and sat == 4  # tail slope 0.7 <= 0.75
    # h = 0.8: top 2.4, the band starts at epoch 5 (ln 0.8); growth over epochs 0-5 is 2.69 per epoch and the
    # tail's 0.8 is more than a quarter of it: still growing
    rate, sat = compare.growth(np.arange(8), series(0.8))
    assert sat is None
    assert math.isclose(rate, float(np.polyfit(np.arange(6), np.log(series(0.8)[:6]), 1)[0]), rel_tol=1e-9)
    assert 0.8 > compare.SATURATION_SLOPE * rate


def test_a_slow_growth_saturates_only_against_its_own_rate():
    # growth 0.8 per epoch from ln -8 (epoch 0) to ln 0 (epoch 10), then flat for 30 epochs
    x = np.arange(41)
    y = np.where(x <= 10, 0.8 * (x - 10.0), 0.0)
    rate, sat = compare.growth(x, np.exp(y))
    # the band reaches down to ln -2.30: epoch 8 (ln -1.6) is the first row in it
    assert sat == 8
    assert math.isclose(rate, 0.8, rel_tol=1e-9)
    # the same with a tail rising 0.15 per epoch (more than a quarter of 0.8 once the steep rows are in it)
    y2 = np.where(x <= 10, 0.8 * (x - 10.0), 0.15 * (x - 10.0))
    rate2, sat2 = compare.growth(x, np.exp(y2))
    assert sat2 is None


def test_the_band_edge_is_a_factor_of_ten_below_the_largest():
    # 9.5x below the top is in the band, 10.5x is not
    x = np.arange(5)
    rate, sat = compare.growth(x, np.array([1e-9, 1 / 10.5, 1 / 9.5, 1.0, 1.0]))
    assert sat == 2
    assert math.isclose(rate, float(np.polyfit([0, 1, 2], np.log([1e-9, 1 / 10.5, 1 / 9.5]), 1)[0]), rel_tol=1e-9)
    # exactly on the edge counts as in the band
    top = 1.0
    edge = 0.1
    for _ in range(64):
        if math.log(top) - compare.SATURATION_BAND == float(np.log(edge)):
            break
        edge = float(np.nextafter(edge, 1.0 if float(np.log(edge)) < -compare.SATURATION_BAND else 0.0))
    assert float(np.log(edge)) == -compare.SATURATION_BAND
    rate, sat = compare.growth(x, np.array([1e-9, edge, top, top, top]))
    assert sat == 1
    assert math.isclose(rate, math.log(edge / 1e-9), rel_tol=1e-9)


def test_growth_sorts_its_rows_and_skips_zero_and_nonfinite_values():
    y = np.array([-12.0, -9.0, -6.0, -3.0, 0.0, 0.0, 0.0])
    order = np.array([3, 0, 6, 1, 5, 2, 4])
    assert compare.growth(order, np.exp(y)[order]) == compare.growth(np.arange(7), np.exp(y))
    padded = np.concatenate([[0.0, np.inf, np.nan, -1.0], np.exp(y)])
    assert compare.growth(np.arange(-4, 7), padded) == compare.growth(np.arange(7), np.exp(y))


def test_a_slope_needs_two_distinct_epochs():
    assert compare._slope(np.array([1.0]), np.array([2.0])) is None
    assert compare._slope(np.array([1.0, 1.0]), np.array([2.0, 3.0])) is None
    assert compare._slope(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0])) == 2.0
    assert compare._slope(np.array([0.0, 2.0, 4.0]), np.array([1.0, 0.0, 1.0])) == 0.0
    assert compare._slope(np.array([1.0, 2.0, 4.0]), np.array([0.0, 0.0, 3.0])) == 3 * (4 - 7 / 3) / (
        (1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2)


# --------------------------------------------------------------------------- facts and their order

def test_specs_differing_only_in_the_hash_say_so(tmp_path):
    # 0.0 and -0.0 are equal values with different canonical forms
    zero = _spec_with(tmp_path, "zero", "[train]\nmomentum = 0.0\n")
    negative = _spec_with(tmp_path, "negative", "[train]\nmomentum = -0.0\n")
    assert compare.spec_differences(zero, negative) == ()
    assert compare.experiment_differences(zero, negative) == [
        f"different spec ({zero.short_hash} vs {negative.short_hash}: hash only)"]


def test_three_spec_differences_are_all_shown(tmp_path):
    from bnaudit.spec import load_spec

    default = load_spec(None)
    three = _spec_with(tmp_path, "three", "[train]\nlr = 0.02\nmomentum = 0.5\nbatch_size = 20\n")
    assert compare.experiment_differences(default, three) == [
        f"different spec ({default.short_hash} vs {three.short_hash}: train.batch_size: 10 vs 20; "
        "train.lr: 0.01 vs 0.02; train.momentum: 0.9 vs 0.5)"]
    assert compare.experiment_differences(default, three, "c" * 64, "d" * 64)[1] == (
        f"different frozen inputs ({'c' * 12} vs {'d' * 12})")


def test_facts_flatten_config_effective_environment_and_variables(runs):
    a = load(runs, "t1", "fingerprint")
    env = {"cpu_model": "c", "python_startup": {"isolated": True}, "environment": {"OMP_NUM_THREADS": "1"}}
    fp = dataclasses.replace(a, config={"x": 1}, effective={"y": [{"prefix": "gomp", "num_threads": 2}]},
                             environment=env)
    assert compare.facts(fp) == {"config.x": 1, "effective.y[gomp].num_threads": 2, "effective.y[gomp].prefix": "gomp",
                                 "environment.cpu_model": "c", "environment.python_startup.isolated": True,
                                 "env.OMP_NUM_THREADS": "1"}
    assert env["environment"] == {"OMP_NUM_THREADS": "1"}  # the input is left as it was
    assert compare.facts(fp) == compare.facts(fp)
    bare = dataclasses.replace(fp, environment={"cpu_model": "c"})
    assert compare.facts(bare) == {"config.x": 1, "effective.y[gomp].num_threads": 2,
                                   "effective.y[gomp].prefix": "gomp", "environment.cpu_model": "c"}
    odd = dataclasses.replace(fp, environment={"environment": "OMP_NUM_THREADS=1"})
    assert compare.facts(odd) == {"config.x": 1, "effective.y[gomp].num_threads": 2,
                                  "effective.y[gomp].prefix": "gomp", "env.?": "OMP_NUM_THREADS=1"}


def test_environment_diff_orders_every_kind_of_fact_by_likely_cause(runs):
    a = load(runs, "t1", "fingerprint")

    def fp(config, effective, environment):
        return dataclasses.replace(a, config=config, effective=effective, environment=environment)

    x = fp({"perturb": None, "controls": {"dtype": "float32", "threads": 1, "cpu_model": None, "deterministic": False},
            "epochs": 3, "trace_epochs": [0], "audit_every": 10, "seed": 1, "same": 0},
           {"cpu_capability": "AVX512", "intra_op_threads": 1, "mkldnn_enabled": True, "other": 1,
            "threadpools": [{"prefix": "libgomp", "num_threads": 1, "version": "1"}]},
           {"cpu_model": "A", "torch": "2.0", "os": "Linux", "python_startup": {"isolated": True},
            "environment": {"MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1", "FOO": "1", "LD_PRELOAD": "x"}})
    y = fp({"perturb": {"tensor": "linear1.weight"},
            "controls": {"dtype": "bfloat16", "threads": 2, "cpu_model": "B", "deterministic": True},
            "epochs": 4, "trace_epochs": [0, 1], "audit_every": 5, "seed": 2, "same": 0},
           {"cpu_capability": "AVX2", "intra_op_threads": 2, "mkldnn_enabled": False, "other": 2,
            "threadpools": [{"prefix": "libgomp", "num_threads": 2, "version": "2"}]},
           {"cpu_model": "B", "torch": "2.1", "os": "Darwin", "python_startup": {"isolated": False},
            "environment": {"MKL_CBWR": "AVX512", "OMP_NUM_THREADS": "2", "LD_PRELOAD": "y", "BAR": "2"}})
    assert compare.environment_diff(x, y) == (
        ("config.controls.dtype", "float32", "bfloat16"),
        ("config.perturb.tensor", None, "linear1.weight"),
        ("effective.cpu_capability", "AVX512", "AVX2"),
        ("env.MKL_CBWR", "AVX2", "AVX512"),
        ("config.controls.cpu_model", None, "B"),
        ("environment.cpu_model", "A", "B"),
        ("config.controls.threads", 1, 2),
        ("effective.intra_op_threads", 1, 2),
        ("effective.threadpools[libgomp].num_threads", 1, 2),
        ("env.OMP_NUM_THREADS", "1", "2"),
        ("config.controls.deterministic", False, True),
        ("effective.mkldnn_enabled", True, False),
        ("effective.threadpools[libgomp].version", "1", "2"),
        ("env.LD_PRELOAD", "x", "y"),
        ("environment.python_startup.isolated", True, False),
        ("environment.torch", "2.0", "2.1"),
        ("env.BAR", None, "2"),
        ("env.FOO", "1", None),
        ("environment.os", "Linux", "Darwin"),
        ("effective.other", 1, 2),
        ("config.seed", 1, 2),
        ("config.audit_every", 10, 5),
        ("config.epochs", 3, 4),
        ("config.trace_epochs", [0], [0, 1]),
    )
    assert compare.environment_diff(x, x) == ()
    # a fact that is None on one side and missing on the other does not differ
    assert ("config.perturb", None, None) not in compare.environment_diff(x, y)


def test_run_length_and_tracing_are_not_causes_and_rank_last():
    for key in ("config.epochs", "config.trace_epochs", "config.audit_every"):
        assert not compare.is_cause(key)
        assert compare._rank(key) == len(compare._CAUSES) + 1
    for key in ("config.seed", "config.controls.new_knob"):
        assert compare.is_cause(key) and compare._rank(key) == len(compare._CAUSES)
    assert compare.is_cause("config.perturb.tensor") and compare._rank("config.perturb.tensor") == 0
    assert compare._rank("effective.threadpools[libgomp].num_threads") == compare._rank("env.OMP_NUM_THREADS")
    threads = compare._rank("effective.threadpools[libgomp].num_threads")
    assert threads < compare._rank("effective.deterministic_algorithms")
    assert compare._rank("effective.threadpools[libgomp].prefix") == compare._rank("environment.torch")


# --------------------------------------------------------------------------- classes of many inputs, exactly

def test_equivalence_classes_share_the_facts_of_their_members_only(runs):
    a, p = load(runs, "t1", "fingerprint"), load(runs, "perturb", "fingerprint")

    def member(fp, source, **extra):
        return dataclasses.replace(fp, source=source, config=dict(fp.config, e=5, **extra), effective={},
                                   environment={})

    fps = [member(a, "A", k=1, z=0, q=1), member(a, "B", k=1, z=1, q=1), member(p, "C", k=2, z=1),
           member(a, "D", z=0, q=1)]
    classes = compare.equivalence_classes(fps)
    assert [c.indices for c in classes] == [(0, 1, 3), (2,)]
    assert [c.members for c in classes] == [("A", "B", "D"), ("C",)]
    assert [c.digest for c in classes] == [a.digest, p.digest]
    assert [c.labels for c in classes] == [(a.label,) * 3, (p.label,)]
    # config.e, the controls, epochs, ... are everywhere: not what sets a class apart
    assert classes[0].common == (("config.perturb", None), ("config.q", 1))
    assert classes[1].common == (("config.perturb.index", [0, 0]), ("config.perturb.tensor", "linear1.weight"),
                                 ("config.perturb.ulps", 1), ("config.k", 2), ("config.z", 1))
    assert compare.equivalence_classes([]) == []
    alone = compare.equivalence_classes(fps[:1])
    assert len(alone) == 1 and alone[0].common == () and alone[0].indices == (0,)


def test_many_inputs_compare_every_pair_of_classes_once(runs, make_run):
    names = ["t1", "perturb", "mixed", "same"]
    paths = dict(runs, mixed=make_run(3, dtype="bf16-mixed"))
    fps = [record.load(paths[n] / "fingerprint.json") for n in names]
    m = compare.compare_many(fps)
    assert m.sources == tuple(fp.source for fp in fps)
    assert [c.indices for c in m.classes] == [(0, 3), (1,), (2,)] and not m.identical
    assert [(p.i, p.j) for p in m.pairs] == [(0, 1), (0, 2), (1, 2)]
    for p, (x, y) in zip(m.pairs, [(0, 1), (0, 2), (1, 2)]):
        direct = compare.compare_pair(fps[x], fps[y])
        assert (p.comparison.a, p.comparison.b) == (fps[x].source, fps[y].source)
        assert p.first == direct.first == p.comparison.first and p.comparison.eval_first == direct.eval_first
    assert m.pairs[0].first is not None and m.pairs[0].first.tensor == "linear1.weight"
    one = compare.compare_many(fps[:1])
    assert one.identical and one.pairs == () and one.sources == (fps[0].source,)
    none = compare.compare_many([])
    assert none.identical and none.classes == () and none.pairs == ()


def test_many_inputs_refuse_another_experiment_in_any_place_unless_allowed(runs):
    t1, nobn = load(runs, "t1"), load(runs, "nobn")
    with pytest.raises(MismatchError) as err:
        compare.compare_many([t1, nobn])
    assert err.value.message.startswith(f"refusing to compare {t1.source} with {nobn.source}: different spec")
    m = compare.compare_many([t1, nobn], allow_different_spec=True)
    assert [c.indices for c in m.classes] == [(0,), (1,)]
    assert m.pairs[0].comparison.spec_differences == ("model.batchnorm: True vs False",)


def test_common_keys_are_positions_even_when_none_are_common():
    keys, ia, ib = compare._common_keys(["a"], ["b"])
    assert ia.dtype == np.intp and ib.dtype == np.intp and ia.shape == ib.shape == (0,)
    keys, ia, ib = compare._common_keys([], [])
    assert keys == [] and ia.dtype == ib.dtype == np.intp


def test_facts_of_mappings_with_non_string_keys_are_ordered_by_their_text():
    out: dict = {}
    compare._flat({10: "a", 2: "b", "x": {3: 1, 20: 2}}, "p", out)
    assert list(out.items()) == [("p.10", "a"), ("p.2", "b"), ("p.x.20", 2), ("p.x.3", 1)]


def test_values_of_an_empty_parameter_are_zero_ulps_apart(runs):
    a = load(runs, "t1", "fingerprint")
    empty = dataclasses.replace(a, params=(*a.params, ("linear7.weight", (0, 16))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mean of no elements
        got = compare._values(empty, empty, 1, "linear7.weight")
    assert got is not None and got[1:] == (0, 0)
    assert compare._values(empty, empty, 1, "linear8.weight") is None


def test_rows_given_for_one_epoch_are_taken_in_the_order_given():
    # epoch 3 has five rows: 0.01, 0.05, 0.5 (the first within ln 10 of the top, 1), 1, 1
    x = np.array([3, 3, 3, 0, 1, 2, 3, 3])
    v = np.array([0.01, 0.05, 0.5, 1e-8, 1e-7, 1e-6, 1.0, 1.0])
    rate, sat = compare.growth(x, v)
    expected = np.polyfit([0, 1, 2, 3, 3, 3], np.log([1e-8, 1e-7, 1e-6, 0.01, 0.05, 0.5]), 1)[0]
    assert math.isclose(rate, float(expected), rel_tol=1e-12)
    assert sat is None  # every row from the saturation row on is at epoch 3: no slope to judge


def test_growth_of_float32_series_is_computed_in_float64():
    x = (np.arange(7) * 0.3).astype(np.float32)
    v = np.exp(np.array([-12.0, -9.1, -6.3, -3.05, 0.0, 0.01, 0.02])).astype(np.float32)
    wide = compare.growth(x.astype(np.float64), v.astype(np.float64))
    assert compare.growth(x, v) == wide
    assert compare.growth(x, v.astype(np.float64)) == wide
    assert compare.growth(x.astype(np.float64), v) == wide
    assert compare.growth(list(x.astype(np.float64)), list(v.astype(np.float64))) == wide


def test_a_slope_is_exact_for_a_series_far_from_zero():
    # the mean is subtracted before the products: 1e16 + 4 against 1e16 is a rise of 2 per epoch
    assert compare._slope(np.array([0.0, 1.0, 2.0]), np.array([1e16, 1e16, 1e16 + 4])) == 2.0


def test_inputs_of_different_specs_are_compared_column_by_column(runs):
    a = load(runs, "t1", "fingerprint")
    other = load(runs, "nobn", "fingerprint").spec
    assert compare.split(a, dataclasses.replace(a, spec=other)) == (None, None, "epoch-group", 10, 4)
    # without a common layout the row digests say nothing: a row is as different as its common columns
    collision = dataclasses.replace(a, spec=other, row_digests=_flip(a.row_digests, 2))
    assert compare.split(a, collision)[0] is None
    b = dataclasses.replace(_edit_update(a, 2, "linear3.weight"), spec=other)
    assert compare.split(a, b)[0] == compare.Difference(
        epoch=1, step=None, phase="update", layer="linear3", tensor=None, granularity="epoch-group",
        fraction_differing=None, max_ulps=None, row=2)


def test_a_state_digest_differing_alone_is_refused_beside_a_genuine_difference(runs):
    a = load(runs, "t1", "fingerprint")
    b = _edit_update(a, 1, "bn2.weight")
    b = dataclasses.replace(b, state_digests=_flip(b.state_digests, 3))
    with pytest.raises(InputError) as err:
        compare.split(a, b)
    assert err.value.message == _corrupt(
        a, b, 3, "different state digests but equal parameter and running-statistics digests")
    c = _edit_update(a, 1, "bn2.weight")
    c = dataclasses.replace(c, group_digests=_flip(c.group_digests, (3, a.groups.index(("forward", "bn4")))),
                            row_digests=_flip(c.row_digests, 3))
    with pytest.raises(InputError) as err:
        compare.split(a, c)
    assert err.value.message == _corrupt(
        a, c, 3, "equal state digests but different parameter or running-statistics digests")


def test_a_divergence_that_stops_growing_is_reported_saturated(runs):
    a = load(runs, "t1", "fingerprint")
    col = int(_param_cols(a, "linear2.weight")[0])
    kfa, kfb = a.keyframes.copy(), a.keyframes.copy()
    kfa[:, col] = 0.0
    kfb[:, col] = [2.0 ** -20, 1.0, 1.0, 1.0]  # the only difference: 2^-20 at the start, then 1 at every row
    x = dataclasses.replace(a, keyframes=kfa)
    y = x
    for row in range(EPOCHS + 1):
        y = _edit_update(y, row, "linear2.weight")
    y = dataclasses.replace(y, keyframes=kfb)
    c = compare.compare_pair(x, y)
    assert c.divergence is not None and c.divergence.overall().tolist() == [2.0 ** -20, 1.0, 1.0, 1.0]
    assert c.saturation_epoch == 1
    assert c.growth_rate is not None and math.isclose(c.growth_rate, 20 * math.log(2), rel_tol=1e-12)
    assert c.first == compare.Difference(epoch=0, step=0, phase="init", layer="linear2", tensor="linear2.weight",
                                         granularity="epoch-group", fraction_differing=1 / 256,
                                         max_ulps=(127 - 20) << 23, row=0, elements=256)


def test_an_initial_parameter_differing_only_in_the_sign_of_a_zero_is_named(runs):
    a = load(runs, "t1", "fingerprint")
    w, bias = _param_cols(a, "linear1.weight"), _param_cols(a, "linear1.bias")
    kfa, kfb = a.keyframes.copy(), a.keyframes.copy()
    kfa[0, w[5]], kfb[0, w[5]] = 0.0, -0.0  # other bits, 0 ulps apart
    _move_ulps(kfb, 0, bias[0], 4)
    x = dataclasses.replace(a, keyframes=kfa)
    y = dataclasses.replace(_edit_update(x, 0, "linear1.weight"), keyframes=kfb)
    assert compare.split(x, y)[0] == compare.Difference(
        epoch=0, step=0, phase="init", layer="linear1", tensor="linear1.weight", granularity="epoch-group",
        fraction_differing=1 / 80, max_ulps=0, row=0, elements=80)


def test_traced_steps_of_very_late_epochs_are_still_told_apart(runs):
    # (epoch, step) keys stay exact integers: steps 0-9 of epoch 2^23 are ten different steps
    a = load(runs, "t1", "fingerprint")
    rows = np.array([[2 ** 23, s] for s in range(10)], dtype=a.step_rows.dtype)
    late = dataclasses.replace(a, step_rows=rows)
    edited = dataclasses.replace(late, step_digests=_flip(late.step_digests, (6, 0)))
    training, _, _, steps, _ = compare.split(late, edited, epochs=2 ** 24)
    assert steps == 10
    assert training is not None and (training.epoch, training.step) == (2 ** 23, 6)


def test_steps_of_consecutive_huge_epochs_keep_their_timeline_order(runs):
    a = load(runs, "t1", "fingerprint")
    e = 2 ** 30
    rows = np.array([[e - 1, s] for s in range(5)] + [[e, s] for s in range(5)], dtype=a.step_rows.dtype)
    late = dataclasses.replace(a, step_rows=rows)
    edited = dataclasses.replace(late, step_digests=_flip(_flip(late.step_digests, (7, 0)), (3, 0)))
    training, _, _, steps, _ = compare.split(late, edited, epochs=e + 1)
    assert steps == 10
    assert training is not None and (training.epoch, training.step) == (e - 1, 3)


def test_step_digests_are_matched_by_tensor_not_by_position(runs):
    a = load(runs, "t1", "fingerprint")
    order = np.arange(len(a.step_tensors))[::-1]
    b = dataclasses.replace(a, step_tensors=tuple(a.step_tensors[i] for i in order),
                            step_digests=a.step_digests[:, order])
    assert compare.split(a, b) == (None, None, "epoch-group", 10, 4)
    key = [t.key for t in b.step_tensors].index("bn3.out")
    edited = dataclasses.replace(b, step_digests=_flip(b.step_digests, (2, key)))
    training = compare.split(a, edited)[0]
    assert training is not None and (training.step, training.tensor) == (2, "bn3.out")


def test_no_reference_opinion_when_only_one_run_carries_a_block(runs):
    with_block = load(runs, "t1", "fingerprint")
    assert with_block.divergence is not None  # a run of the default spec measures itself against the reference
    without = dataclasses.replace(load(runs, "t2", "fingerprint"), divergence=None)
    assert compare.closer_to_reference(with_block, without) is None
    assert compare.closer_to_reference(without, with_block) is None


# --------------------------------------------------------------------------- lengths, one way

def test_runs_of_different_lengths_are_compared_over_their_common_epochs(make_run, runs):
    """A 2-epoch run is the first 2 epochs of the 3-epoch run of its configuration: one class, said in one line."""
    t1, two = load(runs, "t1"), record.load(make_run(2, threads=1))
    c = compare.compare_pair(t1, two)
    assert c.identical and c.lengths == (3, 2) and c.rows_compared == 3
    assert compare.prefix_text(c.lengths) == ("runs of 2 and 3 epochs: compared over the first 2 "
                                              "(--same-length refuses)")
    assert compare.prefix_text((3, 3)) is None
    assert compare.compare_pair(t1, load(runs, "t2")).lengths == (3, 3)
    many = compare.compare_many([t1, two, load(runs, "t2")])
    assert [len(k.members) for k in many.classes] == [2, 1] and many.lengths == (3, 2, 3)
    # The pair of classes is compared over 2 epochs too: the split is the same as over 3.
    full = compare.compare_pair(t1, load(runs, "t2"))
    assert many.pairs[0].comparison.first == full.first and many.pairs[0].comparison.rows_compared == 3
    with pytest.raises(MismatchError, match="different lengths"):
        compare.compare_many([t1, two], same_length=True)
    # A different length is a different prefix, never a different verdict on the epochs both ran.
    assert compare.compare_pair(two, load(runs, "t2")).first == full.first
