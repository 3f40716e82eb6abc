"""Record and fingerprint files: round trips, and refusal of anything edited or broken."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnaudit import fileio, record
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
    (lambda d: d.update(schema="bnaudit.fingerprint/99"), "is not bnaudit.fingerprint/2"),
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
    with pytest.raises(InputError, match=r"content_sha256 does not match|is not bnaudit\.fingerprint/2"):
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
        with pytest.raises(InputError, match="epoch row 4 has different state digests but equal parameter"):
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


# --------------------------------------------------------------------------- writing, in this process

_WRITTEN = ("digest", "nonfinite", "probe_rows", "train_seconds", "layout", "files", "content_sha256")
"""The record.json fields ``write_record`` adds to ``new_meta``'s."""


def _result_of(rec) -> record.RunResult:
    a = rec.arrays
    return record.RunResult(
        params=a["params"], buffers=a["buffers"], train_loss=a["losses"][:, 0], test_loss=a["losses"][:, 1],
        step_loss=a["step_loss"], min_var_over_eps=a["min_var"], epoch_digests=a["epoch_digests"],
        step_rows=a["step_rows"], step_digests=a["step_digests"], probe_rows=np.array(rec.meta["probe_rows"]),
        probe=a["probe"], nonfinite=rec.meta["nonfinite"], train_seconds=rec.meta["train_seconds"])


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


def test_new_meta_is_the_record_json_a_run_starts_from(run_dir):
    rec = record.load_record(run_dir)
    m = rec.meta
    made = record.new_meta(spec=rec.spec, frozen_digest=m["frozen"], config=m["config"], storage=m["storage"],
                           effective=m["effective"], environment=m["environment"], created=m["created"])
    assert {k: v for k, v in made.items() if k != "extra"} == {k: v for k, v in m.items()
                                                               if k not in (*_WRITTEN, "extra")}
    assert made["schema"] == record.RECORD_SCHEMA == "bnaudit.record/3" and made["kind"] == "record"
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
