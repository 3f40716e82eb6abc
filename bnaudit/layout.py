"""What a run records, and when: the traced tensors, the array columns, the row schedules.

A leaf of the pipeline (numpy and the spec only), shared by the runner that writes a
record, the record module that reads it, and every stage that compares records.

Rows and schedules.  An **epoch row** is 0 for the initial state and e+1 for the end
of (0-based) epoch e; a traced step is (epoch, step), both 0-based.  Two schedules
pick epoch rows, and no two share a word:

* ``probe_schedule(epochs)``: the rows at which the probe batch is run and the mpmath
  reference stores its state (every row to 100, then every 10th);
* ``keyframe_schedule(epochs)``: the rows whose parameters a fingerprint carries
  exactly (roughly log-spaced: 0, 1, 2, 3, 5, 10, 20, ...), its **keyframes**.

Words for people (every view uses these three, and only these): an epoch row r is
``after(r)``, "the initial state" for 0 (before training) and "after epoch r" otherwise,
epochs counted from 1; a traced step is ``during(epoch, step)``, "epoch e+1, step s+1";
``epochs_text(start, end)`` names the epochs a window of rows spans.  "Row" is the arrays' word, never the reader's.

Digests are the first 64 bits of sha256 of a tensor's raw bytes, 0 meaning "no tensor
here" (a gradient before the first step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnaudit import bits
from bnaudit.spec import ExperimentSpec

PHASES = ("init", "forward", "backward", "update", "eval")
"""The phases of a step, in computation order ("init": the initial state, epoch row 0)."""

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


def digest(data: Any, *more: Any) -> int:
    """The first 64 bits of sha256 of raw bytes (``data``, then each of ``more``), as an integer; 0 is reserved for
    "no tensor".

    sha256 rather than blake2b: with the SHA extensions of current x86 CPUs it hashes
    about twice as fast here (1.7 vs 0.85 GB/s), and the digests sit in the training loop.
    """
    if data is None:
        return 0
    h = hashlib.sha256(data)
    for part in more:
        h.update(part)
    value = int.from_bytes(h.digest()[:8], "little")
    return value or 1


def after(row: int) -> str:
    """An epoch row in words: "the initial state" (row 0, before training) or "after epoch r"."""
    return "the initial state" if row == 0 else f"after epoch {row}"


def during(epoch: int, step: int) -> str:
    """A traced step (0-based epoch and step) in words, counted from 1: "epoch 1, step 1" is training's first."""
    return f"epoch {epoch + 1}, step {step + 1}"


def nonfinite_when(nf: Mapping[str, Any]) -> str:
    """When a run first went non-finite (its record's ``nonfinite``: 0-based epoch and step), in these words."""
    epoch, step = nf.get("epoch"), nf.get("step")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return "at an unrecorded epoch"
    return during(epoch, step) if isinstance(step, int) and not isinstance(step, bool) else after(epoch + 1)


def epochs_text(start: int, end: int) -> str:
    """A window of epoch rows start..end in words: the epochs it spans ("epochs 1-7" for rows 0..7)."""
    return f"epoch {end}" if end == start + 1 else f"epochs {start + 1}-{end}"


def at(where: str) -> str:
    """A place in training (``compare.Difference.where``) after a verb such as "part": "at epoch 1, step 1, ...",
    "after epoch 99 (phase update), ...", "in the eval pass ..."."""
    if where.startswith("after "):
        return where
    if where.startswith(("eval pass", "probe pass")):
        return f"in the {where}"
    return f"at {where}"


def probe_schedule(epochs: int) -> list[int]:
    """Epoch rows kept for the probe and the reference: every row to 100, then every 10th."""
    rows = list(range(0, min(epochs, 100) + 1)) + list(range(110, epochs + 1, 10))
    if rows[-1] != epochs:
        rows.append(epochs)
    return rows


def keyframe_schedule(epochs: int) -> list[int]:
    """Epoch rows whose parameters a fingerprint carries exactly (roughly log-spaced)."""
    marks = [0, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
    return sorted({r for r in marks if r <= epochs} | {epochs})


def probe_indices(spec: ExperimentSpec) -> np.ndarray:
    """Training rows of the fixed probe batch: the first batch_size training samples."""
    return np.arange(spec.train.batch_size)



def estimated_bytes(spec: ExperimentSpec, epochs: int, storage: str) -> dict[str, int]:
    """The size of the largest files a run of ``epochs`` epochs writes, before it runs.

    params.npy and probe.npy grow with the epochs and the network, the fingerprint with
    its keyframes (base64, 4/3 of the raw bytes) and the traced steps (16 hex digits a
    digest); the rest is small beside them.
    """
    layout = TraceLayout.for_spec(spec)
    itemsize = np.dtype(bits.storage(storage).numpy_dtype).itemsize
    n_probe = sum(layout.probe_width) * spec.train.batch_size
    keyframes = len(keyframe_schedule(epochs)) * layout.n_params * itemsize * 4 // 3
    steps = spec.steps_per_epoch * len(layout.step_tensors) * 16
    return {"params.npy": (epochs + 1) * layout.n_params * itemsize,
            "probe.npy": len(probe_schedule(epochs)) * n_probe * itemsize,
            "fingerprint.json": keyframes + steps + (epochs + 1) * 64}
