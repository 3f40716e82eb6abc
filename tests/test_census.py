"""bnaudit census: machines grouped into classes of bit-identical runs, their splits, what separates them.

A real census through the CLI: this machine and two qemu CPU models, Nehalem (Intel,
SSE4.2) and EPYC-Rome (AMD, AVX2), one epoch each.  qemu's results do not depend on the
host, so the two emulated models part on every host; where ``native`` falls is the host's
business and is never asserted.  The split is checked against the records' own values,
and the separating features against each model's features read directly under qemu.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnaudit import emulate, envinfo, record
from bnaudit.matrix import census

MODELS = ("Nehalem", "EPYC-Rome")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    from bnaudit.cli import main

    out = tmp_path_factory.mktemp("census") / "c"
    code = main(["census", "--models", ",".join(MODELS), "-j", "2", "--out", str(out), "--json"])
    assert code == 0
    return out, json.loads((out / "census.json").read_text())


def test_the_census_groups_machines_and_the_two_emulated_models_part(done):
    out, doc = done
    names = [m["name"] for m in doc["machines"]]
    assert names == ["native", *MODELS] and doc["missing"] == [] and doc["epochs"] == 1
    assert "machines that part at all part inside its first step" in doc["why_epochs"]
    klass = {m["name"]: m["klass"] for m in doc["machines"]}
    assert klass["Nehalem"] != klass["EPYC-Rome"]
    assert sorted(n for c in doc["classes"] for n in c) == sorted(names)
    for m in doc["machines"]:  # each machine's class holds it, and its digest is its record's
        assert m["name"] in doc["classes"][m["klass"]]
        folder = "runs/" + ("float32_t1_native_nondet" if m["name"] == "native"
                            else f"float32_t1_native_nondet_cpu-{m['name']}")
        assert record.load(out / folder).digest == m["digest"]
    same = [c for c in doc["classes"] if len(c) > 1]
    for c in same:  # a class is bit-identical: one digest
        assert len({m["digest"] for m in doc["machines"] if m["name"] in c}) == 1
    assert (out / "census.md").read_text().startswith("### bnaudit census: 3 machines in ")
    assert (out / "summary.json").is_file()  # the census folder is a matrix folder


def _first_step_values(path, tensor):
    fp = record.load(path)
    return fp.first_step.values[tensor]


def test_the_split_of_the_emulated_models_is_the_records_own_first_difference(done):
    out, doc = done
    klass = {m["name"]: m["klass"] for m in doc["machines"]}
    i, j = sorted((klass["Nehalem"], klass["EPYC-Rome"]))
    (split,) = [s for s in doc["splits"] if (s["i"], s["j"]) == (i, j)]
    first = split["first"]
    # Two CPUs with identical initial state part inside the training, in step 0 (issue 14).
    assert (first["epoch"], first["step"], first["phase"]) == (0, 0, "forward")
    a = _first_step_values(out / "runs/float32_t1_native_nondet_cpu-Nehalem", first["tensor"])
    b = _first_step_values(out / "runs/float32_t1_native_nondet_cpu-EPYC-Rome", first["tensor"])
    differing = (np.ascontiguousarray(a, np.float32).view(np.uint32)
                 != np.ascontiguousarray(b, np.float32).view(np.uint32))
    assert differing.any() and first["elements"] == differing.size
    assert round(first["fraction_differing"] * differing.size) == int(differing.sum())


def test_the_separating_features_are_the_models_own(done):
    _, doc = done
    features = {"native": {k for k, v in envinfo.cpu_features().items() if v}}
    features.update({m: {k for k, v in emulate.model_features(m).items() if v} for m in MODELS})
    for s in doc["splits"]:
        a, b = doc["classes"][s["i"]], doc["classes"][s["j"]]
        assert s["only_i"] == sorted(set.intersection(*(features[n] for n in a)) - set.union(*(features[n] for n in b)))
        assert s["only_j"] == sorted(set.intersection(*(features[n] for n in b)) - set.union(*(features[n] for n in a)))
    # What holds on every host: Nehalem has no AVX, EPYC-Rome has AVX2 and FMA3, and qemu says AMD for EPYC.
    by_name = {m["name"]: m for m in doc["machines"]}
    assert "AVX" not in by_name["Nehalem"]["features"]
    assert {"AVX2", "FMA3"} <= set(by_name["EPYC-Rome"]["features"])
    assert (by_name["Nehalem"]["vendor"], by_name["EPYC-Rome"]["vendor"]) == ("GenuineIntel", "AuthenticAMD")
    assert by_name["native"]["vendor"] == envinfo.cpu_vendor()


def test_running_it_again_resumes_and_says_the_same(done, cli):
    out, doc = done
    code, text, err = cli("census", "--models", ",".join(MODELS), "--out", str(out))
    assert code == 0, err
    assert f"3 machines in {len(doc['classes'])} class" in text
    assert "class 1: native (" in text and "length: 1 epoch: every kernel" in text
    assert json.loads((out / "census.json").read_text())["machines"] == doc["machines"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "Bogus"], "Bogus"),
    (["--models", ""], "expected a comma-separated list"),
    (["--models", "Nehalem,,Haswell"], "expected a comma-separated list"),
    (["--epochs", "0"], "Invalid value for '--epochs'"),
    (["-j", "0"], "Invalid value for '-j'"),
])
def test_bad_options_are_one_line_and_exit_2(cli, tmp_path, argv, message):
    code, out, err = cli("census", *argv, "--out", str(tmp_path / "c"))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("bnaudit: error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "c").exists()


def test_vendors_and_separating_features_by_hand():
    assert census.vendor_of("EPYC-Rome") == census.vendor_of("Opteron_G5") == "AuthenticAMD"
    assert census.vendor_of("Dhyana") == "HygonGenuine" and census.vendor_of("Haswell") == "GenuineIntel"
    f = {"a": frozenset({"SSE", "AVX", "AVX2"}), "b": frozenset({"SSE", "AVX"}), "c": frozenset({"SSE", "F16C"})}
    assert census.separating(f, ["a", "b"], ["c"]) == ("AVX",)
    assert census.separating(f, ["c"], ["a", "b"]) == ("F16C",)
    assert census.separating(f, ["a"], ["b"]) == ("AVX2",) and census.separating(f, ["b"], ["a"]) == ()
