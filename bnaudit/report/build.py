"""Gather run records and matrix folders into one ``Report``, then write its folder.

The report pipeline is: input folders -> records (``record.load_record``, every file
checked) -> a ``Report`` of plain arrays (learned functions, pair divergences, reference
divergences, BN conditioning) -> figures (``figures``) -> ``index.html`` (``html``) and
``report.md`` (``markdown``), written under a temporary name and renamed when complete.

Inputs are refused, never half-reported: a folder that is neither a record nor a
matrix, a partial (interrupted) record, or runs of different experiments (spec hash)
raise ``InputError`` / ``MismatchError`` with one line naming the folder.  This module
is numpy-only: no torch, no mpmath.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import bits, compare, divergence, frozen, record
from bnaudit.errors import InputError, MismatchError, OutputError
from bnaudit.spec import ExperimentSpec

REPORT_SCHEMA = "bnaudit.report/1"
MAX_RUNS = 256
CONTROL_KEYS = ("dtype", "threads", "isa", "deterministic", "onednn_isa", "mkl_cbwr", "cpu_model")
GRID_POINTS = 400


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class RunEntry:
    """One run of the report, with what the figures need from its record."""

    label: str
    """Display name: the matrix's run folder name, or the configuration label."""
    path: Path
    """The record folder."""
    record: record.Record
    """The loaded, verified record."""
    controls: dict[str, Any]
    """Controls the run asked for (dtype, threads, isa, deterministic, ...)."""
    perturb: dict[str, Any] | None
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
        p = self.perturb
        if not p:
            return ""
        index = ",".join(str(i) for i in p.get("index", []))
        return f"{p.get('tensor')}[{index}]:{int(p.get('ulps', 0)):+d}"

    @property
    def config_text(self) -> str:
        c = self.controls
        parts = [str(c.get("dtype")), f"{c.get('threads')} thread(s)", f"isa {c.get('isa')}",
                 "deterministic" if c.get("deterministic") else "non-deterministic"]
        for key in ("onednn_isa", "mkl_cbwr", "cpu_model"):
            if c.get(key):
                parts.append(f"{key} {c[key]}")
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
    environment_diff: tuple[tuple[str, Any, Any], ...]
    """Environment facts that differ, most likely causes first."""

    @property
    def title(self) -> str:
        return f"{self.b} vs {self.a}"


@dataclasses.dataclass(frozen=True)
class ReferenceView:
    """One run's divergence from the mpmath reference (its record's ``extra["divergence"]``)."""

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


@dataclasses.dataclass(frozen=True)
class AuditView:
    """Operator-audit errors of one run (its record's ``extra["operator_audit"]``), in ulps."""

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
    """The 1-ulp sensitivity baseline a --perturb run carries (its record's ``extra["perturbation"]``)."""

    rows: np.ndarray
    """Epoch rows."""
    max_abs: np.ndarray
    """Largest |Δ parameter| from the unperturbed twin at each row."""
    growth_rate: float | None
    """Growth per epoch (natural-log units) before saturation."""
    saturation_row: int | None
    """Epoch row of saturation, if any."""


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
    matrix: dict[str, Any] | None
    """The matrix summary.json (when a matrix folder was given), passed through."""
    findings: tuple[str, ...]
    """The matrix's findings in sentences (its summary.json "findings"), when given."""
    notes: tuple[str, ...]
    """What the report could not show, and why."""
    x: np.ndarray
    """x of every sample (train rows first)."""
    targets: np.ndarray
    """Target of every sample."""
    n_train: int
    """The first n_train samples train."""

    def run(self, label: str) -> RunEntry:
        for r in self.runs:
            if r.label == label:
                return r
        raise KeyError(label)

    @property
    def varying_controls(self) -> list[str]:
        keys = [k for k in CONTROL_KEYS if len({json.dumps(r.controls.get(k)) for r in self.runs}) > 1]
        if any(r.perturb for r in self.runs):
            keys.append("perturb")
        return keys


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
        runs = path / "runs"
        if runs.is_dir():
            summary = _read_json_object(path / "summary.json", "matrix summary")
            plan = _read_json_object(path / "matrix.json", "matrix plan")
            for rel in _listed_runs(plan):
                folder = path / rel
                if not _complete(folder):
                    state = "is missing" if not folder.exists() else "is incomplete (no record.json)"
                    raise InputError(f"{folder}: run listed in {path / 'matrix.json'} {state} (the matrix was "
                                     "interrupted or is still running; rerun the same matrix command to finish it)")
            found = _runs_under(runs, f"matrix {path}")
            if not found:
                raise InputError(f"{path}: matrix folder without complete runs")
            out.extend((str(f.relative_to(runs)), f) for f in found)
            continue
        if path.is_dir():
            found = _runs_under(path, f"folder {path}")
            if found:
                out.extend((None, f) for f in found)
                continue
        raise InputError(f"{path}: not a complete bnaudit record (no record.json) nor a matrix folder (no runs/)")
    if len(out) > MAX_RUNS:
        raise InputError(f"{len(out)} runs: a report covers at most {MAX_RUNS}")
    return out, summary


def _read_json_object(path: Path, what: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        if path.stat().st_size > record.MAX_JSON_BYTES:
            raise InputError(f"{path}: larger than any {what}")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not a valid {what} ({str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a valid {what} (top level is not an object)")
    return raw


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


def config_label(controls: dict[str, Any], perturb: dict[str, Any] | None) -> str:
    """A short name of a run's configuration (the same shape as ``Controls.label``)."""
    parts = [str(controls.get("dtype")), f"t{controls.get('threads')}", str(controls.get("isa")),
             "det" if controls.get("deterministic") else "nondet"]
    for key, prefix in (("onednn_isa", "onednn-"), ("mkl_cbwr", "cbwr-"), ("cpu_model", "cpu-")):
        if controls.get(key):
            parts.append(prefix + str(controls[key]).lower().replace(",", "-"))
    if perturb:
        parts.append("perturb")
    return "_".join(parts)


def load_runs(paths: Sequence[Path]) -> tuple[list[tuple[str, Path, record.Record]], dict[str, Any] | None]:
    """Load every record of the inputs and check they belong to one experiment."""
    items, summary = expand_inputs(paths)
    loaded: list[tuple[str, Path, record.Record]] = []
    for label, folder in items:
        rec = record.load_record(folder)
        loaded.append((label or "", folder, rec))
    if not loaded:
        raise InputError("report: no runs given")
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
    # Labels: the matrix's folder name, else the configuration, made unique with the folder name.
    labels: list[str] = []
    for label, _, rec in loaded:
        c = rec.fingerprint.config.get("controls") or {}
        labels.append(label or config_label(c if isinstance(c, dict) else {}, rec.fingerprint.config.get("perturb")))
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


def _classes(entries: list[tuple[str, record.Record, dict[str, Any], dict[str, Any] | None]]) -> list[ClassInfo]:
    by_digest: dict[str, list[int]] = {}
    for i, (_, rec, _, _) in enumerate(entries):
        by_digest.setdefault(rec.fingerprint.digest, []).append(i)
    names = _class_names(len(by_digest))
    out = []
    for name, (digest_value, idx) in zip(names, by_digest.items()):
        shared = []
        for key in CONTROL_KEYS:
            values = {json.dumps(entries[i][2].get(key)) for i in idx}
            if len(values) == 1 and len(idx) > 1:
                value = entries[idx[0]][2].get(key)
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


def numpy_forward(spec: ExperimentSpec, layout: record.TraceLayout, params: np.ndarray, buffers: np.ndarray,
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


def _twin_key(run: RunEntry) -> str:
    return json.dumps([run.controls.get(k) for k in CONTROL_KEYS] + [run.epochs])


def _describe_first(first: compare.Difference | None) -> tuple[str, str]:
    """(where, how much) of a first difference, in words."""
    if first is None:
        return "", ""
    detail = []
    if first.fraction_differing is not None:
        detail.append(f"{100 * first.fraction_differing:.0f}% of elements differ")
    if first.max_ulps is not None:
        detail.append(f"by up to {first.max_ulps} ulp")
    return first.where, ", ".join(detail)


def _first_row(first: compare.Difference | None) -> int | None:
    """Epoch row at which a difference first shows in the parameters (a step of epoch e: row e+1)."""
    if first is None:
        return None
    if first.row is not None:
        return int(first.row)
    return 0 if first.phase == "init" else int(first.epoch) + 1


def _layers(layout: record.TraceLayout) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.split(".")[0] for name, _ in layout.params))


def compare_runs(a: RunEntry, b: RunEntry, kind: str) -> PairView:
    """Two runs of one storage dtype and length, compared by ``bnaudit.compare``."""
    pc = compare.compare_pair(a.record.fingerprint, b.record.fingerprint)
    div = pc.divergence
    if div is not None:
        rows, layers = np.asarray(div.rows, dtype=np.int64), tuple(div.layers)
        max_abs, max_ulps = np.asarray(div.max_abs, dtype=np.float64), np.asarray(div.max_ulps, dtype=np.float64)
    else:  # identical: nothing apart anywhere
        layers = _layers(a.record.layout)
        rows = np.arange(a.epochs + 1)
        max_abs = max_ulps = np.zeros((len(rows), len(layers)))
    where, detail = _describe_first(pc.first)
    return PairView(a=a.label, b=b.label, kind=kind, identical=bool(pc.identical), first_text=where,
                    first_detail=detail, first_epoch_row=_first_row(pc.first),
                    first_layer=None if pc.first is None else pc.first.layer, rows=rows, layers=layers,
                    max_abs=max_abs, max_ulps=max_ulps, growth_rate=pc.growth_rate,
                    saturation_epoch=pc.saturation_epoch, environment_diff=tuple(pc.environment_diff))


DEFAULT_CONTROLS = {"threads": 1, "isa": "native", "deterministic": False, "onednn_isa": None, "mkl_cbwr": None,
                    "cpu_model": None}


def _departures(run: RunEntry) -> int:
    """How many controls differ from `bnaudit run`'s defaults (the baseline of pairs departs least)."""
    return sum(run.controls.get(k) != v for k, v in DEFAULT_CONTROLS.items())


def pick_pairs(runs: Sequence[RunEntry]) -> tuple[list[tuple[RunEntry, RunEntry, str]], list[RunEntry], list[str]]:
    """Which runs to compare: per (dtype, epochs) group, each class's first run against the baseline (the
    run closest to the default controls), and each --perturb run against its unperturbed twin (the 1-ulp
    sensitivity baseline).

    Returns (pairs, perturbed runs without a twin among the inputs, notes).
    """
    pairs: list[tuple[RunEntry, RunEntry, str]] = []
    orphans: list[RunEntry] = []
    notes: list[str] = []
    groups: dict[tuple[str, int], list[RunEntry]] = {}
    for r in runs:  # one group per dtype (bf16-mixed stores float32 but computes otherwise) and length
        groups.setdefault((str(r.controls.get("dtype", r.storage)), r.epochs), []).append(r)
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
        twins = {_twin_key(r): r for r in reversed(plain)}
        for r in members:
            if r.perturb:
                twin = twins.get(_twin_key(r))
                if twin is None:
                    orphans.append(r)
                else:
                    pairs.append((twin, r, "perturb"))
    if len(groups) > 1:
        notes.append("runs are paired within their dtype and length only; across dtypes, the divergence from "
                     "the mpmath reference is the common yardstick")
    return pairs, orphans, notes


def reference_view(fp: record.Fingerprint) -> tuple[ReferenceView | None, str | None]:
    """The run's divergence from the reference (``bnaudit.divergence`` block), or a note why not."""
    block = fp.extra.get("divergence")
    if block is None:
        return None, None
    try:
        d = divergence.decode_block(block)
    except InputError as exc:
        return None, f"{fp.source}: {exc.message}; its divergence from the reference is not drawn"
    series = d["series"]
    if not all(isinstance(x, dict) and isinstance(x.get("layer"), str) for x in series):
        return None, f"{fp.source}: divergence block: malformed series; not drawn"
    layers = tuple(dict.fromkeys(x["layer"] for x in series))
    if not layers or not len(d["rows"]):
        return None, f"{fp.source}: divergence block measured nothing; not drawn"
    tables = {what: np.full((len(d["rows"]), len(layers)), np.nan) for what in ("weights", "activations")}
    for i, x in enumerate(series):
        if x.get("what") in tables:
            tables[x["what"]][:, layers.index(x["layer"])] = d["correct_bits"][i]
    precision = int(d["precision_bits"])
    bits_w = np.clip(np.nan_to_num(tables["weights"], nan=0.0), 0, precision)
    return ReferenceView(rows=np.asarray(d["rows"], dtype=np.int64), layers=layers, correct_bits=bits_w,
                         activation_bits=np.clip(tables["activations"], 0, precision), precision=precision), None


def audit_view(fp: record.Fingerprint) -> tuple[AuditView | None, str | None]:
    """The operator audit (``bnaudit.audit`` block): each operator's worst error over its layers, per row."""
    block = fp.extra.get("operator_audit")
    if block is None:
        return None, None
    bad = f"{fp.source}: its operator-audit block is malformed; not drawn"
    if not isinstance(block, dict):
        return None, bad
    if block.get("skipped"):
        return None, f"{fp.source}: operator audit skipped ({str(block['skipped'])[:120]})"
    try:
        rows = np.asarray(block.get("rows"), dtype=np.int64).reshape(-1)
        errors = block.get("errors")
        if not isinstance(errors, dict) or not len(rows):
            return None, bad
        ops: dict[str, np.ndarray] = {}
        for per_op in errors.values():
            if not isinstance(per_op, dict):
                return None, bad
            for op, values in per_op.items():
                arr = np.asarray(values, dtype=np.float64).reshape(-1)
                if arr.shape != rows.shape:
                    return None, bad
                ops[str(op)] = np.fmax(ops[str(op)], arr) if str(op) in ops else arr
        amps = [float(v) for vs in (block.get("max_amplification") or {}).values() for v in vs]
        n_flags = block.get("n_flags", 0)
    except (TypeError, ValueError, AttributeError):
        return None, bad
    return AuditView(rows=rows, operators=ops, flags=int(n_flags) if isinstance(n_flags, int) else 0,
                     max_amplification=max(amps) if amps else math.nan), None


def floor_view(fp: record.Fingerprint) -> tuple[FloorView | None, str | None]:
    """The chaos floor a --perturb run measured against its unperturbed twin (worker's block)."""
    block = fp.extra.get("perturbation")
    if block is None:
        return None, None
    try:
        max_abs = bits.from_hex(block["max_abs"], "float64")
        rate, sat = block.get("growth_rate"), block.get("saturation_row")
        rate = float(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) else None
        sat = int(sat) if isinstance(sat, int) and not isinstance(sat, bool) else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None, f"{fp.source}: its perturbation block is malformed; not drawn"
    return FloorView(rows=np.arange(len(max_abs)), max_abs=np.asarray(max_abs, dtype=np.float64),
                     growth_rate=rate, saturation_row=sat), None


def matrix_findings(summary: dict[str, Any] | None) -> tuple[str, ...]:
    """The sentences of a matrix summary's "findings" (strings only, at most 50, each at most 600 characters)."""
    found = summary.get("findings") if summary else None
    if not isinstance(found, list):
        return ()
    return tuple(f[:600] for f in found if isinstance(f, str))[:50]


def build_report(paths: Sequence[Path]) -> Report:
    """Load the inputs and compute everything the report shows."""
    loaded, summary = load_runs(paths)
    spec = loaded[0][2].spec
    inputs = frozen.load(spec)
    entries: list[tuple[str, record.Record, dict[str, Any], dict[str, Any] | None]] = []
    for label, _, rec in loaded:
        config = rec.fingerprint.config
        raw_controls, raw_perturb = config.get("controls"), config.get("perturb")
        entries.append((label, rec, raw_controls if isinstance(raw_controls, dict) else {},
                        raw_perturb if isinstance(raw_perturb, dict) else None))
    classes = _classes(entries)
    class_of = {m: c.name for c in classes for m in c.members}
    runs = tuple(RunEntry(label=label, path=path, record=rec, controls=e[2], perturb=e[3], class_name=class_of[label])
                 for (label, path, rec), e in zip(loaded, entries))
    grid_x = np.linspace(spec.data.x_low, spec.data.x_high, GRID_POINTS)
    learned = {r.label: learned_function(spec, r.record, inputs.inputs, grid_x) for r in runs}
    notes: list[str] = []
    pair_specs, orphans, pair_notes = pick_pairs(runs)
    notes += pair_notes
    pairs = tuple(compare_runs(a, b, kind) for a, b, kind in pair_specs)
    references: dict[str, ReferenceView] = {}
    audits: dict[str, AuditView] = {}
    floors: dict[str, FloorView] = {}
    for r in runs:
        fp = r.record.fingerprint
        ref, ref_note = reference_view(fp)
        aud, aud_note = audit_view(fp)
        floor, floor_note = floor_view(fp)
        if ref is not None:
            references[r.label] = ref
        if aud is not None:
            audits[r.label] = aud
        if floor is not None:
            floors[r.label] = floor
        notes += [n for n in (ref_note, aud_note, floor_note) if n]
    if not references:
        notes.append("no run carries a divergence from the mpmath reference (record extra \"divergence\": is a "
                     "reference stored for this spec?), so heatmaps and growth curves show divergence between "
                     "runs only")
    if not audits:
        notes.append("no run carries an operator audit (record extra \"operator_audit\"), so the BN-vs-Linear "
                     "operator errors are not drawn")
    for r in orphans:
        if r.label not in floors:
            notes.append(f"{r.label}: no unperturbed run of the same configuration and length among the inputs, "
                         "and its record carries no perturbation block, so its 1-ulp baseline is not drawn")
    if not any(r.perturb for r in runs):
        notes.append("no --perturb run among the inputs, so the 1-ulp sensitivity baseline is not drawn")
    return Report(spec=spec, sources=tuple(str(p) for p in paths), runs=runs, classes=tuple(classes),
                  learned=learned, pairs=pairs, references=references, audits=audits, floors=floors,
                  matrix=summary, findings=matrix_findings(summary),
                  notes=tuple(notes), x=inputs.x.copy(), targets=inputs.targets.copy(), n_train=spec.data.train)


# --------------------------------------------------------------------------- output


@dataclasses.dataclass(frozen=True)
class WrittenReport:
    """What ``write_report`` produced."""

    out: Path
    """The report folder."""
    files: tuple[str, ...]
    """Files in it, relative to it."""
    seconds: float
    """Wall time of building and writing."""
    report: Report
    """The report's content (for the terminal view)."""


def write_report(paths: Sequence[Path], out: Path, *, force: bool = False) -> WrittenReport:
    """Build the report of ``paths`` and write it to ``out`` atomically (temp folder, then rename)."""
    from bnaudit.report import figures, html, markdown

    started = time.perf_counter()
    out = Path(out)
    report = build_report(paths)  # inputs first: a bad input never leaves an output folder behind
    target = out.resolve()
    for r in report.runs:
        folder = r.path.resolve()
        if target == folder or target in folder.parents or folder in target.parents:
            raise OutputError(f"--out {out} overlaps the input {r.path}; write the report elsewhere")
    record.prepare_output(out, force=force)
    with record.atomic_folder(out, "report") as tmp:
        figs = figures.render_all(report, tmp / "figures")
        (tmp / "report.md").write_text(markdown.render(report, figs), encoding="utf-8")
        # index.html last: a report folder is complete when it is there.
        (tmp / "index.html").write_text(html.render(report, figs, tmp), encoding="utf-8")
    files = tuple(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    return WrittenReport(out=out, files=files, seconds=time.perf_counter() - started, report=report)
