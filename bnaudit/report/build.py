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
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import bits, frozen, record
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
    """Epoch rows."""
    layers: tuple[str, ...]
    """Layers."""
    correct_bits: np.ndarray
    """(rows, layers) correct bits (capped at the dtype's precision)."""
    precision: int
    """The run dtype's significand bits (the cap)."""


@dataclasses.dataclass(frozen=True)
class AuditView:
    """Operator-audit errors of one run (its record's ``extra["audit"]``), in ulps."""

    rows: np.ndarray
    """Epoch rows audited."""
    operators: dict[str, np.ndarray]
    """Operator name (linear, bn.mean, bn.var, bn.rsqrt, bn.out, ...) -> max ulps per row."""


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
    matrix: dict[str, Any] | None
    """The matrix summary.json (when a matrix folder was given), passed through."""
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


def expand_inputs(paths: Sequence[Path]) -> tuple[list[tuple[str | None, Path]], dict[str, Any] | None]:
    """Record folders named by the inputs: (label or None, folder), and a matrix summary if any.

    A record folder holds record.json; a matrix folder holds runs/<label>/ record folders
    (and summary.json).  Anything else, a partial folder, or a matrix that lists a run it
    does not hold, is refused naming the folder.
    """
    out: list[tuple[str | None, Path]] = []
    summary: dict[str, Any] | None = None
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise InputError(f"{path}: no such run or matrix folder")
        if path.is_file():
            if path.name == "record.json":
                path = path.parent
            else:
                raise InputError(f"{path}: not a run or matrix folder (report reads record folders, not files)")
        if _partial(path):
            raise InputError(f"{path}: partial run folder (an interrupted run's leftovers); rerun it")
        if (path / "record.json").exists():
            out.append((None, path))
            continue
        runs = path / "runs"
        if runs.is_dir():
            summary = _read_matrix_summary(path)
            children = sorted(p for p in runs.iterdir() if p.is_dir())
            for child in children:
                if _partial(child) or not (child / "record.json").exists():
                    raise InputError(f"{child}: partial run folder in matrix {path} (the matrix was interrupted; "
                                     "rerun the same matrix command to finish it)")
            listed = _listed_runs(summary)
            present = {c.name for c in children}
            for name in listed:
                if name not in present:
                    raise InputError(f"{runs / name}: run listed in {path / 'summary.json'} is missing")
            if not children:
                raise InputError(f"{path}: matrix folder without runs")
            out.extend((c.name, c) for c in children)
            continue
        raise InputError(f"{path}: not a complete bnaudit record (no record.json) nor a matrix folder (no runs/)")
    if len(out) > MAX_RUNS:
        raise InputError(f"{len(out)} runs: a report covers at most {MAX_RUNS}")
    return out, summary


def _read_matrix_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    if not path.exists():
        return None
    try:
        if path.stat().st_size > record.MAX_JSON_BYTES:
            raise InputError(f"{path}: larger than any matrix summary")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not a valid matrix summary ({str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a valid matrix summary (top level is not an object)")
    return raw


def _listed_runs(summary: dict[str, Any] | None) -> list[str]:
    """Run folder names a matrix summary says it holds (tolerant of its exact shape)."""
    if not summary:
        return []
    runs = summary.get("runs")
    names: list[str] = []
    if isinstance(runs, dict):
        names = [k for k in runs if isinstance(k, str)]
    elif isinstance(runs, list):
        for item in runs:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict) and isinstance(item.get("label"), str):
                names.append(item["label"])
    return [Path(n).name for n in names if n and "/" not in n and n not in (".", "..")]


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
    first_label, first_path, first = loaded[0][0], loaded[0][1], loaded[0][2]
    for _, path, rec in loaded[1:]:
        if rec.spec.hash != first.spec.hash:
            raise MismatchError(
                f"report refused: {path} is of spec {rec.spec.short_hash} ({rec.spec.name!r}) but {first_path} "
                f"is of spec {first.spec.short_hash} ({first.spec.name!r}); report runs of one experiment")
        if rec.fingerprint.frozen != first.fingerprint.frozen:
            raise MismatchError(f"report refused: {path} and {first_path} started from different frozen inputs")
    del first_label
    # Labels: the matrix's folder name, else the configuration, made unique with the folder name.
    labels: list[str] = []
    for label, path, rec in loaded:
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


def _compare_module() -> Any:
    try:
        from bnaudit import compare
    except ImportError:  # compare lands in its own change; the report still draws everything else
        return None
    return compare


def _describe_first(first: Any) -> str:
    if first is None:
        return ""
    where = f"epoch {first.epoch}"
    if first.step is not None:
        where += f" step {first.step}"
    what = f"{first.phase} {first.tensor or first.layer}"
    detail = []
    if first.fraction_differing is not None:
        detail.append(f"{100 * first.fraction_differing:.0f}% of elements differ")
    if first.max_ulps is not None:
        detail.append(f"by up to {first.max_ulps} ulp")
    return f"{where}, {what}" + (f" ({', '.join(detail)})" if detail else "")


def _first_row(first: Any) -> int | None:
    """Epoch row at which a difference first shows in the parameters (a step of epoch e: row e+1)."""
    if first is None:
        return None
    if first.phase == "init":
        return 0
    return int(first.epoch) + 1


def compare_runs(a: RunEntry, b: RunEntry, kind: str) -> PairView:
    """Compare two runs of one storage dtype through ``bnaudit.compare`` (or locally when it is absent)."""
    compare = _compare_module()
    fa, fb = a.record.fingerprint, b.record.fingerprint
    if compare is not None:
        pc = compare.compare_pair(fa, fb)
        div = pc.divergence
        if div is not None:
            rows, layers = np.asarray(div.rows, dtype=np.int64), tuple(div.layers)
            max_abs, max_ulps = np.asarray(div.max_abs, dtype=np.float64), np.asarray(div.max_ulps, dtype=np.float64)
        else:
            rows, layers, max_abs, max_ulps = _local_divergence(a.record, b.record)
        return PairView(a=a.label, b=b.label, kind=kind, identical=bool(pc.identical),
                        first_text=_describe_first(pc.first), first_epoch_row=_first_row(pc.first),
                        first_layer=None if pc.first is None else pc.first.layer, rows=rows, layers=layers,
                        max_abs=max_abs, max_ulps=max_ulps, growth_rate=pc.growth_rate,
                        saturation_epoch=pc.saturation_epoch, environment_diff=tuple(pc.environment_diff))
    rows, layers, max_abs, max_ulps = _local_divergence(a.record, b.record)
    identical = fa.digest == fb.digest
    first_row, first_layer, text = None, None, ""
    if not identical:
        differing = np.nonzero(fa.row_digests != fb.row_digests)[0]
        first_row = int(differing[0]) if len(differing) else 0
        groups = [g for j, g in enumerate(fa.groups) if fa.group_digests[first_row, j] != fb.group_digests[first_row, j]]
        if groups:
            first_layer = groups[0][1]
            text = f"epoch row {first_row}, {groups[0][0]} {groups[0][1]} (epoch-level detail only)"
        else:
            text = f"epoch row {first_row} (epoch-level detail only)"
    return PairView(a=a.label, b=b.label, kind=kind, identical=identical, first_text=text,
                    first_epoch_row=first_row, first_layer=first_layer, rows=rows, layers=layers,
                    max_abs=max_abs, max_ulps=max_ulps, growth_rate=None, saturation_epoch=None,
                    environment_diff=())


def _local_divergence(ra: record.Record, rb: record.Record) -> tuple[np.ndarray, tuple[str, ...], np.ndarray,
                                                                     np.ndarray]:
    """Per-layer largest |a - b| and ulp distance of the parameters at every epoch row."""
    storage = ra.storage
    pa, pb = ra.arrays["params"], rb.arrays["params"]
    n = min(len(pa), len(pb))
    da, db = bits.to_float64(pa[:n], storage), bits.to_float64(pb[:n], storage)
    ulps = bits.ulp_distance(pa[:n], pb[:n], storage).astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(da - db)
    layers: list[str] = []
    cols: dict[str, list[int]] = {}
    for name, sl in ra.layout.param_slices().items():
        layer = name.split(".")[0]
        if layer not in cols:
            layers.append(layer)
            cols[layer] = []
        cols[layer].extend(range(sl.start, sl.stop))
    max_abs = np.stack([np.nanmax(diff[:, cols[lay]], axis=1) if n else np.zeros(0) for lay in layers], axis=1)
    max_ulps = np.stack([ulps[:, cols[lay]].max(axis=1) for lay in layers], axis=1)
    return np.arange(n), tuple(layers), max_abs, max_ulps


def pick_pairs(runs: Sequence[RunEntry]) -> tuple[list[tuple[RunEntry, RunEntry, str]], list[str]]:
    """Which runs to compare: per (storage, epochs) group, each class's first run against the baseline's,
    and each --perturb run against its unperturbed twin (the 1-ulp sensitivity baseline)."""
    pairs: list[tuple[RunEntry, RunEntry, str]] = []
    notes: list[str] = []
    groups: dict[tuple[str, int], list[RunEntry]] = {}
    for r in runs:
        groups.setdefault((r.storage, r.epochs), []).append(r)
    for (storage, epochs), members in groups.items():
        plain = [r for r in members if not r.perturb]
        if plain:
            base = plain[0]
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
                    notes.append(f"{r.label}: no unperturbed run of the same configuration and length among the "
                                 "inputs, so its 1-ulp sensitivity baseline is not drawn")
                else:
                    pairs.append((twin, r, "perturb"))
    if len({(r.storage, r.epochs) for r in runs}) > 1:
        notes.append("runs of different storage dtypes or lengths are compared only within their own group; "
                     "across dtypes, the divergence from the mpmath reference is the common yardstick")
    return pairs, notes


def _numbers(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.dtype != np.float64:
        raise ValueError(where)
    return arr


def reference_view(fp: record.Fingerprint) -> tuple[ReferenceView | None, str | None]:
    """The run's divergence from the reference, if its record carries one in a form we read.

    Expected ``extra["divergence"]``: {"rows": [...], "layers": [...], "correct_bits":
    [[...] per row] (or {layer: [...] per row})}, possibly nested under "params"/"weights".
    """
    block = fp.extra.get("divergence")
    if block is None:
        return None, None
    precision = bits.storage(fp.storage).mantissa_bits
    candidates = [block] + [block.get(k) for k in ("params", "weights", "parameters") if isinstance(block, dict)]
    for cand in candidates:
        if not isinstance(cand, dict) or "correct_bits" not in cand:
            continue
        try:
            rows = np.asarray(cand.get("rows", block.get("rows")), dtype=np.int64)
            cb = cand["correct_bits"]
            if isinstance(cb, dict):
                layers = tuple(str(k) for k in cb)
                table = np.stack([np.asarray(cb[k], dtype=np.float64) for k in cb], axis=1)
            else:
                layers = tuple(str(k) for k in cand.get("layers", block.get("layers")))
                table = np.asarray(cb, dtype=np.float64)
            if table.shape != (len(rows), len(layers)) or len(rows) == 0:
                raise ValueError("shape")
        except (TypeError, ValueError, KeyError):
            continue
        return ReferenceView(rows=rows, layers=layers, correct_bits=np.clip(table, 0, precision),
                             precision=precision), None
    return None, f"{fp.source}: its divergence block is not in a form this report reads (no correct_bits table)"


def audit_view(fp: record.Fingerprint) -> tuple[AuditView | None, str | None]:
    """Operator-audit errors in ulps per audited row, if the record carries them in a form we read.

    Expected ``extra["audit"]``: {"rows": [...], "max_ulps": {operator: [... per row]}}
    (also accepted under "operators" or "errors").
    """
    block = fp.extra.get("audit")
    if block is None:
        return None, None
    if isinstance(block, dict):
        try:
            rows = np.asarray(block.get("rows"), dtype=np.int64)
            for key in ("max_ulps", "operators", "errors"):
                table = block.get(key)
                if isinstance(table, dict) and table:
                    ops = {str(k): np.asarray(v, dtype=np.float64) for k, v in table.items()
                           if isinstance(v, list) and len(v) == len(rows)}
                    if ops and len(rows):
                        return AuditView(rows=rows, operators=ops), None
        except (TypeError, ValueError):
            pass
    return None, f"{fp.source}: its operator-audit block is not in a form this report reads"


def build_report(paths: Sequence[Path]) -> Report:
    """Load the inputs and compute everything the report shows."""
    loaded, summary = load_runs(paths)
    spec = loaded[0][2].spec
    inputs = frozen.load(spec)
    entries = []
    for label, _, rec in loaded:
        config = rec.fingerprint.config
        controls = config.get("controls") if isinstance(config.get("controls"), dict) else {}
        perturb = config.get("perturb") if isinstance(config.get("perturb"), dict) else None
        entries.append((label, rec, controls, perturb))
    classes = _classes(entries)
    class_of = {m: c.name for c in classes for m in c.members}
    runs = tuple(RunEntry(label=label, path=path, record=rec, controls=e[2], perturb=e[3], class_name=class_of[label])
                 for (label, path, rec), e in zip(loaded, entries))
    grid_x = np.linspace(spec.data.x_low, spec.data.x_high, GRID_POINTS)
    learned = {r.label: learned_function(spec, r.record, inputs.inputs, grid_x) for r in runs}
    notes: list[str] = []
    pair_specs, pair_notes = pick_pairs(runs)
    notes += pair_notes
    if _compare_module() is None and pair_specs:
        notes.append("bnaudit.compare is not available: pair divergences were computed from the parameters alone "
                     "and the first difference is located at epoch level only")
    pairs = tuple(compare_runs(a, b, kind) for a, b, kind in pair_specs)
    references: dict[str, ReferenceView] = {}
    audits: dict[str, AuditView] = {}
    for r in runs:
        ref, note = reference_view(r.record.fingerprint)
        if ref is not None:
            references[r.label] = ref
        if note:
            notes.append(note)
        aud, note = audit_view(r.record.fingerprint)
        if aud is not None:
            audits[r.label] = aud
        if note:
            notes.append(note)
    if not references:
        notes.append("no run carries a divergence from the mpmath reference (record extra \"divergence\"), so the "
                     "heatmaps and growth curves show divergence between runs only")
    if not audits:
        notes.append("no run carries an operator audit (record extra \"audit\"), so the BN-vs-Linear operator "
                     "errors are not drawn")
    if not any(r.perturb for r in runs):
        notes.append("no --perturb run among the inputs, so the 1-ulp sensitivity baseline is not drawn")
    return Report(spec=spec, sources=tuple(str(p) for p in paths), runs=runs, classes=tuple(classes),
                  learned=learned, pairs=pairs, references=references, audits=audits, matrix=summary,
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
    record.prepare_output(out, force=force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        figs = figures.render_all(report, tmp / "figures")
        (tmp / "report.md").write_text(markdown.render(report, figs), encoding="utf-8")
        # index.html last: a report folder is complete when it is there.
        (tmp / "index.html").write_text(html.render(report, figs, tmp), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write report to {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = tuple(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    return WrittenReport(out=out, files=files, seconds=time.perf_counter() - started, report=report)
