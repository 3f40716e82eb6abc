"""The pytest plugin (``bnaudit.pytest_plugin``) in real pytest sessions of a generated project (pytester).

Each session runs in its own process with entry-point plugins off and the plugin named
with ``-p``, so these tests mean the same before and after the plugin is installed as
the ``pytest11`` entry point ``bnaudit``.  The baseline is made from a real 3-epoch
record of the default configuration (``make_run``), which a run made here must match bit
for bit; the drift is a record of that configuration with an initial weight one ulp off
(``--perturb``), which differs from it on every host.  (A baseline made from the
perturbed run would not do: a check reruns a baseline's configuration, its perturbation
included.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnaudit import gate, record
from bnaudit.baseline import KEY_VARIABLE, load_baseline

pytest_plugins = ["pytester"]

EPOCHS = 3
PLUGIN = ("-p", "bnaudit.pytest_plugin")
FIRST = "first divergence: the initial state (phase init), layer linear1, tensor linear1.weight"


@pytest.fixture(scope="module")
def baselines(make_run, tmp_path_factory) -> dict[str, Path]:
    """The record of the default configuration, its baseline, and the record of a run one ulp off."""
    folder = tmp_path_factory.mktemp("plugin-baselines")
    good = make_run(EPOCHS)
    gate.make_baseline(folder / "good.json", source=good)
    return {"record": good, "good": folder / "good.json", "drifted": make_run(EPOCHS, perturb="linear1.weight[0,0]:1")}


@pytest.fixture()
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # only the plugin -p names, installed or not
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    return pytester


def _tests(pytester: pytest.Pytester, body: str, **paths: Path) -> None:
    """A test module of the generated project; ``{name}`` in ``body`` is the repr of that path."""
    pytester.makepyfile(test_numerics=textwrap.dedent(body).format(**{k: repr(str(v)) for k, v in paths.items()}))


def test_loading_the_plugin_imports_neither_numpy_nor_torch():
    code = ("import sys, bnaudit.pytest_plugin\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('bnaudit', 'numpy', 'torch', 'mpmath')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["bnaudit", "bnaudit._version", "bnaudit.pytest_plugin"]


def test_collection_under_the_plugin_stays_light_and_the_flag_is_offered(project):
    _tests(project, """
        import sys

        def test_light(bnaudit_baseline):
            assert not bnaudit_baseline.update
            heavy = [m for m in ("torch", "mpmath", "numpy") if m in sys.modules]
            assert not heavy, heavy
        """)
    project.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)
    helped = project.runpytest_subprocess(*PLUGIN, "--help")
    assert "--bnaudit-update" in helped.stdout.str()


def test_a_run_here_passes_its_baseline_and_a_drifted_run_fails_naming_the_first_difference(project, baselines):
    _tests(project, """
        def test_matches(bnaudit_baseline):
            result = bnaudit_baseline.check({good}, epochs=3)
            assert result.passed and result.cases[0].verdict.value == "identical"
            assert result.cases[0].seconds > 0  # a run was made here

        def test_given_record(bnaudit_baseline):
            result = bnaudit_baseline.check({good}, record={record})
            assert result.cases[0].verdict.value == "identical" and result.cases[0].seconds == 0

        def test_drifts(bnaudit_baseline):
            bnaudit_baseline.check({good}, record={drifted}, tolerance="exact")
        """, **baselines)
    result = project.runpytest_subprocess(*PLUGIN, "-rf", timeout=300)
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    fail = next(line for line in out.splitlines() if line.startswith("FAIL float32_t1_native_nondet"))
    assert "drift beyond exact" in fail and FIRST in fail
    assert "config.perturb.tensor: None -> linear1.weight" in fail
    assert "bnaudit check: FAIL, 1 of 1 case beyond policy exact" in out
    assert "Traceback" not in out and "pytest_plugin.py" not in out  # bnaudit's verdict, not the plugin's stack


def test_a_missing_baseline_fails_naming_the_flag_and_nothing_is_written(project, baselines):
    missing = project.path / "baselines" / "float32.json"
    _tests(project, """
        def test_missing(bnaudit_baseline):
            bnaudit_baseline.check("baselines/float32.json", epochs=2)

        def test_refused(bnaudit_baseline):
            bnaudit_baseline.check({good}, epochs=5)
        """, good=baselines["good"])
    result = project.runpytest_subprocess(*PLUGIN, "-rf", timeout=120)
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert f"bnaudit: no baseline at {missing}; run pytest with --bnaudit-update to write it" in out
    assert "covers 3 epochs; cannot check 5" in out and "(exit 4, MISMATCH)" in out
    assert not missing.exists() and not missing.parent.exists()


def test_the_update_flag_writes_the_baseline_and_then_it_passes(project, baselines):
    _tests(project, """
        def test_numerics(bnaudit_baseline):
            bnaudit_baseline.check("baselines/float32.json", epochs=2)
        """)
    written = project.path / "baselines" / "float32.json"
    result = project.runpytest_subprocess(*PLUGIN, "--bnaudit-update", timeout=300)
    result.assert_outcomes(passed=1)
    assert "baselines are written, not checked" in result.stdout.str()
    b = load_baseline(written, key=None)  # the baseline file bnaudit baseline create writes, sealed
    assert b.fingerprint.epochs == 2 and b.dtype == "float32" and b.made_from == "float32_t1_native_nondet"
    assert f"{written}: float32_t1_native_nondet, 2 epochs" in result.stdout.str()
    # The same configuration as the 3-epoch baseline made by the test launcher: its first 2 epochs.
    assert b.fingerprint.digest == record.prefix(load_baseline(baselines["good"], key=None).fingerprint, 2).digest
    assert json.loads(written.read_text())["extra"]["baseline"]["updated"] is None
    checked = project.runpytest_subprocess(*PLUGIN, timeout=300)
    checked.assert_outcomes(passed=1)
    assert "bnaudit baselines written" not in checked.stdout.str()
