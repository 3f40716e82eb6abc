"""CPU emulation under qemu-user: presets, model checks, missing qemu, and real emulated runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bnaudit import compare, emulate, record
from bnaudit.errors import ExitCode, MissingTool, UsageError

HAVE_QEMU = shutil.which(emulate.QEMU) is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-x86_64 (Debian package qemu-user) is not installed")

# Lines as qemu-x86_64 7.2 prints them for `-cpu help` (pinned, not produced by the code under test).
HELP_TEXT = """Available CPUs:
x86 486                   (alias configured by machine type)
x86 Haswell               (alias configured by machine type)
x86 Haswell-v1            Intel Core Processor (Haswell)
x86 IvyBridge             (alias configured by machine type)
x86 Nehalem-v2            Intel Core i7 9xx (Nehalem Core i7, IBRS update)
x86 max                   Enables all features supported by the accelerator in the current host

Recognized CPUID flags:
  3dnow 3dnowext 3dnowprefetch abm ace2 ace2-en acpi adx aes amd-no-ssb
"""


def test_parse_models_reads_the_model_lines_only():
    assert emulate.parse_models(HELP_TEXT) == ("486", "Haswell", "Haswell-v1", "IvyBridge", "Nehalem-v2", "max")


def test_slowdown_factor():
    s = emulate.Slowdown(emulated_seconds=25.0, native_seconds=1.0)
    assert s.factor == 25.0
    assert emulate.Slowdown(1.0, 0.0).factor == float("inf")


@pytest.mark.parametrize("name", [None, "native", "NONE", " none "])
def test_native_tokens(name):
    assert emulate.is_native(name)


def test_missing_qemu_is_missing_tool(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without qemu-x86_64
    with pytest.raises(MissingTool, match="apt-get install qemu-user"):
        emulate.qemu_path()


@pytest.mark.parametrize("command", [["run", "--epochs", "1"], ["matrix", "--epochs", "1"]])
def test_missing_qemu_gets_one_line_and_exit_7(cli, monkeypatch, tmp_path, command):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, stderr = cli(*command, "--cpu-model", "Haswell", "--out", str(tmp_path / "out"))
    assert code == ExitCode.MISSING_TOOL == 7
    assert "qemu-x86_64" in stderr and "apt-get install qemu-user" in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


@needs_qemu
def test_presets_resolve_to_the_seed_machines():
    assert emulate.resolve("seed-i7") == "Haswell"
    assert emulate.resolve("seed-i5") == "IvyBridge"
    assert emulate.resolve("haswell") == "Haswell"  # qemu's names are case-sensitive; a unique folding is accepted
    argv = emulate.wrap(["python", "-c", "pass"], "seed-i5")
    assert argv[1:5] == ["-cpu", "IvyBridge", "-E", "BNAUDIT_CPU_MODEL=IvyBridge"]


@needs_qemu
def test_unknown_model_is_a_usage_error_with_suggestions():
    with pytest.raises(UsageError, match=r"unknown CPU model 'Haswel'.*did you mean.*Haswell"):
        emulate.resolve("Haswel")


@needs_qemu
@pytest.mark.parametrize("command", [["run", "--epochs", "1"], ["matrix", "--epochs", "1"]])
def test_unknown_model_gets_one_line_and_exit_2(cli, tmp_path, command):
    code, _, stderr = cli(*command, "--cpu-model", "Pentium9000", "--out", str(tmp_path / "out"))
    assert code == ExitCode.USAGE == 2
    assert "unknown CPU model 'Pentium9000'" in stderr and "qemu-x86_64 -cpu help" in stderr
    assert stderr.count("\n") == 1
    assert not (tmp_path / "out" / "runs").exists()


EMULATED_EPOCHS = 3  # the CPUs part at step 0: a short run shows it
ROME = "float32_t1_default_nondet_cpu-EPYC-Rome"
NEHALEM = "float32_t1_default_nondet_cpu-Nehalem"


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """An AMD and an Intel CPU, both capped to torch's default kernels (--isa default), 3 epochs each, side by
    side (-j 2), through the real matrix command."""
    from bnaudit.cli import main

    out = tmp_path_factory.mktemp("emulated") / "m"
    code = main(["matrix", "--cpu-model", "EPYC-Rome,Nehalem", "--isa", "default", "--epochs", str(EMULATED_EPOCHS),
                 "-j", "2", "--audit-every", "0", "--out", str(out), "--json"])
    assert code == 0
    return out


@pytest.mark.emulation
@needs_qemu
def test_emulated_cpuid_and_first_difference_against_native_default(emulated, make_run):
    rome = record.load_record(emulated / "runs" / ROME)
    nehalem = record.load_record(emulated / "runs" / NEHALEM)
    # The cap took effect under emulation, and each run's own process saw its model's CPUID (via numpy).
    assert rome.meta["effective"]["cpu_capability"] == nehalem.meta["effective"]["cpu_capability"] == "DEFAULT"
    assert rome.meta["environment"]["emulated_cpu_model"] == "EPYC-Rome"
    assert "AVX2" in rome.meta["environment"]["cpu_features"]
    assert "avx2" in rome.meta["environment"]["supported_isas"]
    assert "AVX" not in nehalem.meta["environment"]["cpu_features"]
    assert rome.fingerprint.epochs == EMULATED_EPOCHS

    native = record.load(make_run(EMULATED_EPOCHS, isa="default"))
    assert native.effective["cpu_capability"] == "DEFAULT"
    pc = compare.compare_pair(nehalem.fingerprint, native)
    # Same capability, different bits: environment caps are not another CPU.  Name where.
    assert not pc.identical and pc.first is not None
    assert pc.first.layer and pc.first.tensor
    assert pc.first.epoch == 0  # they part before the first epoch ends


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ulp distance from the int32 bit patterns (ordered as integers), independent of bnaudit.bits."""
    ia, ib = (x.view("<i4").astype(np.int64) for x in (a, b))
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return np.abs(ia - ib)


@pytest.mark.emulation
@needs_qemu
def test_two_cpus_part_at_step_0s_first_matmul_and_the_bundle_reproduces_it_on_both(emulated, cli, tmp_path):
    """EPYC-Rome vs Nehalem at --isa default: the training parts at step 0's linear1.out, which compare names with
    its element share and ulps (the eval pass listed apart), and the exported operation alone reproduces each
    CPU's bits under that CPU."""
    rome, nehalem = (record.load(emulated / "runs" / k) for k in (ROME, NEHALEM))
    va, vb = (fp.first_step.get("linear1.out")[0].reshape(-1) for fp in (rome, nehalem))
    differing = int((va.view("<u4") != vb.view("<u4")).sum())
    assert differing > 0

    c = compare.compare_pair(rome, nehalem)
    d = c.first
    assert d is not None
    assert (d.epoch, d.step, d.phase, d.layer, d.tensor) == (0, 0, "forward", "linear1", "linear1.out")
    assert (round(d.fraction_differing * d.elements), d.elements) == (differing, va.size)
    assert d.max_ulps == int(_ulps(va, vb).max())
    assert c.first_step and c.first_step[0].tensor == "linear1.out" and c.first_step[0].differing == differing
    assert c.eval_first is not None and (c.eval_first.row, c.eval_first.phase) == (0, "eval")

    bundle = tmp_path / "bundle"
    code, out, err = cli("compare", str(emulated / "runs" / ROME), str(emulated / "runs" / NEHALEM),
                         "--bundle", str(bundle))
    assert code == ExitCode.DIFFERENT, err
    text = " ".join(out.split())
    assert (f"training split: epoch 1, step 1, phase forward, layer linear1, tensor linear1.out; {differing} of "
            f"{va.size} elements differ") in text
    assert "also differs: eval pass over the initial parameters" in text
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["op"] == "linear" and set(doc["inputs"]) == {"input", "weight", "bias"}
    assert doc["expected"]["linear1.out"]["a"] != doc["expected"]["linear1.out"]["b"]
    # Both emulated CPUs at once (2 cores): each computes its own run's bits from the same inputs.
    procs = {side: subprocess.Popen(emulate.wrap([sys.executable, "reproduce.py", side], model), cwd=bundle,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for side, model in (("a", "EPYC-Rome"), ("b", "Nehalem"))}
    for side, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (side, stdout, stderr[-2000:])
        assert f"linear1.out: {doc['expected']['linear1.out'][side]}  = run {side}" in stdout


@pytest.mark.emulation
@needs_qemu
def test_emulated_matrix_summary_records_the_machines(emulated):
    summary = json.loads((emulated / "summary.json").read_text())
    runs = {r["key"]: r for r in summary["runs"]}
    assert runs[ROME]["emulated_model"] == "EPYC-Rome"
    assert runs[NEHALEM]["capability"] == "DEFAULT"
    (pair,) = summary["machines"]
    assert {pair["cpu_a"], pair["cpu_b"]} == {"EPYC-Rome", "Nehalem"}
    # The same capped settings compute the first matmul differently on the two CPUIDs.
    assert pair["identical"] is False and pair["first"]["tensor"]
    assert "first part at" in " ".join(summary["findings"])


def test_an_inherited_openblas_coretype_does_not_reach_the_models_feature_probe(monkeypatch):
    """OPENBLAS_CORETYPE=Haswell (set on some machines) made numpy's OpenBLAS run AVX2 kernels under Nehalem:
    an illegal instruction, reported as "is qemu-x86_64 working?".  The probe gets a run's environment."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    features = emulate.model_features.__wrapped__("Nehalem")
    assert features["SSE42"] and not features["AVX2"]
