"""The example GitHub Actions workflow (examples/github-actions/bnaudit-drift.yml), proved here.

Two things are checked.  actionlint, with shellcheck for the ``run:`` scripts, finds nothing
in the workflow, and does find a copy broken on purpose.  And the workflow's own steps,
read from the YAML, run here: each job's ``run:`` steps in order, under GitHub's shell
(``defaults.run.shell: bash`` is ``bash --noprofile --norc -eo pipefail {0}``), in a
workspace of their own, with ``$GITHUB_STEP_SUMMARY`` and the other runner files set.  The
only ``run:`` steps not run are the installs that need the network (``NETWORK_STEPS``, and
the test holds that list to exactly those).  ``${{ ... }}`` expressions are evaluated by
an explicit table for a push event (``evaluate``): an expression it does not know fails
the test.  upload-artifact and download-artifact are emulated by copying folders the way
download-artifact v4+ lays them out with ``pattern:`` and without ``merge-multiple``: one
folder per artifact name under ``path``.

The matrix is emulated by a host-independent subset: the float32 leg of both x86-64
runner types (``--isa avx2``, which every x86-64 host here has) and of the ARM runner
(``--isa native``, run on this host against a native baseline made here; the leg's shell
logic is what is tested, not ARM arithmetic).  The baselines are made here by
``bnaudit baseline create``.  Identical runs must pass the gate; a leg whose ``bnaudit run``
gets ``--perturb`` (a 1-ulp drift that exists on every host) must fail it, naming the case.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parent.parent / "examples" / "github-actions" / "bnaudit-drift.yml"

# GitHub's command line for `shell: bash`; the script file is its last argument ({0}).
GITHUB_BASH = ("bash", "--noprofile", "--norc", "-eo", "pipefail")

# The run: steps that are not run here: they install from the network, which this machine
# does not reach.  The test's environment has bnaudit installed already.
NETWORK_STEPS = frozenset({"install torch (CPU build)", "install bnaudit"})

# uses: steps that have no effect here: the workspace is laid out by the test (checkout),
# Python is this interpreter (setup-python), the JUnit files are read by the test (reporter).
INERT_ACTIONS = frozenset({"actions/checkout", "actions/setup-python", "mikepenz/action-junit-report"})

PERTURB = "linear1.weight[0,0]:1"
COMPARE = "compare the runner types, per dtype (informational)"
CHECK = "check every run against the baseline of its dtype and architecture"
STEP_TIMEOUT = 600


# --------------------------------------------------------------------------- tools

def _tool(name: str) -> str:
    """An executable of the test environment (the interpreter's scripts folder first), or a failure."""
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    found = shutil.which(name, path=path)
    if found is None:
        pytest.fail(f"{name} is not installed; `pip install -c constraints.txt -e '.[test]'` installs it",
                    pytrace=False)
    return found


def _actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("actionlint"), "-shellcheck", _tool("shellcheck"), "-no-color", "-oneline",
                           str(path)], capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- expressions

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
STATUS_FUNCTIONS = ("success()", "failure()", "always()", "cancelled()")


@dataclasses.dataclass
class Context:
    """What an expression can see: a push event, one matrix leg, the env in scope."""

    matrix: dict[str, str]
    env: dict[str, str]
    failed: bool = False


# The compound expressions the workflow uses, each with its value for a push event and no
# workflow_dispatch inputs.  A new expression in the workflow fails the test until it is
# added here.
COMPOUND: dict[str, Callable[[Context], Any]] = {
    "github.event_name == 'schedule' && 'full' || inputs.profile || 'smoke'": lambda c: "smoke",
    "!cancelled()": lambda c: True,
}


def evaluate(expr: str, ctx: Context) -> Any:
    """The value of one ``${{ }}`` expression, or AssertionError for one not emulated."""
    if expr in COMPOUND:
        return COMPOUND[expr](ctx)
    m = re.fullmatch(r"(matrix|env|secrets)\.([A-Za-z_][A-Za-z0-9_-]*)", expr)
    if m is None:
        raise AssertionError(f"expression not emulated: ${{{{ {expr} }}}}")
    scope, key = m.groups()
    if scope == "secrets":
        return ""  # no secret, as in a fork's pull request
    source = ctx.matrix if scope == "matrix" else ctx.env
    if key not in source:
        raise AssertionError(f"${{{{ {expr} }}}}: no {scope} value {key!r} here")
    return source[key]


def substitute(text: Any, ctx: Context) -> str:
    return EXPRESSION.sub(lambda m: str(evaluate(m.group(1), ctx)), str(text))


def condition(raw: Any, ctx: Context) -> bool:
    """A job's or step's ``if:``; without a status function GitHub adds ``success() &&``."""
    if raw is None:
        return not ctx.failed
    text = str(raw).strip()
    m = EXPRESSION.fullmatch(text)
    expr = m.group(1) if m else text
    value = evaluate(expr, ctx)
    assert isinstance(value, bool), f"if: {raw!r} is not a boolean here"
    if not any(f in expr for f in STATUS_FUNCTIONS):
        value = value and not ctx.failed
    return value


# --------------------------------------------------------------------------- the workflow

def load_workflow(path: Path = WORKFLOW) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and "jobs" in doc
    return doc


def matrix_leg(doc: dict[str, Any], **values: str) -> dict[str, str]:
    """One combination of the fingerprint job's matrix, with what its ``include`` entries add."""
    matrix = doc["jobs"]["fingerprint"]["strategy"]["matrix"]
    axes = {k: v for k, v in matrix.items() if k not in ("include", "exclude")}
    assert set(values) == set(axes), f"a leg names every axis: {sorted(axes)}"
    for key, value in values.items():
        assert value in axes[key], f"{value!r} is not in the matrix's {key}"
    leg: dict[str, Any] = dict(values)
    for extra in matrix.get("include", []):
        if all(leg[k] == v for k, v in extra.items() if k in axes):
            leg.update({k: v for k, v in extra.items() if k not in axes})
    return {k: str(v) for k, v in leg.items()}


@dataclasses.dataclass
class Step:
    """What became of one step."""

    name: str
    how: str  # "ran", "network", "not if", "inert", "upload", "download"
    code: int | None = None
    output: str = ""
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Job:
    steps: list[Step]
    failed: bool
    summary: str
    workspace: Path

    def step(self, name: str) -> Step:
        (found,) = [s for s in self.steps if s.name == name]
        return found


def _action(step: dict[str, Any]) -> str:
    return str(step["uses"]).partition("@")[0]


def _step_name(step: dict[str, Any]) -> str:
    return str(step.get("name") or step.get("uses") or step["run"].splitlines()[0])


def _runner_environment(workspace: Path, bin_dir: Path) -> dict[str, str]:
    """This process's environment without the real runner's variables, plus a fresh runner's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "RUNNER_")) and k != "BNAUDIT_SIGNING_KEY"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CI="true", GITHUB_ACTIONS="true",
               GITHUB_EVENT_NAME="push", GITHUB_WORKSPACE=str(workspace), RUNNER_OS="Linux")
    return env


def _run_script(script: str, env: dict[str, str], workspace: Path, temp: Path) -> Step:
    """One run: step under GitHub's bash, with fresh runner files; the emulator handles none but the summary."""
    files = {name: temp / f"{name.lower()}.txt" for name in
             ("GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH")}
    for f in files.values():
        f.write_text("")
    script_file = temp / "step.sh"
    script_file.write_text(script)
    proc = subprocess.run([*GITHUB_BASH, str(script_file)], cwd=workspace, env={**env, **{k: str(v) for k, v in
                          files.items()}, "RUNNER_TEMP": str(temp)}, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT)
    for name in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH"):
        assert files[name].read_text() == "", f"the step writes ${name}, which this emulation does not apply"
    return Step("", "ran", proc.returncode, proc.stdout + proc.stderr,
                inputs={"summary": files["GITHUB_STEP_SUMMARY"].read_text()})


def _search_root(pattern: str) -> str:
    """upload-artifact's root for one path: everything before the first wildcard, or the folder of a file."""
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return str(Path(*parts[:i])) if i else "."
    return pattern


def _upload(inputs: dict[str, str], workspace: Path, artifacts: Path) -> tuple[int, str]:
    """actions/upload-artifact: the files under ``path`` (lines, globs), relative to their common root."""
    patterns = [p.strip() for p in inputs["path"].splitlines() if p.strip()]
    found: list[Path] = []
    for pattern in patterns:
        for hit in sorted(workspace.glob(pattern)):
            found += [hit] if hit.is_file() else sorted(f for f in hit.rglob("*") if f.is_file())
    found = [f for f in found if not any(p.startswith(".") for p in f.relative_to(workspace).parts)]
    if not found:
        return (1 if inputs.get("if-no-files-found") == "error" else 0), f"no files found for {patterns}"
    roots = [workspace / _search_root(p) for p in patterns]
    roots = [r.parent if r.is_file() else r for r in roots]
    root = Path(os.path.commonpath(roots))
    dest = artifacts / inputs["name"]
    assert not dest.exists(), f"artifact {inputs['name']} uploaded twice"
    for f in found:
        (dest / f.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / f.relative_to(root))
    return 0, f"uploaded {len(found)} files as {inputs['name']}"


def _download(inputs: dict[str, str], workspace: Path, artifacts: Path) -> tuple[int, str]:
    """actions/download-artifact v4+ with ``pattern:``: one folder per artifact, unless only one matches."""
    assert set(inputs) <= {"pattern", "path"}, f"download-artifact inputs not emulated: {sorted(inputs)}"
    target = workspace / inputs.get("path", ".")
    matches = sorted(a for a in artifacts.iterdir() if fnmatch.fnmatchcase(a.name, inputs["pattern"]))
    for artifact in matches:
        shutil.copytree(artifact, target if len(matches) == 1 else target / artifact.name, dirs_exist_ok=True)
    return 0, f"downloaded {[a.name for a in matches]}"


def _uses_step(step: dict[str, Any], ctx: Context, workspace: Path, artifacts: Path) -> Step:
    action = _action(step)
    if action in INERT_ACTIONS:
        return Step(_step_name(step), "inert", inputs={k: str(v) for k, v in step.get("with", {}).items()})
    inputs = {k: substitute(v, ctx) for k, v in step.get("with", {}).items()}
    if action == "actions/upload-artifact":
        code, text = _upload(inputs, workspace, artifacts)
        return Step(_step_name(step), "upload", code, text, inputs)
    if action == "actions/download-artifact":
        code, text = _download(inputs, workspace, artifacts)
        return Step(_step_name(step), "download", code, text, inputs)
    raise AssertionError(f"action not emulated: {step['uses']}")


def run_job(doc: dict[str, Any], job_id: str, workspace: Path, artifacts: Path, bin_dir: Path,
            matrix: dict[str, str] | None = None, only: frozenset[str] | None = None) -> Job:
    """Run one job's steps as a runner would, in ``workspace`` (already checked out); ``only``: these steps."""
    job = doc["jobs"][job_id]
    assert (doc.get("defaults", {}).get("run", {}).get("shell")) == "bash", "the workflow sets shell: bash"
    ctx = Context(matrix=matrix or {}, env={})
    ctx.env = {k: substitute(v, ctx) for k, v in doc.get("env", {}).items()}
    ctx.env.update({k: substitute(v, ctx) for k, v in job.get("env", {}).items()})
    assert condition(job.get("if"), ctx), f"job {job_id} would not run"
    temp = workspace.parent / f"{workspace.name}-runner-temp"
    temp.mkdir()
    base_env = _runner_environment(workspace, bin_dir)
    steps, summary = [], []
    for raw in job["steps"]:
        name = _step_name(raw)
        step_ctx = Context(matrix=ctx.matrix, env=dict(ctx.env), failed=ctx.failed)
        step_ctx.env.update({k: substitute(v, step_ctx) for k, v in raw.get("env", {}).items()})
        if only is not None and name not in only:
            steps.append(Step(name, "not selected"))
            continue
        if not condition(raw.get("if"), step_ctx):
            steps.append(Step(name, "not if"))
            continue
        if "uses" in raw:
            done = _uses_step(raw, step_ctx, workspace, artifacts)
        elif name in NETWORK_STEPS:
            done = Step(name, "network")
        else:
            assert "shell" not in raw and "working-directory" not in raw, f"{name}: not emulated"
            done = dataclasses.replace(_run_script(substitute(raw["run"], step_ctx), {**base_env, **step_ctx.env},
                                                   workspace, temp), name=name)
            summary.append(done.inputs.pop("summary"))
        steps.append(done)
        ctx.failed = ctx.failed or bool(done.code)
    return Job(steps=steps, failed=ctx.failed, summary="".join(summary), workspace=workspace)


# --------------------------------------------------------------------------- scenarios

def _shim(folder: Path, perturb: str | None = None) -> Path:
    """A ``bnaudit`` command that is this interpreter's bnaudit; with ``perturb``, its runs get --perturb."""
    folder.mkdir(parents=True)
    inject = "" if perturb is None else f'if [ "$1" = run ]; then shift; set -- run --perturb \'{perturb}\' "$@"; fi\n'
    (folder / "bnaudit").write_text(f'#!/bin/sh\n{inject}exec "{sys.executable}" -m bnaudit "$@"\n')
    (folder / "bnaudit").chmod(0o755)
    return folder


@dataclasses.dataclass
class Scenario:
    legs: dict[str, Job]
    gate: Job
    artifacts: Path


def _checkout(root: Path, name: str, baselines: Path) -> Path:
    """The job's workspace: what the steps read from the repository (the committed baselines)."""
    workspace = root / name
    workspace.mkdir()
    shutil.copytree(baselines, workspace / "baselines")
    return workspace


def run_workflow(root: Path, baselines: Path, legs: list[dict[str, str]], *, drifted: str | None = None,
                 artifacts: Path | None = None) -> Scenario:
    """The fingerprint job for each leg (``drifted``: the runner whose run is perturbed), then the gate job."""
    doc = load_workflow()
    root.mkdir(parents=True)
    store = root / "artifacts"
    if artifacts is None:
        store.mkdir()
    else:
        shutil.copytree(artifacts, store)
    plain = _shim(root / "bin")
    jobs = {}
    for values in legs:
        leg = matrix_leg(doc, **values)
        bin_dir = _shim(root / f"bin-{leg['runner']}", PERTURB) if leg["runner"] == drifted else plain
        jobs[leg["runner"]] = run_job(doc, "fingerprint", _checkout(root, f"leg-{leg['runner']}", baselines), store,
                                      bin_dir, matrix=leg)
    gate = run_job(doc, "gate", _checkout(root, "gate", baselines), store, plain)
    return Scenario(legs=jobs, gate=gate, artifacts=store)


X64 = [{"runner": "ubuntu-24.04", "dtype": "float32"}, {"runner": "ubuntu-22.04", "dtype": "float32"}]
ARM = {"runner": "ubuntu-24.04-arm", "dtype": "float32"}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed baselines the workflow reads, made by `bnaudit baseline create` here.

    Shorter than the full profile the workflow's header asks for (the smoke check compares
    a prefix either way): 5 epochs for the legs' checks, 30 float64 epochs for the accuracy
    check.  The arm64 one is a native run of this host, like the emulated ARM leg.
    """
    from bnaudit.cli import main

    folder = tmp_path_factory.mktemp("repo") / "baselines"
    for args in (["--dtype", "float32", "--isa", "avx2", "--profile", "smoke", "--out", "float32.json"],
                 ["--dtype", "float32", "--isa", "native", "--profile", "smoke", "--out", "float32-arm64.json"],
                 ["--dtype", "float64", "--isa", "avx2", "--epochs", "30", "--out", "float64.json"]):
        args[-1] = str(folder / args[-1])
        assert main(["baseline", "create", *args]) == 0
    return folder


@pytest.fixture(scope="module")
def identical(tmp_path_factory: pytest.TempPathFactory, baselines: Path) -> Scenario:
    return run_workflow(tmp_path_factory.mktemp("identical") / "w", baselines, [*X64, ARM])


@pytest.fixture(scope="module")
def drifted(tmp_path_factory: pytest.TempPathFactory, baselines: Path, identical: Scenario) -> Scenario:
    """ubuntu-22.04's run perturbed by one ulp; ubuntu-24.04's leg is the identical scenario's artifact."""
    kept = tmp_path_factory.mktemp("kept")
    name = "run-float32-x64-ubuntu-24.04"
    shutil.copytree(identical.artifacts / name, kept / name)
    return run_workflow(tmp_path_factory.mktemp("drifted") / "w", baselines, [X64[1]], drifted="ubuntu-22.04",
                        artifacts=kept)


def _junit_cases(path: Path) -> dict[str, ET.Element]:
    return {str(tc.get("name")): tc for tc in ET.parse(path).getroot().iter("testcase")}


# --------------------------------------------------------------------------- actionlint

def test_actionlint_finds_nothing_in_the_workflow():
    done = _actionlint(WORKFLOW)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("broken, expected", [
    (("LEG: run-${{ matrix.dtype }}", "LEG: run-${{ matrix.dtyp }}"), 'property "dtyp" is not defined'),
    (("if [ \"$code\" -gt 1 ]; then status=$code; fi", "if [ \"$code\" -gt 1 ]; then status=$code;"),
     "shellcheck reported issue"),
], ids=["expression", "shell"])
def test_actionlint_catches_a_broken_copy(tmp_path, broken, expected):
    old, new = broken
    text = WORKFLOW.read_text(encoding="utf-8")
    assert text.count(old) == 1
    copy = tmp_path / "bnaudit-drift.yml"
    copy.write_text(text.replace(old, new))
    done = _actionlint(copy)
    assert done.returncode == 1 and expected in done.stdout, done.stdout + done.stderr


# --------------------------------------------------------------------------- the emulation itself

def test_only_the_network_installs_are_skipped():
    doc = load_workflow()
    for job_id, job in doc["jobs"].items():
        runs = {_step_name(s): s["run"] for s in job["steps"] if "run" in s}
        installs = {name for name, script in runs.items() if re.search(r"\bpip install\b|\bcurl\b|\bwget\b", script)}
        assert installs == NETWORK_STEPS == set(runs) & NETWORK_STEPS, job_id
        assert "--index-url" in runs["install torch (CPU build)"]
        assert " -e " not in runs["install bnaudit"] and "-c constraints.txt ." in runs["install bnaudit"]
        assert {_action(s) for s in job["steps"] if "uses" in s} - INERT_ACTIONS <= {
            "actions/upload-artifact", "actions/download-artifact"}, job_id


def test_an_expression_the_emulation_does_not_know_fails():
    ctx = Context(matrix={"dtype": "float32"}, env={"PROFILE": "smoke"})
    assert substitute("${{ matrix.dtype }}-${{ env.PROFILE }}", ctx) == "float32-smoke"
    assert substitute("${{ secrets.BNAUDIT_SIGNING_KEY }}", ctx) == ""
    for unknown in ("${{ matrix.runner }}", "${{ github.sha }}", "${{ env.PROFILE == 'full' }}"):
        with pytest.raises(AssertionError, match=r"not emulated|no matrix value"):
            substitute(unknown, ctx)


def test_the_matrix_pins_an_isa_on_x86_and_gives_arm_its_own_baseline():
    doc = load_workflow()
    for runner in ("ubuntu-24.04", "ubuntu-22.04"):
        assert matrix_leg(doc, runner=runner, dtype="float32") == {
            "runner": runner, "dtype": "float32", "arch": "x64", "isa": "avx2"}
    assert matrix_leg(doc, **ARM)["isa"] == "native" and matrix_leg(doc, **ARM)["arch"] == "arm64"
    assert doc["permissions"] == {"contents": "read"}
    assert doc["concurrency"]["cancel-in-progress"] is True
    assert doc["jobs"]["gate"]["permissions"] == {"contents": "read", "checks": "write"}


# --------------------------------------------------------------------------- the workflow, run

def test_identical_runs_pass_the_gate(identical: Scenario):
    for runner, job in identical.legs.items():
        assert not job.failed, (runner, [(s.name, s.code, s.output[-2000:]) for s in job.steps if s.code])
        assert [s.how for s in job.steps if s.how != "ran"] == ["inert", "inert", "network", "network", "upload"]
    gate = identical.gate
    assert not gate.failed, [(s.name, s.code, s.output[-3000:]) for s in gate.steps if s.code]
    assert [s.how for s in gate.steps] == ["inert", "inert", "network", "network", "download", "ran", "ran", "ran",
                                           "ran", "upload", "inert"]
    runs = sorted(p.name for p in (gate.workspace / "runs").iterdir())
    assert runs == ["run-float32-arm64-ubuntu-24.04-arm", "run-float32-x64-ubuntu-22.04",
                    "run-float32-x64-ubuntu-24.04"]
    assert all((gate.workspace / "runs" / r / "record.json").is_file() for r in runs)
    x64 = _junit_cases(gate.workspace / "junit-check-x64.xml")
    assert sorted(x64) == ["float32_t1_avx2_nondet [run-float32-x64-ubuntu-22.04]",
                           "float32_t1_avx2_nondet [run-float32-x64-ubuntu-24.04]"]
    assert all(tc.find("failure") is None for tc in x64.values())
    assert list(_junit_cases(gate.workspace / "junit-check-arm64.xml")) == ["float32_t1_native_nondet"]
    (accuracy,) = _junit_cases(gate.workspace / "junit-accuracy.xml").values()
    assert accuracy.get("name") == "float64_t1_avx2_nondet" and accuracy.find("failure") is None
    check_out = gate.step(CHECK).output
    for case, baseline in (("float32_t1_avx2_nondet [run-float32-x64-ubuntu-22.04]", "float32.json"),
                           ("float32_t1_avx2_nondet [run-float32-x64-ubuntu-24.04]", "float32.json"),
                           ("float32_t1_native_nondet", "float32-arm64.json")):
        assert f"PASS {case}: bit-identical to baseline baselines/{baseline} (5 epochs)" in check_out
    accuracy_out = gate.step("accuracy against the mpmath reference").output
    passed = r"PASS float64_t1_avx2_nondet: .*\(30 epochs\); fewest correct bits \d+\.\d .*at least 20 required"
    assert re.search(passed, accuracy_out), accuracy_out


def test_the_gate_writes_its_summary_report_and_junit(identical: Scenario):
    gate = identical.gate
    summary = gate.summary
    # One compare over the three float32 runs; how many classes they make depends on the host
    # (the ARM leg runs native here), but the two x86 legs are one class on any host.
    assert summary.startswith("## float32 across runner types\n### bnaudit compare: 3 inputs, ")
    assert "`runs/run-float32-x64-ubuntu-22.04`<br>`runs/run-float32-x64-ubuntu-24.04`" in summary
    assert summary.count("## bnaudit check: PASS (policy `exact`)") == 2  # arm64, x64
    assert summary.count("## bnaudit check: PASS (policy `bits:20`)") == 1 and "FAIL" not in summary
    assert (gate.workspace / "compare-float32.md").read_text() in summary
    report = identical.artifacts / "bnaudit-report"
    assert {"report.json", "index.html", "report.md"} <= {p.name for p in (report / "bnaudit-report").iterdir()}
    assert sorted(p.name for p in report.glob("junit-*.xml")) == ["junit-accuracy.xml", "junit-check-arm64.xml",
                                                                  "junit-check-x64.xml"]
    reporter = gate.step("show the JUnit results")
    assert sorted(p.name for p in gate.workspace.glob(reporter.inputs["report_paths"])) == sorted(
        p.name for p in gate.workspace.glob("junit*.xml"))


def test_a_drifted_leg_fails_the_gate_naming_its_case(drifted: Scenario):
    (leg,) = drifted.legs.values()
    assert not leg.failed
    made = json.loads((drifted.artifacts / "run-float32-x64-ubuntu-22.04" / "record.json").read_text())
    assert made["config"]["perturb"] == {"index": [0, 0], "tensor": "linear1.weight", "ulps": 1}
    gate = drifted.gate
    assert gate.failed
    compare = gate.step(COMPARE)
    assert compare.code == 0, compare.output  # they differ (exit 1): informational
    check_step = gate.step(CHECK)
    assert check_step.code == 1, check_step.output
    drift = "float32_t1_avx2_nondet [run-float32-x64-ubuntu-22.04]"
    assert f"FAIL {drift}: drift beyond exact" in check_step.output
    assert ("PASS float32_t1_avx2_nondet [run-float32-x64-ubuntu-24.04]: bit-identical to baseline "
            "baselines/float32.json (5 epochs)") in check_step.output
    cases = _junit_cases(gate.workspace / "junit-check-x64.xml")
    failure = cases[drift].find("failure")
    assert failure is not None and "linear1.weight" in str(failure.get("message"))
    assert cases["float32_t1_avx2_nondet [run-float32-x64-ubuntu-24.04]"].find("failure") is None
    assert f"::error title=bnaudit check%3A {drift}::FAIL" in check_step.output  # an annotation on the run
    summary = gate.summary
    assert summary.startswith("## float32 across runner types\n### bnaudit compare: **DIFFERENT**\n")
    assert "**training split**: the initial state (phase init), layer linear1, tensor linear1.weight" \
        in summary
    assert "## bnaudit check: FAIL (policy `exact`)" in summary
    assert f"| `{drift}` | ❌ drift |" in summary and "## bnaudit check: PASS (policy `bits:20`)" in summary
    # !cancelled(): the accuracy check, the report and its upload still ran after the failure
    assert gate.step("accuracy against the mpmath reference").code == 0
    assert gate.step("report").code == 0 and (drifted.artifacts / "bnaudit-report" / "junit-check-x64.xml").is_file()


def test_a_record_that_cannot_be_read_fails_compare_and_check(tmp_path, baselines: Path, identical: Scenario):
    """Exit 3 (an edited record) is not the informational exit 1: both steps fail, and JUnit says why."""
    doc = load_workflow()
    store = tmp_path / "artifacts"
    shutil.copytree(identical.artifacts, store, ignore=shutil.ignore_patterns("bnaudit-report"))
    edited = store / "run-float32-x64-ubuntu-22.04" / "record.json"
    raw = json.loads(edited.read_text())
    raw["config"]["controls"]["threads"] = 2
    edited.write_text(json.dumps(raw))
    (download,) = [_step_name(s) for s in doc["jobs"]["gate"]["steps"]
                   if "uses" in s and _action(s) == "actions/download-artifact"]
    job = run_job(doc, "gate", _checkout(tmp_path, "gate", baselines), store, _shim(tmp_path / "bin"),
                  only=frozenset({download, COMPARE, CHECK}))
    assert job.failed
    compare, check_step = job.step(COMPARE), job.step(CHECK)
    assert compare.code == 3 and "run-float32-x64-ubuntu-22.04" in compare.output, compare.output
    assert check_step.code == 3, check_step.output
    (case,) = _junit_cases(job.workspace / "junit-check-x64.xml").values()
    error = case.find("error")
    assert error is not None and error.get("type") == "BAD_INPUT (exit 3)", ET.tostring(case)
