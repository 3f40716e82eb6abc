"""What a matrix found: the summary's records (``summary`` fills them), each with its JSON form."""

from __future__ import annotations

import dataclasses
from typing import Any

from bnaudit._version import __version__
from bnaudit.controls import promote_text
from bnaudit.fileio import json_number
from bnaudit.layout import PHASES
from bnaudit.matrix.plan import INHERIT

SUMMARY_SCHEMA = "bnaudit.matrix-summary/1"

_PHASE_ORDER = {p: i for i, p in enumerate(PHASES)}


def shown(control: str, value: Any) -> str:
    """A control's value for people: native CPU, inherited caps, on/off, promoted operations joined by +."""
    if control == "promote":
        return promote_text(value)
    if value is None:
        return "native" if control == "cpu_model" else INHERIT
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Change:
    """Where one configuration first parts from another (a ``compare.Difference``, flattened)."""

    epoch: int
    """0-based epoch."""
    step: int | None
    """Step within the epoch, or None for an epoch-level difference."""
    phase: str
    """init, forward, backward, update or eval."""
    layer: str
    """Module name or "loss"."""
    tensor: str | None
    """Tensor name, when known."""
    where: str
    """One line for people."""
    a: str
    """Key of the first run of the pair."""
    b: str
    """Key of the second run."""

    def position(self) -> tuple[int, int, int, int]:
        """Timeline order: initial state < steps of epoch e < end of epoch e < steps of epoch e+1."""
        if self.phase == "init":
            return (self.epoch, 0, 0, 0)
        if self.step is not None:
            return (self.epoch, 1, self.step, _PHASE_ORDER.get(self.phase, 9))
        return (self.epoch, 2, 0, _PHASE_ORDER.get(self.phase, 9))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Largest:
    """The largest parameter divergence between two configurations."""

    max_abs: float
    """Largest |a - b| over parameters and epoch rows (float64 of the stored values)."""
    max_ulps: int | None
    """Largest ulp distance in the storage dtype (None across storage dtypes)."""
    row: int
    """Epoch row where max_abs is reached."""
    layer: str
    """Layer where max_abs is reached."""
    a: str
    """Key of the first run."""
    b: str
    """Key of the second run."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_abs"] = json_number(self.max_abs)
        return d


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One configuration of the matrix and what became of it."""

    key: str
    """Folder below runs/."""
    variant: str
    """Experiment variant."""
    controls: dict[str, Any]
    """The controls asked for."""
    status: str
    """"ran" (now), "resumed" (found complete), "failed" or "pending"."""
    digest: str | None
    """Overall fingerprint digest."""
    class_index: int | None
    """1-based equivalence class within the variant."""
    capability: str | None
    """torch's effective CPU capability."""
    threads_read_back: int | None
    """Intra-op threads read back in the run's process."""
    emulated_model: str | None
    """qemu CPU model the run's process saw (resolved: Haswell for seed-i7)."""
    train_seconds: float | None
    """Wall time of the training loop."""
    slowdown: float | None
    """train_seconds over the native twin's (emulated runs with a native twin in the grid)."""
    final_train_loss: float | None
    """Eval-mode training MSE at the last epoch."""
    final_test_loss: float | None
    """Eval-mode test MSE at the last epoch."""
    nonfinite: bool
    """Whether a non-finite value appeared."""
    error: str | None
    """The failure's one line."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("train_seconds", "slowdown", "final_train_loss", "final_test_loss"):
            d[k] = json_number(d[k])
        return d


@dataclasses.dataclass(frozen=True)
class ClassRow:
    """A ``compare.EquivalenceClass`` of one variant's runs, as the matrix shows it.

    ``summary.classes`` builds it from compare's class; the fields beyond digest and members
    are for display: the variant, an index, the controls the members share, and the
    correct bits of the first member against the mpmath reference.
    """

    variant: str
    """Experiment variant."""
    index: int
    """1-based, in grid order of first member."""
    digest: str
    """The shared digest."""
    members: tuple[str, ...]
    """Run keys."""
    shared: dict[str, Any]
    """Controls every member has in common but the variant's runs do not all share."""
    reference: dict[str, float] | None
    """Correct bits against the mpmath reference per series ("linear1 weights", ...) at the last
    epoch row the first member's divergence block holds (``DivergenceBlock.last_bits``), when present."""
    reference_row: int | None = None
    """The epoch row of ``reference``."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["members"] = list(self.members)
        d["reference"] = None if self.reference is None else {k: json_number(v) for k, v in self.reference.items()}
        return d


@dataclasses.dataclass(frozen=True)
class ControlVerdict:
    """Does one control change the bits? From pairs of configurations that differ in it alone."""

    variant: str
    """Experiment variant."""
    control: str
    """A ``Controls`` field (``plan.CONTROL_FIELDS``)."""
    values: tuple[Any, ...]
    """The values it takes in the grid."""
    pairs: int
    """Pairs compared."""
    differing: int
    """Pairs whose fingerprints differ."""
    largest: Largest | None
    """Largest divergence among the differing pairs."""
    first: Change | None
    """The earliest first difference among the differing pairs (its layer and tensor)."""
    firsts: tuple[tuple[str, int], ...]
    """Every distinct first (phase layer tensor) among the differing pairs, with how many pairs."""
    by_dtype: tuple[tuple[str, int, int], ...] = ()
    """(dtype, differing pairs, pairs) for each dtype of the grid (dtype itself excepted)."""

    @property
    def changes_bits(self) -> bool:
        return self.differing > 0

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "control": self.control, "values": list(self.values), "pairs": self.pairs,
                "differing": self.differing, "changes_bits": self.changes_bits,
                "largest": None if self.largest is None else self.largest.to_dict(),
                "first": None if self.first is None else self.first.to_dict(),
                "firsts": [[w, n] for w, n in self.firsts],
                "by_dtype": [[d, n, m] for d, n, m in self.by_dtype]}


@dataclasses.dataclass(frozen=True)
class IsaAgreement:
    """Two ``--isa`` settings compared under every combination of the other controls."""

    variant: str
    """Experiment variant."""
    a: str
    """First --isa value, e.g. "default"."""
    b: str
    """Second ISA setting."""
    compared: int
    """Combinations of the other controls under which both ran."""
    agree: tuple[dict[str, Any], ...]
    """The combinations (other controls' values) under which a and b agree bit for bit."""

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "a": self.a, "b": self.b, "compared": self.compared,
                "agree": [dict(c) for c in self.agree]}


@dataclasses.dataclass(frozen=True)
class MachinePair:
    """Two CPUs (emulated or this one) running the same configuration: where and how they part."""

    variant: str
    """Experiment variant."""
    a: str
    """Run key on the first CPU."""
    b: str
    """Run key on the second CPU."""
    cpu_a: str
    """First CPU (cpu_model value, or "native")."""
    cpu_b: str
    """Second CPU."""
    controls: dict[str, Any]
    """The controls both share (cpu_model aside)."""
    identical: bool
    """Bit-identical fingerprints."""
    first: Change | None
    """Where they first part."""
    growth_rate: float | None
    """ln(max parameter divergence) per epoch before saturation (compare.growth)."""
    saturation_epoch: int | None
    """Epoch row where the divergence stops growing, if it does."""
    series: tuple[tuple[int, float], ...]
    """(epoch row, max |a - b| over all parameters) at a few rows."""
    closer_to_reference: dict[str, str] | None
    """layer -> "a" | "b" | "tie", when both records carry a reference divergence."""
    final_train_loss: tuple[float, float]
    """Eval-mode training MSE at the last epoch on a and on b."""
    float64_distance: tuple[tuple[int, float, float], ...] = ()
    """(epoch row, max |a - a64|, max |b - b64|): each run's parameter distance from the float64 run of the
    same configuration on its own CPU, when the grid has one (a proxy for exact arithmetic while the
    trajectory stays well-conditioned; empty for float64 pairs or without float64 runs)."""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["float64_distance"] = [[r, json_number(x), json_number(y)] for r, x, y in self.float64_distance]
        d["first"] = None if self.first is None else self.first.to_dict()
        d["growth_rate"] = json_number(self.growth_rate)
        d["series"] = [[r, json_number(v)] for r, v in self.series]
        d["final_train_loss"] = [json_number(v) for v in self.final_train_loss]
        return d


@dataclasses.dataclass(frozen=True)
class MatrixSummary:
    """Everything `bnaudit matrix` reports; JSON, tables and Markdown all come from it."""

    plan_id: str
    """Hash of the matrix's experiment and grid."""
    preset: str | None
    """The preset, if any."""
    folder: str
    """The matrix folder."""
    epochs: int
    """Epochs of every run."""
    variants: tuple[tuple[str, str], ...]
    """(name, spec hash) of each experiment variant."""
    grid: dict[str, list[Any]]
    """The controls' values."""
    runs: tuple[RunRow, ...]
    """Every configuration."""
    classes: tuple[ClassRow, ...]
    """Equivalence classes of identical fingerprints, per variant."""
    verdicts: tuple[ControlVerdict, ...]
    """For each control that varies: does it change the bits."""
    isa_agreement: tuple[IsaAgreement, ...]
    """Which combination makes two ISA settings agree bit for bit."""
    machines: tuple[MachinePair, ...]
    """Pairs of configurations that differ in the CPU (cpu_model) alone."""
    wall_seconds: float | None
    """Wall time of this invocation's execution (None when only summarised)."""
    notes: tuple[str, ...]
    """Caveats (failed runs, missing reference, ...)."""
    findings: tuple[str, ...] = ()
    """The answers in sentences (``findings.findings``), derived from the fields above."""
    hosts: tuple[str, ...] = ()
    """The CPUs that ran the finished runs (their records' ``cpu_model``): the machine the findings hold on."""

    @property
    def complete(self) -> bool:
        return all(r.status in ("ran", "resumed") for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SUMMARY_SCHEMA,
            "bnaudit": __version__,
            "plan_id": self.plan_id,
            "preset": self.preset,
            "folder": self.folder,
            "epochs": self.epochs,
            "variants": [{"name": n, "spec_hash": h} for n, h in self.variants],
            "grid": self.grid,
            "complete": self.complete,
            "runs": [r.to_dict() for r in self.runs],
            "classes": [c.to_dict() for c in self.classes],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "isa_agreement": [a.to_dict() for a in self.isa_agreement],
            "machines": [m.to_dict() for m in self.machines],
            "wall_seconds": json_number(self.wall_seconds),
            "notes": list(self.notes),
            "findings": list(self.findings),
            "hosts": list(self.hosts),
        }
