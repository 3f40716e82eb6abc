"""The experiment spec: embedded defaults, TOML overrides, validation, hash."""

from __future__ import annotations

import pytest

from bnaudit.errors import InputError
from bnaudit.spec import default_spec, load_spec

# Golden: the hash of the embedded default spec.  Changing any number of the experiment
# changes it; update this line deliberately, together with the frozen inputs and reference.
DEFAULT_SPEC_HASH = "2351aff3d25e26bcaedfddc932d1c2464e75e7965c9e3042de7fdb2008b3f5e2"


def test_default_spec_is_the_seed_experiment():
    s = default_spec()
    assert s.hash == DEFAULT_SPEC_HASH
    assert (s.data.samples, s.data.train, s.data.degree, s.data.noise_feature) == (200, 100, 4, True)
    assert (s.model.hidden_layers, s.model.hidden_units, s.model.batchnorm) == (5, 16, True)
    assert (s.train.lr, s.train.momentum, s.train.batch_size, s.train.epochs) == (0.01, 0.9, 10, 1000)
    assert s.n_inputs == 5
    assert [name for name, _ in s.modules()][:3] == ["linear1", "bn1", "relu1"]
    assert s.modules()[-1] == ("linear6", "linear")


def test_learning_rate_is_divided_by_four_at_each_milestone():
    s = default_spec()
    assert [s.lr_at(e) for e in (0, 249, 250, 499, 500, 750, 999)] == [
        0.01, 0.01, 0.0025, 0.0025, 0.000625, 0.00015625, 0.00015625]


def test_toml_overrides_and_changes_the_hash(tmp_path):
    path = tmp_path / "nobn.toml"
    path.write_text('name = "baseline"\n[model]\nbatchnorm = false\n')
    s = load_spec(path)
    assert s.model.batchnorm is False and s.model.hidden_units == 16
    assert s.hash != DEFAULT_SPEC_HASH
    assert all(kind != "bn" for _, kind in s.modules())
    assert s.buffers() == []


def test_noise_feature_switch(tmp_path):
    path = tmp_path / "nonoise.toml"
    path.write_text("[data]\nnoise_feature = false\n")
    assert load_spec(path).n_inputs == 4


@pytest.mark.parametrize("text, message", [
    ("[model]\nhidden_units = 'x'\n", "model.hidden_units must be an integer"),
    ("[model]\nwidth = 3\n", "unknown key(s) in [model]: width"),
    ("[train]\nbatch_size = 7\n", "batch_size must divide"),
    ("[data]\nx_low = 5.0\n", "x_low must be below"),
    ("[train]\nloss = 'l1'\n", 'loss must be "mse"'),
    ("foo = 1\n", "unknown key(s) foo"),
    ("[model\n", "not valid TOML"),
    ("[train]\nlr = nan\n", "finite number"),
])
def test_bad_specs_are_refused_with_the_field_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_spec(path)
    assert message in info.value.message


def test_missing_and_oversized_spec_files(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_spec(tmp_path / "absent.toml")
    big = tmp_path / "big.toml"
    big.write_text("#" * 70_000)
    with pytest.raises(InputError, match="larger than"):
        load_spec(big)
