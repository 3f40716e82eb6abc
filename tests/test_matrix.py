"""`bnaudit matrix`: option parsing, planning, a real 3x2x3 grid, its verdicts, and resuming."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnaudit import envinfo
from bnaudit.cli import lists
from bnaudit.controls import MKL_CBWR_BRANCHES, Controls
from bnaudit.errors import ExitCode, OutputError, RunFailed, UsageError
from bnaudit.matrix import folder
from bnaudit.matrix import plan as mplan
from bnaudit.matrix.execute import threads_honoured
from bnaudit.matrix.findings import findings
from bnaudit.matrix.results import Change, ControlVerdict, IsaAgreement, Largest, MachinePair, MatrixSummary
from bnaudit.matrix.summary import run_matrix
from bnaudit.spec import default_spec, load_spec

# --------------------------------------------------------------------------- parsing


def test_mkl_cbwr_strict_binds_to_the_branch_before_it():
    assert lists.parse_mkl_cbwr("COMPATIBLE,AVX2,STRICT") == ("COMPATIBLE", "AVX2,STRICT")
    assert lists.parse_mkl_cbwr("inherit, none ,avx2,strict") == (None, "none", "AVX2,STRICT")
    for bad in ("STRICT", "inherit,STRICT", "AVX2,STRICT,STRICT", "AVX2,,SSE2"):
        with pytest.raises(UsageError):
            lists.parse_mkl_cbwr(bad)


@given(st.lists(st.tuples(st.sampled_from([b for b in MKL_CBWR_BRANCHES if b != "STRICT"]), st.booleans()),
                min_size=1, max_size=6, unique_by=lambda t: t))
def test_mkl_cbwr_lists_round_trip(values):
    text = ",".join(f"{b},STRICT" if strict else b for b, strict in values)
    expected = tuple(dict.fromkeys(f"{b},STRICT" if strict else b for b, strict in values))
    assert lists.parse_mkl_cbwr(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("both", (False, True)), ("off", (False,)), ("on", (True,)), ("on,off", (True, False)),
    ("true,both", (True, False)),
])
def test_deterministic_values(text, expected):
    assert lists.parse_deterministic(text) == expected


@pytest.mark.parametrize("call", [
    lambda: lists.parse_deterministic("maybe"),
    lambda: lists.parse_threads("1,two"),
    lambda: lists.split_list("float32,,float64", "--dtype"),
    lambda: lists.split_list(" ", "--dtype"),
])
def test_bad_lists_are_usage_errors(call):
    with pytest.raises(UsageError):
        call()


def test_onednn_and_cpu_lists():
    assert lists.parse_onednn("inherit,sse41,AVX2") == (None, "SSE41", "AVX2")
    assert lists.parse_cpu_models("native,Haswell,none") == (None, "Haswell")


def test_every_grid_axis_has_a_parser_and_only_given_options_count():
    assert tuple(lists.PARSERS) == mplan.CONTROL_FIELDS
    assert lists.grid_values(dtype="float32, float64,float32", threads=None, mkl_cbwr="avx2,strict") == {
        "dtype": ("float32", "float64"), "mkl_cbwr": ("AVX2,STRICT",)}


# --------------------------------------------------------------------------- planning


def test_grid_is_the_cartesian_product_with_unique_folders():
    grid = mplan.Grid(dtype=("float32", "float64"), threads=(1, 2), isa=("default", "avx2"),
                       deterministic=(False, True), mkl_cbwr=(None, "AVX2,STRICT"))
    plan = mplan.make_plan([mplan.Variant("default", default_spec())], grid, epochs=2, check_cpu=False)
    assert len(plan.runs) == 2 * 2 * 2 * 2 * 2
    combos = {(r.config.controls.dtype, r.config.controls.threads, r.config.controls.isa,
               r.config.controls.deterministic, r.config.controls.mkl_cbwr) for r in plan.runs}
    assert combos == set(itertools.product(*[grid.dtype, grid.threads, grid.isa, grid.deterministic, grid.mkl_cbwr]))
    assert len({r.folder for r in plan.runs}) == len(plan.runs)
    assert all(r.folder == f"runs/{r.config.controls.label()}" for r in plan.runs)
    assert grid.varying() == ("dtype", "threads", "isa", "deterministic", "mkl_cbwr")


def test_bad_values_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match="unknown dtype"):
        mplan.make_plan([mplan.Variant("d", default_spec())], mplan.Grid(dtype=("float16",)), epochs=1)
    with pytest.raises(UsageError, match="unknown MKL_CBWR"):
        mplan.make_plan([mplan.Variant("d", default_spec())], mplan.Grid(mkl_cbwr=("AVX9",)), epochs=1)


def test_seed_machines_preset_and_its_no_bn_spec(tmp_path):
    plan = mplan.preset_plan("seed-machines", default_spec(), epochs=None, overrides={})
    assert plan.epochs == mplan.SEED_MACHINES_EPOCHS
    assert [v.name for v in plan.variants] == ["bn", "no-bn"]
    bn, no_bn = (v.spec for v in plan.variants)
    assert bn.model.batchnorm and not no_bn.model.batchnorm
    assert bn.to_dict()["data"] == no_bn.to_dict()["data"] and bn.train == no_bn.train
    assert len(plan.runs) == 2 * 2 * 3  # variants x dtypes x (seed-i7, seed-i5, native)
    assert {r.config.controls.cpu_model for r in plan.runs} == {"seed-i7", "seed-i5", None}
    # The spec file the preset writes reads back to the same experiment.
    path = tmp_path / "no-bn.toml"
    path.write_text(folder.spec_toml(no_bn))
    assert load_spec(path).hash == no_bn.hash
    with pytest.raises(UsageError, match="unknown preset"):
        mplan.preset_plan("nope", default_spec(), epochs=None, overrides={})
    shorter = mplan.preset_plan("seed-machines", default_spec(), epochs=5, overrides={"dtype": ("float32",)})
    assert shorter.epochs == 5 and len(shorter.runs) == 6


def test_the_grid_has_one_axis_per_control():
    fields = tuple(f.name for f in dataclasses.fields(Controls))
    assert mplan.CONTROL_FIELDS == fields == tuple(f.name for f in dataclasses.fields(mplan.Grid))


def test_plan_id_names_the_same_folder_as_before():
    """The default --out is reports/matrix/grid-<plan id>: a changed id would not resume an old folder."""
    plan = mplan.make_plan([mplan.Variant("default", default_spec())], mplan.Grid(threads=(1, 2)), epochs=3)
    assert default_spec().short_hash == "2351aff3d25e"
    assert plan.plan_id == "44a5666346fb"  # written by the single-module matrix.py before the package split


# --------------------------------------------------------------------------- findings


def _seed_summary() -> MatrixSummary:
    """A hand-made seed-machines summary touching every kind of sentence."""
    first = Change(epoch=0, step=0, phase="forward", layer="linear1", tensor="linear1.out",
                   where="epoch 0, step 0, phase forward, layer linear1, tensor linear1.out", a="a", b="b")
    later = Change(epoch=1, step=None, phase="eval", layer="bn1", tensor=None,
                   where="end of epoch 1 (phase eval), layer bn1 (eval group)", a="a", b="b")
    controls = {"dtype": "float32", "threads": 1, "isa": "native", "deterministic": False, "onednn_isa": None,
                "mkl_cbwr": None}
    f64 = {**controls, "dtype": "float64"}
    machines = (
        MachinePair(variant="bn", a="bn/x", b="bn/y", cpu_a="seed-i7", cpu_b="seed-i5", controls=controls,
                    identical=False, first=first, growth_rate=1.95, saturation_epoch=7, series=((0, 1e-8), (8, 2.94)),
                    closer_to_reference={"linear1": "a", "bn1": "b", "linear2": "tie"},
                    final_train_loss=(1.075, 1.172)),
        MachinePair(variant="no-bn", a="no-bn/x", b="no-bn/y", cpu_a="seed-i7", cpu_b="seed-i5", controls=controls,
                    identical=False, first=later, growth_rate=0.573, saturation_epoch=None, series=(),
                    closer_to_reference=None, final_train_loss=(0.886, 0.903),
                    float64_distance=((0, 0.0, 0.0), (1, 1e-7, 2e-7), (2, 3e-6, 1e-6))),
        MachinePair(variant="no-bn", a="no-bn/p", b="no-bn/q", cpu_a="seed-i7", cpu_b="seed-i5", controls=f64,
                    identical=True, first=None, growth_rate=None, saturation_epoch=None, series=(),
                    closer_to_reference=None, final_train_loss=(0.5, 0.5)),
        MachinePair(variant="bn", a="bn/p", b="bn/q", cpu_a="seed-i7", cpu_b="seed-i5", controls=f64,
                    identical=False, first=first, growth_rate=80.0, saturation_epoch=None,
                    series=((2, float("inf")),), closer_to_reference=None, final_train_loss=(0.5, float("nan"))),
    )
    verdicts = (
        ControlVerdict(variant="bn", control="threads", values=(1, 2), pairs=4, differing=3,
                       largest=Largest(max_abs=0.000119, max_ulps=2424307, row=3, layer="linear1", a="a", b="b"),
                       first=first, firsts=(("forward bn1 bn1.out", 3),),
                       by_dtype=(("float32", 2, 2), ("float64", 1, 2))),
        ControlVerdict(variant="bn", control="mkl_cbwr", values=(None, "none", "AVX2,STRICT"), pairs=2, differing=0,
                       largest=None, first=None, firsts=()),
        ControlVerdict(variant="no-bn", control="dtype", values=("float32", "float64"), pairs=2, differing=2,
                       largest=Largest(max_abs=0.5, max_ulps=None, row=1, layer="bn1", a="a", b="b"),
                       first=None, firsts=()),
    )
    isa = (IsaAgreement(variant="bn", a="default", b="avx2", compared=2, agree=()),
           IsaAgreement(variant="bn", a="avx2", b="avx512", compared=3,
                        agree=({"threads": 1, "deterministic": True}, {}, {"onednn_isa": None, "cpu_model": None})))
    return MatrixSummary(plan_id="p", preset="seed-machines", folder="f", epochs=8,
                         variants=(("bn", "h1"), ("no-bn", "h2")), grid={"dtype": ["float32", "float64"]}, runs=(),
                         classes=(), verdicts=verdicts, isa_agreement=isa, machines=machines, wall_seconds=None,
                         notes=())


# Written by the single-module matrix.py (before the package split) for the summary above.
SEED_FINDINGS = (
    "[bn] threads changes the bits in 3 of 4 pairs (float32: 2/2, float64: 1/2); first change: epoch 0, step 0, "
    "phase forward, layer linear1, tensor linear1.out; largest divergence 0.000119 (2424307 ulps) in linear1, "
    "after epoch 3",
    "[bn] mkl cbwr (inherit, none, AVX2,STRICT) does not change the bits (2 pairs compared, all identical)",
    "[no-bn] dtype changes the bits in 2 of 2 pairs; largest divergence 0.5 in bn1, after epoch 1",
    "[bn] --isa default and --isa avx2 never agree bit for bit (2 combinations of the other controls tried)",
    "[bn] --isa avx2 and --isa avx512 agree bit for bit in 3 of 3 combinations: threads=1, deterministic=on; "
    "the grid's settings; onednn_isa=inherit, cpu_model=native",
    "[bn] seed-i7 and seed-i5 (float32, 1 thread(s), isa native) first part at epoch 0, step 0, phase forward, "
    "layer linear1, tensor linear1.out; the gap grows by ln 1.95 per epoch (x7.03 per epoch), saturates after "
    "epoch 7, largest parameter difference 2.94 after epoch 8; closer to the mpmath reference: seed-i7 in 1 layers, "
    "seed-i5 in 1, tied in 1",
    "[no-bn] seed-i7 and seed-i5 (float32, 1 thread(s), isa native) first part at end of epoch 1 (phase eval), "
    "layer bn1 (eval group); the gap grows by ln 0.573 per epoch (x1.77 per epoch), does not saturate within the "
    "run; closeness to the mpmath reference: not available (no reference divergence in the records)",
    "[no-bn] seed-i7 and seed-i5 agree bit for bit (float64, 1 thread(s), isa native)",
    "[bn] seed-i7 and seed-i5 (float64, 1 thread(s), isa native) first part at epoch 0, step 0, phase forward, "
    "layer linear1, tensor linear1.out; the gap grows by ln 80 per epoch, does not saturate within the run, "
    "largest parameter difference inf after epoch 2; closeness to the mpmath reference: not available (no reference "
    "divergence in the records)",
    "seed machines, float32: with BN the i7 (Haswell) and the i5 (IvyBridge) part at epoch 0, step 0, phase "
    "forward, layer linear1, tensor linear1.out, and the gap grows by ln 1.95 per epoch (x7.03 per epoch), "
    "saturates after epoch 7, largest parameter difference 2.94 after epoch 8; without BN they part at end of epoch 1 "
    "(phase eval), layer bn1 (eval group), and the gap grows by ln 0.573 per epoch (x1.77 per epoch), does not "
    "saturate within the run; so without BN they part elsewhere, but the gap grows 3.4 times faster (in ln units "
    "per epoch) with BN; final train MSE with BN 1.075 (i7) vs 1.172 (i5), without BN 0.886 vs 0.903",
    "seed machines, float32, with BN: closer to the mpmath reference: seed-i7 in 1 layers, seed-i5 in 1, tied in 1",
    "seed machines, float32, without BN: no mpmath reference divergence in the records; distance from the float64 "
    "run on the same CPU (i7 vs i5) after epoch 1: 1e-07 vs 2e-07; 2: 3e-06 vs 1e-06: the i7 is closer after 1 "
    "of 2 of those epochs, the i5 after 1",
    "seed machines, float64: with BN the i7 (Haswell) and the i5 (IvyBridge) part at epoch 0, step 0, phase "
    "forward, layer linear1, tensor linear1.out, and the gap grows by ln 80 per epoch, does not saturate within "
    "the run, largest parameter difference inf after epoch 2; without BN they are bit-identical; so BN decides "
    "whether they part at all; final train MSE with BN 0.5 (i7) vs nan (i5), without BN 0.5 vs 0.5",
)


def test_findings_say_what_the_tables_say():
    summary = _seed_summary()
    assert findings(summary) == SEED_FINDINGS
    # Non-finite numbers are strings in the JSON, which stays strict.
    fast = summary.to_dict()["machines"][3]
    assert fast["series"] == [[2, "inf"]] and fast["final_train_loss"] == [0.5, "nan"]
    json.dumps(summary.to_dict(), allow_nan=False)


def test_threads_read_back_check():
    good = {"intra_op_threads": 2, "threadpools": [{"user_api": "openmp", "internal_api": "openmp", "num_threads": 2},
                                                   {"user_api": "blas", "internal_api": "openblas", "num_threads": 8}]}
    assert threads_honoured(2, good) is None
    assert "intra-op" in threads_honoured(1, good)
    bad = {"intra_op_threads": 2, "threadpools": [{"user_api": "openmp", "internal_api": "openmp", "num_threads": 1}]}
    assert "openmp pool has 1 threads" in threads_honoured(2, bad)


# --------------------------------------------------------------------------- real grids

# The grid: 3 dtypes x 2 thread counts x 3 ISAs (18 runs, ~50 s at -j 2 on a quiet 2-core machine:
# slow).  The default run uses its float32 corner: 2 thread counts x 2 ISAs (4 runs).
GRIDS = {
    "float32-2x2": {"dtype": ("float32",), "threads": (1, 2), "isa": ("default", "avx2")},
    "3x2x3": {"dtype": ("float32", "float64", "bfloat16"), "threads": (1, 2), "isa": ("default", "avx2", "avx512")},
}
CAPABILITY = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}


def grid_args(name: str) -> list[str]:
    g = GRIDS[name]
    return ["--dtype", ",".join(g["dtype"]), "--threads", ",".join(map(str, g["threads"])), "--isa",
            ",".join(g["isa"]), "--epochs", "2", "--audit-every", "0"]


def _bnaudit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnaudit", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module", params=["float32-2x2", pytest.param("3x2x3", marks=pytest.mark.slow)])
def grid_run(request, tmp_path_factory):
    """A real grid at 2 epochs, -j 2, through the real command line: (folder, summary JSON, grid name)."""
    name = request.param
    missing = [i for i in GRIDS[name]["isa"] if i not in envinfo.supported_isas()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}: the {name} grid needs {', '.join(GRIDS[name]['isa'])}")
    out = tmp_path_factory.mktemp("grid") / "m"
    proc = _bnaudit("matrix", *grid_args(name), "-j", "2", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout), name


def _digest(out: Path, key: str) -> str:
    """The run's overall digest, read straight from its fingerprint file (not through the summary)."""
    return json.loads((out / "runs" / key / "fingerprint.json").read_text())["digest"]


def test_grid_completes_with_every_configuration_as_asked(grid_run):
    out, summary, name = grid_run
    g = GRIDS[name]
    assert summary["complete"] and len(summary["runs"]) == len(g["dtype"]) * len(g["threads"]) * len(g["isa"])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "summary.md").read_text().startswith("# bnaudit matrix")
    for run in summary["runs"]:
        c = run["controls"]
        assert run["status"] == "ran"
        assert run["threads_read_back"] == c["threads"]  # each child's own thread settings
        assert run["capability"] == CAPABILITY[c["isa"]]
        effective = json.loads((out / "runs" / run["key"] / "record.json").read_text())["effective"]
        assert effective["intra_op_threads"] == effective["inter_op_threads"] == c["threads"]


def test_classes_partition_the_runs_by_fingerprint(grid_run):
    out, summary, _ = grid_run
    digests = {r["key"]: _digest(out, r["key"]) for r in summary["runs"]}
    classes = summary["classes"]
    assert sorted(k for c in classes for k in c["members"]) == sorted(digests)
    assert len(classes) == len(set(digests.values()))
    for c in classes:
        assert {digests[k] for k in c["members"]} == {c["digest"]}


def test_threads_and_isa_change_the_bits_for_float32(grid_run):
    out, summary, name = grid_run
    verdicts = {v["control"]: v for v in summary["verdicts"]}
    assert set(verdicts) == ({"dtype", "threads", "isa"} if len(GRIDS[name]["dtype"]) > 1 else {"threads", "isa"})
    for control in ("threads", "isa"):
        v = verdicts[control]
        float32 = next((d for d in v["by_dtype"] if d[0] == "float32"), ["float32", v["differing"], v["pairs"]])
        assert v["changes_bits"] and float32[1] > 0, f"{control} should change float32 bits on this machine"
        # The oracle: the fingerprints themselves, pair by pair.
        pairs = [(a, b) for a, b in itertools.combinations(summary["runs"], 2)
                 if a["controls"]["dtype"] == b["controls"]["dtype"] == "float32"
                 and [f for f in a["controls"] if a["controls"][f] != b["controls"][f]] == [control]]
        differing = sum(_digest(out, a["key"]) != _digest(out, b["key"]) for a, b in pairs)
        assert float32[1:] == [differing, len(pairs)]
        assert v["first"]["layer"] and v["first"]["tensor"] and v["first"]["epoch"] == 0
        assert v["largest"]["max_abs"] > 0 and v["largest"]["max_ulps"] > 0
    if "dtype" in verdicts:
        assert verdicts["dtype"]["changes_bits"]
    isa_pairs = {(a["a"], a["b"]) for a in summary["isa_agreement"]}
    assert isa_pairs == set(itertools.combinations(GRIDS[name]["isa"], 2))
    md = (out / "summary.md").read_text()
    assert "threads changes the bits" in md and "isa changes the bits" in md


def test_rerun_resumes_without_redoing_finished_configurations(grid_run):
    out, _, name = grid_run
    records = sorted((out / "runs").glob("*/record.json"))
    before = {p: p.stat().st_mtime_ns for p in records}
    # An interrupted matrix: two configurations gone, one record half-written.
    gone = ["float32_t1_avx2_nondet", "float32_t1_default_nondet"]
    for key in gone:
        shutil.rmtree(out / "runs" / key)
    (out / "runs" / ".float32_t1_avx2_nondet.partial-xyz").mkdir()
    proc = _bnaudit("matrix", *grid_args(name), "-j", "2", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    status = {r["key"]: r["status"] for r in summary["runs"]}
    assert sorted(k for k, s in status.items() if s == "ran") == sorted(gone)
    assert sum(s == "resumed" for s in status.values()) == len(status) - 2
    for p, mtime in before.items():
        if p.parent.name not in gone:
            assert p.stat().st_mtime_ns == mtime, f"{p.parent.name} was redone"
    assert not list((out / "runs").glob(".*.partial-*"))


def test_a_folder_of_another_grid_is_refused(grid_run, tmp_path):
    out, _, _ = grid_run
    proc = _bnaudit("matrix", "--dtype", "float64", "--epochs", "2", "--out", str(out))
    assert proc.returncode == ExitCode.OUTPUT
    assert "holds a matrix of another experiment or grid" in proc.stderr and proc.stderr.count("\n") == 1
    (tmp_path / "notes.txt").write_text("mine")
    proc = _bnaudit("matrix", "--dtype", "float32", "--epochs", "1", "--out", str(tmp_path), "--force")
    assert proc.returncode == ExitCode.OUTPUT and "not a bnaudit matrix folder" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_failed_configuration_is_reported_and_retried(tmp_path, monkeypatch):
    from bnaudit import launch

    real = launch.run

    def flaky(spec, config, out, **kw):
        if config.controls.dtype == "float64":
            raise RunFailed("the run process exited with code -9: killed")
        return real(spec, config, out, **kw)

    plan = mplan.make_plan([mplan.Variant("d", default_spec())], mplan.Grid(dtype=("float32", "float64")),
                            epochs=1, audit_every=0)
    monkeypatch.setattr(launch, "run", flaky)
    first = run_matrix(plan, tmp_path / "m", render_markdown=lambda s: "x\n")
    status = {r.key: (r.status, r.error) for r in first.runs}
    assert status["float64_t1_native_nondet"] == ("failed", "the run process exited with code -9: killed")
    assert status["float32_t1_native_nondet"] == ("ran", None)
    assert not first.complete and any("failed" in n for n in first.notes)
    monkeypatch.setattr(launch, "run", real)
    second = run_matrix(plan, tmp_path / "m", render_markdown=lambda s: "x\n")
    assert {r.key: r.status for r in second.runs} == {"float32_t1_native_nondet": "resumed",
                                                      "float64_t1_native_nondet": "ran"}
    assert second.complete


def test_failed_matrix_exits_6_after_writing_its_summary(cli, tmp_path, monkeypatch):
    from bnaudit import launch

    def broken(spec, config, out, **kw):
        raise RunFailed("the run process exited with code 1: boom")

    monkeypatch.setattr(launch, "run", broken)
    code, _, stderr = cli("matrix", "--epochs", "1", "--out", str(tmp_path / "m"), "--json")
    assert code == ExitCode.RUN_FAILED
    assert "1 of 1 configurations did not complete" in stderr and stderr.count("\n") == 1
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["complete"] is False


def test_interrupt_exits_130_and_says_how_to_resume(cli, tmp_path, monkeypatch):
    from bnaudit import launch

    def interrupted(spec, config, out, **kw):
        raise KeyboardInterrupt  # what Ctrl-C delivers while a run is in flight

    monkeypatch.setattr(launch, "run", interrupted)
    code, _, stderr = cli("matrix", "--epochs", "1", "--out", str(tmp_path / "m"))
    assert code == ExitCode.INTERRUPTED == 130
    assert "interrupted with 0 of 1 configurations finished; re-run the same command to resume" in stderr
    assert stderr.count("\n") == 1
    assert not (tmp_path / "m" / ".matrix.lock").exists() and not (tmp_path / "m" / "summary.json").exists()


def test_one_matrix_per_folder_and_a_dead_owners_lock_is_taken_over(cli, tmp_path):
    where = tmp_path / "m"
    where.mkdir()
    # A lock file left by a process that died (its pid, no flock held): taken over.
    (where / ".matrix.lock").write_text("999999999")
    with folder.lock(where):
        assert (where / ".matrix.lock").read_text() == str(os.getpid())
        busy = re.escape(f"matrix folder {where} is in use by another bnaudit (pid {os.getpid()})")
        with pytest.raises(OutputError, match=busy), folder.lock(where):
            pass
        # the CLI says so in one line, and runs nothing
        code, _, stderr = cli("matrix", "--epochs", "1", "--out", str(where))
        assert code == ExitCode.OUTPUT and stderr.count("\n") == 1 and "in use by another bnaudit (pid" in stderr
        assert not (where / "runs").exists()
    assert not (where / ".matrix.lock").exists()
    with folder.lock(where):  # free again once released
        pass
