"""bnaudit check, the library: tolerance parsing, baseline files, prefixes, and every policy on real runs.

Runs are real (``make_run``, a few epochs each, shared with other test files).  Expected
values come from independent computations in this file (ulp distances from int32 bit
patterns, relative errors in float64), never from the code under test.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnaudit import check, record
from bnaudit.errors import InputError, MismatchError, OutputError, ReferenceFailure, UsageError

EPOCHS = 3  # shared with tests/test_run.py's runs


@pytest.fixture(scope="module")
def base_run(make_run):
    return make_run(EPOCHS)


@pytest.fixture(scope="module")
def t2_run(make_run):
    return make_run(EPOCHS, threads=2)


@pytest.fixture(scope="module")
def baseline(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "float32.json"
    return check.write_baseline(out, base_run, update=False)


@pytest.fixture(scope="module")
def t2(t2_run, baseline):
    fp = record.load(t2_run)
    if fp.digest == baseline.fingerprint.digest:
        pytest.skip("on this machine 2 threads give the same float32 bits as 1")
    return fp


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


@given(st.integers(min_value=0, max_value=10**18))
def test_every_whole_number_of_ulps_parses_exactly(n):
    assert check.parse_tolerance(f"ulps:{n}").limit == n


# --------------------------------------------------------------------------- baselines

def test_baseline_round_trips_and_is_a_fingerprint(baseline, base_run):
    fp = record.load(base_run)
    assert baseline.fingerprint.digest == fp.digest
    assert baseline.dtype == "float32" and baseline.made_from == base_run.name
    # The baseline file is itself a fingerprint: record.load (what bnaudit compare uses) reads it.
    again = record.load(baseline.path)
    assert again.digest == fp.digest
    assert again.snapshots.tobytes() == fp.snapshots[np.isin(fp.snapshot_rows, again.snapshot_rows)].tobytes()
    assert again.environment == fp.environment
    raw = json.loads(open(baseline.path).read())
    assert raw["extra"]["baseline"]["schema"] == check.BASELINE_SCHEMA


def test_create_refuses_an_existing_file_and_leaves_no_partial_files(baseline, base_run):
    before = sorted(os.listdir(os.path.dirname(baseline.path)))
    with pytest.raises(OutputError, match="already exists"):
        check.write_baseline(baseline.path, base_run, update=False)
    assert sorted(os.listdir(os.path.dirname(baseline.path))) == before == ["float32.json"]


def test_update_keeps_creation_time_and_refuses_another_experiment(base_run, make_run, tmp_path):
    out = tmp_path / "b.json"
    with pytest.raises(InputError, match="no baseline to update"):
        check.write_baseline(out, base_run, update=True)
    first = check.write_baseline(out, base_run, update=False)
    again = check.write_baseline(out, base_run, update=True)
    assert again.created == first.created and again.updated is not None
    other = make_run(EPOCHS, dtype="float64")
    with pytest.raises(MismatchError, match=r"another experiment.*dtype float32 vs float64"):
        check.write_baseline(out, other, update=True)
    assert check.load_baseline(out).dtype == "float32"  # untouched
    forced = check.write_baseline(out, other, update=True, force=True)
    assert forced.dtype == "float64"
    assert sorted(os.listdir(tmp_path)) == ["b.json"]


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
    (lambda d: d["extra"].pop("baseline"), "a fingerprint, not a baseline"),
    (lambda d: d["extra"]["baseline"].update(schema="bnaudit.baseline/9"), "is not bnaudit.baseline/1"),
    (lambda d: d["extra"]["baseline"].update(sha256=7), "'sha256' is missing or malformed"),
    (lambda d: d.clear(), "not a bnaudit baseline"),
])
def test_edited_baselines_are_refused(baseline, tmp_path, edit, message):
    with pytest.raises(InputError, match=message):
        check.load_baseline(_edit(Path(baseline.path), tmp_path, edit))


def test_unreadable_baselines_are_refused(baseline, tmp_path):
    text = open(baseline.path, "rb").read()
    (tmp_path / "cut.json").write_bytes(text[: len(text) // 2])
    with pytest.raises(InputError, match="not JSON"):
        check.load_baseline(tmp_path / "cut.json")
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(record.MAX_JSON_BYTES + 1)
    with pytest.raises(InputError, match="larger than any baseline"):
        check.load_baseline(big)
    with pytest.raises(InputError, match="cannot read"):
        check.load_baseline(tmp_path / "missing.json")
    with pytest.raises(InputError, match="is a folder"):
        check.load_baseline(tmp_path)


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
        loaded = check.load_baseline(path)
    except InputError:
        return
    a, b = loaded.fingerprint, baseline.fingerprint
    assert a.digest == b.digest and a.snapshots.tobytes() == b.snapshots.tobytes()
    assert a.train_loss.tobytes() == b.train_loss.tobytes() and a.config == b.config
    assert a.environment == b.environment


# --------------------------------------------------------------------------- prefixes

def test_a_prefix_of_a_longer_run_is_the_shorter_run(make_run):
    """truncate(run of 3 epochs, 2) must be bit for bit the run of 2 epochs: what lets one baseline serve all."""
    short = record.load(make_run(2))
    cut = check.truncate(record.load(make_run(EPOCHS)), 2)
    assert cut.digest == short.digest
    assert np.array_equal(cut.row_digests, short.row_digests)
    assert np.array_equal(cut.step_rows, short.step_rows) and np.array_equal(cut.step_digests, short.step_digests)
    assert cut.snapshots.tobytes() == short.snapshots.tobytes()
    with pytest.raises(MismatchError):
        check.truncate(short, EPOCHS)


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
    rows = np.intersect1d(baseline.fingerprint.snapshot_rows, fp.snapshot_rows)
    a = baseline.fingerprint.snapshots[np.isin(baseline.fingerprint.snapshot_rows, rows)]
    b = fp.snapshots[np.isin(fp.snapshot_rows, rows)]
    return a, b


def test_same_machine_passes_exact(baseline, base_run):
    case = check.check_case(baseline, record.load(base_run))
    assert case.verdict is check.Verdict.IDENTICAL and case.passed and case.first is None


def test_two_threads_fail_exact_at_the_first_step(baseline, t2):
    case = check.check_case(baseline, t2)
    assert case.verdict is check.Verdict.DRIFT and not case.passed
    assert case.first is not None and (case.first.epoch, case.first.step) == (0, 0), case.first
    assert case.first.phase == "forward"
    assert any(k == "config.controls.threads" and (a, b) == (1, 2) for k, a, b in case.environment_diff)
    result = check.CheckResult(tolerance=check.EXACT, accept_classes=(), cases=(case,))
    assert result.failed_policy == "exact" and result.first == case.first and int(result.exit_code) == 1


def test_ulps_policy_boundary_is_the_measured_drift(baseline, t2):
    """Measured drift D (ulps, float32): ulps:D passes, ulps:D-1 fails, and the loose policy passes.

    The loose policy is the smallest power of two at or above D: ulps:2^m means every
    parameter keeps its leading 24-m significand bits (within its binade), the way a
    team would state what it trusts.  On this machine D is about 2^21 after 3 epochs
    (threads change the order of every BatchNorm reduction, from the first step on).
    """
    d = _ulps_oracle(*_common_snapshots(baseline, t2))
    assert d > 0
    loose = 1 << (d - 1).bit_length()
    for n, verdict in ((loose, check.Verdict.WITHIN), (d, check.Verdict.WITHIN), (d - 1, check.Verdict.DRIFT)):
        case = check.check_case(baseline, t2, check.parse_tolerance(f"ulps:{n}"))
        assert case.verdict is verdict, (n, d)
        assert case.measured is not None and case.measured.value == d
    assert case.first is not None  # a policy failure still names the first divergence


def test_rel_policy_boundary_is_the_measured_drift(baseline, t2):
    r = _rel_oracle(*_common_snapshots(baseline, t2))
    assert 0 < r < np.inf
    assert check.check_case(baseline, t2, check.parse_tolerance(f"rel:{r!r}")).verdict is check.Verdict.WITHIN
    below = float(np.nextafter(r, 0.0))
    assert check.check_case(baseline, t2, check.Tolerance(check.Policy.REL, below)).verdict is check.Verdict.DRIFT


def test_accept_class_passes_and_names_the_class(baseline, t2, base_run):
    case = check.check_case(baseline, t2, accept=[record.load(base_run), t2])
    assert case.verdict is check.Verdict.ACCEPTED and case.accepted_by == t2.source
    assert check.check_case(baseline, t2, accept=[record.load(base_run)]).verdict is check.Verdict.DRIFT


def test_refused_comparisons(baseline, make_run, t2):
    f64 = record.load(make_run(EPOCHS, dtype="float64"))
    with pytest.raises(MismatchError, match=r"float32 baseline.*float64 run"):
        check.check_case(baseline, f64)
    with pytest.raises(MismatchError, match=r"float32 baseline.*float64 run"):
        check.pair_candidates([baseline], [t2, f64])
    with pytest.raises(MismatchError, match="covers 3 epochs"):
        check.plan_run(baseline, profile="full")
    with pytest.raises(UsageError, match="two baselines for dtype float32"):
        check.pair_candidates([baseline, baseline], [t2])


def test_plan_reproduces_the_baseline_configuration_with_overrides(baseline):
    spec, config = check.plan_run(baseline)
    assert spec.hash == baseline.fingerprint.spec.hash and config.epochs == EPOCHS
    assert config.controls.threads == 1 and config.controls.dtype == "float32"
    _, config = check.plan_run(baseline, threads=2, isa="default", epochs=2)
    assert (config.controls.threads, config.controls.isa, config.epochs) == (2, "default", 2)
    with pytest.raises(UsageError, match="--profile or --epochs"):
        check.plan_run(baseline, profile="smoke", epochs=2)


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


def test_bits_policy_reads_the_fewest_correct_bits(baseline, t2):
    correct = np.array([[24.0, 20.5, 17.25, 15.0], [24.0, 22.0, 19.0, 12.5]])  # (series, rows)
    run = dataclasses.replace(t2, extra={"divergence": _divergence_block(["linear1", "bn1"], [0, 1, 2, 3], correct)})
    case = check.check_case(baseline, run, check.parse_tolerance("bits:12"))
    assert case.verdict is check.Verdict.WITHIN
    assert case.measured is not None and (case.measured.value, case.measured.layer, case.measured.row) == (
        12.5, "bn1 weights", 3)
    assert check.check_case(baseline, run, check.parse_tolerance("bits:13")).verdict is check.Verdict.INACCURATE
    with pytest.raises(UsageError, match="at most 24 bits"):
        check.check_case(baseline, run, check.parse_tolerance("bits:25"))


def test_bits_policy_without_a_reference_is_an_error_never_a_pass(baseline, base_run, t2):
    for fp in (record.load(base_run), t2):  # identical to the baseline or not: no reference, no verdict
        with pytest.raises(ReferenceFailure, match="no divergence from the mpmath reference"):
            check.check_case(baseline, dataclasses.replace(fp, extra={}), check.parse_tolerance("bits:8"))
    broken = dataclasses.replace(t2, extra={"divergence": {"schema": "bnaudit.divergence/1", "rows": "x"}})
    with pytest.raises(InputError, match="divergence block"):
        check.check_case(baseline, broken, check.parse_tolerance("bits:8"))
    with pytest.raises(UsageError, match="accept-class"):
        check.run_check([(baseline, t2)], check.parse_tolerance("bits:8"), accept=[t2])


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
    fp = dataclasses.replace(rec.fingerprint, extra={"divergence": block})
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
            got = measured.bits[measured.series.index(f"{name} weights"), measured.rows.index(row)]
            assert abs(got - want) <= 0.02, (name, row, got, want)  # the block stores bits as float16
    fewest = float(measured.bits.min())
    n = int(np.floor(fewest))
    assert 1 <= n <= 24, fewest
    case = check.check_case(baseline, fp, check.Tolerance(check.Policy.BITS, n))
    assert case.passed and case.measured is not None and case.measured.value == fewest
    if n < 24:
        assert not check.check_case(baseline, fp, check.Tolerance(check.Policy.BITS, n + 1)).passed


def test_check_and_its_reports_import_neither_torch_nor_mpmath():
    """A light CI job runs check without torch: the modules must not pull it (or mpmath) in."""
    import subprocess
    import sys

    code = ("import sys, bnaudit.check, bnaudit.report.junit, bnaudit.report.ci_summary; "
            "heavy = sorted(m for m in ('torch', 'mpmath') if m in sys.modules); print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ulps_policy_refuses_a_run_ending_between_compared_rows(make_run, tmp_path):
    """A 4-epoch run against a 5-epoch baseline: parameters are compared at rows 0, 1, 2, 3 only,
    so a drift in epoch 3 would go unseen; the check refuses instead of passing."""
    base = check.write_baseline(tmp_path / "b5.json", make_run(5), update=False)
    run4 = record.load(make_run(4, threads=2))
    if run4.digest == check.truncate(base.fingerprint, 4).digest:
        pytest.skip("this machine gives identical bits for 1 and 2 threads")
    with pytest.raises(UsageError, match="ends between them"):
        check.check_case(base, run4, check.parse_tolerance("ulps:1000000000"))
