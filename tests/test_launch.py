"""The launcher: a run in its own process, with its controls in that process's environment.

Two real runs (one epoch each) check what reaches the run's process and that the run's
process itself refuses an ISA that did not take effect.  The protocol (progress, summary,
errors, crashes) is checked with small stand-in processes that speak it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from bnaudit import controls, envinfo, errors, launch
from bnaudit.controls import Controls, RunConfig
from bnaudit.errors import InputError, OutputError, RunFailed, UsageError
from bnaudit.spec import default_spec, from_dict

SPEC = default_spec()
ONE_EPOCH = RunConfig(Controls(), epochs=1, audit_every=0)
# The real runs train a small network (its frozen inputs are generated into the session's cache,
# it has no reference): what is checked is the process, not the experiment.
SMALL = from_dict({"data": {"samples": 20, "train": 10}, "model": {"hidden_layers": 1, "hidden_units": 4},
                   "train": {"epochs": 1, "batch_size": 5, "lr_milestones": []}}, base=SPEC)


# --------------------------------------------------------------------------- real runs

def test_real_run_gets_its_own_controls_and_none_inherited(tmp_path, monkeypatch):
    for name, value in {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2",
                        "MKL_NUM_THREADS": "2", "ONEDNN_MAX_CPU_ISA": "SSE41", "KMP_AFFINITY": "compact"}.items():
        monkeypatch.setenv(name, value)
    events = []
    out = tmp_path / "run"
    summary = launch.run(SMALL, ONE_EPOCH, out, on_progress=events.append)
    effective = summary["effective"]
    assert effective["intra_op_threads"] == 1, "the inherited OMP/MKL thread counts reached the run"
    if "avx2" in envinfo.supported_isas():
        assert effective["cpu_capability"] != "DEFAULT", "the inherited ATEN_CPU_CAPABILITY reached the run"
    meta = json.loads((out / "record.json").read_text())
    numerics = meta["environment"]["environment"]
    leaked = sorted({"ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "KMP_AFFINITY"} & set(numerics))
    assert not leaked, f"inherited numerics variables in the run's environment: {leaked}"
    assert numerics["OMP_NUM_THREADS"] == "1" and numerics["MKL_NUM_THREADS"] == "1"
    assert summary["out"] == str(out) and summary["epochs"] == 1 and summary["spec_hash"] == SMALL.hash
    assert summary["config"] == ONE_EPOCH.to_dict()
    assert summary["digest"] == json.loads((out / "fingerprint.json").read_text())["digest"]
    # After the last epoch the run names what it does (the reference, the record), at the full count.
    assert [(e["event"], e["epoch"], e["epochs"], e.get("stage")) for e in events] == [
        ("progress", 1, 1, None), ("progress", 1, 1, "vs reference"), ("progress", 1, 1, "writing record")]


def test_numerics_variables_it_does_not_set_reach_the_run_recorded_and_compare_names_them(tmp_path, monkeypatch):
    """OpenBLAS's, torch's own and glibc's tunables are kept (a machine may need them), never unrecorded."""
    from bnaudit import compare, record

    launch.run(SMALL, ONE_EPOCH, tmp_path / "plain")
    tuned = {"OPENBLAS_VERBOSE": "0", "TORCH_SHOW_CPP_STACKTRACES": "0", "GLIBC_TUNABLES": "glibc.malloc.check=0"}
    for name, value in tuned.items():
        monkeypatch.setenv(name, value)
    launch.run(SMALL, ONE_EPOCH, tmp_path / "tuned")
    recorded = json.loads((tmp_path / "tuned" / "record.json").read_text())["environment"]["environment"]
    assert {k: recorded.get(k) for k in tuned} == tuned
    diff = {key: (x, y) for key, x, y in compare.environment_diff(record.load(tmp_path / "plain"),
                                                                  record.load(tmp_path / "tuned"))}
    assert {key: y for key, (_, y) in diff.items() if key.startswith("env.")} == \
        {f"env.{k}": v for k, v in tuned.items()}
    assert all(compare.is_cause(f"env.{k}") for k in tuned)

def test_the_run_process_refuses_an_isa_that_did_not_take_effect(tmp_path, monkeypatch):
    """Refused, not downgraded, by the run's own process: the parent's check is passed (this CPU
    has AVX2), but the process is started with ATen capped at DEFAULT, as an unhonoured cap would be."""
    if "avx2" not in envinfo.supported_isas():
        pytest.skip("this CPU has no AVX2")
    real = controls.child_environment
    capped = {"ATEN_CPU_CAPABILITY": "default"}
    monkeypatch.setattr(controls, "child_environment", lambda c, base: real(c, base) | capped)
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"--isa avx2 asked for capability AVX2 but torch runs DEFAULT"):
        launch.run(SMALL, RunConfig(Controls(isa="avx2"), epochs=1, audit_every=0), out)
    assert not out.exists(), "a refused run must leave no record"


# --------------------------------------------------------------------------- the protocol, with stand-in processes

def _stand_in(monkeypatch, body: str) -> None:
    """Replace the run's process by ``python -c body`` (stdin: the request, as the worker gets it)."""
    script = "import json, os, sys\nrequest = json.loads(sys.stdin.read())\n" + textwrap.dedent(body)
    monkeypatch.setattr(launch, "worker_command", lambda config: [sys.executable, "-c", script])


def test_progress_summary_request_and_environment(tmp_path, monkeypatch):
    _stand_in(monkeypatch, """
        print("a native library's noise on fd 1")
        print(json.dumps([1, 2]))
        print(json.dumps({"event": "progress", "epoch": 1}))
        print(json.dumps({"event": "other"}))
        sys.stderr.write("x" * 2_000_000)   # far more than a pipe holds: must not block the parent
        sys.stdout.flush()
        env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "KEEP")}
        print(json.dumps({"event": "done", "summary": {"request": request, "env": env}}))
    """)
    events = []
    out = tmp_path / "run"
    base = {"KEEP": "yes", "ATEN_CPU_CAPABILITY": "default", "PATH": "/usr/bin"}
    summary = launch.run(SPEC, ONE_EPOCH, out, on_progress=events.append, base_env=base)
    assert events == [{"event": "progress", "epoch": 1}]
    assert summary["request"] == {"spec": SPEC.to_dict(), "config": ONE_EPOCH.to_dict(), "out": str(out),
                                  "force": False, "parent_pid": os.getpid()}
    assert summary["env"] == {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": None, "MKL_CBWR": None, "KEEP": "yes"}
    # without base_env the parent's own environment is the base
    monkeypatch.setenv("KEEP", "parent")
    monkeypatch.setenv("MKL_CBWR", "AVX")
    summary = launch.run(SPEC, RunConfig(Controls(isa="avx2"), epochs=1), tmp_path / "run2", force=True)
    assert summary["env"]["KEEP"] == "parent" and summary["env"]["MKL_CBWR"] == "AVX2"
    assert summary["request"]["force"] is True and summary["request"]["config"]["audit_every"] == 10


def test_progress_without_a_listener_is_ignored(tmp_path, monkeypatch):
    _stand_in(monkeypatch, """
        print(json.dumps({"event": "progress", "epoch": 1}))
        print(json.dumps({"event": "done", "summary": {"ok": 1}}))
    """)
    assert launch.run(SPEC, ONE_EPOCH, tmp_path / "run") == {"ok": 1}


@pytest.mark.parametrize("kind", ["UsageError", "InputError", "MismatchError", "OutputError", "RunFailed",
                                  "MissingTool", "ReferenceFailure"])
def test_an_error_event_becomes_the_same_error(tmp_path, monkeypatch, kind):
    _stand_in(monkeypatch, f"""
        print(json.dumps({{"event": "error", "exit_code": 3, "kind": "{kind}", "message": "what went wrong"}}))
        sys.exit(3)
    """)
    with pytest.raises(getattr(errors, kind)) as caught:
        launch.run(SPEC, ONE_EPOCH, tmp_path / "run")
    assert type(caught.value) is getattr(errors, kind) and caught.value.message == "what went wrong"


def test_an_error_event_of_unknown_kind_is_a_failed_run(tmp_path, monkeypatch):
    _stand_in(monkeypatch, """
        print(json.dumps({"event": "error", "kind": "KeyError", "message": "odd"}))
        print(json.dumps({"event": "done", "summary": {}}))
    """)
    with pytest.raises(RunFailed) as caught:
        launch.run(SPEC, ONE_EPOCH, tmp_path / "run")
    assert type(caught.value) is RunFailed and caught.value.message == "odd"


def test_a_crash_names_its_last_line_not_qemu_notes(tmp_path, monkeypatch):
    _stand_in(monkeypatch, """
        sys.stderr.write("qemu-x86_64: warning: TCG doesn't support requested feature\\n"
                         "Traceback (most recent call last):\\n  ...\\nValueError: boom\\n\\n"
                         "qemu-x86_64: warning: another note\\n")
        sys.exit(5)
    """)
    with pytest.raises(RunFailed) as caught:
        launch.run(SPEC, ONE_EPOCH, tmp_path / "run")
    assert caught.value.message == "the run process exited with code 5: ValueError: boom"


@pytest.mark.parametrize("body, message", [
    ("sys.exit(0)", "the run process exited with code 0: no output"),
    ('print(json.dumps({"event": "done", "summary": [1]}))', "the run process exited with code 0: no output"),
    ('print(json.dumps({"event": "done", "summary": {}}))\nsys.stderr.write("late\\n")\nsys.exit(9)',
     "the run process exited with code 9: late"),
    ('sys.stderr.write("y" * 1000 + "\\n")\nsys.exit(1)', "the run process exited with code 1: " + "y" * 300),
])
def test_no_summary_or_a_failing_exit_is_a_failed_run(tmp_path, monkeypatch, body, message):
    _stand_in(monkeypatch, body)
    with pytest.raises(RunFailed) as caught:
        launch.run(SPEC, ONE_EPOCH, tmp_path / "run")
    assert caught.value.message == message


def test_a_process_that_cannot_start(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "worker_command", lambda config: [str(tmp_path / "no-such-python")])
    with pytest.raises(RunFailed, match=r"cannot start the run process \(No such file or directory\)"):
        launch.run(SPEC, ONE_EPOCH, tmp_path / "run")


def test_bad_requests_fail_before_any_process_starts(tmp_path, monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("no process may start for a request that fails validation or has no output")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(UsageError, match="--threads must be between 1 and 1024"):
        launch.run(SPEC, RunConfig(Controls(threads=0), epochs=1), tmp_path / "a")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    with pytest.raises(OutputError, match=re.escape(f"--out {taken} ")):
        launch.run(SPEC, ONE_EPOCH, taken)


def test_worker_command():
    argv = launch.worker_command(ONE_EPOCH)
    assert argv == [sys.executable, "-I", "-m", "bnaudit.worker"], "the run's Python is isolated (-I)"
    if shutil.which("qemu-x86_64") is None:
        return
    from bnaudit import emulate

    wrapped = launch.worker_command(RunConfig(Controls(cpu_model="seed-i7"), epochs=1))
    assert wrapped == [emulate.qemu_path(), "-cpu", "Haswell", "-E", "BNAUDIT_CPU_MODEL=Haswell", *argv]


def test_exported_names():
    assert set(launch.__all__) == {"BnauditError", "run", "worker_command"}
    assert InputError.__name__ in launch._ERRORS


# --------------------------------------------------------------------------- interrupts

SLEEPER = """
    print(json.dumps({"event": "progress", "epoch": 1}), flush=True)
    import time
    time.sleep(120)
"""


def test_stop_all_ends_the_running_processes(tmp_path, monkeypatch):
    import threading

    _stand_in(monkeypatch, SLEEPER)
    started = threading.Event()
    box = {}

    def target():
        try:
            launch.run(SPEC, ONE_EPOCH, tmp_path / "run", on_progress=lambda e: started.set())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert started.wait(60), "the stand-in never reported progress"
    launch.stop_all()
    thread.join(30)
    assert not thread.is_alive(), "stop_all did not end the run's process"
    assert isinstance(box.get("error"), RunFailed) and "exited with code -9" in box["error"].message, box
    assert not launch._LIVE


def test_a_stop_set_before_the_start_kills_the_process_at_once(tmp_path, monkeypatch):
    import threading
    import time

    _stand_in(monkeypatch, SLEEPER)
    stop = threading.Event()
    stop.set()
    began = time.monotonic()
    with pytest.raises(RunFailed, match="exited with code -9"):
        launch.run(SPEC, ONE_EPOCH, tmp_path / "run", stop=stop)
    assert time.monotonic() - began < 60 and not launch._LIVE


def _interrupt(event):
    raise KeyboardInterrupt


def test_ctrl_c_kills_the_run_and_says_no_record_was_written(tmp_path, monkeypatch):
    _stand_in(monkeypatch, SLEEPER)
    with pytest.raises(errors.Interrupted) as caught:
        launch.run(SPEC, ONE_EPOCH, tmp_path / "run", on_progress=_interrupt)
    assert caught.value.message == "interrupted; no record was written" and not launch._LIVE


def test_ctrl_c_after_the_record_was_complete_says_where_it_is(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "record.json").write_text(json.dumps({"schema": "bnaudit.record/1"}))  # an earlier run's record
    _stand_in(monkeypatch, SLEEPER)
    with pytest.raises(errors.Interrupted) as caught:  # the old record is untouched: none was written
        launch.run(SPEC, ONE_EPOCH, out, force=True, on_progress=_interrupt)
    assert caught.value.message == "interrupted; no record was written"
    _stand_in(monkeypatch, """
    out = request["out"]
    os.replace(os.path.join(out, "record.json"), os.path.join(out, "old.json"))
    with open(os.path.join(out, "record.json"), "w") as f:
        f.write(json.dumps({"schema": "bnaudit.record/1", "new": True}))
""" + SLEEPER)
    with pytest.raises(errors.Interrupted) as caught:
        launch.run(SPEC, ONE_EPOCH, out, force=True, on_progress=_interrupt)
    assert caught.value.message == f"interrupted after the run's record was complete; it is at {out}"


def test_the_run_process_starts_in_isolated_mode():
    """-I: PYTHONPATH, PYTHONSTARTUP, the user's site and the current folder cannot change a run."""
    argv = launch.worker_command(RunConfig(Controls(), epochs=1))
    assert argv == [sys.executable, "-I", "-m", "bnaudit.worker"]


def test_an_interrupt_says_whether_the_record_was_complete(tmp_path):
    out = tmp_path / "r"
    before = launch._record_stamp(out)
    assert before is None
    assert launch._interrupted_message(out, before) == "interrupted; no record was written"
    out.mkdir()
    (out / "record.json").write_text("{}")
    after = launch._record_stamp(out)
    assert after is not None
    complete = f"interrupted after the run's record was complete; it is at {out}"
    assert launch._interrupted_message(out, before) == complete
    assert launch._interrupted_message(out, after) == "interrupted; no record was written"  # an older record


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tmp_path, monkeypatch):
    from bnaudit import fileio

    def no_process(*args, **kwargs):
        raise AssertionError("no process may start for an --out in use")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    out = tmp_path / "run"
    with fileio.OutputLock.beside(out, "the first run"):
        refused = f"--out {out} is in use by another bnaudit (pid {os.getpid()})"
        with pytest.raises(OutputError, match=re.escape(refused)):
            launch.run(SPEC, ONE_EPOCH, out)
