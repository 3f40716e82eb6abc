"""Hostile inputs and faults: every one gets one line, its documented exit code, and no wrong verdict.

The categories of issue 11, each with the examples that were found against an earlier
bnaudit among its cases: damaged and forged records, hostile specs and options, output
folders that are not bnaudit's, pipes and devices given as files, signals at any moment,
a full disk, a read-only folder, a hostile environment, and the CI gate.  Every case runs
the real CLI (in this process through ``bnaudit.cli.main``, or as a real ``bnaudit``
process where signals or the environment are the point) and asserts all of: the exit
code; exactly one line on stderr, ``bnaudit: error: ...`` naming the problem; no
traceback; and, for outputs, that nothing of a user's was deleted and nothing
half-written loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bnaudit import fileio, record
from bnaudit.errors import ExitCode

EPOCHS = 3


def one_line(err: str, pattern: str) -> None:
    """stderr is one error line, matching ``pattern`` (a regex), and no traceback."""
    import re

    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("qemu-x86_64: warning:")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("bnaudit: error: "), lines[0]
    assert "Traceback" not in err and "internal error" not in err, err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def genuine(make_run, tmp_path_factory):
    """A genuine 3-epoch record, a 6-epoch record, and a baseline made from the first."""
    from bnaudit.cli import main

    base = tmp_path_factory.mktemp("hostile")
    baseline = base / "baseline.json"
    assert main(["baseline", "create", "--record", str(make_run(EPOCHS)), "--out", str(baseline)]) == 0
    return {"run": make_run(EPOCHS), "long": make_run(6), "baseline": baseline, "root": base}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _reseal(folder: Path, meta: dict) -> None:
    """What a forger who recomputes every unkeyed hash does to record.json."""
    meta["content_sha256"] = record.record_sha256(meta)
    (folder / "record.json").write_text(json.dumps(meta))


def _forge_params(folder: Path, row: int) -> None:
    params = np.load(folder / "params.npy")
    params[row, 3] = np.nextafter(params[row, 3], np.float32(np.inf))
    blob = fileio.npy_bytes(params)
    (folder / "params.npy").write_bytes(blob)
    meta = json.loads((folder / "record.json").read_text())
    meta["files"]["params.npy"]["sha256"] = hashlib.sha256(blob).hexdigest()
    _reseal(folder, meta)


# --------------------------------------------------------------------------- records

def _edit_text(name: str, old: str, new: str):
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_text(path.read_text().replace(old, new, 1))
    return edit


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _replace_by_fifo(folder: Path) -> None:
    (folder / "record.json").unlink()
    os.mkfifo(folder / "record.json")


def _replace_by_symlink_loop(folder: Path) -> None:
    (folder / "record.json").unlink()
    (folder / "record.json").symlink_to(folder / "record.json")


def _restate(folder: Path, state: np.ndarray) -> None:
    """New state digests into a record, and its overall digest and every file hash recomputed to match."""
    arrays = {n: np.load(folder / f"{n}.npy") for n in ("epoch_digests", "step_rows", "step_digests")}
    blob = fileio.npy_bytes(state)
    (folder / "state_digests.npy").write_bytes(blob)
    meta = json.loads((folder / "record.json").read_text())
    meta["files"]["state_digests.npy"]["sha256"] = hashlib.sha256(blob).hexdigest()
    meta["digest"] = record.overall_digest(meta["spec_hash"], meta["storage"],
                                           record.row_digests(arrays["epoch_digests"]), arrays["step_rows"],
                                           arrays["step_digests"], state)
    _reseal(folder, meta)


def _forge_state_digest(folder: Path) -> None:
    state = np.load(folder / "state_digests.npy")
    state[2] ^= np.uint64(1)
    _restate(folder, state)


def _forge_params_and_state(folder: Path, row: int) -> None:
    """Values edited at a row, with that row's state digest, the overall digest and every hash recomputed:
    everything but the per-tensor digests, which the fingerprints of the genuine run summarise."""
    _forge_params(folder, row)
    _restate(folder, record.state_digests(np.load(folder / "params.npy"), np.load(folder / "buffers.npy")))


def _older_schema(folder: Path) -> None:
    meta = json.loads((folder / "record.json").read_text())
    _reseal(folder, {**meta, "schema": "bnaudit.record/1"})


RECORD_DAMAGE = {
    # issue 11 item 2: params.npy replaced at an epoch row the fingerprint does not carry,
    # its sha256 and record.json's own checksum recomputed
    "params at a row no fingerprint carries, every hash recomputed": (
        lambda f: _forge_params(f, 4), r"params\.npy row 4 .* does not match its digest"),
    "params at a keyframe row, every hash recomputed": (lambda f: _forge_params(f, 5), r"params\.npy row 5"),
    "a state digest edited, the digest and every hash recomputed": (
        _forge_state_digest, r"params\.npy or buffers\.npy row 2 does not match its state digest"),
    "threads edited in record.json": (_edit_text("record.json", '"threads": 1', '"threads": 2'),
                                      r"record\.json does not match its content_sha256"),
    "environment edited in record.json": (_edit_text("record.json", '"machine": "', '"machine": "x'),
                                          r"does not match its content_sha256"),
    "params.npy truncated": (lambda f: (f / "params.npy").write_bytes((f / "params.npy").read_bytes()[:100]),
                             r"params\.npy: sha256 does not match"),
    "params.npy pickled": (_write("params.npy", b"\x80\x04\x95" + b"\0" * 64), r"params\.npy: sha256 does not match"),
    "record.json garbage": (_write("record.json", b"\xff{{{"), r"not a valid record"),
    "record.json a FIFO": (_replace_by_fifo, r"not a regular file|not a complete bnaudit record"),
    "record.json deeply nested": (_write("record.json", b"[" * 100_000 + b"]" * 100_000), r"not a valid record"),
    "record.json a symlink loop": (_replace_by_symlink_loop, r"cannot read|not a complete bnaudit record"),
    "record.json missing": (lambda f: (f / "record.json").unlink(), r"not a complete bnaudit record"),
    "schema of an older bnaudit": (_older_schema, r"older bnaudit"),
}


@pytest.mark.parametrize("damage", sorted(RECORD_DAMAGE))
@pytest.mark.parametrize("command", ["compare", "check", "report"])
def test_damaged_and_forged_records(genuine, tmp_path, cli, damage, command):
    edit, pattern = RECORD_DAMAGE[damage]
    source = genuine["long"] if "row" in damage else genuine["run"]
    bad = _copy(source, tmp_path / "bad")
    edit(bad)
    argv = {"compare": ["compare", str(genuine["long"] if "row" in damage else genuine["run"]), str(bad)],
            "check": ["check", "--baseline", str(genuine["baseline"]), "--record", str(bad)],
            "report": ["report", str(bad), "--out", str(tmp_path / "report")]}[command]
    code, _, err = cli(*argv)
    assert code == ExitCode.BAD_INPUT, (code, err)
    one_line(err, pattern)
    assert not (tmp_path / "report").exists()


def test_values_forged_with_their_state_digests_never_compare_identical(genuine, tmp_path, cli):
    """Such a record loads (its hashes are consistent), but it is not the run whose tensor digests it kept."""
    forged = _copy(genuine["long"], tmp_path / "forged")
    _forge_params_and_state(forged, 4)
    baseline = tmp_path / "long.json"
    assert cli("baseline", "create", "--record", str(genuine["long"]), "--out", str(baseline))[0] == 0
    for argv in (["compare", str(genuine["long"]), str(forged)],
                 ["compare", str(genuine["long"] / "fingerprint.json"), str(forged)],
                 ["check", "--baseline", str(baseline), "--record", str(forged)],
                 ["check", "--baseline", str(baseline), "--record", str(forged), "--tolerance", "ulps:100"]):
        code, out, err = cli(*argv)
        assert code == ExitCode.BAD_INPUT and "identical" not in out and "PASS" not in out, (argv, code, out)
        one_line(err, r", after epoch 4: different state digests but equal parameter and running-statistics digests")


@pytest.mark.parametrize("path", ["/dev/zero", "fifo", "folder"])
def test_devices_pipes_and_folders_as_fingerprints(genuine, tmp_path, cli, path):
    target = {"/dev/zero": "/dev/zero", "fifo": str(tmp_path / "fp.json"), "folder": str(tmp_path)}[path]
    if path == "fifo":
        os.mkfifo(target)
    code, _, err = cli("compare", str(genuine["run"] / "fingerprint.json"), target)
    assert code == ExitCode.BAD_INPUT
    one_line(err, "not a regular file|not a complete bnaudit record")


# --------------------------------------------------------------------------- specs and options

SPECS = {
    "batch size 0": ("[train]\nbatch_size = 0\n", "batch_size must be >= 2"),
    "batch size not dividing": ("[train]\nbatch_size = 7\n", "must divide data.train"),
    "5000-deep TOML": ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply|not valid TOML"),
    "lr 1e300": ("[train]\nlr = 1e300\n", r"train\.lr must be in \(0, 10\]"),
    "lr_gamma 1e308": ("[train]\nlr_gamma = 1e308\n", "lr_gamma must be in"),
    "x bounds 1e30": ("[data]\nx_low = -1e30\nx_high = 1e30\n", r"\|x\|\^degree"),
    "schema true": ("schema = true\n", "schema True is not supported"),
    "schema 1.0": ("schema = 1.0\n", "schema 1.0 is not supported"),
    "a string for an integer": ("[train]\nepochs = \"ten\"\n", "must be an integer"),
    "an unknown key": ("[train]\nlearning_rate = 0.1\n", "unknown key"),
    "not TOML": ("[train\n", "not valid TOML"),
    "a record too large to load back": ("[model]\nhidden_units = 1024\nhidden_layers = 32\n",
                                        "would write a params.npy of 124523 MiB"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hostile_specs_are_refused_before_any_work(tmp_path, cli, name):
    text, pattern = SPECS[name]
    (tmp_path / "spec.toml").write_text(text)
    code, _, err = cli("run", "--spec", str(tmp_path / "spec.toml"), "--out", str(tmp_path / "r"))
    expected = ExitCode.USAGE if "too large" in name else ExitCode.BAD_INPUT
    assert code == expected, (code, err)
    one_line(err, pattern)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
def test_specs_that_are_not_files(tmp_path, cli, kind):
    target = {"fifo": tmp_path / "spec.toml", "/dev/zero": Path("/dev/zero"), "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    code, _, err = cli("run", "--spec", str(target), "--out", str(tmp_path / "r"))
    assert code == ExitCode.BAD_INPUT
    one_line(err, "not a regular file|is a folder")


OPTIONS = {
    "an unknown dtype": (["run", "--dtype", "float16"], ExitCode.USAGE, "float16"),
    "zero threads": (["run", "--threads", "0"], ExitCode.USAGE, "threads"),
    "an unknown ISA": (["run", "--isa", "avx9"], ExitCode.USAGE, "avx9"),
    "an unknown CPU model": (["run", "--cpu-model", "Pentium9"], ExitCode.USAGE, "unknown CPU model"),
    "epochs beyond the spec": (["run", "--epochs", "1001"], ExitCode.USAGE, "--epochs must be between"),
    "a malformed perturbation": (["run", "--perturb", "linear1.weight[99,0]:1"], ExitCode.USAGE, "perturb"),
    "a tolerance far beyond any distance": (["check", "--baseline", "B", "--tolerance", "ulps:9223372036854775806"],
                                            ExitCode.USAGE, "ulps"),
    "an unknown tolerance": (["check", "--baseline", "B", "--tolerance", "close"], ExitCode.USAGE, "tolerance"),
    "an unknown command": (["frobnicate"], ExitCode.USAGE, "No such command"),
}


EMULATED = {
    "an emulated model without AVX2 asked for avx2": (["run", "--cpu-model", "Nehalem", "--isa", "avx2"],
                                                       ExitCode.USAGE, "emulated CPU Nehalem cannot run --isa avx2"),
    "AVX-512 under qemu": (["run", "--cpu-model", "Haswell", "--isa", "avx512"], ExitCode.USAGE,
                           "qemu emulates no AVX-512"),
}


@pytest.mark.parametrize("name", [*sorted(OPTIONS), *(pytest.param(n, marks=pytest.mark.emulation) for n in EMULATED)])
def test_bad_options_are_usage_errors(genuine, tmp_path, cli, name):
    argv, expected, pattern = {**OPTIONS, **EMULATED}[name]
    argv = [str(genuine["baseline"]) if a == "B" else a for a in argv]
    if argv[0] == "run":
        argv += ["--out", str(tmp_path / "r")]
    code, _, err = cli(*argv)
    assert code == expected, (code, err)
    one_line(err, pattern)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- output folders

WRITERS = {
    "run": lambda g, out: ["run", "--epochs", "1", "--audit-every", "0", "--out", str(out)],
    "run --force": lambda g, out: ["run", "--epochs", "1", "--audit-every", "0", "--out", str(out), "--force"],
    "report": lambda g, out: ["report", str(g["run"]), "--out", str(out)],
    "report --force": lambda g, out: ["report", str(g["run"]), "--out", str(out), "--force"],
    "frozen build": lambda g, out: ["frozen", "build", "--out", str(out)],  # always replaces its own kind
    "reference build": lambda g, out: ["reference", "build", "--epochs", "1", "--out", str(out)],
    "reference build --force": lambda g, out: ["reference", "build", "--epochs", "1", "--out", str(out), "--force"],
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_no_writer_deletes_a_folder_it_did_not_write(genuine, tmp_path, cli, writer):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    code, _, err = cli(*WRITERS[writer](genuine, out))
    assert code == ExitCode.OUTPUT, (code, err)
    one_line(err, "bnaudit did not write")
    assert (out / "chapter1.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1


def test_a_report_never_replaces_a_record(genuine, tmp_path, cli):
    rec = _copy(genuine["run"], tmp_path / "rec")
    code, _, err = cli("report", str(genuine["run"]), "--out", str(rec), "--force")
    assert code == ExitCode.OUTPUT
    one_line(err, "is a bnaudit record, not a report")
    assert record.load(rec).digest == record.load(genuine["run"]).digest


def test_leftovers_of_a_killed_write_are_cleaned_and_never_load(genuine, tmp_path, cli):
    partial = _copy(genuine["run"], tmp_path / ".r.partial-x1")
    (partial / "record.json").unlink()  # what a kill before the last file leaves
    code, _, err = cli("compare", str(partial), str(genuine["run"]))
    assert code == ExitCode.BAD_INPUT
    one_line(err, "an interrupted run's leftovers")
    code, _, _ = cli("run", "--epochs", "1", "--audit-every", "0", "--out", str(tmp_path / "r"))
    assert code == 0 and not partial.exists()


def test_a_full_disk_leaves_nothing_that_loads(genuine, tmp_path, cli):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("no tmpfs can be mounted here (needs root)")
    try:
        code, _, err = cli("run", "--epochs", "1", "--audit-every", "0", "--out", str(mount / "r"))
        assert code == ExitCode.OUTPUT, (code, err)
        one_line(err, "cannot write|No space left")
        assert not (mount / "r").exists() and not list(mount.iterdir())
        code, _, err = cli("report", str(genuine["run"]), "--out", str(mount / "rep"))
        assert code == ExitCode.OUTPUT, (code, err)
        assert not list(mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_folder_is_one_line(genuine, tmp_path, cli):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("no tmpfs can be mounted here (needs root)")
    try:
        for argv in (["run", "--epochs", "1", "--out", str(mount / "r")],
                     ["report", str(genuine["run"]), "--out", str(mount / "rep")],
                     ["baseline", "create", "--record", str(genuine["run"]), "--out", str(mount / "b.json")]):
            code, _, err = cli(*argv)
            assert code == ExitCode.OUTPUT, (argv, code, err)
            one_line(err, "cannot write|Read-only")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --------------------------------------------------------------------------- signals (real processes)

def _bnaudit(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bnaudit", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _gone(pid: int, within: float = 15.0) -> bool:
    """Whether the process ends (or is a zombie, dead but not yet reaped by its new parent) within ``within`` s."""
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("delay", [1.0, 2.5, 5.0])
def test_a_signal_at_any_moment_of_a_run(tmp_path, sig, delay):
    """From start-up imports to training (a signal inside CPython's own start-up, before bnaudit runs, is not ours)."""
    proc = _bnaudit("run", "--epochs", "1000", "--audit-every", "0", "--out", str(tmp_path / "r"))
    time.sleep(delay)
    workers = _workers_of(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    one_line(err, "interrupted")
    assert all(_gone(w) for w in workers)  # the run's process went with it
    if (tmp_path / "r").exists():  # only when the interrupt came after the record was complete
        assert record.load(tmp_path / "r").epochs == 1000 and "record was complete" in err


def test_a_run_process_never_outlives_a_killed_parent(tmp_path):
    proc = _bnaudit("run", "--epochs", "1000", "--audit-every", "0", "--out", str(tmp_path / "r"))
    deadline = time.time() + 60
    while not _workers_of(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    workers = _workers_of(proc.pid)
    assert workers
    time.sleep(3.0)  # the run's process is past its start-up, importing torch or training
    proc.kill()
    proc.wait()
    assert all(_gone(w, within=3.0) for w in workers), "the run's process outlived its parent"
    assert not (tmp_path / "r").exists()


def test_an_interrupted_matrix_stops_its_runs_and_keeps_its_lock_until_they_are_gone(tmp_path):
    out = tmp_path / "m"
    proc = _bnaudit("matrix", "--dtype", "float32", "--threads", "1,2", "--epochs", "300", "--audit-every", "0",
                    "-j", "2", "--out", str(out))
    deadline = time.time() + 60
    while len(_workers_of(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    workers = _workers_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED
    one_line(err, r"interrupted with 0 of 2 configurations finished")
    assert all(_gone(w) for w in workers)
    assert not (out / ".matrix.lock").exists()


def test_an_interrupted_report_keeps_the_old_one(genuine, tmp_path):
    from bnaudit.cli import main

    out = tmp_path / "rep"
    assert main(["report", str(genuine["run"]), "--out", str(out)]) == 0
    before = (out / "report.json").read_bytes()
    for delay in (1.0, 2.0, 3.5):
        proc = _bnaudit("report", str(genuine["run"]), str(genuine["long"]), "--out", str(out), "--force")
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        now = (out / "report.json").read_bytes()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"], "a partial or old copy was left"
        if proc.returncode == 0:  # it had finished before the signal: then it is the new report, complete
            assert len(json.loads(now)["sources"]) == 2
            continue
        assert proc.returncode == ExitCode.INTERRUPTED, err
        one_line(err, "interrupted")
        # the old report, or (signalled during the commit, raised after it) the new one, whole
        assert now == before or len(json.loads(now)["sources"]) == 2


# --------------------------------------------------------------------------- environment

def test_pythonpath_cannot_change_a_runs_bits(genuine, tmp_path):
    """A sitecustomize.py on PYTHONPATH that scales the loss by (1 + 2^-20): the run ignores it."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "sitecustomize.py").write_text(
        "import torch.nn.functional as F\n_mse = F.mse_loss\n"
        "F.mse_loss = lambda *a, **k: _mse(*a, **k) * (1 + 2**-20)\n")
    env = dict(os.environ, PYTHONPATH=str(evil), PYTHONSTARTUP=str(evil / "sitecustomize.py"))
    proc = _bnaudit("run", "--epochs", str(EPOCHS), "--out", str(tmp_path / "r"), env=env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    fp = record.load(tmp_path / "r")
    assert fp.digest == record.load(genuine["run"]).digest
    assert fp.environment["python_startup"] == {"isolated": True}


# --------------------------------------------------------------------------- the CI gate

def test_an_edited_baseline_never_passes(genuine, tmp_path, cli):
    for field, value in (("created", "2000-01-01T00:00:00+00:00"), ("made_from", "someone else")):
        raw = json.loads(genuine["baseline"].read_text())
        raw["extra"]["baseline"][field] = value
        edited = tmp_path / f"{field}.json"
        edited.write_text(json.dumps(raw))
        code, _, err = cli("check", "--baseline", str(edited), "--record", str(genuine["run"]))
        assert code == ExitCode.BAD_INPUT, (field, code, err)
        one_line(err, "edited|does not match")
