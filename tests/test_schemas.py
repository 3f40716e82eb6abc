"""The JSON Schemas of bnaudit/schemas: valid themselves, met by real outputs, and not vacuous.

Every document validated here comes from the real thing: records of short real runs
(``make_run``), a baseline, comparisons, checks, ``run --json``, ``env --json`` and an
error through the real CLI, and a real two-run matrix (float32 and bf16-mixed at native
ISA and one thread, so it runs alike on any host).  Mutated copies of each real document
(a required key removed, a digest cut short, an unknown key at a closed level, a wrong
constant or enum value) must be rejected, and every ``schema`` string the code writes
must have its schema file.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mutations import UNKNOWN, Mutation, cut, drop, errors, generic, put

from bnaudit import bits, blocks, check, compare, controls, layout, schemas, spec
from bnaudit.cli import main
from bnaudit.errors import ExitCode
from bnaudit.matrix import plan, results
from bnaudit.reference.sensitivity import Window

PACKAGE = Path(schemas.__file__).parent.parent
PERTURB = "linear1.weight[0,0]:1"
NOT_COVERED = {
    "bnaudit.frozen/1": "the frozen inputs' manifest (reference/frozen), data rather than an output",
    "bnaudit.reference/1": "the mpmath reference's manifest (reference/mpmath)",
    "bnaudit.reference-job/3": "the reference build's resumable job state",
    "bnaudit.report/1": "bnaudit report's JSON",
    "bnaudit.bundle/1": "compare --bundle's manifest, read by the reproduce.py beside it",
    "bnaudit.ensemble-outcomes/1": "an ensemble baseline's block, described inside the baseline schema's block",
}
"""Schema strings the code writes that no schema file covers yet, and what they are."""


def _cli(*args: str) -> tuple[int, Any]:
    """The real CLI in-process: its exit code and its stdout parsed as JSON."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    try:
        return code, json.loads(out.getvalue())
    except ValueError:
        pytest.fail(f"bnaudit {' '.join(args)} (exit {code}) printed no JSON: {out.getvalue()[:300]!r} "
                    f"{err.getvalue()[:300]!r}")


@pytest.fixture(scope="module")
def documents(make_run, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Real documents by label, each made by the code that writes it."""
    tmp = tmp_path_factory.mktemp("schemas")
    run, drifted = make_run(3, threads=1), make_run(3, perturb=PERTURB)
    docs = {"fingerprint": json.loads((run / "fingerprint.json").read_text()),
            "fingerprint-perturb": json.loads((drifted / "fingerprint.json").read_text()),
            "record": json.loads((run / "record.json").read_text()),
            "record-perturb": json.loads((drifted / "record.json").read_text())}
    base = tmp / "baseline.json"
    code, docs["baseline-written"] = _cli("baseline", "create", "--record", str(run), "--out", str(base), "--json")
    assert code == 0
    docs["baseline"] = json.loads(base.read_text())
    expected = {
        "compare-identical": (0, ["compare", str(run), str(run / "fingerprint.json"), "--json"]),
        "compare-different": (1, ["compare", str(run), str(drifted), "--json"]),
        "compare-many": (1, ["compare", str(run), str(drifted), str(run / "fingerprint.json"), "--json"]),
        "check-pass": (0, ["check", "--baseline", str(base), "--record", str(run), "--json"]),
        "check-fail": (1, ["check", "--baseline", str(base), "--record", str(drifted), "--json"]),
        "check-within": (0, ["check", "--baseline", str(base), "--record", str(drifted), "--json",
                             "--tolerance", f"ulps:{check.MAX_ULPS}"]),
        "run": (0, ["run", "--epochs", "2", "--perturb", PERTURB, "--out", str(tmp / "run"), "--json"]),
        "env": (0, ["env", "--json"]),
        "sensitivity": (0, ["reference", "sensitivity", "--epochs", "2", "--json"]),
        "census": (0, ["census", "--models", "Nehalem", "--out", str(tmp / "census"), "-j", "2", "--json"]),
        "error": (ExitCode.BAD_INPUT, ["compare", str(tmp / "missing.json"), str(run), "--json"]),
        "matrix": (0, ["matrix", "--dtype", "float32,bf16-mixed", "--threads", "1", "--isa", "native", "--epochs", "2",
                       "--audit-every", "0", "-j", "2", "--out", str(tmp / "matrix"), "--json"]),
    }
    for label, (code, args) in expected.items():
        got, docs[label] = _cli(*args)
        assert got == code, f"bnaudit {' '.join(args)}: exit {got}, expected {code}: {docs[label]}"
    docs["matrix-summary.json"] = json.loads((tmp / "matrix" / "summary.json").read_text())
    docs["matrix.json"] = json.loads((tmp / "matrix" / "matrix.json").read_text())
    return docs


# --------------------------------------------------------------------------- the schemas themselves

def test_every_schema_is_a_valid_draft_2020_12_schema_with_its_id_and_name():
    assert len(schemas.names()) >= 13
    for name in schemas.names():
        schema = schemas.load(name)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert schema["$id"] == f"bnaudit.{name}/{schema['$id'].rpartition('/')[2]}", name
        assert schema["title"] and schema["description"], name
    with pytest.raises(KeyError, match="no bnaudit schema"):
        schemas.load("fingerprints")


def _written_schema_strings() -> set[str]:
    """Every ``bnaudit.NAME/N`` the code writes: a ``*_SCHEMA`` constant, or the value of a "schema" key."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            values: list[ast.expr] = []
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("SCHEMA")
                                                    for t in node.targets):
                values.append(node.value)
            if isinstance(node, ast.Dict):
                values += [v for k, v in zip(node.keys, node.values)
                           if isinstance(k, ast.Constant) and k.value == "schema"]
            found |= {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return {s for s in found if re.fullmatch(r"bnaudit\.[a-z][a-z-]*/[0-9]+", s)}


def test_every_schema_string_the_code_writes_has_a_schema_file():
    written = _written_schema_strings()
    ids = set(schemas.all_schemas()) - {"bnaudit.defs/1"}
    assert {"bnaudit.fingerprint/3", "bnaudit.record/4", "bnaudit.error/1"} <= written  # the scan finds them
    assert written - set(NOT_COVERED) == ids, "schema strings without a schema file, or schema files of nothing"
    assert set(NOT_COVERED) <= written, "NOT_COVERED names a schema string the code no longer writes"


def _enum(schema: dict[str, Any], *path: str) -> list[Any]:
    node: Any = schema
    for key in path:
        node = node[key]
    return list(node["enum"])


def _props(schema: dict[str, Any], *path: str) -> set[str]:
    node: Any = schema
    for key in path:
        node = node[key]
    return set(node["properties"])


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_closed_sets_are_the_codes_own():
    defs = schemas.load("defs")["$defs"]
    assert _enum(defs, "dtype") == list(controls.DTYPES)
    assert _enum(defs, "isa") == list(controls.ISAS)
    assert _enum(defs, "storage") == list(bits.STORAGES)
    assert _enum(defs, "phase") == list(layout.PHASES)
    assert _props(defs, "controls") == _fields(controls.Controls)
    assert _props(defs, "config") == _fields(controls.RunConfig)
    assert _props(defs, "difference") == _fields(compare.Difference)
    assert _props(defs, "spec") == _fields(spec.ExperimentSpec) | {"schema"}
    for section, cls in (("data", spec.DataSpec), ("model", spec.ModelSpec), ("train", spec.TrainSpec)):
        assert _props(defs, "spec", "properties", section) == _fields(cls), section
    assert _props(schemas.load("compare"), "$defs", "pair") == _fields(compare.PairComparison)
    assert _enum(schemas.load("audit"), "properties", "ops", "items") == list(blocks.AUDIT_OPS)
    assert _enum(schemas.load("check"), "$defs", "case", "properties", "verdict") == [v.value for v in check.Verdict]
    summary = schemas.load("matrix-summary")["properties"]
    assert _props(summary, "runs", "items") == _fields(results.RunRow)
    assert _enum(summary, "verdicts", "items", "properties", "control") == list(plan.CONTROL_FIELDS)
    assert set(summary) == _fields(results.MatrixSummary) | {"schema", "bnaudit", "complete"}
    assert _props(schemas.load("matrix"), "$defs", "grid") == _fields(plan.Grid)
    assert _props(schemas.load("sensitivity"), "properties", "windows", "items") == _fields(Window)
    error = schemas.load("error")["properties"]["error"]["properties"]
    failures = [c for c in ExitCode if c is not ExitCode.OK]
    assert error["code"]["enum"] == [int(c) for c in failures] and error["name"]["enum"] == [c.name for c in failures]


# --------------------------------------------------------------------------- real outputs validate

VALID = [
    ("fingerprint", "fingerprint"), ("fingerprint", "fingerprint-perturb"), ("fingerprint", "baseline"),
    ("record", "record"), ("record", "record-perturb"), ("baseline", "baseline"),
    ("baseline-written", "baseline-written"),
    ("compare", "compare-identical"), ("compare", "compare-different"), ("compare", "compare-many"),
    ("check", "check-pass"), ("check", "check-fail"), ("check", "check-within"),
    ("run-summary", "run"), ("env", "env"), ("error", "error"),
    ("matrix-summary", "matrix"), ("matrix-summary", "matrix-summary.json"), ("matrix", "matrix.json"),
    ("sensitivity", "sensitivity"), ("census", "census"),
]


@pytest.mark.parametrize("name, label", VALID, ids=[f"{n}:{d}" for n, d in VALID])
def test_real_outputs_validate(documents, name, label):
    doc = documents[label]
    assert errors(name, doc) == []
    # A baseline is a fingerprint file: its own schema string is its block's.
    written = doc["extra"]["baseline"]["schema"] if name == "baseline" else doc["schema"]
    assert written == schemas.load(name)["$id"]


def test_the_real_outputs_exercise_what_the_schemas_describe(documents):
    """The cases above are the interesting ones: blocks present, differences found, verdicts of each kind."""
    assert set(documents["fingerprint"]["extra"]) == {"divergence", "operator_audit"}
    assert "perturbation" in documents["record-perturb"]["extra"] and "perturbation" in documents["run"]["extra"]
    assert documents["compare-identical"]["verdict"] == "identical"
    assert documents["compare-different"]["pair"]["first"] is not None
    assert len(documents["compare-many"]["many"]["classes"]) == 2
    verdicts = [documents[k]["cases"][0]["verdict"] for k in ("check-pass", "check-fail", "check-within")]
    assert verdicts == ["identical", "drift", "within"] and documents["check-within"]["cases"][0]["measured"]
    assert documents["matrix"] == documents["matrix-summary.json"] and documents["matrix"]["verdicts"][0]["largest"]
    assert documents["baseline"]["extra"]["baseline"]["schema"] == "bnaudit.baseline/2"


# --------------------------------------------------------------------------- not vacuous: mutations are refused

MUTATIONS: dict[str, list[tuple[str, str, Mutation]]] = {
    "fingerprint": [
        ("fingerprint", "digest short", cut("digest")),
        ("fingerprint", "first-step tensor of an unknown dtype", put("first_step", "tensors", 0, 1, value="float16")),
        ("fingerprint", "first-step values missing", drop("first_step", "values")),
        ("fingerprint", "content_sha256 short", cut("content_sha256")),
        ("fingerprint", "epoch digest short", cut("epoch_digests", 0)),
        ("fingerprint", "step digests not a multiple of 16", cut("steps", 0, "digests")),
        ("fingerprint", "float64 loss bits short", cut("losses", "train", 0)),
        ("fingerprint", "wrong kind", put("kind", value="record")),
        ("fingerprint", "unknown dtype", put("config", "controls", "dtype", value="float16")),
        ("fingerprint", "unknown control", put("config", "controls", UNKNOWN, value=1)),
        ("fingerprint", "unknown spec field", put("spec", "model", UNKNOWN, value=1)),
        ("fingerprint", "epochs a string", put("epochs_run", value="3")),
        ("fingerprint", "created not UTC", put("created", value="2026-01-01T00:00:00+02:00")),
        ("fingerprint", "unknown extra block", put("extra", UNKNOWN, value={})),
        ("fingerprint", "divergence digest short", cut("extra", "divergence", "reference", "digest")),
        ("fingerprint", "divergence unknown key", put("extra", "divergence", UNKNOWN, value=1)),
        ("fingerprint", "divergence wrong schema", put("extra", "divergence", "schema", value="bnaudit.divergence/2")),
        ("fingerprint", "divergence not base64", put("extra", "divergence", "max_abs", value="a?b")),
        ("fingerprint", "audit missing rows", drop("extra", "operator_audit", "rows")),
        ("fingerprint", "audit unknown operator", put("extra", "operator_audit", "worst", "bn1", "bn.sum", value=1.0)),
        ("fingerprint-perturb", "chaos floor twin digest short", cut("extra", "perturbation", "twin_digest_rows", 0)),
        ("fingerprint-perturb", "perturb unknown key", put("config", "perturb", UNKNOWN, value=1)),
    ],
    "record": [
        ("record", "file sha256 short", cut("files", "params.npy", "sha256")),
        ("record", "array file missing", drop("files", "probe.npy")),
        ("record", "first-step file missing", drop("files", "first_step.npy")),
        ("record", "first-step tensor without a shape", put("first_step", 0, value=["input", "float32"])),
        ("record", "unknown array file", put("files", "extra.npy", value={"sha256": "0" * 64, "shape": [1],
                                                                          "dtype": "<f4"})),
        ("record", "layout unknown key", put("layout", UNKNOWN, value=[])),
        ("record", "wrong kind", put("kind", value="fingerprint")),
        ("record", "effective unknown key", put("effective", UNKNOWN, value=1)),
        ("record", "environment without cpu_model", drop("environment", "cpu_model")),
    ],
    "baseline": [
        ("baseline", "seal short", cut("extra", "baseline", "sha256")),
        ("baseline", "no baseline block", drop("extra", "baseline")),
        ("baseline", "block unknown key", put("extra", "baseline", UNKNOWN, value=1)),
        ("baseline", "block wrong schema", put("extra", "baseline", "schema", value="bnaudit.baseline/1")),
        ("baseline", "block missing made_from", drop("extra", "baseline", "made_from")),
        ("baseline", "fingerprint digest short", cut("digest")),
    ],
    "compare": [
        ("compare-different", "pair unknown key", put("pair", UNKNOWN, value=1)),
        ("compare-different", "unknown verdict", put("verdict", value="similar")),
        ("compare-different", "kind many with a pair", put("kind", value="many")),
        ("compare-different", "difference unknown phase", put("pair", "first", "phase", value="sideways")),
        ("compare-different", "difference missing row", drop("pair", "first", "row")),
        ("compare-different", "non-finite not a json_number", put("pair", "final_train_loss", 0, value="NaN")),
        ("compare-many", "class digest short", cut("many", "classes", 0, "digest")),
        ("compare-many", "class unknown key", put("many", "classes", 0, UNKNOWN, value=1)),
    ],
    "check": [
        ("check-fail", "unknown verdict", put("cases", 0, "verdict", value="maybe")),
        ("check-fail", "case unknown key", put("cases", 0, UNKNOWN, value=1)),
        ("check-fail", "case missing environment_diff", drop("cases", 0, "environment_diff")),
        ("check-fail", "malformed tolerance", put("tolerance", value="ulps:-1")),
        ("check-within", "measured unknown key", put("cases", 0, "measured", UNKNOWN, value=1)),
        ("check-pass", "passed a string", put("passed", value="true")),
    ],
    "run-summary": [
        ("run", "digest short", cut("digest")),
        ("run", "extra unknown block", put("extra", UNKNOWN, value={})),
        ("run", "chaos-floor headline unknown key", put("extra", "perturbation", UNKNOWN, value=1)),
        ("run", "audit wrong schema", put("extra", "operator_audit", "schema", value="bnaudit.audit/2")),
    ],
    "env": [
        ("env", "no cpu_capability", drop("cpu_capability")),
        ("env", "no torch_build", drop("torch_build")),
        ("env", "no numpy version", drop("numpy")),
        ("env", "isa level unknown", put("supported_isas", 0, value="avx1024")),
        ("env", "startup unknown key", put("python_startup", UNKNOWN, value=1)),
    ],
    "baseline-written": [
        ("baseline-written", "digest short", cut("digest")),
        ("baseline-written", "dtype unknown", put("dtype", value="float16")),
        ("baseline-written", "signed not a boolean", put("signed", value="yes")),
    ],
    "error": [
        ("error", "error unknown key", put("error", UNKNOWN, value=1)),
        ("error", "code not an exit code", put("error", "code", value=0)),
        ("error", "message of two lines", put("error", "message", value="one\ntwo")),
    ],
    "matrix-summary": [
        ("matrix", "run digest short", cut("runs", 0, "digest")),
        ("matrix", "plan id short", cut("plan_id")),
        ("matrix", "host not a string", put("hosts", 0, value=1)),
        ("matrix", "unknown run status", put("runs", 0, "status", value="skipped")),
        ("matrix", "run unknown key", put("runs", 0, UNKNOWN, value=1)),
        ("matrix", "grid unknown control", put("grid", UNKNOWN, value=[1])),
        ("matrix", "verdict unknown control", put("verdicts", 0, "control", value="compiler")),
        ("matrix", "change unknown key", put("verdicts", 0, "first", UNKNOWN, value=1)),
    ],
    "sensitivity": [
        ("sensitivity", "window unknown key", put("windows", 0, UNKNOWN, value=1)),
        ("sensitivity", "rate a string", put("windows", 0, "rate", value="fast")),
        ("sensitivity", "perturbation not a power of two", put("perturbation", "relative", value="tiny")),
        ("sensitivity", "a distance a string", put("log_distance", 0, 0, value="-140")),
    ],
    "census": [
        ("census", "machine unknown key", put("machines", 0, UNKNOWN, value=1)),
        ("census", "class index negative", put("machines", 0, "klass", value=-1)),
        ("census", "digest short", cut("machines", 0, "digest")),
        ("census", "an empty class", put("classes", 0, value=[])),
        ("census", "split difference unknown phase", put("splits", 0, "first", "phase", value="sideways")),
        ("census", "vendors one side only", put("splits", 0, "vendors", value=[["GenuineIntel"]])),
        ("census", "epochs zero", put("epochs", value=0)),
    ],
    "matrix": [
        ("matrix.json", "plan id short", cut("plan_id")),
        ("matrix.json", "run unknown key", put("runs", 0, UNKNOWN, value=1)),
        ("matrix.json", "spec unknown key", put("specs", "default", UNKNOWN, value=1)),
    ],
}
"""Per schema: (document label, what is wrong, the mutation), besides the generic ones of ``mutations.generic``."""


MUTATED_ELSEWHERE = {"solve": "test_solve.py", "solve-records": "test_solve.py", "ensemble": "test_ensemble.py"}
"""Schemas whose real documents cost minutes to make: their MUTATIONS live beside the test that makes them."""


def _mutated_in(file: str) -> set[str]:
    """The keys of the module-level ``MUTATIONS`` dict of a test file (read, not imported)."""
    tree = ast.parse((Path(__file__).parent / file).read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and "MUTATIONS" in ast.unparse(node).split("=")[0]:
            assert isinstance(node.value, ast.Dict)
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return set()


def test_every_schema_but_defs_has_its_mutations():
    for name, file in MUTATED_ELSEWHERE.items():
        assert name in _mutated_in(file), f"{file} does not mutate the {name} schema's documents"
    assert set(MUTATIONS).isdisjoint(MUTATED_ELSEWHERE)
    assert set(MUTATIONS) | set(MUTATED_ELSEWHERE) == set(schemas.names()) - {"defs", "divergence", "audit"}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutated_real_documents_are_refused(documents, name):
    cases = [(label, what, f) for label, what, f in MUTATIONS[name]]
    cases += [(MUTATIONS[name][0][0], what, f) for what, f in generic(documents[MUTATIONS[name][0][0]])]
    accepted = []
    for label, what, mutate in cases:
        doc = copy.deepcopy(documents[label])
        mutate(doc)
        if errors(name, doc) == []:
            accepted.append(f"{label}: {what}")
    assert len(cases) >= 8
    assert accepted == [], f"the {name} schema accepts these mutated documents"
