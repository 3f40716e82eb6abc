"""bnaudit on a real dask.distributed cluster: two worker processes on the loopback, one of them a Nehalem host.

host-a runs natively; host-b's environment holds ``BNAUDIT_HOST_CPU_MODEL=Nehalem``, so it
stands for a machine of that CPU and makes its runs under ``qemu-x86_64 -cpu Nehalem``.  The
matrix over the two hosts is the real one (``make_plan`` + ``execute``), one epoch per run;
what comes back is read with ``record.load_record`` and compared with ``compare.compare_pair``.
"""

from __future__ import annotations

import gc
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bnaudit import compare, emulate, envinfo, launch, record
from bnaudit.controls import Controls, RunConfig
from bnaudit.errors import ExitCode, MissingTool, RunFailed, UsageError
from bnaudit.matrix.execute import execute
from bnaudit.matrix.plan import Grid, Variant, make_plan
from bnaudit.spec import default_spec

distributed = pytest.importorskip("distributed")
cluster_mod = pytest.importorskip("bnaudit.cluster")

pytestmark = pytest.mark.emulation
needs_qemu = pytest.mark.skipif(shutil.which(emulate.QEMU) is None, reason="qemu-x86_64 (qemu-user) is not installed")

LABEL = "float32_t1_native_nondet"


def _no_partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def _scheduler() -> dict:
    """A scheduler on the loopback, its HTTP server on a free port, no dashboard."""
    return {"cls": distributed.Scheduler,
            "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "dashboard": False}}


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two single-threaded worker processes (Nannies), named as hosts."""
    if shutil.which(emulate.QEMU) is None:
        pytest.skip("host-b needs qemu-x86_64 (qemu-user), which is not installed")
    def worker(name: str, env: dict[str, str]) -> dict:
        return {"cls": distributed.Nanny, "options": {"name": name, "nthreads": 1, "host": "127.0.0.1", "env": env,
                                                      "memory_limit": 0, "silence_logs": logging.ERROR}}

    workers = {"host-a": worker("host-a", {}), "host-b": worker("host-b", {cluster_mod.HOST_MODEL_VARIABLE: "Nehalem"})}
    with distributed.SpecCluster(workers=workers, scheduler=_scheduler(), silence_logs=logging.ERROR) as sc:
        with cluster_mod.Cluster(sc.scheduler_address) as c:
            c.client.wait_for_workers(2, timeout=120)
            yield c


@pytest.fixture(scope="module")
def matrix_out(tmp_path_factory):
    """The folder of the two-host matrix, shared with the command-line test (which resumes it)."""
    return tmp_path_factory.mktemp("cluster") / "m"


def test_a_matrix_over_two_hosts_brings_back_two_records_of_two_numerical_classes(cluster, matrix_out):
    assert cluster.hosts() == ("host-a", "host-b")
    spec = default_spec()
    # the variant `bnaudit matrix` names the default spec's, so that the command-line test resumes this plan
    plan = make_plan([Variant("default", spec)], Grid(), epochs=1, audit_every=0, hosts=cluster.hosts())
    out = matrix_out
    events = []
    done = execute(plan, out, jobs=2, runner=cluster.run, on_event=events.append)
    keys = (f"host-a/{LABEL}", f"host-b/{LABEL}")
    assert done.failures == () and done.ran == keys

    a, b = (record.load_record(out / "runs" / k) for k in keys)
    for rec in (a, b):  # the plan's configuration on both: this host, native
        assert rec.fingerprint.config == plan.runs[0].config.to_dict() and rec.spec.hash == spec.hash
    assert a.meta["environment"]["emulated_cpu_model"] is None
    assert b.meta["environment"]["emulated_cpu_model"] == "Nehalem"  # its process ran under qemu -cpu Nehalem
    assert "AVX" not in b.meta["environment"]["cpu_features"] and b.meta["effective"]["cpu_capability"] == "DEFAULT"
    assert b.meta["environment"]["environment"][cluster_mod.HOST_MODEL_VARIABLE] == "Nehalem"
    if a.meta["effective"]["cpu_capability"] != "DEFAULT":  # another kernel set than SSE4.2's: another class
        pc = compare.compare_pair(a.fingerprint, b.fingerprint)
        assert not pc.identical and pc.first is not None and pc.first.epoch == 0
        assert len(compare.equivalence_classes([a.fingerprint, b.fingerprint])) == 2
    # Each run's progress came back from its worker, and no temporary folder is left.
    assert {e.run.key for e in events if e.kind == "epoch"} == set(keys)
    assert _no_partials(out) == []

    again = execute(plan, out, jobs=2, runner=cluster.run)  # a re-run resumes: nothing runs again
    assert again.ran == () and again.resumed == keys and again.failures == ()


def test_a_configuration_one_host_cannot_honour_fails_there_alone(cluster, tmp_path):
    """--isa avx2: host-a (this machine) honours it; the emulated Nehalem has no AVX2, which its worker finds."""
    if "avx2" not in envinfo.supported_isas():
        pytest.skip("this machine cannot run --isa avx2 either")
    plan = make_plan([Variant("bn", default_spec())], Grid(isa=("avx2",)), epochs=1, audit_every=0,
                     hosts=cluster.hosts())  # checked without CPU checks: each host checks its own
    out = tmp_path / "m"
    done = execute(plan, out, jobs=2, runner=cluster.run)
    assert done.ran == ("host-a/float32_t1_avx2_nondet",)
    (failure,) = done.failures
    assert failure.key == "host-b/float32_t1_avx2_nondet" and failure.exit_code == ExitCode.USAGE
    # The worker's UsageError, class and message, with the host named: one line.
    assert failure.message.startswith("host host-b: the emulated CPU Nehalem cannot run --isa avx2 ")
    assert "\n" not in failure.message
    assert record.load_record(out / "runs" / "host-a/float32_t1_avx2_nondet").meta["effective"]["cpu_capability"] \
        == "AVX2"
    assert not (out / "runs" / failure.key).exists() and _no_partials(out) == []


def _dask_worker(address: str, *args: str) -> subprocess.Popen[bytes]:
    """A `dask worker` process without a nanny (killed, it is gone for good)."""
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                             "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _names(cluster) -> list[object]:
    return [w["name"] for w in cluster.client.scheduler_info(n_workers=-1)["workers"].values()]


def _until(check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the cluster did not get there in time"
        time.sleep(0.1)


def test_a_worker_without_a_name_is_no_host(cluster, tmp_path):
    proc = _dask_worker(cluster.client.scheduler.address, "--local-directory", str(tmp_path))
    try:
        _until(lambda: len(_names(cluster)) == 3)
        with pytest.raises(UsageError, match=r"^the dask worker at tcp://127\.0\.0\.1:\d+ has no name bnaudit can use "
                                             r"as a host \('tcp://.*'\); start each worker with --name HOST"):
            cluster.hosts()
    finally:
        proc.kill()
        proc.wait()
    _until(lambda: len(_names(cluster)) == 2)  # the next tests see the two hosts alone


def test_a_scheduler_without_workers_has_no_hosts():
    with distributed.SpecCluster(workers={}, scheduler=_scheduler(), silence_logs=logging.ERROR) as sc:
        with cluster_mod.Cluster(sc.scheduler_address) as c, pytest.raises(UsageError, match="has no workers; start"):
            c.hosts()


def test_a_host_lost_during_its_run_is_a_failed_run_and_leaves_nothing(cluster, tmp_path):
    """A third host, a `dask worker --name host-c` without a nanny, killed (SIGKILL) while its run is in flight."""
    proc = _dask_worker(cluster.client.scheduler.address, "--name", "host-c", "--local-directory",
                        str(tmp_path / "scratch"))
    try:
        _until(lambda: "host-c" in _names(cluster))
        failed: list[BaseException] = []

        def run() -> None:
            try:
                cluster.run("host-c", default_spec(), RunConfig(Controls(), epochs=1, audit_every=0), tmp_path / "r")
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        _until(lambda: any(cluster.client.processing().values()))  # the task is on host-c
        proc.kill()
        thread.join(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert not thread.is_alive()
    (exc,) = failed
    assert isinstance(exc, RunFailed) and exc.message == "host host-c: its worker left the scheduler during the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]  # no record, no partial folder, no lock
    _until(lambda: len(_names(cluster)) == 2)


def test_a_host_no_worker_has_is_a_failed_run(cluster, tmp_path):
    with pytest.raises(RunFailed, match=r"^host host-z: no worker of that name is connected to tcp://127\.0\.0\.1:"):
        cluster.run("host-z", default_spec(), RunConfig(Controls(), epochs=1, audit_every=0), tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_scheduler_is_one_line_fast(capfd):
    started = time.perf_counter()
    with pytest.raises(UsageError) as info:
        cluster_mod.Cluster("tcp://127.0.0.1:1", timeout=2)
    assert time.perf_counter() - started < 10
    assert info.value.message.startswith("cannot reach the dask scheduler at tcp://127.0.0.1:1: ")
    for bad in ("nonsense", "foo://127.0.0.1:8786"):
        with pytest.raises(UsageError, match=f"^cannot reach the dask scheduler at {bad}: "):
            cluster_mod.Cluster(bad)
    gc.collect()  # a half-built Client would complain as it is collected
    assert "Traceback" not in capfd.readouterr().err
    assert "\n" not in info.value.message


def test_distributed_is_optional(monkeypatch):
    code = "import sys, bnaudit.cluster; assert 'distributed' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now raises ImportError
    with pytest.raises(MissingTool, match=r"pip install 'bnaudit\[cluster\]'"):
        cluster_mod.Cluster("tcp://127.0.0.1:8786")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "./record.json", "a//b", "a\\..\\x", ""])
def test_a_file_outside_the_record_folder_is_refused(name):
    with pytest.raises(RunFailed, match=r"^host h: the worker sent back a file outside the record folder"):
        cluster_mod.checked_files({"record.json": b"{}", name: b"x"}, "host h")


@pytest.mark.parametrize("files, why", [
    (None, "no record folder"), ({}, "no record folder"), ({"record.json": "text"}, "wrong types"),
    ({"params.npy": b""}, "without record.json"),
    ({"record.json": b" " * (2 << 24)}, "more than bnaudit reads"),
])
def test_an_answer_that_is_no_record_folder_is_refused(files, why):
    with pytest.raises(RunFailed, match=why):
        cluster_mod.checked_files(files, "host h")


def test_the_record_is_written_whole_or_not_at_all(tmp_path):
    """A hostile path writes nothing; a folder that does not load as the asked record is removed before the rename."""
    out = tmp_path / "runs" / "r"
    config = RunConfig(Controls(), epochs=1).to_dict()
    kw = {"where": "host h", "spec_hash": default_spec().hash, "config": config}
    with pytest.raises(RunFailed, match="outside the record folder"):
        cluster_mod.install(out, {"record.json": b"{}", "../x": b"evil"}, **kw)
    with pytest.raises(RunFailed, match=r"^host h: the record it sent back does not load \("):
        cluster_mod.install(out, {"record.json": b"{}", "params.npy": b"\x93NUMPY"}, **kw)
    assert list(tmp_path.rglob("*")) == [tmp_path / "runs"]  # no record, no partial folder, no ../x


@needs_qemu
def test_a_host_cpu_model_wraps_the_run_in_qemu_and_a_configs_own_model_wins():
    native = RunConfig(Controls(), epochs=1)
    argv = launch.worker_command(launch.emulated_config(native, "Nehalem"))
    assert argv[1:5] == ["-cpu", "Nehalem", "-E", "BNAUDIT_CPU_MODEL=Nehalem"]
    assert argv[5:] == launch.worker_command(native)
    assert launch.emulated_config(native, None) is native
    own = RunConfig(Controls(cpu_model="Haswell"), epochs=1)
    assert launch.emulated_config(own, "Nehalem") is own


@needs_qemu
def test_the_host_cpu_model_comes_from_the_workers_environment(monkeypatch):
    monkeypatch.delenv(cluster_mod.HOST_MODEL_VARIABLE, raising=False)
    assert cluster_mod.host_cpu_model() is None
    monkeypatch.setenv(cluster_mod.HOST_MODEL_VARIABLE, "seed-i7")
    assert cluster_mod.host_cpu_model() == "Haswell"
    monkeypatch.setenv(cluster_mod.HOST_MODEL_VARIABLE, "NoSuchModel")
    with pytest.raises(UsageError, match=r"^BNAUDIT_HOST_CPU_MODEL=NoSuchModel: unknown CPU model 'NoSuchModel'"):
        cluster_mod.host_cpu_model()


def test_bnaudit_matrix_runs_on_the_cluster_named_by_scheduler(cluster, matrix_out, tmp_path):
    """The command line: `bnaudit matrix --scheduler ADDRESS` runs each configuration on every worker; it
    plans the matrix the API test made (same plan id), so it resumes that folder when the test ran before."""
    import json
    import os

    address = cluster.client.scheduler.address
    out = matrix_out
    done = subprocess.run([sys.executable, "-m", "bnaudit", "matrix", "--scheduler", address, "--epochs", "1",
                           "--audit-every", "0", "-j", "2", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert [r["key"] for r in summary["runs"]] == [f"host-a/{LABEL}", f"host-b/{LABEL}"]
    assert {r["status"] for r in summary["runs"]} <= {"ran", "resumed"} and summary["complete"]
    manifest = json.loads((out / "matrix.json").read_text())
    assert manifest["hosts"] == ["host-a", "host-b"] and [r["host"] for r in manifest["runs"]] == ["host-a", "host-b"]
    import jsonschema
    import referencing
    from referencing.jsonschema import DRAFT202012

    from bnaudit import schemas

    registry = referencing.Registry().with_resources(
        [(i, DRAFT202012.create_resource(s)) for i, s in schemas.all_schemas().items()])
    jsonschema.Draft202012Validator(schemas.load("matrix"), registry=registry).validate(manifest)
    refused = subprocess.run([sys.executable, "-m", "bnaudit", "matrix", "--scheduler", "tcp://127.0.0.1:1",
                              "--epochs", "1", "--out", str(tmp_path / "n")], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == ExitCode.USAGE and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_an_ensemble_runs_each_seed_on_every_host_and_pairs_the_hosts_by_seed(cluster, tmp_path):
    """`bnaudit ensemble --scheduler`: the seeds of one configuration on both hosts (native and Nehalem), the two
    hosts as the two configurations of the pairs, every record brought back from its host."""
    import json
    import os

    address = cluster.client.scheduler.address
    out = tmp_path / "e"
    done = subprocess.run([sys.executable, "-m", "bnaudit", "ensemble", "--scheduler", address, "--seeds", "1..2",
                           "--epochs", "1", "--no-floor", "-j", "2", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc["configs"] == ["bn @host-a", "bn @host-b"] and doc["missing"] == []
    pair = next(p for p in doc["pairs"] if p["outcome"] == "test_mse")
    assert (pair["a"], pair["b"], pair["n"], pair["identical"]) == ("bn @host-a", "bn @host-b", 2, 0)
    differences = []
    for seed in (1, 2):
        native, nehalem = (record.load(out / "runs" / "runs" / host / f"bn-seed-{seed}" / LABEL)
                           for host in ("host-a", "host-b"))
        assert nehalem.environment.get("emulated_cpu_model") == "Nehalem"
        assert not native.environment.get("emulated_cpu_model")
        assert compare.compare_pair(native, nehalem).first is not None  # the two hosts compute apart
        differences.append(float(native.test_loss[-1]) - float(nehalem.test_loss[-1]))
    assert pair["mean"] == sum(differences) / 2  # the pair is the hosts' records, seed by seed


def _cli_json(*argv: str) -> dict:
    import json
    import os

    done = subprocess.run([sys.executable, "-m", "bnaudit", *argv, "--json"], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_a_census_through_the_cluster_says_what_a_census_on_local_processes_says(cluster, tmp_path):
    """host-a (this machine) and host-b (a Nehalem host) against `census --models Nehalem` here: the same
    machines, bits, classes, splits, vendors and features, each host's read on the host itself."""
    address = cluster.client.scheduler.address
    remote = _cli_json("census", "--scheduler", address, "-j", "2", "--out", str(tmp_path / "cluster"))
    local = _cli_json("census", "--models", "Nehalem", "-j", "2", "--out", str(tmp_path / "local"))
    as_local = {"host-a": "native", "host-b": "Nehalem"}
    assert [m["name"] for m in remote["machines"]] == ["host-a", "host-b"]
    assert [m["name"] for m in local["machines"]] == ["native", "Nehalem"]
    for r, lo in zip(remote["machines"], local["machines"]):
        assert {**r, "name": as_local[r["name"]]} == lo  # digest, class, vendor, features, capability
    assert [[as_local[n] for n in c] for c in remote["classes"]] == local["classes"]
    assert remote["splits"] == local["splits"] and remote["missing"] == local["missing"] == []
    assert len(local["classes"]) == 2 or local["machines"][0]["capability"] == "DEFAULT"  # as the matrix test says
    for host in ("host-a", "host-b"):  # each host's run was made there, in runs/<host>/
        assert record.load(tmp_path / "cluster" / "runs" / host / LABEL).digest \
            == next(m["digest"] for m in remote["machines"] if m["name"] == host)
    refused = subprocess.run([sys.executable, "-m", "bnaudit", "census", "--scheduler", address, "--models",
                              "Haswell", "--out", str(tmp_path / "no")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == ExitCode.USAGE and "--models does not apply" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()


def test_a_solve_over_the_cluster_pins_each_run_to_its_host_and_reads_its_answer_from_their_records(
        cluster, tmp_path):
    """`solve --scheduler`: the hosts are the machines; the screen's runs come back from host-a and host-b, and
    the answer (agree or not under --isa default) is what their records say; the timing runs stay here."""
    address = cluster.client.scheduler.address
    out = tmp_path / "s"
    doc = _cli_json("solve", "--scheduler", address, "--lever", "isa=default", "--max-levers", "1",
                    "--verify-epochs", "1", "--cost-epochs", "1", "--cost-repeats", "1", "-j", "2", "--out", str(out))
    assert doc["machines"] == ["host-a", "host-b"] and doc["levers"] == ["isa=default"]
    stage = {p.name.partition("-")[0]: p for p in out.iterdir() if p.is_dir()}
    base = [record.load(stage["baseline"] / "runs" / h / LABEL) for h in ("host-a", "host-b")]
    assert [len(c) for c in doc["classes_before"]] == [len(c.indices) for c in compare.equivalence_classes(base)]
    if len(doc["classes_before"]) == 1:
        return  # nothing to solve (a host with no kernels beyond SSE4.2: never CI's)
    capped = [record.load_record(stage["screen"] / "runs" / h / "float32_t1_default_nondet")
              for h in ("host-a", "host-b")]
    assert capped[1].meta["environment"]["emulated_cpu_model"] == "Nehalem"
    agree = capped[0].fingerprint.digest == capped[1].fingerprint.digest
    (tried,) = doc["tried"]
    assert tried["recipe"] == "isa=default" and tried["classes"] == (1 if agree else 2)
    if agree:
        assert doc["best"] == "isa=default" and doc["run_options"] == ["--isa", "default"]
        assert (stage["cost"] / "runs").is_dir() and not any(
            h.name.startswith("host-") for h in (stage["cost"] / "runs").rglob("*"))  # timed here
    else:
        assert doc["best"] is None and [sorted(c) for c in doc["partition"]["classes"]] == [["host-a"], ["host-b"]]
        assert doc["causes"]  # what separates them, read from each host's own CPU
    assert doc["runs"]["baseline"] == 2 and doc["runs"]["screen-1"] == 2
