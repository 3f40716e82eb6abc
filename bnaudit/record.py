"""Run records and fingerprints: schema, explicit serialisation, validated loading.

A **record** is a folder written by one run:

    record.json     metadata (spec, controls asked for and read back, environment,
                    losses, layout of every array file, sha256 of each file)
    params.npy      (epochs+1, n_params) parameters after each epoch (row 0: initial),
                    in the run's storage dtype (bfloat16 as uint16 bit patterns)
    buffers.npy     (epochs+1, n_buffers) BatchNorm running statistics, same rows
    losses.npy      (epochs+1, 2) float64 eval-mode train and test MSE, same rows
    step_loss.npy   (epochs, steps) float64 training loss of every step
    min_var.npy     (epochs+1, n_bn) float64 smallest per-unit batch variance (computed in float64) / eps
    epoch_digests.npy (epochs+1, n_epoch_tensors) uint64 digests at each epoch end
    step_digests.npy  (n_step_rows, n_step_tensors) uint64 digests after each traced step
    step_rows.npy   (n_step_rows, 2) int64 (epoch, step) of each traced step
    probe.npy       (n_probe_rows, n_probe) probe-batch activations at snapshot rows
    fingerprint.json the fingerprint derived from all of the above

The folder is written under a temporary name and renamed when complete, and
record.json holds the sha256 of every array file: an interrupted or edited record
never loads.

A **fingerprint** is one small JSON file (a few hundred kB for 1000 epochs) meant to be
committed or pasted into a CI log.  It holds full 64-bit digests of every tensor of the
traced steps, a 64-bit digest of each epoch end, a 32-bit digest per (phase, layer)
group of each epoch end, and exact parameter snapshots at a few epochs.  That is enough
to tell bit-identical from different, and to name the first differing epoch, step,
phase, layer and tensor, from fingerprints alone.

Row and step numbering: epoch rows are 0 for the initial state and e+1 for the end of
(0-based) epoch e; traced steps are (epoch, step), both 0-based.

Digests are the first 64 bits of sha256 of a tensor's raw bytes, 0 meaning "no tensor here" (a gradient
before the first step).  This module is numpy-only.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import __version__, bits
from bnaudit.errors import InputError, OutputError
from bnaudit.spec import ExperimentSpec, spec_from_record_dict

RECORD_SCHEMA = "bnaudit.record/1"
FINGERPRINT_SCHEMA = "bnaudit.fingerprint/1"
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_NPY_BYTES = 1024 * 1024 * 1024
PHASES = ("init", "forward", "backward", "update", "eval")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEXS = re.compile(r"[0-9a-f]*")



# --------------------------------------------------------------------------- layout

@dataclasses.dataclass(frozen=True)
class TensorKey:
    """One traced tensor: what it is and when in a step it is computed."""

    phase: str
    """forward, backward, update or eval."""
    layer: str
    """Module name (linear1, bn1, relu1, ...) or "loss"."""
    key: str
    """Name of the tensor, e.g. linear1.weight.grad or bn2.out."""


@dataclasses.dataclass(frozen=True)
class TraceLayout:
    """Which tensors are digested, in computation order, for a spec."""

    step_tensors: tuple[TensorKey, ...]
    """Tensors digested after each traced step."""
    epoch_tensors: tuple[TensorKey, ...]
    """Tensors digested at each epoch end."""
    params: tuple[tuple[str, tuple[int, ...]], ...]
    """Trainable parameters (name, shape), the column order of params.npy."""
    buffers: tuple[tuple[str, tuple[int, ...]], ...]
    """Running statistics (name, shape), the column order of buffers.npy."""
    bn_layers: tuple[str, ...]
    """BatchNorm layer names, the column order of min_var.npy."""
    modules: tuple[str, ...]
    """Every module in forward order (the probe's layer order)."""
    probe_width: tuple[int, ...]
    """Width of each module's output, the probe's column blocks (times the probe rows)."""

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.params)

    @property
    def n_buffers(self) -> int:
        return sum(math.prod(s) for _, s in self.buffers)

    @property
    def param_layers(self) -> list[tuple[str, str]]:
        return [(name, name.split(".")[0]) for name, _ in self.params]

    def param_slices(self) -> dict[str, slice]:
        """Column slice of each parameter in params.npy."""
        out, offset = {}, 0
        for name, shape in self.params:
            out[name] = slice(offset, offset + math.prod(shape))
            offset += math.prod(shape)
        return out

    def groups(self) -> list[tuple[str, str]]:
        """The (phase, layer) groups of epoch tensors, in order of first appearance."""
        seen: dict[tuple[str, str], None] = {}
        for t in self.epoch_tensors:
            seen.setdefault((t.phase, t.layer), None)
        return list(seen)

    @classmethod
    def for_spec(cls, spec: ExperimentSpec) -> TraceLayout:
        params = spec.parameters()
        buffers = spec.buffers()
        modules = spec.modules()
        layer_of = lambda name: name.split(".")[0]  # noqa: E731
        # ReLU outputs are not digested: max(0, x) is exact, so they differ only where
        # their input (a BN or Linear output, digested) differs.
        forward = []
        for name, kind in modules:
            if kind == "relu":
                continue
            forward.append(TensorKey("forward", name, f"{name}.out"))
            if kind == "bn":  # torch updates the running statistics during the forward pass
                forward += [TensorKey("forward", name, f"{name}.running_mean"),
                            TensorKey("forward", name, f"{name}.running_var")]
        forward.append(TensorKey("forward", "loss", "loss"))
        backward = [TensorKey("backward", layer_of(n), f"{n}.grad") for n, _ in reversed(params)]
        # torch.optim.SGD (for-loop form) updates parameter by parameter: buffer, then value.
        update = []
        for n, _ in params:
            update += [TensorKey("update", layer_of(n), f"{n}.momentum_buffer"), TensorKey("update", layer_of(n), n)]
        step_tensors = tuple(forward + backward + update)

        epoch = [TensorKey("forward", "loss", "loss.steps")]
        epoch += [TensorKey("forward", layer_of(n), n) for n, _ in buffers]
        epoch += backward + update
        epoch += [TensorKey("eval", name, f"eval.{name}") for name, kind in modules if kind != "relu"]
        epoch.append(TensorKey("eval", "loss", "eval.loss"))
        widths = {name: fan_out for name, _, _, fan_out in spec.layers()}
        probe_width: list[int] = []
        last = 0  # a BN or ReLU output is as wide as the Linear before it
        for name, _ in modules:
            last = widths.get(name, last)
            probe_width.append(last)
        return cls(step_tensors=step_tensors, epoch_tensors=tuple(epoch), params=tuple(params),
                   buffers=tuple(buffers), bn_layers=tuple(n for n, k in modules if k == "bn"),
                   modules=tuple(n for n, _ in modules), probe_width=tuple(probe_width))


def storage_numpy(storage: str) -> np.dtype:
    return np.dtype(bits.storage(storage).numpy_dtype)


def digest(data: Any) -> int:
    """The first 64 bits of sha256 of raw bytes, as an integer; 0 is reserved for "no tensor".

    sha256 rather than blake2b: with the SHA extensions of current x86 CPUs it hashes
    about twice as fast here (1.7 vs 0.85 GB/s), and the digests sit in the training loop.
    """
    if data is None:
        return 0
    value = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    return value or 1


def snapshot_rows(epochs: int) -> list[int]:
    """Epoch rows kept for the probe and the reference: every row to 100, then every 10th."""
    rows = list(range(0, min(epochs, 100) + 1)) + list(range(110, epochs + 1, 10))
    if rows[-1] != epochs:
        rows.append(epochs)
    return rows


def fingerprint_rows(epochs: int) -> list[int]:
    """Epoch rows whose parameters a fingerprint carries exactly (roughly log-spaced)."""
    marks = [0, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
    return sorted({r for r in marks if r <= epochs} | {epochs})


def probe_indices(spec: ExperimentSpec) -> np.ndarray:
    """Training rows of the fixed probe batch: the first batch_size training samples."""
    return np.arange(spec.train.batch_size)


# --------------------------------------------------------------------------- run result

@dataclasses.dataclass(frozen=True)
class RunResult:
    """Everything a training run measured, as arrays (the runner's output)."""

    params: np.ndarray
    """(epochs+1, n_params) parameters per epoch row, storage dtype."""
    buffers: np.ndarray
    """(epochs+1, n_buffers) running statistics per epoch row, storage dtype."""
    train_loss: np.ndarray
    """(epochs+1,) eval-mode training MSE per epoch row."""
    test_loss: np.ndarray
    """(epochs+1,) eval-mode test MSE per epoch row."""
    step_loss: np.ndarray
    """(epochs, steps) training loss of each step."""
    min_var_over_eps: np.ndarray
    """(epochs+1, n_bn) smallest per-unit batch variance seen in the epoch (biased, computed in float64
    from the BN inputs), over eps (row 0 NaN)."""
    epoch_digests: np.ndarray
    """(epochs+1, n_epoch_tensors) uint64."""
    step_rows: np.ndarray
    """(n, 2) (epoch, step) of each traced step."""
    step_digests: np.ndarray
    """(n, n_step_tensors) uint64."""
    probe_rows: np.ndarray
    """Epoch rows at which the probe batch was run."""
    probe: np.ndarray
    """(len(probe_rows), n_probe) activations of the probe batch, storage dtype."""
    nonfinite: dict[str, Any] | None
    """The first non-finite tensor (epoch, step, phase, layer, tensor), or None."""
    train_seconds: float
    """Wall time of the training loop with its instrumentation."""


# --------------------------------------------------------------------------- fingerprint

@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The comparable view of a run: from a fingerprint file or derived from a record."""

    source: str
    """Where it was loaded from (for messages)."""
    spec: ExperimentSpec
    """The experiment."""
    frozen: str
    """Digest of the frozen inputs."""
    config: dict[str, Any]
    """The run request (controls, epochs, perturbation)."""
    effective: dict[str, Any]
    """Controls as read back in the run's process."""
    environment: dict[str, Any]
    """Environment snapshot."""
    epochs: int
    """Epochs run."""
    storage: str
    """Storage dtype of parameters (float32, float64, bfloat16)."""
    digest: str
    """sha256 over all epoch digests and epoch-0 step digests: equal iff the runs are identical."""
    step_tensors: tuple[TensorKey, ...]
    """Layout of step digests."""
    step_rows: np.ndarray
    """(n, 2) traced (epoch, step)."""
    step_digests: np.ndarray
    """(n, n_step_tensors) uint64."""
    epoch_tensors: tuple[TensorKey, ...]
    """Layout of per-tensor epoch digests (only records have those)."""
    epoch_digests: np.ndarray | None
    """(epochs+1, n_epoch_tensors) uint64, records only."""
    groups: tuple[tuple[str, str], ...]
    """(phase, layer) groups of the epoch tensors."""
    group_digests: np.ndarray
    """(epochs+1, n_groups) uint32."""
    row_digests: np.ndarray
    """(epochs+1,) uint64 digest of each epoch row."""
    snapshot_rows: np.ndarray
    """Epoch rows with exact parameters."""
    snapshots: np.ndarray
    """(len(snapshot_rows), n_params) parameters, storage dtype."""
    params: tuple[tuple[str, tuple[int, ...]], ...]
    """Parameter names and shapes (columns of snapshots)."""
    train_loss: np.ndarray
    """(epochs+1,) eval-mode training MSE (exact float64)."""
    test_loss: np.ndarray
    """(epochs+1,) eval-mode test MSE."""
    nonfinite: dict[str, Any] | None
    """First non-finite tensor, or None."""
    extra: dict[str, Any]
    """Optional blocks added by later stages (e.g. "divergence"), passed through."""

    @property
    def label(self) -> str:
        c = self.config.get("controls") if isinstance(self.config, dict) else None
        if not isinstance(c, dict) or not c:
            return self.source
        return "_".join(str(c.get(k)) for k in ("dtype", "threads", "isa"))


def _combine(row: np.ndarray) -> int:
    return digest(np.ascontiguousarray(row, dtype="<u8").tobytes())


def group_digests(layout_tensors: tuple[TensorKey, ...], digests: np.ndarray,
                  groups: list[tuple[str, str]]) -> np.ndarray:
    """32-bit digest of each (phase, layer) group in each row."""
    index = {g: [i for i, t in enumerate(layout_tensors) if (t.phase, t.layer) == g] for g in groups}
    out = np.zeros((digests.shape[0], len(groups)), dtype=np.uint32)
    for j, g in enumerate(groups):
        cols = np.ascontiguousarray(digests[:, index[g]], dtype="<u8")
        for i in range(digests.shape[0]):
            out[i, j] = _combine(cols[i]) & 0xFFFFFFFF
    return out


def row_digests(digests: np.ndarray) -> np.ndarray:
    return np.array([_combine(r) for r in digests], dtype=np.uint64)


def overall_digest(spec_hash: str, storage: str, epoch_rows: np.ndarray, step_rows: np.ndarray,
                   step_digests: np.ndarray) -> str:
    """sha256 of everything two identical runs share: epoch-row digests and epoch-0 steps."""
    h = hashlib.sha256()
    h.update(f"{spec_hash}:{storage}:{len(epoch_rows)}:".encode())
    h.update(np.ascontiguousarray(epoch_rows, dtype="<u8").tobytes())
    first = step_rows[:, 0] == 0 if len(step_rows) else np.zeros(0, bool)
    h.update(np.ascontiguousarray(step_digests[first], dtype="<u8").tobytes())
    return h.hexdigest()


def content_sha256(doc: dict[str, Any]) -> str:
    """sha256 of a fingerprint document: every field but this checksum and ``extra.baseline``.

    The ``digest`` covers the digests only; this covers the rest (snapshots, losses,
    group digests, later steps, ``extra``), so no part of a fingerprint can be edited
    unnoticed.  A baseline's own block carries its own sha256 over everything else.
    """
    body = {k: v for k, v in doc.items() if k != "content_sha256"}
    extra = body.get("extra")
    if isinstance(extra, dict) and "baseline" in extra:
        body["extra"] = {k: v for k, v in extra.items() if k != "baseline"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def fingerprint_dict(meta: dict[str, Any], arrays: dict[str, np.ndarray], layout: TraceLayout) -> dict[str, Any]:
    """The fingerprint JSON of a record, field by field."""
    storage = meta["storage"]
    epochs = meta["epochs_run"]
    rows = fingerprint_rows(epochs)
    groups = layout.groups()
    gd = group_digests(layout.epoch_tensors, arrays["epoch_digests"], groups)
    rd = row_digests(arrays["epoch_digests"])
    doc = {
        "schema": FINGERPRINT_SCHEMA,
        "kind": "fingerprint",
        "bnaudit": meta["bnaudit"],
        "created": meta["created"],
        "spec": meta["spec"],
        "spec_hash": meta["spec_hash"],
        "frozen": meta["frozen"],
        "config": meta["config"],
        "effective": meta["effective"],
        "environment": meta["environment"],
        "epochs_run": epochs,
        "storage": storage,
        "digest": meta["digest"],
        "nonfinite": meta["nonfinite"],
        "step_tensors": [[t.phase, t.layer, t.key] for t in layout.step_tensors],
        "steps": [
            {"epoch": int(e), "step": int(s), "digests": "".join(format(int(d), "016x") for d in row)}
            for (e, s), row in zip(arrays["step_rows"], arrays["step_digests"])
        ],
        "epoch_groups": [list(g) for g in groups],
        "epoch_group_digests": _b64(gd.astype("<u4")),
        "epoch_digests": [format(int(d), "016x") for d in rd],
        "losses": {
            "train": bits.to_hex(arrays["losses"][:, 0], "float64"),
            "test": bits.to_hex(arrays["losses"][:, 1], "float64"),
        },
        "snapshots": {"rows": rows, "params": _b64(arrays["params"][rows])},
        "extra": meta.get("extra", {}),
    }
    doc["content_sha256"] = content_sha256(doc)
    return doc


# --------------------------------------------------------------------------- writing

def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def prepare_output(out: Path, *, force: bool) -> None:
    """Refuse to overwrite results unless asked; check the parent can be written."""
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()):
            if not force:
                raise OutputError(f"--out {out} already holds files; choose another folder or pass --force")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".bnaudit-probe-", dir=out.parent)).rmdir()  # can we write here?
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None


def write_record(out: Path, meta: dict[str, Any], result: RunResult, layout: TraceLayout, *,
                 force: bool = False) -> dict[str, Any]:
    """Write the record folder atomically; return the fingerprint dict."""
    arrays = {
        "params": result.params,
        "buffers": result.buffers,
        "losses": np.stack([result.train_loss, result.test_loss], axis=1).astype("<f8"),
        "step_loss": result.step_loss.astype("<f8"),
        "min_var": result.min_var_over_eps.astype("<f8"),
        "epoch_digests": result.epoch_digests.astype("<u8"),
        "step_digests": result.step_digests.astype("<u8"),
        "step_rows": result.step_rows.astype("<i8"),
        "probe": result.probe,
    }
    probe_rows = [int(r) for r in result.probe_rows]
    meta = dict(meta)
    meta["digest"] = overall_digest(meta["spec_hash"], meta["storage"], row_digests(arrays["epoch_digests"]),
                                    arrays["step_rows"], arrays["step_digests"])
    meta["nonfinite"] = result.nonfinite
    meta["probe_rows"] = probe_rows
    meta["train_seconds"] = result.train_seconds
    meta["layout"] = layout_dict(layout)
    blobs = {f"{name}.npy": _npy_bytes(a) for name, a in arrays.items()}
    meta["files"] = {
        name: {"sha256": hashlib.sha256(b).hexdigest(), "shape": list(arrays[name[:-4]].shape),
               "dtype": arrays[name[:-4]].dtype.str}
        for name, b in sorted(blobs.items())
    }
    fp = fingerprint_dict(meta, arrays, layout)
    prepare_output(out, force=force)
    with atomic_folder(out, "record") as tmp:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / "fingerprint.json").write_text(json.dumps(fp, sort_keys=True, indent=1) + "\n")
        # record.json last: its presence with matching hashes is what makes a record complete.
        (tmp / "record.json").write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
    return fp


@contextlib.contextmanager
def atomic_folder(out: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds.

    The block writes everything into the yielded folder (the file that marks the folder
    complete last).  On success an existing ``out`` is first renamed aside, the new
    folder renamed into place, and the old one removed, so no moment leaves a mix of
    old and new files, and an interruption loses neither.  On any failure the temporary
    folder is removed; an OSError becomes one OutputError line naming ``what``.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o755)
    except OSError as exc:
        raise OutputError(f"cannot write {what} to {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {what} to {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(out: Path, text: str) -> None:
    """Write a file under a temporary name in its folder, then rename it into place."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out} is a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None


def layout_dict(layout: TraceLayout) -> dict[str, Any]:
    return {
        "step_tensors": [[t.phase, t.layer, t.key] for t in layout.step_tensors],
        "epoch_tensors": [[t.phase, t.layer, t.key] for t in layout.epoch_tensors],
        "params": [[n, list(s)] for n, s in layout.params],
        "buffers": [[n, list(s)] for n, s in layout.buffers],
        "bn_layers": list(layout.bn_layers),
        "modules": list(layout.modules),
        "probe_width": list(layout.probe_width),
    }


# --------------------------------------------------------------------------- loading

def read_npy(path: Path, sha256: str, *, against: str, max_bytes: int = MAX_NPY_BYTES) -> np.ndarray:
    """A plain .npy array from an untrusted file, refused unless its bytes have this sha256.

    The bytes are hashed and parsed from one read (no window for the file to change in
    between), with pickling off.  ``against`` names where the hash came from.
    """
    try:
        if path.stat().st_size > max_bytes:
            raise InputError(f"{path}: larger than {max_bytes} bytes")
        blob = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: missing or unreadable ({exc.strerror or exc})") from None
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise InputError(f"{path}: sha256 does not match {against} (tampered or corrupt)")
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a plain .npy array ({str(exc)[:60]})") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from an untrusted file: size-limited, strict (no NaN), one clear error."""
    try:
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a {what} file")
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {size} bytes is larger than any {what} ({MAX_JSON_BYTES} bytes)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: not a valid {what} (not JSON: {str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: not a valid {what} (top level is not an object)")
    return raw


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")


class _Fields:
    """Typed field access on an untrusted JSON object, with messages naming the file."""

    def __init__(self, raw: Any, where: str) -> None:
        self.raw, self.where = raw, where

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if not isinstance(self.raw, dict) or key not in self.raw:
            if optional:
                return None
            raise InputError(f"{self.where}: missing field {key!r}")
        value = self.raw[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise InputError(f"{self.where}: field {key!r} has the wrong type")
        if not isinstance(value, kind):
            raise InputError(f"{self.where}: field {key!r} has the wrong type")
        return value


def _tensor_keys(raw: Any, where: str) -> tuple[TensorKey, ...]:
    if not isinstance(raw, list) or not all(
            isinstance(t, list) and len(t) == 3 and all(isinstance(s, str) for s in t) for t in raw):
        raise InputError(f"{where}: malformed tensor layout")
    return tuple(TensorKey(*t) for t in raw)


def _params_layout(raw: Any, where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if not isinstance(raw, list):
        raise InputError(f"{where}: malformed parameter layout")
    out = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], list) or not all(isinstance(i, int) and 0 < i < 1 << 20 for i in item[1])):
            raise InputError(f"{where}: malformed parameter layout")
        out.append((item[0], tuple(item[1])))
    return tuple(out)


def _decode_b64(text: Any, dtype: str, shape: tuple[int, int], where: str, field: str) -> np.ndarray:
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} has the wrong type")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InputError(f"{where}: field {field!r} is not base64") from None
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise InputError(f"{where}: field {field!r} has {len(raw)} bytes, expected {want}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _hex64(items: Any, where: str, field: str) -> np.ndarray:
    if not isinstance(items, list) or not all(isinstance(s, str) and _HEX16.fullmatch(s) for s in items):
        raise InputError(f"{where}: field {field!r} must be a list of 16-digit lowercase hex digests")
    return np.array([int(s, 16) for s in items], dtype=np.uint64)


def _common(f: _Fields, where: str) -> dict[str, Any]:
    try:
        spec = spec_from_record_dict(f.get("spec", dict))
    except InputError as exc:
        raise InputError(f"{where}: stored spec is invalid ({exc.message})") from None
    spec_hash = f.get("spec_hash", str)
    if spec.hash != spec_hash:
        raise InputError(f"{where}: spec_hash does not match the stored spec (edited file?)")
    epochs = f.get("epochs_run", int)
    if not 1 <= epochs <= spec.train.epochs:
        raise InputError(f"{where}: epochs_run {epochs} out of range")
    storage = f.get("storage", str)
    if storage not in bits.STORAGES:
        raise InputError(f"{where}: unknown storage dtype {storage!r}")
    digest_value = f.get("digest", str)
    if len(digest_value) != 64:
        raise InputError(f"{where}: malformed digest")
    nonfinite = f.get("nonfinite", dict, optional=True)
    return {"spec": spec, "epochs": epochs, "storage": storage, "digest": digest_value,
            "frozen": f.get("frozen", str), "config": f.get("config", dict),
            "effective": f.get("effective", dict), "environment": f.get("environment", dict),
            "nonfinite": nonfinite}


def _steps_from_fingerprint(raw: Any, n_tensors: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(raw, list) or len(raw) > 1_000_000:
        raise InputError(f"{where}: field 'steps' must be a list")
    rows, digests = [], []
    for item in raw:
        g = _Fields(item, where)
        e, s, d = g.get("epoch", int), g.get("step", int), g.get("digests", str)
        if len(d) != 16 * n_tensors:
            raise InputError(f"{where}: a step row has {len(d) // 16} digests, expected {n_tensors}")
        if not _HEXS.fullmatch(d):
            raise InputError(f"{where}: a step row holds a non-hex digest")
        if not (0 <= e < 1 << 31 and 0 <= s < 1 << 31):
            raise InputError(f"{where}: a step row's epoch or step is out of range")
        digests.append([int(d[i:i + 16], 16) for i in range(0, len(d), 16)])
        rows.append((e, s))
    return (np.array(rows, dtype=np.int64).reshape(-1, 2),
            np.array(digests, dtype=np.uint64).reshape(-1, n_tensors))


def read_fingerprint(path: Path) -> Fingerprint:
    """Load and validate a fingerprint JSON file."""
    path = Path(path)
    raw = read_json(path, "fingerprint")
    where = str(path)
    f = _Fields(raw, where)
    schema = f.get("schema", str)
    if schema != FINGERPRINT_SCHEMA:
        if schema == RECORD_SCHEMA:
            return read_record(path.parent)
        raise InputError(f"{where}: schema {schema[:40]!r} is not {FINGERPRINT_SCHEMA}")
    if f.get("content_sha256", str) != content_sha256(raw):
        raise InputError(f"{where}: content_sha256 does not match the content (edited or corrupt)")
    c = _common(f, where)
    epochs = c["epochs"]
    step_tensors = _tensor_keys(f.get("step_tensors", list), where)
    step_rows, step_digests = _steps_from_fingerprint(f.get("steps", list), len(step_tensors), where)
    keys = [(int(e), int(s)) for e, s in step_rows]
    if (keys != sorted(set(keys)) or any(not 0 <= e < epochs or not 0 <= s < c["spec"].steps_per_epoch
                                         for e, s in keys)):
        raise InputError(f"{where}: traced steps are out of range, repeated or out of order")
    groups_raw = f.get("epoch_groups", list)
    if not all(isinstance(g, list) and len(g) == 2 and all(isinstance(s, str) for s in g) for g in groups_raw):
        raise InputError(f"{where}: malformed epoch_groups")
    groups = tuple((g[0], g[1]) for g in groups_raw)
    layout = TraceLayout.for_spec(c["spec"])
    if step_tensors != layout.step_tensors or groups != tuple(layout.groups()):
        raise InputError(f"{where}: tensor layout does not match its spec (edited, or another bnaudit version)")
    gd = _decode_b64(f.get("epoch_group_digests", str), "<u4", (epochs + 1, len(groups)), where,
                     "epoch_group_digests")
    rd = _hex64(f.get("epoch_digests", list), where, "epoch_digests")
    if len(rd) != epochs + 1:
        raise InputError(f"{where}: {len(rd)} epoch digests for {epochs} epochs")
    snaps = _Fields(f.get("snapshots", dict), where)
    rows = snaps.get("rows", list)
    if rows != fingerprint_rows(epochs):
        raise InputError(f"{where}: snapshot rows are not the schedule for {epochs} epochs")
    spec = c["spec"]
    params = tuple(spec.parameters())
    n_params = sum(math.prod(s) for _, s in params)
    st = bits.storage(c["storage"])
    snapshots = _decode_b64(snaps.get("params", str), st.numpy_dtype, (len(rows), n_params), where, "snapshots")
    losses = _Fields(f.get("losses", dict), where)
    try:
        train = bits.from_hex(losses.get("train", list), "float64")
        test = bits.from_hex(losses.get("test", list), "float64")
    except ValueError:
        raise InputError(f"{where}: malformed losses") from None
    if len(train) != epochs + 1 or len(test) != epochs + 1:
        raise InputError(f"{where}: losses do not cover {epochs} epochs")
    recomputed = overall_digest(spec.hash, c["storage"], rd, step_rows, step_digests)
    if recomputed != c["digest"]:
        raise InputError(f"{where}: digest does not match the digests it summarises (edited or corrupt)")
    extra = f.get("extra", dict, optional=True) or {}
    return Fingerprint(
        source=where, spec=spec, frozen=c["frozen"], config=c["config"], effective=c["effective"],
        environment=c["environment"], epochs=epochs, storage=c["storage"], digest=c["digest"],
        step_tensors=step_tensors, step_rows=step_rows, step_digests=step_digests,
        epoch_tensors=(), epoch_digests=None, groups=groups, group_digests=gd, row_digests=rd,
        snapshot_rows=np.array(rows, dtype=np.int64), snapshots=snapshots, params=params,
        train_loss=train, test_loss=test, nonfinite=c["nonfinite"], extra=extra)


@dataclasses.dataclass(frozen=True)
class Record:
    """A loaded record folder: its metadata, its fingerprint view and its arrays."""

    path: Path
    """The record folder."""
    meta: dict[str, Any]
    """record.json, validated."""
    layout: TraceLayout
    """Layout of its arrays."""
    arrays: dict[str, np.ndarray]
    """Every array file, verified against its sha256."""
    fingerprint: Fingerprint
    """The comparable view, with per-tensor epoch digests."""

    @property
    def spec(self) -> ExperimentSpec:
        return self.fingerprint.spec

    @property
    def storage(self) -> str:
        return self.fingerprint.storage


def read_record(folder: Path) -> Fingerprint:
    """Load a record folder's comparable view (see ``load_record`` for the arrays)."""
    return load_record(folder).fingerprint


def load_record(folder: Path) -> Record:
    """Load and verify a record folder: every file's sha256, shape and dtype."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    where = str(folder)
    if not (folder / "record.json").exists():
        partial = folder.name.startswith(".") and ".partial-" in folder.name
        hint = " (an interrupted run's leftovers)" if partial else ""
        raise InputError(f"{where}: not a complete bnaudit record (no record.json){hint}")
    meta = read_json(folder / "record.json", "record")
    f = _Fields(meta, where)
    schema = f.get("schema", str)
    if schema != RECORD_SCHEMA:
        raise InputError(f"{where}: schema {schema[:40]!r} is not {RECORD_SCHEMA}")
    c = _common(f, where)
    spec, epochs, storage = c["spec"], c["epochs"], c["storage"]
    layout = TraceLayout.for_spec(spec)
    lf = _Fields(f.get("layout", dict), where)
    if (_tensor_keys(lf.get("step_tensors", list), where) != layout.step_tensors
            or _tensor_keys(lf.get("epoch_tensors", list), where) != layout.epoch_tensors
            or _params_layout(lf.get("params", list), where) != layout.params):
        raise InputError(f"{where}: layout does not match its spec (written by another bnaudit version?)")
    files = f.get("files", dict)
    probe_rows = f.get("probe_rows", list)
    if probe_rows != snapshot_rows(epochs):
        raise InputError(f"{where}: probe rows are not the schedule for {epochs} epochs")
    sdt = bits.storage(storage).numpy_dtype
    n_probe = sum(layout.probe_width) * spec.train.batch_size
    expected: dict[str, tuple[tuple[int, ...] | None, str]] = {
        "params": ((epochs + 1, layout.n_params), sdt),
        "buffers": ((epochs + 1, layout.n_buffers), sdt),
        "losses": ((epochs + 1, 2), "<f8"),
        "step_loss": ((epochs, spec.steps_per_epoch), "<f8"),
        "min_var": ((epochs + 1, len(layout.bn_layers)), "<f8"),
        "epoch_digests": ((epochs + 1, len(layout.epoch_tensors)), "<u8"),
        "step_digests": (None, "<u8"),
        "step_rows": (None, "<i8"),
        "probe": ((len(probe_rows), n_probe), sdt),
    }
    arrays = {}
    for name, (shape, dtype) in expected.items():
        sha = _Fields(files.get(f"{name}.npy"), where).get("sha256", str)
        path = folder / f"{name}.npy"
        arr = read_npy(path, sha, against="record.json")
        if arr.dtype != np.dtype(dtype) or (shape is not None and arr.shape != shape):
            raise InputError(f"{path}: expected {dtype} {shape}, found {arr.dtype.str} {arr.shape}")
        arrays[name] = arr
    n_step = len(layout.step_tensors)
    if (arrays["step_digests"].ndim != 2 or arrays["step_digests"].shape[1] != n_step
            or arrays["step_rows"].shape != (arrays["step_digests"].shape[0], 2)):
        raise InputError(f"{where}: step digests do not match their layout")
    rd = row_digests(arrays["epoch_digests"])
    if overall_digest(spec.hash, storage, rd, arrays["step_rows"], arrays["step_digests"]) != c["digest"]:
        raise InputError(f"{where}: digest does not match the record's digests (edited or corrupt)")
    groups = layout.groups()
    fp = Fingerprint(
        source=where, spec=spec, frozen=c["frozen"], config=c["config"], effective=c["effective"],
        environment=c["environment"], epochs=epochs, storage=storage, digest=c["digest"],
        step_tensors=layout.step_tensors, step_rows=arrays["step_rows"], step_digests=arrays["step_digests"],
        epoch_tensors=layout.epoch_tensors, epoch_digests=arrays["epoch_digests"], groups=tuple(groups),
        group_digests=group_digests(layout.epoch_tensors, arrays["epoch_digests"], groups),
        row_digests=rd, snapshot_rows=np.arange(epochs + 1), snapshots=arrays["params"],
        params=layout.params, train_loss=arrays["losses"][:, 0], test_loss=arrays["losses"][:, 1],
        nonfinite=c["nonfinite"], extra=f.get("extra", dict, optional=True) or {})
    return Record(path=folder, meta=meta, layout=layout, arrays=arrays, fingerprint=fp)


def load(path: Path | str) -> Fingerprint:
    """A fingerprint file, a record folder, or a record's record.json: the comparable view."""
    path = Path(path)
    if path.is_dir():
        return read_record(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.name == "record.json":
        return read_record(path.parent)
    return read_fingerprint(path)


def new_meta(*, spec: ExperimentSpec, frozen_digest: str, config: dict[str, Any], storage: str,
             effective: dict[str, Any], environment: dict[str, Any], created: str) -> dict[str, Any]:
    """The record.json fields known before training (the rest are added by write_record)."""
    return {
        "schema": RECORD_SCHEMA,
        "kind": "record",
        "bnaudit": __version__,
        "created": created,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "frozen": frozen_digest,
        "config": config,
        "storage": storage,
        "effective": effective,
        "environment": environment,
        "epochs_run": config["epochs"],
        "extra": {},
    }
