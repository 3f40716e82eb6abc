"""Frozen inputs: exact storage, manifest checks, and a generator that reproduces them."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bnaudit import fileio, frozen
from bnaudit.errors import InputError, OutputError
from bnaudit.spec import default_spec, load_spec


def test_shipped_frozen_inputs_are_reproduced_bit_for_bit_by_the_generator(tmp_path):
    spec = default_spec()
    shipped = frozen.load(spec)
    regenerated = frozen.read(frozen.write(spec, tmp_path / "again"), spec)
    for name in ("inputs", "targets", "init", "batches"):
        assert getattr(shipped, name).tobytes() == getattr(regenerated, name).tobytes(), name
    assert shipped.digest == regenerated.digest


def test_frozen_inputs_follow_the_spec():
    spec = default_spec()
    f = frozen.load(spec)
    x = f.inputs[:, 0]
    assert f.inputs.shape == (200, 5) and f.targets.shape == (200,)
    assert np.all((x >= -2) & (x < 2))
    assert np.array_equal(f.inputs[:, 1], x * x)
    # Every epoch's batch order is a permutation of the 100 training rows.
    assert np.all(np.sort(f.batches, axis=1) == np.arange(100))
    # PyTorch's default init bounds: |w| <= 1/sqrt(fan_in); BN weight 1, bias 0.
    first = f.init[:80]
    assert np.all(np.abs(first) <= 1 / math.sqrt(5))
    offset = 80 + 16
    assert np.all(f.init[offset:offset + 16] == 1.0) and np.all(f.init[offset + 16:offset + 32] == 0.0)
    # The label is far from the pure-noise feature and close to x^3 - 2x.
    resid = f.targets - (x**3 - 2 * x)
    assert abs(np.corrcoef(resid, f.inputs[:, 4])[0, 1]) < 0.3
    assert 0.7 < resid.std() < 1.3


def test_tampered_frozen_input_is_refused(tmp_path):
    spec = default_spec()
    copy = tmp_path / "frozen"
    shutil.copytree(frozen.folder_for(spec), copy)
    blob = bytearray((copy / "init.npy").read_bytes())
    blob[-1] ^= 1
    (copy / "init.npy").write_bytes(bytes(blob))
    with pytest.raises(InputError, match=re.escape("init.npy: sha256 does not match the manifest (tampered")):
        frozen.load(spec, copy)


def test_custom_spec_inputs_are_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BNAUDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "s.toml"
    path.write_text("[data]\nseed = 7\n")
    spec = load_spec(path)
    first = frozen.load(spec)
    assert (tmp_path / "cache" / "frozen" / spec.hash / "manifest.json").exists()
    again = frozen.load(spec)
    assert first.digest == again.digest
    assert first.inputs.tobytes() != frozen.load(default_spec()).inputs.tobytes()


# --------------------------------------------------------------------------- pinned values and every refusal

SHIPPED_DIGEST = "cd8f9fe0d675f182f1dfa093e043947f075d219c25f67b6baaaafe8fab4079e0"


def test_shipped_inputs_pinned_values_and_digest(pytestconfig):
    """The first sample, label, initial weight and batch order, written out as hex floats."""
    spec = default_spec()
    f = frozen.load(spec)
    assert f.spec_hash == spec.hash
    assert [v.hex() for v in f.inputs[0]] == ["0x1.a2b9fcd2131f4p+0", "0x1.5671f25eb3e00p+1", "0x1.180f6c23fae30p+2",
                                               "0x1.ca14a64ce5ac7p+2", "-0x1.9b044f02337d7p-2"]
    assert f.targets[0].hex() == "0x1.1f652fc274184p+0" and f.init[0].hex() == "0x1.88672b580291ap-3"
    assert f.batches[0][:5].tolist() == [96, 25, 50, 24, 67]
    assert f.x.tolist() == f.inputs[:, 0].tolist() and f.x[0].hex() == "0x1.a2b9fcd2131f4p+0"
    # the digest that names these inputs in every record, as the committed reference recorded it
    ref = json.loads((pytestconfig.rootpath / "reference" / "mpmath" / spec.short_hash / "manifest.json").read_text())
    assert f.digest == SHIPPED_DIGEST == ref["frozen"]
    assert frozen.folder_for(spec) == pytestconfig.rootpath / "reference" / "frozen" / spec.short_hash


def test_written_manifest_is_byte_identical_to_the_committed_one(tmp_path):
    spec = default_spec()
    out = frozen.write(spec, tmp_path / "again")
    assert out == tmp_path / "again"
    assert (out / "manifest.json").read_bytes() == (frozen.folder_for(spec) / "manifest.json").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "bnaudit.frozen/1" and manifest["generator"] == 1
    assert manifest["spec_hash"] == spec.hash and manifest["spec"] == spec.to_dict()
    assert manifest["files"] == {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in frozen.FILES}
    assert sorted(p.name for p in out.iterdir()) == sorted([*frozen.FILES, "manifest.json"])


def _copy(tmp_path):
    copy = tmp_path / "frozen"
    shutil.copytree(frozen.folder_for(default_spec()), copy)
    return copy


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_inputs_of_another_spec_are_refused(tmp_path):
    """The manifest's spec hash is checked: another spec's folder, or an edited hash, never loads."""
    other = load_spec_text(tmp_path, "[data]\nseed = 7\n")
    with pytest.raises(InputError, match="generated for another spec"):
        frozen.load(other, frozen.folder_for(default_spec()))
    copy = _copy(tmp_path)
    _edit_manifest(copy, lambda m: m.update(spec_hash=other.hash))
    with pytest.raises(InputError, match="generated for another spec"):
        frozen.load(default_spec(), copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].pop("batches.npy"), "manifest does not list inputs.npy, targets.npy, init.npy, batches.npy"),
    (lambda m: m["files"].update(extra="0" * 64), "manifest does not list"),
    (lambda m: m.update(files=["inputs.npy"]), "manifest does not list"),
    (lambda m: m["files"].update({"init.npy": 7}), "manifest entry for init.npy is not a sha256"),
])
def test_malformed_manifest_is_refused(tmp_path, edit, message):
    copy = _copy(tmp_path)
    _edit_manifest(copy, edit)
    with pytest.raises(InputError, match=message):
        frozen.read(copy, default_spec())


def test_unreadable_manifest_is_refused(tmp_path):
    copy = _copy(tmp_path)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"frozen inputs .*: unreadable manifest \(.*not a valid frozen manifest"):
        frozen.read(copy, default_spec())
    (copy / "manifest.json").unlink()
    with pytest.raises(InputError, match="unreadable manifest"):
        frozen.read(copy, default_spec())


@pytest.mark.parametrize("name, array, message", [
    ("inputs.npy", np.zeros((200, 4)), r"inputs.npy: expected <f8 \(200, 5\)"),
    ("targets.npy", np.zeros(200, "<f4"), r"targets.npy: expected <f8 \(200,\)"),
    ("init.npy", np.zeros(10), r"init.npy: expected <f8 \(1521,\)"),
    ("batches.npy", np.zeros((1000, 100), "<u8"), r"batches.npy: expected <u4 \(1000, 100\)"),
])
def test_array_of_the_wrong_shape_or_dtype_is_refused(tmp_path, name, array, message):
    """A consistent manifest (sha256 updated) does not make a wrongly shaped array acceptable."""
    copy = _copy(tmp_path)
    np.save(copy / name, array, allow_pickle=False)
    _edit_manifest(copy, lambda m: m["files"].update({name: hashlib.sha256((copy / name).read_bytes()).hexdigest()}))
    with pytest.raises(InputError, match=message):
        frozen.read(copy, default_spec())


def test_missing_shipped_inputs_are_an_error_not_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("BNAUDIT_REFERENCE_DIR", str(tmp_path / "moved"))
    assert frozen.shipped_root() == tmp_path / "moved"
    spec = default_spec()
    with pytest.raises(InputError, match=r"frozen inputs missing at .*; regenerate with `bnaudit frozen build`"):
        frozen.load(spec)
    assert not (tmp_path / "moved").exists()


def test_default_roots(monkeypatch, tmp_path, pytestconfig):
    monkeypatch.delenv("BNAUDIT_REFERENCE_DIR", raising=False)
    assert frozen.shipped_root() == pytestconfig.rootpath / "reference"
    monkeypatch.delenv("BNAUDIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert frozen.cache_root() == tmp_path / ".cache" / "bnaudit"
    monkeypatch.setenv("BNAUDIT_CACHE", str(tmp_path / "c"))
    assert frozen.cache_root() == tmp_path / "c"


def test_custom_spec_generated_once_and_follows_its_spec(tmp_path, monkeypatch):
    """Without the noise feature and with degree 2: 2 input columns, 4 samples per epoch row, a new stream."""
    monkeypatch.setenv("BNAUDIT_CACHE", str(tmp_path / "cache"))
    spec = load_spec_text(tmp_path, "[data]\nnoise_feature = false\ndegree = 2\n")
    first = frozen.load(spec)
    folder = tmp_path / "cache" / "frozen" / spec.hash
    assert frozen.folder_for(spec) == folder
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    again = frozen.load(spec)
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp, "custom inputs must be generated only once"
    assert again.digest == first.digest and first.inputs.shape == (200, 2)
    default = frozen.load(default_spec())
    # the same seed gives the same data stream: x and x^2 equal the default's, the noise column is gone
    assert first.inputs.tobytes() == np.ascontiguousarray(default.inputs[:, :2]).tobytes()
    assert first.init.shape == (frozen._state_size(spec),)


def test_init_follows_pytorch_default_rule_layer_by_layer():
    """U(+-1/sqrt(fan_in)) for each Linear weight and bias (bounds reached within 2%), BN weight 1, bias 0,
    running mean 0, running variance 1."""
    spec = default_spec()
    f = frozen.load(spec)
    offset = 0
    for name, shape in spec.parameters() + spec.buffers():
        size = math.prod(shape)
        values = f.init[offset:offset + size]
        offset += size
        if name.startswith("linear"):
            bound = 1 / math.sqrt(5 if name.startswith("linear1") else 16)
            assert np.abs(values).max() <= bound and (size < 20 or np.abs(values).max() > 0.9 * bound), name
            assert size == 1 or values.min() < 0 < values.max(), name
        elif name.endswith((".weight", "running_var")):
            assert np.all(values == 1.0), name
        else:
            assert np.all(values == 0.0), name
    assert offset == f.init.size == frozen._state_size(spec) == 1521


def load_spec_text(tmp_path, text):
    path = tmp_path / f"spec-{abs(hash(text))}.toml"
    path.write_text(text)
    return load_spec(path)


def test_noise_scale_and_target_follow_the_spec(tmp_path):
    """The same seed draws the same noise: halving noise_std halves it, changing the target changes y alone."""
    default = frozen.load(default_spec())
    x = default.x
    base_noise = default.targets - (x**3 - 2 * x)
    quiet = frozen.load(load_spec_text(tmp_path, "[data]\nnoise_std = 0.5\n"))
    assert quiet.inputs.tobytes() == default.inputs.tobytes() and quiet.init.tobytes() == default.init.tobytes()
    assert np.allclose(quiet.targets - (x**3 - 2 * x), 0.5 * base_noise, rtol=0, atol=1e-12)
    assert quiet.targets.dtype == np.dtype("<f8") and quiet.init.dtype == np.dtype("<f8")


def test_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(frozen, "MAX_FILE_BYTES", 1000)
    with pytest.raises(InputError, match=r"inputs.npy: 8128 bytes is larger than any .*\(1000 bytes\)"):
        frozen.read(frozen.folder_for(default_spec()), default_spec())


def test_rewriting_frozen_inputs_replaces_them_and_nothing_else(tmp_path):
    spec = default_spec()
    out = frozen.write(spec, tmp_path / "f")
    again = frozen.write(spec, out)  # a folder of frozen inputs is replaced (with the same bytes)
    assert frozen.read(again, spec).digest == SHIPPED_DIGEST
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=re.escape(f"--out {mine} holds files that bnaudit did not write")):
        frozen.write(spec, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def _in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # reported by the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_writers_of_one_folder_wait_for_each_other(tmp_path):
    """Several runs may fill the cache at once: a second writer waits for the first, never fails."""
    spec = default_spec()
    folder = tmp_path / "f"
    with fileio.OutputLock.beside(folder, "the test"):
        thread, box = _in_thread(lambda: frozen.write(spec, folder))
        time.sleep(0.5)
        assert thread.is_alive() and not box, f"the writer did not wait: {box}"
    thread.join(60)
    assert box.get("value") == folder, box


def test_a_custom_spec_generated_by_another_run_while_waiting_is_not_generated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("BNAUDIT_CACHE", str(tmp_path / "cache"))
    spec = load_spec_text(tmp_path, "[data]\nseed = 11\n")
    folder = frozen.folder_for(spec)
    staged = frozen.write(spec, tmp_path / "staged")
    with fileio.OutputLock.beside(folder, "the other run"):
        thread, box = _in_thread(lambda: frozen.load(spec))
        time.sleep(0.5)
        assert thread.is_alive() and not box, f"the loader did not wait: {box}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, folder)  # the other run finishes its folder
        stamp = (folder / "manifest.json").stat().st_mtime_ns
    thread.join(60)
    assert "error" not in box, box
    assert box["value"].digest == frozen.read(folder, spec).digest
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp, "generated again after another run made it"


def test_digest_does_not_depend_on_the_manifest_order(tmp_path):
    copy = _copy(tmp_path)
    _edit_manifest(copy, lambda m: m.update(files=dict(reversed(list(m["files"].items())))))
    assert next(iter(json.loads((copy / "manifest.json").read_text())["files"])) == "targets.npy"
    assert frozen.read(copy, default_spec()).digest == SHIPPED_DIGEST


def test_a_failed_write_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    folder = tmp_path / "f"
    with pytest.raises(OutputError, match=re.escape(f"cannot write frozen inputs to {folder}: No space left")):
        frozen.write(default_spec(), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed write must leave no folder behind"


def test_the_cache_is_bnaudit_cache_else_xdg_else_home(tmp_path, monkeypatch):
    monkeypatch.delenv("BNAUDIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert frozen.cache_root() == tmp_path / "home" / ".cache" / "bnaudit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG rule: only absolute paths count
    assert frozen.cache_root() == tmp_path / "home" / ".cache" / "bnaudit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert frozen.cache_root() == tmp_path / "xdg" / "bnaudit"
    monkeypatch.setenv("BNAUDIT_CACHE", str(tmp_path / "mine"))
    assert frozen.cache_root() == tmp_path / "mine"


def test_the_shipped_data_is_the_checkout_s_reference_folder_unless_moved(tmp_path, monkeypatch):
    root = Path(frozen.__file__).resolve().parent.parent
    assert frozen.shipped_root() == root / "reference"  # a checkout (tests/test_packaging.py: the wheel's)
    monkeypatch.setenv("BNAUDIT_REFERENCE_DIR", str(tmp_path))
    assert frozen.shipped_root() == tmp_path
