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
    state_digests.npy (epochs+1,) uint64 digest of each epoch row's whole state: its
                    parameters' bytes, then its running statistics' (``state_digests``)
    step_digests.npy  (n_step_rows, n_step_tensors) uint64 digests after each traced step
    step_rows.npy   (n_step_rows, 2) int64 (epoch, step) of each traced step
    first_step.npy  uint8: the exact values of the first traced step (``bnaudit.firststep``),
                    tensor after tensor as record.json's ``first_step`` table lists them
    probe.npy       (n_probe_rows, n_probe) probe-batch activations at the probe schedule's rows
    fingerprint.json the fingerprint derived from all of the above

The folder is written under a temporary name and renamed when complete, and
record.json holds the sha256 of every array file: an interrupted or edited record
never loads.  Loading also checks every row of params.npy and buffers.npy against its
state digest, which the overall digest covers: values edited at any row, with every
file hash and the record's checksum recomputed, still give another overall digest, so
the record no longer compares identical to the run it was.

A **fingerprint** is one small JSON file (a few hundred kB for 1000 epochs) meant to be
committed or pasted into a CI log.  It holds full 64-bit digests of every tensor of the
traced steps, a 64-bit digest of each epoch end and of its state, a 32-bit digest per
(phase, layer) group of each epoch end, and exact parameters at a few epochs (keyframes).  That is enough
to tell bit-identical from different, and to name the first differing epoch, step,
phase, layer and tensor, from fingerprints alone.

Rows, schedules and digests are ``bnaudit.layout``'s; the derived blocks in ``extra``
are decoded by ``bnaudit.blocks``.  This module is numpy-only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import bits, firststep
from bnaudit._version import __version__
from bnaudit.blocks import AuditBlock, ChaosFloor, DivergenceBlock, Fields
from bnaudit.controls import Controls, Perturbation
from bnaudit.errors import InputError, MismatchError
from bnaudit.fileio import (
    atomic_folder,
    b64decode,
    b64encode,
    canonical_sha256,
    npy_bytes,
    prepare_output,
    read_json,
    read_npy,
)
from bnaudit.layout import TensorKey, TraceLayout, digest, keyframe_schedule, probe_schedule
from bnaudit.spec import ExperimentSpec, spec_from_record_dict

RECORD_SCHEMA = "bnaudit.record/4"
"""2: record.json carries ``content_sha256``, a checksum over its own content.
3: state_digests.npy, a digest of each epoch row's state, covered by the overall digest.
4: first_step.npy, the exact values of the first traced step."""
STATE_RECORD = "bnaudit.record/3"
"""Still loaded: a record/4 without the first step's values."""
LEGACY_RECORD = "bnaudit.record/2"
"""Still loaded: its every per-tensor epoch digest is checked against the arrays instead."""
OLD_RECORD_SCHEMAS = ("bnaudit.record/1",)
FINGERPRINT_SCHEMA = "bnaudit.fingerprint/3"
"""2: ``state_digests``, the record's, covered by the overall digest.  3: ``first_step``."""
STATE_FINGERPRINT = "bnaudit.fingerprint/2"
"""Still loaded: a fingerprint/3 without the first step's values."""
LEGACY_FINGERPRINT = "bnaudit.fingerprint/1"
"""Still loaded (a committed baseline of an older bnaudit); compared as ``Fingerprint.legacy``."""
FINGERPRINT_SCHEMAS = (FINGERPRINT_SCHEMA, STATE_FINGERPRINT, LEGACY_FINGERPRINT)
RECORD_SCHEMAS = (RECORD_SCHEMA, STATE_RECORD, LEGACY_RECORD)
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEXS = re.compile(r"[0-9a-f]*")



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
    first_step: firststep.FirstStep | None = None
    """The exact values of the first traced step."""


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
    """sha256 over the epoch digests, state digests (if any) and epoch-0 step digests: equal iff identical runs."""
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
    keyframe_rows: np.ndarray
    """Epoch rows with exact parameters (``layout.keyframe_schedule``; every row for a record)."""
    keyframes: np.ndarray
    """(len(keyframe_rows), n_params) parameters, storage dtype."""
    params: tuple[tuple[str, tuple[int, ...]], ...]
    """Parameter names and shapes (columns of keyframes)."""
    train_loss: np.ndarray
    """(epochs+1,) eval-mode training MSE (exact float64)."""
    test_loss: np.ndarray
    """(epochs+1,) eval-mode test MSE."""
    nonfinite: dict[str, Any] | None
    """First non-finite tensor, or None."""
    extra: dict[str, Any]
    """Optional blocks added by later stages, as JSON (passed through when a fingerprint is copied)."""
    divergence: DivergenceBlock | None = None
    """``extra["divergence"]`` decoded: the run's distance from the mpmath reference."""
    audit: AuditBlock | None = None
    """``extra["operator_audit"]`` decoded: the operator audit."""
    floor: ChaosFloor | None = None
    """``extra["perturbation"]`` decoded: the chaos floor of a --perturb run."""
    state_digests: np.ndarray | None = None
    """(epochs+1,) uint64 digest of each epoch row's parameters and running statistics
    (``state_digests``), covered by ``digest``; None in inputs of an older bnaudit."""
    first_step: firststep.FirstStep | None = dataclasses.field(default=None, compare=False, repr=False)
    """The exact values of the first traced step (verified against its digests); None in older inputs."""
    probe_rows: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    """Epoch rows of the probe pass (``layout.probe_schedule``), records only; None for a fingerprint file."""
    probe: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    """(len(probe_rows), n_probe) train-mode activations of the probe batch, storage dtype, records only."""
    tensor_check: Callable[[], None] | None = dataclasses.field(default=None, compare=False, repr=False)
    """A record's check of every per-tensor epoch digest against its arrays, run (once) by
    ``legacy``; None where there is nothing left to check."""

    def legacy(self) -> Fingerprint:
        """This input as an older bnaudit compares it: its identity from the epoch digests alone.

        Without the state digests nothing but the per-tensor digests binds a record's
        arrays to its identity, so a record's are checked against its arrays first, at
        every row.
        """
        if self.state_digests is None:
            return self
        if self.tensor_check is not None:
            self.tensor_check()
        return dataclasses.replace(
            self, state_digests=None, tensor_check=None,
            digest=overall_digest(self.spec.hash, self.storage, self.row_digests, self.step_rows, self.step_digests))

    @property
    def controls(self) -> Controls:
        """The controls the run asked for (validated when the fingerprint was loaded)."""
        return Controls.from_json(self.config.get("controls"), self.source)

    @property
    def perturbation(self) -> Perturbation | None:
        """The run's --perturb request, or None (validated when the fingerprint was loaded)."""
        return Perturbation.from_json(self.config.get("perturb"), self.source)

    @property
    def label(self) -> str:
        """The configuration label: ``Controls.label()``, with ``_perturb`` for a --perturb run."""
        return self.controls.label() + ("_perturb" if self.config.get("perturb") else "")


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


def state_digests(params: np.ndarray, buffers: np.ndarray) -> np.ndarray:
    """64-bit digest (``layout.digest``) of each epoch row's state: its parameters' bytes, then its running statistics'.

    One hash per row: checking a 1000-epoch record's arrays against these costs a few
    milliseconds, where its 32 000 per-tensor digests cost tens.
    """
    rows = zip(np.ascontiguousarray(params), np.ascontiguousarray(buffers))
    return np.array([digest(p, b) for p, b in rows], dtype=np.uint64)


def overall_digest(spec_hash: str, storage: str, epoch_rows: np.ndarray, step_rows: np.ndarray,
                   step_digests: np.ndarray, state: np.ndarray | None = None) -> str:
    """sha256 of everything two identical runs share: epoch-row digests, epoch-0 steps and the state digests.

    Without ``state`` (an older bnaudit's inputs, and ``Fingerprint.legacy``) the
    digest is the older definition, byte for byte.
    """
    h = hashlib.sha256()
    h.update(f"{spec_hash}:{storage}:{len(epoch_rows)}:".encode())
    h.update(np.ascontiguousarray(epoch_rows, dtype="<u8").tobytes())
    first = step_rows[:, 0] == 0 if len(step_rows) else np.zeros(0, bool)
    h.update(np.ascontiguousarray(step_digests[first], dtype="<u8").tobytes())
    if state is not None:
        h.update(b"state:" + np.ascontiguousarray(state, dtype="<u8").tobytes())
    return h.hexdigest()


def comparable(fps: Sequence[Fingerprint]) -> list[Fingerprint]:
    """The inputs on one footing: as they are when every one carries state digests, else each as ``legacy``.

    The overall digest of a fingerprint/2 or record/3 covers its state digests, an older
    one's does not; mixed, they are compared as the older bnaudit compared them.
    """
    if all(fp.state_digests is not None for fp in fps):
        return list(fps)
    return [fp.legacy() for fp in fps]


def content_sha256(doc: dict[str, Any]) -> str:
    """sha256 of a fingerprint document: every field but this checksum and ``extra.baseline``.

    The ``digest`` covers the digests only; this covers the rest (keyframes, losses,
    group digests, later steps, ``extra``), so no part of a fingerprint can be edited
    unnoticed.  A baseline's own block carries its own seal over everything else.
    """
    body = {k: v for k, v in doc.items() if k != "content_sha256"}
    extra = body.get("extra")
    if isinstance(extra, dict) and "baseline" in extra:
        body["extra"] = {k: v for k, v in extra.items() if k != "baseline"}
    return canonical_sha256(body)


def record_sha256(meta: dict[str, Any]) -> str:
    """sha256 of record.json's content: every field but this checksum.

    record.json holds the sha256 of every array file, so this one checksum covers the
    whole record: the facts (controls, environment, frozen digest, ``extra``) and,
    through the file hashes, every array.
    """
    return canonical_sha256({k: v for k, v in meta.items() if k != "content_sha256"})


def fingerprint_dict(meta: dict[str, Any], arrays: dict[str, np.ndarray], layout: TraceLayout) -> dict[str, Any]:
    """The fingerprint JSON of a record, field by field."""
    storage = meta["storage"]
    epochs = meta["epochs_run"]
    rows = keyframe_schedule(epochs)
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
        "epoch_group_digests": b64encode(gd.astype("<u4")),
        "epoch_digests": [format(int(d), "016x") for d in rd],
        "state_digests": [format(int(d), "016x") for d in arrays["state_digests"]],
        "losses": {
            "train": bits.to_hex(arrays["losses"][:, 0], "float64"),
            "test": bits.to_hex(arrays["losses"][:, 1], "float64"),
        },
        "snapshots": {"rows": rows, "params": b64encode(arrays["params"][rows])},
        "first_step": {"tensors": meta["first_step"], "values": b64encode(arrays["first_step"])},
        "extra": meta.get("extra", {}),
    }
    doc["content_sha256"] = content_sha256(doc)
    return doc


# --------------------------------------------------------------------------- writing

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
        "state_digests": state_digests(result.params, result.buffers).astype("<u8"),
        "step_digests": result.step_digests.astype("<u8"),
        "step_rows": result.step_rows.astype("<i8"),
        "probe": result.probe,
        "first_step": np.frombuffer(result.first_step.blob() if result.first_step else b"", np.uint8),
    }
    probe_rows = [int(r) for r in result.probe_rows]
    meta = dict(meta)
    meta["digest"] = overall_digest(meta["spec_hash"], meta["storage"], row_digests(arrays["epoch_digests"]),
                                    arrays["step_rows"], arrays["step_digests"], arrays["state_digests"])
    meta["nonfinite"] = result.nonfinite
    meta["probe_rows"] = probe_rows
    meta["train_seconds"] = result.train_seconds
    meta["layout"] = layout_dict(layout)
    meta["first_step"] = result.first_step.tensors_json() if result.first_step else []
    blobs = {f"{name}.npy": npy_bytes(a) for name, a in arrays.items()}
    meta["files"] = {
        name: {"sha256": hashlib.sha256(b).hexdigest(), "shape": list(arrays[name[:-4]].shape),
               "dtype": arrays[name[:-4]].dtype.str}
        for name, b in sorted(blobs.items())
    }
    fp = fingerprint_dict(meta, arrays, layout)
    meta["content_sha256"] = record_sha256(meta)
    prepare_output(out, force=force, kind="record")
    with atomic_folder(out, "record") as tmp:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / "fingerprint.json").write_text(json.dumps(fp, sort_keys=True, indent=1) + "\n")
        # record.json last: its presence with matching hashes is what makes a record complete.
        (tmp / "record.json").write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
    return fp


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

def decode_extra(extra: Any, where: str) -> dict[str, Any]:
    """The typed blocks of a fingerprint's ``extra`` (Fingerprint keyword arguments), each decoded once."""
    extra = extra if isinstance(extra, dict) else {}
    div, aud, floor = (extra.get(k) for k in ("divergence", "operator_audit", "perturbation"))
    return {"divergence": None if div is None else DivergenceBlock.from_json(div, where),
            "audit": None if aud is None else AuditBlock.from_json(aud, where),
            "floor": None if floor is None else ChaosFloor.from_json(floor, where)}


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


def _hex64(items: Any, where: str, field: str) -> np.ndarray:
    if not isinstance(items, list) or not all(isinstance(s, str) and _HEX16.fullmatch(s) for s in items):
        raise InputError(f"{where}: field {field!r} must be a list of 16-digit lowercase hex digests")
    return np.array([int(s, 16) for s in items], dtype=np.uint64)


def _common(f: Fields, where: str) -> dict[str, Any]:
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
    config = f.get("config", dict)
    Controls.from_json(config.get("controls"), where)  # refuse now, not in the first consumer
    Perturbation.from_json(config.get("perturb"), where)
    return {"spec": spec, "epochs": epochs, "storage": storage, "digest": digest_value,
            "frozen": f.get("frozen", str), "config": config,
            "effective": f.get("effective", dict), "environment": f.get("environment", dict),
            "nonfinite": nonfinite}


MAX_STEP_ROWS = 1_000_000
"""Traced steps a fingerprint may list (a 1000-epoch run traced at every step has 10 000)."""


def _steps_from_fingerprint(raw: list[Any], n_tensors: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) > MAX_STEP_ROWS:
        raise InputError(f"{where}: field 'steps' lists more than {MAX_STEP_ROWS} traced steps")
    rows, digests = [], []
    for item in raw:
        g = Fields(item, where)
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
    f = Fields(raw, where)
    schema = f.get("schema", str)
    if schema not in FINGERPRINT_SCHEMAS:
        if schema in (*RECORD_SCHEMAS, *OLD_RECORD_SCHEMAS):
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
    gd = b64decode(f.get("epoch_group_digests", str), "<u4", (epochs + 1, len(groups)), where,
                     "epoch_group_digests")
    rd = _hex64(f.get("epoch_digests", list), where, "epoch_digests")
    if len(rd) != epochs + 1:
        raise InputError(f"{where}: {len(rd)} epoch digests for {epochs} epochs")
    state = None
    if schema != LEGACY_FINGERPRINT:
        state = _hex64(f.get("state_digests", list), where, "state_digests")
        if len(state) != epochs + 1:
            raise InputError(f"{where}: {len(state)} state digests for {epochs} epochs")
    snaps = Fields(f.get("snapshots", dict), where)
    rows = snaps.get("rows", list)
    if rows != keyframe_schedule(epochs):
        raise InputError(f"{where}: snapshot rows are not the schedule for {epochs} epochs")
    spec = c["spec"]
    params = tuple(spec.parameters())
    n_params = sum(math.prod(s) for _, s in params)
    st = bits.storage(c["storage"])
    snapshots = b64decode(snaps.get("params", str), st.numpy_dtype, (len(rows), n_params), where, "snapshots")
    losses = Fields(f.get("losses", dict), where)
    try:
        train = bits.from_hex(losses.get("train", list), "float64")
        test = bits.from_hex(losses.get("test", list), "float64")
    except ValueError:
        raise InputError(f"{where}: malformed losses") from None
    if len(train) != epochs + 1 or len(test) != epochs + 1:
        raise InputError(f"{where}: losses do not cover {epochs} epochs")
    recomputed = overall_digest(spec.hash, c["storage"], rd, step_rows, step_digests, state)
    if recomputed != c["digest"]:
        raise InputError(f"{where}: digest does not match the digests it summarises (edited or corrupt)")
    first = None
    if schema == FINGERPRINT_SCHEMA:
        first = firststep.from_json(f.get("first_step", dict), firststep.first_step_shapes(spec, layout), where)
        _verify_first_step(first, layout, step_rows, step_digests, snapshots[0], c["storage"], where)
    extra = f.get("extra", dict, optional=True) or {}
    return Fingerprint(
        source=where, spec=spec, frozen=c["frozen"], config=c["config"], effective=c["effective"],
        environment=c["environment"], epochs=epochs, storage=c["storage"], digest=c["digest"],
        step_tensors=step_tensors, step_rows=step_rows, step_digests=step_digests,
        epoch_tensors=(), epoch_digests=None, groups=groups, group_digests=gd, row_digests=rd,
        keyframe_rows=np.array(rows, dtype=np.int64), keyframes=snapshots, params=params,
        train_loss=train, test_loss=test, nonfinite=c["nonfinite"], extra=extra, state_digests=state,
        first_step=first, **decode_extra(extra, where))


def _verify_first_step(block: firststep.FirstStep, layout: TraceLayout, step_rows: np.ndarray,
                       step_digests: np.ndarray, initial: np.ndarray, storage: str, where: str) -> None:
    hit = np.flatnonzero((step_rows[:, 0] == firststep.FIRST_STEP[0]) & (step_rows[:, 1] == firststep.FIRST_STEP[1]))
    if not len(hit):
        raise InputError(f"{where}: first-step values without the first traced step")
    firststep.verify(block, layout, step_digests[int(hit[0])], initial, storage, where)


def prefix(fp: Fingerprint, epochs: int) -> Fingerprint:
    """The fingerprint of the first ``epochs`` epochs of a run (digest recomputed over them).

    The training of epoch e depends only on what came before it, so a prefix of a longer
    run is bit for bit the run of fewer epochs.  The reference divergence block is dropped
    (its rows are the longer run's); everything else is cut to the prefix, except the
    other ``extra`` blocks (operator audit, chaos floor), which are kept as they are.
    """
    if epochs == fp.epochs:
        return fp
    if not 1 <= epochs < fp.epochs:
        raise MismatchError(f"{fp.source} covers {fp.epochs} epochs; cannot check {epochs}")
    n = epochs + 1
    steps = fp.step_rows[:, 0] < epochs if len(fp.step_rows) else np.zeros(0, bool)
    keep = fp.keyframe_rows <= epochs
    probe = None if fp.probe_rows is None else fp.probe_rows <= epochs
    rows = fp.row_digests[:n]
    state = None if fp.state_digests is None else fp.state_digests[:n]
    return dataclasses.replace(
        fp, config=dict(fp.config, epochs=epochs), epochs=epochs, state_digests=state,
        digest=overall_digest(fp.spec.hash, fp.storage, rows, fp.step_rows[steps], fp.step_digests[steps], state),
        step_rows=fp.step_rows[steps], step_digests=fp.step_digests[steps],
        epoch_digests=None if fp.epoch_digests is None else fp.epoch_digests[:n],
        group_digests=fp.group_digests[:n], row_digests=rows,
        keyframe_rows=fp.keyframe_rows[keep], keyframes=fp.keyframes[keep],
        train_loss=fp.train_loss[:n], test_loss=fp.test_loss[:n],
        probe_rows=None if fp.probe_rows is None or probe is None else fp.probe_rows[probe],
        probe=None if fp.probe is None or probe is None else fp.probe[probe],
        extra={k: v for k, v in fp.extra.items() if k != "divergence"}, divergence=None)


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


def _read_arrays(folder: Path, files: dict[str, Any], spec: ExperimentSpec, layout: TraceLayout, epochs: int,
                 storage: str, n_probe_rows: int, *, state: bool, first: bool) -> dict[str, np.ndarray]:
    """Every array file of a record, each checked against its sha256 in record.json, its dtype and shape."""
    where = str(folder)
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
        "probe": ((n_probe_rows, n_probe), sdt),
    }
    if state:
        expected["state_digests"] = ((epochs + 1,), "<u8")
    if first:
        expected["first_step"] = (None, "|u1")
    arrays = {}
    for name, (shape, dtype) in expected.items():
        sha = Fields(files.get(f"{name}.npy"), where).get("sha256", str)
        path = folder / f"{name}.npy"
        arr = read_npy(path, sha, against="record.json")
        if arr.dtype != np.dtype(dtype) or (shape is not None and arr.shape != shape):
            raise InputError(f"{path}: expected {dtype} {shape}, found {arr.dtype.str} {arr.shape}")
        arrays[name] = arr
    return arrays


def verify_state_rows(layout: TraceLayout, arrays: dict[str, np.ndarray], where: str) -> None:
    """Every epoch row of params.npy and buffers.npy hashes to its state digest.

    The overall digest (and so every fingerprint and baseline of the run) covers the
    state digests, so this pins every value of every row: values edited at a row no
    fingerprint carries are found here, before any verdict reads them, or, with the
    state digests recomputed too, give the record another identity.  A row that does
    not match is then checked tensor by tensor, to name the tensor.
    """
    bad = np.flatnonzero(state_digests(arrays["params"], arrays["buffers"]) != arrays["state_digests"])
    if bad.size:
        row = int(bad[0])
        verify_tensor_digests(layout, arrays, where, rows=slice(row, row + 1))
        raise InputError(f"{where}: params.npy or buffers.npy row {row} does not match its state digest "
                         "(edited or corrupt)")


class TensorCheck:
    """``verify_tensor_digests`` of one loaded record, run at most once (a record view's ``tensor_check``)."""

    def __init__(self, layout: TraceLayout, arrays: dict[str, np.ndarray], where: str) -> None:
        self.layout, self.arrays, self.where = layout, arrays, where
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            verify_tensor_digests(self.layout, self.arrays, self.where)
            self.done = True


def verify_tensor_digests(layout: TraceLayout, arrays: dict[str, np.ndarray], where: str,
                          rows: slice = slice(None)) -> None:
    """Every parameter and running statistic at every epoch row (of ``rows``) hashes to its per-tensor epoch digest.

    params.npy and buffers.npy hold the raw bytes the run digested at each epoch end.  A
    record/3 binds them to its identity through the state digests (``verify_state_rows``)
    and runs this only when compared with an input that has none (``Fingerprint.legacy``);
    a record/2 has nothing else, and runs it when loaded.
    """
    column = {t.key: i for i, t in enumerate(layout.epoch_tensors)}
    digests = arrays["epoch_digests"][rows]
    first = range(len(arrays["epoch_digests"]))[rows].start
    for section, names in (("params", layout.params), ("buffers", layout.buffers)):
        values = arrays[section][rows]
        offset = 0
        for name, shape in names:
            width = math.prod(shape)
            # One contiguous copy of the tensor's columns, then sha256 of each row's bytes
            # (the bytes the run digested): the 64-bit digests compared as one array.
            block = np.ascontiguousarray(values[:, offset:offset + width]).tobytes()
            step, sha256 = width * values.itemsize, hashlib.sha256
            found = np.frombuffer(b"".join([sha256(block[i:i + step]).digest()[:8]
                                            for i in range(0, len(block), step)]), dtype="<u8")
            found = np.where(found == 0, 1, found)  # layout.digest reserves 0 for "no tensor"
            bad = np.flatnonzero(found != digests[:, column[name]])
            if bad.size:
                raise InputError(f"{where}: {section}.npy row {first + int(bad[0])} ({name}) does not match its "
                                 "digest (edited or corrupt)")
            offset += width


def load_record(folder: Path) -> Record:
    """Load and verify a record folder: every file's sha256, shape and dtype, and every state row."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    where = str(folder)
    if not (folder / "record.json").exists():
        partial = folder.name.startswith(".") and ".partial-" in folder.name
        hint = " (an interrupted run's leftovers)" if partial else ""
        raise InputError(f"{where}: not a complete bnaudit record (no record.json){hint}")
    meta = read_json(folder / "record.json", "record")
    f = Fields(meta, where)
    schema = f.get("schema", str)
    if schema in OLD_RECORD_SCHEMAS:
        raise InputError(f"{where}: a record of an older bnaudit ({schema}), whose record.json carries no checksum "
                         "of its own; run it again, or use its fingerprint.json")
    if schema not in RECORD_SCHEMAS:
        raise InputError(f"{where}: schema {schema[:40]!r} is not {RECORD_SCHEMA}")
    if f.get("content_sha256", str) != record_sha256(meta):
        raise InputError(f"{where}: record.json does not match its content_sha256 (edited or corrupt)")
    c = _common(f, where)
    spec, epochs, storage = c["spec"], c["epochs"], c["storage"]
    layout = TraceLayout.for_spec(spec)
    lf = Fields(f.get("layout", dict), where)
    if (_tensor_keys(lf.get("step_tensors", list), where) != layout.step_tensors
            or _tensor_keys(lf.get("epoch_tensors", list), where) != layout.epoch_tensors
            or _params_layout(lf.get("params", list), where) != layout.params):
        raise InputError(f"{where}: layout does not match its spec (written by another bnaudit version?)")
    files = f.get("files", dict)
    probe_rows = f.get("probe_rows", list)
    if probe_rows != probe_schedule(epochs):
        raise InputError(f"{where}: probe rows are not the schedule for {epochs} epochs")
    has_state = schema != LEGACY_RECORD
    has_first = schema == RECORD_SCHEMA
    arrays = _read_arrays(folder, files, spec, layout, epochs, storage, len(probe_rows), state=has_state,
                          first=has_first)
    rd = row_digests(arrays["epoch_digests"])
    state = arrays["state_digests"] if has_state else None
    if overall_digest(spec.hash, storage, rd, arrays["step_rows"], arrays["step_digests"], state) != c["digest"]:
        raise InputError(f"{where}: digest does not match the record's digests (edited or corrupt)")
    tensor_check = None
    if has_state:
        verify_state_rows(layout, arrays, where)
        tensor_check = TensorCheck(layout, arrays, where)
    else:
        verify_tensor_digests(layout, arrays, where)
    first = None
    if has_first:
        first = firststep.decode(f.get("first_step", list), arrays["first_step"].tobytes(),
                                 firststep.first_step_shapes(spec, layout), where)
        _verify_first_step(first, layout, arrays["step_rows"], arrays["step_digests"], arrays["params"][0],
                           storage, where)
        _verify_initial_buffers(first, layout, arrays["buffers"][0], storage, where)
    groups = layout.groups()
    extra = f.get("extra", dict, optional=True) or {}
    fp = Fingerprint(
        source=where, spec=spec, frozen=c["frozen"], config=c["config"], effective=c["effective"],
        environment=c["environment"], epochs=epochs, storage=storage, digest=c["digest"],
        step_tensors=layout.step_tensors, step_rows=arrays["step_rows"], step_digests=arrays["step_digests"],
        epoch_tensors=layout.epoch_tensors, epoch_digests=arrays["epoch_digests"], groups=tuple(groups),
        group_digests=group_digests(layout.epoch_tensors, arrays["epoch_digests"], groups),
        row_digests=rd, keyframe_rows=np.arange(epochs + 1), keyframes=arrays["params"],
        params=layout.params, train_loss=arrays["losses"][:, 0], test_loss=arrays["losses"][:, 1],
        nonfinite=c["nonfinite"], extra=extra, state_digests=state, tensor_check=tensor_check,
        first_step=first, probe_rows=np.array(probe_rows, dtype=np.int64), probe=arrays["probe"],
        **decode_extra(extra, where))
    return Record(path=folder, meta=meta, layout=layout, arrays=arrays, fingerprint=fp)


def _verify_initial_buffers(block: firststep.FirstStep, layout: TraceLayout, buffers: np.ndarray, storage: str,
                            where: str) -> None:
    """A record also has row 0's running statistics: the block's initial ones must be those."""
    offset, bits_dtype = 0, bits.storage(storage).bits_dtype
    for name, shape in layout.buffers:
        n = math.prod(shape)
        got = block.get(f"initial.{name}")
        if got is None or got[1] != storage or not np.array_equal(
                got[0].reshape(-1).view(bits_dtype), buffers[offset:offset + n].view(bits_dtype)):
            raise InputError(f"{where}: first-step initial.{name} differs from the row-0 running statistics "
                             "(edited or corrupt)")
        offset += n


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
