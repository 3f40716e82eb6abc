"""Record and fingerprint files: round trips, and refusal of anything edited or broken."""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnaudit import fileio, record
from bnaudit.blocks import AuditBlock, DivergenceBlock
from bnaudit.errors import InputError, MismatchError, OutputError
from bnaudit.layout import keyframe_schedule


@pytest.fixture(scope="module")
def run_dir(make_run):
    return make_run(3)


def test_record_and_its_fingerprint_round_trip(run_dir):
    rec = record.load_record(run_dir)
    fp = record.load(run_dir / "fingerprint.json")
    assert fp.digest == rec.fingerprint.digest
    assert np.array_equal(fp.row_digests, rec.fingerprint.row_digests)
    assert np.array_equal(fp.group_digests, rec.fingerprint.group_digests)
    assert np.array_equal(fp.step_digests, rec.fingerprint.step_digests)
    rows = keyframe_schedule(3)
    assert fp.keyframes.tobytes() == rec.arrays["params"][rows].tobytes()
    assert fp.train_loss.tobytes() == rec.arrays["losses"][:, 0].tobytes()
    # Re-deriving the fingerprint from the loaded record gives the same file content.
    again = record.fingerprint_dict(rec.meta, rec.arrays, rec.layout)
    assert again == json.loads((run_dir / "fingerprint.json").read_text())


def test_layout_orders_tensors_as_they_are_computed(run_dir):
    layout = record.load_record(run_dir).layout
    keys = [t.key for t in layout.step_tensors]
    assert keys[0] == "linear1.out" and keys[1] == "bn1.out"
    assert keys.index("loss") < keys.index("linear6.bias.grad") < keys.index("linear1.weight.grad")
    assert keys.index("linear1.weight.grad") < keys.index("linear1.weight.momentum_buffer") < keys.index(
        "linear1.weight")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(spec_hash="0" * 64), "spec_hash does not match"),
    (lambda d: d["steps"].append(dict(d["steps"][0])), "repeated or out of order"),
    (lambda d: d.update(epoch_groups=[]), "tensor layout does not match"),
    (lambda d: d["epoch_digests"].__setitem__(0, "-" + "0" * 15), "16-digit lowercase hex"),
    (lambda d: d.update(digest="f" * 64), "digest does not match"),
    (lambda d: d["epoch_digests"].__setitem__(1, "0" * 16), "digest does not match"),
    (lambda d: d.update(epochs_run=2), r"epoch_group_digests' has \d+ bytes, expected \d+"),
    (lambda d: d.update(schema="bnaudit.fingerprint/99"), "is not bnaudit.fingerprint/3"),
    (lambda d: d.pop("steps"), "missing field 'steps'"),
    (lambda d: d.update(storage="float16"), "unknown storage dtype"),
    (lambda d: d["snapshots"].update(params="!!"), "not base64"),
    (lambda d: d["spec"]["train"].update(lr=0.02), "spec_hash does not match"),
    (lambda d: d["steps"][0].update(digests=d["steps"][0]["digests"][:-16]), r"a step row has \d+ digests, expected"),
    (lambda d: d["steps"][0].update(digests="g" + d["steps"][0]["digests"][1:]), "a step row holds a non-hex digest"),
    (lambda d: d["steps"][0].update(epoch=-1), "a step row's epoch or step is out of range"),
    (lambda d: d["steps"][0].update(step=1 << 31), "a step row's epoch or step is out of range"),
    (lambda d: d["steps"][-1].update(epoch=3), "traced steps are out of range, repeated or out of order"),
    (lambda d: d.update(steps={}), "field 'steps' has the wrong type"),
    (lambda d: d["state_digests"].pop(), "3 state digests for 3 epochs"),
    (lambda d: d.update(state_digests="x"), "field 'state_digests' has the wrong type"),
    (lambda d: d["state_digests"].__setitem__(0, "X" * 16), "field 'state_digests' must be a list of 16-digit"),
    (lambda d: d["state_digests"].__setitem__(1, "0" * 16), "digest does not match"),
    (lambda d: d["epoch_digests"].pop(), "3 epoch digests for 3 epochs"),
    (lambda d: d["snapshots"].update(rows=[0, 1]), "snapshot rows are not the schedule for 3 epochs"),
    (lambda d: d["losses"].update(train=["zz"]), "malformed losses"),
    (lambda d: d["losses"]["train"].pop(), "losses do not cover 3 epochs"),
    (lambda d: d["epoch_groups"].__setitem__(0, ["forward"]), "malformed epoch_groups"),
])
def test_edited_fingerprints_are_refused(run_dir, tmp_path, edit, message):
    data = json.loads((run_dir / "fingerprint.json").read_text())
    edit(data)
    path = tmp_path / "fp.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"content_sha256 does not match|is not bnaudit\.fingerprint/3"):
        record.load(path)
    # Re-sealed with a matching checksum, the field-by-field checks still catch the edit.
    data["content_sha256"] = record.content_sha256(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        record.load(path)


def test_edited_or_incomplete_records_are_refused(run_dir, tmp_path):
    copy = tmp_path / "rec"
    shutil.copytree(run_dir, copy)
    params = np.load(copy / "params.npy")
    params[2, 3] = np.nextafter(params[2, 3], np.float32(9))
    np.save(copy / "params.npy", params)
    with pytest.raises(InputError, match="sha256 does not match"):
        record.load_record(copy)
    (copy / "record.json").unlink()
    with pytest.raises(InputError, match="not a complete bnaudit record"):
        record.load(copy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000), junk=st.binary(max_size=64))
def test_truncated_or_garbled_fingerprints_never_load(run_dir, tmp_path, cut, junk):
    text = (run_dir / "fingerprint.json").read_bytes()
    broken = text[: cut * len(text) // 10_001] + junk
    path = tmp_path / "broken.json"
    path.write_bytes(broken)
    with pytest.raises(InputError):
        record.load(path)


def test_oversized_and_non_object_files(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (fileio.MAX_JSON_BYTES + 1))
    with pytest.raises(InputError, match="larger than any fingerprint"):
        record.load(big)
    for text in ("[]", "NaN", '"x"', "{\"schema\": 1}"):
        path = tmp_path / "odd.json"
        path.write_text(text)
        with pytest.raises(InputError):
            record.load(path)


def test_output_folder_is_never_overwritten_by_default(run_dir):
    from bnaudit.errors import OutputError

    with pytest.raises(OutputError, match="already holds a record; choose another folder or pass --force"):
        fileio.prepare_output(run_dir, force=False, kind="record")


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    """Shared by records, frozen inputs, the reference and reports: old or new, never a mix, no litter."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with fileio.atomic_folder(out, "test") as tmp:
        assert tmp.parent == tmp_path and not out.joinpath("new.txt").exists()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"], "the old folder's files are gone"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folder left"

    with pytest.raises(KeyboardInterrupt), fileio.atomic_folder(out, "test") as tmp:
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"], "an interrupted write leaves the old folder"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    with pytest.raises(OutputError, match=r"^cannot write test to .*out: ") as info, \
            fileio.atomic_folder(out, "test") as tmp:
        (tmp / "missing" / "x").write_text("no such folder")
    assert "\n" not in info.value.message
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _forge_params(src, dst, row: int, column: int) -> None:
    """Move one stored parameter by one unit in the last place; re-seal params.npy's sha256 and record.json.

    What a forger who recomputes every unkeyed hash does: only the digests, which every
    fingerprint and baseline of the genuine run summarises, are left to catch it.
    """
    shutil.copytree(src, dst)
    params = np.load(dst / "params.npy")
    params[row, column] = np.nextafter(params[row, column], np.float32(np.inf))
    blob = fileio.npy_bytes(params)
    (dst / "params.npy").write_bytes(blob)
    meta = json.loads((dst / "record.json").read_text())
    import hashlib

    meta["files"]["params.npy"]["sha256"] = hashlib.sha256(blob).hexdigest()
    meta["content_sha256"] = record.record_sha256(meta)
    (dst / "record.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("row", [4, 5])
def test_values_edited_at_any_row_are_refused_even_with_their_sha256_updated(make_run, tmp_path, row):
    """Row 4 is one the fingerprint of a 6-epoch run does not carry exactly; row 5 is one it does."""
    assert 4 not in keyframe_schedule(6) and 5 in keyframe_schedule(6)
    _forge_params(make_run(6), tmp_path / "forged", row, 7)
    with pytest.raises(InputError, match=rf"params.npy row {row} \(linear1.weight\) does not match its digest"):
        record.load_record(tmp_path / "forged")


def test_pipes_and_devices_are_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(InputError, match="not a regular file"):
            record.load(path)
        with pytest.raises(InputError, match="not a regular file"):
            fileio.read_npy(path, "0" * 64, against="test")


@pytest.mark.parametrize("edit", [
    lambda m: m["config"]["controls"].update(threads=2),
    lambda m: m["environment"].update(cpu_model="another CPU"),
    lambda m: m.update(frozen="0" * 64),
    lambda m: m["extra"].update(note="added"),
    lambda m: m.update(nonfinite={"epoch": 0}),
])
def test_edited_record_facts_are_refused(run_dir, tmp_path, edit):
    shutil.copytree(run_dir, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "record.json").read_text())
    edit(meta)
    (tmp_path / "r" / "record.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"record\.json does not match its content_sha256"):
        record.load(tmp_path / "r")


def test_records_of_the_unsealed_schema_are_refused_with_a_reason(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "record.json").read_text())
    meta["schema"] = "bnaudit.record/1"
    del meta["content_sha256"]
    (tmp_path / "r" / "record.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"older bnaudit \(bnaudit.record/1\).*use its fingerprint.json"):
        record.load(tmp_path / "r")
    assert record.load(tmp_path / "r" / "fingerprint.json").digest == record.load(run_dir).digest


# --------------------------------------------------------------------------- state digests, and older inputs

def _reseal(folder, meta, **arrays) -> None:
    """Write ``arrays`` into a record folder, their sha256 into ``meta``, and re-seal record.json."""
    import hashlib

    for name, array in arrays.items():
        blob = fileio.npy_bytes(array)
        (folder / f"{name}.npy").write_bytes(blob)
        meta["files"][f"{name}.npy"]["sha256"] = hashlib.sha256(blob).hexdigest()
    meta["content_sha256"] = record.record_sha256(meta)
    (folder / "record.json").write_text(json.dumps(meta))


def _redigest(meta, rec, state) -> None:
    meta["digest"] = record.overall_digest(meta["spec_hash"], meta["storage"], rec.fingerprint.row_digests,
                                           rec.arrays["step_rows"], rec.arrays["step_digests"], state)


def _as_older_bnaudit(src, dst):
    """A record folder as bnaudit wrote it before state digests: record/2 and fingerprint/1, byte for byte the same
    but for state_digests.npy, its entry, the fingerprint's state_digests and the older overall digest."""
    shutil.copytree(src, dst)
    rec = record.load_record(src)
    (dst / "state_digests.npy").unlink()
    meta = json.loads((dst / "record.json").read_text())
    del meta["files"]["state_digests.npy"]
    meta["schema"] = "bnaudit.record/2"
    _redigest(meta, rec, None)
    _reseal(dst, meta)
    fp = json.loads((dst / "fingerprint.json").read_text())
    del fp["state_digests"]
    fp.update(schema="bnaudit.fingerprint/1", digest=meta["digest"])
    fp["content_sha256"] = record.content_sha256(fp)
    (dst / "fingerprint.json").write_text(json.dumps(fp))
    return dst


def test_the_state_digest_of_a_row_is_the_digest_of_its_parameters_then_its_running_statistics(run_dir):
    rec = record.load_record(run_dir)
    params, buffers = rec.arrays["params"], rec.arrays["buffers"]
    expected = [record.digest(params[r].tobytes() + buffers[r].tobytes()) for r in range(len(params))]
    assert rec.arrays["state_digests"].tolist() == expected == rec.fingerprint.state_digests.tolist()
    assert record.load(run_dir / "fingerprint.json").state_digests.tolist() == expected
    state = rec.arrays["state_digests"]
    _redigest(meta := dict(rec.meta), rec, state)
    assert rec.fingerprint.digest == meta["digest"]
    older = rec.fingerprint.legacy()
    assert older.state_digests is None and older.digest != rec.fingerprint.digest
    _redigest(meta, rec, None)
    assert older.digest == meta["digest"]


def test_a_state_digest_edited_alone_is_refused(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "r")
    rec = record.load_record(run_dir)
    state = rec.arrays["state_digests"].copy()
    state[2] ^= np.uint64(1)
    meta = json.loads((tmp_path / "r" / "record.json").read_text())
    _redigest(meta, rec, state)
    _reseal(tmp_path / "r", meta, state_digests=state)
    with pytest.raises(InputError, match=r"params.npy or buffers.npy row 2 does not match its state digest"):
        record.load(tmp_path / "r")


def test_values_edited_with_their_state_digest_recomputed_never_compare_identical(make_run, tmp_path):
    """The forger recomputes every file hash, the row's state digest, the digest and the seal: a new identity."""
    from bnaudit import compare

    genuine = make_run(6)
    _forge_params(genuine, tmp_path / "forged", 4, 7)
    forged = tmp_path / "forged"
    rec = record.load_record(genuine)
    params = np.load(forged / "params.npy")
    state = record.state_digests(params, rec.arrays["buffers"])
    meta = json.loads((forged / "record.json").read_text())
    _redigest(meta, rec, state)
    _reseal(forged, meta, state_digests=state)
    fp = record.load(forged)
    assert fp.digest != rec.fingerprint.digest
    assert fp.row_digests.tolist() == rec.fingerprint.row_digests.tolist()  # the per-tensor digests are the genuine
    for other in (genuine, genuine / "fingerprint.json"):
        with pytest.raises(InputError, match=", after epoch 4: different state digests but equal parameter"):
            compare.compare_pair(fp, record.load(other))
    older = _as_older_bnaudit(genuine, tmp_path / "older")
    for other in (older, older / "fingerprint.json"):  # no state digests there: the forged record's tensors are checked
        with pytest.raises(InputError, match=r"params.npy row 4 \(linear1.weight\) does not match its digest"):
            compare.compare_pair(record.load(forged), record.load(other))


def test_inputs_of_an_older_bnaudit_still_load_and_compare_as_it_did(run_dir, tmp_path):
    from bnaudit import compare

    older = _as_older_bnaudit(run_dir, tmp_path / "older")
    new = record.load(run_dir)
    for view in (record.load(older), record.load(older / "fingerprint.json")):
        assert view.state_digests is None and view.digest == new.legacy().digest
        assert compare.compare_pair(view, new).identical and compare.compare_pair(new, view).identical
        assert len(compare.compare_many([new, view, record.load(run_dir / "fingerprint.json")]).classes) == 1
    assert json.loads((older / "record.json").read_text())["schema"] == "bnaudit.record/2"
    _forge_params(older, tmp_path / "older-forged", 2, 3)
    with pytest.raises(InputError, match=r"params.npy row 2 \(linear1.weight\) does not match its digest"):
        record.load(tmp_path / "older-forged")  # a record/2 has only its per-tensor digests: checked when loaded


def test_a_fingerprint_carries_the_first_steps_values_and_an_older_input_none(run_dir, tmp_path):
    fp, rec = record.load(run_dir / "fingerprint.json"), record.load(run_dir)
    assert fp.first_step is not None and fp.first_step.blob() == rec.first_step.blob()
    assert list(fp.first_step.values)[:2] == ["input", "target"]
    older = _as_older_bnaudit(run_dir, tmp_path / "older")
    for view in (record.load(older), record.load(older / "fingerprint.json")):
        assert view.first_step is None


# --------------------------------------------------------------------------- writing, in this process

_WRITTEN = ("digest", "nonfinite", "probe_rows", "train_seconds", "layout", "first_step", "files", "content_sha256")
"""The record.json fields ``write_record`` adds to ``new_meta``'s."""


def _result_of(rec) -> record.RunResult:
    a = rec.arrays
    return record.RunResult(
        params=a["params"], buffers=a["buffers"], train_loss=a["losses"][:, 0], test_loss=a["losses"][:, 1],
        step_loss=a["step_loss"], min_var_over_eps=a["min_var"], epoch_digests=a["epoch_digests"],
        step_rows=a["step_rows"], step_digests=a["step_digests"], probe_rows=np.array(rec.meta["probe_rows"]),
        probe=a["probe"], nonfinite=rec.meta["nonfinite"], train_seconds=rec.meta["train_seconds"],
        first_step=rec.fingerprint.first_step)


@pytest.mark.parametrize("epochs, controls", [(3, {}), (2, {"dtype": "bfloat16"})])
def test_a_record_written_again_from_what_it_holds_is_the_same_bytes(make_run, tmp_path, epochs, controls):
    """The runs are written in their own process; here write_record, fingerprint_dict and layout_dict run in this
    one on the same measurements, and every file comes out byte for byte as the run wrote it."""
    src = make_run(epochs, **controls)
    rec = record.load_record(src)
    meta = {k: v for k, v in rec.meta.items() if k not in _WRITTEN}
    fp = record.write_record(tmp_path / "again", meta, _result_of(rec), rec.layout)
    names = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == names
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (src / name).read_bytes(), name
    assert fp == json.loads((src / "fingerprint.json").read_text())
    with pytest.raises(OutputError):
        record.write_record(tmp_path / "again", meta, _result_of(rec), rec.layout)  # never over a record unasked
    record.write_record(tmp_path / "again", meta, _result_of(rec), rec.layout, force=True)
    assert (tmp_path / "again" / "record.json").read_bytes() == (src / "record.json").read_bytes()


def test_a_result_without_first_step_values_and_of_other_float_widths_is_written_in_the_records_format(
        run_dir, tmp_path):
    rec = record.load_record(run_dir)
    meta = {k: v for k, v in rec.meta.items() if k not in _WRITTEN}
    result = dataclasses.replace(_result_of(rec), first_step=None, train_loss=rec.arrays["losses"][:, 0].astype("<f4"),
                                 step_loss=rec.arrays["step_loss"].astype(">f8"),
                                 min_var_over_eps=rec.arrays["min_var"].astype("<f4"))
    record.write_record(tmp_path / "w", meta, result, rec.layout)
    written = json.loads((tmp_path / "w" / "record.json").read_text())
    assert written["first_step"] == []
    for name in ("losses", "step_loss", "min_var"):
        assert np.load(tmp_path / "w" / f"{name}.npy").dtype.str == "<f8", name
    assert np.load(tmp_path / "w" / "first_step.npy").size == 0


def test_new_meta_is_the_record_json_a_run_starts_from(run_dir):
    rec = record.load_record(run_dir)
    m = rec.meta
    made = record.new_meta(spec=rec.spec, frozen_digest=m["frozen"], config=m["config"], storage=m["storage"],
                           effective=m["effective"], environment=m["environment"], created=m["created"])
    assert {k: v for k, v in made.items() if k != "extra"} == {k: v for k, v in m.items()
                                                               if k not in (*_WRITTEN, "extra")}
    assert made["schema"] == record.RECORD_SCHEMA == "bnaudit.record/4" and made["kind"] == "record"
    assert made["epochs_run"] == m["config"]["epochs"] == 3 and made["extra"] == {}


def test_the_layout_written_is_the_specs(run_dir):
    rec = record.load_record(run_dir)
    lay = record.layout_dict(rec.layout)
    assert lay == rec.meta["layout"]
    assert lay["params"][0] == ["linear1.weight", [16, 5]] and lay["bn_layers"][0] == "bn1"
    assert lay["step_tensors"][0] == ["forward", "linear1", "linear1.out"]
    assert set(lay) == {"step_tensors", "epoch_tensors", "params", "buffers", "bn_layers", "modules", "probe_width"}


# --------------------------------------------------------------------------- views and their pieces

@pytest.mark.parametrize("kind", ["record", "fingerprint"])
def test_a_prefix_of_a_longer_run_is_the_shorter_run(make_run, kind):
    """Epoch e trains from what came before it only: 3 epochs of a 6-epoch run are the 3-epoch run, bit for bit."""
    long, short = make_run(6), make_run(3)
    view = record.load(long if kind == "record" else long / "fingerprint.json")
    genuine = record.load(short if kind == "record" else short / "fingerprint.json")
    cut = record.prefix(view, 3)
    assert cut.digest == genuine.digest and cut.epochs == 3 and cut.config["epochs"] == 3
    for field in ("row_digests", "group_digests", "state_digests", "step_rows", "step_digests", "keyframe_rows",
                  "keyframes", "train_loss", "test_loss"):
        assert getattr(cut, field).tobytes() == getattr(genuine, field).tobytes(), field
    if kind == "record":
        assert cut.epoch_digests.tobytes() == genuine.epoch_digests.tobytes()
    else:
        assert cut.epoch_digests is None
    assert cut.divergence is None and "divergence" not in cut.extra
    assert cut.audit == view.audit and {k for k in cut.extra} == {k for k in view.extra} - {"divergence"}
    assert record.prefix(view, 6) is view
    for bad in (0, 7):
        with pytest.raises(MismatchError) as exc:
            record.prefix(view, bad)
        assert exc.value.message == f"{view.source} covers 6 epochs; cannot check {bad}"


def test_a_prefix_of_an_older_input_keeps_its_older_digest(run_dir, tmp_path, make_run):
    older = record.load(_as_older_bnaudit(make_run(6), tmp_path / "older") / "fingerprint.json")
    cut = record.prefix(older, 3)
    assert cut.state_digests is None and cut.digest == record.load(run_dir).legacy().digest


def test_the_blocks_of_extra_are_decoded_once_each(make_run):
    from bnaudit.blocks import AuditBlock, ChaosFloor, DivergenceBlock

    plain = record.load(make_run(3))
    perturbed = record.load(make_run(3, perturb="linear1.weight[0,0]:1"))
    blocks = record.decode_extra(perturbed.extra, "here")
    assert set(blocks) == {"divergence", "audit", "floor"}
    assert isinstance(blocks["audit"], AuditBlock) and isinstance(blocks["floor"], ChaosFloor)
    assert blocks["divergence"] is None or isinstance(blocks["divergence"], DivergenceBlock)
    assert record.decode_extra(plain.extra, "here")["floor"] is None
    assert (perturbed.audit.rows, perturbed.audit.every) == (blocks["audit"].rows, blocks["audit"].every)
    assert perturbed.floor.twin_digest_rows == blocks["floor"].twin_digest_rows
    assert perturbed.floor.max_ulps == blocks["floor"].max_ulps and perturbed.floor.max_ulps[0] == 1
    for empty in ({}, None, "x", []):
        assert record.decode_extra(empty, "here") == {"divergence": None, "audit": None, "floor": None}


def test_group_and_row_digests_by_their_definition(run_dir):
    rec = record.load_record(run_dir)
    digests = rec.arrays["epoch_digests"]
    groups = rec.layout.groups()
    found = record.group_digests(rec.layout.epoch_tensors, digests, groups)
    assert found.dtype == np.uint32 and found.shape == (len(digests), len(groups))
    for j, g in enumerate(groups):
        cols = [i for i, t in enumerate(rec.layout.epoch_tensors) if (t.phase, t.layer) == g]
        for r in (0, len(digests) - 1):
            expected = record.digest(digests[r, cols].astype("<u8").tobytes()) & 0xFFFFFFFF
            assert int(found[r, j]) == expected, (g, r)
    rows = record.row_digests(digests)
    assert rows.dtype == np.uint64
    assert [int(x) for x in rows] == [record.digest(digests[r].astype("<u8").tobytes()) for r in range(len(digests))]


def test_the_content_checksum_covers_everything_but_itself_and_the_baseline_block(run_dir):
    doc = json.loads((run_dir / "fingerprint.json").read_text())
    sealed = record.content_sha256(doc)
    assert sealed == doc["content_sha256"]
    assert record.content_sha256({**doc, "content_sha256": "x"}) == sealed
    assert record.content_sha256({**doc, "extra": {**doc["extra"], "baseline": {"made_from": "a"}}}) == sealed
    assert record.content_sha256({**doc, "extra": {**doc["extra"], "note": 1}}) != sealed
    assert record.content_sha256({**doc, "created": "yesterday"}) != sealed
    body = {k: v for k, v in doc.items() if k != "content_sha256"}
    assert sealed == fileio.canonical_sha256(body)
    meta = json.loads((run_dir / "record.json").read_text())
    assert record.record_sha256(meta) == meta["content_sha256"] == fileio.canonical_sha256(
        {k: v for k, v in meta.items() if k != "content_sha256"})


def test_a_records_tensor_check_runs_once_and_only_for_an_older_input(run_dir, monkeypatch):
    calls = []
    real = record.verify_tensor_digests
    monkeypatch.setattr(record, "verify_tensor_digests", lambda *a, **k: calls.append(a) or real(*a, **k))
    view = record.load(run_dir)
    assert calls == [] and isinstance(view.tensor_check, record.TensorCheck) and not view.tensor_check.done
    assert record.comparable([view, view]) == [view, view] and calls == []
    older = view.legacy()
    assert len(calls) == 1 and view.tensor_check.done and older.tensor_check is None
    view.legacy()
    assert len(calls) == 1 and older.legacy() is older


def test_a_fingerprint_listing_more_traced_steps_than_any_run_has_is_refused(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(record, "MAX_STEP_ROWS", 3)
    data = json.loads((run_dir / "fingerprint.json").read_text())
    assert len(data["steps"]) > 3
    with pytest.raises(InputError, match="field 'steps' lists more than 3 traced steps"):
        record.load(run_dir / "fingerprint.json")


# --------------------------------------------------------------------------- every refusal, word for word

def _le64(values) -> bytes:
    """Integers as the 8-byte little-endian words the digests are defined over."""
    return b"".join(int(v).to_bytes(8, "little") for v in values)


def _expected_overall(spec_hash, storage, rows, step_rows, step_digests, state=None) -> str:
    """The overall digest by its definition: header, epoch-row digests, epoch-0 steps' digests, state digests."""
    h = hashlib.sha256(f"{spec_hash}:{storage}:{len(rows)}:".encode())
    h.update(_le64(rows))
    for (e, _), d in zip(step_rows, step_digests):
        if int(e) == 0:
            h.update(_le64(d))
    if state is not None:
        h.update(b"state:" + _le64(state))
    return h.hexdigest()


def _fp_refusal(run_dir, tmp_path, edit):
    """A run's fingerprint, edited and re-sealed: (its path, the InputError loading it raises)."""
    data = json.loads((run_dir / "fingerprint.json").read_text())
    edit(data)
    data["content_sha256"] = record.content_sha256(data)
    path = tmp_path / "fp.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        record.load(path)
    return path, info.value.message


def _set(d, key, value):
    d[key] = value


def _first_step(d, **fields):
    d["steps"][0] = {**d["steps"][0], **fields}


def _flip_last_first_step_byte(d):
    """One bit of the first step's last value (linear6.bias after the update), base64 kept valid."""
    raw = bytearray(base64.b64decode(d["first_step"]["values"]))
    raw[-1] ^= 1
    d["first_step"]["values"] = base64.b64encode(bytes(raw)).decode()


_MAX_EPOCHS = 1000  # the default spec's train.epochs


@pytest.mark.parametrize("edit, message", [
    (lambda d: _set(d, "epochs_run", 0), re.escape("epochs_run 0 out of range")),
    (lambda d: _set(d, "epochs_run", _MAX_EPOCHS + 1), re.escape(f"epochs_run {_MAX_EPOCHS + 1} out of range")),
    # 1 and the spec's epochs are in range: the refusal comes later, from arrays sized for 3 epochs.
    (lambda d: _set(d, "epochs_run", 1), r"field 'epoch_group_digests' has \d+ bytes, expected \d+"),
    (lambda d: _set(d, "epochs_run", _MAX_EPOCHS), r"field 'epoch_group_digests' has \d+ bytes, expected \d+"),
    (lambda d: _set(d, "digest", "abc"), "malformed digest"),
    (lambda d: d["spec"]["train"].update(lr="fast"),
     re.escape("stored spec is invalid (spec: train.lr must be a finite number, got 'fast')")),
    (lambda d: d["config"].update(controls="x"), re.escape("config.controls is malformed")),
    (lambda d: d["config"].update(perturb="x"), re.escape("config.perturb is malformed")),
    (lambda d: d["config"].update(perturb={"tensor": "linear1.weight"}), re.escape("config.perturb is malformed")),
    (lambda d: _set(d, "step_tensors", [["forward", "linear1"]]), "malformed tensor layout"),
    (lambda d: _set(d, "step_tensors", [[1, 2, 3], *d["step_tensors"][1:]]), "malformed tensor layout"),
    (lambda d: d["steps"][0].pop("epoch"), "missing field 'epoch'"),
    (lambda d: _first_step(d, digests=d["steps"][0]["digests"][:-16]), "a step row has 87 digests, expected 88"),
    (lambda d: _first_step(d, epoch=1 << 31), "a step row's epoch or step is out of range"),
    (lambda d: _first_step(d, step=1 << 31), "a step row's epoch or step is out of range"),
    (lambda d: d["steps"][-1].update(step=10), "traced steps are out of range, repeated or out of order"),
    # A traced step moved out of epoch 0 leaves the digest, which covers epoch 0's steps only.
    (lambda d: d["steps"][-1].update(epoch=1), re.escape("digest does not match the digests it summarises "
                                                          "(edited or corrupt)")),
    (lambda d: _set(d, "epoch_group_digests", 5), "field 'epoch_group_digests' has the wrong type"),
    (lambda d: d["epoch_digests"].__setitem__(0, "X" * 16),
     "field 'epoch_digests' must be a list of 16-digit lowercase hex digests"),
    (lambda d: d["state_digests"].__setitem__(0, "X" * 16),
     "field 'state_digests' must be a list of 16-digit lowercase hex digests"),
    (lambda d: d["snapshots"].pop("rows"), "missing field 'rows'"),
    (lambda d: d["snapshots"].update(params="!!"), "field 'snapshots' is not base64"),
    (lambda d: d["losses"].pop("train"), "missing field 'train'"),
    (lambda d: _set(d, "extra", {"operator_audit": "x"}), re.escape("operator-audit block: missing field 'schema'")),
    (lambda d: _set(d, "extra", {"divergence": "x"}), re.escape("divergence block: missing field 'schema'")),
    (lambda d: _set(d, "extra", {"perturbation": "x"}),
     re.escape("perturbation block: missing field 'twin_digest_rows'")),
    (lambda d: d["first_step"].update(values="!!"), re.escape("field 'first_step' values are not base64")),
    (lambda d: _flip_last_first_step_byte(d),
     re.escape("first-step values of linear6.bias do not match the step's digest (edited or corrupt)")),
])
def test_fingerprint_refusals_name_the_file_and_the_fault(run_dir, tmp_path, edit, message):
    path, found = _fp_refusal(run_dir, tmp_path, edit)
    assert re.fullmatch(re.escape(f"{path}: ") + message, found), found


def test_a_fingerprint_of_an_unknown_schema_is_named_in_forty_characters(run_dir, tmp_path):
    path, found = _fp_refusal(run_dir, tmp_path, lambda d: _set(d, "schema", "x" * 50))
    assert found == f"{path}: schema {'x' * 40!r} is not {record.FINGERPRINT_SCHEMA}"
    path.write_text("{}")
    with pytest.raises(InputError) as info:
        record.load(path)
    assert info.value.message == f"{path}: missing field 'schema'"


def test_a_fingerprint_view_holds_every_field_of_its_file(run_dir):
    path = run_dir / "fingerprint.json"
    doc = json.loads(path.read_text())
    meta = json.loads((run_dir / "record.json").read_text())
    fp = record.load(path)
    assert fp.source == str(path)
    assert (fp.frozen, fp.config, fp.effective, fp.environment) == (
        doc["frozen"], doc["config"], doc["effective"], doc["environment"])
    assert fp.epoch_tensors == () and fp.epoch_digests is None and fp.nonfinite is None
    assert fp.params == tuple((name, tuple(shape)) for name, shape in meta["layout"]["params"])
    assert fp.extra == doc["extra"] and set(fp.extra) == {"divergence", "operator_audit"}
    assert isinstance(fp.divergence, DivergenceBlock) and isinstance(fp.audit, AuditBlock) and fp.floor is None
    assert fp.keyframe_rows.dtype == np.int64 and fp.keyframe_rows.tolist() == keyframe_schedule(3)
    assert fp.step_rows.dtype == np.int64 and fp.step_rows.shape == (10, 2)
    assert fp.step_digests.dtype == np.uint64 and fp.step_digests.shape == (10, 88)


def test_a_record_view_holds_every_field_of_its_folder(run_dir):
    meta = json.loads((run_dir / "record.json").read_text())
    losses = np.load(run_dir / "losses.npy")
    for where in (run_dir, run_dir / "record.json"):
        rec = record.load_record(where)
        assert rec.path == run_dir
        fp = rec.fingerprint
        assert fp.source == str(run_dir) and fp.digest == meta["digest"]
        assert (fp.frozen, fp.config, fp.effective, fp.environment) == (
            meta["frozen"], meta["config"], meta["effective"], meta["environment"])
        assert fp.params == tuple((name, tuple(shape)) for name, shape in meta["layout"]["params"])
        assert fp.train_loss.tobytes() == losses[:, 0].tobytes() and fp.test_loss.tobytes() == losses[:, 1].tobytes()
        assert not np.array_equal(losses[:, 0], losses[:, 1])
        assert fp.extra == meta["extra"] and isinstance(fp.divergence, DivergenceBlock)
        assert fp.tensor_check.done is False
    assert record.load(run_dir / "record.json").digest == meta["digest"]


def test_nonfinite_and_a_missing_extra_are_carried_as_written(run_dir, tmp_path):
    event = {"epoch": 1, "step": 2, "phase": "forward", "layer": "bn1", "tensor": "bn1.out"}
    data = json.loads((run_dir / "fingerprint.json").read_text())
    data["nonfinite"] = event
    del data["extra"]
    data["content_sha256"] = record.content_sha256(data)
    (tmp_path / "fp.json").write_text(json.dumps(data))
    fp = record.load(tmp_path / "fp.json")
    assert fp.nonfinite == event and fp.extra == {} and fp.audit is None and fp.divergence is None
    shutil.copytree(run_dir, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "record.json").read_text())
    meta["nonfinite"] = event
    del meta["extra"]
    _reseal(tmp_path / "r", meta)
    view = record.load(tmp_path / "r")
    assert view.nonfinite == event and view.extra == {} and view.audit is None


def _record_refusal(run_dir, tmp_path, edit, reseal=True):
    folder = tmp_path / "r"
    shutil.copytree(run_dir, folder)
    meta = json.loads((folder / "record.json").read_text())
    edit(meta)
    if reseal:
        _reseal(folder, meta)
    else:
        (folder / "record.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as info:
        record.load_record(folder)
    return folder, info.value.message


def _param0(m, value):
    m["layout"]["params"][0] = value


_LAYOUT_CHANGED = "layout does not match its spec (written by another bnaudit version?)"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["layout"].update(params="x"), "field 'params' has the wrong type"),
    (lambda m: _param0(m, {"a": 1, "b": 2}), "malformed parameter layout"),
    (lambda m: _param0(m, ["linear1.weight", [16, 5], "x"]), "malformed parameter layout"),
    (lambda m: _param0(m, [5, [16, 5]]), "malformed parameter layout"),
    (lambda m: _param0(m, ["linear1.weight", {}]), "malformed parameter layout"),
    (lambda m: _param0(m, ["linear1.weight", [16, 0]]), "malformed parameter layout"),
    (lambda m: _param0(m, ["linear1.weight", [1 << 20, 5]]), "malformed parameter layout"),
    (lambda m: _param0(m, ["linear1.weight", [(1 << 20) - 1, 5]]), _LAYOUT_CHANGED),
    (lambda m: m["layout"]["step_tensors"].__setitem__(0, ["forward", "linear1"]), "malformed tensor layout"),
    (lambda m: m["layout"]["epoch_tensors"].__setitem__(0, [1, 2, 3]), "malformed tensor layout"),
    (lambda m: m["layout"]["step_tensors"].reverse(), _LAYOUT_CHANGED),
    (lambda m: m["layout"]["epoch_tensors"].reverse(), _LAYOUT_CHANGED),
    (lambda m: m["layout"]["params"].reverse(), _LAYOUT_CHANGED),
    (lambda m: m["layout"].pop("step_tensors"), "missing field 'step_tensors'"),
    (lambda m: m.update(epochs_run=0), "epochs_run 0 out of range"),
    (lambda m: m.update(probe_rows=[0]), "probe rows are not the schedule for 3 epochs"),
    (lambda m: m.update(digest="f" * 64), "digest does not match the record's digests (edited or corrupt)"),
    (lambda m: m["files"].pop("probe.npy"), "missing field 'sha256'"),
    (lambda m: m.update(schema="y" * 50), f"schema {'y' * 40!r} is not {record.RECORD_SCHEMA}"),
    (lambda m: m.update(extra={"operator_audit": "x"}), "operator-audit block: missing field 'schema'"),
])
def test_record_refusals_name_the_folder_and_the_fault(run_dir, tmp_path, edit, message):
    folder, found = _record_refusal(run_dir, tmp_path, edit)
    assert found == f"{folder}: {message}"


def test_record_json_without_a_schema_or_of_the_first_schema_is_refused_in_words(run_dir, tmp_path):
    folder, found = _record_refusal(run_dir, tmp_path, lambda m: m.clear(), reseal=False)
    assert found == f"{folder}: missing field 'schema'"
    shutil.rmtree(folder)
    folder, found = _record_refusal(
        run_dir, tmp_path, lambda m: (m.update(schema="bnaudit.record/1"), m.pop("content_sha256")), reseal=False)
    assert found == (f"{folder}: a record of an older bnaudit (bnaudit.record/1), whose record.json carries no "
                     "checksum of its own; run it again, or use its fingerprint.json")


def test_array_files_are_checked_against_record_json_byte_dtype_and_shape(run_dir, tmp_path):
    folder = tmp_path / "r"
    shutil.copytree(run_dir, folder)
    meta = json.loads((folder / "record.json").read_text())
    params, probe = np.load(folder / "params.npy"), np.load(folder / "probe.npy")
    blob = bytearray((folder / "params.npy").read_bytes())
    blob[-1] ^= 1
    (folder / "params.npy").write_bytes(bytes(blob))
    with pytest.raises(InputError) as info:
        record.load_record(folder)
    assert info.value.message == f"{folder / 'params.npy'}: sha256 does not match record.json (tampered or corrupt)"
    _reseal(folder, meta, params=params.astype("<f8"))
    with pytest.raises(InputError) as info:
        record.load_record(folder)
    assert info.value.message == (f"{folder / 'params.npy'}: expected <f4 {params.shape}, "
                                  f"found <f8 {params.shape}")
    _reseal(folder, meta, params=params, probe=probe[:-1])
    with pytest.raises(InputError) as info:
        record.load_record(folder)
    assert info.value.message == (f"{folder / 'probe.npy'}: expected <f4 {probe.shape}, "
                                  f"found <f4 {probe[:-1].shape}")


def test_folders_without_record_json_are_named_and_leftovers_recognised(tmp_path):
    for name, hint in ((".out.partial-x1y2", " (an interrupted run's leftovers)"), ("out", ""),
                       (".hidden", ""), ("out.partial-x1y2", "")):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(InputError) as info:
            record.load_record(folder)
        assert info.value.message == f"{folder}: not a complete bnaudit record (no record.json){hint}"
    with pytest.raises(InputError) as info:
        record.load(tmp_path / "nothing.json")
    assert info.value.message == f"{tmp_path / 'nothing.json'}: no such file or folder"


def test_a_broken_record_json_is_refused_as_a_record_however_it_is_named(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "r")
    path = tmp_path / "r" / "record.json"
    meta = json.loads(path.read_text())
    (tmp_path / "r" / "copy.json").write_text(json.dumps(meta))
    assert record.load(tmp_path / "r" / "copy.json").digest == meta["digest"]  # a record.json by another name
    path.write_text("{not json")
    for target in (path, tmp_path / "r"):
        with pytest.raises(InputError) as info:
            record.load(target)
        assert info.value.message.startswith(f"{path}: not a valid record (not JSON: ")


def test_a_state_row_that_does_not_match_is_checked_at_that_row_only(run_dir, tmp_path):
    """Row 2's last parameter tensor is edited (its state digest left stale); the per-tensor digests of the first
    tensor are broken at rows 1 and 3 with every hash re-sealed: only row 2's tensors are named."""
    folder = tmp_path / "r"
    shutil.copytree(run_dir, folder)
    rec = record.load_record(run_dir)
    last = rec.layout.params[-1][0]
    params = rec.arrays["params"].copy()
    params[2, -1] = np.nextafter(params[2, -1], np.float32(np.inf))
    epoch = rec.arrays["epoch_digests"].copy()
    col = [t.key for t in rec.layout.epoch_tensors].index("linear1.weight")
    epoch[1, col] ^= np.uint64(1)
    epoch[3, col] ^= np.uint64(1)
    meta = json.loads((folder / "record.json").read_text())
    rows = [record.digest(_le64(r)) for r in epoch]
    meta["digest"] = _expected_overall(meta["spec_hash"], meta["storage"], rows, rec.arrays["step_rows"],
                                       rec.arrays["step_digests"], rec.arrays["state_digests"])
    _reseal(folder, meta, params=params, epoch_digests=epoch)
    with pytest.raises(InputError) as info:
        record.load_record(folder)
    assert info.value.message == f"{folder}: params.npy row 2 ({last}) does not match its digest (edited or corrupt)"


def test_a_state_digest_edited_alone_is_refused_in_words(run_dir, tmp_path):
    folder = tmp_path / "r"
    shutil.copytree(run_dir, folder)
    rec = record.load_record(run_dir)
    state = rec.arrays["state_digests"].copy()
    state[2] ^= np.uint64(1)
    meta = json.loads((folder / "record.json").read_text())
    meta["digest"] = _expected_overall(meta["spec_hash"], meta["storage"], rec.fingerprint.row_digests,
                                       rec.arrays["step_rows"], rec.arrays["step_digests"], state)
    _reseal(folder, meta, state_digests=state)
    with pytest.raises(InputError) as info:
        record.load(folder)
    assert info.value.message == (f"{folder}: params.npy or buffers.npy row 2 does not match its state digest "
                                  "(edited or corrupt)")


def test_forged_values_are_named_by_the_tensor_check_of_either_schema(run_dir, tmp_path):
    rec = record.load_record(run_dir)
    _forge_params(run_dir, tmp_path / "forged", 2, 7)
    forged = tmp_path / "forged"
    state = record.state_digests(np.load(forged / "params.npy"), rec.arrays["buffers"])
    meta = json.loads((forged / "record.json").read_text())
    meta["digest"] = _expected_overall(meta["spec_hash"], meta["storage"], rec.fingerprint.row_digests,
                                       rec.arrays["step_rows"], rec.arrays["step_digests"], state)
    _reseal(forged, meta, state_digests=state)
    view = record.load(forged)  # the state digests match the forged values: only the tensor check can tell
    with pytest.raises(InputError) as info:
        view.legacy()
    assert info.value.message == (f"{forged}: params.npy row 2 (linear1.weight) does not match its digest "
                                  "(edited or corrupt)")
    older = _as_older_bnaudit(run_dir, tmp_path / "older")
    assert record.load(older).tensor_check is None
    _forge_params(older, tmp_path / "older-forged", 1, 3)
    with pytest.raises(InputError) as info:
        record.load(tmp_path / "older-forged")
    assert info.value.message == (f"{tmp_path / 'older-forged'}: params.npy row 1 (linear1.weight) does not match "
                                  "its digest (edited or corrupt)")


# --------------------------------------------------------------------------- digests by their definition

def test_the_overall_digest_is_defined_over_little_endian_words_of_epoch_0_steps(run_dir):
    rows = np.array([5, 2**32 - 1, 7], dtype=">u8")
    step_rows = np.array([[0, 0], [0, 3], [1, 0], [2, 5]])
    steps = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=">u8")
    state = np.array([9, 2**63, 7], dtype=">u8")
    for words in (None, state):
        expected = _expected_overall("ab" * 32, "float32", rows, step_rows, steps, words)
        assert record.overall_digest("ab" * 32, "float32", rows, step_rows, steps, words) == expected
        narrow = None if words is None else words.astype("<u8")
        assert record.overall_digest("ab" * 32, "float32", rows.astype(np.uint32), step_rows,
                                     steps.astype(np.uint32), narrow) == expected
    for empty in (np.zeros((0, 2), np.int64), np.array([], dtype=np.int64)):  # a run that traced no step
        assert record.overall_digest("cd" * 32, "bfloat16", rows, empty, np.zeros((0, 2), np.uint64)) == \
            _expected_overall("cd" * 32, "bfloat16", rows, [], [])


def test_row_digests_are_defined_over_little_endian_words_whatever_the_integer_type():
    table = np.array([[1, 2, 3], [2**64 - 1, 0, 2**40]], dtype=np.uint64)
    expected = [record.digest(_le64(r)) for r in table.tolist()]
    for arr in (table, table.astype(">u8")):
        assert record.row_digests(arr).tolist() == expected
    small = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint32)
    assert record.row_digests(small).tolist() == [record.digest(_le64(r)) for r in small.tolist()]


def test_an_empty_list_of_traced_steps_gives_empty_tables_of_their_types():
    rows, digests = record._steps_from_fingerprint([], 88, "here")
    assert rows.dtype == np.int64 and rows.shape == (0, 2)
    assert digests.dtype == np.uint64 and digests.shape == (0, 88)


def test_a_fingerprint_may_list_exactly_the_most_traced_steps(run_dir, monkeypatch):
    monkeypatch.setattr(record, "MAX_STEP_ROWS", 10)
    assert len(record.load(run_dir / "fingerprint.json").step_rows) == 10


def test_the_content_checksum_of_a_document_without_an_extra_object(run_dir):
    doc = {"schema": "x", "n": 1}
    for extra in (None, ["baseline"], "baseline"):
        body = {**doc, "extra": extra}
        assert record.content_sha256({**body, "content_sha256": "y"}) == fileio.canonical_sha256(body)
    assert record.content_sha256(doc) == fileio.canonical_sha256(doc)


def test_a_fingerprint_of_metadata_without_extra_has_an_empty_extra(run_dir):
    rec = record.load_record(run_dir)
    meta = {k: v for k, v in rec.meta.items() if k != "extra"}
    assert record.fingerprint_dict(meta, rec.arrays, rec.layout)["extra"] == {}


def test_decoded_blocks_name_where_they_came_from():
    for key, what in (("divergence", "divergence"), ("operator_audit", "operator-audit"),
                      ("perturbation", "perturbation")):
        with pytest.raises(InputError) as info:
            record.decode_extra({key: "x"}, "here")
        assert info.value.message.startswith(f"here: {what} block: ")


# --------------------------------------------------------------------------- prefixes, with steps in later epochs

def test_a_prefix_keeps_the_traced_steps_of_its_epochs_only(make_run):
    view = record.load(make_run(6) / "fingerprint.json")
    step_rows = np.array([[0, 0], [0, 9], [2, 1], [3, 0], [5, 4]], dtype=np.int64)
    steps = np.arange(5 * 88, dtype=np.uint64).reshape(5, 88) + np.uint64(1)
    fp = dataclasses.replace(view, step_rows=step_rows, step_digests=steps)
    for n, kept in ((3, 3), (1, 2)):
        cut = record.prefix(fp, n)
        assert cut.epochs == n and cut.config == {**view.config, "epochs": n}
        assert cut.step_rows.tolist() == step_rows[:kept].tolist()
        assert cut.step_digests.tolist() == steps[:kept].tolist()
        assert cut.digest == _expected_overall(view.spec.hash, view.storage, view.row_digests[:n + 1],
                                               step_rows, steps, view.state_digests[:n + 1])
        assert cut.keyframe_rows.tolist() == [r for r in view.keyframe_rows.tolist() if r <= n]
    for empty in (np.zeros((0, 2), np.int64), np.array([], dtype=np.int64)):
        cut = record.prefix(dataclasses.replace(view, step_rows=empty, step_digests=np.zeros((0, 88), np.uint64)), 2)
        assert len(cut.step_rows) == 0 and cut.digest == _expected_overall(
            view.spec.hash, view.storage, view.row_digests[:3], [], [], view.state_digests[:3])


# --------------------------------------------------------------------------- writing: facts kept, failures named

def test_write_record_keeps_the_first_nonfinite_tensor(run_dir, tmp_path):
    rec = record.load_record(run_dir)
    event = {"epoch": 2, "step": 3, "phase": "backward", "layer": "bn1", "tensor": "bn1.out"}
    meta = {k: v for k, v in rec.meta.items() if k not in _WRITTEN}
    fp = record.write_record(tmp_path / "w", meta, dataclasses.replace(_result_of(rec), nonfinite=event), rec.layout)
    assert fp["nonfinite"] == event
    assert json.loads((tmp_path / "w" / "record.json").read_text())["nonfinite"] == event


def test_write_record_names_what_it_could_not_write(run_dir, tmp_path, monkeypatch):
    rec = record.load_record(run_dir)
    meta = {k: v for k, v in rec.meta.items() if k not in _WRITTEN}

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    out = tmp_path / "w"
    with pytest.raises(OutputError) as info:
        record.write_record(out, meta, _result_of(rec), rec.layout)
    assert info.value.message == f"cannot write record to {out}: No space left on device"
    assert not out.exists() and list(tmp_path.iterdir()) == []
