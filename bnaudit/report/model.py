"""The report's model: what every format (figures, HTML, Markdown, terminal) presents.

``build`` turns the input folders into one ``Report``; the format modules read it (and
the shared ``tables``) and nothing else of the report package, as pip-audit's output
formats depend only on its result model and diffoscope's presenters only on their base.
Frozen dataclasses of plain values and numpy arrays: no torch, no mpmath, no rich, no
matplotlib.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from bnaudit.amplification import Beside
from bnaudit.blocks import Fewest
from bnaudit.compare import Difference
from bnaudit.controls import Controls, Perturbation, promote_text
from bnaudit.record import Record
from bnaudit.spec import ExperimentSpec

CONTROL_KEYS = tuple(f.name for f in dataclasses.fields(Controls))
"""The controls a run asks for, in ``Controls`` field order (dtype, threads, isa, ...)."""
SECTIONS = {
    "heatmap": "1. Divergence heatmaps: layer by epoch",
    "growth": "2. Divergence growth",
    "bn": "3. BatchNorm conditioning monitor",
    "seed": "4. The seed's figures: learned function and error over epochs",
    "matrix": "5. Matrix summary",
}
"""The report's figure sections in reading order, after the findings and the environment: the
divergence first, then the seed page's own figures (key -> heading; every format shows them so)."""


@dataclasses.dataclass(frozen=True)
class RunEntry:
    """One run of the report, with what the figures need from its record."""

    label: str
    """Display name: the matrix's run folder name, or the configuration label."""
    path: Path
    """The record folder."""
    record: Record
    """The loaded, verified record."""
    controls: Controls
    """Controls the run asked for (dtype, threads, isa, deterministic, ...)."""
    perturb: Perturbation | None
    """The initial-state perturbation (tensor, index, ulps), or None."""
    class_name: str
    """Name of its equivalence class of bit-identical runs ("A", "B", ...)."""

    @property
    def epochs(self) -> int:
        return self.record.fingerprint.epochs

    @property
    def storage(self) -> str:
        return self.record.storage

    @property
    def perturb_text(self) -> str:
        """The perturbation as ``--perturb`` takes it (``linear1.weight[0,0]:+1``), or ""."""
        return "" if self.perturb is None else str(self.perturb)

    @property
    def config_text(self) -> str:
        c = self.controls
        parts = [c.dtype, f"{c.threads} thread(s)", f"isa {c.isa}",
                 "deterministic" if c.deterministic else "non-deterministic"]
        for key in ("onednn_isa", "mkl_cbwr", "cpu_model"):
            value = getattr(c, key)
            if value:
                parts.append(f"{key} {value}")
        if c.promote:
            parts.append(f"promote {promote_text(c.promote)}")
        if self.perturb:
            parts.append(f"perturb {self.perturb_text}")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """An equivalence class: runs whose fingerprints are bit-identical."""

    name: str
    """"A", "B", ... in order of first appearance."""
    digest: str
    """The members' common overall digest (sha256 hex)."""
    members: tuple[str, ...]
    """Labels of its runs."""
    shared: str
    """What every member has in common (controls with one value across the class)."""
    storage: str
    """Storage dtype of its members."""


@dataclasses.dataclass(frozen=True)
class LearnedFunction:
    """A run's network at its final parameters, evaluated in float64 with BN in eval mode."""

    grid_x: np.ndarray
    """Dense x grid over the data range (noise feature 0)."""
    grid_y: np.ndarray
    """Network output on the grid."""
    sample_y: np.ndarray
    """Network output at each sample (train rows first), with its real noise feature."""


@dataclasses.dataclass(frozen=True)
class PairView:
    """Two runs of one storage dtype compared (through ``bnaudit.compare``)."""

    a: str
    """Label of the first run (the baseline)."""
    b: str
    """Label of the second run."""
    kind: str
    """"pair" (two configurations) or "perturb" (a --perturb run against its unperturbed twin)."""
    identical: bool
    """All digests equal."""
    first_text: str
    """Where they first part, in words ("" when identical)."""
    first_detail: str
    """How much differs there (share of elements, ulps), in words ("" when unknown)."""
    first_epoch_row: int | None
    """Epoch row of the first difference (0 = initial state or a step of epoch 0)."""
    first_layer: str | None
    """Module of the first difference."""
    rows: np.ndarray
    """Epoch rows of the divergence table."""
    layers: tuple[str, ...]
    """Layers of the divergence table."""
    max_abs: np.ndarray
    """(rows, layers) largest |a - b| over each layer's parameters."""
    max_ulps: np.ndarray
    """(rows, layers) largest ulp distance in the runs' storage dtype."""
    growth_rate: float | None
    """Growth of the divergence per epoch, natural-log units, before saturation."""
    saturation_epoch: int | None
    """Epoch at which the divergence saturates, if it does."""
    environment_diff: tuple[tuple[str, object, object], ...]
    """Environment facts that differ, most likely causes first."""
    exact: Beside | None = None
    """The divergence beside the exact-arithmetic amplification over the same rows (where measured)."""
    first: Difference | None = None
    """The first difference itself (``compare``'s), which ``first_text`` and ``first_detail`` put in words."""
    closer: dict[str, str] | None = None
    """Layer -> "a", "b" or "tie": whose weights keep more correct bits (``divergence.closer``); None: not both
    carry a reference."""

    @property
    def title(self) -> str:
        return f"{self.b} vs {self.a}"


@dataclasses.dataclass(frozen=True)
class ReferenceView:
    """One run's divergence from the mpmath reference, as layer tables (from its ``DivergenceBlock``)."""

    rows: np.ndarray
    """Epoch rows measured."""
    layers: tuple[str, ...]
    """Layers with state (linear1, bn1, ..., linear6)."""
    correct_bits: np.ndarray
    """(rows, layers) correct bits of each layer's weight and bias, capped at the dtype's precision."""
    activation_bits: np.ndarray
    """(rows, layers) correct bits of each layer's output on the probe batch (NaN where not measured)."""
    precision: int
    """The run dtype's significand bits (the cap)."""
    fewest: Fewest
    """The run's fewest correct bits (``DivergenceBlock.fewest``: any layer's weights or activations, any epoch)."""


@dataclasses.dataclass(frozen=True)
class AuditView:
    """Operator-audit errors of one run, in ulps, per operator (from its ``AuditBlock``)."""

    rows: np.ndarray
    """Epoch rows audited."""
    operators: dict[str, np.ndarray]
    """Operator (linear.out, bn.mean, bn.var, bn.invstd, bn.out) -> largest error over its layers per row."""
    flags: int
    """BN units flagged (variance near eps, or large |mean|/std)."""
    max_amplification: float
    """Largest BN amplification max|x| / sqrt(var + eps) seen (NaN when not recorded)."""


@dataclasses.dataclass(frozen=True)
class FloorView:
    """The 1-ulp sensitivity baseline a --perturb run carries (from its ``ChaosFloor``)."""

    rows: np.ndarray
    """Epoch rows."""
    max_abs: np.ndarray
    """Largest |Δ parameter| from the unperturbed twin at each row."""
    growth_rate: float | None
    """Growth per epoch (natural-log units) before saturation."""
    saturation_row: int | None
    """Epoch row of saturation, if any."""
    exact: Beside | None = None
    """The floor beside the exact-arithmetic amplification over the same rows (where measured)."""


@dataclasses.dataclass(frozen=True)
class FigureInfo:
    """One written figure and the words that go with it."""

    path: str
    """The PNG's file name relative to the report folder (figures/NAME.png)."""
    svg: str
    """The same figure as SVG, relative to the report folder (figures/NAME.svg)."""
    section: str
    """Key of SECTIONS it belongs to."""
    title: str
    """Its title (also the figure's own suptitle)."""
    caption: str
    """What it shows and what to look at."""
    width: int
    """Width shown, in CSS pixels (the PNG holds ``figures.PNG_SCALE`` times as many)."""
    height: int
    """Height shown, in CSS pixels."""


@dataclasses.dataclass(frozen=True)
class Report:
    """Everything the figures, HTML, Markdown and terminal views show."""

    spec: ExperimentSpec
    """The one experiment every run belongs to."""
    sources: tuple[str, ...]
    """The folders given on the command line."""
    runs: tuple[RunEntry, ...]
    """Every run, in input order."""
    classes: tuple[ClassInfo, ...]
    """Equivalence classes of bit-identical runs."""
    learned: dict[str, LearnedFunction]
    """Run label -> its learned function."""
    pairs: tuple[PairView, ...]
    """Pairs compared (class representatives against the baseline, perturbed runs against their twins)."""
    references: dict[str, ReferenceView]
    """Run label -> divergence from the reference, for runs that carry one."""
    audits: dict[str, AuditView]
    """Run label -> operator-audit errors, for runs that carry them."""
    floors: dict[str, FloorView]
    """Perturbed run label -> its chaos floor, for --perturb runs that carry one."""
    findings: tuple[str, ...]
    """The matrix's findings in sentences (its summary.json "findings"), when a matrix folder was given."""
    notes: tuple[str, ...]
    """What the report could not show, and why."""
    x: np.ndarray
    """x of every sample (train rows first)."""
    targets: np.ndarray
    """Target of every sample."""
    n_train: int
    """The first n_train samples train."""
    exact_rows: np.ndarray | None = None
    """Epoch rows of the experiment's exact sensitivity (``reference sensitivity --save``), if stored."""
    exact_log: np.ndarray | None = None
    """ln of the exact trajectories' distance at those rows."""
    lengths: tuple[int, ...] = ()
    """Each run's epochs, in input order; when they differ, classes and pairs are over the first min of them
    (``compare.prefix_text`` says so in the header)."""

    def run(self, label: str) -> RunEntry:
        for r in self.runs:
            if r.label == label:
                return r
        raise KeyError(label)

    @property
    def varying_controls(self) -> list[str]:
        """Controls with more than one value across the runs (and "perturb" if any run is perturbed)."""
        keys = [k for k in CONTROL_KEYS if len({getattr(r.controls, k) for r in self.runs}) > 1]
        if any(r.perturb for r in self.runs):
            keys.append("perturb")
        return keys
