"""CPU emulation under qemu-user: presets, model checks, missing qemu, and real emulated runs."""

from __future__ import annotations

import json
import shutil

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


EMULATED_EPOCHS = 20


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """Haswell and Nehalem, 20 epochs each, side by side (-j 2), through the real matrix command."""
    from bnaudit.cli import main

    out = tmp_path_factory.mktemp("emulated") / "m"
    code = main(["matrix", "--cpu-model", "Haswell,Nehalem", "--epochs", str(EMULATED_EPOCHS), "-j", "2",
                 "--audit-every", "0", "--out", str(out), "--json"])
    assert code == 0
    return out


@pytest.mark.emulation
@needs_qemu
def test_emulated_capabilities_and_first_difference_against_native_default(emulated, make_run):
    haswell = record.load_record(emulated / "runs" / "float32_t1_native_nondet_cpu-Haswell")
    nehalem = record.load_record(emulated / "runs" / "float32_t1_native_nondet_cpu-Nehalem")
    assert haswell.meta["effective"]["cpu_capability"] == "AVX2"
    assert nehalem.meta["effective"]["cpu_capability"] == "DEFAULT"
    # The emulated model is what the run's own process saw (CPUID via numpy), recorded as resolved.
    assert haswell.meta["environment"]["emulated_cpu_model"] == "Haswell"
    assert "AVX2" in haswell.meta["environment"]["cpu_features"]
    assert "AVX" not in nehalem.meta["environment"]["cpu_features"]
    assert haswell.fingerprint.epochs == EMULATED_EPOCHS

    native = record.load(make_run(EMULATED_EPOCHS, isa="default"))
    assert native.effective["cpu_capability"] == "DEFAULT"
    pc = compare.compare_pair(nehalem.fingerprint, native)
    # Same capability, different bits: environment caps are not another CPU.  Name where.
    assert not pc.identical and pc.first is not None
    assert pc.first.layer and pc.first.tensor
    assert pc.first.epoch == 0  # they part before the first epoch ends


@pytest.mark.emulation
@needs_qemu
def test_emulated_matrix_summary_records_the_machines(emulated):
    summary = json.loads((emulated / "summary.json").read_text())
    runs = {r["key"]: r for r in summary["runs"]}
    assert runs["float32_t1_native_nondet_cpu-Haswell"]["emulated_model"] == "Haswell"
    assert runs["float32_t1_native_nondet_cpu-Nehalem"]["capability"] == "DEFAULT"
    (pair,) = summary["machines"]
    assert {pair["cpu_a"], pair["cpu_b"]} == {"Haswell", "Nehalem"}
    # AVX2 + FMA against SSE kernels: the two machines cannot agree bit for bit.
    assert pair["identical"] is False and pair["first"]["tensor"]
    assert "first part at" in " ".join(summary["findings"])
