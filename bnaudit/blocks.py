"""The blocks that cross a file or process boundary, each decoded once into a frozen record.

A run's record carries derived blocks in ``extra``: its divergence from the mpmath
reference (``extra["divergence"]``, made by ``bnaudit.divergence``), the operator audit
(``extra["operator_audit"]``, made by ``bnaudit.audit``) and, for a ``--perturb`` run,
its chaos floor (``extra["perturbation"]``, made by ``bnaudit.worker``).  The run's
process also hands its parent a summary (``RunSummary``).  Each has exactly one
decoder here, ``from_json``, which validates field by field and raises one
``InputError`` line naming the file; every consumer (compare, check, matrix, the
reports) takes the decoded dataclass and never reads the raw dict.

numpy only (no torch, no mpmath), so the light stages can import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnaudit import bits
from bnaudit.errors import InputError
from bnaudit.fileio import b64decode, b64encode, json_number
from bnaudit.layout import after

DIVERGENCE_SCHEMA = "bnaudit.divergence/1"
AUDIT_SCHEMA = "bnaudit.audit/1"
METRICS = ("max_abs", "max_rel", "max_ulps", "correct_bits")
"""The four measures of a divergence series, per epoch row."""
ENCODING = {"max_abs": "<f4", "max_rel": "<f4", "max_ulps": "<f4", "correct_bits": "<f2"}
"""How each measure is stored in the block (base64 of these dtypes)."""
AUDIT_OPS = ("linear.out", "bn.mean", "bn.var", "bn.invstd", "bn.out")
"""The audited operators, in the order of a layer's computation."""


class Fields:
    """Typed field access on an untrusted JSON object, with messages naming where it came from."""

    def __init__(self, raw: Any, where: str) -> None:
        self.raw: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        """The value of ``key``, of type ``kind`` (a bool is never an int here); None if optional and absent."""
        if key not in self.raw or (self.raw[key] is None and optional):
            if optional:
                return None
            raise InputError(f"{self.where}: missing field {key!r}")
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise InputError(f"{self.where}: field {key!r} has the wrong type")
        return value

    def number(self, key: str, *, optional: bool = False) -> float | None:
        """A finite JSON number as a float."""
        value = self.get(key, (int, float), optional=optional)
        if value is None:
            return None
        if not math.isfinite(value):
            raise InputError(f"{self.where}: field {key!r} is not finite")
        return float(value)

    def integer(self, key: str, *, optional: bool = False, low: int = 0, high: int = 1 << 62) -> int | None:
        """An integer in [low, high]."""
        value = self.get(key, int, optional=optional)
        if value is not None and not low <= value <= high:
            raise InputError(f"{self.where}: field {key!r} is out of range")
        return value

    def integers(self, key: str, *, low: int = 0, high: int = 1 << 62) -> tuple[int, ...]:
        """A list of integers in [low, high]."""
        items = self.get(key, list)
        if not all(isinstance(i, int) and not isinstance(i, bool) and low <= i <= high for i in items):
            raise InputError(f"{self.where}: field {key!r} must be a list of integers in range")
        return tuple(items)

    def numbers(self, key: str, n: int | None = None) -> np.ndarray:
        """A list of JSON numbers as float64 (None items become NaN), of length n if given."""
        items = self.get(key, list)
        if not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in items):
            raise InputError(f"{self.where}: field {key!r} must be a list of numbers")
        if n is not None and len(items) != n:
            raise InputError(f"{self.where}: field {key!r} has {len(items)} values, expected {n}")
        return np.array([math.nan if v is None else v for v in items], dtype=np.float64)


# --------------------------------------------------------------------------- divergence

@dataclasses.dataclass(frozen=True)
class Series:
    """One measured series of a divergence block: a layer's weights or its activations."""

    layer: str
    """Layer with state (linear1, bn1, ...)."""
    kind: str
    """"linear" or "bn"."""
    what: str
    """"weights" (weight and bias, params.npy) or "activations" (output on the probe batch)."""
    half_bits_row: int | None
    """First epoch row with fewer than half the dtype's bits correct, or None."""
    half_bits_kept_row: int | None
    """First epoch row from which it stays below half, or None."""

    @property
    def name(self) -> str:
        return f"{self.layer} {self.what}"


@dataclasses.dataclass(frozen=True)
class LossBits:
    """Correct bits of the float64 losses a run reports, against the reference's."""

    rows: tuple[int, ...]
    """Epoch rows."""
    train: np.ndarray
    """Correct bits of the eval-mode training MSE per row (cap 53)."""
    test: np.ndarray
    """Correct bits of the test MSE per row."""


@dataclasses.dataclass(frozen=True)
class Fewest:
    """The fewest correct bits of a run (``DivergenceBlock.fewest``) and where they were fewest."""

    bits: float
    """Correct bits, in [0, precision]; shown rounded down (``bits.correct_bits_text``)."""
    row: int
    """Epoch row where they were fewest (``layout.after`` names it)."""
    series: str
    """The series: "<layer> weights" or "<layer> activations"."""
    precision: int
    """The run dtype's significand bits."""

    WHAT = "the fewest of any layer's weights or activations at any measured epoch"
    """What the number covers, in the words every view prints once beside it."""

    @property
    def text(self) -> str:
        """The one line every view prints: value (rounded down), where, and what it covers."""
        return (f"fewest correct bits {bits.correct_bits_text(self.bits)} of {self.precision} ({self.series}, "
                f"{after(self.row)}): {self.WHAT}")


@dataclasses.dataclass(frozen=True)
class DivergenceBlock:
    """A run's distance from the mpmath reference, per series and epoch row (``bnaudit.divergence``)."""

    storage: str
    """The run's storage dtype."""
    precision_bits: int
    """The dtype's significand bits: the cap of correct bits."""
    reference: Mapping[str, Any]
    """Which reference it was measured against (spec hash, digest, epochs, precisions)."""
    rows: tuple[int, ...]
    """Epoch rows measured."""
    series: tuple[Series, ...]
    """The series, in layer order (weights, then activations, per layer)."""
    max_abs: np.ndarray
    """(series, rows) largest |run - reference|."""
    max_rel: np.ndarray
    """(series, rows) largest elementwise relative error."""
    max_ulps: np.ndarray
    """(series, rows) largest ulp distance from the reference rounded to the run's dtype."""
    correct_bits: np.ndarray
    """(series, rows) -log2 of the normwise relative error, in [0, precision_bits]."""
    losses: LossBits | None
    """Correct bits of the reported losses, when measured."""

    @property
    def names(self) -> tuple[str, ...]:
        """Series names "<layer> <what>"."""
        return tuple(s.name for s in self.series)

    def fewest(self) -> Fewest:
        """The fewest correct bits: the one definition every view uses (check's bits:N, the report, the summary).

        Over every series (each layer's weights and its activations on the probe batch) at
        every measured epoch: a threshold holds for the run exactly when this does.  Raises
        ValueError when nothing was measured.
        """
        table = np.asarray(self.correct_bits, dtype=np.float64)
        if table.size == 0:
            raise ValueError("the divergence block measured nothing")
        i, j = np.unravel_index(int(np.argmin(np.where(np.isnan(table), np.inf, table))), table.shape)
        return Fewest(bits=float(table[i, j]), row=int(self.rows[j]), series=self.names[i],
                      precision=self.precision_bits)

    def to_json(self) -> dict[str, Any]:
        """The block as it is stored in ``extra["divergence"]`` (``from_json`` reads it back exactly)."""
        out: dict[str, Any] = {
            "schema": DIVERGENCE_SCHEMA, "reference": dict(self.reference), "storage": self.storage,
            "precision_bits": self.precision_bits, "rows": list(self.rows),
            "series": [{"layer": s.layer, "kind": s.kind, "what": s.what, "half_bits_row": s.half_bits_row,
                        "half_bits_kept_row": s.half_bits_kept_row} for s in self.series],
            "encoding": dict(ENCODING),
        }
        for k in METRICS:
            out[k] = b64encode(np.asarray(getattr(self, k), dtype=ENCODING[k]))
        if self.losses is not None:
            out["losses"] = {"rows": list(self.losses.rows), "train_bits": [float(b) for b in self.losses.train],
                             "test_bits": [float(b) for b in self.losses.test],
                             "note": "correct bits of the float64 loss the run reports, cap 53"}
        return out

    def last_bits(self) -> tuple[int, dict[str, float]] | None:
        """(last row, correct bits per series name there), or None when no row was measured."""
        if not self.rows:
            return None
        return self.rows[-1], {s.name: float(b) for s, b in zip(self.series, self.correct_bits[:, -1])}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> DivergenceBlock:
        where = f"{where}: divergence block"
        f = Fields(raw, where)
        if f.get("schema", str) != DIVERGENCE_SCHEMA:
            raise InputError(f"{where}: schema is not {DIVERGENCE_SCHEMA}")
        storage = f.get("storage", str)
        if storage not in bits.STORAGES:
            raise InputError(f"{where}: unknown storage dtype {storage[:20]!r}")
        precision = f.integer("precision_bits", low=1, high=64)
        assert precision is not None
        rows = f.integers("rows")
        series = []
        for item in f.get("series", list):
            s = Fields(item, f"{where} series")
            series.append(Series(layer=s.get("layer", str), kind=s.get("kind", str), what=s.get("what", str),
                                 half_bits_row=s.integer("half_bits_row", optional=True),
                                 half_bits_kept_row=s.integer("half_bits_kept_row", optional=True)))
        shape = (len(series), len(rows))
        tables = {k: b64decode(f.get(k, str), ENCODING[k], shape, where, k).astype(np.float64) for k in METRICS}
        cb = tables["correct_bits"]
        if np.isnan(cb).any() or (cb < 0).any() or (cb > precision).any():
            raise InputError(f"{where}: correct bits hold NaN or values outside [0, {precision}]")
        losses = None
        if f.get("losses", dict, optional=True) is not None:
            lf = Fields(f.get("losses", dict), f"{where} losses")
            lrows = lf.integers("rows")
            losses = LossBits(rows=lrows, train=lf.numbers("train_bits", len(lrows)),
                              test=lf.numbers("test_bits", len(lrows)))
        return cls(storage=storage, precision_bits=precision, reference=dict(f.get("reference", dict)),
                   rows=rows, series=tuple(series), max_abs=tables["max_abs"], max_rel=tables["max_rel"],
                   max_ulps=tables["max_ulps"], correct_bits=cb, losses=losses)


# --------------------------------------------------------------------------- operator audit

@dataclasses.dataclass(frozen=True)
class AuditFlag:
    """A BN unit whose batch statistics make it ill-conditioned at an audited row."""

    row: int
    """Epoch row."""
    layer: str
    """BN layer."""
    unit: int
    """Unit (column) of the layer."""
    var_over_eps: float
    """Biased batch variance over eps."""
    mean_over_std: float | None
    """|mean| / std of the batch (None where the variance is 0)."""
    amplification: float
    """max|x| / sqrt(var + eps): how much BN magnifies its inputs' absolute errors."""
    why: tuple[str, ...]
    """Which thresholds it crossed, in words."""


@dataclasses.dataclass(frozen=True)
class AuditBlock:
    """Local error of each operator, recomputed exactly from the run's own inputs (``bnaudit.audit``)."""

    every: int
    """Audit period in epochs."""
    storage: str
    """The run's dtype (bf16-mixed runs are skipped)."""
    rows: tuple[int, ...]
    """Epoch rows audited."""
    errors: Mapping[str, Mapping[str, np.ndarray]]
    """layer -> operator -> error in ulps at the operator's scale, per audited row."""
    max_amplification: Mapping[str, np.ndarray]
    """BN layer -> largest amplification per audited row."""
    flags: tuple[AuditFlag, ...]
    """The first flagged BN units (at most 200)."""
    n_flags: int
    """How many units were flagged in all."""
    mean_over_std_flag: float
    """The |mean|/std threshold of a flag."""
    skipped: str | None
    """Why the audit did not run, or None."""

    def worst(self) -> dict[str, dict[str, float]]:
        """layer -> operator -> largest error over the audited rows."""
        return {layer: {op: float(np.max(v)) for op, v in ops.items() if v.size} for layer, ops in self.errors.items()}

    def per_operator(self) -> dict[str, np.ndarray]:
        """operator -> largest error over its layers, per audited row."""
        out: dict[str, np.ndarray] = {}
        for ops in self.errors.values():
            for op, values in ops.items():
                out[op] = np.fmax(out[op], values) if op in out else values
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> AuditBlock:
        where = f"{where}: operator-audit block"
        f = Fields(raw, where)
        if f.get("schema", str) != AUDIT_SCHEMA:
            raise InputError(f"{where}: schema is not {AUDIT_SCHEMA}")
        rows = f.integers("rows")
        errors: dict[str, dict[str, np.ndarray]] = {}
        for layer, per_op in f.get("errors", dict).items():
            ops = Fields(per_op, f"{where} errors")
            errors[str(layer)] = {str(op): ops.numbers(op, len(rows)) for op in per_op}
        amps = Fields(f.get("max_amplification", dict), f"{where} max_amplification")
        flags = []
        for item in f.get("flags", list):
            g = Fields(item, f"{where} flag")
            why = g.get("why", list)
            flags.append(AuditFlag(row=g.integer("row") or 0, layer=g.get("layer", str), unit=g.integer("unit") or 0,
                                   var_over_eps=g.number("var_over_eps") or 0.0,
                                   mean_over_std=g.number("mean_over_std", optional=True),
                                   amplification=g.number("amplification") or 0.0,
                                   why=tuple(str(w) for w in why)))
        thresholds = Fields(f.get("thresholds", dict), f"{where} thresholds")
        return cls(every=f.integer("every") or 0, storage=f.get("storage", str), rows=rows, errors=errors,
                   max_amplification={str(k): amps.numbers(k) for k in amps.raw},
                   flags=tuple(flags), n_flags=f.integer("n_flags") or 0,
                   mean_over_std_flag=thresholds.number("mean_over_std") or 0.0,
                   skipped=f.get("skipped", str, optional=True))


# --------------------------------------------------------------------------- chaos floor

@dataclasses.dataclass(frozen=True)
class ChaosFloor:
    """How a --perturb run's one-element perturbation grows against its unperturbed twin (``bnaudit.worker``)."""

    twin_digest_rows: tuple[str, ...]
    """The twin's digest of each epoch row (16 hex digits): the unperturbed run, for checking."""
    max_abs: np.ndarray
    """Largest |Δ parameter| from the twin at each epoch row (float64, exact)."""
    max_ulps: tuple[int, ...]
    """Largest ulp distance from the twin at each epoch row, in the run's dtype."""
    growth_rate: float | None
    """Growth of ln(max |Δ|) per epoch before saturation, or None."""
    saturation_row: int | None
    """Epoch row at which the divergence saturates, or None."""

    def to_json(self) -> dict[str, Any]:
        """The block as stored in ``extra["perturbation"]`` (``from_json`` reads it back exactly)."""
        return {"twin_digest_rows": list(self.twin_digest_rows), "max_abs": bits.to_hex(self.max_abs, "float64"),
                "max_ulps": [int(u) for u in self.max_ulps], "growth_rate": self.growth_rate,
                "saturation_row": self.saturation_row}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> ChaosFloor:
        where = f"{where}: perturbation block"
        f = Fields(raw, where)
        digests = f.get("twin_digest_rows", list)
        if not all(isinstance(d, str) and len(d) == 16 for d in digests):
            raise InputError(f"{where}: malformed twin digests")
        try:
            max_abs = bits.from_hex(f.get("max_abs", list), "float64")
        except ValueError:
            raise InputError(f"{where}: malformed max_abs") from None
        ulps = f.integers("max_ulps", high=np.iinfo(np.int64).max)
        if not len(max_abs) == len(ulps) == len(digests):
            raise InputError(f"{where}: its series have different lengths")
        return cls(twin_digest_rows=tuple(digests), max_abs=np.asarray(max_abs, dtype=np.float64), max_ulps=ulps,
                   growth_rate=f.number("growth_rate", optional=True),
                   saturation_row=f.integer("saturation_row", optional=True))


# --------------------------------------------------------------------------- ensemble outcomes

ENSEMBLE_OUTCOMES_SCHEMA = "bnaudit.ensemble-outcomes/1"
OUTCOME_NAMES = ("test_mse", "train_mse")
"""A run's outcomes (an ensemble's, an ensemble baseline's): final eval-mode test and train MSE; test first."""
OUTCOME_WORDS = {"test_mse": "final test MSE", "train_mse": "final train MSE"}


def outcome_series(name: str, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The per-epoch series an outcome is the last value of (rows: the initial state, then each epoch)."""
    return test if name == "test_mse" else train
MAX_ENSEMBLE_SEEDS = 100_000


@dataclasses.dataclass(frozen=True)
class EnsembleOutcomes:
    """A baseline's ensemble (``extra.baseline.ensemble``): one configuration's outcomes over many seeds,
    what ``check --tolerance dist:RATE`` holds a run's outcome to."""

    config: str
    """The ensemble's configuration, e.g. ``bn isa=default``."""
    scope: tuple[str, ...]
    """What each seed drew (``spec.SEED_STREAMS``)."""
    unseeded: str
    """sha256 of the experiment with the seeded streams at seed 0 (``spec.with_seed(spec, 0, scope)``):
    every seed of one experiment has this hash, another experiment another."""
    epochs: int
    seeds: tuple[int, ...]
    digests: tuple[str, ...]
    """Each seed's run digest."""
    values: dict[str, tuple[float, ...]]
    """Each outcome's value per seed (float64, exact as JSON numbers; "nan"/"inf" where not finite)."""

    def to_json(self) -> dict[str, Any]:
        return {"schema": ENSEMBLE_OUTCOMES_SCHEMA, "config": self.config, "scope": list(self.scope),
                "unseeded": self.unseeded, "epochs": self.epochs, "seeds": list(self.seeds),
                "digests": list(self.digests),
                **{name: [json_number(v) for v in self.values[name]] for name in OUTCOME_NAMES}}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> EnsembleOutcomes:
        where = f"{where}: ensemble block"
        f = Fields(raw, where)
        if f.get("schema", str) != ENSEMBLE_OUTCOMES_SCHEMA:
            raise InputError(f"{where}: schema is not {ENSEMBLE_OUTCOMES_SCHEMA}")
        seeds = f.integers("seeds", high=(1 << 63) - 1)
        if not 2 <= len(seeds) <= MAX_ENSEMBLE_SEEDS or len(set(seeds)) != len(seeds):
            raise InputError(f"{where}: seeds must be at least two distinct seeds")
        digests = f.get("digests", list)
        scope = f.get("scope", list)
        unseeded = f.get("unseeded", str)
        if (len(digests) != len(seeds) or not all(isinstance(d, str) and len(d) == 64 for d in digests)
                or not scope or not all(s in ("data", "init", "order") for s in scope)
                or len(unseeded) != 64):
            raise InputError(f"{where}: malformed digests, scope or unseeded hash")
        values = {}
        for name in OUTCOME_NAMES:
            items = f.get(name, list)
            if len(items) != len(seeds) or not all(
                    v in ("nan", "inf", "-inf") or (isinstance(v, int | float) and not isinstance(v, bool))
                    for v in items):
                raise InputError(f"{where}: field {name!r} must hold one number per seed")
            values[name] = tuple(float(v) for v in items)
        config = f.get("config", str)
        return cls(config=config[:200], scope=tuple(scope), unseeded=unseeded,
                   epochs=int(f.integer("epochs", low=1) or 1), seeds=seeds, digests=tuple(digests), values=values)


# --------------------------------------------------------------------------- run summary

@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a run's process reports to its parent when the record is written (``bnaudit.worker``)."""

    out: str
    """The record folder."""
    digest: str
    """The run's fingerprint digest."""
    spec_hash: str
    """The experiment's spec hash."""
    config: Mapping[str, Any]
    """The run request (``RunConfig.to_dict``)."""
    effective: Mapping[str, Any]
    """Controls as read back in the run's process."""
    epochs: int
    """Epochs run."""
    train_loss: float
    """Final eval-mode training MSE."""
    test_loss: float
    """Final test MSE."""
    nonfinite: Mapping[str, Any] | None
    """The first non-finite tensor, or None."""
    train_seconds: float
    """Wall time of the instrumented training loop."""
    process_seconds: float
    """Wall time of the run's process."""
    cpu_model: str | None
    """The emulated CPU model, or None for a native run."""
    divergence: DivergenceBlock | None
    """Divergence from the mpmath reference, when one is stored."""
    audit: AuditBlock | None
    """The operator audit, when it ran."""
    floor: ChaosFloor | None
    """The chaos floor of a --perturb run (None for any other run)."""

    @classmethod
    def from_json(cls, raw: Any, where: str = "the run process's summary") -> RunSummary:
        f = Fields(raw, where)
        extra = Fields(f.get("extra", dict), where)
        div = extra.get("divergence", dict, optional=True)
        aud = extra.get("operator_audit", dict, optional=True)
        floor = extra.get("perturbation", dict, optional=True)
        return cls(out=f.get("out", str), digest=f.get("digest", str), spec_hash=f.get("spec_hash", str),
                   config=f.get("config", dict), effective=f.get("effective", dict),
                   epochs=f.integer("epochs") or 0, train_loss=float(f.get("train_loss", (int, float))),
                   test_loss=float(f.get("test_loss", (int, float))),
                   nonfinite=f.get("nonfinite", dict, optional=True),
                   train_seconds=float(f.get("train_seconds", (int, float))),
                   process_seconds=float(f.get("process_seconds", (int, float))),
                   cpu_model=f.get("cpu_model", str, optional=True),
                   divergence=None if div is None else DivergenceBlock.from_json(div, where),
                   audit=None if aud is None else AuditBlock.from_json(aud, where),
                   floor=None if floor is None else ChaosFloor.from_json(floor, where))
