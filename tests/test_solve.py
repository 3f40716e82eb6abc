"""bnaudit solve: the cheapest settings that make a set of machines bit-identical, and a fleet's records solved.

A real solve through the CLI over two qemu CPU models (qemu's results do not depend on the
host, so the fleet and its answer are the same everywhere; ``native`` is left out on purpose,
since where it falls is the host's business).  The answer is checked against the records
themselves: the classes before, the verified recipe's records compared bit for bit, the
pruned lever's records equal to the baseline's.  A second solve in the same folder with other
levers reads every run from the first (no run is made) and finds no recipe, so its partition
and causes are checked; the fleet mode solves from copies of the first solve's records.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mutations import UNKNOWN, Mutation, drop, errors, generic, put

from bnaudit import compare, record
from bnaudit.controls import Controls
from bnaudit.errors import ExitCode, UsageError
from bnaudit.matrix import fleet, solve

MACHINES = ("Nehalem", "EPYC-Rome")
LEVERS = ("isa=default", "isa=avx2", "mkl-cbwr=COMPATIBLE", "flush-denormal=on")
RECIPE = "isa=default + mkl_cbwr=COMPATIBLE"
FLEET_BEST = RECIPE + " over 2 epochs"


def _validate(name: str, doc: dict) -> None:
    assert errors(name, doc) == []


def _records(out: Path) -> set[Path]:
    return {p.parent for p in out.rglob("record.json") if not any(part.startswith(".") for part in p.parts)}


def _stage(out: Path, name: str) -> Path:
    found = sorted(out.glob(f"{name}-*"))
    assert len(found) == 1, (name, found)
    return found[0]


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    from bnaudit.cli import main

    out = tmp_path_factory.mktemp("solve") / "s"
    args = ["solve", "--machines", ",".join(MACHINES), *(a for lv in LEVERS for a in ("--lever", lv)),
            "--verify-epochs", "2", "--cost-epochs", "2", "--cost-repeats", "2", "-j", "2", "--out", str(out), "--json"]
    assert main(args) == 0
    return out, json.loads((out / "solve.json").read_text())


def test_the_solver_finds_the_cheapest_recipe_and_verifies_it_bit_for_bit(solved):
    out, doc = solved
    _validate("solve", doc)
    assert doc["machines"] == list(MACHINES) and doc["classes_before"] == [["Nehalem"], ["EPYC-Rome"]]
    assert doc["representatives"] == list(MACHINES) and doc["screen_epochs"] == 1 and doc["verify_epochs"] == 2
    assert doc["best"] == RECIPE and doc["run_options"] == ["--isa", "default", "--mkl-cbwr", "COMPATIBLE"]
    best = doc["candidates"][0]
    assert best["recipe"] == RECIPE and best["classes"] == 1 and best["verified_epochs"] == 2
    # verified: the two machines' 2-epoch records under the recipe are the same bits, tensor for tensor
    verify = _stage(out, "verify-1")
    a, b = (record.load(verify / "runs" / f"float32_t1_default_nondet_cbwr-compatible_cpu-{m}") for m in MACHINES)
    assert a.epochs == b.epochs == 2 and a.digest == b.digest
    assert np.array_equal(a.step_digests, b.step_digests) and np.array_equal(a.state_digests, b.state_digests)
    assert np.array_equal(a.keyframes.view(np.uint8), b.keyframes.view(np.uint8))
    # ... and as they come they are not
    base = _stage(out, "baseline")
    n, h = (record.load(base / "runs" / f"float32_t1_native_nondet_cpu-{m}") for m in MACHINES)
    assert n.digest != h.digest


def test_the_printed_recipe_applied_with_plain_run_options_makes_the_machines_identical(solved, cli, tmp_path):
    """What a user does with the answer: ``bnaudit run`` with the printed options on each machine."""
    out, doc = solved
    runs = {m: tmp_path / m for m in MACHINES}
    procs = [subprocess.Popen([sys.executable, "-m", "bnaudit", "run", *doc["run_options"], "--cpu-model", m,
                               "--epochs", "2", "--audit-every", "0", "--out", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for m, path in runs.items()]  # the two machines side by side, as two hosts would
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read() if p.stderr else ""
    code, stdout, _ = cli("compare", *(str(p) for p in runs.values()))
    assert code == 0 and "identical" in stdout
    verify = _stage(out, "verify-1")
    for m, path in runs.items():  # and they are the solver's own verified runs, bit for bit
        assert record.load(path).digest == record.load(
            verify / "runs" / f"float32_t1_default_nondet_cbwr-compatible_cpu-{m}").digest


def test_the_screen_prunes_what_changes_nothing_and_names_what_a_machine_cannot_do(solved):
    out, doc = solved
    tried = {t["recipe"]: t for t in doc["tried"]}
    assert tried["flush_denormal=on"]["pruned"] == "neutral" and tried["flush_denormal=on"]["changes"] == []
    screen = _stage(out, "screen-1")
    base = _stage(out, "baseline")
    for m in MACHINES:  # neutral is the records' word: the same digest as the settings as they come
        ftz = record.load(screen / "runs" / f"float32_t1_native_nondet_cpu-{m}_ftz")
        assert ftz.digest == record.load(base / "runs" / f"float32_t1_native_nondet_cpu-{m}").digest
    # neither the ISA cap nor MKL's branch alone makes an Intel and an AMD CPUID agree, both together do
    for alone in ("isa=default", "mkl_cbwr=COMPATIBLE"):
        assert tried[alone]["classes"] == 2 and tried[alone]["pruned"] is None and tried[alone]["changes"]
    assert tried[RECIPE]["levers"] == 2 and tried[RECIPE]["classes"] == 1
    assert [t["recipe"] for t in doc["tried"] if t["levers"] == 2] == [RECIPE]  # flush_denormal was pruned
    assert [(x["lever"], x["machine"]) for x in doc["infeasible"]] == [("isa=avx2", "Nehalem")]
    assert "cannot run --isa avx2" in doc["infeasible"][0]["reason"]
    assert doc["search_runs"] == 2 + 2 * 3 + 2 * 1 and doc["runs"]["cost"] == 2 * 2 and doc["runs"]["verify-1"] == 2
    assert doc["exhaustive_runs"] == 2 * 2 * 2 * 2  # isa (default or not) x mkl_cbwr x flush x 2 machines


def test_the_recipe_is_written_for_a_ci_file_and_its_cost_measured(solved):
    out, doc = solved
    best = doc["candidates"][0]
    env = dict(line.split("=", 1) for line in best["environment"])
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    assert env["MKL_CBWR"] == "COMPATIBLE" and env["MKL_ENABLE_INSTRUCTIONS"] == "SSE4_2"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert "BNAUDIT_CPU_MODEL" not in env and best["unset"] == [] and best["calls"] == []
    assert len(best["seconds"]) == 2 and len(doc["baseline_seconds"]) == 2
    ratios = sorted(s / b for s, b in zip(best["seconds"], doc["baseline_seconds"], strict=True))
    assert best["cost"] == pytest.approx(sum(ratios) / 2)  # the median of two rounds
    cost = _stage(out, "cost")
    assert sorted(p.name for p in (cost / "runs").iterdir()) == ["round-1", "round-2"]
    md = (out / "solve.md").read_text()
    assert md.startswith("### bnaudit solve: 2 machines, 2 classes") and "export ATEN_CPU_CAPABILITY=default" in md


def test_a_solve_with_other_levers_reuses_every_run_and_names_what_separates_the_classes(solved, cli):
    out, _ = solved
    before = _records(out)
    code, stdout, _ = cli("solve", "--machines", ",".join(MACHINES), "--lever", "flush-denormal=on",
                          "--lever", "mkl-cbwr=COMPATIBLE", "--verify-epochs", "2", "--out", str(out), "--json")
    assert code == 0 and _records(out) == before  # every run read back from the first solve's stages
    doc = json.loads(stdout)
    _validate("solve", doc)
    assert doc["best"] is None and doc["candidates"] == [] and doc["run_options"] is None
    assert doc["partition_recipe"] == "none" and doc["partition"]["classes"] == [["Nehalem"], ["EPYC-Rome"]]
    split = doc["partition"]["splits"][0]
    assert "FMA3" in split["only_j"] and "AVX2" in split["only_j"] and split["only_i"] == []
    assert split["vendors"] == [["GenuineIntel"], ["AuthenticAMD"]]
    assert any("under an AMD CPUID it ignores MKL_ENABLE_INSTRUCTIONS" in c for c in doc["causes"])
    base = _stage(out, "baseline")
    n, h = (record.load(base / "runs" / f"float32_t1_native_nondet_cpu-{m}") for m in MACHINES)
    assert split["first"]["tensor"] == compare.compare_pair(n, h).first.tensor
    assert any("only class 2 has" in c and "FMA vs no FMA" in c for c in doc["causes"])


def _fleet(out: Path, tmp: Path) -> Path:
    """Two machines' folders, as a CI job would keep them: each its own runs (baseline and verified)."""
    root = tmp / "fleet"
    for m in MACHINES:
        for stage, label in (("baseline", "float32_t1_native_nondet"),
                             ("verify-1", "float32_t1_default_nondet_cbwr-compatible")):
            shutil.copytree(_stage(out, stage) / "runs" / f"{label}_cpu-{m}", root / m.lower() / stage / label)
    return root


def test_a_fleets_records_are_solved_without_a_run(solved, cli, tmp_path):
    out, _ = solved
    root = _fleet(out, tmp_path)
    code, stdout, _ = cli("solve", "--records", f"a={root / 'nehalem'}", "--records", f"b={root / 'epyc-rome'}",
                          "--json")
    assert code == 0
    doc = json.loads(stdout)
    _validate("solve-records", doc)
    assert doc["machines"] == ["a/Nehalem", "b/EPYC-Rome"]
    recipes = {c["recipe"]: c for c in doc["candidates"]}
    assert set(recipes) == {FLEET_BEST, "none over 1 epoch"}
    assert doc["best"] == FLEET_BEST and doc["run_options"] == ["--isa", "default", "--mkl-cbwr", "COMPATIBLE"]
    assert recipes[FLEET_BEST]["verified_epochs"] == 2
    assert recipes["none over 1 epoch"]["classes"] == 2 and "linear" in recipes["none over 1 epoch"]["parted"]
    assert recipes[FLEET_BEST]["cost"] is None  # no run of the settings as they come at 2 epochs


def test_a_fleet_record_that_does_not_load_is_refused_naming_it(solved, cli, tmp_path):
    out, _ = solved
    root = _fleet(out, tmp_path)
    forged = root / "epyc-rome" / "baseline" / "float32_t1_native_nondet" / "record.json"
    original = forged.read_text()
    forged.write_text(original.replace('"epochs": 1', '"epochs": 2', 1))
    code, stdout, stderr = cli("solve", "--records", str(root / "nehalem"), "--records", str(root / "epyc-rome"))
    assert code == ExitCode.BAD_INPUT and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "epyc-rome" in stderr and "Traceback" not in stderr
    forged.write_text(original)
    pipe = root / "nehalem" / "baseline" / "piped"
    pipe.mkdir()
    os.mkfifo(pipe / "record.json")  # a FIFO is refused, not read (which would wait for a writer forever)
    code, _, stderr = cli("solve", "--records", str(root / "nehalem"), "--records", str(root / "epyc-rome"))
    assert code == ExitCode.BAD_INPUT and "not a regular file" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = cli("solve", "--records", f"x={root / 'nehalem'}", "--records", f"x={root / 'epyc-rome'}")
    assert code == ExitCode.USAGE and "share a machine name" in stderr


MUTATIONS: dict[str, list[tuple[str, str, Mutation]]] = {
    "solve": [
        ("found", "a single machine", put("machines", value=["Nehalem"])),
        ("found", "a lever not CONTROL=VALUE", put("levers", 0, value="ISA default")),
        ("found", "screen of no epoch", put("screen_epochs", value=0)),
        ("found", "an empty class", put("classes_before", 0, value=[])),
        ("found", "infeasible without its reason", drop("infeasible", 0, "reason")),
        ("found", "tried unknown key", put("tried", 0, UNKNOWN, value=1)),
        ("found", "tried recipe of no lever", put("tried", 0, "levers", value=0)),
        ("found", "change of an unknown phase", put("tried", 0, "changes", 0, "first", "phase", value="sideways")),
        ("found", "candidate unknown key", put("candidates", 0, UNKNOWN, value=1)),
        ("found", "candidate cost zero", put("candidates", 0, "cost", value=0)),
        ("found", "candidate variable not a NAME=value", put("candidates", 0, "environment", 0, value="omp=1")),
        ("found", "candidate verified over 0 epochs", put("candidates", 0, "verified_epochs", value=0)),
        ("found", "candidate without run options", drop("candidates", 0, "run_options")),
        ("found", "a stage of negative runs", put("runs", "cost", value=-1)),
        ("found", "no exhaustive run", put("exhaustive_runs", value=0)),
        ("none", "partition unknown key", put("partition", UNKNOWN, value=1)),
        ("none", "partition over 0 epochs", put("partition", "epochs", value=0)),
        ("none", "partition split of an unknown phase", put("partition", "splits", 0, "first", "phase",
                                                            value="sideways")),
        ("none", "a cause not a string", put("causes", 0, value=1)),
    ],
    "solve-records": [
        ("records", "a machine twice", put("machines", 1, value="a/Nehalem")),
        ("records", "a source of three", put("sources", 0, value=["a", "x", "y"])),
        ("records", "candidate unknown key", put("candidates", 0, UNKNOWN, value=1)),
        ("records", "candidate of negative classes", put("candidates", 0, "classes", value=-1)),
        ("records", "incomplete not (configuration, machines)", put("incomplete", value=[["x"]])),
        ("records", "an unknown dtype", put("dtype", value="float16")),
    ],
}
"""Per schema (tests/test_schemas.py asks for them here): (answer, what is wrong, the mutation), with the generic."""


def test_the_solve_schemas_refuse_mutated_real_answers(solved, cli, tmp_path):
    out, found = solved
    code, stdout, _ = cli("solve", "--machines", ",".join(MACHINES), "--lever", "flush-denormal=on", "--lever",
                          "mkl-cbwr=COMPATIBLE", "--verify-epochs", "2", "--out", str(out), "--json")
    assert code == 0
    none = json.loads(stdout)  # read back from the first solve's runs: no recipe, so a partition
    root = _fleet(out, tmp_path)
    code, stdout, _ = cli("solve", "--records", f"a={root / 'nehalem'}", "--records", f"b={root / 'epyc-rome'}",
                          "--json")
    assert code == 0
    answers = {"found": found, "none": none, "records": json.loads(stdout)}
    accepted = []
    for name, cases in MUTATIONS.items():
        first = cases[0][0]
        assert errors(name, answers[first]) == []
        for label, what, mutate in [*cases, *((first, w, f) for w, f in generic(answers[first]))]:
            doc = copy.deepcopy(answers[label])
            mutate(doc)
            if errors(name, doc) == []:
                accepted.append(f"{name}: {label}: {what}")
    assert accepted == [], "the solve schemas accept these mutated answers"


@pytest.mark.parametrize("args, message", [
    (["--machines", "Nehalem"], "at least two machines"),
    (["--machines", "Nehalem,EPYC-Rome", "--lever", "bogus=1"], "not a control a lever can set"),
    (["--machines", "Nehalem,EPYC-Rome", "--lever", "isa"], "expected CONTROL=VALUE"),
    (["--machines", "Nehalem,EPYC-Rome", "--lever", "deterministic=maybe"], "takes on or off"),
    (["--machines", "Nehalem,EPYC-Rome", "--lever", "mkl-cbwr=NOPE"], "unknown MKL_CBWR value"),
    (["--machines", "Nehalem,EPYC-Rome", "--verify-epochs", "1001"], "between 1 and the spec's 1000"),
    (["--machines", "Nehalem,EPYC-Rome", "--epochs", "3", "--verify-epochs", "2"], "must be at least --epochs"),
    (["--machines", "Nehalem,EPYC-Rome", "--max-levers", "0"], "--max-levers must be between"),
    (["--records", "a", "--machines", "Nehalem"], "--machines do not apply"),
    (["--records", "bad name=x"], "machine name"),
])
def test_a_bad_request_is_one_line_and_exit_2_before_anything_runs(cli, tmp_path, args, message):
    code, stdout, stderr = cli("solve", *args, "--out", str(tmp_path / "s")) if "--records" not in args \
        else cli("solve", *args)
    assert code == ExitCode.USAGE, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "s").exists()


def test_levers_parse_to_the_controls_and_options_of_bnaudit_run():
    assert solve.parse_lever("mkl-cbwr=avx2,strict") == solve.Lever("mkl_cbwr", "AVX2,STRICT")
    assert solve.parse_lever("mkl-cbwr=avx2,strict").run_options() == ["--mkl-cbwr", "AVX2,STRICT"]
    assert solve.parse_lever("deterministic=on").run_options() == ["--deterministic"]
    assert solve.parse_lever("deterministic=off").run_options() == []
    assert solve.parse_lever("numpy-disable=X86_V4+X86_V3").run_options() == ["--numpy-disable", "X86_V3+X86_V4"]
    assert solve.parse_lever(" isa = default ").text == "isa=default"
    with pytest.raises(UsageError):
        solve.parse_lever("dtype=float64")


def test_a_recipe_that_does_what_a_smaller_one_does_is_not_run():
    base = Controls()
    isa, sse, compat = (solve.parse_lever(t) for t in ("isa=default", "mkl_cbwr=SSE4_2", "mkl_cbwr=COMPATIBLE"))
    assert solve._redundant(base, solve.recipe_of([sse, isa]))  # --isa default already sets MKL_CBWR=SSE4_2
    assert not solve._redundant(base, solve.recipe_of([compat, isa]))
    levers = (solve.parse_lever("mkl_cbwr=none"), solve.parse_lever("flush_denormal=on"))
    env, unset, calls = solve.environment(base, levers)
    assert "MKL_CBWR" in unset and not any(line.startswith("MKL_CBWR=") for line in env)
    assert calls == ["torch.set_flush_denormal(True)"]


def test_a_fleet_source_names_its_machine():
    assert fleet.parse_source("ci-intel=artifacts/x") == ("ci-intel", Path("artifacts/x"))
    assert fleet.parse_source("artifacts/amd-runner") == ("amd-runner", Path("artifacts/amd-runner"))
