"""The stored reference: layout, location and validated loading (numpy only).

A reference folder holds the trajectory of the mpmath reference at the stored rows:

    manifest.json   schema, spec (and its hash), frozen-input digest, the two
                    precisions, the rows, the column layout, the agreement of the two
                    precisions per row (decimal digits), build information, and the
                    sha256 of each array file
    values_hi.npy   (rows, n_values) float64: each value rounded to nearest float64
    values_lo.npy   (rows, n_values) float64: the rounded remainder (value - hi)

hi + lo is a double-double: about 106 bits of each value, enough to measure the error
of a float64 run (53 bits) with 50 bits to spare.  The columns of one row are, in this
order: the parameters (spec.parameters() order, flattened row-major, as params.npy of a
record), the BN running statistics (spec.buffers() order), the probe activations
(blocks per module in spec.modules() order, each batch_size x width, sample-major, as
probe.npy of a record), and the eval-mode train and test MSE.

Rows are epoch rows (0: initial state, e+1: end of epoch e) from
``layout.probe_schedule(epochs)``: every row up to 100, then every 10th (and the last).

The default spec's reference ships in ``reference/mpmath/<short spec hash>/``; a custom
spec's is built on demand into the cache (``bnaudit.frozen.cache_root()/reference/<spec
hash>``).  Compare and report read it through this module, without mpmath.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import fileio
from bnaudit.errors import InputError, ReferenceFailure
from bnaudit.frozen import cache_root, shipped_root
from bnaudit.layout import TraceLayout, probe_schedule
from bnaudit.spec import ExperimentSpec, default_spec

REFERENCE_SCHEMA = "bnaudit.reference/1"
ARRAY_FILES = ("values_hi.npy", "values_lo.npy")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_ARRAY_BYTES = 256 * 1024 * 1024
SECTIONS = ("params", "buffers", "probe", "losses")
DEFAULT_PRECISION = 512
"""Bits of the stored trajectory.  Measured on the default spec: the 512- and 640-bit
trajectories agree on 151 digits at row 0 and on >= 136.6 digits (454 bits) at every
stored row to epoch 1000, so chaos cost about 50 bits over the run (most of it in the
first 100 epochs, 0.2-0.5 bits per epoch there).  Cost per operation hardly depends on
the precision at these sizes (Python overhead dominates), so the margin is cheap."""
DEFAULT_CHECK_PRECISION = 640
"""Bits of the recomputation that certifies it (must differ from the precision)."""
MIN_AGREEMENT_DIGITS = 30.0
"""Decimal digits both precisions must agree on at every stored row (~100 bits)."""
VERIFY_RANDOM_ROWS = 3
"""Rows the default verify draws at random beyond its first epochs."""
VERIFY_RANDOM_WITHIN = 40
"""The epoch up to which they are drawn.  Every check replays from epoch 0 (the reference
keeps double-double rows, not the exact state), so a row at epoch e costs e epochs: on the
default spec at 512 bits about 0.35 s per epoch and 0.2 s per recomputed row of a free core
(the shipped build: 770 CPU s for both precisions over 1000 epochs), 0.6 and 0.4 s of a
contended one.  40 epochs keep the default verify at 15-30 s of CPU (measured: 26 s, 76 s
wall on two cores loaded 4x).  Later rows: ``epochs=None`` (--epochs all)."""


@dataclasses.dataclass(frozen=True)
class Columns:
    """Column ranges of one row of the values arrays."""

    n_params: int
    """Parameters, spec.parameters() order."""
    n_buffers: int
    """BN running statistics, spec.buffers() order."""
    n_probe: int
    """Probe activations, blocks per module."""
    n_losses: int = 2
    """Eval-mode train and test MSE."""

    @classmethod
    def for_spec(cls, spec: ExperimentSpec) -> Columns:
        layout = TraceLayout.for_spec(spec)
        return cls(n_params=layout.n_params, n_buffers=layout.n_buffers,
                   n_probe=sum(layout.probe_width) * spec.train.batch_size)

    @property
    def total(self) -> int:
        return self.n_params + self.n_buffers + self.n_probe + self.n_losses

    def slices(self) -> dict[str, slice]:
        out, offset = {}, 0
        for name, size in zip(SECTIONS, (self.n_params, self.n_buffers, self.n_probe, self.n_losses)):
            out[name] = slice(offset, offset + size)
            offset += size
        return out


@dataclasses.dataclass(frozen=True)
class StoredReference:
    """A loaded, verified reference trajectory."""

    path: Path
    """The reference folder."""
    spec: ExperimentSpec
    """The experiment it is the reference of."""
    frozen: str
    """Digest of the frozen inputs it was computed from."""
    precision: int
    """Working precision (bits) of the stored trajectory."""
    check_precision: int
    """Precision (bits) of the independent recomputation it was checked against."""
    epochs: int
    """Epochs built (the stored rows end here)."""
    rows: np.ndarray
    """(n_rows,) int64 epoch rows stored."""
    hi: np.ndarray
    """(n_rows, n_values) float64 leading part of each value."""
    lo: np.ndarray
    """(n_rows, n_values) float64 trailing part of each value."""
    columns: Columns
    """Column layout of hi and lo."""
    agreement: np.ndarray
    """(n_rows,) decimal digits on which the two precisions agree (min over the row's values)."""
    min_digits: float
    """Agreement the build required of every stored row."""
    digest: str
    """sha256 of the manifest's file table: names this reference in divergence blocks."""
    build: dict[str, Any]
    """Build information (mpmath version, backend, seconds)."""

    def section(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(hi, lo) of one section: params, buffers, probe or losses."""
        s = self.columns.slices()[name]
        return self.hi[:, s], self.lo[:, s]

    def row_index(self) -> dict[int, int]:
        return {int(r): i for i, r in enumerate(self.rows)}


def folder_for(spec: ExperimentSpec) -> Path:
    """Where the reference of ``spec`` lives: shipped for the default spec, else the cache."""
    if spec.hash == default_spec().hash:
        return shipped_root() / "mpmath" / spec.short_hash
    return cache_root() / "reference" / spec.hash


def exists(spec: ExperimentSpec, folder: Path | None = None) -> bool:
    return ((folder or folder_for(spec)) / "manifest.json").is_file()


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def manifest_digest(files: dict[str, str]) -> str:
    return _sha(json.dumps(files, sort_keys=True).encode())


def load(spec: ExperimentSpec, folder: Path | None = None) -> StoredReference:
    """Load and verify the reference of ``spec`` (ReferenceFailure if there is none)."""
    folder = Path(folder) if folder is not None else folder_for(spec)
    if not exists(spec, folder):
        raise ReferenceFailure(f"no mpmath reference for spec {spec.short_hash} at {folder}; "
                               "build it with `bnaudit reference build`")
    return read(folder, spec)


def read(folder: Path, spec: ExperimentSpec | None = None) -> StoredReference:
    """Read a reference folder, checking manifest fields, sha256, shapes and dtypes."""
    from bnaudit.spec import spec_from_record_dict

    folder = Path(folder)
    where = f"reference {folder}"
    path = folder / "manifest.json"
    try:
        raw = fileio.read_json(path, "reference manifest", max_bytes=MAX_MANIFEST_BYTES)
    except InputError as exc:
        raise InputError(f"{where}: unreadable manifest ({exc.message})") from None
    if raw.get("schema") != REFERENCE_SCHEMA:
        raise InputError(f"{where}: manifest schema is not {REFERENCE_SCHEMA}")

    def field(key: str, kind: type | tuple[type, ...]) -> Any:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InputError(f"{where}: manifest field {key!r} missing or of the wrong type")
        return value

    try:
        stored_spec = spec_from_record_dict(field("spec", dict))
    except InputError as exc:
        raise InputError(f"{where}: stored spec is invalid ({exc.message})") from None
    if stored_spec.hash != field("spec_hash", str):
        raise InputError(f"{where}: spec_hash does not match the stored spec (edited?)")
    if spec is not None and stored_spec.hash != spec.hash:
        raise InputError(f"{where}: built for spec {stored_spec.short_hash}, not {spec.short_hash}")
    epochs = field("epochs", int)
    if not 1 <= epochs <= stored_spec.train.epochs:
        raise InputError(f"{where}: epochs {epochs} out of range")
    rows = field("rows", list)
    if rows != reference_rows(stored_spec, epochs):
        raise InputError(f"{where}: rows are not the schedule for {epochs} epochs")
    precision, check = field("precision", int), field("check_precision", int)
    if not (53 <= precision <= 1 << 16 and 53 <= check <= 1 << 16):
        raise InputError(f"{where}: precisions out of range")
    columns = Columns.for_spec(stored_spec)
    if field("columns", dict) != dataclasses.asdict(columns):
        raise InputError(f"{where}: column layout does not match its spec")
    agreement = field("agreement", list)
    if len(agreement) != len(rows) or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                              for a in agreement):
        raise InputError(f"{where}: agreement must hold one number per row")
    files = field("files", dict)
    if sorted(files) != sorted(ARRAY_FILES) or not all(isinstance(v, str) for v in files.values()):
        raise InputError(f"{where}: manifest does not list {', '.join(ARRAY_FILES)}")
    arrays = {}
    for name in ARRAY_FILES:
        arr = fileio.read_npy(folder / name, files[name], against="the manifest", max_bytes=MAX_ARRAY_BYTES)
        if arr.dtype != np.dtype("<f8") or arr.shape != (len(rows), columns.total):
            raise InputError(f"{where}: {name} expected <f8 {(len(rows), columns.total)}, "
                             f"found {arr.dtype.str} {arr.shape}")
        arrays[name] = arr
    min_digits = field("min_digits", (int, float))
    build: dict[str, Any] = raw["build"] if isinstance(raw.get("build"), dict) else {}
    return StoredReference(
        path=folder, spec=stored_spec, frozen=field("frozen", str), precision=precision, check_precision=check,
        epochs=epochs, rows=np.array(rows, dtype=np.int64), hi=arrays["values_hi.npy"], lo=arrays["values_lo.npy"],
        columns=columns, agreement=np.array(agreement, dtype=np.float64), min_digits=float(min_digits),
        digest=manifest_digest(files), build=build)


def reference_rows(spec: ExperimentSpec, epochs: int) -> list[int]:
    """The stored rows of a reference built to ``epochs``: the probe schedule."""
    return probe_schedule(epochs)

