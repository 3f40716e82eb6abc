"""The exact values of the first traced step (epoch 0, step 0): where two runs' training usually parts.

Inside a step a record keeps only digests, except for this one step: its tensors are
small (a batch of activations and one copy of the parameters), and it is where two CPUs
first compute differently.  With their values, ``compare`` gives the share of elements
that differ and their ulp distance at the very operation where training parts, and the
step's inputs (the batch, each module's input, the initial state) make that operation
reproducible on its own.

The block holds, in this order (``first_step_shapes``):

    input, target        the step's batch
    initial.NAME         every parameter and running statistic before the step
    MODULE.out           every module's output (ReLU included), forward order
    loss                 the step's loss
    then the step's remaining traced tensors in the layout's order: running statistics
    after the forward, gradients, momentum buffers, parameters after the update

Each tensor is stored in its own dtype (``bits.STORAGES`` names; bf16-mixed has bfloat16
activations beside float32 parameters), C order, raw bytes one after another.  A tensor
that is also a traced step tensor is checked against that step's digest when loaded, so
its values are bound to the run's overall digest; the initial parameters are checked
against the row-0 parameters.  The rest (the batch, ReLU outputs) are covered by the
file checksums only.

numpy only.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnaudit import bits
from bnaudit.errors import InputError
from bnaudit.fileio import b64encode
from bnaudit.layout import TraceLayout, digest
from bnaudit.spec import ExperimentSpec

FIRST_STEP = (0, 0)
"""(epoch, step) of the step whose values are kept."""


def first_step_shapes(spec: ExperimentSpec, layout: TraceLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor the block may hold, in block order, with its shape."""
    batch = spec.train.batch_size
    shapes: dict[str, tuple[int, ...]] = {"input": (batch, spec.n_inputs), "target": (batch, 1)}
    shapes.update((f"initial.{name}", shape) for name, shape in layout.params + layout.buffers)
    shapes.update((f"{name}.out", (batch, width)) for name, width in zip(layout.modules, layout.probe_width))
    shapes["loss"] = ()
    own = dict(layout.params + layout.buffers)
    for t in layout.step_tensors:
        if t.key not in shapes:
            base = t.key.removesuffix(".grad").removesuffix(".momentum_buffer")
            shapes[t.key] = own[base]
    return shapes


REQUIRED_PREFIXES = ("input", "target", "initial.")
"""Tensors every block holds (a traced tensor may be absent: a momentum buffer with momentum 0)."""


@dataclasses.dataclass(frozen=True)
class FirstStep:
    """The values of the first traced step, by tensor name, each in its own storage dtype."""

    dtypes: Mapping[str, str]
    """Tensor name -> storage dtype name (float32, float64, bfloat16), in block order."""
    values: Mapping[str, np.ndarray]
    """Tensor name -> values in storage form (bfloat16 as uint16 bit patterns), shaped."""

    def tensors_json(self) -> list[list[Any]]:
        """The block's table of contents: [name, dtype, shape] per tensor, in order."""
        return [[k, self.dtypes[k], list(self.values[k].shape)] for k in self.dtypes]

    def blob(self) -> bytes:
        """Every tensor's raw bytes, in order."""
        return b"".join(np.ascontiguousarray(self.values[k]).tobytes() for k in self.dtypes)

    def to_json(self) -> dict[str, Any]:
        """The fingerprint's ``first_step`` field."""
        return {"tensors": self.tensors_json(), "values": b64encode(np.frombuffer(self.blob(), np.uint8))}

    def get(self, key: str) -> tuple[np.ndarray, str] | None:
        """(values, storage dtype) of a tensor, or None when the block does not hold it."""
        if key not in self.values:
            return None
        return self.values[key], self.dtypes[key]


def make(values: Mapping[str, np.ndarray], dtypes: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
         ) -> FirstStep:
    """A block from a run's copies (the runner's side), ordered as ``shapes``."""
    order = [k for k in shapes if k in values]
    return FirstStep(dtypes={k: dtypes[k] for k in order},
                     values={k: np.ascontiguousarray(values[k]).reshape(shapes[k]) for k in order})


def decode(tensors: Any, blob: bytes, shapes: Mapping[str, tuple[int, ...]], where: str) -> FirstStep:
    """A block from untrusted input: its table of contents against the spec's shapes, then its bytes."""
    if not isinstance(tensors, list) or len(tensors) > len(shapes):
        raise InputError(f"{where}: malformed first-step table")
    order = list(shapes)
    dtypes: dict[str, str] = {}
    last = -1
    for item in tensors:
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                or not isinstance(item[1], str) or not isinstance(item[2], list)):
            raise InputError(f"{where}: malformed first-step table")
        key, dtype, shape = item
        if key not in shapes:
            raise InputError(f"{where}: first-step tensor {key[:60]!r} is not one of this spec's tensors")
        if order.index(key) <= last:
            raise InputError(f"{where}: first-step tensors repeated or out of order")
        last = order.index(key)
        if dtype not in bits.STORAGES:
            raise InputError(f"{where}: first-step tensor {key} has unknown dtype {dtype[:20]!r}")
        if shape != list(shapes[key]):
            raise InputError(f"{where}: first-step tensor {key} has shape {shape[:8]}, expected {list(shapes[key])}")
        dtypes[key] = dtype
    missing = [k for k in shapes if k.startswith(REQUIRED_PREFIXES) and k not in dtypes]
    if missing:
        raise InputError(f"{where}: the first-step block lacks {missing[0]}")
    sizes = [math.prod(shapes[k]) * np.dtype(bits.storage(dtypes[k]).numpy_dtype).itemsize for k in dtypes]
    if sum(sizes) != len(blob):
        raise InputError(f"{where}: the first-step block has {len(blob)} bytes, its table says {sum(sizes)}")
    values, offset = {}, 0
    for key, size in zip(dtypes, sizes):
        dt = bits.storage(dtypes[key]).numpy_dtype
        values[key] = np.frombuffer(blob, dtype=dt, count=size // np.dtype(dt).itemsize, offset=offset
                                    ).reshape(shapes[key])
        offset += size
    return FirstStep(dtypes=dtypes, values=values)


def from_json(raw: Any, shapes: Mapping[str, tuple[int, ...]], where: str) -> FirstStep:
    """A fingerprint's ``first_step`` field, decoded (not yet verified: see ``verify``)."""
    if not isinstance(raw, dict) or set(raw) != {"tensors", "values"}:
        raise InputError(f"{where}: malformed field 'first_step'")
    limit = sum(math.prod(s) for s in shapes.values()) * 8  # no tensor is wider than float64
    text = raw["values"]
    if not isinstance(text, str) or len(text) > (limit + 2) // 3 * 4:
        raise InputError(f"{where}: field 'first_step' values are malformed or too long")
    try:
        blob = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InputError(f"{where}: field 'first_step' values are not base64") from None
    return decode(raw["tensors"], blob, shapes, where)


def verify(block: FirstStep, layout: TraceLayout, step_digests: np.ndarray, initial_params: np.ndarray,
           storage: str, where: str) -> None:
    """The block says what the run's digests say.

    ``step_digests`` is the digest row of the first traced step (``layout.step_tensors``
    order): a traced tensor is in the block exactly when it exists (digest not 0) and
    then hashes to it.  ``initial_params`` is the row-0 parameter vector (storage dtype).
    """
    for t, d in zip(layout.step_tensors, step_digests):
        got = block.get(t.key)
        if got is None:
            if int(d) != 0:
                raise InputError(f"{where}: the first-step block lacks {t.key}")
            continue
        if int(d) == 0 or digest(np.ascontiguousarray(got[0]).tobytes()) != int(d):
            raise InputError(f"{where}: first-step values of {t.key} do not match the step's digest "
                             "(edited or corrupt)")
    offset = 0
    st = bits.storage(storage)
    for name, shape in layout.params:
        n = math.prod(shape)
        values, dtype = block.get(f"initial.{name}") or (None, "")
        if (values is None or dtype != storage
                or not np.array_equal(values.reshape(-1).view(st.bits_dtype),
                                      initial_params[offset:offset + n].view(st.bits_dtype))):
            raise InputError(f"{where}: first-step initial.{name} differs from the row-0 parameters "
                             "(edited or corrupt)")
        offset += n
