"""The dispatch controls beyond --isa: numpy's CPU dispatch, OpenBLAS's core type and threads, OpenMP's and
MKL's dynamic threads, Intel OpenMP's deterministic reductions, flush-to-zero.

Each is a ``bnaudit run`` option and a matrix axis, is set before the run's process starts, and is read
back in that process: a real run shows every one took effect; what cannot take effect is refused; what
no library reports is listed as unverified.
"""

from __future__ import annotations

import json

import pytest

from bnaudit import controls, launch
from bnaudit.cli import lists
from bnaudit.controls import Controls, RunConfig
from bnaudit.errors import InputError, UsageError
from bnaudit.matrix import plan as mplan
from bnaudit.spec import default_spec, from_dict

# A small network: what is checked is the run's process, not the experiment.
SMALL = from_dict({"data": {"samples": 20, "train": 10}, "model": {"hidden_layers": 1, "hidden_units": 4},
                   "train": {"epochs": 1, "batch_size": 5, "lr_milestones": []}}, base=default_spec())
ALL_ON = Controls(numpy_disable="X86_V4", openblas_coretype="Nehalem", dynamic_threads=True, flush_denormal=True)


# --------------------------------------------------------------------------- parsing and files

def test_numpy_targets_are_this_numpys_and_canonical():
    targets = controls.numpy_targets()
    assert "X86_V4" in targets, targets  # numpy 2.x on x86-64 dispatches to the x86-64-v4 level
    assert controls.parse_numpy_disable(" x86_v4, X86_V3 ") == "X86_V3 X86_V4"
    assert controls.parse_numpy_disable("X86_V4+X86_V3") == "X86_V3 X86_V4"
    for bad in ("", "AVX9000", "X86_V4,AVX9000"):
        with pytest.raises(UsageError, match=r"this numpy dispatches to .*X86_V4"):
            controls.parse_numpy_disable(bad)


def test_openblas_core_names_are_openblas_spelling():
    assert controls.parse_openblas_coretype("skylakex") == "SkylakeX"
    assert controls.parse_openblas_coretype(" haswell ") == "Haswell"
    with pytest.raises(UsageError, match=r"expected one of Katmai, .*SapphireRapids"):
        controls.parse_openblas_coretype("Zen5")


def test_files_leave_out_dispatch_controls_at_their_default():
    assert set(Controls().to_json()) == {"dtype", "threads", "isa", "deterministic", "onednn_isa", "mkl_cbwr",
                                         "cpu_model"}
    d = ALL_ON.to_json()
    assert {k: d[k] for k in controls.DISPATCH_FIELDS if k in d} == {
        "numpy_disable": "X86_V4", "openblas_coretype": "Nehalem", "dynamic_threads": True, "flush_denormal": True}
    assert Controls.from_json(d, "r") == ALL_ON
    assert Controls.from_json(Controls().to_json(), "r") == Controls()
    assert ALL_ON.label() == "float32_t1_native_nondet_npy-off-x86_v4_openblas-nehalem_dynamic_ftz"
    assert Controls(kmp_deterministic_reduction=True, numpy_disable="X86_V3 X86_V4").label() == \
        "float32_t1_native_nondet_npy-off-x86_v3-x86_v4_kmp-detred"


@pytest.mark.parametrize("change", [{"openblas_coretype": "Zen5"}, {"openblas_coretype": "haswell"},
                                    {"flush_denormal": 1}, {"dynamic_threads": "yes"},
                                    {"kmp_deterministic_reduction": None}, {"numpy_disable": ""},
                                    {"numpy_disable": "x" * 65}])
def test_a_record_with_a_malformed_dispatch_control_is_refused(change):
    with pytest.raises(InputError, match=r"config.controls holds a value out of range"):
        Controls.from_json(Controls().to_json() | change, "r")


def test_a_request_with_a_non_canonical_numpy_value_is_refused():
    config = RunConfig(Controls(numpy_disable="x86_v4"), epochs=1, audit_every=0)
    with pytest.raises(UsageError, match=r"expected 'X86_V4'"):
        controls.validate(config, SMALL)


def test_the_run_environment_sets_each_control_and_drops_the_inherited_ones():
    inherited = {"PATH": "/usr/bin", "OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "8",
                 "NPY_DISABLE_CPU_FEATURES": "X86_V3", "NPY_ENABLE_CPU_FEATURES": "X86_V2",
                 "KMP_DETERMINISTIC_REDUCTION": "TRUE", "OPENBLAS_VERBOSE": "2"}
    plain = controls.child_environment(Controls(threads=2), inherited)
    assert {k: plain.get(k) for k in inherited} == {
        "PATH": "/usr/bin", "OPENBLAS_CORETYPE": None, "OPENBLAS_NUM_THREADS": "2", "NPY_DISABLE_CPU_FEATURES": None,
        "NPY_ENABLE_CPU_FEATURES": None, "KMP_DETERMINISTIC_REDUCTION": None, "OPENBLAS_VERBOSE": "2"}
    assert (plain["OMP_DYNAMIC"], plain["MKL_DYNAMIC"]) == ("FALSE", "FALSE")
    asked = controls.child_environment(Controls(numpy_disable="X86_V4", openblas_coretype="Nehalem",
                                                dynamic_threads=True, kmp_deterministic_reduction=True), inherited)
    assert {k: asked.get(k) for k in ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE", "OMP_DYNAMIC", "MKL_DYNAMIC",
                                      "KMP_DETERMINISTIC_REDUCTION")} == {
        "NPY_DISABLE_CPU_FEATURES": "X86_V4", "OPENBLAS_CORETYPE": "Nehalem", "OMP_DYNAMIC": "TRUE",
        "MKL_DYNAMIC": "TRUE", "KMP_DETERMINISTIC_REDUCTION": "TRUE"}


# --------------------------------------------------------------------------- verify (what took effect)

EFFECTIVE = {"cpu_capability": "AVX2", "intra_op_threads": 1, "deterministic_algorithms": False,
             "numpy_dispatch": ["X86_V3", "baseline(X86_V2)"], "omp_dynamic": False, "flush_denormal": False,
             "threadpools": [{"user_api": "blas", "internal_api": "openblas", "num_threads": 1,
                              "architecture": "Haswell"},
                             {"user_api": "openmp", "internal_api": "openmp", "prefix": "libgomp", "num_threads": 1}]}


def test_what_took_effect_passes_verification():
    controls.verify(Controls(numpy_disable="X86_V4", openblas_coretype="Haswell"), EFFECTIVE)
    controls.verify(Controls(), EFFECTIVE)
    iomp = EFFECTIVE | {"threadpools": [{"user_api": "openmp", "prefix": "libiomp", "num_threads": 1}]}
    controls.verify(Controls(kmp_deterministic_reduction=True), iomp)
    assert controls.unverified(Controls(kmp_deterministic_reduction=True, dynamic_threads=True)) == [
        "MKL_DYNAMIC=TRUE: MKL is linked into torch without mkl_get_dynamic; OMP_DYNAMIC is read back",
        "KMP_DETERMINISTIC_REDUCTION=TRUE: Intel OpenMP has no call that reports it"]
    assert controls.unverified(Controls()) == []


@pytest.mark.parametrize("asked, effective, message", [
    (Controls(numpy_disable="X86_V3 X86_V4"), EFFECTIVE,
     r"NPY_DISABLE_CPU_FEATURES=X86_V3 X86_V4 asked, but numpy still dispatches to X86_V3"),
    (Controls(numpy_disable="X86_V4"), EFFECTIVE | {"numpy_dispatch": ["X86_V4"]}, "still dispatches to X86_V4"),
    (Controls(openblas_coretype="Zen"), EFFECTIVE,
     r"OPENBLAS_CORETYPE=Zen asked, but OpenBLAS runs core Haswell \(an alias, or a core this CPU cannot run\)"),
    (Controls(openblas_coretype="Zen"), EFFECTIVE | {"threadpools": []}, "this process loads no OpenBLAS"),
    (Controls(threads=1), EFFECTIVE | {"threadpools": [{"internal_api": "openblas", "num_threads": 2}]},
     "asked for 1 threads, OpenBLAS uses 2"),
    (Controls(dynamic_threads=True), EFFECTIVE, "^OMP_DYNAMIC=TRUE did not take effect$"),
    (Controls(), EFFECTIVE | {"omp_dynamic": True}, "^OMP_DYNAMIC=FALSE did not take effect$"),
    (Controls(kmp_deterministic_reduction=True), EFFECTIVE,
     r"this torch's OpenMP runtime is libgomp, which does not read KMP_DETERMINISTIC_REDUCTION"),
    (Controls(flush_denormal=True), EFFECTIVE, "flush-to-zero on asked, but this process keeps subnormals"),
    (Controls(), EFFECTIVE | {"flush_denormal": True}, "flush-to-zero off asked, but this process flushes"),
])
def test_a_dispatch_control_that_did_not_take_effect_is_refused(asked, effective, message):
    with pytest.raises(UsageError, match=message):
        controls.verify(asked, effective)


# --------------------------------------------------------------------------- real runs

def test_every_dispatch_control_takes_effect_in_a_real_run(tmp_path):
    summary = launch.run(SMALL, RunConfig(ALL_ON, epochs=1, audit_every=0), tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "record.json").read_text())
    e = meta["effective"]
    assert e == summary["effective"]
    assert "X86_V4" not in e["numpy_dispatch"] and e["numpy_dispatch"], e["numpy_dispatch"]
    assert [p["architecture"] for p in e["threadpools"] if p.get("internal_api") == "openblas"] == ["Nehalem"]
    assert e["omp_dynamic"] is True and e["flush_denormal"] is True
    assert e["unverified"] == controls.unverified(ALL_ON)
    assert Controls.from_json(meta["config"]["controls"], "record") == ALL_ON
    env = meta["environment"]["environment"]
    assert {k: env.get(k) for k in ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE", "OMP_DYNAMIC")} == {
        "NPY_DISABLE_CPU_FEATURES": "X86_V4", "OPENBLAS_CORETYPE": "Nehalem", "OMP_DYNAMIC": "TRUE"}


def test_deterministic_reductions_under_gnu_openmp_are_refused_by_the_run(tmp_path):
    """The pip CPU build of torch ships GNU libgomp, which ignores KMP_ variables: the run says so and
    writes nothing (under Intel or LLVM OpenMP it runs, with the request listed as unverified)."""
    import torch  # noqa: F401  (loads torch's OpenMP runtime into this process)
    from threadpoolctl import threadpool_info

    runtime = next(p["prefix"] for p in threadpool_info() if p["user_api"] == "openmp")
    config = RunConfig(Controls(kmp_deterministic_reduction=True), epochs=1, audit_every=0)
    if runtime == "libgomp":
        with pytest.raises(UsageError, match=r"OpenMP runtime is libgomp, which does not read"):
            launch.run(SMALL, config, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    else:
        summary = launch.run(SMALL, config, tmp_path / "run")
        assert summary["effective"]["unverified"] == controls.unverified(config.controls)


def test_matrix_axes_of_the_dispatch_controls():
    given = lists.grid_values(numpy_disable="inherit,X86_V4,x86_v3+X86_V4", openblas_coretype="inherit,haswell",
                              dynamic_threads="both", kmp_deterministic_reduction="off",
                              flush_denormal="on,off")
    assert given == {"numpy_disable": (None, "X86_V4", "X86_V3 X86_V4"), "openblas_coretype": (None, "Haswell"),
                     "dynamic_threads": (False, True), "kmp_deterministic_reduction": (False,),
                     "flush_denormal": (True, False)}
    with pytest.raises(UsageError, match=r"--flush-denormal 'sometimes': use off, on, both"):
        lists.grid_values(flush_denormal="sometimes")
    grid = mplan.Grid(**given)
    assert grid.varying() == ("numpy_disable", "openblas_coretype", "dynamic_threads", "flush_denormal")
    assert len(grid.controls()) == 3 * 2 * 2 * 2
    assert mplan.Grid().to_dict().keys() == {"dtype", "threads", "isa", "deterministic", "onednn_isa",
                                              "mkl_cbwr", "cpu_model"}  # plan ids as before these existed
    assert grid.to_dict()["flush_denormal"] == [True, False]
    assert "kmp_deterministic_reduction" not in grid.to_dict()
