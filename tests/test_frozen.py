"""Frozen inputs: exact storage, manifest checks, and a generator that reproduces them."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from bnaudit import frozen
from bnaudit.errors import InputError
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
    with pytest.raises(InputError, match="sha256 does not match"):
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
