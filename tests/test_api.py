"""bnaudit's Python API (``bnaudit.api``) on real short runs, and the light ``import bnaudit`` it is re-exported from.

The runs: one made by the test launcher (``make_run``, shared with other test files), one
made by ``api.run`` with the same request (so the two must be bit-identical), and one by
``api.run`` with an initial weight one ulp off (a difference that exists on every host).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import bnaudit
from bnaudit import api, gate
from bnaudit._version import __version__
from bnaudit.baseline import KEY_VARIABLE
from bnaudit.errors import BnauditError, ExitCode

EPOCHS = 3
PERTURB = "linear1.weight[0,0]:1"
FIRST = "the initial state (phase init), layer linear1, tensor linear1.weight"
"""Where a run with PERTURB first differs from its unperturbed twin."""
SUBMODULES = {m.name for m in pkgutil.iter_modules(bnaudit.__path__)}


def _fresh(code: str) -> str:
    """stdout of ``code`` run in a fresh interpreter (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def launched(make_run) -> Path:
    """The record the test launcher makes for a default 3-epoch float32 run."""
    return make_run(EPOCHS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, api.Run]]:
    """``api.run`` twice: the launcher's request into a folder given, and the perturbed one into the default folder."""
    same = api.run("float32", epochs=EPOCHS, out=tmp_path_factory.mktemp("api") / "same")
    perturbed = api.run(epochs=EPOCHS, perturb=PERTURB)
    yield {"same": same, "perturbed": perturbed}
    shutil.rmtree(perturbed.path)  # api.run made it; the caller removes it


@pytest.fixture(scope="module")
def baseline(launched, tmp_path_factory) -> Path:
    """A baseline of the launcher's record, made by the code of ``bnaudit baseline create --record``."""
    out = tmp_path_factory.mktemp("api-baseline") / "float32.json"
    gate.make_baseline(out, source=launched)
    return out


@pytest.fixture(autouse=True)
def _no_signing_key(monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)


def _raises(code: ExitCode, fragment: str, call, *args, **kwargs) -> BnauditError:
    with pytest.raises(BnauditError) as info:
        call(*args, **kwargs)
    assert info.value.exit_code is code, f"{info.value!r}: {info.value.message}"
    assert fragment in info.value.message, info.value.message
    return info.value


# --------------------------------------------------------------------------- the package stays light

def test_import_bnaudit_loads_no_stage_and_neither_torch_nor_mpmath():
    """The run's process imports the package before its controls take effect: nothing may load with it."""
    loaded = _fresh("import sys, bnaudit\nprint(' '.join(sorted(m for m in sys.modules if m.startswith("
                    "('bnaudit', 'torch', 'mpmath', 'numpy')))))")
    assert loaded.split() == ["bnaudit", "bnaudit._version"]


def test_the_api_loads_on_first_use_without_torch_or_mpmath():
    out = _fresh("import sys, bnaudit\nbnaudit.run\n"
                 "print('bnaudit.api' in sys.modules, sorted({'torch', 'mpmath'} & set(sys.modules)))")
    assert out == "True []"


def test_every_public_name_resolves_and_none_shadows_a_module():
    """``bnaudit.__all__`` is the API's ``__all__`` but ``compare`` and ``check``, which are module names."""
    assert set(bnaudit.__all__) == {"__version__", "api"} | (set(api.__all__) - SUBMODULES)
    assert set(api.__all__) & SUBMODULES == {"compare", "check"}
    for name in api.__all__:
        assert getattr(api, name).__module__.startswith("bnaudit."), name
    for name in bnaudit.__all__:
        value = getattr(bnaudit, name)
        assert value is (api if name == "api" else __version__ if name == "__version__" else getattr(api, name))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        bnaudit.nothing  # noqa: B018
    # Loading the API first must not turn `from bnaudit import compare` into the function.
    out = _fresh("import bnaudit, types\nbnaudit.run\nfrom bnaudit import check, compare\n"
                 "print(isinstance(compare, types.ModuleType), isinstance(check, types.ModuleType))")
    assert out == "True True"


def test_the_version_has_one_source(runs, launched):
    """The package, the records a run writes, every ``--json`` document and the distribution read bnaudit._version."""
    assert bnaudit.__version__ == __version__
    for folder in (runs["same"].path, launched):
        assert json.loads((folder / "record.json").read_text())["bnaudit"] == __version__
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    if "version" in project["project"].get("dynamic", []):  # {attr = "MODULE.NAME"}: it must name the one source
        module, _, name = project["tool"]["setuptools"]["dynamic"]["version"]["attr"].rpartition(".")
        assert getattr(importlib.import_module(module), name) == __version__
        assert module in ("bnaudit", "bnaudit._version")
    else:
        assert project["project"]["version"] == __version__


# --------------------------------------------------------------------------- run, load, compare, check

def test_run_returns_its_record_loaded_and_it_is_the_launchers_run(runs, launched):
    same = runs["same"]
    assert (same.path / "record.json").is_file() and same.fingerprint.source == str(same.path)
    assert same.fingerprint.epochs == EPOCHS and same.summary.epochs == EPOCHS
    assert same.summary.digest == same.fingerprint.digest == api.load(launched).digest
    assert same.fingerprint.controls.label() == "float32_t1_native_nondet"


def test_run_without_out_writes_a_temporary_folder(runs):
    perturbed = runs["perturbed"]
    assert perturbed.path.parent == Path(tempfile.gettempdir())
    assert perturbed.path.name.startswith("bnaudit-float32_t1_native_nondet-")
    assert perturbed.fingerprint.perturbation is not None and perturbed.summary.floor is not None


def test_load_reads_every_kind_of_input_to_the_same_run(launched, baseline):
    digests = {api.load(p).digest for p in (launched, str(launched / "record.json"), launched / "fingerprint.json",
                                            baseline)}
    assert digests == {api.load(launched).digest}
    assert api.load(baseline).extra["baseline"]["schema"] == "bnaudit.baseline/2"


def test_compare_two_and_three_runs(runs, launched):
    same, perturbed = runs["same"], runs["perturbed"]
    assert api.compare(same, launched).identical
    pair = api.compare(launched, perturbed.fingerprint)
    assert not pair.identical and pair.first is not None and pair.first.where == FIRST
    many = api.compare(same, launched, perturbed)
    assert not many.identical
    assert sorted(len(c.members) for c in many.classes) == [1, 2]


def test_check_passes_the_same_run_and_fails_the_drifted_one(runs, baseline):
    ok = api.check(runs["same"], baseline)
    assert ok.passed and ok.exit_code is ExitCode.OK and ok.cases[0].verdict.value == "identical"
    bad = api.check(runs["perturbed"].path, baseline, "exact")
    assert not bad.passed and bad.exit_code is ExitCode.DIFFERENT
    assert bad.first is not None and bad.first.where == FIRST
    assert bad.cases[0].verdict.value == "drift" and bad.failed_policy == "exact"
    assert api.check(runs["perturbed"], baseline, "rel:2").passed  # |a-b|/max(|a|,|b|) <= 2 always


# --------------------------------------------------------------------------- errors: bnaudit's, with codes

def test_bad_run_requests_are_usage_errors_before_any_folder_is_made(tmp_path):
    out = tmp_path / "never"
    _raises(ExitCode.USAGE, "unknown dtype 'float16'", api.run, "float16", epochs=1, out=out)
    _raises(ExitCode.USAGE, "threads='2': expected int", api.run, threads="2", epochs=1, out=out)
    _raises(ExitCode.USAGE, "deterministic=1: expected bool", api.run, deterministic=1, epochs=1, out=out)
    _raises(ExitCode.USAGE, "--epochs must be between 1 and the spec's", api.run, epochs=10**6, out=out)
    _raises(ExitCode.USAGE, "expected LAYER.PARAM[INDEX]:ULPS", api.run, epochs=1, perturb="linear1", out=out)
    _raises(ExitCode.USAGE, "trace_epochs='0': expected int", api.run, epochs=1, trace_epochs="0", out=out)
    assert not out.exists()


def test_unusable_inputs_are_input_errors(tmp_path, launched, baseline):
    _raises(ExitCode.BAD_INPUT, "no such file or folder", api.load, tmp_path / "missing")
    edited = tmp_path / "edited.json"
    raw = json.loads(baseline.read_text())
    raw["extra"]["baseline"]["made_from"] = "elsewhere"
    edited.write_text(json.dumps(raw))
    _raises(ExitCode.BAD_INPUT, "edited or corrupt baseline", api.load, edited)
    _raises(ExitCode.BAD_INPUT, "edited or corrupt baseline", api.check, launched, edited)
    _raises(ExitCode.BAD_INPUT, "a fingerprint, not a baseline", api.load, launched / "fingerprint.json",
            key="k" * 32)
    _raises(ExitCode.BAD_INPUT, "not signed", api.load, baseline, key="k" * 32)
    _raises(ExitCode.USAGE, "use a random key of at least 32", api.load, baseline, key="short")
    _raises(ExitCode.USAGE, "expected a path", api.load, 3)


def test_refused_checks_carry_their_codes(launched, baseline):
    _raises(ExitCode.USAGE, "--tolerance", api.check, launched, baseline, "bogus")
    _raises(ExitCode.USAGE, "--record checks an existing run; --dtype", api.check, launched, baseline, dtype="float64")
    _raises(ExitCode.MISMATCH, f"covers {EPOCHS} epochs; cannot check 5", api.check, None, baseline, epochs=5)
    _raises(ExitCode.USAGE, "expected a path, a Fingerprint or a Run", api.compare, launched, 1.5)
