"""bnaudit check: is a run within a chosen policy of a committed baseline?

The policy and the verdicts only: what a tolerance means, what it measures, and how a
case ends.  The baseline file is ``bnaudit.baseline``; planning and running the
candidates (``bnaudit check`` itself) is ``bnaudit.gate``.

A check compares a **candidate** (a fresh run, or a given record) with a baseline of the
same experiment and run dtype.  The candidate may be shorter than the baseline: the
baseline is then cut to the candidate's epochs (``record.prefix``: its digest recomputed
over that prefix; a run's first epochs do not depend on how many follow), so one
full-length baseline serves the smoke check of every commit and the full nightly check;
each case line says so ("first 20 of the baseline's 1000 epochs", ``ci_summary``), and
``same_length`` refuses instead.  A candidate longer than the baseline is refused: its later epochs would go
unchecked under a verdict that claims the run.

Policies (``--tolerance``):

exact      the digests are equal: every traced tensor bit for bit.
ulps:N     at every epoch both fingerprints carry parameters for
           (``layout.keyframe_schedule``: the initial state, after epochs 1, 2, 3, 5, 10, 20,
           ..., and the last), every
           parameter is within N ulps of the baseline's, counted in the run's storage dtype
           (N at most ``MAX_ULPS``, 2^53 - 1: every count up to it is exact in a float64).
rel:X      at those epochs, every parameter's relative difference |a - b| / max(|a|, |b|)
           is at most X.  Both are the per-layer tables ``bnaudit compare`` prints
           (``compare.layer_divergence``), so a limit can be read off a comparison.
bits:N     an accuracy policy, not a drift policy: every layer of the candidate keeps at
           least N correct bits relative to the mpmath reference, in its weights and in its
           activations, at every epoch it was measured (the run's divergence block,
           ``DivergenceBlock.fewest``: the one definition of "fewest correct bits").  A run
           without that block is an error (exit 8), never a pass; being identical to the
           baseline is not enough, since the baseline itself can be wrong.

dist:RATE  an outcome policy for fleets whose bits cannot agree: the candidate's final test
           MSE (``dist:RATE:train_mse``: train MSE) lies within the band of an ensemble
           baseline's outcomes over seeds (``band``: order statistics, false-alarm rate
           2k / (n + 1) <= RATE exactly); the candidate is any seed of the ensemble's
           experiment, at its length.

``--accept-class FILE...`` (drift policies only): a candidate bit-identical to any of
these fingerprints passes, and the result names which.

No policy passes a candidate with a NaN or infinite parameter where the baseline's is
finite (a NaN has no ulp distance, an infinity only a finite one), and a candidate
whose digests are the baseline's at an epoch where its parameters are not is refused
(InputError, from ``compare``): one of the two was edited.  What the bits policy reads
is the candidate's divergence block; ``gate`` recomputes a record's from its verified
arrays before it gets here.

numpy only: no torch, no mpmath, no runs, no files read or written.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from bnaudit import bits, compare, fileio, record
from bnaudit._version import __version__
from bnaudit.baseline import Baseline, experiment_differences, source_name
from bnaudit.blocks import OUTCOME_NAMES, OUTCOME_WORDS, DivergenceBlock, EnsembleOutcomes, outcome_series
from bnaudit.errors import ExitCode, MismatchError, ReferenceFailure, UsageError
from bnaudit.layout import after
from bnaudit.record import Fingerprint
from bnaudit.spec import with_seed

CHECK_SCHEMA = "bnaudit.check/1"
DEFAULT_OUTCOME = "test_mse"


# --------------------------------------------------------------------------- policies

class Policy(enum.Enum):
    """What a check measures."""

    EXACT = "exact"
    ULPS = "ulps"
    REL = "rel"
    BITS = "bits"
    DIST = "dist"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A policy and its limit, as the user wrote it."""

    policy: Policy
    """exact, ulps, rel, bits or dist."""
    limit: int | float | None
    """N for ulps and bits, X for rel, the false-alarm rate for dist, None for exact."""
    outcome: str = DEFAULT_OUTCOME
    """dist: the outcome held to the ensemble's band (final test or train MSE)."""

    def __str__(self) -> str:
        if self.policy is Policy.EXACT:
            return "exact"
        if self.policy is Policy.DIST:
            return f"dist:{self.limit:g}" + ("" if self.outcome == DEFAULT_OUTCOME else f":{self.outcome}")
        if self.policy is Policy.REL:
            short = f"{self.limit:g}"  # as the user wrote it, unless that loses digits
            return f"rel:{short if float(short) == self.limit else repr(self.limit)}"
        return f"{self.policy.value}:{self.limit}"

    @property
    def is_drift(self) -> bool:
        """Measured against the baseline's bits (exact, ulps, rel), not the reference (bits) or an ensemble (dist)."""
        return self.policy not in (Policy.BITS, Policy.DIST)


EXACT = Tolerance(Policy.EXACT, None)

_INT = re.compile(r"^(0|[1-9][0-9]{0,18})$")
_REAL = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?$")
MAX_BITS = 64
MAX_ULPS = (1 << 53) - 1
"""Largest N of ulps:N: distances up to 2^53 are exact as float64, so N and a measure compare exactly,
and every larger distance (NaN is ``bits.NAN_DISTANCE``) exceeds N."""


def parse_tolerance(text: str) -> Tolerance:
    """Parse ``exact``, ``ulps:N``, ``rel:X``, ``bits:N`` or ``dist:RATE[:OUTCOME]`` strictly (UsageError otherwise)."""
    usage = "expected exact, ulps:N, rel:X, bits:N or dist:RATE (e.g. ulps:16, rel:1e-4, bits:20, dist:0.1)"
    raw = text.strip()
    if raw == "exact":
        return EXACT
    kind, sep, value = raw.partition(":")
    if not sep or kind not in ("ulps", "rel", "bits", "dist"):
        raise UsageError(f"--tolerance {text!r}: {usage}")
    if kind == "dist":
        return _parse_dist(text, value)
    if kind in ("ulps", "bits"):
        if not _INT.match(value):
            raise UsageError(f"--tolerance {text!r}: {kind} needs a non-negative whole number, e.g. {kind}:16")
        n = int(value)
        if kind == "ulps" and n > MAX_ULPS:
            raise UsageError(f"--tolerance {text!r}: ulps must be at most {MAX_ULPS} (2^53 - 1); "
                             "a larger count cannot be measured exactly")
        if kind == "bits" and not 1 <= n <= MAX_BITS:
            raise UsageError(f"--tolerance {text!r}: bits must be between 1 and {MAX_BITS}")
        return Tolerance(Policy.ULPS if kind == "ulps" else Policy.BITS, n)
    if not _REAL.match(value):
        raise UsageError(f"--tolerance {text!r}: rel needs a finite non-negative number, e.g. rel:1e-4")
    x = float(value)
    if not math.isfinite(x):
        raise UsageError(f"--tolerance {text!r}: rel needs a finite non-negative number")
    return Tolerance(Policy.REL, x)


def _parse_dist(text: str, value: str) -> Tolerance:
    rate_text, _, outcome = value.partition(":")
    outcome = outcome or DEFAULT_OUTCOME
    if outcome not in OUTCOME_NAMES:
        raise UsageError(f"--tolerance {text!r}: the outcome is one of {', '.join(OUTCOME_NAMES)}")
    rate = float(rate_text) if _REAL.match(rate_text) else math.nan
    if not 0 < rate < 1:
        raise UsageError(f"--tolerance {text!r}: dist needs a false-alarm rate between 0 and 1, e.g. dist:0.1")
    return Tolerance(Policy.DIST, rate, outcome)


def refuse_accept_classes(tolerance: Tolerance) -> None:
    """Accepted classes are known drift: UsageError under an accuracy policy (bits:N)."""
    if not tolerance.is_drift:
        raise UsageError(f"--accept-class names known drift classes; it has no meaning with --tolerance {tolerance}")


# --------------------------------------------------------------------------- the ensemble band

@dataclasses.dataclass(frozen=True)
class Band:
    """dist:RATE's band: the k-th smallest and k-th largest of the ensemble's n outcomes.

    A run whose outcome is another draw from the ensemble's distribution (a seed it did not
    hold, the ensemble's configuration on its machine) falls below the k-th smallest of n
    exchangeable values with probability k / (n + 1), and above the k-th largest with the same,
    whatever the distribution (continuous, no ties): the false-alarm rate is 2k / (n + 1)
    exactly, and k is the largest that keeps it at most RATE.
    """

    low: float
    high: float
    k: int
    n: int

    @property
    def false_alarm(self) -> float:
        return 2 * self.k / (self.n + 1)


def band(values: Sequence[float], rate: float) -> Band:
    """The band of dist:RATE over an ensemble's outcomes (UsageError if it holds too few for the rate)."""
    finite = np.sort(np.array([v for v in values if math.isfinite(v)], dtype=np.float64))
    n = int(finite.size)
    k = math.floor(rate * (n + 1) / 2 + 1e-12)
    if k < 1:
        need = math.ceil(2 / rate - 1)
        raise UsageError(f"--tolerance dist:{rate:g} needs an ensemble of at least {need} finite outcomes "
                         f"for a false-alarm rate of at most {rate:g}; this one has {n}")
    return Band(low=float(finite[k - 1]), high=float(finite[n - k]), k=k, n=n)


# --------------------------------------------------------------------------- measures

@dataclasses.dataclass(frozen=True)
class Measure:
    """What a tolerance policy measured, and where it was worst."""

    value: float
    """Max ulps (ulps), max relative error (rel) or fewest correct bits (bits)."""
    row: int
    """Epoch row where it was worst (0: the initial state; r: after epoch r, ``layout.after``)."""
    layer: str
    """Where it was worst: a layer (ulps, rel) or a series "<layer> <weights|activations>" (bits)."""
    rows: tuple[int, ...]
    """Epoch rows that were compared (same numbering)."""
    nonfinite: bool = False
    """The candidate has a NaN or infinite parameter where the baseline's is finite (at ``row``, in ``layer``)."""
    band: Band | None = None
    """dist: the ensemble's band the outcome (``value``, ``layer`` names it) was held to."""

    def describe(self, policy: Policy) -> str:
        where = f"{self.layer}, {after(self.row)}"
        if self.band is not None:
            b = self.band
            inside = "inside" if math.isfinite(self.value) and b.low <= self.value <= b.high else "outside"
            return (f"{self.layer} {self.value:.6g} {inside} [{b.low:.6g}, {b.high:.6g}], the ensemble's "
                    f"{_ordinal(b.k)} smallest and largest of {b.n} seeds (false-alarm rate {b.false_alarm:.3g})")
        if self.nonfinite:
            return f"non-finite parameters where the baseline's are finite ({where})"
        if policy is Policy.ULPS:
            return f"max {int(self.value)} ulps ({where})"
        if policy is Policy.REL:
            return f"max relative error {self.value:.3g} ({where})"
        return f"fewest correct bits {bits.correct_bits_text(self.value)} ({where})"


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _worst(values: np.ndarray, div: compare.LayerDivergence) -> Measure:
    """The largest entry of a (rows, layers) table: its value, epoch row and layer."""
    if not div.rows or not div.layers:
        raise MismatchError("the baseline and the run share no epoch with parameter values")
    i, j = np.unravel_index(int(np.argmax(values)), values.shape)
    return Measure(value=float(values[i, j]), row=int(div.rows[i]), layer=div.layers[j], rows=div.rows)


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
    return _worst(div.max_ulps, div)


def measure_rel(baseline: Fingerprint, candidate: Fingerprint) -> Measure:
    """Largest elementwise relative difference |a - b| / max(|a|, |b|) of any parameter at those rows.

    ``compare.layer_divergence``'s definition: symmetric, exact inputs widened to float64
    and one rounding in the division; NaN against a number is infinite.
    """
    div = _divergence(baseline, candidate)
    return _worst(div.max_rel, div)


def reference_bits(fp: Fingerprint) -> DivergenceBlock:
    """The run's divergence from the mpmath reference; ReferenceFailure if it has none, or one of no row."""
    if fp.divergence is None:
        raise ReferenceFailure(f"{fp.source}: the run carries no divergence from the mpmath reference "
                               "(is a reference stored for its spec? bnaudit reference build), so bits:N "
                               "cannot be judged")
    if fp.divergence.correct_bits.size == 0:
        raise ReferenceFailure(f"{fp.source}: the divergence from the reference measured no epoch")
    return fp.divergence


def measure_bits(candidate: Fingerprint) -> Measure:
    """The run's fewest correct bits (``DivergenceBlock.fewest``: any layer's weights or activations, any epoch)."""
    ref = reference_bits(candidate)
    f = ref.fewest()
    return Measure(value=f.bits, row=f.row, layer=f.series, rows=ref.rows)


def _layer_of_column(fp: Fingerprint, column: int) -> str:
    """The layer (e.g. ``bn1``) whose parameter is this column of the keyframes."""
    offset = 0
    for name, shape in fp.params:
        offset += math.prod(shape)
        if column < offset:
            return name.rpartition(".")[0] or name
    return "?"


def nonfinite_parameters(baseline: Fingerprint, candidate: Fingerprint) -> Measure | None:
    """The first candidate parameter that is NaN or infinite where the baseline's is finite, or None.

    At the epoch rows both carry parameters for.  No policy passes such a run: a NaN has
    no ulp distance (``bits.NAN_DISTANCE``) and an infinity only a finite one, so an
    ulps limit alone could let either through; a NaN has no correct bits.
    """
    rows, ia, ib = np.intersect1d(baseline.keyframe_rows, candidate.keyframe_rows, return_indices=True)
    keep = rows <= candidate.epochs
    rows, ia, ib = rows[keep], ia[keep], ib[keep]
    if not len(rows) or baseline.storage != candidate.storage:
        return None
    bad = (np.isfinite(bits.to_float64(baseline.keyframes[ia], baseline.storage))
           & ~np.isfinite(bits.to_float64(candidate.keyframes[ib], candidate.storage)))
    if not bad.any():
        return None
    i, column = (int(k) for k in np.argwhere(bad)[0])
    return Measure(value=math.inf, row=int(rows[i]), layer=_layer_of_column(candidate, column),
                   rows=tuple(int(r) for r in rows), nonfinite=True)


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


def _json_value(value: Any) -> Any:
    """A value of a first difference or an environment fact, for strict JSON (``fileio.json_number``)."""
    return fileio.json_number(value) if isinstance(value, float) else value


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
    """identical, accepted, within, drift or inaccurate."""
    measured: Measure | None
    """What the policy measured (None for exact, and when identical or accepted under a drift policy)."""
    accepted_by: str | None
    """The accepted-class file the candidate is identical to, if that is why it passed."""
    first: compare.Difference | None
    """Where candidate and baseline first differ (None when identical)."""
    environment_diff: tuple[tuple[str, Any, Any], ...]
    """(key, baseline value, candidate value) of the environment facts that differ."""
    seconds: float = 0.0
    """Wall time of the candidate's run (0 for a given record)."""
    kept: bool = True
    """Whether ``candidate`` is still on disk: False when ``bnaudit check`` ran it in a temporary folder
    (no --out), which is gone once the check ends."""

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def to_dict(self) -> dict[str, Any]:
        m = self.measured
        return {
            "name": self.name,
            "dtype": self.dtype,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "candidate_kept": self.kept,
            "epochs": self.epochs,
            "baseline_epochs": self.baseline_epochs,
            "tolerance": str(self.tolerance),
            "verdict": self.verdict.value,
            "passed": self.passed,
            # An infinite relative error is written "inf": bnaudit.check/1 has always said so.
            "measured": None if m is None else {
                "value": m.value if math.isfinite(m.value) else str(m.value),
                "row": m.row, "layer": m.layer, "rows": list(m.rows),
                **({} if m.band is None else {"band": {"low": m.band.low, "high": m.band.high, "k": m.band.k,
                                                       "n": m.band.n, "false_alarm": m.band.false_alarm}})},
            "accepted_by": self.accepted_by,
            "first_difference": None if self.first is None else {
                k: _json_value(v) for k, v in dataclasses.asdict(self.first).items()},
            "environment_diff": [[k, _json_value(a), _json_value(b)] for k, a, b in self.environment_diff],
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
    warnings: tuple[str, ...] = ()
    """What the check could not verify (a signed baseline without the key); said on stderr, not in the verdict."""

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


# --------------------------------------------------------------------------- the check

def _accepted(candidate: Fingerprint, classes: Sequence[Fingerprint]) -> str | None:
    """The first accepted class the candidate is bit-identical to (over the candidate's epochs), or None."""
    for cls in classes:
        if cls.epochs < candidate.epochs or cls.spec.hash != candidate.spec.hash or cls.storage != candidate.storage:
            continue
        accepted, cand = record.comparable([record.prefix(cls, candidate.epochs), candidate])
        if accepted.digest == cand.digest:
            return cls.source
    return None


def _judge_bits(candidate: Fingerprint, tolerance: Tolerance, identical: bool,
                nonfinite: Measure | None) -> tuple[Verdict, Measure]:
    """bits:N: the fewest correct bits against the limit (identical to the baseline is still measured)."""
    st = bits.storage(candidate.storage)
    if tolerance.limit is not None and tolerance.limit > st.mantissa_bits:
        raise UsageError(f"--tolerance {tolerance}: a {candidate.storage} run has at most "
                         f"{st.mantissa_bits} bits; no run can pass")
    if nonfinite is not None:  # a NaN has no correct bits, whatever the divergence block says
        return Verdict.INACCURATE, dataclasses.replace(nonfinite, value=0.0, layer=f"{nonfinite.layer} weights")
    measured = measure_bits(candidate)
    if measured.value < float(tolerance.limit or 0):
        return Verdict.INACCURATE, measured
    return (Verdict.IDENTICAL if identical else Verdict.WITHIN), measured


def _judge_drift(base: Fingerprint, candidate: Fingerprint, tolerance: Tolerance) -> tuple[Verdict, Measure | None]:
    """exact, ulps:N or rel:X for a candidate whose digests differ from the baseline's, its parameters finite.

    The limit and the measure compare exactly: ulps counts up to ``MAX_ULPS`` are exact
    in a float64 and every larger one exceeds it; rel compares two float64 values.
    """
    if tolerance.policy is Policy.EXACT:
        return Verdict.DRIFT, None
    measured = (measure_ulps if tolerance.policy is Policy.ULPS else measure_rel)(base, candidate)
    if candidate.epochs not in measured.rows:
        # The digests differ but the parameters of the run's last epochs were never
        # compared: a drift there would pass unseen.  Refuse rather than guess.
        raise UsageError(f"--tolerance {tolerance} compares parameters after epochs "
                         f"{', '.join(map(str, measured.rows))} (0: the initial state); a {candidate.epochs}-epoch "
                         "run ends between them: check one of those lengths (e.g. --profile smoke)")
    return (Verdict.WITHIN if measured.value <= float(tolerance.limit or 0) else Verdict.DRIFT), measured


def _verdict(base: Fingerprint, candidate: Fingerprint, tolerance: Tolerance, identical: bool,
             accept: Sequence[Fingerprint]) -> tuple[Verdict, Measure | None, str | None]:
    """(verdict, what was measured, accepted class) of a candidate against its baseline's prefix."""
    nonfinite = None if identical else nonfinite_parameters(base, candidate)
    if tolerance.policy is Policy.BITS:
        return (*_judge_bits(candidate, tolerance, identical, nonfinite), None)
    if identical:
        return Verdict.IDENTICAL, None, None
    if nonfinite is not None:  # before accepted classes too: no policy passes it
        return Verdict.DRIFT, (None if tolerance.policy is Policy.EXACT else nonfinite), None
    accepted_by = _accepted(candidate, accept)
    if accepted_by is not None:
        return Verdict.ACCEPTED, None, accepted_by
    return (*_judge_drift(base, candidate, tolerance), None)


def check_case(baseline: Baseline, candidate: Fingerprint, tolerance: Tolerance = EXACT, *,
               accept: Sequence[Fingerprint] = (), seconds: float = 0.0, any_spec: bool = False,
               same_length: bool = False) -> CaseResult:
    """Hold one candidate to its baseline under a policy.

    Refuses (MismatchError) a candidate of another experiment, another run dtype, with
    more epochs than the baseline covers, or (``same_length``) with fewer; ``compare.compare_pair`` refuses (InputError)
    one whose digests equal the baseline's at a row where its parameters do not.  Under
    dist:RATE (``dist_case``) another seed is the same experiment, and ``any_spec`` admits
    another experiment too (named in the result).
    """
    if tolerance.policy is Policy.DIST:
        return dist_case(baseline, candidate, tolerance, seconds=seconds, any_spec=any_spec)
    base_fp = baseline.fingerprint
    controls = candidate.controls
    if candidate.epochs > base_fp.epochs:
        raise MismatchError(f"{baseline.path} covers {base_fp.epochs} epochs, the run {candidate.epochs}: "
                            "make a longer baseline or check fewer epochs (--profile smoke, --epochs N)")
    if same_length and candidate.epochs != base_fp.epochs:
        raise MismatchError(f"{baseline.path} covers {base_fp.epochs} epochs, the run {candidate.epochs}: "
                            "refused by --same-length (without it the run is checked against the baseline's "
                            f"first {candidate.epochs} epochs)")
    if controls.dtype != baseline.dtype:
        raise MismatchError(f"{baseline.path} is a {baseline.dtype} baseline, {candidate.source} "
                            f"a {controls.dtype} run")
    base = record.prefix(base_fp, candidate.epochs)
    pair = compare.compare_pair(base, candidate)  # refuses another spec, frozen inputs or storage dtype
    verdict, measured, accepted_by = _verdict(base, candidate, tolerance, pair.identical, accept)
    return CaseResult(
        name=controls.label(), dtype=controls.dtype, baseline=baseline.path, candidate=candidate.source,
        epochs=candidate.epochs, baseline_epochs=base_fp.epochs, tolerance=tolerance, verdict=verdict,
        measured=measured, accepted_by=accepted_by, first=pair.first,
        environment_diff=tuple(pair.environment_diff), seconds=seconds)


def final_outcome(fp: Fingerprint, outcome: str) -> float:
    """The run's outcome after its last epoch: eval-mode test or train MSE."""
    return float(outcome_series(outcome, fp.train_loss, fp.test_loss)[-1])


def require_ensemble(baseline: Baseline, tolerance: Tolerance) -> EnsembleOutcomes:
    """The ensemble a dist:RATE check holds runs to: refused before any run for one run's baseline
    (MismatchError), or an ensemble too small for the rate (UsageError)."""
    if baseline.ensemble is None:
        raise MismatchError(f"{baseline.path} is one run's baseline; dist:RATE holds a run to an ensemble's outcomes "
                            "(make one: bnaudit ensemble ... --baseline-out FILE)")
    band(baseline.ensemble.values[tolerance.outcome], float(tolerance.limit or 0))
    return baseline.ensemble


def dist_case(baseline: Baseline, candidate: Fingerprint, tolerance: Tolerance, *, seconds: float = 0.0,
              any_spec: bool = False) -> CaseResult:
    """dist:RATE: the candidate's outcome against the band of the baseline's ensemble (``band``).

    The candidate must be of the ensemble's experiment up to its seeds (any seed of it), run
    dtype and length: an outcome after fewer epochs is not an outcome of the same training.
    """
    ens, base_fp = require_ensemble(baseline, tolerance), baseline.fingerprint
    controls = candidate.controls
    if controls.dtype != baseline.dtype:
        raise MismatchError(f"{baseline.path} is a {baseline.dtype} baseline, {candidate.source} "
                            f"a {controls.dtype} run")
    if candidate.epochs != ens.epochs:
        raise MismatchError(f"{baseline.path}'s ensemble holds outcomes after {ens.epochs} epochs, {candidate.source} "
                            f"ran {candidate.epochs}: an outcome is compared at the ensemble's length")
    mine = with_seed(candidate.spec, 0, ens.scope)
    others = [] if mine.hash == ens.unseeded else compare.experiment_differences(
        with_seed(base_fp.spec, 0, ens.scope), mine)
    if others and not any_spec:
        raise MismatchError(f"{candidate.source}: another experiment than {baseline.path}'s ensemble "
                            f"({'; '.join(others)}); --allow-different-spec holds it to the ensemble anyway")
    value = final_outcome(candidate, tolerance.outcome)
    b = band(ens.values[tolerance.outcome], float(tolerance.limit or 0))
    within = math.isfinite(value) and b.low <= value <= b.high and not candidate.nonfinite  # no NaN passes
    what = OUTCOME_WORDS[tolerance.outcome] + (
        f" (another experiment: {'; '.join(others)})" if others else "")
    same = candidate.spec.hash == base_fp.spec.hash and candidate.frozen == base_fp.frozen
    pair = compare.compare_pair(record.prefix(base_fp, candidate.epochs), candidate) if same else None
    return CaseResult(
        name=controls.label(), dtype=controls.dtype, baseline=baseline.path, candidate=candidate.source,
        epochs=candidate.epochs, baseline_epochs=ens.epochs, tolerance=tolerance,
        verdict=Verdict.WITHIN if within else Verdict.DRIFT,
        measured=Measure(value=value, row=candidate.epochs, layer=what, rows=(candidate.epochs,), band=b),
        accepted_by=None, first=None if pair is None else pair.first,
        environment_diff=tuple(pair.environment_diff) if pair is not None
        else compare.environment_diff(base_fp, candidate), seconds=seconds)


def validate_accept_classes(classes: Sequence[Fingerprint], baselines: Sequence[Baseline]) -> None:
    """Refuse accepted classes of another experiment (spec, frozen inputs) than every baseline's."""
    for cls in classes:
        if all(experiment_differences(b.fingerprint, spec=cls.spec, frozen=cls.frozen) for b in baselines):
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
        dtype = c.controls.dtype
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
              seconds: Sequence[float] | None = None, any_spec: bool = False, same_length: bool = False,
              kept: bool = True) -> CheckResult:
    """Check every (baseline, candidate) pair under one policy.

    ``kept``: whether the candidates' records stay on disk (False: run in a temporary folder).

    Under bits:N each candidate must carry its divergence from the reference already
    (``gate.with_reference`` recomputes a record folder's from its verified arrays).
    """
    if accept:
        refuse_accept_classes(tolerance)
    cases = tuple(check_case(b, c, tolerance, accept=accept, seconds=(seconds[i] if seconds else 0.0),
                             any_spec=any_spec, same_length=same_length) for i, (b, c) in enumerate(pairs))
    cases = tuple(dataclasses.replace(c, kept=kept) for c in cases)
    names = [c.name for c in cases]
    if len(set(names)) < len(names):  # one configuration from several machines: name each by its source
        cases = tuple(dataclasses.replace(c, name=f"{c.name} [{source_name(c.candidate)}]") if names.count(c.name) > 1
                      else c for c in cases)
    return CheckResult(tolerance=tolerance, accept_classes=tuple(accept_paths) or tuple(a.source for a in accept),
                       cases=cases)
