"""bnaudit check: is a run within a chosen policy of a committed baseline?

A **baseline** is a fingerprint file (``bnaudit.fingerprint/1``, so ``bnaudit compare``
reads it as is) with one more block, ``extra["baseline"]``: when and from what it was
made, and the sha256 of the rest of the file.  The fingerprint already carries the
environment the run came from (CPU, ISA, threads, library versions), the controls it
asked for and the ones it got, its digests and exact parameters at the epoch rows
``record.fingerprint_rows(epochs)`` (0, 1, 2, 3, 5, 10, 20, ..., epochs).  The digest
only covers digests; the sha256 also covers the parameter snapshots and losses, so an
edited baseline never loads (the ulps and rel policies read those snapshots).

A check compares a **candidate** (a fresh run, or a given record) with a baseline of the
same experiment and run dtype.  The candidate may be shorter than the baseline: the
baseline is then cut to the candidate's epochs (its digest recomputed over that prefix;
a run's first epochs do not depend on how many follow), so one full-length baseline
serves the smoke check of every commit and the full nightly check.

Policies (``--tolerance``):

exact      the digests are equal: every traced tensor bit for bit.
ulps:N     at every epoch row both fingerprints carry parameters for, every parameter
           is within N ulps of the baseline's, counted in the run's storage dtype.
rel:X      at those rows, every parameter's relative difference |a - b| / max(|a|, |b|)
           is at most X.  Both are the per-layer tables ``bnaudit compare`` prints
           (``compare.layer_divergence``), so a limit can be read off a comparison.
bits:N     an accuracy policy, not a drift policy: every layer of the candidate keeps at
           least N correct bits relative to the mpmath reference at every epoch it was
           measured (the run's ``extra["divergence"]`` block).  A run without that block
           is an error (exit 8), never a pass; being identical to the baseline is not
           enough, since the baseline itself can be wrong.

``--accept-class FILE...`` (drift policies only): a candidate bit-identical to any of
these fingerprints passes, and the result names which.

numpy only: no torch, no mpmath.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import __version__, bits, compare, divergence, record
from bnaudit.controls import Controls, RunConfig
from bnaudit.errors import (
    ExitCode,
    InputError,
    MismatchError,
    OutputError,
    ReferenceFailure,
    UsageError,
)
from bnaudit.record import Fingerprint
from bnaudit.spec import ExperimentSpec

BASELINE_SCHEMA = "bnaudit.baseline/1"
CHECK_SCHEMA = "bnaudit.check/1"

SMOKE_EPOCHS = 5
"""Epochs of the smoke profile: fingerprint rows 0, 1, 2, 3 and 5 carry exact parameters, and a
whole check stays under the 15 s target on the project's 2-core machine
(benchmarks/bench_check_smoke.py)."""
PROFILES = ("smoke", "full")


# --------------------------------------------------------------------------- policies

class Policy(enum.Enum):
    """What a check measures."""

    EXACT = "exact"
    ULPS = "ulps"
    REL = "rel"
    BITS = "bits"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A policy and its limit, as the user wrote it."""

    policy: Policy
    """exact, ulps, rel or bits."""
    limit: int | float | None
    """N for ulps and bits, X for rel, None for exact."""

    def __str__(self) -> str:
        if self.policy is Policy.EXACT:
            return "exact"
        if self.policy is Policy.REL:
            return f"rel:{self.limit:g}"
        return f"{self.policy.value}:{self.limit}"

    @property
    def is_drift(self) -> bool:
        """Measured against the baseline (exact, ulps, rel), not against the reference (bits)."""
        return self.policy is not Policy.BITS


EXACT = Tolerance(Policy.EXACT, None)

_INT = re.compile(r"^(0|[1-9][0-9]{0,18})$")
_REAL = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?$")
MAX_BITS = 64


def parse_tolerance(text: str) -> Tolerance:
    """Parse ``exact``, ``ulps:N``, ``rel:X`` or ``bits:N`` strictly (UsageError otherwise)."""
    usage = "expected exact, ulps:N, rel:X or bits:N (e.g. ulps:16, rel:1e-4, bits:20)"
    raw = text.strip()
    if raw == "exact":
        return EXACT
    kind, sep, value = raw.partition(":")
    if not sep or kind not in ("ulps", "rel", "bits"):
        raise UsageError(f"--tolerance {text!r}: {usage}")
    if kind in ("ulps", "bits"):
        if not _INT.match(value):
            raise UsageError(f"--tolerance {text!r}: {kind} needs a non-negative whole number, e.g. {kind}:16")
        n = int(value)
        if kind == "ulps" and n >= int(bits.NAN_DISTANCE):
            raise UsageError(f"--tolerance {text!r}: ulps limit too large")
        if kind == "bits" and not 1 <= n <= MAX_BITS:
            raise UsageError(f"--tolerance {text!r}: bits must be between 1 and {MAX_BITS}")
        return Tolerance(Policy.ULPS if kind == "ulps" else Policy.BITS, n)
    if not _REAL.match(value):
        raise UsageError(f"--tolerance {text!r}: rel needs a finite non-negative number, e.g. rel:1e-4")
    x = float(value)
    if not math.isfinite(x):
        raise UsageError(f"--tolerance {text!r}: rel needs a finite non-negative number")
    return Tolerance(Policy.REL, x)


def profile_epochs(profile: str, spec_epochs: int) -> int:
    """Epochs run by a profile: smoke (a few epochs) or full (the spec's)."""
    if profile == "smoke":
        return min(SMOKE_EPOCHS, spec_epochs)
    if profile == "full":
        return spec_epochs
    raise UsageError(f"--profile {profile!r}: choose smoke or full")


# --------------------------------------------------------------------------- baselines

@dataclasses.dataclass(frozen=True)
class Baseline:
    """A loaded, verified baseline file."""

    path: str
    """Where it was loaded from."""
    fingerprint: Fingerprint
    """The run it vouches for."""
    created: str
    """When it was first written (UTC, ISO 8601)."""
    updated: str | None
    """When it was last replaced by ``baseline update``, or None."""
    made_from: str
    """Name of the record or fingerprint it was made from (no path)."""

    @property
    def dtype(self) -> str:
        return run_dtype(self.fingerprint)


def run_dtype(fp: Fingerprint) -> str:
    """The run dtype a fingerprint asked for (float32, float64, bfloat16, bf16-mixed)."""
    c = fp.config.get("controls")
    dtype = c.get("dtype") if isinstance(c, dict) else None
    if not isinstance(dtype, str):
        raise InputError(f"{fp.source}: config names no run dtype")
    return dtype


def case_name(fp: Fingerprint) -> str:
    """A short name of a run's configuration, e.g. float32_t1_native_nondet."""
    raw = fp.config.get("controls")
    fields = {f.name for f in dataclasses.fields(Controls)}
    if isinstance(raw, dict) and set(raw) <= fields:
        try:
            return Controls(**raw).label()
        except TypeError:
            pass
    return fp.label


def source_name(source: str) -> str:
    """A short name for where a run came from: its record folder, or the folder of its fingerprint file."""
    path = Path(source)
    if path.name in ("fingerprint.json", "record.json") and path.parent.name:
        return path.parent.name
    return path.name or source


def _canonical_sha256(raw: dict[str, Any]) -> str:
    """sha256 of a fingerprint dict with its baseline block removed, keys sorted, compact."""
    body = dict(raw)
    extra = dict(body.get("extra") or {})
    extra.pop("baseline", None)
    body["extra"] = extra
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def load_baseline(path: Path | str) -> Baseline:
    """Load a baseline file: its baseline block, its sha256, then the fingerprint field by field."""
    path = Path(path)
    where = str(path)
    raw = record.read_json(path, "baseline")
    extra = raw.get("extra")
    block = extra.get("baseline") if isinstance(extra, dict) else None
    if block is None:
        if raw.get("schema") in (record.FINGERPRINT_SCHEMA, record.RECORD_SCHEMA):
            raise InputError(f"{where}: a fingerprint, not a baseline; make one with "
                             f"bnaudit baseline create --record {path.name} --out FILE")
        raise InputError(f"{where}: not a bnaudit baseline (no baseline block)")
    if not isinstance(block, dict) or block.get("schema") != BASELINE_SCHEMA:
        found = block.get("schema") if isinstance(block, dict) else None
        raise InputError(f"{where}: baseline schema {str(found)[:40]!r} is not {BASELINE_SCHEMA}")
    fields: dict[str, str | None] = {}
    for key, optional in (("created", False), ("updated", True), ("made_from", False), ("sha256", False)):
        value = block.get(key)
        if value is None and optional:
            fields[key] = None
        elif not isinstance(value, str) or len(value) > 300:
            raise InputError(f"{where}: baseline field {key!r} is missing or malformed")
        else:
            fields[key] = value
    if _canonical_sha256(raw) != fields["sha256"]:
        raise InputError(f"{where}: content does not match its sha256 (edited or corrupt baseline)")
    if raw.get("schema") != record.FINGERPRINT_SCHEMA:
        raise InputError(f"{where}: schema {str(raw.get('schema'))[:40]!r} is not {record.FINGERPRINT_SCHEMA}")
    fp = record.read_fingerprint(path)
    return Baseline(path=where, fingerprint=fp, created=str(fields["created"]), updated=fields["updated"],
                    made_from=str(fields["made_from"]))


def _source_fingerprint_file(source: Path) -> Path:
    """The fingerprint JSON of a record folder, record.json or fingerprint file."""
    if source.is_dir():
        return source / "fingerprint.json"
    if source.name == "record.json":
        return source.parent / "fingerprint.json"
    return source


def baseline_dict(source: Path, *, created: str | None = None, updated: str | None = None) -> dict[str, Any]:
    """The baseline JSON for a record folder or fingerprint file (verified before it is copied)."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    fp_file = _source_fingerprint_file(source)
    if fp_file != source:  # a record: verify every array and the record's digest as well
        full = record.load(source)
        if record.read_fingerprint(fp_file).digest != full.digest:
            raise InputError(f"{fp_file}: does not match its record (edited or corrupt)")
    raw = record.read_json(fp_file, "fingerprint")
    if raw.get("schema") != record.FINGERPRINT_SCHEMA:
        raise InputError(f"{fp_file}: schema {str(raw.get('schema'))[:40]!r} is not {record.FINGERPRINT_SCHEMA}")
    record.read_fingerprint(fp_file)  # field by field, digest recomputed
    extra = raw.get("extra")
    raw["extra"] = {k: v for k, v in extra.items() if k != "baseline"} if isinstance(extra, dict) else {}
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    name = source_name(str(fp_file))
    block = {"schema": BASELINE_SCHEMA, "bnaudit": __version__, "created": created or now,
             "updated": updated, "made_from": name[:200], "sha256": _canonical_sha256(raw)}
    raw["extra"] = dict(raw["extra"], baseline=block)
    return raw


def write_baseline(out: Path, source: Path, *, update: bool, force: bool = False) -> Baseline:
    """Write ``out`` as the baseline of ``source`` atomically.

    create (update=False) refuses an existing file unless forced.  update refuses a missing
    file, and one that is unreadable or of another experiment (spec, frozen inputs, run
    dtype) unless forced; it keeps the original creation time.
    """
    out = Path(out)
    created: str | None = None
    updated: str | None = None
    if update:
        if not out.exists():
            raise InputError(f"{out}: no baseline to update; make one with bnaudit baseline create")
        new = record.load(_source_fingerprint_file(Path(source)))
        try:
            old = load_baseline(out)
        except InputError as exc:
            if not force:
                raise InputError(f"{exc.message} (pass --force to replace it)") from None
            old = None
        if old is not None:
            problems = _experiment_differences(old.fingerprint, new)
            if problems and not force:
                raise MismatchError(f"{out} is a baseline of another experiment ({'; '.join(problems)}); "
                                    "pass --force to replace it")
            created = old.created
        updated = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    elif out.exists() and not force:
        raise OutputError(f"{out} already exists; use bnaudit baseline update, or --force")
    raw = baseline_dict(Path(source), created=created, updated=updated)
    text = json.dumps(raw, sort_keys=True, indent=1, allow_nan=False) + "\n"
    record.write_text_atomic(out, text)
    return load_baseline(out)


def _experiment_differences(a: Fingerprint, b: Fingerprint) -> list[str]:
    out = []
    if a.spec.hash != b.spec.hash:
        out.append(f"spec {a.spec.short_hash} vs {b.spec.short_hash}")
    if a.frozen != b.frozen:
        out.append(f"frozen inputs {a.frozen[:12]} vs {b.frozen[:12]}")
    if run_dtype(a) != run_dtype(b):
        out.append(f"dtype {run_dtype(a)} vs {run_dtype(b)}")
    return out


# --------------------------------------------------------------------------- prefixes

def truncate(fp: Fingerprint, epochs: int) -> Fingerprint:
    """The fingerprint of the first ``epochs`` epochs of a run (digest recomputed over them).

    The training of epoch e depends only on what came before it, so a prefix of a longer
    run is bit for bit the run of fewer epochs.  The reference divergence block is dropped
    (its rows are the longer run's); everything else is cut to the prefix.
    """
    if epochs == fp.epochs:
        return fp
    if not 1 <= epochs < fp.epochs:
        raise MismatchError(f"{fp.source} covers {fp.epochs} epochs; cannot check {epochs}")
    n = epochs + 1
    steps = fp.step_rows[:, 0] < epochs if len(fp.step_rows) else np.zeros(0, bool)
    keep = fp.snapshot_rows <= epochs
    rows = fp.row_digests[:n]
    config = dict(fp.config, epochs=epochs)
    extra = {k: v for k, v in fp.extra.items() if k != "divergence"}
    return dataclasses.replace(
        fp, config=config, epochs=epochs,
        digest=record.overall_digest(fp.spec.hash, fp.storage, rows, fp.step_rows[steps], fp.step_digests[steps]),
        step_rows=fp.step_rows[steps], step_digests=fp.step_digests[steps],
        epoch_digests=None if fp.epoch_digests is None else fp.epoch_digests[:n],
        group_digests=fp.group_digests[:n], row_digests=rows,
        snapshot_rows=fp.snapshot_rows[keep], snapshots=fp.snapshots[keep],
        train_loss=fp.train_loss[:n], test_loss=fp.test_loss[:n], extra=extra)


# --------------------------------------------------------------------------- measures

@dataclasses.dataclass(frozen=True)
class Measure:
    """What a tolerance policy measured, and where it was worst."""

    value: float
    """Max ulps (ulps), max relative error (rel) or fewest correct bits (bits)."""
    row: int
    """Epoch row where it was worst (0 = initial state, e+1 = end of epoch e)."""
    layer: str
    """Layer (or parameter tensor for rel) where it was worst."""
    rows: tuple[int, ...]
    """Epoch rows that were compared."""

    def describe(self, policy: Policy) -> str:
        where = f"{self.layer} at epoch row {self.row}"
        if policy is Policy.ULPS:
            return f"max {int(self.value)} ulps ({where})"
        if policy is Policy.REL:
            return f"max relative error {self.value:.3g} ({where})"
        return f"fewest correct bits {self.value:.1f} ({where})"


def _worst(values: np.ndarray, div: compare.LayerDivergence) -> tuple[float, int, str]:
    """Largest entry of a (rows, layers) table: value, epoch row, layer."""
    if not div.rows or not div.layers:
        raise MismatchError("the baseline and the run share no epoch row with parameter values")
    i, j = np.unravel_index(int(np.argmax(values)), values.shape)
    return float(values[i, j]), int(div.rows[i]), div.layers[j]


def _divergence(baseline: Fingerprint, candidate: Fingerprint) -> compare.LayerDivergence:
    div = compare.layer_divergence(baseline, candidate, epochs=candidate.epochs)
    if div is None:  # different storage dtypes; check_case refuses those before
        raise MismatchError(f"{baseline.source} and {candidate.source} store parameters in different dtypes")
    return div


def measure_ulps(baseline: Fingerprint, candidate: Fingerprint) -> Measure:
    """Largest ulp distance of any parameter, in the storage dtype, at the rows both carry values for.

    The per-layer table is ``compare.layer_divergence``'s, the one ``bnaudit compare`` prints.
    """
    div = _divergence(baseline, candidate)
    value, row, layer = _worst(div.max_ulps, div)
    return Measure(value=value, row=row, layer=layer, rows=div.rows)


def measure_rel(baseline: Fingerprint, candidate: Fingerprint) -> Measure:
    """Largest elementwise relative difference |a - b| / max(|a|, |b|) of any parameter at those rows.

    ``compare.layer_divergence``'s definition: symmetric, exact inputs widened to float64
    and one rounding in the division; NaN against a number is infinite.
    """
    div = _divergence(baseline, candidate)
    value, row, layer = _worst(div.max_rel, div)
    return Measure(value=value, row=row, layer=layer, rows=div.rows)


def reference_bits(fp: Fingerprint) -> divergence.BitsTable:
    """The correct bits of ``extra["divergence"]`` (``bnaudit.divergence``); ReferenceFailure if absent."""
    block = fp.extra.get("divergence")
    if block is None:
        raise ReferenceFailure(f"{fp.source}: the run carries no divergence from the mpmath reference "
                               "(is a reference stored for its spec? bnaudit reference build), so bits:N "
                               "cannot be judged")
    try:
        table = divergence.bits_table(block)
    except InputError as exc:
        raise InputError(f"{fp.source}: {exc.message}") from None
    if table.bits.size == 0:
        raise ReferenceFailure(f"{fp.source}: the divergence from the reference measured no epoch row")
    return table


def with_reference(fp: Fingerprint) -> Fingerprint:
    """A record folder's run with its divergence from the stored mpmath reference attached, if it lacks one.

    Runs whose process did not measure it (or records made before a reference was
    stored) get it here, from the record's parameters and probe activations
    (``divergence.from_record``).  A fingerprint file cannot: it lacks the probe
    activations.  Unchanged when no reference is stored for the spec.
    """
    if "divergence" in fp.extra:
        return fp
    folder = Path(fp.source)
    if not (folder / "record.json").is_file():
        return fp
    return divergence.attach(record.load_record(folder)).fingerprint


def measure_bits(candidate: Fingerprint) -> Measure:
    """Fewest correct bits of any layer (weights or activations) at any epoch row measured."""
    ref = reference_bits(candidate)
    i, j = np.unravel_index(int(np.argmin(ref.bits)), ref.bits.shape)
    return Measure(value=float(ref.bits[i, j]), row=int(ref.rows[j]), layer=ref.series[i], rows=ref.rows)


# --------------------------------------------------------------------------- results

class Verdict(enum.Enum):
    """How a case ended."""

    IDENTICAL = "identical"
    """Bit-identical to the baseline."""
    ACCEPTED = "accepted"
    """Bit-identical to one of the accepted classes."""
    WITHIN = "within"
    """Different, but within the tolerance policy."""
    DRIFT = "drift"
    """Beyond a drift policy (exact, ulps, rel): the check fails."""
    INACCURATE = "inaccurate"
    """Fewer correct bits than bits:N asks for: the check fails."""

    @property
    def passed(self) -> bool:
        return self not in (Verdict.DRIFT, Verdict.INACCURATE)


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """One dtype/configuration checked against its baseline."""

    name: str
    """The candidate's configuration, e.g. float32_t1_native_nondet."""
    dtype: str
    """Run dtype."""
    baseline: str
    """Baseline file."""
    candidate: str
    """The checked run (record folder or fingerprint)."""
    epochs: int
    """Epochs compared."""
    baseline_epochs: int
    """Epochs the baseline covers (more than ``epochs`` when a prefix was compared)."""
    tolerance: Tolerance
    """The policy applied."""
    verdict: Verdict
    """identical, accepted, within or drift."""
    measured: Measure | None
    """What the policy measured (None for exact, and when identical under a drift policy)."""
    accepted_by: str | None
    """The accepted-class file the candidate is identical to, if that is why it passed."""
    first: compare.Difference | None
    """Where candidate and baseline first differ (None when identical)."""
    environment_diff: tuple[tuple[str, Any, Any], ...]
    """(key, baseline value, candidate value) of the environment facts that differ."""
    seconds: float = 0.0
    """Wall time of the candidate's run (0 for a given record)."""

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "epochs": self.epochs,
            "baseline_epochs": self.baseline_epochs,
            "tolerance": str(self.tolerance),
            "verdict": self.verdict.value,
            "passed": self.passed,
            "measured": None if self.measured is None else {
                "value": self.measured.value if math.isfinite(self.measured.value) else str(self.measured.value),
                "row": self.measured.row, "layer": self.measured.layer, "rows": list(self.measured.rows)},
            "accepted_by": self.accepted_by,
            "first_difference": None if self.first is None else _jsonable(dataclasses.asdict(self.first)),
            "environment_diff": [[k, _jsonable(a), _jsonable(b)] for k, a, b in self.environment_diff],
            "seconds": self.seconds,
        }


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Every case of one check, and the policy they were held to."""

    tolerance: Tolerance
    """The policy."""
    accept_classes: tuple[str, ...]
    """Files of the accepted classes."""
    cases: tuple[CaseResult, ...]
    """One per dtype/configuration checked."""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        return tuple(c for c in self.cases if not c.passed)

    @property
    def first(self) -> compare.Difference | None:
        """The first divergence of the first failing case."""
        return self.failed[0].first if self.failed else None

    @property
    def failed_policy(self) -> str | None:
        """The policy that failed, e.g. "ulps:16", or None."""
        return str(self.tolerance) if self.failed else None

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.passed else ExitCode.DIFFERENT

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "bnaudit": __version__,
            "tolerance": str(self.tolerance),
            "accept_classes": list(self.accept_classes),
            "passed": self.passed,
            "failed_policy": self.failed_policy,
            "cases": [c.to_dict() for c in self.cases],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer, np.floating)):
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


# --------------------------------------------------------------------------- the check

def _accepted(candidate: Fingerprint, classes: Sequence[Fingerprint]) -> str | None:
    for cls in classes:
        if cls.epochs < candidate.epochs or cls.spec.hash != candidate.spec.hash or cls.storage != candidate.storage:
            continue
        if truncate(cls, candidate.epochs).digest == candidate.digest:
            return cls.source
    return None


def check_case(baseline: Baseline, candidate: Fingerprint, tolerance: Tolerance = EXACT, *,
               accept: Sequence[Fingerprint] = (), seconds: float = 0.0) -> CaseResult:
    """Hold one candidate to its baseline under a policy.

    Refuses (MismatchError) a candidate of another experiment, another run dtype, or with
    more epochs than the baseline covers.
    """
    base_fp = baseline.fingerprint
    if candidate.epochs > base_fp.epochs:
        raise MismatchError(f"{baseline.path} covers {base_fp.epochs} epochs, the run {candidate.epochs}: "
                            "make a longer baseline or check fewer epochs (--profile smoke, --epochs N)")
    if run_dtype(candidate) != baseline.dtype:
        raise MismatchError(f"{baseline.path} is a {baseline.dtype} baseline, {candidate.source} "
                            f"a {run_dtype(candidate)} run")
    base = truncate(base_fp, candidate.epochs)
    compare.ensure_comparable(base, candidate)
    pair = compare.compare_pair(base, candidate)
    measured: Measure | None = None
    accepted_by: str | None = None
    if tolerance.policy is Policy.BITS:
        measured = measure_bits(candidate)
        st = bits.storage(candidate.storage)
        if tolerance.limit is not None and tolerance.limit > st.mantissa_bits:
            raise UsageError(f"--tolerance {tolerance}: a {candidate.storage} run has at most "
                             f"{st.mantissa_bits} bits; no run can pass")
        ok = measured.value >= float(tolerance.limit or 0)
        verdict = Verdict.WITHIN if ok else Verdict.INACCURATE
        if ok and pair.identical:
            verdict = Verdict.IDENTICAL
    elif pair.identical:
        verdict = Verdict.IDENTICAL
    else:
        accepted_by = _accepted(candidate, accept)
        if accepted_by is not None:
            verdict = Verdict.ACCEPTED
        elif tolerance.policy is Policy.EXACT:
            verdict = Verdict.DRIFT
        else:
            measured = (measure_ulps if tolerance.policy is Policy.ULPS else measure_rel)(base, candidate)
            if candidate.epochs not in measured.rows:
                # The digests differ but the parameters of the run's last epochs were never
                # compared: a drift there would pass unseen.  Refuse rather than guess.
                raise UsageError(f"--tolerance {tolerance} compares parameters at epoch rows "
                                 f"{', '.join(map(str, measured.rows))}; a {candidate.epochs}-epoch run ends between "
                                 "them: check a length among those rows (e.g. --profile smoke)")
            verdict = Verdict.WITHIN if measured.value <= float(tolerance.limit or 0) else Verdict.DRIFT
    return CaseResult(
        name=case_name(candidate), dtype=run_dtype(candidate), baseline=baseline.path, candidate=candidate.source,
        epochs=candidate.epochs, baseline_epochs=base_fp.epochs, tolerance=tolerance, verdict=verdict,
        measured=measured, accepted_by=accepted_by, first=pair.first,
        environment_diff=tuple(pair.environment_diff), seconds=seconds)


def load_accept_classes(paths: Sequence[Path | str]) -> list[Fingerprint]:
    """Load the accepted-class fingerprints (files or record folders), each validated."""
    return [record.load(Path(p)) for p in paths]


def validate_accept_classes(classes: Sequence[Fingerprint], baselines: Sequence[Baseline]) -> None:
    """Refuse accepted classes of another experiment than the baselines'."""
    for cls in classes:
        if not any(cls.spec.hash == b.fingerprint.spec.hash and cls.frozen == b.fingerprint.frozen
                   for b in baselines):
            raise MismatchError(f"--accept-class {cls.source}: another experiment than the baselines "
                                f"(spec {cls.spec.short_hash})")


def pair_candidates(baselines: Sequence[Baseline],
                    candidates: Sequence[Fingerprint]) -> list[tuple[Baseline, Fingerprint]]:
    """Match each candidate with the baseline of its run dtype (one baseline per dtype)."""
    by_dtype: dict[str, Baseline] = {}
    for b in baselines:
        if b.dtype in by_dtype:
            raise UsageError(f"two baselines for dtype {b.dtype}: {by_dtype[b.dtype].path} and {b.path}")
        by_dtype[b.dtype] = b
    pairs = []
    for c in candidates:
        dtype = run_dtype(c)
        if dtype not in by_dtype:
            if len(baselines) == 1:
                b = baselines[0]
                raise MismatchError(f"{b.path} is a {b.dtype} baseline, {c.source} a {dtype} run")
            raise MismatchError(f"no baseline for {c.source}'s dtype {dtype} "
                                f"(baselines: {', '.join(sorted(by_dtype))})")
        pairs.append((by_dtype[dtype], c))
    return pairs


def run_check(pairs: Sequence[tuple[Baseline, Fingerprint]], tolerance: Tolerance = EXACT, *,
              accept: Sequence[Fingerprint] = (), accept_paths: Sequence[str] = (),
              seconds: Sequence[float] | None = None) -> CheckResult:
    """Check every (baseline, candidate) pair under one policy."""
    if accept and not tolerance.is_drift:
        raise UsageError("--accept-class names known drift classes; it has no meaning with "
                         f"--tolerance {tolerance} (an accuracy policy)")
    if tolerance.policy is Policy.BITS:
        pairs = [(b, with_reference(c)) for b, c in pairs]
    cases = tuple(check_case(b, c, tolerance, accept=accept, seconds=(seconds[i] if seconds else 0.0))
                  for i, (b, c) in enumerate(pairs))
    names = [c.name for c in cases]
    if len(set(names)) < len(names):  # one configuration from several machines: name each by its source
        cases = tuple(dataclasses.replace(c, name=f"{c.name} [{source_name(c.candidate)}]") if names.count(c.name) > 1
                      else c for c in cases)
    return CheckResult(tolerance=tolerance, accept_classes=tuple(accept_paths) or tuple(a.source for a in accept),
                       cases=cases)


# --------------------------------------------------------------------------- planning runs

def plan_run(baseline: Baseline | None, *, dtype: str | None = None, threads: int | None = None,
             isa: str | None = None, deterministic: bool | None = None, epochs: int | None = None,
             profile: str | None = None, spec: ExperimentSpec | None = None,
             allow_longer: bool = False) -> tuple[ExperimentSpec, RunConfig]:
    """The run that reproduces a baseline's configuration, with the options given overriding it.

    Without a baseline (``baseline create``) the defaults are ``bnaudit run``'s.  Epochs:
    ``epochs``, else the profile's, else the baseline's (the spec's without one).  A
    candidate may not be longer than its baseline (MismatchError) unless ``allow_longer``
    (``baseline update`` may lengthen a baseline).
    """
    if epochs is not None and profile is not None:
        raise UsageError("give --profile or --epochs, not both")
    if baseline is None:
        experiment = spec if spec is not None else _default_spec()
        config = RunConfig(controls=Controls(), epochs=experiment.train.epochs)
        limit = experiment.train.epochs
    else:
        fp = baseline.fingerprint
        if spec is not None and spec.hash != fp.spec.hash:
            raise MismatchError(f"--spec {spec.short_hash} is not the experiment of {baseline.path} "
                                f"(spec {fp.spec.short_hash})")
        experiment = fp.spec
        config = _baseline_config(baseline)
        limit = fp.epochs
    changes: dict[str, Any] = {k: v for k, v in (("dtype", dtype), ("threads", threads), ("isa", isa),
                                                 ("deterministic", deterministic)) if v is not None}
    n = epochs if epochs is not None else (
        profile_epochs(profile, experiment.train.epochs) if profile is not None else limit)
    if baseline is not None and n > limit and not allow_longer:
        raise MismatchError(f"{baseline.path} covers {limit} epochs; cannot check {n} "
                            "(make a longer baseline, or check fewer epochs: --profile smoke, --epochs N)")
    config = dataclasses.replace(config, controls=dataclasses.replace(config.controls, **changes), epochs=n,
                                 trace_epochs=tuple(e for e in config.trace_epochs if e < n) or (0,))
    return experiment, config


def _default_spec() -> ExperimentSpec:
    from bnaudit.spec import default_spec

    return default_spec()


def _baseline_config(baseline: Baseline) -> RunConfig:
    """The run request stored in a baseline, validated as untrusted input."""
    from bnaudit.controls import DTYPES, ISAS

    raw = baseline.fingerprint.config
    c = raw.get("controls")
    known = {f.name for f in dataclasses.fields(Controls)}
    if not isinstance(c, dict) or not set(c) <= known:
        raise InputError(f"{baseline.path}: malformed run controls in config")
    if (c.get("dtype") not in DTYPES or c.get("isa") not in ISAS or not isinstance(c.get("threads"), int)
            or isinstance(c.get("threads"), bool) or not isinstance(c.get("deterministic"), bool)
            or any(c.get(k) is not None and not isinstance(c.get(k), str)
                   for k in ("onednn_isa", "mkl_cbwr", "cpu_model"))):
        raise InputError(f"{baseline.path}: malformed run controls in config")
    try:
        return RunConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{baseline.path}: malformed run request in config") from None


# --------------------------------------------------------------------------- the commands

@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The run options of ``bnaudit check`` and ``bnaudit baseline create|update`` (None: not given)."""

    dtype: str | None = None
    threads: int | None = None
    isa: str | None = None
    deterministic: bool | None = None
    epochs: int | None = None
    profile: str | None = None
    spec: Path | None = None

    def given(self) -> list[str]:
        """The flags given, as the user typed them."""
        return [f"--{f.name}" for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def load_spec(self) -> ExperimentSpec | None:
        if self.spec is None:
            return None
        from bnaudit.spec import load_spec

        return load_spec(self.spec)


Announce = Callable[[str], None]
"""Where a command says what it is about to run (the CLI: stderr; None: silence)."""


def execute(spec: ExperimentSpec, config: RunConfig, folder: Path, announce: Announce | None) -> tuple[Fingerprint,
                                                                                                       float]:
    """One run in its own process (``launch.run``: controls applied there); its fingerprint and wall time."""
    from bnaudit import launch

    if announce is not None:
        announce(f"bnaudit: running {config.controls.label()} for {config.epochs} epochs")
    started = time.perf_counter()
    launch.run(spec, config, folder)
    return record.load(folder), time.perf_counter() - started


def gate(baseline_paths: Sequence[Path], *, records: Sequence[Path] = (), options: RunOptions = RunOptions(),
         tolerance: str = "exact", accept_paths: Sequence[Path] = (), out: Path | None = None,
         announce: Announce | None = None) -> CheckResult:
    """``bnaudit check``: run the experiment per baseline (or take ``records``) and judge it.

    ``options.dtype`` picks the baselines to check; the other options override their
    run configuration.  Every option is checked before any run starts.
    """
    policy = parse_tolerance(tolerance)
    if options.profile is not None:
        profile_epochs(options.profile, 1)  # reject a bad name before any work
    if not baseline_paths:
        raise UsageError("--baseline FILE is required (make one with bnaudit baseline create)")
    if accept_paths and not policy.is_drift:
        raise UsageError(f"--accept-class names known drift classes; it has no meaning with --tolerance {policy}")
    baselines = [load_baseline(p) for p in baseline_paths]
    classes = load_accept_classes(accept_paths)
    validate_accept_classes(classes, baselines)
    experiment = options.load_spec()
    accepted = [str(p) for p in accept_paths]
    if records:
        given = options.given() + (["--out"] if out is not None else [])
        if given:
            raise UsageError(f"--record checks an existing run; {', '.join(given)} cannot be combined with it")
        pairs = pair_candidates(baselines, [record.load(r) for r in records])
        return run_check(pairs, policy, accept=classes, accept_paths=accepted)
    chosen = [b for b in baselines if options.dtype is None or b.dtype == options.dtype]
    if not chosen:
        raise MismatchError(f"no baseline for dtype {options.dtype} (baselines: "
                            f"{', '.join(sorted({b.dtype for b in baselines}))})")
    pair_candidates(chosen, [])  # refuses two baselines of one dtype
    plans = [plan_run(b, threads=options.threads, isa=options.isa, deterministic=options.deterministic,
                      epochs=options.epochs, profile=options.profile, spec=experiment) for b in chosen]
    pairs, seconds = [], []
    with tempfile.TemporaryDirectory(prefix="bnaudit-check-") as tmp:
        root = out if out is not None else Path(tmp)
        for b, (exp, config) in zip(chosen, plans, strict=True):
            fp, took = execute(exp, config, root / config.controls.label(), announce)
            pairs.append((b, fp))
            seconds.append(took)
        return run_check(pairs, policy, accept=classes, accept_paths=accepted, seconds=seconds)


def make_baseline(out: Path, *, source: Path | None = None, options: RunOptions = RunOptions(),
                  update: bool = False, force: bool = False, announce: Announce | None = None) -> Baseline:
    """``bnaudit baseline create|update``: from ``source`` (a record), or from a run made here.

    ``update`` runs the existing baseline's configuration (options override it); every
    refusal comes before the run, not after it.
    """
    if options.profile is not None:
        profile_epochs(options.profile, 1)
    if source is not None:
        given = options.given()
        if given:
            raise UsageError(f"--record makes the baseline from an existing run; {', '.join(given)} "
                             "cannot be combined with it")
        return write_baseline(out, source, update=update, force=force)
    if not update and out.exists() and not force:
        raise OutputError(f"{out} already exists; use bnaudit baseline update, or --force")
    old = None
    if update:
        if not out.exists():
            raise InputError(f"{out}: no baseline to update; make one with bnaudit baseline create")
        try:
            old = load_baseline(out)
        except InputError as exc:
            if not force:
                raise InputError(f"{exc.message} (pass --force to replace it)") from None
        if old is not None and options.dtype is not None and options.dtype != old.dtype and not force:
            raise MismatchError(f"{out} is a {old.dtype} baseline, not {options.dtype}; pass --force to replace it")
    experiment, config = plan_run(old, dtype=options.dtype, threads=options.threads, isa=options.isa,
                                  deterministic=options.deterministic, epochs=options.epochs,
                                  profile=options.profile, spec=options.load_spec(), allow_longer=True)
    with tempfile.TemporaryDirectory(prefix="bnaudit-baseline-") as tmp:
        folder = Path(tmp) / config.controls.label()
        execute(experiment, config, folder, announce)
        return write_baseline(out, folder, update=update, force=force)
