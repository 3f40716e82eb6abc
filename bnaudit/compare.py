"""Pure comparison of runs: bit-identical or where they part, how far apart, and why.

Works on ``record.Fingerprint`` objects (``record.load`` gives one for a fingerprint file,
a record folder or its record.json), so it runs anywhere: numpy only, no torch, no
mpmath, no rich.  Rendering lives in ``bnaudit.report.compare_view``.

What can be compared depends on what both inputs carry; every comparison uses the finest
detail both have and says which it used (``granularity``):

- traced steps (epoch 0 always, others with ``--trace-epochs``): a 64-bit digest of every
  tensor of the step, in both records and fingerprints -> "step";
- epoch rows (``layout.after``: 0 the initial state, r after epoch r): a 64-bit digest per tensor in
  records -> "epoch-tensor"; a 32-bit digest per (phase, layer) group in fingerprints ->
  "epoch-group";
- parameter values: at every epoch row in records, at ``layout.keyframe_schedule(epochs)``
  in fingerprints.  Where both have values, element counts and ulp distances (in the
  runs' storage dtype, ``bits.ulp_distance``) are exact; where only digests exist
  (tensors inside a step), only "differs" is known.

Where two runs part is told as the training's story, then the side passes:

- **the training split** (``first``): the first differing tensor of the training
  computation, on the timeline epoch row 0's state (phase "init": a --perturb run) <
  the traced steps of epoch 0 (forward < backward < update, tensors in computation
  order) < epoch row 1's state < traced steps of epoch 1, if any < epoch row 2 < ...
  Within an epoch row, tensors (or groups) are taken in the layout's order: running
  statistics, last gradients, momentum buffers and parameters.  At the first traced
  step (epoch 0, step 0) both inputs carry every tensor's values (``firststep``), so the
  share of elements that differ and their ulps are exact there too.
- **the eval pass** (``eval_first``): the first epoch row whose eval-mode activations or
  losses differ.  It never feeds back into training: at row 0 it is the eval pass over
  the (identical) initial parameters, and it can differ while the training has not.
- **the probe pass** (``probe_first``, two records only): the first probe row and module
  whose train-mode activations of the fixed probe batch differ in their bits.  A side
  pass outside the digest, so it never changes the verdict.

Growth and saturation (``growth``): the series is the largest absolute parameter
difference over all layers at each epoch row both runs have values for.

- Growing phase: from the first row with a non-zero difference up to the saturation row.
- Saturation row: the first row whose difference comes within a factor of 10 of the
  largest difference reached, *provided* the difference has stopped growing there: at
  least 3 rows from it on, whose least-squares slope of ln(difference) per epoch is at most
  a quarter of the growth rate.  Otherwise (still growing at the end) there is none.
- Growth rate: least-squares slope of ln(difference) per epoch over the growing phase
  (natural-log units per epoch; ln 10 = 2.30 is a tenfold increase per epoch).
- ``growth_window``: the same series as an ``amplification.Window`` from its first
  non-zero row to the saturation row (or its last row): slope, endpoint rate and the
  range over sub-windows; ``exact``: the part of it where the difference is still small
  (``amplification.SMALL``) beside the experiment's exact sensitivity
  (``amplification.beside``), when the caller passes one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bnaudit import amplification, bits, divergence, firststep, record
from bnaudit.amplification import Beside, Window
from bnaudit.errors import InputError, MismatchError
from bnaudit.layout import TraceLayout, after, during
from bnaudit.record import Fingerprint, TensorKey
from bnaudit.spec import ExperimentSpec

if TYPE_CHECKING:
    from bnaudit.reference.sensitivity import Sensitivity

GRANULARITIES = ("step", "epoch-tensor", "epoch-group", "epoch-row")
SATURATION_BAND = math.log(10.0)
"""A difference within this (natural-log) distance of the largest one counts as saturated."""
SATURATION_SLOPE = 0.25
"""Past saturation, ln(difference) grows at most this fraction of the growth rate per epoch."""


# --------------------------------------------------------------------------- result types

@dataclasses.dataclass(frozen=True)
class Difference:
    """Where two runs first part."""

    epoch: int
    """0-based epoch (the text counts from 1, ``layout.during``); the initial state is epoch 0, step 0, phase
    "init"."""
    step: int | None
    """0-based step within the epoch; None when only epoch-level detail exists (after epoch 1 or later)."""
    phase: str
    """init, forward, backward, update, eval or probe ("unknown" if only whole-row digests differ)."""
    layer: str
    """Module name (linear1, bn1, relu1, ...) or "loss"."""
    tensor: str | None
    """Tensor name, e.g. bn1.out or linear1.weight; None when only the (phase, layer) group is known."""
    granularity: str
    """Finest digests both inputs had there: step, epoch-tensor, epoch-group (or epoch-row)."""
    fraction_differing: float | None
    """Share of the tensor's elements that differ, when both inputs have its values."""
    max_ulps: int | None
    """Largest ulp distance in the runs' storage dtype, when values are available."""
    row: int | None = None
    """Epoch row of the difference (0 the initial state, r after epoch r); None inside a step."""
    elements: int | None = None
    """Number of elements of the tensor, when values are available."""

    @property
    def _row(self) -> int:
        return self.row if self.row is not None else self.epoch + 1

    @property
    def where(self) -> str:
        """One line for people: when (``layout.after``, ``layout.during``), phase, layer, tensor."""
        if self.phase in ("eval", "probe"):
            what = "eval pass" if self.phase == "eval" else "probe pass (train mode, the fixed probe batch)"
            when = (f"{what} over the initial parameters" if self.row == 0
                    else f"{what} {after(self._row)}")
        elif self.row == 0:
            when = "the initial state (phase init)"
        elif self.step is None:
            when = f"{after(self._row)} (phase {self.phase})"
        else:
            when = f"{during(self.epoch, self.step)}, phase {self.phase}"
        what = f"tensor {self.tensor}" if self.tensor else f"layer {self.layer} ({self.phase} group)"
        return f"{when}, layer {self.layer}, {what}" if self.tensor else f"{when}, {what}"

    @property
    def text(self) -> str:
        """``where``, and how much differs there: the one line every view prints (compare, check, report)."""
        text = self.where
        if self.fraction_differing is not None and self.elements:
            n = round(self.fraction_differing * self.elements)
            text += (f"; {n} of {self.elements} elements differ ({self.fraction_differing:.2%}), by at most "
                     f"{self.max_ulps} ulp{'' if self.max_ulps == 1 else 's'}")
        elif self.granularity == "step":
            text += " (step digests: values are not recorded inside a step)"
        elif self.tensor is None:
            text += " (fingerprints hold epoch digests per (phase, layer) group)"
        return text


@dataclasses.dataclass(frozen=True)
class StepTensorDelta:
    """One tensor of the first traced step that differs, with exact counts (both inputs have its values)."""

    phase: str
    """forward, backward or update."""
    layer: str
    """Module name or "loss"."""
    tensor: str
    """Tensor name (linear1.out, bn1.weight.grad, ...)."""
    differing: int
    """Elements whose bits differ."""
    elements: int
    """Elements of the tensor."""
    max_ulps: int
    """Largest ulp distance, in the tensor's own dtype."""
    max_abs: float
    """Largest |a - b|."""
    scale: float
    """Largest |value| of the tensor in a or b: the scale |a - b| is measured against."""


@dataclasses.dataclass(frozen=True)
class LayerDivergence:
    """Parameter divergence between two runs, per layer, at the epoch rows both have values for."""

    rows: tuple[int, ...]
    """Epoch rows (0 the initial state, r after epoch r)."""
    layers: tuple[str, ...]
    """Layers with parameters, in forward order (linear1, bn1, ..., linear6)."""
    max_abs: np.ndarray
    """(len(rows), len(layers)) float64 largest |a - b| (inf where only one side is NaN)."""
    max_rel: np.ndarray
    """(len(rows), len(layers)) float64 largest |a - b| / max(|a|, |b|)."""
    max_ulps: np.ndarray
    """(len(rows), len(layers)) int64 largest ulp distance in the storage dtype (bits.NAN_DISTANCE for NaN)."""

    def overall(self) -> np.ndarray:
        """(len(rows),) largest absolute difference over all layers."""
        return self.max_abs.max(axis=1) if len(self.layers) else np.zeros(len(self.rows))


@dataclasses.dataclass(frozen=True)
class PairComparison:
    """Two runs compared: identical, or where they part and how far apart they end up."""

    a: str
    """Source of the first input (path)."""
    b: str
    """Source of the second input."""
    identical: bool
    """All compared digests equal (bits compared)."""
    first: Difference | None
    """Where they first part: the training split, or (when every training tensor is identical) the eval
    pass's first difference; None when identical."""
    divergence: LayerDivergence | None
    """Per-layer parameter divergence; None when identical or not comparable (different storage dtypes)."""
    growth_rate: float | None
    """ln(max divergence) per epoch over the growing phase (see the module docstring)."""
    saturation_epoch: int | None
    """Epoch row (epochs completed) where the divergence stops growing; None if it never does."""
    environment_diff: tuple[tuple[str, Any, Any], ...]
    """(key, value in a, value in b) of every fact that differs, most likely causes first."""
    closer_to_reference: dict[str, str] | None
    """layer -> "a" | "b" | "tie": which run is closer to exact arithmetic, when both carry a reference block."""
    granularity: str = "epoch-group"
    """Finest epoch-level detail both inputs have: epoch-tensor (two records) or epoch-group."""
    steps_compared: int = 0
    """Traced steps both inputs have (compared tensor by tensor)."""
    rows_compared: int = 0
    """Epoch rows compared (the common prefix)."""
    value_rows: int = 0
    """Epoch rows at which parameter values were compared."""
    storage: str = "float32"
    """Storage dtype of a ("a/b" when they differ)."""
    labels: tuple[str, str] = ("", "")
    """Configuration labels of a and b (``Fingerprint.label``)."""
    spec_differences: tuple[str, ...] = ()
    """What differs between the experiments (non-empty only with allow_different_spec)."""
    final_train_loss: tuple[float, float] = (math.nan, math.nan)
    """Eval-mode training MSE at the last compared row, in a and in b."""
    nonfinite: tuple[dict[str, Any] | None, dict[str, Any] | None] = (None, None)
    """First non-finite tensor of each run, if any."""
    eval_first: Difference | None = None
    """Where the eval pass first differs (it never feeds back into training); None if it never does."""
    first_step: tuple[StepTensorDelta, ...] | None = None
    """Every tensor of the first traced step that differs, in computation order; None when an input lacks
    the step's values (an older bnaudit's)."""
    growth_window: Window | None = None
    """The growing phase as a window (endpoint rate, slope and the range of its sub-windows'
    rates, ``amplification.fit``); None where it is shorter than one epoch."""
    exact: Beside | None = None
    """The divergence beside the exact-arithmetic amplification over the same rows, where the
    experiment's sensitivity was measured (``bnaudit reference sensitivity --save``) and the
    difference stays small for at least one epoch."""
    exact_known: bool = False
    """Whether the experiment's sensitivity was given (so a missing ``exact`` means no small window)."""
    probe_first: Difference | None = None
    """Where the probe pass first differs (bits of its activations); None if it never does or
    was not compared."""
    probe_compared: bool = False
    """Whether both inputs are records, which keep the probe pass's activations (fingerprint
    files do not)."""
    lengths: tuple[int, int] = (0, 0)
    """Epochs of a and of b as given; when they differ, everything above is over the first min of them
    (``common_length``)."""


@dataclasses.dataclass(frozen=True)
class EquivalenceClass:
    """Inputs whose digests are identical: bit for bit the same run."""

    digest: str
    """The shared overall digest."""
    members: tuple[str, ...]
    """Sources of the members, in input order."""
    labels: tuple[str, ...]
    """Configuration labels of the members."""
    indices: tuple[int, ...]
    """Positions of the members among the inputs."""
    common: tuple[tuple[str, Any], ...]
    """Facts (config, effective controls, environment) every member shares but not every input does."""


@dataclasses.dataclass(frozen=True)
class ClassPair:
    """Two equivalence classes compared through their first members."""

    i: int
    """Index of the first class."""
    j: int
    """Index of the second class (i < j)."""
    comparison: PairComparison
    """The comparison of the classes' first members."""

    @property
    def first(self) -> Difference | None:
        return self.comparison.first


@dataclasses.dataclass(frozen=True)
class ManyComparison:
    """Many runs grouped into numerical classes, with where every pair of classes parts."""

    sources: tuple[str, ...]
    """Every input, in order."""
    classes: tuple[EquivalenceClass, ...]
    """Classes of bit-identical inputs, in order of first appearance."""
    pairs: tuple[ClassPair, ...]
    """Every pair of classes (i < j)."""
    lengths: tuple[int, ...] = ()
    """Each input's epochs as given; when they differ, everything above is over the first min(lengths)."""

    @property
    def identical(self) -> bool:
        return len(self.classes) <= 1


# --------------------------------------------------------------------------- same experiment or refuse

def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k in sorted(value, key=str):
            _flat(value[k], f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            label = v.get("prefix") or v.get("name") or i
            _flat(v, f"{prefix}[{label}]", out)
    else:
        out[prefix] = value


def spec_differences(a: ExperimentSpec, b: ExperimentSpec) -> tuple[str, ...]:
    """Every field in which two specs differ, as "key: a vs b"."""
    fa: dict[str, Any] = {}
    fb: dict[str, Any] = {}
    _flat(a.to_dict(), "", fa)
    _flat(b.to_dict(), "", fb)
    keys = sorted(set(fa) | set(fb))
    return tuple(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k))


def experiment_differences(a: ExperimentSpec, b: ExperimentSpec, frozen_a: str | None = None,
                           frozen_b: str | None = None) -> list[str]:
    """What makes two runs runs of different experiments: the spec, and the frozen inputs when both are known.

    The one definition behind every "another experiment" refusal (compare, check, baseline update).
    """
    out = []
    if a.hash != b.hash:
        diffs = spec_differences(a, b)
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        out.append(f"different spec ({a.short_hash} vs {b.short_hash}: {shown or 'hash only'})")
    if frozen_a is not None and frozen_b is not None and frozen_a != frozen_b:
        out.append(f"different frozen inputs ({frozen_a[:12]} vs {frozen_b[:12]})")
    return out


def mismatches(a: Fingerprint, b: Fingerprint) -> list[str]:
    """What makes a and b runs that compare refuses to compare (empty: comparable).

    Another experiment, another storage dtype or another length.
    """
    out = experiment_differences(a.spec, b.spec, a.frozen, b.frozen)
    if a.storage != b.storage:
        out.append(f"different storage dtype ({a.storage} vs {b.storage})")
    return out


def common_length(fps: Sequence[Fingerprint], *,
                  same_length: bool = False) -> tuple[list[Fingerprint], tuple[int, ...]]:
    """Runs of different lengths on one footing: each cut to the epochs they all ran (``record.prefix``).

    The one rule of compare, report and check (``check`` cuts only the baseline): a run's
    first epochs do not depend on how many follow, so the common prefix is compared, and
    ``prefix_text`` says so.  ``same_length`` refuses instead (MismatchError).  Returns the
    inputs (cut) and their lengths as given.
    """
    lengths = tuple(fp.epochs for fp in fps)
    n = min(lengths, default=0)
    if n == max(lengths, default=0):
        return list(fps), lengths
    if same_length:
        raise MismatchError(f"refusing runs of different lengths ({_lengths_text(lengths)} epochs) with "
                            f"--same-length; without it they are compared over their first {n} epochs")
    if n < 1:
        raise MismatchError(f"a run of {n} epochs shares only its initial state with the others "
                            f"({_lengths_text(lengths)} epochs): nothing of the training to compare")
    return [record.prefix(fp, n) for fp in fps], lengths


def _lengths_text(lengths: Sequence[int]) -> str:
    shown = sorted(set(lengths))
    return ", ".join(map(str, shown[:-1])) + f" and {shown[-1]}" if len(shown) > 1 else str(shown[0])


def prefix_text(lengths: Sequence[int]) -> str | None:
    """The one line every view prints when runs of different lengths were compared on their common prefix."""
    if len(set(lengths)) <= 1:
        return None
    return f"runs of {_lengths_text(lengths)} epochs: compared over the first {min(lengths)} (--same-length refuses)"


def ensure_comparable(a: Fingerprint, b: Fingerprint, *, allow_different_spec: bool = False) -> None:
    """Raise MismatchError naming what differs (experiment, storage dtype), unless the caller allows comparing
    what still can be.  Lengths are not a mismatch: ``common_length`` compares their common prefix.

    Schema versions are checked when loading: ``record.load`` accepts only the schemas this
    bnaudit reads, so two loaded inputs always have comparable layouts.
    """
    if allow_different_spec:
        return
    found = mismatches(a, b)
    if found:
        raise MismatchError(f"refusing to compare {a.source} with {b.source}: {'; '.join(found)} "
                            "(--allow-different-spec compares what still can be)")


# --------------------------------------------------------------------------- pieces

def _common_keys(ka: Sequence[Any], kb: Sequence[Any]) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """Keys present in both sequences, in a's order, with their positions in a and in b."""
    pos_b = {k: i for i, k in enumerate(kb)}
    keys, ia, ib = [], [], []
    for i, k in enumerate(ka):
        j = pos_b.get(k)
        if j is not None:
            keys.append(k)
            ia.append(i)
            ib.append(j)
    return keys, np.array(ia, dtype=np.intp), np.array(ib, dtype=np.intp)


def _param_columns(a: Fingerprint, b: Fingerprint) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(name, layer, columns in a, columns in b) of every parameter both have with the same shape."""
    def columns(fp: Fingerprint) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
        out, offset = {}, 0
        for name, shape in fp.params:
            n = math.prod(shape)
            out[name] = (shape, np.arange(offset, offset + n))
            offset += n
        return out

    ca, cb = columns(a), columns(b)
    return [(name, name.split(".")[0], ca[name][1], cb[name][1])
            for name, _ in a.params if name in cb and cb[name][0] == ca[name][0]]


def _row_index(fp: Fingerprint, row: int) -> int | None:
    hit = np.flatnonzero(fp.keyframe_rows == row)
    return int(hit[0]) if len(hit) else None


def _values(a: Fingerprint, b: Fingerprint, row: int, name: str) -> tuple[float, int, int] | None:
    """(fraction differing, max ulps, elements) of parameter ``name`` at ``row``, if both have it."""
    if a.storage != b.storage:
        return None
    ra, rb = _row_index(a, row), _row_index(b, row)
    cols = [c for c in _param_columns(a, b) if c[0] == name]
    if ra is None or rb is None or not cols:
        return None
    _, _, ca, cb = cols[0]
    va, vb = a.keyframes[ra, ca], b.keyframes[rb, cb]
    ulps = bits.ulp_distance(va, vb, a.storage)
    differ = bits.as_bits(va, a.storage) != bits.as_bits(vb, b.storage)
    return float(differ.mean()), int(ulps.max()) if len(ulps) else 0, len(va)


def _step_view(a: Fingerprint, b: Fingerprint, epochs: int) -> tuple[np.ndarray, list[TensorKey], np.ndarray]:
    """Traced steps both have (in timeline order), common tensors, and a (steps, tensors) 'differs' mask."""
    keys, ta, tb = _common_keys(a.step_tensors, b.step_tensors)
    if not len(a.step_rows) or not len(b.step_rows) or not keys:
        return np.zeros((0, 2), np.int64), keys, np.zeros((0, len(keys)), bool)
    width = np.int64(1 << 32)
    code_a = a.step_rows[:, 0].astype(np.int64) * width + a.step_rows[:, 1]
    code_b = b.step_rows[:, 0].astype(np.int64) * width + b.step_rows[:, 1]
    _, ia, ib = np.intersect1d(code_a, code_b, return_indices=True)
    keep = a.step_rows[ia, 0] < epochs
    ia, ib = ia[keep], ib[keep]
    differs = a.step_digests[np.ix_(ia, ta)] != b.step_digests[np.ix_(ib, tb)]
    return a.step_rows[ia], keys, differs


def _epoch_view(a: Fingerprint, b: Fingerprint, n_rows: int) -> tuple[str, list[Any], np.ndarray, np.ndarray]:
    """(granularity, column keys, (rows, columns) 'differs' mask, (rows,) row digests differ)."""
    # Records and fingerprints of one spec have the same epoch-tensor layout (both are
    # checked against the spec when loaded), so their 64-bit row digests are comparable,
    # whichever detail (tensor or 32-bit group digests) the columns below come from.
    same_layout = a.spec.hash == b.spec.hash
    if a.epoch_digests is not None and b.epoch_digests is not None:
        keys, ia, ib = _common_keys(a.epoch_tensors, b.epoch_tensors)
        differs = a.epoch_digests[:n_rows, ia] != b.epoch_digests[:n_rows, ib]
        granularity = "epoch-tensor"
    else:
        keys, ia, ib = _common_keys(a.groups, b.groups)
        differs = a.group_digests[:n_rows, ia] != b.group_digests[:n_rows, ib]
        granularity = "epoch-group"
    if same_layout:
        row_differs = a.row_digests[:n_rows] != b.row_digests[:n_rows]
        inconsistent = np.flatnonzero(~row_differs & differs.any(axis=1))
        if len(inconsistent):
            r = int(inconsistent[0])
            raise InputError(f"{a.source} / {b.source}, {after(r)}: equal whole-state digests but different "
                             f"{granularity} digests (an edited or corrupt input)")
        if a.state_digests is not None and b.state_digests is not None:
            state_differs = a.state_digests[:n_rows] != b.state_digests[:n_rows]
            _check_state_consistent(a, b, keys, differs, state_differs, granularity)
            row_differs = row_differs | state_differs
    else:
        row_differs = differs.any(axis=1)
    return granularity, keys, differs, row_differs


def _check_state_consistent(a: Fingerprint, b: Fingerprint, keys: list[Any], differs: np.ndarray,
                            state_differs: np.ndarray, granularity: str) -> None:
    """The state digests and the digests of the tensors they cover say the same thing, row by row.

    A row's state is its parameters and running statistics.  With per-tensor digests
    (two records) the state differs exactly where one of those tensors does; with group
    digests, a running-statistics group (nothing else in it) differs only where the
    state does, and a state that differs shows in a parameter or running-statistics
    group (all of them colliding in 32 bits at once is not a chance worth a verdict).
    """
    layout = TraceLayout.for_spec(a.spec)
    stored = {name for name, _ in layout.params} | {name for name, _ in layout.buffers}
    if granularity == "epoch-tensor":
        covered = np.array([k.key in stored for k in keys], dtype=bool)
        exact = covered
    else:
        members: dict[Any, set[str]] = {}
        for t in layout.epoch_tensors:
            members.setdefault((t.phase, t.layer), set()).add(t.key)
        covered = np.array([bool(members.get(g, set()) & stored) for g in keys], dtype=bool)
        exact = np.array([bool(members.get(g)) and members[g] <= stored for g in keys], dtype=bool)
    shows = differs[:, covered].any(axis=1) if covered.any() else np.zeros(len(differs), bool)
    hidden = np.flatnonzero(~state_differs & differs[:, exact].any(axis=1)) if exact.any() else np.zeros(0, np.intp)
    unseen = np.flatnonzero(state_differs & ~shows)
    for rows, what in ((hidden, "equal state digests but different parameter or running-statistics digests"),
                       (unseen, "different state digests but equal parameter and running-statistics digests")):
        if len(rows):
            raise InputError(f"{a.source} / {b.source}, {after(int(rows[0]))}: {what} "
                             "(an edited or corrupt input)")


def _check_snapshots_consistent(a: Fingerprint, b: Fingerprint, row_differs: np.ndarray) -> None:
    """Where the digests say two rows are identical, their parameter values must be too."""
    if a.storage != b.storage or a.params != b.params:
        return
    rows, ia, ib = np.intersect1d(a.keyframe_rows, b.keyframe_rows, return_indices=True)
    same = rows < len(row_differs)
    same[same] = ~row_differs[rows[same]]
    if same.any():
        ba = bits.as_bits(a.keyframes[ia[same]], a.storage)
        bb = bits.as_bits(b.keyframes[ib[same]], b.storage)
        bad = np.flatnonzero((ba != bb).any(axis=1))
        if len(bad):
            r = int(rows[same][bad[0]])
            raise InputError(f"{a.source} / {b.source}, {after(r)}: identical digests but different "
                             "parameter snapshots (an edited or corrupt input)")


def _is_eval(keys: Sequence[Any]) -> np.ndarray:
    """Which epoch columns (TensorKey or (phase, layer) group) belong to the eval pass."""
    return np.array([(k.phase if isinstance(k, TensorKey) else k[0]) == "eval" for k in keys], dtype=bool)


def split(a: Fingerprint, b: Fingerprint, *, epochs: int | None = None
          ) -> tuple[Difference | None, Difference | None, str, int, int]:
    """(training split, eval-pass difference, epoch granularity, traced steps compared, epoch rows compared).

    Both from one pass over the digests, which also checks the inputs' digests against each other.
    """
    epochs = min(a.epochs, b.epochs) if epochs is None else epochs
    n_rows = epochs + 1
    granularity, keys, differs, row_differs = _epoch_view(a, b, n_rows)
    _check_snapshots_consistent(a, b, row_differs)
    step_rows, step_keys, step_differs = _step_view(a, b, epochs)
    evals = _is_eval(keys)
    eval_hit = np.flatnonzero(differs[:, evals].any(axis=1)) if evals.any() else np.zeros(0, np.intp)
    eval_first = _row_difference(a, b, int(eval_hit[0]), keys, differs, evals, granularity) if len(eval_hit) \
        else None
    # A row whose digest differs where no column does is a 32-bit group-digest collision: counted as training.
    train_rows = differs[:, ~evals].any(axis=1) | (row_differs & ~differs.any(axis=1))
    rows_hit = np.flatnonzero(train_rows)
    steps_hit = np.flatnonzero(step_differs.any(axis=1)) if step_differs.size else np.zeros(0, np.intp)
    # Timeline positions: row 0 before every step, row r >= 1 after every step of epoch r - 1.
    row_pos = None
    if len(rows_hit):
        r0 = int(rows_hit[0])
        row_pos = (-1, 0) if r0 == 0 else (r0 - 1, math.inf)
    step_pos = (int(step_rows[steps_hit[0], 0]), int(step_rows[steps_hit[0], 1])) if len(steps_hit) else None
    if row_pos is None and step_pos is None:
        training = None
    elif step_pos is not None and (row_pos is None or step_pos < row_pos):
        i = int(steps_hit[0])
        t: TensorKey = step_keys[int(np.flatnonzero(step_differs[i])[0])]
        delta = _first_step_delta(a, b, t) if step_pos == firststep.FIRST_STEP else None
        training = Difference(epoch=step_pos[0], step=step_pos[1], phase=t.phase, layer=t.layer, tensor=t.key,
                              granularity="step", row=None,
                              fraction_differing=None if delta is None else delta.differing / delta.elements,
                              max_ulps=None if delta is None else delta.max_ulps,
                              elements=None if delta is None else delta.elements)
    else:
        training = _row_difference(a, b, int(rows_hit[0]), keys, differs, ~evals, granularity)
    return training, eval_first, granularity, len(step_rows), n_rows


def _row_difference(a: Fingerprint, b: Fingerprint, r: int, keys: list[Any], differs: np.ndarray,
                    among: np.ndarray, granularity: str) -> Difference:
    """The first differing column of epoch row ``r`` among the columns ``among``, with values where both have them."""
    epoch, step = (0, 0) if r == 0 else (r - 1, None)
    cols = np.flatnonzero(differs[r] & among)
    params = {name for name, _ in a.params} & {name for name, _ in b.params}
    if not len(cols):  # whole-row digests differ but no group does: a 32-bit group-digest collision
        return Difference(epoch=epoch, step=step, phase="init" if r == 0 else "unknown", layer="unknown",
                          tensor=None, granularity="epoch-row", fraction_differing=None, max_ulps=None, row=r)
    if granularity == "epoch-tensor":
        t = keys[int(cols[0])]
        if t.phase == "eval":
            return Difference(epoch=epoch, step=None, phase="eval", layer=t.layer, tensor=t.key,
                              granularity=granularity, fraction_differing=None, max_ulps=None, row=r)
        values = _values(a, b, r, t.key) if t.key in params else None
        return Difference(epoch=epoch, step=step, phase="init" if r == 0 else t.phase, layer=t.layer, tensor=t.key,
                          granularity=granularity, fraction_differing=None if values is None else values[0],
                          max_ulps=None if values is None else values[1], row=r,
                          elements=None if values is None else values[2])
    phase, layer = keys[int(cols[0])]
    if phase == "eval":
        return Difference(epoch=epoch, step=None, phase="eval", layer=layer, tensor=None, granularity=granularity,
                          fraction_differing=None, max_ulps=None, row=r)
    tensor, values = None, None
    if r == 0 and phase == "update":
        # At the initial state there are no momentum buffers: an update group that differs is one of
        # the layer's parameters, which the snapshot of row 0 names (in parameter order).
        for name, _ in a.params:
            if name in params and name.split(".")[0] == layer:
                v = _values(a, b, 0, name)
                if v is not None and v[0] > 0:
                    tensor, values = name, v
                    break
    return Difference(epoch=epoch, step=step, phase="init" if r == 0 else phase, layer=layer, tensor=tensor,
                      granularity=granularity, fraction_differing=None if values is None else values[0],
                      max_ulps=None if values is None else values[1], row=r,
                      elements=None if values is None else values[2])


def probe_difference(a: Fingerprint, b: Fingerprint, *, epochs: int) -> Difference | None:
    """The first probe row, and in it the first module, whose activations differ in their bits.

    The probe pass (a train-mode forward of a fixed batch at the probe rows) is a side pass
    like the eval pass: it never feeds back into training, and it is not part of the
    digest, so it does not change a verdict.  Only records keep it; None where either
    input is a fingerprint file, the storage dtypes or experiments differ, or every common
    row agrees.
    """
    if a.probe is None or b.probe is None or a.probe_rows is None or b.probe_rows is None \
            or a.storage != b.storage or a.spec.hash != b.spec.hash:
        return None
    rows, ia, ib = np.intersect1d(a.probe_rows, b.probe_rows, return_indices=True)
    layout = TraceLayout.for_spec(a.spec)
    batch = a.spec.train.batch_size
    for row, i, j in zip(rows, ia, ib):
        if row > epochs:
            break
        differs = bits.as_bits(a.probe[i], a.storage) != bits.as_bits(b.probe[j], b.storage)
        if not differs.any():
            continue
        start = 0
        for module, width in zip(layout.modules, layout.probe_width):
            block = slice(start, start + batch * width)
            start = block.stop
            if differs[block].any():
                ulps = bits.ulp_distance(a.probe[i][block], b.probe[j][block], a.storage)
                r = int(row)
                return Difference(epoch=max(r - 1, 0), step=None, phase="probe", layer=module,
                                  tensor=f"probe.{module}", granularity="epoch-tensor",
                                  fraction_differing=float(differs[block].mean()), max_ulps=int(ulps.max()),
                                  row=r, elements=batch * width)
    return None


def first_step_deltas(a: Fingerprint, b: Fingerprint) -> tuple[StepTensorDelta, ...] | None:
    """Every traced tensor of the first traced step whose bits differ, in computation order.

    None when either input lacks the step's values.
    """
    if a.first_step is None or b.first_step is None:
        return None
    keys, _, _ = _common_keys(a.step_tensors, b.step_tensors)
    out = []
    for t in keys:
        delta = _first_step_delta(a, b, t)
        if delta is not None and delta.differing:
            out.append(delta)
    return tuple(out)


def _first_step_delta(a: Fingerprint, b: Fingerprint, t: TensorKey) -> StepTensorDelta | None:
    """Exact counts of one tensor of the first traced step, when both inputs hold it in the same dtype."""
    got_a = a.first_step.get(t.key) if a.first_step is not None else None
    got_b = b.first_step.get(t.key) if b.first_step is not None else None
    if got_a is None or got_b is None or got_a[1] != got_b[1] or got_a[0].shape != got_b[0].shape:
        return None
    (va, dtype), (vb, _) = got_a, got_b
    va, vb = va.reshape(-1), vb.reshape(-1)
    absd, _, ulps = element_distances(va, vb, dtype)
    differ = bits.as_bits(va, dtype) != bits.as_bits(vb, dtype)
    scale = np.maximum(np.abs(bits.to_float64(va, dtype)), np.abs(bits.to_float64(vb, dtype)))
    return StepTensorDelta(phase=t.phase, layer=t.layer, tensor=t.key, differing=int(differ.sum()),
                           elements=len(va), max_ulps=int(ulps.max()) if len(va) else 0,
                           max_abs=float(absd.max()) if len(va) else 0.0,
                           scale=float(np.nanmax(scale)) if len(va) and not np.isnan(scale).all() else 0.0)


def element_distances(a: np.ndarray, b: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Element-wise (|a - b|, |a - b| / max(|a|, |b|), ulp distance) of stored values of one storage dtype.

    The one set of per-element rules (compare, check's ulps and rel policies, the chaos
    floor): identical bits, NaN and inf included, are 0 apart; otherwise the inputs are
    widened exactly to float64 and each distance rounded once.  An element that is NaN
    in one run only, or infinite against a finite value, is infinitely far in |a - b|
    and in the relative difference, and ``bits.NAN_DISTANCE`` ulps apart.
    """
    same = bits.as_bits(a, storage) == bits.as_bits(b, storage)
    fa, fb = bits.to_float64(a, storage), bits.to_float64(b, storage)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        absd = np.abs(fa - fb)
        scale = np.maximum(np.abs(fa), np.abs(fb))
        rel = np.where(scale > 0, absd / np.where(scale > 0, scale, 1.0), 0.0)
    apart = np.isnan(absd) | np.isinf(absd)  # a NaN or an infinity on one side (the scale is NaN or inf there)
    absd = np.where(same, 0.0, np.where(apart, np.inf, absd))
    rel = np.where(same, 0.0, np.where(apart | np.isnan(rel), np.inf, rel))
    return absd, rel, bits.ulp_distance(a, b, storage)


def layer_divergence(a: Fingerprint, b: Fingerprint, *, epochs: int | None = None) -> LayerDivergence | None:
    """Per-layer parameter divergence at the rows both have values for; None for different storage dtypes."""
    if a.storage != b.storage:
        return None
    epochs = min(a.epochs, b.epochs) if epochs is None else epochs
    rows, ia, ib = np.intersect1d(a.keyframe_rows, b.keyframe_rows, return_indices=True)
    keep = rows <= epochs
    rows, ia, ib = rows[keep], ia[keep], ib[keep]
    cols = _param_columns(a, b)
    layers = list(dict.fromkeys(layer for _, layer, _, _ in cols))
    max_abs = np.zeros((len(rows), len(layers)))
    max_rel = np.zeros((len(rows), len(layers)))
    max_ulps = np.zeros((len(rows), len(layers)), dtype=np.int64)
    if len(rows) and cols:
        ca = np.concatenate([c[2] for c in cols])
        cb = np.concatenate([c[3] for c in cols])
        absd, rel, ulps = element_distances(a.keyframes[np.ix_(ia, ca)], b.keyframes[np.ix_(ib, cb)], a.storage)
        # Parameters come layer by layer, so each layer is a contiguous block of columns.
        layer_of = np.concatenate([np.full(len(c[2]), layers.index(c[1])) for c in cols])
        if np.all(np.diff(layer_of) >= 0):
            starts = np.flatnonzero(np.r_[True, np.diff(layer_of) != 0])
            max_abs[:] = np.maximum.reduceat(absd, starts, axis=1)
            max_rel[:] = np.maximum.reduceat(rel, starts, axis=1)
            max_ulps[:] = np.maximum.reduceat(ulps, starts, axis=1)
        else:
            for j in range(len(layers)):
                m = layer_of == j
                max_abs[:, j] = absd[:, m].max(axis=1)
                max_rel[:, j] = rel[:, m].max(axis=1)
                max_ulps[:, j] = ulps[:, m].max(axis=1)
    return LayerDivergence(rows=tuple(int(r) for r in rows), layers=tuple(layers), max_abs=max_abs,
                           max_rel=max_rel, max_ulps=max_ulps)


def _slope(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def growth(series_epochs: np.ndarray, series_values: np.ndarray) -> tuple[float | None, int | None]:
    """(growth rate of ln(divergence) per epoch, saturation epoch row); the rule is in the module docstring."""
    x = np.asarray(series_epochs, dtype=np.float64)
    v = np.asarray(series_values, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return None, None
    x, y = x[ok], np.log(v[ok])
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    top = y.max()
    s = int(np.flatnonzero(y >= top - SATURATION_BAND)[0])
    rate = _slope(x[: s + 1], y[: s + 1])
    tail_x, tail_y = x[s:], y[s:]
    saturation = None
    if len(tail_x) >= 3:
        tail = _slope(tail_x, tail_y)
        limit = SATURATION_SLOPE * rate if rate is not None and rate > 0 else 0.0
        if tail is not None and tail <= limit:
            saturation = int(x[s])
    if rate is None and saturation is None:
        # Only the top band exists and it is still rising: the whole series is the growing phase.
        rate = _slope(x, y)
    return rate, saturation


# --------------------------------------------------------------------------- environment

# Most likely causes first.  A key's rank is that of the first pattern it starts with.
_CAUSES: tuple[tuple[str, ...], ...] = (
    ("config.perturb", "config.controls.dtype", "config.controls.promote"),
    ("effective.cpu_capability", "config.controls.isa", "config.controls.onednn_isa", "config.controls.mkl_cbwr",
     "env.ATEN_CPU_CAPABILITY", "env.ONEDNN_MAX_CPU_ISA", "env.DNNL_MAX_CPU_ISA", "env.MKL_ENABLE_INSTRUCTIONS",
     "env.MKL_CBWR"),
    ("environment.emulated_cpu_model", "config.controls.cpu_model", "environment.cpu_model",
     "environment.cpu_features", "environment.supported_isas", "environment.machine"),
    ("effective.intra_op_threads", "effective.inter_op_threads", "config.controls.threads", "env.OMP_NUM_THREADS",
     "env.MKL_NUM_THREADS", "env.OPENBLAS_NUM_THREADS", "env.OMP_DYNAMIC", "env.MKL_DYNAMIC"),
    ("effective.deterministic_algorithms", "effective.mkldnn_deterministic", "config.controls.deterministic",
     "effective.mkldnn_enabled"),
    ("environment.torch", "environment.numpy", "environment.python", "effective.threadpools",
     "environment.python_startup", "env.LD_PRELOAD", "env.LD_LIBRARY_PATH"),
    ("env.",),
    ("environment.",),
    ("effective.",),
)
_NOT_CAUSES = ("config.epochs", "config.trace_epochs", "config.audit_every")


def is_cause(key: str) -> bool:
    """Whether a differing fact can change the bits (run length and tracing options cannot)."""
    return not key.startswith(_NOT_CAUSES)


def _rank(key: str) -> int:
    if not is_cause(key):
        return len(_CAUSES) + 1
    if key.startswith("effective.threadpools") and key.endswith(".num_threads"):
        return 3
    for rank, prefixes in enumerate(_CAUSES):
        if key.startswith(prefixes):
            return rank
    return len(_CAUSES)


def facts(fp: Fingerprint) -> dict[str, Any]:
    """Flattened config, effective controls and environment snapshot ("env." holds numerics variables)."""
    out: dict[str, Any] = {}
    _flat(fp.config, "config", out)
    _flat(fp.effective, "effective", out)
    env = dict(fp.environment)
    variables = env.pop("environment", {})
    _flat(env, "environment", out)
    _flat(variables if isinstance(variables, Mapping) else {"?": variables}, "env", out)
    return out


def _ranked(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: (_rank(k), k))


def environment_diff(a: Fingerprint, b: Fingerprint) -> tuple[tuple[str, Any, Any], ...]:
    """(key, value in a, value in b) of every fact that differs, most likely causes first."""
    fa, fb = facts(a), facts(b)
    return tuple((k, fa.get(k), fb.get(k)) for k in _ranked(set(fa) | set(fb)) if fa.get(k) != fb.get(k))


# --------------------------------------------------------------------------- reference

def closer_to_reference(a: Fingerprint, b: Fingerprint) -> dict[str, str] | None:
    """layer -> "a" | "b" | "tie" (``divergence.closer``), when both runs carry a reference block; else None."""
    if a.divergence is None or b.divergence is None:
        return None
    return divergence.closer(a.divergence, b.divergence)


# --------------------------------------------------------------------------- the comparisons

def compare_pair(a: Fingerprint, b: Fingerprint, *, allow_different_spec: bool = False,
                 exact: Sensitivity | None = None, same_length: bool = False) -> PairComparison:
    """Compare two runs (refusing different experiments unless allowed), over the epochs both ran.

    ``exact``: the experiment's sensitivity (``bnaudit.reference.sensitivity``), to set the
    divergence beside; ignored for runs of another experiment.  ``same_length``: refuse runs
    of different lengths instead of comparing their common prefix (``common_length``).
    """
    ensure_comparable(a, b, allow_different_spec=allow_different_spec)
    (a, b), lengths = common_length([a, b], same_length=same_length)
    a, b = record.comparable([a, b])
    epochs = min(a.epochs, b.epochs)
    first, eval_first, granularity, n_steps, n_rows = split(a, b, epochs=epochs)
    first = first or eval_first
    identical = first is None
    divergence = None if identical else layer_divergence(a, b, epochs=epochs)
    rate = saturation = window = beside = None
    if divergence is not None and divergence.rows:
        rate, saturation = growth(np.array(divergence.rows), divergence.overall())
        window = amplification.observed(divergence.rows, divergence.overall(), saturation=saturation)
        if exact is not None and exact.spec_hash == a.spec.hash == b.spec.hash:
            beside = amplification.beside(exact, divergence.rows, divergence.overall(), saturation=saturation,
                                          initial=bits.to_float64(a.keyframes[0], a.storage))
    value_rows = len(np.intersect1d(a.keyframe_rows[a.keyframe_rows <= epochs], b.keyframe_rows))
    return PairComparison(
        a=a.source, b=b.source, identical=identical, first=first, divergence=divergence, growth_rate=rate,
        saturation_epoch=saturation, environment_diff=environment_diff(a, b),
        closer_to_reference=closer_to_reference(a, b), granularity=granularity, steps_compared=n_steps,
        rows_compared=n_rows, value_rows=value_rows if a.storage == b.storage else 0,
        storage=a.storage if a.storage == b.storage else f"{a.storage}/{b.storage}",
        labels=(a.label, b.label),
        spec_differences=spec_differences(a.spec, b.spec) if a.spec.hash != b.spec.hash else (),
        final_train_loss=(float(a.train_loss[epochs]), float(b.train_loss[epochs])),
        nonfinite=(a.nonfinite, b.nonfinite), eval_first=eval_first,
        first_step=None if identical else first_step_deltas(a, b), growth_window=window, exact=beside,
        exact_known=exact is not None and exact.spec_hash == a.spec.hash == b.spec.hash,
        probe_first=probe_difference(a, b, epochs=epochs), lengths=(lengths[0], lengths[1]),
        probe_compared=(a.probe is not None and b.probe is not None and a.storage == b.storage
                        and a.spec.hash == b.spec.hash))


def equivalence_classes(fps: Sequence[Fingerprint]) -> list[EquivalenceClass]:
    """Classes of identical digests, in order of first appearance, with the facts their members share."""
    fps = record.comparable(fps)
    groups: dict[str, list[int]] = {}
    for i, fp in enumerate(fps):
        groups.setdefault(fp.digest, []).append(i)
    all_facts = [facts(fp) for fp in fps]
    everywhere = {k for k in all_facts[0] if all(k in f and f[k] == all_facts[0][k] for f in all_facts)} \
        if all_facts else set()
    out = []
    for digest, members in groups.items():
        first = all_facts[members[0]]
        shared = [k for k in first if k not in everywhere
                  and all(k in all_facts[m] and all_facts[m][k] == first[k] for m in members)]
        out.append(EquivalenceClass(
            digest=digest, members=tuple(fps[m].source for m in members), labels=tuple(fps[m].label for m in members),
            indices=tuple(members), common=tuple((k, first[k]) for k in _ranked(shared))))
    return out


def compare_many(fps: Sequence[Fingerprint], *, allow_different_spec: bool = False,
                 exact: Sensitivity | None = None, same_length: bool = False) -> ManyComparison:
    """Group inputs into classes of bit-identical runs over the epochs they all ran; compare every pair of classes."""
    for fp in fps[1:]:
        ensure_comparable(fps[0], fp, allow_different_spec=allow_different_spec)
    cut, lengths = common_length(fps, same_length=same_length)
    fps = record.comparable(cut)
    classes = equivalence_classes(fps)
    pairs = []
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            a, b = fps[classes[i].indices[0]], fps[classes[j].indices[0]]
            pairs.append(ClassPair(i=i, j=j, comparison=compare_pair(a, b, allow_different_spec=True, exact=exact)))
    return ManyComparison(sources=tuple(fp.source for fp in fps), classes=tuple(classes), pairs=tuple(pairs),
                          lengths=lengths)
