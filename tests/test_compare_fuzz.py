"""Hostile inputs to `bnaudit compare`: one line and a documented exit code, never a traceback or a verdict.

Every generated file is compared with the real fingerprint it was made from.  Allowed
outcomes: exit 3 (unusable input) or 4 (claims another experiment) with nothing on stdout
and one error line; or, when an edit left every digest and value intact (a label, the
environment), exit 0 "bit-identical", which is then the true answer.  Exit 1 (a
difference) would be a wrong verdict: no edit here changes what the run computed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnaudit import fileio
from bnaudit.cli import main
from bnaudit.errors import ExitCode

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base(make_run, tmp_path_factory):
    folder = make_run(3, threads=1)
    work = tmp_path_factory.mktemp("fuzz")
    return {"folder": folder, "fp": folder / "fingerprint.json", "text": (folder / "fingerprint.json").read_bytes(),
            "work": work}


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def check_outcome(code: int, out: str, err: str) -> None:
    assert code in (ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.MISMATCH), (code, err)
    if code == ExitCode.OK:
        assert "bit-identical" in out and err == ""
        return
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnaudit: error: "), err
    assert "internal error" not in err and "Traceback" not in err


def compare_with(base, data: bytes, name: str = "edited.json") -> tuple[int, str, str]:
    path = base["work"] / name
    path.write_bytes(data)
    return run_cli("compare", str(path), str(base["fp"]))


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncated_fingerprints(base, cut):
    text = base["text"]
    code, out, err = compare_with(base, text[: cut % len(text)])
    assert code == ExitCode.BAD_INPUT
    check_outcome(code, out, err)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4))
def test_byte_edits(base, edits):
    data = bytearray(base["text"])
    for pos, value in edits:
        data[pos % len(data)] = value
    check_outcome(*compare_with(base, bytes(data)))


# Control characters are left out of generated text: error messages that quote a hostile key
# verbatim can break the one-line rule (see test_control_characters_stay_on_one_line).
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list) and len(value) <= 8:
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_field_replacements(base, data):
    """Replace (or delete) any field, at any depth, with any JSON value."""
    doc = json.loads(base["text"])
    paths = [p for p in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    target = doc
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = data.draw(JSON)
    check_outcome(*compare_with(base, json.dumps(doc).encode()))


@FUZZ
@given(value=JSON)
def test_arbitrary_json_documents(base, value):
    code, out, err = compare_with(base, json.dumps(value).encode())
    assert code == ExitCode.BAD_INPUT
    check_outcome(code, out, err)


def test_control_characters_stay_on_one_line(base):
    doc = json.loads(base["text"])
    doc["spec"]["train"]["lr\nsecond line"] = 1
    check_outcome(*compare_with(base, json.dumps(doc).encode(), "control.json"))


@pytest.mark.parametrize("content", [
    b"", b"\xff\xfe\x00garbage", b"[" * 100_000, b'{"schema": "bnaudit.fingerprint/1"}', b"NaN", b"{" + b"1" * 5000,
    b'{"schema": "bnaudit.fingerprint/2"}', b'{"schema": "bnaudit.record/1"}',
])
def test_pinned_hostile_files(base, content):
    code, out, err = compare_with(base, content, "pinned.json")
    assert code == ExitCode.BAD_INPUT
    check_outcome(code, out, err)


def test_oversized_file(base):
    path = base["work"] / "huge.json"
    with open(path, "wb") as fh:  # sparse: the size check refuses it before reading
        fh.truncate(fileio.MAX_JSON_BYTES + 1)
    code, out, err = run_cli("compare", str(base["fp"]), str(path))
    assert code == ExitCode.BAD_INPUT and "larger than" in err
    check_outcome(code, out, err)


def test_broken_record_folders(base, tmp_path):
    def copy(name: str):
        dest = tmp_path / name
        shutil.copytree(base["folder"], dest)
        return dest

    broken = copy("truncated-npy")
    params = broken / "params.npy"
    params.write_bytes(params.read_bytes()[:-7])
    no_meta = copy("no-record-json")
    os.remove(no_meta / "record.json")
    edited = copy("edited-meta")
    meta = json.loads((edited / "record.json").read_text())
    meta["epochs_run"] = 2
    (edited / "record.json").write_text(json.dumps(meta))
    for folder in (broken, no_meta, edited, tmp_path):
        code, out, err = run_cli("compare", str(base["folder"]), str(folder))
        assert code == ExitCode.BAD_INPUT, (folder, err)
        check_outcome(code, out, err)


@pytest.mark.parametrize("edit", [
    lambda d: d["config"].update(controls=[1]),
    lambda d: d["config"].update(controls="float32"),
    lambda d: d["environment"].update(environment=["OMP_NUM_THREADS=1"]),
    lambda d: d["effective"].update(threadpools=[{"prefix": None}, 3]),
    lambda d: d.update(extra={"divergence": {"rows": [0], "layers": ["linear1"], "correct_bits": [["x"]]}}),
])
def test_odd_metadata_blocks_still_give_a_verdict_or_one_line(base, edit):
    """Metadata is not part of the digests: odd blocks must neither crash nor change the verdict."""
    doc = json.loads(base["text"])
    edit(doc)
    for args in (("compare",), ("compare", "--json"), ("compare", "--markdown")):
        path = base["work"] / "odd.json"
        path.write_text(json.dumps(doc))
        code, out, err = run_cli(*args, str(path), str(base["fp"]))
        if code and "--json" in args:  # an error under --json is also an object on stdout
            assert json.loads(out)["error"]["code"] == code
            out = ""
        check_outcome(code, out if args == ("compare",) or code else "bit-identical", err)
        if code == 0 and "--json" in args:
            assert json.loads(out)["verdict"] == "identical"
