"""bnaudit check, the library: tolerance parsing, baseline files and signatures, prefixes, planning, every policy.

Runs are real (``make_run``, a few epochs each, shared with other test files).  Expected
values come from independent computations in this file (ulp distances from int32 bit
patterns, relative errors in float64), never from the code under test.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnaudit import bits, check, compare, fileio, gate, record, schemas
from bnaudit._version import __version__
from bnaudit.baseline import BASELINE_SCHEMA, Signature, load_baseline, write_baseline
from bnaudit.blocks import DivergenceBlock
from bnaudit.errors import InputError, MismatchError, OutputError, ReferenceFailure, UsageError

EPOCHS = 3  # shared with tests/test_run.py's runs


@pytest.fixture(scope="module")
def base_run(make_run):
    return make_run(EPOCHS)


@pytest.fixture(scope="module")
def drifted_run(make_run):
    """The baseline's configuration with one initial weight one ulp off: a drift that exists on every host."""
    return make_run(EPOCHS, perturb="linear1.weight[0,0]:1")


@pytest.fixture(scope="module")
def baseline(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "float32.json"
    return write_baseline(out, base_run, update=False)


@pytest.fixture(scope="module")
def drifted(drifted_run):
    return record.load(drifted_run)


# --------------------------------------------------------------------------- tolerance parsing

@pytest.mark.parametrize("text, policy, limit", [
    ("exact", check.Policy.EXACT, None),
    ("ulps:0", check.Policy.ULPS, 0),
    ("ulps:16", check.Policy.ULPS, 16),
    ("rel:1e-4", check.Policy.REL, 1e-4),
    ("rel:0.5", check.Policy.REL, 0.5),
    ("rel:.25", check.Policy.REL, 0.25),
    ("rel:0", check.Policy.REL, 0.0),
    ("bits:20", check.Policy.BITS, 20),
    (" bits:1 ", check.Policy.BITS, 1),
])
def test_tolerances_parse(text, policy, limit):
    tol = check.parse_tolerance(text)
    assert tol.policy is policy and tol.limit == limit
    assert check.parse_tolerance(str(tol)) == tol


@pytest.mark.parametrize("text, shown", [
    ("rel:1e-4", "rel:0.0001"), ("rel:0.5", "rel:0.5"), ("rel:2", "rel:2"), ("rel:1e-06", "rel:1e-06"),
    ("rel:0.1234567", "rel:0.1234567"), ("rel:1234567", "rel:1234567.0"), ("rel:0.1", "rel:0.1"),
])
def test_a_rel_tolerance_is_shown_with_every_digit_it_has(text, shown):
    # shown as %g where that loses nothing, else with all the digits that tell the float apart
    assert str(check.parse_tolerance(text)) == shown


@pytest.mark.parametrize("text", [
    "", "exact:1", "EXACT", "ulps", "ulps:", "ulps:-1", "ulps:+3", "ulps:1.5", "ulps:1e3", "ulps:016",
    "ulps:99999999999999999999", "rel:", "rel:nan", "rel:inf", "rel:-1e-3", "rel:1e400", "rel:0x10", "rel:1e-4x",
    "bits:0", "bits:65", "bits:2.5", "bits:-3", "ulp:3", "relative:1e-3", "ulps:3:4", "rel:1,5", "bits: 3",
])
def test_bad_tolerances_are_usage_errors(text):
    with pytest.raises(UsageError, match="--tolerance"):
        check.parse_tolerance(text)


@given(st.text(max_size=24))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_to_a_tolerance_that_round_trips_or_is_refused(text):
    try:
        tol = check.parse_tolerance(text)
    except UsageError:
        return
    assert check.parse_tolerance(str(tol)) == tol


@given(st.integers(min_value=0, max_value=2**53 - 1))
def test_every_whole_number_of_ulps_parses_exactly(n):
    assert check.parse_tolerance(f"ulps:{n}").limit == n


@pytest.mark.parametrize("n", [2**53, 2**62, 9223372036854775806, 9223372036854775807])
def test_ulps_limits_beyond_exact_counts_are_refused(n):
    """ulps:9223372036854775806 once passed NaN parameters: as a float64 it equals the NaN distance."""
    with pytest.raises(UsageError, match=r"ulps must be at most 9007199254740991 \(2\^53 - 1\)"):
        check.parse_tolerance(f"ulps:{n}")


# --------------------------------------------------------------------------- baselines

def test_baseline_round_trips_and_is_a_fingerprint(baseline, base_run):
    fp = record.load(base_run)
    assert baseline.fingerprint.digest == fp.digest
    assert baseline.dtype == "float32" and baseline.made_from == base_run.name
    # The baseline file is itself a fingerprint: record.load (what bnaudit compare uses) reads it.
    again = record.load(baseline.path)
    assert again.digest == fp.digest
    assert again.keyframes.tobytes() == fp.keyframes[np.isin(fp.keyframe_rows, again.keyframe_rows)].tobytes()
    assert again.environment == fp.environment
    raw = json.loads(open(baseline.path).read())
    assert raw["extra"]["baseline"]["schema"] == BASELINE_SCHEMA


def _canonical_sha256(doc: dict) -> str:
    """The canonical hash, written here with hashlib and json alone (not fileio): keys sorted, compact, ASCII."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _reseal(raw: dict) -> dict:
    """What a forger without the key can do: recompute every unkeyed checksum (the fingerprint's, then the seal)."""
    block = raw["extra"]["baseline"]
    body = {k: v for k, v in raw.items() if k != "content_sha256"}
    body["extra"] = {k: v for k, v in raw["extra"].items() if k != "baseline"}
    raw["content_sha256"] = _canonical_sha256(body)
    sealed = {k: v for k, v in block.items() if k not in ("sha256", "signature")}
    block["sha256"] = _canonical_sha256({**raw, "extra": {**raw["extra"], "baseline": sealed}})
    return raw


def _hmac(raw: dict, key: bytes) -> str:
    """The documented signature: HMAC-SHA256 over the hex canonical hash of everything but the signature."""
    block = {k: v for k, v in raw["extra"]["baseline"].items() if k != "signature"}
    digest = _canonical_sha256({**raw, "extra": {**raw["extra"], "baseline": block}})
    return hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()


def test_the_seal_is_the_sha256_of_the_canonical_json_but_the_seal_fields(baseline):
    """The baseline file format: the seal covers the whole document, the block's own metadata included.

    Recomputed here with hashlib and json alone (not fileio), so that a change of the
    canonical form, which would make every committed baseline fail to load, fails here.
    """
    raw = json.loads(Path(baseline.path).read_text())
    block = raw["extra"]["baseline"]
    assert sorted(block) == ["bnaudit", "created", "made_from", "schema", "sha256", "signature", "updated"]
    assert block["schema"] == "bnaudit.baseline/2" and block["signature"] is None
    assert block["sha256"] == _reseal(json.loads(json.dumps(raw)))["extra"]["baseline"]["sha256"]
    assert Path(baseline.path).read_text() == json.dumps(raw, sort_keys=True, indent=1) + "\n"
    assert baseline.signature is Signature.UNSIGNED


def test_create_refuses_an_existing_file_and_leaves_no_partial_files(baseline, base_run):
    before = sorted(os.listdir(os.path.dirname(baseline.path)))
    with pytest.raises(OutputError, match="already exists"):
        write_baseline(baseline.path, base_run, update=False)
    assert sorted(os.listdir(os.path.dirname(baseline.path))) == before == ["float32.json"]


def test_update_keeps_creation_time_and_refuses_another_experiment(base_run, make_run, tmp_path):
    out = tmp_path / "b.json"
    with pytest.raises(InputError, match="no baseline to update"):
        write_baseline(out, base_run, update=True)
    first = write_baseline(out, base_run, update=False)
    again = write_baseline(out, base_run, update=True)
    assert again.created == first.created and again.updated is not None
    other = make_run(EPOCHS, dtype="float64")
    with pytest.raises(MismatchError, match=r"another experiment \(different run dtype \(float32 vs float64\)\)"):
        write_baseline(out, other, update=True)
    assert load_baseline(out, key=None).dtype == "float32"  # untouched
    forced = write_baseline(out, other, update=True, force=True)
    assert forced.dtype == "float64"
    assert sorted(os.listdir(tmp_path)) == ["b.json"]


def test_update_by_a_run_refuses_another_dtype_before_running(baseline, tmp_path, monkeypatch):
    """The run path of ``baseline update`` refuses with the record path's words, and starts no run to do so."""
    out = tmp_path / "b.json"
    out.write_bytes(Path(baseline.path).read_bytes())
    monkeypatch.setattr(gate, "execute", lambda *a, **k: pytest.fail("a run was started"))
    with pytest.raises(MismatchError, match=r"b\.json is a baseline of another experiment \(different run dtype "
                                            r"\(float32 vs float64\)\); pass --force"):
        gate.make_baseline(out, options=gate.RunOptions(dtype="float64"), update=True)
    with pytest.raises(OutputError, match="already exists"):
        gate.make_baseline(out, options=gate.RunOptions(epochs=1))
    with pytest.raises(InputError, match="no baseline to update"):
        gate.make_baseline(tmp_path / "none.json", update=True)
    assert out.read_bytes() == Path(baseline.path).read_bytes()


def test_accepted_classes_of_another_experiment_are_refused(baseline, drifted):
    check.validate_accept_classes([drifted], [baseline])
    other = dataclasses.replace(drifted, frozen="0" * 64)
    with pytest.raises(MismatchError, match=r"--accept-class .*another experiment than the baselines"):
        check.validate_accept_classes([other], [baseline])


def _edit(path, tmp_path, edit):
    raw = json.loads(path.read_text())
    edit(raw)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(raw, sort_keys=True, indent=1))
    return out


def _flip_snapshot(raw):
    blob = bytearray(base64.b64decode(raw["snapshots"]["params"]))
    blob[-1] ^= 1
    raw["snapshots"]["params"] = base64.b64encode(bytes(blob)).decode()


@pytest.mark.parametrize("edit, message", [
    (_flip_snapshot, "does not match its sha256"),
    (lambda d: d["losses"]["train"].__setitem__(1, "0" * 16), "does not match its sha256"),
    (lambda d: d["environment"].update(cpu_model="elsewhere"), "does not match its sha256"),
    # The block's own metadata is sealed too (bnaudit.baseline/1 left it out).
    (lambda d: d["extra"]["baseline"].update(created="2000-01-01T00:00:00+00:00"), "does not match its sha256"),
    (lambda d: d["extra"]["baseline"].update(updated="2000-01-01T00:00:00+00:00"), "does not match its sha256"),
    (lambda d: d["extra"]["baseline"].update(made_from="vetted-run"), "does not match its sha256"),
    (lambda d: d["extra"]["baseline"].update(bnaudit="9.9"), "does not match its sha256"),
    (lambda d: d["extra"]["baseline"].update(note="reviewed"), "does not match its sha256"),
    (lambda d: d["extra"].pop("baseline"), "a fingerprint, not a baseline"),
    (lambda d: d["extra"]["baseline"].update(schema="bnaudit.baseline/9"), "is not bnaudit.baseline/2"),
    (lambda d: d["extra"]["baseline"].update(sha256=7), "'sha256' is missing or malformed"),
    (lambda d: d["extra"]["baseline"].pop("sha256"), "'sha256' is missing or malformed"),
    (lambda d: d["extra"]["baseline"].update(signature="xyz"), "'signature' is missing or malformed"),
    (lambda d: d.clear(), "not a bnaudit baseline"),
])
def test_edited_baselines_are_refused(baseline, tmp_path, edit, message):
    with pytest.raises(InputError, match=message):
        load_baseline(_edit(Path(baseline.path), tmp_path, edit), key=None)


def test_unreadable_baselines_are_refused(baseline, tmp_path):
    text = open(baseline.path, "rb").read()
    (tmp_path / "cut.json").write_bytes(text[: len(text) // 2])
    with pytest.raises(InputError, match="not JSON"):
        load_baseline(tmp_path / "cut.json", key=None)
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(fileio.MAX_JSON_BYTES + 1)
    with pytest.raises(InputError, match="larger than any baseline"):
        load_baseline(big, key=None)
    with pytest.raises(InputError, match="cannot read"):
        load_baseline(tmp_path / "missing.json", key=None)
    with pytest.raises(InputError, match="is a folder"):
        load_baseline(tmp_path, key=None)


@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_changed_byte_is_refused_or_changes_nothing_that_is_checked(baseline, tmp_path, position, value):
    """Any one-byte edit either fails to load (InputError) or leaves every compared value as it was."""
    blob = bytearray(open(baseline.path, "rb").read())
    i = position % len(blob)
    blob[i] = value
    path = tmp_path / "flipped.json"
    path.write_bytes(bytes(blob))
    try:
        loaded = load_baseline(path, key=None)
    except InputError:
        return
    a, b = loaded.fingerprint, baseline.fingerprint
    assert a.digest == b.digest and a.keyframes.tobytes() == b.keyframes.tobytes()
    assert a.train_loss.tobytes() == b.train_loss.tobytes() and a.config == b.config
    assert a.environment == b.environment
    assert (loaded.created, loaded.updated, loaded.made_from) == (baseline.created, baseline.updated,
                                                                   baseline.made_from)


def test_a_schema_1_baseline_is_refused_with_the_command_that_reseals_it(baseline, tmp_path):
    """bnaudit.baseline/1 sealed everything but its own block: refused, and re-sealing it needs no run."""
    raw = json.loads(Path(baseline.path).read_text())
    block = raw["extra"].pop("baseline")
    old = {k: v for k, v in block.items() if k != "signature"}
    old.update(schema="bnaudit.baseline/1", sha256=_canonical_sha256(raw))  # /1's seal: the document but its block
    raw["extra"]["baseline"] = old
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw, sort_keys=True, indent=1))
    with pytest.raises(InputError) as exc:
        load_baseline(path, key=None)
    assert exc.value.message == (
        f"{path}: a bnaudit.baseline/1 baseline, whose seal leaves out its own created, updated and made_from; "
        f"re-seal it: bnaudit baseline create --force --record {path} --out {path}")
    again = write_baseline(path, path, update=False, force=True)  # what that command does
    assert again.fingerprint.digest == baseline.fingerprint.digest
    assert json.loads(path.read_text())["extra"]["baseline"]["schema"] == BASELINE_SCHEMA


# --------------------------------------------------------------------------- signed baselines

KEY = b"0123456789abcdef" * 4
"""A signing key as a CI secret would hold it (64 characters; what envinfo reads is its UTF-8 bytes)."""


@pytest.fixture()
def signed(base_run, tmp_path, monkeypatch):
    """A baseline written by bnaudit baseline create with BNAUDIT_SIGNING_KEY set."""
    monkeypatch.setenv("BNAUDIT_SIGNING_KEY", KEY.decode())
    b = gate.make_baseline(tmp_path / "signed.json", source=base_run)
    monkeypatch.delenv("BNAUDIT_SIGNING_KEY")
    return b


def test_a_signed_baseline_carries_the_documented_hmac(signed):
    raw = json.loads(Path(signed.path).read_text())
    assert signed.signature is Signature.VERIFIED
    assert raw["extra"]["baseline"]["signature"] == _hmac(raw, KEY)
    # The seal is unchanged by signing: it covers everything but the two seal fields.
    assert raw["extra"]["baseline"]["sha256"] == _reseal(json.loads(json.dumps(raw)))["extra"]["baseline"]["sha256"]


def test_with_a_key_only_a_baseline_signed_with_it_loads(signed, baseline, tmp_path):
    assert load_baseline(signed.path, key=KEY).signature is Signature.VERIFIED
    with pytest.raises(InputError, match=r"not signed, and BNAUDIT_SIGNING_KEY is set"):
        load_baseline(baseline.path, key=KEY)
    with pytest.raises(InputError, match=r"signature does not match BNAUDIT_SIGNING_KEY"):
        load_baseline(signed.path, key=b"another key of thirty-two bytes!")
    # Edited and re-sealed without the key: every unkeyed checksum is right, the signature is not.
    for field, value in (("created", "2000-01-01T00:00:00+00:00"), ("made_from", "vetted")):
        raw = json.loads(Path(signed.path).read_text())
        raw["extra"]["baseline"][field] = value
        path = tmp_path / f"resealed-{field}.json"
        path.write_text(json.dumps(_reseal(raw)))
        assert load_baseline(path, key=None).signature is Signature.UNCHECKED  # the seal alone cannot tell
        with pytest.raises(InputError, match="signature does not match"):
            load_baseline(path, key=KEY)
    raw = json.loads(Path(signed.path).read_text())
    raw["losses"]["train"][1] = "0" * 16
    path = tmp_path / "resealed-losses.json"
    path.write_text(json.dumps(_reseal(raw)))
    with pytest.raises(InputError, match="signature does not match"):
        load_baseline(path, key=KEY)
    raw = json.loads(Path(baseline.path).read_text())
    raw["extra"]["baseline"]["signature"] = "0" * 64  # a signature made up for an unsigned baseline
    path = tmp_path / "made-up.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="signature does not match"):
        load_baseline(path, key=KEY)


def test_check_with_a_key_refuses_unsigned_baselines_and_classes(signed, baseline, base_run, drifted, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(gate, "execute", lambda *a, **k: pytest.fail("a run was started"))
    monkeypatch.setenv("BNAUDIT_SIGNING_KEY", KEY.decode())
    result = gate.check([Path(signed.path)], records=[base_run])
    assert result.passed and result.warnings == ()
    with pytest.raises(InputError, match="not signed"):
        gate.check([Path(baseline.path)], records=[base_run])
    # An accepted class passes a run as surely as the baseline: with a key it must be signed too.
    with pytest.raises(InputError, match="a fingerprint, not a baseline"):
        gate.check([Path(signed.path)], records=[Path(drifted.source)],
                   accept_paths=[Path(drifted.source) / "fingerprint.json"])
    cls = gate.make_baseline(tmp_path / "class-drifted.json", source=Path(drifted.source))
    result = gate.check([Path(signed.path)], records=[Path(drifted.source)], accept_paths=[Path(cls.path)])
    assert result.passed and result.cases[0].verdict is check.Verdict.ACCEPTED
    monkeypatch.setenv("BNAUDIT_SIGNING_KEY", "short")
    with pytest.raises(UsageError, match="BNAUDIT_SIGNING_KEY is 5 bytes; use a random key of at least 32"):
        gate.check([Path(signed.path)], records=[base_run])


def test_check_without_a_key_loads_a_signed_baseline_and_says_it_was_not_checked(signed, base_run, monkeypatch):
    monkeypatch.delenv("BNAUDIT_SIGNING_KEY", raising=False)
    result = gate.check([Path(signed.path)], records=[base_run])
    assert result.passed
    assert result.warnings == (f"{signed.path} is signed, but BNAUDIT_SIGNING_KEY is not set: "
                               "its signature was not checked",)
    assert "warnings" not in result.to_dict()  # bnaudit.check/1 is unchanged


def test_update_without_the_key_does_not_drop_a_signature_unless_forced(signed, base_run, monkeypatch):
    monkeypatch.delenv("BNAUDIT_SIGNING_KEY", raising=False)
    before = Path(signed.path).read_bytes()
    with pytest.raises(InputError, match=r"is signed; set BNAUDIT_SIGNING_KEY to update it, or pass --force"):
        write_baseline(signed.path, base_run, update=True)
    assert Path(signed.path).read_bytes() == before
    monkeypatch.setenv("BNAUDIT_SIGNING_KEY", KEY.decode())
    again = gate.make_baseline(Path(signed.path), source=base_run, update=True)
    assert again.signature is Signature.VERIFIED and again.created == signed.created and again.updated
    assert write_baseline(signed.path, base_run, update=True, force=True).signature is Signature.UNSIGNED


# --------------------------------------------------------------------------- prefixes

def test_a_prefix_of_a_longer_run_is_the_shorter_run(make_run):
    """truncate(run of 3 epochs, 2) must be bit for bit the run of 2 epochs: what lets one baseline serve all."""
    short = record.load(make_run(2))
    cut = record.prefix(record.load(make_run(EPOCHS)), 2)
    assert cut.digest == short.digest
    assert np.array_equal(cut.row_digests, short.row_digests)
    assert np.array_equal(cut.step_rows, short.step_rows) and np.array_equal(cut.step_digests, short.step_digests)
    assert cut.keyframes.tobytes() == short.keyframes.tobytes()
    with pytest.raises(MismatchError):
        record.prefix(short, EPOCHS)


def test_a_prefix_drops_the_reference_divergence_and_keeps_the_other_blocks(make_run):
    full = record.load(make_run(EPOCHS))
    if full.divergence is None:
        pytest.skip("no mpmath reference is stored for the default spec")
    cut = record.prefix(full, 2)
    assert cut.divergence is None and "divergence" not in cut.extra  # its rows are the longer run's
    assert {k: v for k, v in full.extra.items() if k != "divergence"} == cut.extra
    assert cut.audit is full.audit and cut.floor is full.floor
    assert record.prefix(full, EPOCHS) is full


# --------------------------------------------------------------------------- policies on real runs

def _ulps_oracle(a: np.ndarray, b: np.ndarray) -> int:
    """Largest float32 ulp distance, from sign-magnitude int32 patterns (independent of bnaudit.bits)."""
    def key(x):
        i = x.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return int(np.abs(key(a) - key(b)).max())


def _rel_oracle(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64), b.astype(np.float64)
    scale = np.maximum(np.abs(x), np.abs(y))
    d = np.abs(x - y)
    return float(np.max(np.where(d == 0, 0.0, d / np.where(scale == 0, 1.0, scale))))


def _common_snapshots(baseline, fp):
    rows = np.intersect1d(baseline.fingerprint.keyframe_rows, fp.keyframe_rows)
    a = baseline.fingerprint.keyframes[np.isin(baseline.fingerprint.keyframe_rows, rows)]
    b = fp.keyframes[np.isin(fp.keyframe_rows, rows)]
    return a, b


def test_same_machine_passes_exact(baseline, base_run):
    case = check.check_case(baseline, record.load(base_run))
    assert case.verdict is check.Verdict.IDENTICAL and case.passed and case.first is None


def test_a_drift_fails_exact_at_the_first_step(baseline, drifted):
    case = check.check_case(baseline, drifted)
    assert case.verdict is check.Verdict.DRIFT and not case.passed
    assert case.first is not None and (case.first.epoch, case.first.step) == (0, 0), case.first
    assert case.first.phase == "init" and case.first.max_ulps == 1
    assert any(k == "config.perturb.tensor" and (a, b) == (None, "linear1.weight")
               for k, a, b in case.environment_diff)
    result = check.CheckResult(tolerance=check.EXACT, accept_classes=(), cases=(case,))
    assert result.failed_policy == "exact" and result.first == case.first and int(result.exit_code) == 1


def test_ulps_policy_boundary_is_the_measured_drift(baseline, drifted):
    """Measured drift D (ulps, float32): ulps:D passes, ulps:D-1 fails, and the loose policy passes.

    The loose policy is the smallest power of two at or above D: ulps:2^m means every
    parameter keeps its leading 24-m significand bits (within its binade), the way a
    team would state what it trusts.  On this machine D is about 2^21 after 3 epochs
    (threads change the order of every BatchNorm reduction, from the first step on).
    """
    d = _ulps_oracle(*_common_snapshots(baseline, drifted))
    assert d > 0
    loose = 1 << (d - 1).bit_length()
    for n, verdict in ((loose, check.Verdict.WITHIN), (d, check.Verdict.WITHIN), (d - 1, check.Verdict.DRIFT)):
        case = check.check_case(baseline, drifted, check.parse_tolerance(f"ulps:{n}"))
        assert case.verdict is verdict, (n, d)
        assert case.measured is not None and case.measured.value == d
    assert case.first is not None  # a policy failure still names the first divergence


def test_rel_policy_boundary_is_the_measured_drift(baseline, drifted):
    r = _rel_oracle(*_common_snapshots(baseline, drifted))
    assert 0 < r < np.inf
    assert check.check_case(baseline, drifted, check.parse_tolerance(f"rel:{r!r}")).verdict is check.Verdict.WITHIN
    below = float(np.nextafter(r, 0.0))
    assert check.check_case(baseline, drifted, check.Tolerance(check.Policy.REL, below)).verdict is check.Verdict.DRIFT


def test_accept_class_passes_and_names_the_class(baseline, drifted, base_run):
    case = check.check_case(baseline, drifted, accept=[record.load(base_run), drifted])
    assert case.verdict is check.Verdict.ACCEPTED and case.accepted_by == drifted.source
    assert check.check_case(baseline, drifted, accept=[record.load(base_run)]).verdict is check.Verdict.DRIFT


def _with_keyframe(fp: record.Fingerprint, row: int, column: int, value: float) -> record.Fingerprint:
    """The run as a loader would give it had this one parameter been stored as ``value`` (float32 runs)."""
    keyframes = fp.keyframes.copy()
    keyframes[int(np.flatnonzero(fp.keyframe_rows == row)[0]), column] = np.float32(value)
    return dataclasses.replace(fp, keyframes=keyframes)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_no_policy_passes_non_finite_parameters_where_the_baselines_are_finite(baseline, drifted, value):
    """ulps:2^53-1 lets every finite float32 through, yet not a NaN or an infinity (an infinity is only about
    2^31 ulps from 1.0); nor does an accepted class, nor a divergence block that claims full accuracy."""
    bad = _with_keyframe(drifted, EPOCHS, 0, value)
    for tolerance in (f"ulps:{check.MAX_ULPS}", "rel:1", "exact"):
        case = check.check_case(baseline, bad, check.parse_tolerance(tolerance), accept=[bad])
        assert case.verdict is check.Verdict.DRIFT, tolerance
        if tolerance != "exact":
            assert case.measured is not None and case.measured.nonfinite
            assert case.measured.describe(case.tolerance.policy) == (
                f"non-finite parameters where the baseline's are finite (linear1, after epoch {EPOCHS})")
            assert case.to_dict()["measured"]["value"] == "inf"
    assert check.check_case(baseline, drifted, check.parse_tolerance(f"ulps:{check.MAX_ULPS}")).passed
    perfect = _with_block(bad, _divergence_block(["linear1"], [0, 1, 2, 3], np.full((1, 4), 24.0)))
    case = check.check_case(baseline, perfect, check.parse_tolerance("bits:1"))
    assert case.verdict is check.Verdict.INACCURATE and case.measured is not None
    assert (case.measured.value, case.measured.layer, case.measured.row) == (0.0, "linear1 weights", EPOCHS)


def test_the_baselines_digests_with_other_parameters_are_refused(baseline, base_run):
    """A fingerprint's parameters are covered by its content hash, not its digests: a pair with equal digests
    and different parameters means one file was edited (and its hash recomputed), never IDENTICAL."""
    same = record.load(base_run)
    assert check.check_case(baseline, same).verdict is check.Verdict.IDENTICAL
    edited = _with_keyframe(same, 2, 5, np.nan)
    for tolerance in ("exact", "ulps:16", "bits:1"):
        with pytest.raises(InputError) as exc:
            check.check_case(baseline, _with_block(edited, None), check.parse_tolerance(tolerance))
        assert exc.value.message == (f"{baseline.path} / {same.source}, after epoch 2: identical digests but "
                                     "different parameter snapshots (an edited or corrupt input)")
        assert int(exc.value.exit_code) == 3


def test_refused_comparisons(baseline, make_run, drifted):
    f64 = record.load(make_run(EPOCHS, dtype="float64"))
    with pytest.raises(MismatchError, match=r"float32 baseline.*float64 run"):
        check.check_case(baseline, f64)
    with pytest.raises(MismatchError, match=r"float32 baseline.*float64 run"):
        check.pair_candidates([baseline], [drifted, f64])
    with pytest.raises(MismatchError, match="covers 3 epochs"):
        gate.plan_run(baseline, profile="full")
    with pytest.raises(UsageError, match="two baselines for dtype float32"):
        check.pair_candidates([baseline, baseline], [drifted])


def test_plan_reproduces_the_baseline_configuration_with_overrides(baseline):
    spec, config = gate.plan_run(baseline)
    assert spec.hash == baseline.fingerprint.spec.hash and config.epochs == EPOCHS
    assert config.controls.threads == 1 and config.controls.dtype == "float32"
    _, config = gate.plan_run(baseline, threads=2, isa="default", epochs=2)
    assert (config.controls.threads, config.controls.isa, config.epochs) == (2, "default", 2)
    with pytest.raises(UsageError, match="--profile or --epochs"):
        gate.plan_run(baseline, profile="smoke", epochs=2)
    assert gate.profile_epochs("smoke", 1000) == gate.SMOKE_EPOCHS and gate.profile_epochs("full", 1000) == 1000
    with pytest.raises(UsageError, match="--profile 'nightly'"):
        gate.profile_epochs("nightly", 1000)


# --------------------------------------------------------------------------- bits

def _divergence_block(layers: list[str], rows: list[int], correct: np.ndarray) -> dict:
    """A block in bnaudit.divergence's format, built here from its documented fields."""
    series = [{"layer": name, "kind": "linear", "what": "weights", "half_bits_row": None,
               "half_bits_kept_row": None} for name in layers]
    b64 = lambda a, dt: base64.b64encode(np.ascontiguousarray(a, dtype=dt).tobytes()).decode()  # noqa: E731
    zeros = np.zeros((len(layers), len(rows)))
    return {"schema": "bnaudit.divergence/1", "reference": {}, "storage": "float32", "precision_bits": 24,
            "rows": rows, "series": series, "max_abs": b64(zeros, "<f4"), "max_rel": b64(zeros, "<f4"),
            "max_ulps": b64(zeros, "<f4"), "correct_bits": b64(correct, "<f2")}


def _with_block(fp: record.Fingerprint, block: dict | None) -> record.Fingerprint:
    """The run as a loader gives it with this divergence block in its extra (decoded once, as at load)."""
    extra = {k: v for k, v in fp.extra.items() if k != "divergence"}
    if block is None:
        return dataclasses.replace(fp, extra=extra, divergence=None)
    return dataclasses.replace(fp, extra={**extra, "divergence": block},
                               divergence=DivergenceBlock.from_json(block, fp.source))


def test_bits_policy_reads_the_fewest_correct_bits(baseline, drifted):
    correct = np.array([[24.0, 20.5, 17.25, 15.0], [24.0, 22.0, 19.0, 12.5]])  # (series, rows)
    run = _with_block(drifted, _divergence_block(["linear1", "bn1"], [0, 1, 2, 3], correct))
    case = check.check_case(baseline, run, check.parse_tolerance("bits:12"))
    assert case.verdict is check.Verdict.WITHIN
    assert case.measured is not None and (case.measured.value, case.measured.layer, case.measured.row) == (
        12.5, "bn1 weights", 3)
    assert check.check_case(baseline, run, check.parse_tolerance("bits:13")).verdict is check.Verdict.INACCURATE
    with pytest.raises(UsageError, match="at most 24 bits"):
        check.check_case(baseline, run, check.parse_tolerance("bits:25"))


def test_bits_policy_without_a_reference_is_an_error_never_a_pass(baseline, base_run, drifted):
    for fp in (record.load(base_run), drifted):  # identical to the baseline or not: no reference, no verdict
        with pytest.raises(ReferenceFailure, match="no divergence from the mpmath reference"):
            check.check_case(baseline, _with_block(fp, None), check.parse_tolerance("bits:8"))
    empty = _with_block(drifted, _divergence_block([], [], np.zeros((0, 0))))
    with pytest.raises(ReferenceFailure, match=r"measured no epoch$"):
        check.check_case(baseline, empty, check.parse_tolerance("bits:8"))
    with pytest.raises(UsageError, match="accept-class"):
        check.run_check([(baseline, drifted)], check.parse_tolerance("bits:8"), accept=[drifted])


def test_a_malformed_divergence_block_fails_at_load_exit_3(drifted_run, tmp_path):
    """No check reads a block the loader did not decode: a malformed one is unusable input (InputError, exit 3)."""
    raw = json.loads((drifted_run / "fingerprint.json").read_text())
    raw["extra"]["divergence"] = {"schema": "bnaudit.divergence/1", "rows": "x"}
    raw["content_sha256"] = record.content_sha256(raw)  # sealed: only the block is wrong
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="divergence block") as exc:
        record.load(path)
    assert int(exc.value.exit_code) == 3


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    """A real mpmath reference of the default spec's first epoch (192 bits, certified at 256; about 10 s).

    The stored reference is used when there is one; otherwise this one is built in a temporary folder.
    """
    from bnaudit import frozen
    from bnaudit.reference import build, store
    from bnaudit.spec import default_spec

    spec = default_spec()
    if store.exists(spec):
        return store.load(spec)
    return build.build(spec, frozen.load(spec), tmp_path_factory.mktemp("reference") / "ref", precision=192,
                       check_precision=256, epochs=1)


@pytest.mark.parametrize("threads", [1, 2])
def test_bits_policy_on_a_real_reference(make_run, baseline, small_reference, threads):
    """The run's measured divergence from mpmath decides bits:N: its fewest bits pass, one more fails.

    Independent check of the minimum: recomputed here from the record's parameters and the
    reference's double-double values (normwise over each layer's weight and bias).
    """
    from bnaudit import divergence

    rec = record.load_record(make_run(EPOCHS, threads=threads))
    block = divergence.from_record(rec, reference=small_reference)
    assert block is not None and block["rows"][:2] == [0, 1]
    fp = _with_block(rec.fingerprint, block)
    hi, lo = small_reference.section("params")
    params = rec.arrays["params"].astype(np.float64)
    slices = rec.layout.param_slices()
    measured = check.reference_bits(fp)
    for name in rec.layout.bn_layers + tuple(f"linear{k}" for k in range(1, 7)):
        cols = np.r_[slices[f"{name}.weight"], slices[f"{name}.bias"]]
        index = small_reference.row_index()
        for row in block["rows"]:
            i = index[row]
            err = np.abs((params[row, cols] - hi[i, cols]) - lo[i, cols]).max()
            scale = np.abs(hi[i, cols]).max()
            want = 24.0 if err == 0 else min(24.0, max(0.0, -np.log2(err / scale)))
            got = measured.correct_bits[measured.names.index(f"{name} weights"), measured.rows.index(row)]
            assert abs(got - want) <= 0.02, (name, row, got, want)  # the block stores bits as float16
    fewest = float(measured.correct_bits.min())
    n = int(np.floor(fewest))
    assert 1 <= n <= 24, fewest
    case = check.check_case(baseline, fp, check.Tolerance(check.Policy.BITS, n))
    assert case.passed and case.measured is not None and case.measured.value == fewest
    if n < 24:
        assert not check.check_case(baseline, fp, check.Tolerance(check.Policy.BITS, n + 1)).passed


def test_check_and_its_reports_import_neither_torch_nor_mpmath():
    """A light CI job runs check without torch: the modules must not pull it (or mpmath) in.

    Nor do they import ``launch``: only ``gate`` starts runs, and it imports ``launch`` when one starts.
    """
    import subprocess
    import sys

    code = ("import sys, bnaudit.check, bnaudit.baseline, bnaudit.gate, bnaudit.report.junit, "
            "bnaudit.report.ci_summary; "
            "heavy = sorted(m for m in ('torch', 'mpmath', 'bnaudit.launch') if m in sys.modules); "
            "print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ulps_policy_refuses_a_run_ending_between_compared_rows(make_run, tmp_path):
    """A 4-epoch run against a 5-epoch baseline: parameters are compared at rows 0, 1, 2, 3 only,
    so a drift in epoch 3 would go unseen; the check refuses instead of passing."""
    base = write_baseline(tmp_path / "b5.json", make_run(5), update=False)
    run4 = record.load(make_run(4, perturb="linear1.weight[0,0]:1"))
    with pytest.raises(UsageError) as exc:
        check.check_case(base, run4, check.parse_tolerance("ulps:1000000000"))
    assert exc.value.message == ("--tolerance ulps:1000000000 compares parameters after epochs 0, 1, 2, 3 (0: the "
                                 "initial state); a 4-epoch run ends between them: check one of those lengths (e.g. "
                                 "--profile smoke)")


def test_the_key_never_reaches_a_run_or_a_baseline(base_run, tmp_path, monkeypatch):
    """A run records every BNAUDIT_ variable of its environment: the run a baseline or check starts gets no key,
    and a record that holds the key (made by a run with the key exported) is not signed into a baseline."""
    monkeypatch.setenv("BNAUDIT_SIGNING_KEY", KEY.decode())
    made = gate.make_baseline(tmp_path / "run.json", options=gate.RunOptions(epochs=1))
    assert made.signature is Signature.VERIFIED
    assert KEY not in Path(made.path).read_bytes()
    raw = json.loads((base_run / "fingerprint.json").read_text())
    raw["environment"]["environment"] = {"BNAUDIT_SIGNING_KEY": KEY.decode()}
    raw["content_sha256"] = record.content_sha256(raw)
    leaky = tmp_path / "leaky" / "fingerprint.json"
    leaky.parent.mkdir()
    leaky.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="holds the value of BNAUDIT_SIGNING_KEY"):
        gate.make_baseline(tmp_path / "leaky.json", source=leaky)
    assert not (tmp_path / "leaky.json").exists()


# --------------------------------------------------------------------------- bits: the recomputed block

def _record_with(src: Path, dst: Path, edit) -> Path:
    """A copy of a record folder with record.json edited and its content_sha256 recomputed (no key needed)."""
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "record.json").read_text())
    edit(meta)
    meta["content_sha256"] = record.record_sha256(meta)
    (dst / "record.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
    return dst


def test_a_block_measured_against_another_reference_is_replaced_and_none_stored_is_exit_8(base_run, tmp_path,
                                                                                          monkeypatch):
    genuine = record.load(base_run)
    if genuine.divergence is None:
        pytest.skip("the run's process measured no divergence (no reference stored for the default spec)")
    assert gate.with_reference(genuine).divergence.to_json() == genuine.divergence.to_json()

    def other_reference(meta):
        block = meta["extra"]["divergence"]
        block["reference"]["digest"] = "0" * 64
        block["correct_bits"] = base64.b64encode(np.full(len(block["series"]) * len(block["rows"]), 24.0,
                                                         "<f2").tobytes()).decode()

    older = record.load(_record_with(base_run, tmp_path / "older", other_reference))
    fresh = gate.with_reference(older).divergence
    assert fresh is not None and fresh.to_json() == genuine.divergence.to_json()  # judged on its arrays
    monkeypatch.setattr(gate.divergence, "from_record", lambda rec, reference=None: None)
    with pytest.raises(ReferenceFailure, match="cannot be recomputed from its arrays") as exc:
        gate.with_reference(genuine)
    assert int(exc.value.exit_code) == 8


# --------------------------------------------------------------------------- every field of a result

def _worst_oracle(baseline, fp) -> tuple[int, int, str]:
    """(ulps, row, layer) of the largest float32 ulp distance, first in (row, layer) order among equals."""
    rows = np.intersect1d(baseline.fingerprint.keyframe_rows, fp.keyframe_rows)
    a, b = _common_snapshots(baseline, fp)
    best = (-1, -1, "")
    for i, row in enumerate(rows):
        offset, layers = 0, {}
        for name, shape in fp.params:
            width = int(np.prod(shape))
            layers.setdefault(name.split(".")[0], []).extend(range(offset, offset + width))
            offset += width
        for layer, cols in layers.items():
            d = _ulps_oracle(a[i, cols], b[i, cols])
            if d > best[0]:
                best = (d, int(row), layer)
    return best


def test_a_case_says_every_field_under_its_documented_name(baseline, drifted):
    from referencing import Registry, Resource

    case = check.check_case(baseline, drifted, check.parse_tolerance("ulps:16"), seconds=2.5)
    ulps, row, layer = _worst_oracle(baseline, drifted)
    d = case.to_dict()
    assert {k: v for k, v in d.items() if k not in ("first_difference", "environment_diff")} == {
        "name": "float32_t1_native_nondet", "dtype": "float32", "baseline": baseline.path,
        "candidate": drifted.source, "candidate_kept": True,
        "epochs": EPOCHS, "baseline_epochs": EPOCHS, "tolerance": "ulps:16",
        "verdict": "drift", "passed": False, "accepted_by": None, "seconds": 2.5,
        "measured": {"value": float(ulps), "row": row, "layer": layer, "rows": [0, 1, 2, 3]}}
    first = d["first_difference"]
    assert first == {"epoch": 0, "step": 0, "phase": "init", "layer": "linear1", "tensor": "linear1.weight",
                     "granularity": first["granularity"], "fraction_differing": 1 / 80, "max_ulps": 1, "row": 0,
                     "elements": 80}
    assert ["config.perturb.tensor", None, "linear1.weight"] in d["environment_diff"]
    assert ["config.perturb.ulps", None, 1] in d["environment_diff"]
    result = check.run_check([(baseline, drifted)], check.parse_tolerance("ulps:16"), seconds=[2.5])
    assert result.to_dict() == {"schema": "bnaudit.check/1", "bnaudit": __version__, "tolerance": "ulps:16",
                                "accept_classes": [], "passed": False, "failed_policy": "ulps:16", "cases": [d]}
    import jsonschema

    registry = Registry().with_resources((uri, Resource.from_contents(s)) for uri, s in schemas.all_schemas().items())
    jsonschema.Draft202012Validator(schemas.load("check"), registry=registry).validate(result.to_dict())


def test_strict_json_values_of_a_difference_or_a_fact():
    assert check._json_value(float("nan")) == "nan" and check._json_value(float("-inf")) == "-inf"
    assert check._json_value(0.25) == 0.25 and check._json_value(3) == 3 and check._json_value("x") == "x"
    assert check._json_value(None) is None


def test_a_case_without_seconds_took_none_and_a_check_names_its_accepted_classes(baseline, drifted, base_run):
    same = record.load(base_run)
    case = check.check_case(baseline, same)
    assert case.seconds == 0.0 and case.to_dict()["seconds"] == 0.0
    assert (case.name, case.dtype, case.epochs, case.baseline_epochs) == ("float32_t1_native_nondet", "float32",
                                                                          EPOCHS, EPOCHS)
    result = check.run_check([(baseline, drifted)], check.parse_tolerance("ulps:16"), accept=[drifted])
    assert result.accept_classes == (drifted.source,) and result.passed and result.tolerance == check.Tolerance(
        check.Policy.ULPS, 16)
    assert result.cases[0].seconds == 0.0 and result.cases[0].accepted_by == drifted.source
    named = check.run_check([(baseline, drifted)], check.parse_tolerance("ulps:16"), accept=[drifted],
                            accept_paths=["classes/a.json"])
    assert named.accept_classes == ("classes/a.json",)
    timed = check.run_check([(baseline, same), (baseline, drifted)], seconds=[1.5, 4.0])
    assert [c.seconds for c in timed.cases] == [1.5, 4.0]


def test_one_configuration_from_several_machines_is_named_by_each_source(baseline, base_run, drifted):
    same = record.load(base_run)
    result = check.run_check([(baseline, same), (baseline, drifted)])
    from bnaudit.baseline import source_name

    assert [c.name for c in result.cases] == [f"float32_t1_native_nondet [{source_name(same.source)}]",
                                              f"float32_t1_native_nondet [{source_name(drifted.source)}]"]
    assert [c.verdict for c in result.cases] == [check.Verdict.IDENTICAL, check.Verdict.DRIFT]
    alone = check.run_check([(baseline, same)])
    assert [c.name for c in alone.cases] == ["float32_t1_native_nondet"]


def test_a_baseline_shorter_than_the_run_and_an_unmatched_dtype_say_what_to_do(baseline, make_run, drifted):
    longer = record.load(make_run(EPOCHS + 2))
    with pytest.raises(MismatchError) as exc:
        check.check_case(baseline, longer)
    assert exc.value.message == (f"{baseline.path} covers {EPOCHS} epochs, the run {EPOCHS + 2}: make a longer "
                                 "baseline or check fewer epochs (--profile smoke, --epochs N)")
    f64 = record.load(make_run(EPOCHS, dtype="float64"))
    other = dataclasses.replace(baseline, path="f64.json", fingerprint=f64)
    with pytest.raises(MismatchError) as exc:
        check.pair_candidates([baseline, other], [record.load(make_run(2, dtype="bfloat16"))])
    assert exc.value.message.endswith("'s dtype bfloat16 (baselines: float32, float64)")


def test_tolerance_messages_and_the_bounds_they_state():
    with pytest.raises(UsageError) as exc:
        check.parse_tolerance("nearly")
    assert exc.value.message == ("--tolerance 'nearly': expected exact, ulps:N, rel:X, bits:N or dist:RATE "
                                 "(e.g. ulps:16, rel:1e-4, bits:20, dist:0.1)")
    with pytest.raises(UsageError) as exc:
        check.parse_tolerance("ulps:1:2")
    assert exc.value.message == "--tolerance 'ulps:1:2': ulps needs a non-negative whole number, e.g. ulps:16"
    with pytest.raises(UsageError) as exc:
        check.parse_tolerance(f"ulps:{check.MAX_ULPS + 1}")
    assert exc.value.message == (f"--tolerance 'ulps:{check.MAX_ULPS + 1}': ulps must be at most {check.MAX_ULPS} "
                                 "(2^53 - 1); a larger count cannot be measured exactly")
    assert check.parse_tolerance(f"bits:{check.MAX_BITS}") == check.Tolerance(check.Policy.BITS, 64)


def test_each_measure_describes_itself_in_its_policys_words():
    m = check.Measure(value=17.0, row=3, layer="bn2", rows=(0, 1, 2, 3))
    assert m.describe(check.Policy.ULPS) == "max 17 ulps (bn2, after epoch 3)"
    assert m.describe(check.Policy.REL) == "max relative error 17 (bn2, after epoch 3)"
    assert m.describe(check.Policy.BITS) == "fewest correct bits 17.0 (bn2, after epoch 3)"
    assert dataclasses.replace(m, value=2.5e-7).describe(check.Policy.REL) == (
        "max relative error 2.5e-07 (bn2, after epoch 3)")
    # a count is shown rounded down: 10.97 fails bits:11, and must not read "11.0"
    assert dataclasses.replace(m, value=10.97).describe(check.Policy.BITS) == (
        "fewest correct bits 10.9 (bn2, after epoch 3)")
    shown = [bits.correct_bits_text(v) for v in (0.0, 10.97, 11.0, 23.99, 24.0)]
    assert shown == ["0.0", "10.9", "11.0", "23.9", "24.0"]


def test_a_reference_less_run_is_told_how_to_get_one(baseline, drifted):
    with pytest.raises(ReferenceFailure) as exc:
        check.reference_bits(_with_block(drifted, None))
    assert exc.value.message == (f"{drifted.source}: the run carries no divergence from the mpmath reference "
                                 "(is a reference stored for its spec? bnaudit reference build), so bits:N "
                                 "cannot be judged")


def test_bits_boundaries_identity_and_the_dtypes_width(baseline, base_run, drifted):
    correct = np.array([[24.0, 20.0, 13.0, 12.5]])
    run = _with_block(drifted, _divergence_block(["linear1"], [0, 1, 2, 3], correct))
    assert check.check_case(baseline, run, check.parse_tolerance("bits:24")).verdict is check.Verdict.INACCURATE
    assert check.check_case(baseline, _with_block(run, _divergence_block(["linear1"], [0, 1, 2, 3],
                                                                          np.full((1, 4), 24.0))),
                            check.parse_tolerance("bits:24")).verdict is check.Verdict.WITHIN  # 24 of 24 is enough
    exact_limit = _with_block(drifted, _divergence_block(["linear1"], [0, 1, 2, 3], np.full((1, 4), 12.0)))
    assert check.check_case(baseline, exact_limit, check.parse_tolerance("bits:12")).verdict is check.Verdict.WITHIN
    same = _with_block(record.load(base_run), _divergence_block(["linear1"], [0, 1, 2, 3], correct))
    case = check.check_case(baseline, same, check.parse_tolerance("bits:12"))
    assert case.verdict is check.Verdict.IDENTICAL and case.measured is not None and case.measured.value == 12.5
    assert (case.measured.row, case.measured.layer, case.measured.rows) == (3, "linear1 weights", (0, 1, 2, 3))


def test_exact_drift_measures_nothing_and_a_drift_policy_reports_its_worst_row_and_layer(baseline, drifted):
    case = check.check_case(baseline, drifted)
    assert case.verdict is check.Verdict.DRIFT and case.measured is None
    bad = _with_keyframe(drifted, EPOCHS, 0, np.nan)
    assert check.check_case(baseline, bad).measured is None  # exact: non-finite, but nothing measured
    ulps, row, layer = _worst_oracle(baseline, drifted)
    m = check.measure_ulps(baseline.fingerprint, drifted)
    assert (m.value, m.row, m.layer, m.rows) == (ulps, row, layer, (0, 1, 2, 3))


def test_accepted_classes_are_searched_past_those_that_cannot_match(baseline, base_run, drifted, make_run):
    f64 = record.load(make_run(EPOCHS, dtype="float64"))
    short = record.load(make_run(EPOCHS - 1, perturb="linear1.weight[0,0]:1"))
    for skipped in (f64, short):  # another storage dtype, fewer epochs: skipped, not the end of the search
        case = check.check_case(baseline, drifted, check.parse_tolerance("ulps:0"), accept=[skipped, drifted])
        assert case.verdict is check.Verdict.ACCEPTED and case.accepted_by == drifted.source
        assert check.check_case(baseline, drifted, check.parse_tolerance("ulps:0"),
                                accept=[skipped]).verdict is check.Verdict.DRIFT


def test_a_longer_baseline_is_measured_over_the_runs_epochs_only(base_run, make_run, tmp_path):
    long_base = write_baseline(tmp_path / "long.json", make_run(EPOCHS + 2), update=False)
    short = record.load(make_run(EPOCHS, perturb="linear1.weight[0,0]:1"))
    case = check.check_case(long_base, short, check.parse_tolerance(f"ulps:{check.MAX_ULPS}"))
    assert case.verdict is check.Verdict.WITHIN and case.measured is not None
    assert max(case.measured.rows) == EPOCHS and case.baseline_epochs == EPOCHS + 2 and case.epochs == EPOCHS


def test_the_layer_of_a_keyframe_column(drifted):
    widths = [int(np.prod(s)) for _, s in drifted.params]
    assert check._layer_of_column(drifted, 0) == "linear1"
    assert check._layer_of_column(drifted, widths[0] - 1) == "linear1"
    assert check._layer_of_column(drifted, widths[0]) == drifted.params[1][0].split(".")[0]
    assert check._layer_of_column(drifted, sum(widths[:3])) == drifted.params[3][0].split(".")[0]
    assert check._layer_of_column(drifted, sum(widths)) == "?"


def test_non_finite_parameters_are_read_in_the_runs_storage_dtype(make_run, tmp_path):
    """bfloat16 keyframes are uint16 bit patterns: 0x7fc0 is a NaN only when read as bfloat16."""
    run = make_run(2, dtype="bfloat16")
    base = write_baseline(tmp_path / "bf16.json", run, update=False)
    fp = record.load(run)
    keyframes = fp.keyframes.copy()
    keyframes[-1, 0] = np.uint16(0x7FC0)
    bad = dataclasses.replace(fp, keyframes=keyframes)
    m = check.nonfinite_parameters(base.fingerprint, bad)
    assert m is not None and m.nonfinite and (m.row, m.layer) == (2, "linear1")
    assert check.nonfinite_parameters(base.fingerprint, fp) is None


def test_worst_of_nothing_is_refused_in_words():
    empty = compare.LayerDivergence(rows=(), layers=("linear1",), max_abs=np.zeros((0, 1)),
                                          max_rel=np.zeros((0, 1)), max_ulps=np.zeros((0, 1)))
    with pytest.raises(MismatchError) as exc:
        check._worst(np.zeros((0, 1)), empty)
    assert exc.value.message == "the baseline and the run share no epoch with parameter values"
    no_layers = dataclasses.replace(empty, rows=(0,), layers=(), max_abs=np.zeros((1, 0)))
    with pytest.raises(MismatchError):
        check._worst(np.zeros((1, 0)), no_layers)


def test_a_limit_of_zero_passes_nothing_that_moved(baseline, drifted):
    """ulps:0 and rel:0 against a run one ulp away in one parameter at the last row (its digests differ from row 0)."""
    keyframes = baseline.fingerprint.keyframes.copy()
    keyframes[-1, 5] = np.nextafter(keyframes[-1, 5], np.float32(np.inf))
    one_ulp = dataclasses.replace(drifted, keyframes=keyframes)
    for text, passing in (("ulps:0", "ulps:1"), ("rel:0", "rel:1e-6")):
        case = check.check_case(baseline, one_ulp, check.parse_tolerance(text))
        assert case.verdict is check.Verdict.DRIFT and case.measured is not None and case.measured.value > 0, text
        assert check.check_case(baseline, one_ulp, check.parse_tolerance(passing)).verdict is check.Verdict.WITHIN
    assert check.measure_ulps(baseline.fingerprint, one_ulp).value == 1


def test_parameters_of_another_storage_dtype_are_neither_measured_nor_read_as_non_finite(baseline, make_run):
    f64 = record.load(make_run(EPOCHS, dtype="float64"))
    with pytest.raises(MismatchError) as exc:
        check.measure_ulps(baseline.fingerprint, f64)
    assert exc.value.message == f"{baseline.path} and {f64.source} store parameters in different dtypes"
    keyframes = f64.keyframes.copy()
    keyframes[-1, 0] = np.nan
    assert check.nonfinite_parameters(baseline.fingerprint, dataclasses.replace(f64, keyframes=keyframes)) is None


def test_a_parameter_already_non_finite_in_the_baseline_is_not_the_runs_fault(make_run):
    """bfloat16 keyframes are uint16 patterns: the baseline's are read as bfloat16 too, so a NaN (0x7fc0) or an
    infinity (0xff80) the baseline already stores there is not a new non-finite parameter of the run."""
    fp = record.load(make_run(2, dtype="bfloat16"))
    widths = [int(np.prod(s)) for _, s in fp.params]
    second = next(k for k, (name, _) in enumerate(fp.params) if not name.startswith("linear1."))
    other_col = sum(widths[:second])
    other_layer = fp.params[second][0].split(".")[0]
    last = int(np.flatnonzero(fp.keyframe_rows == 2)[0])
    base_kf, cand_kf = fp.keyframes.copy(), fp.keyframes.copy()
    base_kf[last, 0], cand_kf[last, 0] = np.uint16(0x7FC0), np.uint16(0x7FC0)
    base_kf[last, 1], cand_kf[last, 1] = np.uint16(0xFF80), np.uint16(0xFF80)
    base = dataclasses.replace(fp, keyframes=base_kf)
    assert check.nonfinite_parameters(base, dataclasses.replace(fp, keyframes=cand_kf)) is None
    cand_kf[last, other_col] = np.uint16(0x7F80)  # +inf, where the baseline's is finite
    m = check.nonfinite_parameters(base, dataclasses.replace(fp, keyframes=cand_kf))
    assert m is not None and m.nonfinite and m.value == float("inf")
    assert (m.row, m.layer, m.rows) == (2, other_layer, (0, 1, 2))


def test_only_configurations_checked_more_than_once_are_named_by_source(baseline, base_run, drifted, make_run):
    """Two candidates of one configuration get their source in their names; a third of another keeps its name."""
    from bnaudit.baseline import source_name

    same = record.load(base_run)
    f64 = record.load(make_run(EPOCHS, dtype="float64"))
    f64_baseline = dataclasses.replace(baseline, path="f64.json", fingerprint=f64)
    result = check.run_check([(baseline, same), (f64_baseline, f64), (baseline, drifted)])
    assert [c.name for c in result.cases] == [f"float32_t1_native_nondet [{source_name(same.source)}]",
                                              "float64_t1_native_nondet",
                                              f"float32_t1_native_nondet [{source_name(drifted.source)}]"]
    assert [c.verdict for c in result.cases] == [check.Verdict.IDENTICAL, check.Verdict.IDENTICAL,
                                                 check.Verdict.DRIFT]
    assert [c.candidate for c in result.cases] == [same.source, f64.source, drifted.source]


def test_environment_differences_are_written_with_both_values(baseline, drifted):
    """Each environment difference is [key, baseline value, candidate value], non-finite floats as strings."""
    case = dataclasses.replace(check.check_case(baseline, drifted), environment_diff=(
        ("threads", 1, 2), ("cpu_model", "a", "b"), ("loss_scale", float("nan"), 0.5), ("x", float("-inf"), None)))
    assert case.to_dict()["environment_diff"] == [["threads", 1, 2], ["cpu_model", "a", "b"],
                                                  ["loss_scale", "nan", 0.5], ["x", "-inf", None]]
    json.dumps(case.to_dict(), allow_nan=False)  # strict JSON
