"""Numerics controls: parsing, validation, the run process's environment, and the read-back check.

The environment and validation are pure functions, checked against literal expectations.
``apply``/``readback``/``verify`` run here on the real torch of this process; the same
check inside a real run's process is in test_launch.py.
"""

from __future__ import annotations

import re

import pytest

from bnaudit import controls, envinfo
from bnaudit.controls import Controls, Perturbation, RunConfig
from bnaudit.errors import UsageError
from bnaudit.spec import default_spec

SPEC = default_spec()

# --------------------------------------------------------------------------- the run process's environment

INHERITED = {
    "PATH": "/usr/bin", "HOME": "/root", "BNAUDIT_CACHE": "/tmp/c", "LANG": "C.UTF-8",
    # every one of these would silently change a run, and must not reach it
    "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "DNNL_VERBOSE": "1",
    "MKL_CBWR": "COMPATIBLE", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_NUM_THREADS": "8", "MKLDNN_VERBOSE": "1",
    "OMP_NUM_THREADS": "8", "OMP_SCHEDULE": "dynamic", "OMP_PROC_BIND": "true", "KMP_AFFINITY": "compact",
    "GOMP_SPINCOUNT": "0", "BNAUDIT_CPU_MODEL": "Nehalem",
}
THREADS_1 = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_DYNAMIC": "FALSE",
             "MKL_DYNAMIC": "FALSE", "OMP_WAIT_POLICY": "PASSIVE"}
KEPT = {"PATH": "/usr/bin", "HOME": "/root", "BNAUDIT_CACHE": "/tmp/c", "LANG": "C.UTF-8"}


def test_child_environment_drops_every_inherited_numerics_variable():
    base = dict(INHERITED)
    env = controls.child_environment(Controls(), base)
    assert env == KEPT | THREADS_1, f"inherited controls leaked or ours missing: {env}"
    assert base == INHERITED, "the parent's environment must not be modified"


@pytest.mark.parametrize("isa, want", [
    ("default", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                 "MKL_CBWR": "SSE4_2"}),
    ("avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
              "MKL_CBWR": "AVX2"}),
    ("avx512", {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                "MKL_ENABLE_INSTRUCTIONS": "AVX512", "MKL_CBWR": "AVX512"}),
    ("native", {}),
])
def test_one_isa_level_sets_every_dispatcher(isa, want):
    env = controls.child_environment(Controls(isa=isa, threads=3), INHERITED)
    threads = {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3", "OMP_DYNAMIC": "FALSE",
               "MKL_DYNAMIC": "FALSE", "OMP_WAIT_POLICY": "PASSIVE"}
    assert env == KEPT | threads | want, f"--isa {isa}: {env}"


def test_single_library_overrides_and_emulated_model():
    env = controls.child_environment(Controls(isa="avx2", onednn_isa="avx512_core", mkl_cbwr="compatible"), {})
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE" and env["MKL_CBWR"] == "COMPATIBLE"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    env = controls.child_environment(Controls(isa="avx2", mkl_cbwr="avx2,strict"), {})
    assert env["MKL_CBWR"] == "AVX2,STRICT"
    for none in ("none", "NONE", "None"):
        env = controls.child_environment(Controls(isa="avx2", mkl_cbwr=none), {"MKL_CBWR": "AVX"})
        assert "MKL_CBWR" not in env, f"--mkl-cbwr {none} must remove MKL_CBWR"
    env = controls.child_environment(Controls(cpu_model="seed-i7"), INHERITED)
    assert env == KEPT | THREADS_1 | {"BNAUDIT_CPU_MODEL": "seed-i7"}


# --------------------------------------------------------------------------- perturbations

@pytest.mark.parametrize("text, want, shown", [
    ("linear1.weight[3,2]:1", Perturbation("linear1.weight", (3, 2), 1), "linear1.weight[3,2]:+1"),
    ("linear1.weight[7]:-2", Perturbation("linear1.weight", (1, 2), -2), "linear1.weight[1,2]:-2"),  # flat, 5 a row
    ("linear1.weight[79]:+3", Perturbation("linear1.weight", (15, 4), 3), "linear1.weight[15,4]:+3"),
    (" bn2.weight [ 5 ] : 1 ", Perturbation("bn2.weight", (5,), 1), "bn2.weight[5]:+1"),
    ("bn1.weight[15]:1048576", Perturbation("bn1.weight", (15,), 2**20), "bn1.weight[15]:+1048576"),
    ("bn5.running_var[0]:-1048576", Perturbation("bn5.running_var", (0,), -(2**20)), "bn5.running_var[0]:-1048576"),
    ("linear6.bias[0]:1", Perturbation("linear6.bias", (0,), 1), "linear6.bias[0]:+1"),
])
def test_perturbation_parsing(text, want, shown):
    got = controls.parse_perturbation(text, SPEC)
    assert got == want and str(got) == shown


@pytest.mark.parametrize("text, message", [
    ("linear1.weight[3]", re.escape("--perturb 'linear1.weight[3]': expected LAYER.PARAM[INDEX]:ULPS, "
                                    "e.g. linear1.weight[3,2]:1")),
    ("linear1.weight(3):1", re.escape("expected LAYER.PARAM[INDEX]:ULPS")),
    ("linear1.weight[3]:x", re.escape("expected LAYER.PARAM[INDEX]:ULPS")),
    ("linear9.weight[0]:1", "no tensor 'linear9.weight'; tensors are linear1.weight, linear1.bias, bn1.weight"),
    ("linear1.weight[80]:1", r"flat index 80 out of range for linear1.weight \(16, 5\)"),
    ("bn1.weight[16]:1", r"index \[16\] out of range for bn1.weight of shape \[16\]"),
    ("bn1.weight[1,2]:1", r"index \[1, 2\] out of range for bn1.weight of shape \[16\]"),
    ("linear1.weight[16,0]:1", r"index \[16, 0\] out of range for linear1.weight of shape \[16, 5\]"),
    ("linear1.weight[0,5]:1", r"index \[0, 5\] out of range"),
    ("linear1.weight[0,0,0]:1", r"index \[0, 0, 0\] out of range"),
    ("bn1.weight[0]:0", r"^--perturb: ULPS must be a non-zero integer of at most 2\^20$"),
    ("bn1.weight[0]:1048577", r"ULPS must be a non-zero integer of at most 2\^20"),
    ("bn1.weight[0]:-1048577", "ULPS must be a non-zero integer"),
])
def test_bad_perturbation_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message):
        controls.parse_perturbation(text, SPEC)


# --------------------------------------------------------------------------- labels and serialisation

def test_labels_and_storage():
    assert Controls().label() == "float32_t1_native_nondet"
    full = Controls("bfloat16", 2, "avx2", True, onednn_isa="AVX2", mkl_cbwr="AVX2,STRICT", cpu_model="seed-i7")
    assert full.label() == "bfloat16_t2_avx2_det_onednn-avx2_cbwr-avx2-strict_cpu-seed-i7"
    assert [Controls(dtype=d).storage for d in controls.DTYPES] == ["float32", "float64", "bfloat16", "float32"]


def test_run_config_round_trips_through_its_dict():
    config = RunConfig(Controls("float64", 2, "avx2", True, "AVX2", "COMPATIBLE", "Haswell"), epochs=5,
                       perturb=Perturbation("bn1.weight", (3,), -2), trace_epochs=(0, 4), audit_every=2)
    raw = config.to_dict()
    assert raw == {
        "controls": {"dtype": "float64", "threads": 2, "isa": "avx2", "deterministic": True, "onednn_isa": "AVX2",
                     "mkl_cbwr": "COMPATIBLE", "cpu_model": "Haswell"},
        "epochs": 5,
        "perturb": {"tensor": "bn1.weight", "index": [3], "ulps": -2},
        "trace_epochs": [0, 4],
        "audit_every": 2,
    }
    assert RunConfig.from_dict(raw) == config
    plain = RunConfig.from_dict({"controls": {"dtype": "bfloat16"}, "epochs": "3"})
    assert plain == RunConfig(Controls(dtype="bfloat16"), epochs=3, perturb=None, trace_epochs=(0,), audit_every=10)
    assert plain.to_dict()["perturb"] is None


# --------------------------------------------------------------------------- validation

def _config(epochs=3, trace_epochs=(0,), audit_every=10, **c):
    return RunConfig(Controls(**c), epochs=epochs, trace_epochs=trace_epochs, audit_every=audit_every)


@pytest.mark.parametrize("config", [
    _config(threads=1), _config(threads=1024), _config(epochs=1), _config(epochs=1000), _config(audit_every=0),
    _config(epochs=5, trace_epochs=(0, 4)), _config(onednn_isa="avx2"), _config(onednn_isa="ALL"),
    _config(mkl_cbwr="none"), _config(mkl_cbwr="None"), _config(mkl_cbwr="avx2,strict"),
    _config(mkl_cbwr="COMPATIBLE"), _config(dtype="bf16-mixed"), _config(isa="default", cpu_model="Nehalem"),
])
def test_valid_requests_pass(config):
    controls.validate(config, SPEC, check_cpu=False)


@pytest.mark.parametrize("config, message", [
    (_config(dtype="float16"), "unknown dtype 'float16'; choose from float32, float64, bfloat16, bf16-mixed"),
    (_config(isa="sse9"), "unknown ISA 'sse9'; choose from native, default, avx2, avx512"),
    (_config(threads=0), "--threads must be between 1 and 1024, got 0"),
    (_config(threads=1025), "--threads must be between 1 and 1024, got 1025"),
    (_config(onednn_isa="AVX9"), "unknown oneDNN ISA 'AVX9'; choose from SSE41, AVX, AVX2"),
    (_config(mkl_cbwr="FOO"), "unknown MKL_CBWR value 'FOO'; e.g. COMPATIBLE, AVX2, AVX2,STRICT"),
    (_config(mkl_cbwr="AVX2,LOOSE"), "unknown MKL_CBWR value 'AVX2,LOOSE'"),
    (_config(epochs=0), "--epochs must be between 1 and the spec's 1000, got 0"),
    (_config(epochs=1001), "--epochs must be between 1 and the spec's 1000, got 1001"),
    (_config(audit_every=-1), r"^--audit-every must be >= 0 \(0 turns the operator audit off\)$"),
    (_config(epochs=3, trace_epochs=(0, 3)), r"--trace-epochs \[3\] outside the run's epochs 0..2"),
    (_config(epochs=3, trace_epochs=(-1, 1)), r"--trace-epochs \[-1\] outside the run's epochs 0..2"),
])
def test_malformed_requests_are_usage_errors(config, message):
    with pytest.raises(UsageError, match=message):
        controls.validate(config, SPEC, check_cpu=False)


def test_isa_the_cpu_lacks_is_refused_before_the_run(monkeypatch):
    """The parent-side check: CPUID, of this CPU or of qemu's model (the one thing faked), lacks AVX-512."""
    from bnaudit import emulate

    def supported(features=None):
        if features is None:                                     # this CPU
            return ["default", "avx2"]
        return ["default", "avx2", "avx512"][: 1 + bool(features.get("AVX2")) + bool(features.get("AVX512F"))]

    monkeypatch.setattr(envinfo, "supported_isas", supported)
    monkeypatch.setattr(emulate, "model_features", lambda name: {"AVX512F": name == "Skylake-Server",
                                                                 "AVX2": name in ("Skylake-Server", "Haswell")})
    with pytest.raises(UsageError, match=r"this CPU cannot run --isa avx512 \(it supports default, avx2\); "
                                         "use --cpu-model to emulate another CPU"):
        controls.validate(_config(isa="avx512"), SPEC)
    controls.validate(_config(isa="avx2"), SPEC)
    controls.validate(_config(isa="avx512"), SPEC, check_cpu=False)       # the child re-checks what took effect
    controls.validate(_config(isa="avx512", cpu_model="Skylake-Server"), SPEC)  # the emulated CPU's own features
    with pytest.raises(UsageError, match=re.escape("the emulated CPU Nehalem cannot run --isa avx2 (under qemu it "
                                                   "supports default)")):
        controls.validate(_config(isa="avx2", cpu_model="Nehalem"), SPEC)
    with pytest.raises(UsageError, match=re.escape("cannot run --isa avx512 (under qemu it supports default; "
                                                   "qemu emulates no AVX-512)")):
        controls.validate(_config(isa="avx512", cpu_model="Nehalem"), SPEC)
    with pytest.raises(UsageError, match=re.escape("the emulated CPU Haswell cannot run --isa avx512 (under qemu it "
                                                   "supports default, avx2; qemu emulates no AVX-512)")):
        controls.validate(_config(isa="avx512", cpu_model="Haswell"), SPEC)
    controls.validate(_config(isa="avx2", cpu_model="Nehalem"), SPEC, check_cpu=False)

    def no_cpuid(*args):
        raise AssertionError("--isa native needs no CPU check")

    monkeypatch.setattr(envinfo, "supported_isas", no_cpuid)
    controls.validate(_config(isa="native"), SPEC)
    controls.validate(_config(isa="native", cpu_model="Nehalem"), SPEC)


# --------------------------------------------------------------------------- apply, read back, verify (real torch)

def test_apply_and_readback_in_this_process():
    import torch

    try:
        controls.apply(Controls(threads=2, deterministic=True), torch)
        got = controls.readback(torch)
        assert set(got) == {"cpu_capability", "intra_op_threads", "inter_op_threads", "threadpools",
                            "deterministic_algorithms", "mkldnn_enabled", "mkldnn_deterministic",
                            "numpy_dispatch", "omp_dynamic", "flush_denormal"}
        # apply set every BLAS pool: numpy's, and scipy's own OpenBLAS where a test of this process loaded scipy
        blas_threads = [p["num_threads"] for p in got["threadpools"] if p["user_api"] == "blas"]
        assert blas_threads and set(blas_threads) == {2}
        assert got["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert got["intra_op_threads"] == 2 == torch.get_num_threads()
        assert got["inter_op_threads"] == torch.get_num_interop_threads()
        assert got["deterministic_algorithms"] is True and got["mkldnn_deterministic"] is True
        assert got["mkldnn_enabled"] == (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
        pools = got["threadpools"]
        assert pools == sorted(pools, key=lambda p: (p.get("user_api", ""), p.get("prefix", "")))
        assert all(set(p) <= {"user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer",
                              "architecture"} and {"user_api", "internal_api", "prefix", "num_threads"} <= set(p)
                   for p in pools), pools
        blas = [p for p in pools if p["user_api"] == "blas"]  # numpy's BLAS reports all of its fields
        assert all({"version", "threading_layer", "architecture"} <= set(p) for p in blas), blas
        controls.verify(Controls(threads=2, deterministic=True), got)
        controls.apply(Controls(threads=1, deterministic=False), torch)
        again = controls.readback(torch)
        assert again["intra_op_threads"] == 1 and again["deterministic_algorithms"] is False
        assert again["mkldnn_deterministic"] is False
    finally:
        torch.backends.mkldnn.set_flags(_deterministic=False)


EFFECTIVE = {"cpu_capability": "AVX2", "intra_op_threads": 1, "deterministic_algorithms": False}


@pytest.mark.parametrize("asked, effective, message", [
    (Controls(isa="avx512"), EFFECTIVE,
     r"--isa avx512 asked for capability AVX512 but torch runs AVX2 \(this CPU cannot honour it\)"),
    (Controls(isa="default"), EFFECTIVE, "--isa default asked for capability DEFAULT but torch runs AVX2"),
    (Controls(isa="avx2"), EFFECTIVE | {"cpu_capability": "DEFAULT"}, "capability AVX2 but torch runs DEFAULT"),
    (Controls(threads=2), EFFECTIVE, "asked for 2 threads, torch uses 1"),
    (Controls(deterministic=True), EFFECTIVE, "^the deterministic-algorithms flag did not take effect$"),
    (Controls(), EFFECTIVE | {"deterministic_algorithms": True}, "the deterministic-algorithms flag did not take"),
])
def test_a_request_that_did_not_take_effect_is_refused_not_downgraded(asked, effective, message):
    with pytest.raises(UsageError, match=message):
        controls.verify(asked, effective)


def test_what_took_effect_passes():
    controls.verify(Controls(isa="avx2"), EFFECTIVE)
    controls.verify(Controls(isa="native"), EFFECTIVE | {"cpu_capability": "DEFAULT"})  # native: whatever it is
    controls.verify(Controls(threads=4, deterministic=True), EFFECTIVE | {"intra_op_threads": 4,
                                                                          "deterministic_algorithms": True})


# --------------------------------------------------------------------------- controls read back from a record

def test_controls_from_a_record():
    full = {"dtype": "bf16-mixed", "threads": 4096, "isa": "avx512", "deterministic": True, "onednn_isa": "A" * 64,
            "mkl_cbwr": "AVX2,STRICT", "cpu_model": "Haswell"}
    assert Controls.from_json(full, "rec") == Controls("bf16-mixed", 4096, "avx512", True, "A" * 64, "AVX2,STRICT",
                                                       "Haswell")
    assert Controls.from_json({"threads": 2}, "rec") == Controls(threads=2)
    assert Controls.from_json({}, "rec") == Controls()
    assert Controls.from_json({"cpu_model": "X", "mkl_cbwr": None}, "rec") == Controls(cpu_model="X")


@pytest.mark.parametrize("raw, message", [
    ([], "rec: config.controls is malformed"),
    ({"dtype": "float32", "colour": "red"}, "rec: config.controls is malformed"),
    ({"dtype": "float16"}, "rec: config.controls holds a value out of range"),
    ({"isa": "sse9"}, "out of range"),
    ({"threads": "2"}, "out of range"),
    ({"threads": True}, "out of range"),
    ({"threads": 0}, "out of range"),
    ({"threads": 4097}, "out of range"),
    ({"threads": 2.0}, "out of range"),
    ({"deterministic": 1}, "out of range"),
    ({"onednn_isa": ""}, "out of range"),
    ({"mkl_cbwr": "A" * 65}, "out of range"),
    ({"cpu_model": 5}, "out of range"),
])
def test_malformed_controls_in_a_record_are_refused(raw, message):
    from bnaudit.errors import InputError

    with pytest.raises(InputError, match=re.escape(message)):
        Controls.from_json(raw, "rec")


def test_a_run_whose_record_could_not_be_loaded_is_refused_before_it_starts():
    from bnaudit.spec import from_dict

    wide = from_dict({"model": {"hidden_units": 256}}, base=SPEC)
    controls.validate(RunConfig(Controls(), epochs=10), wide, check_cpu=False)
    with pytest.raises(UsageError, match=re.escape("a 1000-epoch run of this spec would write a fingerprint.json of "
                                                   "19 MiB, more than the 16 MiB bnaudit loads; use fewer epochs")):
        controls.validate(RunConfig(Controls(), epochs=1000), wide, check_cpu=False)
    with pytest.raises(UsageError, match=re.escape("would write a params.npy of 2043 MiB, more than the 1024 MiB")):
        controls.validate(RunConfig(Controls(dtype="float64"), epochs=1000), wide, check_cpu=False)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_readback_sees_mkldnn_switched_off():
    import torch

    with torch.backends.mkldnn.flags(enabled=False):
        assert controls.readback(torch)["mkldnn_enabled"] is False
    assert controls.readback(torch)["mkldnn_enabled"] == torch.backends.mkldnn.is_available()


def test_apply_in_a_fresh_process_sets_every_pool():
    """In a new process, as in a run's, apply() sets intra- and inter-op threads and both flags, and
    the environment's thread counts reach the OpenMP pool."""
    import json
    import os
    import subprocess
    import sys

    import torch

    wanted = Controls(threads=3, deterministic=True)  # 3: not this 2-core machine's default pool size
    # applying this process's own state again changes nothing (and maps this test to apply/readback)
    now = Controls(threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled())
    from threadpoolctl import threadpool_limits

    threadpool_limits(now.threads, user_api="blas")  # apply sizes numpy's BLAS pool like torch's: start from there
    before = controls.readback(torch)
    controls.apply(now, torch)
    assert controls.readback(torch) == before
    script = ("import json, torch\nfrom bnaudit import controls\n"
              "c = controls.Controls(threads=3, deterministic=True)\n"
              "controls.apply(c, torch)\nr = controls.readback(torch)\ncontrols.verify(c, r)\nprint(json.dumps(r))\n")
    done = subprocess.run([sys.executable, "-c", script], env=controls.child_environment(wanted, dict(os.environ)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert (got["intra_op_threads"], got["inter_op_threads"]) == (3, 3), got
    assert got["deterministic_algorithms"] is True and got["mkldnn_deterministic"] is True
    openmp = [p for p in got["threadpools"] if p["user_api"] == "openmp"]
    assert openmp and all(p["num_threads"] == 3 for p in openmp), got["threadpools"]


def test_perturbation_from_a_record():
    assert Perturbation.from_json(None, "rec") is None
    raw = {"tensor": "bn1.weight", "index": [3], "ulps": -2}
    assert Perturbation.from_json(raw, "rec") == Perturbation("bn1.weight", (3,), -2)
    edge = {"tensor": "t" * 64, "index": [0, 1, 2, 3, 4, 5, 6, (1 << 20) - 1], "ulps": (1 << 62) - 1}
    assert Perturbation.from_json(edge, "rec") == Perturbation("t" * 64, (0, 1, 2, 3, 4, 5, 6, (1 << 20) - 1),
                                                              (1 << 62) - 1)
    assert Perturbation.from_json(edge | {"ulps": 1 - (1 << 62)}, "rec").ulps == 1 - (1 << 62)


@pytest.mark.parametrize("change", [
    {"tensor": ""}, {"tensor": "t" * 65}, {"tensor": 5},
    {"index": []}, {"index": list(range(9))}, {"index": (3,)}, {"index": [True]}, {"index": [-1]},
    {"index": [1 << 20]}, {"index": [2.0]},
    {"ulps": True}, {"ulps": 1.0}, {"ulps": 1 << 62}, {"ulps": -(1 << 62)},
    {"extra": 1},
])
def test_malformed_perturbation_in_a_record_is_refused(change):
    from bnaudit.errors import InputError

    raw = {"tensor": "bn1.weight", "index": [3], "ulps": -2} | change
    with pytest.raises(InputError, match=re.escape("rec: config.perturb is malformed")):
        Perturbation.from_json(raw, "rec")
    with pytest.raises(InputError, match=re.escape("config.perturb is malformed")):
        Perturbation.from_json({"tensor": "bn1.weight", "index": [3]}, "rec")
    with pytest.raises(InputError, match=re.escape("config.perturb is malformed")):
        Perturbation.from_json([1], "rec")


# --------------------------------------------------------------------------- decoding a record's config

def test_a_records_perturbation_decodes_field_by_field():
    raw = {"tensor": "linear1.weight", "index": [0, 3], "ulps": -2}
    assert Perturbation.from_json(raw, "r") == Perturbation("linear1.weight", (0, 3), -2)
    assert Perturbation.from_json(None, "r") is None


@pytest.mark.parametrize("raw", [
    [], "linear1.weight[0,0]:1", {"tensor": "linear1.weight", "index": [0]},
    {"tensor": "linear1.weight", "index": [0], "ulps": 1, "extra": 0},
    {"tensor": 7, "index": [0], "ulps": 1}, {"tensor": "", "index": [0], "ulps": 1},
    {"tensor": "x" * 65, "index": [0], "ulps": 1}, {"tensor": "linear1.weight", "index": [], "ulps": 1},
    {"tensor": "linear1.weight", "index": [0] * 9, "ulps": 1}, {"tensor": "linear1.weight", "index": [True], "ulps": 1},
    {"tensor": "linear1.weight", "index": [-1], "ulps": 1}, {"tensor": "linear1.weight", "index": [1 << 20], "ulps": 1},
    {"tensor": "linear1.weight", "index": [0], "ulps": True}, {"tensor": "linear1.weight", "index": [0], "ulps": 1.0},
    {"tensor": "linear1.weight", "index": [0], "ulps": 1 << 62}, {"tensor": "linear1.weight", "index": "0", "ulps": 1},
])
def test_a_malformed_perturbation_is_refused(raw):
    from bnaudit.errors import InputError

    with pytest.raises(InputError, match=r"^r: config\.perturb is malformed$"):
        Perturbation.from_json(raw, "r")


def test_boundary_perturbations_are_accepted():
    edge = {"tensor": "t" * 64, "index": [(1 << 20) - 1] * 8, "ulps": (1 << 62) - 1}
    assert Perturbation.from_json(edge, "r") == Perturbation("t" * 64, ((1 << 20) - 1,) * 8, (1 << 62) - 1)
    assert Perturbation.from_json({**edge, "ulps": -((1 << 62) - 1)}, "r").ulps == -((1 << 62) - 1)


def test_a_records_controls_decode_with_the_defaults_for_what_they_leave_out():
    assert Controls.from_json({"dtype": "bfloat16", "threads": 4}, "r") == Controls(dtype="bfloat16", threads=4)
    full = {"dtype": "float64", "threads": 4096, "isa": "avx2", "deterministic": True, "onednn_isa": "x" * 64,
            "mkl_cbwr": "COMPATIBLE", "cpu_model": "Haswell"}
    assert Controls.from_json(full, "r") == Controls(**full)


@pytest.mark.parametrize("raw", [
    None, [], {"dtype": "float16"}, {"isa": "avx9"}, {"threads": 0}, {"threads": 4097}, {"threads": True},
    {"threads": 2.0}, {"deterministic": 1}, {"cpu_model": ""}, {"onednn_isa": "x" * 65}, {"mkl_cbwr": 5},
    {"colour": "blue"},
])
def test_malformed_controls_are_refused(raw):
    from bnaudit.errors import InputError

    with pytest.raises(InputError, match=r"^r: config\.controls "):
        Controls.from_json(raw, "r")


def test_readback_keeps_known_fields_and_sorts_pools_by_api_then_library(monkeypatch):
    """Several BLAS libraries in one process (the one thing faked: threadpoolctl's report)."""
    import threadpoolctl
    import torch

    fake = [{"user_api": "openmp", "internal_api": "openmp", "prefix": "libgomp", "filepath": "/x/libgomp.so",
             "version": None, "num_threads": 1},
            {"user_api": "blas", "internal_api": "openblas", "prefix": "libopenblas", "filepath": "/x/o.so",
             "version": "0.3", "num_threads": 1, "threading_layer": "pthreads", "architecture": "Haswell"},
            {"user_api": "blas", "internal_api": "mkl", "prefix": "libmkl_rt", "filepath": "/x/m.so",
             "version": None, "num_threads": 2}]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: fake)
    pools = controls.readback(torch)["threadpools"]
    assert [p["prefix"] for p in pools] == ["libmkl_rt", "libopenblas", "libgomp"]
    assert pools[0] == {"user_api": "blas", "internal_api": "mkl", "prefix": "libmkl_rt", "num_threads": 2}
    assert pools[1] == {k: v for k, v in fake[1].items() if k != "filepath"}


def test_no_mkl_cbwr_without_an_isa_cap():
    env = controls.child_environment(Controls(mkl_cbwr="none"), {})
    assert "MKL_CBWR" not in env and env == THREADS_1
    assert Perturbation.from_json({"tensor": "t", "index": [0], "ulps": 1}, "rec") == Perturbation("t", (0,), 1)
