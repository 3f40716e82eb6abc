"""bnaudit run: real short runs through the real launcher (one process per run)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from bnaudit import bits, record, worker
from bnaudit.layout import TensorKey, digest


def _first_differing_tensor(a: record.Fingerprint, b: record.Fingerprint) -> tuple[str, TensorKey]:
    """Earliest differing tensor: initial-state row, then epoch-0 steps, then epoch rows."""
    assert a.epoch_digests is not None and b.epoch_digests is not None
    init = np.flatnonzero(a.epoch_digests[0] != b.epoch_digests[0])
    if init.size:
        return "init", a.epoch_tensors[init[0]]
    for row, (da, db) in enumerate(zip(a.step_digests, b.step_digests)):
        cols = np.flatnonzero(da != db)
        if cols.size:
            return f"epoch {a.step_rows[row][0]} step {a.step_rows[row][1]}", a.step_tensors[cols[0]]
    raise AssertionError("no difference")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_same_configuration_twice_gives_bit_identical_fingerprints(make_run, dtype, threads):
    first = make_run(3, dtype=dtype, threads=threads)
    second = make_run(3, key="rerun", dtype=dtype, threads=threads)
    fa = json.loads((first / "fingerprint.json").read_text())
    fb = json.loads((second / "fingerprint.json").read_text())
    assert fa["digest"] == fb["digest"]
    assert fa["epoch_digests"] == fb["epoch_digests"] and fa["steps"] == fb["steps"]
    a, b = record.load_record(first), record.load_record(second)
    for name in ("params", "buffers", "losses", "epoch_digests", "step_digests", "probe"):
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes(), name


def test_one_ulp_perturbation_changes_the_fingerprint_and_names_the_parameter(make_run):
    base = record.load(make_run(3))
    moved = record.load(make_run(3, perturb="bn2.weight[5]:1"))
    assert base.digest != moved.digest
    when, tensor = _first_differing_tensor(base, moved)
    assert when == "init" and tensor.layer == "bn2" and tensor.key == "bn2.weight"
    cols = base.params[[n for n, _ in base.params].index("bn2.weight")]
    assert cols == ("bn2.weight", (16,))
    a, b = base.keyframes[0], moved.keyframes[0]
    differing = np.flatnonzero(a.view("<u4") != b.view("<u4"))
    assert differing.size == 1
    assert int(b.view("<u4")[differing[0]]) - int(a.view("<u4")[differing[0]]) == 1


def test_two_threads_change_float32_bits_at_the_first_step(make_run):
    a = record.load(make_run(3, threads=1))
    b = record.load(make_run(3, threads=2))
    if a.digest == b.digest:
        pytest.skip("on this host 1 and 2 threads give the same float32 bits (the --perturb tests do not depend on it)")
    when, tensor = _first_differing_tensor(a, b)
    assert when == "epoch 0 step 0", when
    assert tensor.phase == "forward"


def test_isa_default_and_the_widest_isa_here_give_different_fingerprints(make_run, cpu_isas):
    """The host's widest vector ISA (AVX-512 or AVX2, whichever it has) against ATen's scalar default."""
    widest = next((isa for isa in ("avx512", "avx2") if isa in cpu_isas), None)
    if widest is None:
        pytest.skip("this CPU has neither AVX2 nor AVX-512: no ISA to set against the default")
    a = record.load(make_run(3, isa="default"))
    b = record.load(make_run(3, isa=widest))
    assert a.effective["cpu_capability"] == "DEFAULT" and b.effective["cpu_capability"] == widest.upper()
    assert a.environment["environment"]["ATEN_CPU_CAPABILITY"] == "default"
    assert a.digest != b.digest


def test_record_holds_what_later_stages_need(make_run):
    folder = make_run(3)
    rec = record.load_record(folder)
    spec = rec.spec
    assert rec.arrays["params"].shape == (4, rec.layout.n_params) and rec.arrays["params"].dtype == np.dtype("<f4")
    assert rec.arrays["losses"].shape == (4, 2) and np.all(np.isfinite(rec.arrays["losses"]))
    assert rec.arrays["step_rows"].tolist() == [[0, s] for s in range(spec.steps_per_epoch)]
    assert rec.arrays["min_var"].shape == (4, 5) and np.all(rec.arrays["min_var"][1:] > 0)
    assert rec.meta["effective"]["intra_op_threads"] == 1
    assert rec.meta["environment"]["torch"].startswith("2.")
    assert rec.meta["config"]["controls"]["dtype"] == "float32"
    # Row 0 holds the frozen initial state rounded to float32.
    from bnaudit import bits, frozen
    init = bits.from_float64(frozen.load(spec).init[: rec.layout.n_params], "float32")
    assert rec.arrays["params"][0].tobytes() == init.tobytes()
    assert (folder / "fingerprint.json").stat().st_size < 1_000_000


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_epoch_digests_are_sha256_of_the_stored_values(make_run, dtype):
    """Recomputed here from params.npy / buffers.npy / losses.npy: the digests name exactly those bytes."""
    rec = record.load_record(make_run(3, dtype=dtype))
    keys = [t.key for t in rec.layout.epoch_tensors]
    digests = rec.arrays["epoch_digests"]
    storage = rec.arrays["params"].dtype
    for values, names in ((rec.arrays["params"], rec.layout.params), (rec.arrays["buffers"], rec.layout.buffers)):
        for row in range(4):
            offset = 0
            for name, shape in names:
                size = int(np.prod(shape))
                want = digest(values[row, offset:offset + size].tobytes())
                assert digests[row, keys.index(name)] == want, (row, name)
                offset += size
    if dtype == "float32":  # the eval losses, computed in float32, are stored exactly as float64
        for row in range(4):
            losses = rec.arrays["losses"][row].astype(storage)
            assert digests[row, keys.index("eval.loss")] == digest(losses.tobytes())
    assert digests[0, keys.index("loss.steps")] == 0, "no steps before epoch 0: no tensor"


def test_bf16_runs_are_labelled_pure_or_mixed(make_run):
    pure = record.load_record(make_run(2, dtype="bfloat16"))
    mixed = record.load_record(make_run(2, dtype="bf16-mixed"))
    assert pure.storage == "bfloat16" and pure.arrays["params"].dtype == np.dtype("<u2")
    assert mixed.storage == "float32" and mixed.meta["config"]["controls"]["dtype"] == "bf16-mixed"
    assert pure.fingerprint.digest != mixed.fingerprint.digest


def test_nonfinite_values_are_recorded_not_fatal(make_run, tmp_path):
    path = tmp_path / "hot.toml"
    path.write_text("[train]\nlr = 10.0\n")  # the largest rate a spec accepts; it overflows in epoch 0
    rec = record.load_record(make_run(2, spec_path=path))
    nf = rec.meta["nonfinite"]
    assert nf is not None and nf["epoch"] == 0
    assert nf["phase"] in ("forward", "backward", "update")


@pytest.mark.slow
def test_full_1000_epoch_float32_run_completes(make_run):
    rec = record.load_record(make_run(1000))
    assert rec.arrays["params"].shape[0] == 1001
    assert rec.meta["nonfinite"] is None


def test_perturbed_run_measures_the_chaos_floor_against_a_faithful_twin(make_run):
    base = record.load_record(make_run(3))
    moved = record.load_record(make_run(3, perturb="bn2.weight[5]:1"))
    floor = moved.meta["extra"]["perturbation"]
    # The in-process unperturbed twin is bit-identical to the separate unperturbed run.
    assert floor["twin_digest_rows"] == [format(int(d), "016x") for d in base.fingerprint.row_digests]
    assert floor["max_ulps"][0] == 1
    assert floor["max_ulps"][-1] > 1
    assert floor["growth_rate"] is not None and floor["growth_rate"] > 0
    decoded = moved.fingerprint.floor  # the block's one decoder reads what the worker wrote
    assert decoded is not None and decoded.max_ulps == tuple(floor["max_ulps"])


def test_sgd_without_momentum_runs_and_digests_no_momentum_buffer(make_run, tmp_path):
    """torch's SGD keeps no momentum buffer at momentum 0: the record says "no tensor" (digest 0)."""
    path = tmp_path / "plain-sgd.toml"
    path.write_text("[train]\nmomentum = 0.0\n")
    rec = record.load_record(make_run(1, spec_path=path))
    step_cols = [i for i, t in enumerate(rec.layout.step_tensors) if t.key.endswith(".momentum_buffer")]
    epoch_cols = [i for i, t in enumerate(rec.layout.epoch_tensors) if t.key.endswith(".momentum_buffer")]
    assert step_cols and (rec.arrays["step_digests"][:, step_cols] == 0).all()
    assert epoch_cols and (rec.arrays["epoch_digests"][:, epoch_cols] == 0).all()
    assert rec.arrays["params"][0].tobytes() != rec.arrays["params"][1].tobytes(), "the steps still train"


def test_chaos_floor_takes_layer_divergences_rules_for_nan_and_inf():
    """Identical bits (NaN, inf) are 0 apart; NaN on one side only is an infinite |Δ| and NAN_DISTANCE ulps."""
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    twin_rows = [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [nan, inf, 3.0], [1.0, 2.0, 3.0]]
    moved_rows = [[1.0, 2.0, 3.0], [1.0, 2.0, np.nextafter(np.float32(3.0), np.float32(4.0))], [nan, inf, 3.5],
                  [nan, 2.0, 3.5]]
    twin = types.SimpleNamespace(params=np.array(twin_rows, dtype="<f4"), epoch_digests=np.ones((4, 2), np.uint64))
    moved = types.SimpleNamespace(params=np.array(moved_rows, dtype="<f4"))
    floor = worker.chaos_floor(twin, moved, "float32")  # type: ignore[arg-type]
    # Golden |Δ| per row: 0, one float32 ulp at 3 (2^-22), 0.5 (the NaN and inf pairs are identical), inf.
    assert floor["max_abs"] == [format(np.float64(v).view("<u8"), "016x") for v in (0.0, 2.0**-22, 0.5, np.inf)]
    assert floor["max_ulps"] == [0, 1, 1 << 21, int(bits.NAN_DISTANCE)]
    assert len(floor["twin_digest_rows"]) == 4
