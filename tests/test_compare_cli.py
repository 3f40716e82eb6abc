"""`bnaudit compare` through the real CLI: verdicts, exit codes, --json, --markdown, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bnaudit import record
from bnaudit.errors import ExitCode


@pytest.fixture(scope="module")
def runs(compare_runs):
    return compare_runs


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnaudit: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_identical_runs_exit_0(cli, runs):
    code, out, err = cli("compare", str(runs["t1"]), str(runs["rerun"] / "fingerprint.json"))
    assert code == ExitCode.OK == 0, err
    assert "bit-identical" in out


def test_threads_1_vs_2_exit_1_and_name_the_first_step(cli, runs):
    a, b = record.load(runs["t1"]), record.load(runs["t2"])
    if a.digest == b.digest:
        pytest.skip("on this host 1 and 2 threads give the same float32 bits (the --perturb tests do not depend on it)")
    code, out, _ = cli("compare", str(runs["t1"]), str(runs["t2"]))
    assert code == ExitCode.DIFFERENT == 1
    first = next(line for line in out.splitlines() if line.startswith("training split"))
    assert "epoch 1, step 1, phase forward" in first
    # The named tensor is the first one whose step digest differs (an oracle on the raw digests).
    import numpy as np

    col = int(np.flatnonzero(a.step_digests[0] != b.step_digests[0])[0])
    assert f"tensor {a.step_tensors[col].key}" in first and f"layer {a.step_tensors[col].layer}" in first
    assert "config.controls.threads" in out and "divergence" in out


def test_json_and_b_a_agree(cli, runs):
    outs = []
    fp = runs["perturb"] / "fingerprint.json"
    for x, y in ((runs["t1"], fp), (fp, runs["t1"])):
        code, out, _ = cli("compare", str(x), str(y), "--json")
        assert code == 1
        outs.append(json.loads(out))
    ab, ba = outs
    assert ab["schema"] == "bnaudit.compare/2" and ab["verdict"] == ba["verdict"] == "different"
    assert ab["pair"]["first"] == ba["pair"]["first"]
    first = ab["pair"]["first"]
    assert (first["epoch"], first["step"], first["phase"], first["layer"], first["tensor"], first["max_ulps"]) == (
        0, 0, "init", "linear1", "linear1.weight", 1)
    assert ab["pair"]["divergence"]["max_ulps"] == ba["pair"]["divergence"]["max_ulps"]
    assert [[k, vb, va] for k, va, vb in ab["pair"]["environment_diff"]] == ba["pair"]["environment_diff"]


def test_markdown_for_a_pull_request(cli, runs):
    code, out, _ = cli("compare", str(runs["t1"]), str(runs["perturb"]), "--markdown")
    assert code == 1
    assert out.startswith("### bnaudit compare: **DIFFERENT**")
    assert "| layer | 0 |" in out and "| all |" in out and "linear1.weight" in out


def test_many_inputs_group_into_classes(cli, runs):
    code, out, _ = cli("compare", str(runs["t1"]), str(runs["rerun"]), str(runs["perturb"]), "--json")
    assert code == 1
    many = json.loads(out)["many"]
    assert [c["indices"] for c in many["classes"]] == [[0, 1], [2]]
    assert many["pairs"][0]["comparison"]["first"]["tensor"] == "linear1.weight"
    code, out, _ = cli("compare", str(runs["t1"]), str(runs["rerun"]), str(runs["t1"] / "record.json"))
    assert code == 0 and "1 class of bit-identical runs" in out


def test_a_different_spec_is_refused_with_one_line_exit_4(cli, runs):
    code, out, err = cli("compare", str(runs["t1"]), str(runs["nobn"] / "fingerprint.json"))
    assert code == ExitCode.MISMATCH == 4 and out == ""
    line = one_error_line(err)
    assert "different spec" in line and "model.batchnorm" in line
    code, out, _ = cli("compare", str(runs["t1"]), str(runs["nobn"]), "--allow-different-spec")
    assert code == 1 and "spec differs (allowed): model.batchnorm" in out


@pytest.mark.parametrize("args, code", [
    (["compare", "A"], ExitCode.USAGE),
    (["compare", "A", "B", "--json", "--markdown"], ExitCode.USAGE),
    (["compare", "A", "missing"], ExitCode.BAD_INPUT),
    (["compare", "A", "--no-such-flag", "B"], ExitCode.USAGE),
])
def test_unusable_requests_give_one_line_and_their_code(cli, runs, args, code):
    args = [str(runs["t1"]) if a == "A" else str(runs["t2"]) if a == "B" else a for a in args]
    got, out, err = cli(*args)
    assert got == code
    one_error_line(err)
    if "--json" in args:  # the error as an object on stdout too
        assert json.loads(out)["error"] == {"code": int(code), "name": ExitCode(code).name,
                                            "message": err.removeprefix("bnaudit: error: ").rstrip("\n")}
    else:
        assert out == ""


def test_the_installed_command_runs_without_torch_or_mpmath(runs, tmp_path):
    """The comparison needs neither torch nor mpmath: a light CI job can run it."""
    script = (
        "import sys\n"
        "from bnaudit.cli import main\n"
        f"code = main(['compare', {str(runs['t1'])!r}, {str(runs['perturb'] / 'fingerprint.json')!r}, '--json'])\n"
        "heavy = [m for m in ('torch', 'mpmath') if m in sys.modules]\n"
        "sys.stderr.write(repr(heavy))\n"
        "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().endswith("[]"), proc.stderr
    assert json.loads(proc.stdout)["pair"]["first"]["layer"] == "linear1"
    proc = subprocess.run([sys.executable, "-m", "bnaudit", "compare", str(runs["t1"]), str(tmp_path / "nope.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == ""
    one_error_line(proc.stderr)


def test_comparison_json_reads_back_strictly(cli, runs):
    """`--json` output reads back into the same comparison; anything else is one InputError line."""
    from bnaudit.errors import InputError
    from bnaudit.report import compare_view

    code, out, _ = cli("compare", str(runs["t1"]), str(runs["perturb"]), "--json")
    assert code == 1
    assert compare_view.to_json(compare_view.from_json(out)) == out.strip()
    for bad, message in (('{"schema": NaN}', "not JSON"), ("[1]", "top level is not an object"),
                         ('{"schema": "bnaudit.compare/1"}', "schema is not bnaudit.compare/2"),
                         ('{"schema": "bnaudit.compare/2", "kind": "pair"}', "malformed pair comparison")):
        with pytest.raises(InputError, match=message):
            compare_view.from_json(bad)
