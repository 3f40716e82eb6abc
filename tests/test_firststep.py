"""The first traced step's exact values: what a run keeps, how loading checks it, what compare and --bundle do with it.

Runs are real (``make_run``, 3 epochs, shared with test_compare); expected values come
from the runs' own arrays and digests computed here (sha256), not from the code under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnaudit import bundle, compare, firststep, record
from bnaudit.errors import ExitCode, InputError, UsageError
from bnaudit.layout import TraceLayout
from bnaudit.spec import default_spec

SPEC = default_spec()
LAYOUT = TraceLayout.for_spec(SPEC)
SHAPES = firststep.first_step_shapes(SPEC, LAYOUT)


def _digest(data: bytes) -> int:
    value = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    return value or 1


@pytest.fixture(scope="module")
def t1(make_run):
    return make_run(3, threads=1)


@pytest.fixture(scope="module")
def mixed(make_run):
    return make_run(3, dtype="bf16-mixed")


# --------------------------------------------------------------------------- what a run keeps

def test_the_block_lists_the_batch_the_initial_state_every_module_and_every_traced_tensor():
    keys = list(SHAPES)
    assert keys[:2] == ["input", "target"] and SHAPES["input"] == (10, 5) and SHAPES["target"] == (10, 1)
    assert keys[2] == "initial.linear1.weight" and SHAPES["initial.linear1.weight"] == (16, 5)
    assert [k for k in keys if k.endswith(".out")] == [f"{m}.out" for m in LAYOUT.modules]
    assert SHAPES["relu1.out"] == (10, 16) and SHAPES["linear6.out"] == (10, 1) and SHAPES["loss"] == ()
    assert {t.key for t in LAYOUT.step_tensors} <= set(SHAPES)
    assert SHAPES["bn1.weight.grad"] == SHAPES["bn1.weight.momentum_buffer"] == (16,)


def test_a_run_keeps_every_tensor_of_its_first_step_as_its_digests_say(t1):
    fp = record.load(t1)
    rec = record.load_record(t1)
    block = fp.first_step
    assert block is not None and list(block.dtypes) == list(SHAPES)  # momentum 0.9: every tensor exists
    assert set(block.dtypes.values()) == {"float32"}
    row = rec.arrays["step_digests"][0]
    for t, d in zip(LAYOUT.step_tensors, row):
        assert _digest(block.values[t.key].tobytes()) == int(d), t.key
    # the initial state is row 0 of the record's arrays, bit for bit
    assert np.concatenate([block.values[f"initial.{n}"].reshape(-1) for n, _ in LAYOUT.params]).tobytes() \
        == rec.arrays["params"][0].tobytes()
    assert np.concatenate([block.values[f"initial.{n}"].reshape(-1) for n, _ in LAYOUT.buffers]).tobytes() \
        == rec.arrays["buffers"][0].tobytes()
    # ReLU is exact: its output is max(0, input) of the BN output before it
    bn1, relu1 = block.values["bn1.out"], block.values["relu1.out"]
    assert np.array_equal(np.maximum(bn1, 0), relu1)
    # the fingerprint carries the same block
    assert record.load(t1 / "fingerprint.json").first_step.blob() == block.blob()


def test_bf16_mixed_keeps_each_tensor_in_its_own_dtype(mixed):
    block = record.load(mixed).first_step
    assert block.dtypes["linear1.out"] == "bfloat16" and block.dtypes["linear1.weight"] == "float32"
    assert block.dtypes["input"] == "float32" and block.values["linear1.out"].dtype == np.dtype("<u2")


# --------------------------------------------------------------------------- what loading refuses

def _fingerprint_doc(run: Path) -> dict:
    return json.loads((run / "fingerprint.json").read_text())


def _write_fingerprint(doc: dict, path: Path) -> Path:
    doc["content_sha256"] = record.content_sha256(doc)
    path.write_text(json.dumps(doc))
    return path


def _values_bytes(doc: dict) -> bytearray:
    import base64

    return bytearray(base64.b64decode(doc["first_step"]["values"]))


def _offset(doc: dict, key: str) -> int:
    sizes = {"float32": 4, "float64": 8, "bfloat16": 2}
    offset = 0
    for name, dtype, shape in doc["first_step"]["tensors"]:
        if name == key:
            return offset
        offset += int(np.prod(shape, dtype=np.int64)) * sizes[dtype]
    raise KeyError(key)


@pytest.mark.parametrize("key, message", [
    ("linear1.out", "first-step values of linear1.out do not match the step's digest"),
    ("loss", "first-step values of loss do not match the step's digest"),
    ("initial.bn2.bias", "first-step initial.bn2.bias differs from the row-0 parameters"),
])
def test_a_forged_value_with_a_recomputed_checksum_is_refused(t1, tmp_path, key, message):
    import base64

    doc = _fingerprint_doc(t1)
    raw = _values_bytes(doc)
    raw[_offset(doc, key)] ^= 1
    doc["first_step"]["values"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(InputError, match=message):
        record.load(_write_fingerprint(doc, tmp_path / "fp.json"))


@pytest.mark.parametrize("edit, message", [
    (lambda fs: fs["tensors"].pop([t[0] for t in fs["tensors"]].index("relu1.out")), "the first-step block has"),
    (lambda fs: fs["tensors"].pop(0), "the first-step block lacks input"),
    (lambda fs: fs["tensors"].reverse(), "repeated or out of order"),
    (lambda fs: fs["tensors"][5].__setitem__(1, "float16"), "has unknown dtype 'float16'"),
    (lambda fs: fs["tensors"][5].__setitem__(2, [3]), "has shape [3], expected"),
    (lambda fs: fs["tensors"][5].__setitem__(0, "nonsense.out"), "'nonsense.out' is not one of this spec's tensors"),
    (lambda fs: fs["tensors"].__setitem__(5, fs["tensors"][4]), "repeated or out of order"),
    (lambda fs: fs["tensors"].append(fs["tensors"][-1]), "malformed first-step table"),
    (lambda fs: fs.__setitem__("values", "!!"), "not base64"),
    (lambda fs: fs.__setitem__("values", "A" * 10_000_000), "malformed or too long"),
    (lambda fs: fs.__setitem__("extra", 1), "malformed field 'first_step'"),
    (lambda fs: fs["tensors"].__setitem__(0, "input"), "malformed first-step table"),
])
def test_a_malformed_block_is_one_clear_line(t1, tmp_path, edit, message):
    doc = _fingerprint_doc(t1)
    edit(doc["first_step"])
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        record.load(_write_fingerprint(doc, tmp_path / "fp.json"))


def test_a_traced_tensor_dropped_from_the_block_is_refused(t1, tmp_path):
    import base64

    doc = _fingerprint_doc(t1)
    raw = _values_bytes(doc)
    names = [t[0] for t in doc["first_step"]["tensors"]]
    i = names.index("linear6.bias")  # the last tensor: drop its entry and its bytes
    assert i == len(names) - 1
    doc["first_step"]["tensors"].pop(i)
    doc["first_step"]["values"] = base64.b64encode(bytes(raw[:_offset(doc, names[i - 1]) + 4])).decode()
    with pytest.raises(InputError, match=r"the first-step block lacks linear6\.bias"):
        record.load(_write_fingerprint(doc, tmp_path / "fp.json"))


def test_a_record_whose_first_step_file_was_edited_and_rehashed_is_refused(t1, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(t1, run)
    meta = json.loads((run / "record.json").read_text())
    blob = bytearray((run / "first_step.npy").read_bytes())
    # the initial running variance of bn1 (1.0): edit its last byte in the .npy (header first)
    offset = len(blob) - len(record.load_record(t1).arrays["first_step"]) + _offset(
        {"first_step": {"tensors": meta["first_step"]}}, "initial.bn1.running_var")
    blob[offset] ^= 1
    (run / "first_step.npy").write_bytes(bytes(blob))
    meta["files"]["first_step.npy"]["sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    meta["content_sha256"] = record.record_sha256(meta)
    (run / "record.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"initial\.bn1\.running_var differs from the row-0 running statistics"):
        record.load_record(run)


def test_inputs_of_an_older_bnaudit_load_without_the_block_and_compare_without_first_step_counts(t1, tmp_path):
    doc = _fingerprint_doc(t1)
    del doc["first_step"]
    doc["schema"] = record.STATE_FINGERPRINT
    older = record.load(_write_fingerprint(doc, tmp_path / "older.json"))
    assert older.first_step is None and older.digest == record.load(t1).digest
    assert compare.compare_pair(older, record.load(t1)).identical
    assert compare.first_step_deltas(older, record.load(t1)) is None


# --------------------------------------------------------------------------- compare

def test_compare_counts_every_differing_tensor_of_the_first_step(t1, mixed):
    a = record.load(t1)
    b = record.load(t1)
    assert compare.first_step_deltas(a, b) == ()
    m = record.load(mixed)
    deltas = compare.first_step_deltas(a, m)
    # linear1.out is float32 in one run and bfloat16 in the other: no counts across dtypes
    assert deltas is not None and "linear1.out" not in {d.tensor for d in deltas}
    for d in deltas:
        va, vb = a.first_step.values[d.tensor].reshape(-1), m.first_step.values[d.tensor].reshape(-1)
        assert d.differing == int((va.view("<u4") != vb.view("<u4")).sum()) > 0
        assert d.elements == va.size and d.max_abs == float(np.max(np.abs(va.astype(np.float64) - vb)))
        assert d.scale == float(max(np.max(np.abs(va)), np.max(np.abs(vb))))


def test_a_perturbed_run_parts_at_its_initial_state_and_the_first_step_shows_the_first_matmul(t1, make_run):
    """A one-ulp change of linear1.weight[0, 0] is a training split at the initial state; the first step's detail
    starts at linear1.out, the first tensor computed from it."""
    a = record.load(t1)
    b = record.load(make_run(3, perturb="linear1.weight[0,0]:1"))
    c = compare.compare_pair(a, b)
    assert c.first.phase == "init" and c.first.tensor == "linear1.weight"  # the state differs before any step
    first = c.first_step[0]
    va, vb = a.first_step.values["linear1.out"].reshape(-1), b.first_step.values["linear1.out"].reshape(-1)
    assert (first.tensor, first.differing) == ("linear1.out", int((va.view("<u4") != vb.view("<u4")).sum()))


# --------------------------------------------------------------------------- --bundle

def test_the_bundle_of_float32_vs_bf16_mixed_reproduces_both_runs_on_this_machine(t1, mixed, cli, tmp_path):
    """bf16-mixed parts from float32 at step 0's first (autocast) matmul on every machine: the exported
    operation, run with each run's settings, computes that run's bits."""
    out = tmp_path / "bundle"
    code, stdout, stderr = cli("compare", str(t1), str(mixed), "--bundle", str(out))
    assert code == ExitCode.DIFFERENT, stderr
    assert f"bundle written to {out}" in stdout
    doc = json.loads((out / "bundle.json").read_text())
    assert (doc["op"], doc["layer"], doc["schema"]) == ("linear", "linear1", bundle.BUNDLE_SCHEMA)
    block = record.load(t1).first_step
    assert np.load(out / "input.npy").tobytes() == block.values["input"].tobytes()
    assert np.load(out / "weight.npy").tobytes() == block.values["initial.linear1.weight"].tobytes()
    row = {t.key: d for t, d in zip(LAYOUT.step_tensors, record.load_record(mixed).arrays["step_digests"][0])}
    assert doc["expected"]["linear1.out"]["b"] == format(int(row["linear1.out"]), "016x")
    assert doc["sides"]["b"]["dtype"] == "bf16-mixed" and doc["sides"]["a"]["threads"] == 1
    for side in ("a", "b"):
        proc = subprocess.run([sys.executable, "reproduce.py", side], cwd=out, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"linear1.out: {doc['expected']['linear1.out'][side]}  = run {side}" in proc.stdout
    proc = subprocess.run([sys.executable, "reproduce.py"], cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "usage: python reproduce.py a|b" in proc.stderr
    assert "reproduce.py a" in (out / "README.txt").read_text()


@pytest.mark.parametrize("other, message", [
    ("same", "--bundle needs runs whose training parts; these are identical"),
    ("perturb", "--bundle reproduces one forward operation of the first step (epoch 1, step 1); these runs first "
                "part at the initial state (phase init)"),
])
def test_a_split_that_is_not_one_forward_operation_of_the_first_step_is_refused(t1, make_run, cli, tmp_path, other,
                                                                                message):
    b = make_run(3, threads=1, dtype="float32") if other == "same" else make_run(3, perturb="linear1.weight[0,0]:1")
    code, _, stderr = cli("compare", str(t1), str(b), "--bundle", str(tmp_path / "bundle"))
    assert code == ExitCode.USAGE and message in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "bundle").exists()


def test_bundle_needs_two_inputs_and_the_values(t1, tmp_path, cli):
    code, _, stderr = cli("compare", str(t1), str(t1), str(t1), "--bundle", str(tmp_path / "b"))
    assert code == ExitCode.USAGE and "--bundle exports the split of two inputs (A B)" in stderr
    a = record.load(t1)
    split = compare.Difference(epoch=0, step=0, phase="forward", layer="linear1", tensor="linear1.out",
                               granularity="step", fraction_differing=None, max_ulps=None)
    c = dataclasses.replace(compare.compare_pair(a, a), identical=False, first=split)
    with pytest.raises(UsageError, match="older bnaudit do not carry"):
        bundle.plan(a, dataclasses.replace(a, first_step=None), c)
    plan = bundle.plan(a, a, c)
    assert plan["inputs"] == {"input": "input", "weight": "initial.linear1.weight", "bias": "initial.linear1.bias"}
    bn2 = dataclasses.replace(split, layer="bn2", tensor="bn2.running_var")
    plan = bundle.plan(a, a, dataclasses.replace(c, first=bn2))
    assert plan["op"] == "batch_norm" and plan["inputs"]["input"] == "linear2.out"
    assert (plan["eps"], plan["momentum"]) == (SPEC.model.bn_eps, SPEC.model.bn_momentum)
    assert plan["outputs"] == ["bn2.out", "bn2.running_mean", "bn2.running_var"]
    loss = dataclasses.replace(split, layer="loss", tensor="loss")
    assert bundle.plan(a, a, dataclasses.replace(c, first=loss))["inputs"] == {"input": "linear6.out",
                                                                               "target": "target"}
    grad = dataclasses.replace(split, phase="backward", tensor="linear1.weight.grad")
    with pytest.raises(UsageError, match="these runs first part at epoch 1, step 1, phase backward"):
        bundle.plan(a, a, dataclasses.replace(c, first=grad))


def test_an_existing_folder_that_is_not_a_bundle_is_never_replaced(t1, mixed, cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, stderr = cli("compare", str(t1), str(mixed), "--bundle", str(mine), "--force")
    assert code == ExitCode.OUTPUT and (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "bundle"
    assert cli("compare", str(t1), str(mixed), "--bundle", str(out))[0] == ExitCode.DIFFERENT
    code, _, stderr = cli("compare", str(t1), str(mixed), "--bundle", str(out))
    assert code == ExitCode.OUTPUT and "--force" in stderr
    assert cli("compare", str(t1), str(mixed), "--bundle", str(out), "--force")[0] == ExitCode.DIFFERENT
