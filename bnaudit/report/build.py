"""Build the report's model: input folders -> verified records -> one ``model.Report``.

Input folders are expanded into record folders, each loaded by ``record.load_record``
(every file checked, its blocks decoded), and turned into plain arrays: learned
functions, pair divergences (``bnaudit.compare``), reference divergences, operator
audits and chaos floors.  Drawing and writing are the formats' and ``writer``'s.

Inputs are refused, never half-reported: a folder that is neither a record nor a
matrix, a partial (interrupted) record, a malformed block, or runs of different
experiments (spec hash) raise ``InputError`` / ``MismatchError`` with one line naming
the folder.  This module is numpy-only: no torch, no mpmath.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import amplification, bits, compare, controls, fileio, frozen, record
from bnaudit.blocks import AuditBlock, ChaosFloor, DivergenceBlock
from bnaudit.errors import InputError, MismatchError
from bnaudit.layout import TraceLayout
from bnaudit.reference import sensitivity
from bnaudit.reference.sensitivity import Sensitivity
from bnaudit.report.model import (
    CONTROL_KEYS,
    AuditView,
    ClassInfo,
    FloorView,
    LearnedFunction,
    PairView,
    ReferenceView,
    Report,
    RunEntry,
)
from bnaudit.spec import ExperimentSpec

MAX_RUNS = 256
GRID_POINTS = 400
DEFAULT_CONTROLS = controls.Controls()
"""`bnaudit run`'s defaults: the baseline of the pairs is the run that departs least from them."""


# --------------------------------------------------------------------------- inputs


def _partial(path: Path) -> bool:
    return path.name.startswith(".") and ".partial-" in path.name


def _complete(folder: Path) -> bool:
    return (folder / "record.json").is_file()


def _runs_under(folder: Path, what: str, depth: int = 0) -> list[Path]:
    """Record folders directly under ``folder`` (or one level deeper, for a matrix's variants)."""
    out: list[Path] = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if _partial(child):
            raise InputError(f"{child}: partial run folder in {what} (an interrupted run's leftovers; "
                             "rerun the command that made it)")
        if _complete(child):
            out.append(child)
        elif depth == 0 and any(_complete(g) or _partial(g) for g in child.iterdir() if g.is_dir()):
            out.extend(_runs_under(child, what, depth + 1))
        else:
            raise InputError(f"{child}: incomplete run folder in {what} (no record.json)")
    return out


def _matrix_runs(path: Path) -> tuple[list[tuple[str | None, Path]], dict[str, Any] | None]:
    """The runs of a matrix folder (labelled by their folder under runs/) and its summary.json, if any."""
    runs = path / "runs"
    summary = _json_if_there(path / "summary.json", "matrix summary")
    plan = _json_if_there(path / "matrix.json", "matrix plan")
    for rel in _listed_runs(plan):
        folder = path / rel
        if not _complete(folder):
            state = "is missing" if not folder.exists() else "is incomplete (no record.json)"
            raise InputError(f"{folder}: run listed in {path / 'matrix.json'} {state} (the matrix was "
                             "interrupted or is still running; rerun the same matrix command to finish it)")
    found = _runs_under(runs, f"matrix {path}")
    if not found:
        raise InputError(f"{path}: matrix folder without complete runs")
    return [(str(f.relative_to(runs)), f) for f in found], summary


def expand_inputs(paths: Sequence[Path]) -> tuple[list[tuple[str | None, Path]], dict[str, Any] | None]:
    """Record folders named by the inputs: (label or None, folder), and a matrix summary if any.

    An input is a record folder (record.json), a matrix folder (runs/, with matrix.json
    listing its runs and summary.json), or a folder of record folders.  Anything else, a
    partial folder, or a matrix that lists a run it does not hold, is refused naming the
    folder.
    """
    out: list[tuple[str | None, Path]] = []
    summary: dict[str, Any] | None = None
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise InputError(f"{path}: no such run or matrix folder")
        if path.is_file():
            if path.name != "record.json":
                raise InputError(f"{path}: not a run or matrix folder (report reads record folders, not files)")
            path = path.parent
        if _partial(path):
            raise InputError(f"{path}: partial run folder (an interrupted run's leftovers); rerun it")
        if _complete(path):
            out.append((None, path))
            continue
        if (path / "runs").is_dir():
            found, summary = _matrix_runs(path)
            out.extend(found)
            continue
        if path.is_dir():
            folders = _runs_under(path, f"folder {path}")
            if folders:
                out.extend((None, f) for f in folders)
                continue
        raise InputError(f"{path}: not a complete bnaudit record (no record.json) nor a matrix folder (no runs/)")
    if len(out) > MAX_RUNS:
        raise InputError(f"{len(out)} runs: a report covers at most {MAX_RUNS}")
    return out, summary


def _json_if_there(path: Path, what: str) -> dict[str, Any] | None:
    """A matrix's JSON file (bounded, strict), or None when the folder has none."""
    return fileio.read_json(path, what) if path.exists() else None


def _listed_runs(plan: dict[str, Any] | None) -> list[str]:
    """Run folders (relative to the matrix folder) its matrix.json plans."""
    if not plan or not isinstance(plan.get("runs"), list):
        return []
    out = []
    for item in plan["runs"]:
        folder = item.get("folder") if isinstance(item, dict) else None
        if isinstance(folder, str) and folder.startswith("runs/") and ".." not in Path(folder).parts:
            out.append(folder)
    return out


def _check_one_experiment(loaded: Sequence[tuple[str, Path, record.Record]]) -> None:
    """Refuse runs of different specs or frozen inputs, naming both folders."""
    first_path, first = loaded[0][1], loaded[0][2]
    nested = any("/" in label for label, _, _ in loaded)
    for _, path, rec in loaded[1:]:
        if rec.spec.hash != first.spec.hash:
            hint = (" (of a matrix with several experiment variants, give one variant's folder, e.g. "
                    "MATRIX/runs/bn)") if nested else ""
            raise MismatchError(
                f"report refused: {path} is of spec {rec.spec.short_hash} ({rec.spec.name!r}) but {first_path} "
                f"is of spec {first.spec.short_hash} ({first.spec.name!r}); report runs of one experiment{hint}")
        if rec.fingerprint.frozen != first.fingerprint.frozen:
            raise MismatchError(f"report refused: {path} and {first_path} started from different frozen inputs")


def load_runs(paths: Sequence[Path]) -> tuple[list[tuple[str, Path, record.Record]], dict[str, Any] | None]:
    """Load every record of the inputs, check they belong to one experiment, and label them uniquely."""
    items, summary = expand_inputs(paths)
    loaded = [(label or "", folder, record.load_record(folder)) for label, folder in items]
    if not loaded:
        raise InputError("report: no runs given")
    _check_one_experiment(loaded)
    # Labels: the matrix's folder name, else the configuration, made unique with the folder name.
    labels = [label or rec.fingerprint.label for label, _, rec in loaded]
    seen: dict[str, int] = {}
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
    final = [lab if seen[lab] == 1 else f"{lab} ({path.name})" for lab, (_, path, _) in zip(labels, loaded)]
    if len(set(final)) != len(final):
        final = [f"{lab} #{i + 1}" for i, lab in enumerate(final)]
    return [(lab, path, rec) for lab, (_, path, rec) in zip(final, loaded)], summary


# --------------------------------------------------------------------------- analysis


def _class_names(n: int) -> list[str]:
    out = []
    for i in range(n):
        name, k = "", i
        while True:
            name = chr(ord("A") + k % 26) + name
            k = k // 26 - 1
            if k < 0:
                break
        out.append(name)
    return out


def _classes(entries: Sequence[tuple[str, record.Record, controls.Controls]], *,
             same_length: bool = False) -> list[ClassInfo]:
    """Runs grouped by overall digest over the epochs they all ran (``compare.common_length``), named A, B, ...
    in order of first appearance."""
    by_digest: dict[str, list[int]] = {}
    cut, _ = compare.common_length([rec.fingerprint for _, rec, _ in entries], same_length=same_length)
    views = record.comparable(cut)
    for i, view in enumerate(views):
        by_digest.setdefault(view.digest, []).append(i)
    names = _class_names(len(by_digest))
    out = []
    for name, (digest_value, idx) in zip(names, by_digest.items()):
        shared = []
        for key in CONTROL_KEYS:
            values = {getattr(entries[i][2], key) for i in idx}
            if len(values) == 1 and len(idx) > 1:
                value = getattr(entries[idx[0]][2], key)
                if value not in (None, False):
                    shared.append(f"{key}={value}")
        out.append(ClassInfo(name=name, digest=digest_value, members=tuple(entries[i][0] for i in idx),
                             shared=", ".join(shared) if shared else ("(single run)" if len(idx) == 1 else "-"),
                             storage=entries[idx[0]][1].storage))
    return out


def learned_function(spec: ExperimentSpec, rec: record.Record, inputs: np.ndarray,
                     grid_x: np.ndarray) -> LearnedFunction:
    """The network at the run's final parameters, in float64, BN in eval mode (running statistics)."""
    storage = rec.storage
    params = bits.to_float64(rec.arrays["params"][-1], storage)
    buffers = bits.to_float64(rec.arrays["buffers"][-1], storage)
    grid = np.empty((len(grid_x), spec.n_inputs))
    power = grid_x.astype(np.float64)
    grid[:, 0] = power
    for k in range(1, spec.data.degree):
        power = power * grid_x  # x^k by repeated multiplication, as the frozen inputs are built
        grid[:, k] = power
    if spec.data.noise_feature:
        grid[:, spec.data.degree] = 0.0  # the noise feature at its mean
    return LearnedFunction(grid_x=grid_x, grid_y=numpy_forward(spec, rec.layout, params, buffers, grid),
                           sample_y=numpy_forward(spec, rec.layout, params, buffers, inputs))


def numpy_forward(spec: ExperimentSpec, layout: TraceLayout, params: np.ndarray, buffers: np.ndarray,
                  x: np.ndarray) -> np.ndarray:
    """Eval-mode forward of the network in float64 (a picture of the function, not a bit-exact replay)."""
    p_at = layout.param_slices()
    b_at: dict[str, slice] = {}
    offset = 0
    for name, shape in layout.buffers:
        b_at[name] = slice(offset, offset + math.prod(shape))
        offset += math.prod(shape)
    shapes = dict(layout.params)
    h = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):  # a diverged run gives inf/nan curves, shown as gaps
        for name, kind in spec.modules():
            if kind == "linear":
                w = params[p_at[f"{name}.weight"]].reshape(shapes[f"{name}.weight"])
                h = h @ w.T + params[p_at[f"{name}.bias"]]
            elif kind == "bn":
                mean = buffers[b_at[f"{name}.running_mean"]]
                var = buffers[b_at[f"{name}.running_var"]]
                h = ((h - mean) / np.sqrt(var + spec.model.bn_eps) * params[p_at[f"{name}.weight"]]
                     + params[p_at[f"{name}.bias"]])
            else:
                h = np.maximum(h, 0.0)
    return h[:, 0]


def _describe_first(first: compare.Difference | None) -> tuple[str, str]:
    """(where, how much) of a first difference, in words."""
    if first is None:
        return "", ""
    detail = []
    if first.fraction_differing is not None:
        detail.append(f"{100 * first.fraction_differing:.0f}% of elements differ")
    if first.max_ulps is not None:
        detail.append(f"by up to {first.max_ulps} ulp{'' if first.max_ulps == 1 else 's'}")
    return first.where, ", ".join(detail)


def _first_row(first: compare.Difference | None) -> int | None:
    """Epoch row at which a difference first shows in the parameters (a step of epoch e: row e+1)."""
    if first is None:
        return None
    if first.row is not None:
        return int(first.row)
    return 0 if first.phase == "init" else int(first.epoch) + 1


def _layers(layout: TraceLayout) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.split(".")[0] for name, _ in layout.params))


def compare_runs(a: RunEntry, b: RunEntry, kind: str, exact: Sensitivity | None = None) -> PairView:
    """Two runs of one storage dtype and length, compared by ``bnaudit.compare`` (beside ``exact``)."""
    pc = compare.compare_pair(a.record.fingerprint, b.record.fingerprint, exact=exact)
    div = pc.divergence
    if div is not None:
        rows, layers = np.asarray(div.rows, dtype=np.int64), tuple(div.layers)
        max_abs, max_ulps = np.asarray(div.max_abs, dtype=np.float64), np.asarray(div.max_ulps, dtype=np.float64)
    else:  # identical: nothing apart anywhere
        layers = _layers(a.record.layout)
        rows = np.arange(min(a.epochs, b.epochs) + 1)
        max_abs = max_ulps = np.zeros((len(rows), len(layers)))
    where, detail = _describe_first(pc.first)
    return PairView(a=a.label, b=b.label, kind=kind, identical=bool(pc.identical), first_text=where,
                    first_detail=detail, first_epoch_row=_first_row(pc.first),
                    first_layer=None if pc.first is None else pc.first.layer, rows=rows, layers=layers,
                    max_abs=max_abs, max_ulps=max_ulps, growth_rate=pc.growth_rate,
                    saturation_epoch=pc.saturation_epoch, environment_diff=tuple(pc.environment_diff),
                    exact=pc.exact, first=pc.first, closer=pc.closer_to_reference)


def _departures(run: RunEntry) -> int:
    """How many controls differ from `bnaudit run`'s defaults (dtype counts alike for a whole dtype group)."""
    return sum(getattr(run.controls, k) != getattr(DEFAULT_CONTROLS, k) for k in CONTROL_KEYS)


def pick_pairs(runs: Sequence[RunEntry]) -> tuple[list[tuple[RunEntry, RunEntry, str]], list[RunEntry], list[str]]:
    """Which runs to compare: per dtype, each class's first run against the baseline (the
    run closest to the default controls), and each --perturb run against its unperturbed twin (the 1-ulp
    sensitivity baseline).

    Returns (pairs, perturbed runs without a twin among the inputs, notes).
    """
    pairs: list[tuple[RunEntry, RunEntry, str]] = []
    orphans: list[RunEntry] = []
    notes: list[str] = []
    groups: dict[str, list[RunEntry]] = {}
    for r in runs:  # one group per dtype (bf16-mixed stores float32 but computes otherwise); lengths are cut
        groups.setdefault(r.controls.dtype, []).append(r)
    for members in groups.values():
        plain = [r for r in members if not r.perturb]
        if plain:
            base = min(plain, key=_departures)  # the most default configuration; input order breaks ties
            reps: dict[str, RunEntry] = {}
            for r in plain:
                reps.setdefault(r.class_name, r)
            for cls, rep in reps.items():
                if cls != base.class_name:
                    pairs.append((base, rep, "pair"))
        twins = {(r.controls, r.epochs): r for r in reversed(plain)}  # the first plain run of each configuration
        for r in members:
            if r.perturb:
                twin = twins.get((r.controls, r.epochs))
                if twin is None:
                    orphans.append(r)
                else:
                    pairs.append((twin, r, "perturb"))
    if len(groups) > 1:
        notes.append("runs are paired within their dtype only; across dtypes, the divergence from "
                     "the mpmath reference is the common yardstick")
    return pairs, orphans, notes


def reference_view(block: DivergenceBlock, source: str) -> tuple[ReferenceView | None, str | None]:
    """A run's divergence from the reference as layer tables, or a note why it is not drawn."""
    layers = tuple(dict.fromkeys(s.layer for s in block.series))
    if not layers or not block.rows:
        return None, f"{source}: divergence block measured nothing; not drawn"
    tables = {what: np.full((len(block.rows), len(layers)), np.nan) for what in ("weights", "activations")}
    for i, s in enumerate(block.series):
        if s.what in tables:
            tables[s.what][:, layers.index(s.layer)] = block.correct_bits[i]
    precision = block.precision_bits
    bits_w = np.clip(np.nan_to_num(tables["weights"], nan=0.0), 0, precision)
    return ReferenceView(rows=np.asarray(block.rows, dtype=np.int64), layers=layers, correct_bits=bits_w,
                         activation_bits=np.clip(tables["activations"], 0, precision), precision=precision,
                         fewest=block.fewest()), None


def audit_view(block: AuditBlock, source: str) -> tuple[AuditView | None, str | None]:
    """The operator audit as each operator's worst error over its layers, per row, or a note why not drawn."""
    if block.skipped:
        return None, f"{source}: operator audit skipped ({block.skipped[:120]})"
    if not block.rows:
        return None, f"{source}: operator audit holds no audited rows; not drawn"
    amps = [float(v) for values in block.max_amplification.values() for v in values]
    return AuditView(rows=np.asarray(block.rows, dtype=np.int64), operators=block.per_operator(),
                     flags=block.n_flags, max_amplification=max(amps) if amps else math.nan), None


def floor_view(floor: ChaosFloor, exact: Sensitivity | None = None, initial: np.ndarray | None = None) -> FloorView:
    """The chaos floor a --perturb run measured against its unperturbed twin, per epoch row (beside ``exact``;
    ``initial``: the run's initial parameters)."""
    rows = np.arange(len(floor.max_abs))
    return FloorView(rows=rows, max_abs=floor.max_abs, growth_rate=floor.growth_rate,
                     saturation_row=floor.saturation_row,
                     exact=None if exact is None or initial is None
                     else amplification.beside(exact, rows, floor.max_abs, saturation=floor.saturation_row,
                                               initial=initial))


def matrix_findings(summary: dict[str, Any] | None) -> tuple[str, ...]:
    """The sentences of a matrix summary's "findings" (strings only, at most 50, each at most 600 characters)."""
    found = summary.get("findings") if summary else None
    if not isinstance(found, list):
        return ()
    return tuple(f[:600] for f in found if isinstance(f, str))[:50]


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """The runs' decoded blocks as views, and what could not be drawn."""

    references: dict[str, ReferenceView]
    """Run label -> its divergence from the reference."""
    audits: dict[str, AuditView]
    """Run label -> its operator audit."""
    floors: dict[str, FloorView]
    """Run label -> its chaos floor."""
    notes: list[str]
    """Blocks present but not drawn, and why."""


def _block_views(runs: Sequence[RunEntry], exact: Sensitivity | None) -> _Blocks:
    out = _Blocks(references={}, audits={}, floors={}, notes=[])
    for r in runs:
        fp = r.record.fingerprint
        if fp.divergence is not None:
            ref, note = reference_view(fp.divergence, fp.source)
            if ref is not None:
                out.references[r.label] = ref
            out.notes.extend([note] if note else [])
        if fp.audit is not None:
            aud, note = audit_view(fp.audit, fp.source)
            if aud is not None:
                out.audits[r.label] = aud
            out.notes.extend([note] if note else [])
        if fp.floor is not None:
            out.floors[r.label] = floor_view(fp.floor, exact, bits.to_float64(fp.keyframes[0], fp.storage))
    return out


def _missing_notes(runs: Sequence[RunEntry], blocks: _Blocks, orphans: Sequence[RunEntry]) -> list[str]:
    """Notes for what no input provides (reference, audit, 1-ulp baseline)."""
    notes = []
    if not blocks.references:
        notes.append("no run carries a divergence from the mpmath reference (record extra \"divergence\": is a "
                     "reference stored for this spec?), so heatmaps and growth curves show divergence between "
                     "runs only")
    if not blocks.audits:
        notes.append("no run carries an operator audit (record extra \"operator_audit\"), so the BN-vs-Linear "
                     "operator errors are not drawn")
    for r in orphans:
        if r.label not in blocks.floors:
            notes.append(f"{r.label}: no unperturbed run of the same configuration and length among the inputs, "
                         "and its record carries no perturbation block, so its 1-ulp baseline is not drawn")
    if not any(r.perturb for r in runs):
        notes.append("no --perturb run among the inputs, so the 1-ulp sensitivity baseline is not drawn")
    return notes


def build_report(paths: Sequence[Path], *, same_length: bool = False) -> Report:
    """Load the inputs and compute everything the report shows.

    Runs of different lengths are classed and compared over the epochs they all ran
    (``compare.common_length``; ``Report.lengths`` says so), or refused with ``same_length``.
    """
    loaded, summary = load_runs(paths)
    spec = loaded[0][2].spec
    inputs = frozen.load(spec)
    entries = [(label, rec, rec.fingerprint.controls) for label, _, rec in loaded]
    classes = _classes(entries, same_length=same_length)
    class_of = {m: c.name for c in classes for m in c.members}
    runs = tuple(RunEntry(label=label, path=path, record=rec, controls=entry[2],
                          perturb=rec.fingerprint.perturbation, class_name=class_of[label])
                 for (label, path, rec), entry in zip(loaded, entries))
    grid_x = np.linspace(spec.data.x_low, spec.data.x_high, GRID_POINTS)
    learned = {r.label: learned_function(spec, r.record, inputs.inputs, grid_x) for r in runs}
    pair_specs, orphans, pair_notes = pick_pairs(runs)
    exact = sensitivity.stored(spec)
    pairs = tuple(compare_runs(a, b, kind, exact) for a, b, kind in pair_specs)
    blocks = _block_views(runs, exact)
    notes = pair_notes + blocks.notes + _missing_notes(runs, blocks, orphans)
    return Report(spec=spec, sources=tuple(str(p) for p in paths), runs=runs, classes=tuple(classes),
                  learned=learned, pairs=pairs, references=blocks.references, audits=blocks.audits,
                  floors=blocks.floors, findings=matrix_findings(summary), notes=tuple(notes),
                  x=inputs.x.copy(), targets=inputs.targets.copy(), n_train=spec.data.train,
                  exact_rows=None if exact is None else np.asarray(exact.rows, dtype=np.int64),
                  exact_log=None if exact is None else np.asarray(exact.log_overall, dtype=np.float64),
                  lengths=tuple(r.epochs for r in runs))
