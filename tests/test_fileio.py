"""bnaudit.fileio: bounded reads, atomic writes, only bnaudit's own folders replaced, one writer at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bnaudit import fileio
from bnaudit.errors import InputError, OutputError


def _record_marker(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps({"schema": "bnaudit.record/2"}))


# --------------------------------------------------------------------------- reads

def test_read_bounded_reads_at_most_the_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert fileio.read_bounded(path, "test", 100) == b"x" * 100
    with pytest.raises(InputError, match="larger than any test"):
        fileio.read_bounded(path, "test", 99)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "missing"])
def test_read_bounded_refuses_what_is_not_a_regular_file(tmp_path, kind):
    path = {"fifo": tmp_path / "p", "device": "/dev/zero", "folder": tmp_path, "missing": tmp_path / "nope"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    message = {"fifo": "not a regular file", "device": "not a regular file", "folder": "is a folder",
               "missing": "cannot read"}[kind]
    with pytest.raises(InputError, match=message):
        fileio.read_bounded(path, "test", 1 << 20)  # returns at once: never blocks on the FIFO


@pytest.mark.parametrize("text, message", [
    (b"[1, 2]", "top level is not an object"),
    (b'{"a": NaN}', "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
])
def test_parse_json_is_strict(text, message):
    with pytest.raises(InputError, match=message):
        fileio.parse_json(text, "f", "test")


def test_npy_round_trip_checks_the_sha256(tmp_path):
    import hashlib

    blob = fileio.npy_bytes(np.arange(6, dtype="<f4").reshape(2, 3))
    (tmp_path / "a.npy").write_bytes(blob)
    got = fileio.read_npy(tmp_path / "a.npy", hashlib.sha256(blob).hexdigest(), against="test")
    assert got.tobytes() == np.arange(6, dtype="<f4").tobytes() and got.shape == (2, 3)
    with pytest.raises(InputError, match="sha256 does not match test"):
        fileio.read_npy(tmp_path / "a.npy", "0" * 64, against="test")


def test_canonical_sha256_is_of_the_sorted_compact_form():
    import hashlib

    assert fileio.canonical_sha256({"b": 1, "a": [1.5, "x"]}) == hashlib.sha256(b'{"a":[1.5,"x"],"b":1}').hexdigest()
    with pytest.raises(ValueError):
        fileio.canonical_sha256({"a": float("nan")})


# --------------------------------------------------------------------------- whose folder

def test_folder_kind_reads_the_marker(tmp_path):
    _record_marker(tmp_path / "r")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "matrix.json").write_text('{"schema": "bnaudit.matrix/1"}')
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "record.json").write_text('{"schema": "something else"}')
    assert fileio.folder_kind(tmp_path / "r") == "record"
    assert fileio.folder_kind(tmp_path / "m") == "matrix"
    assert fileio.folder_kind(tmp_path / "x") is None
    assert fileio.folder_kind(tmp_path / "missing") is None


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_bnaudit_did_not_write_is_never_replaced(tmp_path, force):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="bnaudit did not write"):
        fileio.prepare_output(out, force=force, kind="record")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_a_folder_of_another_kind_is_never_replaced(tmp_path):
    _record_marker(tmp_path / "r")
    with pytest.raises(OutputError, match="is a bnaudit record, not a report"):
        fileio.prepare_output(tmp_path / "r", force=True, kind="report")


def test_a_folder_of_the_same_kind_needs_force(tmp_path):
    _record_marker(tmp_path / "r")
    with pytest.raises(OutputError, match="pass --force"):
        fileio.prepare_output(tmp_path / "r", force=False, kind="record")
    fileio.prepare_output(tmp_path / "r", force=True, kind="record")
    fileio.prepare_output(tmp_path / "empty", force=False, kind="record")  # missing or empty: taken


def test_leftovers_of_an_interrupted_write_are_cleaned(tmp_path):
    out = tmp_path / "r"
    (tmp_path / ".r.partial-abc").mkdir()
    (tmp_path / ".r.partial-abc" / "params.npy").write_bytes(b"half")
    (tmp_path / ".r.old-def").mkdir()
    (tmp_path / ".other.partial-x").mkdir()  # another output's: not ours to clean
    fileio.prepare_output(out, force=False, kind="record")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x"]


def test_a_symlinked_output_is_refused(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OutputError, match="not a folder"):
        fileio.prepare_output(tmp_path / "link", force=True, kind="record")


# --------------------------------------------------------------------------- atomic writes and the lock

def test_atomic_text_write_leaves_no_temporary(tmp_path):
    fileio.write_text_atomic(tmp_path / "a.txt", "one")
    fileio.write_text_atomic(tmp_path / "a.txt", "two")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "two"
    with pytest.raises(OutputError, match="is a folder"):
        fileio.write_text_atomic(tmp_path, "x")


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "r"
    with fileio.OutputLock.beside(out, f"--out {out}"):
        code = ("from pathlib import Path\nfrom bnaudit import fileio\nfrom bnaudit.errors import OutputError\n"
                f"try:\n    fileio.OutputLock.beside(Path({str(out)!r}), 'the output').__enter__()\n"
                "except OutputError as e:\n    print(e.message)\n")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert f"the output is in use by another bnaudit (pid {os.getpid()})" in other.stdout
    assert not (tmp_path / ".r.lock").exists()  # released: removed, nothing left beside the output
    with fileio.OutputLock.beside(out, "again"):  # and free again
        pass


def test_json_number_keeps_json_strict():
    assert [fileio.json_number(x) for x in (1.5, 3, None, float("inf"), float("-inf"), float("nan"))] == \
        [1.5, 3, None, "inf", "-inf", "nan"]
    assert json.loads(json.dumps(fileio.json_number(float("nan")), allow_nan=False)) == "nan"


@pytest.mark.parametrize("write", [
    lambda out: fileio.write_text_atomic(out / "x.json", "{}"),
    lambda out: fileio.prepare_output(out / "record", force=True, kind="record"),
    lambda out: fileio.atomic_folder(out / "record", "a record").__enter__(),
    lambda out: fileio.OutputLock.beside(out / "record", "a record").__enter__(),
    lambda out: fileio.OutputLock(out / ".x.lock", "a record").__enter__(),
], ids=["file", "prepare", "folder", "lock beside", "lock"])
def test_nothing_is_ever_written_inside_the_package_folder(write, tmp_path):
    """In a wheel the package folder holds the shipped data: bnaudit reads it there and writes elsewhere."""
    inside = fileio.PACKAGE / "shipped" / "frozen"
    before = sorted(p.relative_to(fileio.PACKAGE) for p in fileio.PACKAGE.rglob("*") if "__pycache__" not in p.parts)
    with pytest.raises(OutputError, match="inside the installed bnaudit package, which bnaudit never writes to"):
        write(inside)
    (tmp_path / "link").symlink_to(fileio.PACKAGE)
    for other_way in (tmp_path / "link" / "shipped", fileio.PACKAGE / "cli" / ".." / "shipped"):
        with pytest.raises(OutputError, match="inside the installed bnaudit package"):
            write(other_way)
    after = sorted(p.relative_to(fileio.PACKAGE) for p in fileio.PACKAGE.rglob("*") if "__pycache__" not in p.parts)
    assert after == before
    fileio.write_text_atomic(tmp_path / "x.json", "{}")  # and anywhere else is fine
    assert (tmp_path / "x.json").read_text() == "{}"
