"""The real CLI: bnaudit run / env / frozen, every documented exit code of run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import bnaudit
from bnaudit import envinfo, frozen
from bnaudit.errors import ExitCode
from bnaudit.spec import default_spec


def test_run_json_summary_and_record(cli, tmp_path):
    out = tmp_path / "r"
    code, stdout, stderr = cli("run", "--epochs", "2", "--out", str(out), "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["schema"] == "bnaudit.run-summary/1" and summary["bnaudit"] == bnaudit.__version__
    assert summary["out"] == str(out) and summary["epochs"] == 2
    assert summary["digest"] == json.loads((out / "fingerprint.json").read_text())["digest"]
    assert summary["effective"]["intra_op_threads"] == 1


def test_run_table_summary(cli, tmp_path):
    code, stdout, _ = cli("run", "--epochs", "1", "--out", str(tmp_path / "t"), "--dtype", "float64")
    assert code == 0
    for field in ("configuration", "effective", "final train MSE", "fingerprint", "record"):
        assert field in stdout


@pytest.mark.parametrize("args, code, message", [
    (["run", "--dtype", "float16"], ExitCode.USAGE, "'float16' is not one of 'float32', 'float64', 'bfloat16'"),
    (["run", "--isa", "sse9"], ExitCode.USAGE, "'sse9' is not one of 'native', 'default', 'avx2', 'avx512'"),
    (["check", "--dtype", "f32", "--record", "x"], ExitCode.USAGE, "'f32' is not one of 'float32'"),
    (["baseline", "create", "--isa", "avx3", "--out", "x"], ExitCode.USAGE, "'avx3' is not one of 'native'"),
    (["run", "--threads", "0"], ExitCode.USAGE, "--threads"),
    (["run", "--epochs", "0"], ExitCode.USAGE, "--epochs must be between"),
    (["run", "--perturb", "linear9.weight[0]:1"], ExitCode.USAGE, "no tensor 'linear9.weight'"),
    (["run", "--no-such-flag"], ExitCode.USAGE, "No such option"),
    (["run", "--spec", "/nonexistent/spec.toml"], ExitCode.BAD_INPUT, "cannot read"),
])
def test_bad_input_gets_one_line_and_its_exit_code(cli, args, code, message):
    got, stdout, stderr = cli(*args)
    assert got == code
    assert message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_unsupported_isa_is_refused_not_downgraded(cli, monkeypatch, tmp_path):
    # Pretend this CPU lacks AVX-512 (the one thing faked: CPUID cannot be changed here).
    features = {k: v for k, v in envinfo.cpu_features().items() if not k.startswith("AVX512")}
    monkeypatch.setattr(envinfo, "cpu_features", lambda: features)
    code, _, stderr = cli("run", "--isa", "avx512", "--epochs", "1", "--out", str(tmp_path / "x"))
    assert code == ExitCode.USAGE
    assert "cannot run --isa avx512" in stderr
    assert not (tmp_path / "x").exists()


def test_tampered_frozen_input_is_refused(cli, tmp_path, monkeypatch):
    spec = default_spec()
    root = tmp_path / "reference"
    shutil.copytree(frozen.folder_for(spec), root / "frozen" / spec.short_hash)
    target = root / "frozen" / spec.short_hash / "batches.npy"
    blob = bytearray(target.read_bytes())
    blob[200] ^= 0x01
    target.write_bytes(bytes(blob))
    monkeypatch.setenv("BNAUDIT_REFERENCE_DIR", str(root))
    code, _, stderr = cli("run", "--epochs", "1", "--out", str(tmp_path / "o"))
    assert code == ExitCode.BAD_INPUT
    assert "sha256 does not match the manifest" in stderr


def test_output_under_a_file_is_refused(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = cli("run", "--epochs", "1", "--out", str(blocker / "run"))
    assert code == ExitCode.OUTPUT and "cannot write" in stderr


def test_existing_record_is_not_overwritten_without_force(cli, tmp_path):
    out = tmp_path / "r"
    assert cli("run", "--epochs", "1", "--out", str(out))[0] == 0
    code, _, stderr = cli("run", "--epochs", "1", "--out", str(out))
    assert code == ExitCode.OUTPUT and "--force" in stderr
    assert cli("run", "--epochs", "1", "--out", str(out), "--force")[0] == 0


def test_env_reports_supported_isas(cli):
    code, stdout, _ = cli("env", "--json")
    snap = json.loads(stdout)
    assert code == 0 and "default" in snap["supported_isas"] and snap["cpu_capability"]
    assert snap["schema"] == "bnaudit.env/1" and snap["bnaudit"] == bnaudit.__version__


@pytest.mark.parametrize("args, code, name", [
    (("compare", "no-such-a", "no-such-b", "--json"), 3, "BAD_INPUT"),
    (("run", "--dtype", "float16", "--json"), 2, "USAGE"),
    (("check", "--baseline", "no-such-baseline.json", "--json"), 3, "BAD_INPUT"),
])
def test_an_error_under_json_is_a_json_object_on_stdout_and_one_line_on_stderr(cli, args, code, name):
    got, stdout, stderr = cli(*args)
    assert got == code and stderr.count("\n") == 1 and stderr.startswith("bnaudit: error: ")
    doc = json.loads(stdout)
    assert doc == {"schema": "bnaudit.error/1", "bnaudit": bnaudit.__version__,
                   "error": {"code": code, "name": name, "message": stderr.removeprefix("bnaudit: error: ")[:-1]}}


def test_without_json_an_error_prints_nothing_on_stdout(cli):
    got, stdout, stderr = cli("compare", "no-such-a", "no-such-b")
    assert (got, stdout) == (3, "") and stderr.startswith("bnaudit: error: no-such-a")


def test_frozen_verify(cli):
    code, stdout, _ = cli("frozen", "verify")
    assert code == 0 and "bit for bit" in stdout


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bnaudit", "run", "--dtype", "nope"], capture_output=True, text=True)
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.strip().startswith("bnaudit: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_run_summary_renders_the_decoded_summary(monkeypatch):
    """`bnaudit run`'s table reads the one decoded RunSummary: perturbation, chaos floor beside exact
    arithmetic, missing reference."""
    import numpy as np
    from rich.console import Console

    from bnaudit.blocks import ChaosFloor, RunSummary
    from bnaudit.reference.sensitivity import Sensitivity
    from bnaudit.report import run_summary

    floor = ChaosFloor(twin_digest_rows=("0" * 16,) * 4, max_abs=np.array([1e-8, 1e-7, 1e-6, 1e-5]),
                       max_ulps=(1, 10, 100, 1000), growth_rate=2.5, saturation_row=3)
    exact = Sensitivity(spec_hash="s" * 64, tensor="linear1.weight", index=(0, 0), scale=200, precision=512,
                        rows=(0, 1, 2, 3), layers=("linear1",),
                        log_distance=((-140.0,), (-139.0,), (-138.0,), (-137.0,)),
                        log_overall=(-140.0, -139.0, -138.0, -137.0), seconds=1.0)

    raw = {"out": "runs/x", "digest": "d" * 64, "spec_hash": "s" * 64, "epochs": 3, "train_loss": 1.5,
           "test_loss": 2.25, "nonfinite": None, "train_seconds": 0.25, "process_seconds": 4.0, "cpu_model": None,
           "config": {"controls": {"dtype": "float32", "threads": 2, "isa": "avx2", "deterministic": True},
                      "epochs": 3, "perturb": {"tensor": "linear1.weight", "index": [0, 1], "ulps": -1}},
           "effective": {"cpu_capability": "AVX2", "intra_op_threads": 2, "inter_op_threads": 2,
                         "deterministic_algorithms": True, "threadpools": []},
           "extra": {"perturbation": floor.to_json()}}
    console = Console(record=True, width=400)
    monkeypatch.setattr(run_summary, "console", console)
    run_summary.render(RunSummary.from_json(raw))
    text = console.export_text()
    assert "dtype float32, threads 2, isa avx2, deterministic" in text
    assert "linear1.weight[0, 1] moved -1 ulp" in text
    assert "ln(divergence) grows 2.3 ln/epoch over epochs 1-3 (least-squares; end to end 2.3" in text
    assert "saturates after epoch 3" in text
    assert "no sensitivity measured for this experiment" in text
    console = Console(record=True, width=400)
    monkeypatch.setattr(run_summary, "console", console)
    run_summary.render(RunSummary.from_json(raw), exact, np.array([0.5, -2.0]))  # small: up to 2e-3
    text = console.export_text()
    # exact: e^3 over rows 0..3; this floor: e^(ln 1000) = e^6.91; rounding adds e^3.91 = x49.8.
    assert "grows a difference 1 ln/epoch over epochs 1-3" in text
    assert "a factor e^3 (x20.1); this one grew e^6.91 (x1e+03): float32 rounding adds e^3.91 (x49.8)" in text
    console = Console(record=True, width=400)
    monkeypatch.setattr(run_summary, "console", console)
    run_summary.render(RunSummary.from_json(raw), exact, np.array([0.001]))  # small: up to 1e-6, rows 0..2
    text = console.export_text()
    assert "over epochs 1-2" in text and "this one grew e^4.61 (x100)" in text
    assert "no stored mpmath reference for this spec and length" in text
    assert "operator audit" not in text


# --------------------------------------------------------------------------- conventions

def test_version_and_short_help(cli):
    import bnaudit

    assert cli("--version") == (0, f"bnaudit {bnaudit.__version__}\n", "")
    code, out, err = cli("-h")
    assert code == 0 and out.startswith("Usage: bnaudit [OPTIONS] COMMAND") and "--version" in out and err == ""
    code, out, _ = cli("baseline", "create", "-h")
    assert code == 0 and out.startswith("Usage: bnaudit baseline create")


@pytest.mark.parametrize("args, path", [((), "bnaudit"), (("baseline",), "bnaudit baseline"),
                                        (("reference",), "bnaudit reference")])
def test_a_bare_command_group_prints_readable_help_and_one_error_line(cli, args, path):
    code, out, err = cli(*args)
    assert code == 2
    assert out.startswith(f"Usage: {path} [OPTIONS] COMMAND") and "\nCommands:\n" in out
    assert err == f"bnaudit: error: {path}: no command given (its help is above)\n"


def _commands():
    """Every command and group of the CLI, as argument lists (walked from the click tree)."""
    import typer

    from bnaudit.cli import app

    def walk(command, path):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "bnaudit")
def test_every_help_ends_with_the_exit_codes(cli, path):
    from bnaudit.errors import BRIEF

    code, out, err = cli(*path, "--help")
    assert code == 0 and err == ""
    codes = out[out.rindex("Exit codes: "):]  # the epilog: the last paragraph
    assert " ".join(codes.split()) == " ".join(f"Exit codes: {'; '.join(f'{int(c)} {t}' for c, t in BRIEF.items())}."
                                               .split())
    assert list(BRIEF) == list(ExitCode)


def test_every_variable_bnaudit_reads_is_documented_in_the_help_and_the_readme(cli):
    import ast
    import re
    from pathlib import Path

    source = Path(envinfo.__file__).read_text()
    read = {node.args[0].value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            and re.fullmatch(r"[A-Z_]+", node.args[0].value)}
    from bnaudit.cli import check as check_cli

    read |= {check_cli.STEP_SUMMARY_VARIABLE}
    read -= {"BNAUDIT_CPU_MODEL"}  # set by bnaudit itself for an emulated run's process
    assert read == set(envinfo.VARIABLES)
    _, out, _ = cli("--help")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in envinfo.VARIABLES:
        assert f"{name}: " in " ".join(out.split()), name
        assert f"`{name}`" in readme, name


def test_dtype_and_isa_are_offered_by_shell_completion(tmp_path):
    def complete(words: str) -> list[str]:
        env = {**envinfo.environ(), "_BNAUDIT_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        done = subprocess.run([sys.executable, "-m", "bnaudit", *[]], env=env, capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("bnaudit run --dtype ") == ["float32", "float64", "bfloat16", "bf16-mixed"]
    assert complete("bnaudit run --isa a") == ["avx2", "avx512"]
    assert complete("bnaudit ref") == ["reference"]
    script = subprocess.run([sys.executable, "-m", "bnaudit", "--show-completion", "bash"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert script.returncode == 0 and "_BNAUDIT_COMPLETE=complete_bash" in script.stdout


def test_force_and_jobs_are_spelled_alike_everywhere(cli):
    """--force is a flag (no --no-force) wherever it exists; parallelism is -j/--jobs wherever it exists."""
    seen = {"--force": 0, "--jobs": 0}
    for path in _commands():
        _, out, _ = cli(*path, "--help")
        assert "--no-force" not in out, path
        if "--jobs" in out:
            seen["--jobs"] += 1
            assert "-j, --jobs" in out, path
        seen["--force"] += "--force" in out
    assert seen["--force"] >= 5 and seen["--jobs"] >= 2


def test_the_json_summary_of_a_run_that_diverged_is_strict_json(cli, tmp_path):
    spec = tmp_path / "diverges.toml"
    spec.write_text("[train]\nlr = 10.0\n")  # the largest rate a spec accepts; it overflows in epoch 0
    code, out, err = cli("run", "--spec", str(spec), "--epochs", "1", "--audit-every", "0", "--out",
                         str(tmp_path / "r"), "--json")
    assert code == 0, err

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a --json output")

    summary = json.loads(out, parse_constant=refuse)  # no NaN or Infinity literal anywhere
    assert summary["nonfinite"] is not None
    assert summary["train_loss"] in ("nan", "inf", "-inf") and summary["test_loss"] in ("nan", "inf", "-inf")
