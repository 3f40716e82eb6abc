"""The instrumented torch training run of the BN noisy-feature experiment.

The loop is the plain PyTorch recipe (nn.Sequential, mse_loss, SGD with momentum,
MultiStepLR); the instrumentation only reads tensors:
  - every step of a traced epoch (epoch 0 always): a digest of every tensor the step
    computes, in the order it computes them (forward, backward, update);
  - every epoch end: digests of the state (parameters, momentum, running statistics,
    last gradients), of the eval-mode activations, and exact copies of parameters,
    buffers and losses;
  - at probe rows (``layout.probe_schedule``): the activations of a fixed probe batch,
    for the reference.
The data flow of training is untouched, so a recorded run computes the same bits as a
bare loop with the same settings.

``Training`` owns the torch objects and every computation on them; ``Recorder`` only
reads what it is handed; ``run`` is the loop between them.

torch is imported only inside a run's process, where the controls were set before it
loaded: by this module, ``promote.py``, ``worker.py`` and ``audit.py`` (and by ``bnaudit env`` in
``cli/run.py``, which only reads torch's view of the machine).  Every other module is
torch-free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch._utils import _flatten_dense_tensors

from bnaudit import bits, firststep, record
from bnaudit import promote as promote_ops
from bnaudit.controls import RunConfig
from bnaudit.frozen import FrozenInputs
from bnaudit.layout import TraceLayout, digest, probe_indices, probe_schedule, storage_numpy
from bnaudit.spec import ExperimentSpec

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "bf16-mixed": torch.float32}
STORAGE_OF = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}
"""Storage dtype name of each tensor dtype a run computes in."""

Tensors = Sequence[torch.Tensor]
Outputs = list[tuple[str, torch.Tensor]]
"""Each module's output of one forward pass, (module name, output), in forward order."""


def build_model(spec: ExperimentSpec, promote: tuple[str, ...] = ()) -> nn.Sequential:
    """Linear -> [BatchNorm1d ->] ReLU, hidden_layers times, then Linear(units, 1).

    ``promote`` (``Controls.promote``) builds the layers it names as their float64 twins
    (``promote.py``); the state-dict names stay the same.
    """
    shapes = {name: (fan_in, fan_out) for name, _, fan_in, fan_out in spec.layers()}
    mods: list[tuple[str, nn.Module]] = []
    for name, kind in spec.modules():
        if kind == "linear":
            mods.append((name, promote_ops.linear(*shapes[name], promote)))
        elif kind == "bn":
            mods.append((name, promote_ops.batch_norm(shapes[name][1], spec.model.bn_eps, spec.model.bn_momentum,
                                                      promote)))
        else:
            mods.append((name, nn.ReLU()))
    return nn.Sequential(OrderedDict(mods))


# --------------------------------------------------------------------------- digests and copies

def digest_slices(values: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """64-bit digest (layout.digest) of consecutive pieces of a contiguous 1-D array.

    The digest of a piece is the digest of the tensor whose values it holds (same bytes).
    """
    buf = memoryview(values).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    width = values.itemsize
    out, offset = [], 0
    for size in sizes:
        out.append(digest(buf[offset: offset + size * width]))
        offset += size * width
    return out


def digest_all(tensors: Sequence[torch.Tensor | None]) -> np.ndarray:
    """64-bit digest (layout.digest) of each tensor's bytes (0 for None), with one copy per dtype.

    Concatenating first and hashing slices of one buffer costs a fraction of converting
    every small tensor separately; the digest of a slice is the digest of the tensor.
    """
    out = np.zeros(len(tensors), dtype=np.uint64)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        group = [tensors[i] for i in idx]
        values = flatten(group).view(torch.uint8).numpy()  # type: ignore[arg-type]
        out[idx] = digest_slices(values, [t.numel() * t.element_size() for t in group])  # type: ignore[union-attr]
    return out


def flatten(tensors: Tensors) -> torch.Tensor:
    """One contiguous 1-D copy of same-dtype tensors, in order (values untouched).

    torch's own flattening for bucketed all-reduce: one C++ call, about a third of the
    time of ``torch.cat`` over per-tensor reshapes for the ~80 small tensors of an epoch.
    """
    with torch.no_grad():
        return _flatten_dense_tensors(list(tensors)).detach()


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A tensor's values in record storage (bfloat16 as uint16 bit patterns)."""
    t = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy()


# --------------------------------------------------------------------------- inputs

def load_initial_state(model: nn.Sequential, spec: ExperimentSpec, frozen: FrozenInputs,
                       config: RunConfig) -> None:
    """Copy the frozen float64 state into the model, rounded to nearest in the run's storage dtype."""
    storage = config.controls.storage
    values = bits.from_float64(frozen.init, storage)
    if config.perturb is not None:
        values = values.copy()
        for name, shape, offset in _state_offsets(spec):
            if name == config.perturb.tensor:
                flat = offset + int(np.ravel_multi_index(config.perturb.index, shape))
                values[flat] = bits.step_ulps(values[flat: flat + 1], config.perturb.ulps, storage)[0]
    if storage == "bfloat16":
        state = torch.from_numpy(values.view("<i2").copy()).view(torch.bfloat16)
    else:
        state = torch.from_numpy(values.copy())
    sd = model.state_dict()
    for name, shape, offset in _state_offsets(spec):
        sd[name].copy_(state[offset: offset + math.prod(shape)].reshape(shape))


def _state_offsets(spec: ExperimentSpec) -> Iterator[tuple[str, tuple[int, ...], int]]:
    """(name, shape, offset) of each tensor of the frozen state vector: parameters, then buffers."""
    offset = 0
    for name, shape in spec.parameters() + spec.buffers():
        yield name, shape, offset
        offset += math.prod(shape)


def _rounded(values: np.ndarray, storage: str, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded once, to nearest in the storage dtype, as a tensor of the run's dtype.

    Not ``torch.from_numpy(values).to(dtype)``: torch's float64 -> bfloat16 cast goes
    through float32 and can round twice.  The final ``.to`` is exact.
    """
    return torch.from_numpy(bits.to_float64(bits.from_float64(values, storage), storage)).to(dtype)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The frozen data set and batch order as tensors of the run's dtype."""

    inputs: torch.Tensor
    """(samples, features) every sample, training ones first: the eval-mode batch."""
    x_train: torch.Tensor
    """(train, features) the training inputs."""
    y_train: torch.Tensor
    """(train, 1) the training targets."""
    y_test: torch.Tensor
    """(test, 1) the test targets."""
    probe_x: torch.Tensor
    """(batch_size, features) the fixed probe batch (``layout.probe_indices``)."""
    order: torch.Tensor
    """(spec epochs, train) int64: the permutation of training rows in each epoch (frozen batches.npy)."""
    batch_size: int
    """Samples per step."""
    steps: int
    """Steps per epoch."""

    @classmethod
    def load(cls, spec: ExperimentSpec, frozen: FrozenInputs, storage: str, dtype: torch.dtype) -> TrainingData:
        inputs = _rounded(frozen.inputs, storage, dtype)
        targets = _rounded(frozen.targets, storage, dtype).unsqueeze(1)
        n_train = spec.data.train
        x_train = inputs[:n_train]
        return cls(inputs=inputs, x_train=x_train, y_train=targets[:n_train], y_test=targets[n_train:],
                   probe_x=x_train[probe_indices(spec)], order=torch.from_numpy(frozen.batches.astype(np.int64)),
                   batch_size=spec.train.batch_size, steps=spec.steps_per_epoch)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of each step of ``epoch``, in order."""
        order, bs = self.order[epoch], self.batch_size
        for step in range(self.steps):
            idx = order[step * bs:(step + 1) * bs]
            yield self.x_train[idx], self.y_train[idx]


# --------------------------------------------------------------------------- forward passes

def forward_layers(modules: Sequence[tuple[str, nn.Module]], x: torch.Tensor) -> Outputs:
    """The model's forward, module by module, keeping each output (same ops as model(x)).

    ``modules`` is ``list(model.named_children())``, listed once per run: walking the
    module tree on every step costs more than the step's small matrix products.
    """
    outs = []
    h = x
    for name, module in modules:
        h = module(h)
        outs.append((name, h))
    return outs


def probe_forward(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Train-mode forward of the probe batch without touching the running statistics."""
    outs = []
    h = x
    with torch.no_grad():
        for _, module in model.named_children():
            if isinstance(module, nn.BatchNorm1d):
                h = promote_ops.probe_batch_norm(module, h)
            else:
                h = module(h)
            outs.append(h)
    return outs


def min_batch_variance(bn_inputs: Tensors, n_layers: int) -> np.ndarray:
    """(n_layers,) smallest per-unit batch variance of each BN layer's input over an epoch's steps.

    ``bn_inputs`` holds every BN layer's input at every step, step by step.  Biased, as BN
    normalises with it, in float64 from the run's values, in one reduction per epoch
    (torch's var is ~10x slower than this at these sizes).
    """
    x = torch.stack(list(bn_inputs)).double()                  # (steps * n_layers, batch, units)
    centred = x - x.mean(1, keepdim=True)
    var = (centred * centred).mean(1).view(-1, n_layers, x.shape[-1])
    return var.amin((0, 2)).numpy()


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The eval-mode forward of every sample at an epoch end."""

    outs: Outputs
    """Each module's output."""
    losses: torch.Tensor
    """(2,) training and test MSE, in the run's dtype."""


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What the record reads at one epoch row: the live tensors, not copies."""

    row: int
    """0 for the initial state, e + 1 at the end of epoch e."""
    params: Tensors
    """Parameters, in layout order."""
    buffers: Tensors
    """Running statistics, in layout order."""
    grads: Sequence[torch.Tensor | None]
    """Each parameter's gradient of the epoch's last step (None before the first step)."""
    momenta: Sequence[torch.Tensor | None]
    """Each parameter's SGD momentum buffer (None before the first step, or without momentum)."""
    evaluation: Evaluation
    """The eval-mode forward."""
    probe: list[torch.Tensor] | None
    """Each module's train-mode output for the probe batch, in the run's dtype; None off the probe rows."""
    step_losses: torch.Tensor | None = None
    """(steps,) the training loss of each of the epoch's steps; None at row 0."""
    bn_inputs: Tensors = ()
    """Every BN layer's input at every step of the epoch, step by step; empty at row 0."""


class Training:
    """The model, its optimiser and learning-rate schedule, and the passes that train and evaluate it."""

    def __init__(self, spec: ExperimentSpec, frozen: FrozenInputs, config: RunConfig) -> None:
        self.dtype = TORCH_DTYPES[config.controls.dtype]
        promote = config.controls.promote
        self.model = build_model(spec, promote).to(self.dtype)
        self.promote_loss = "loss" in promote
        load_initial_state(self.model, spec, frozen, config)
        self.data = TrainingData.load(spec, frozen, config.controls.storage, self.dtype)
        self.modules = list(self.model.named_children())
        self.named_params = list(self.model.named_parameters())
        self.params = [p for _, p in self.named_params]
        # num_batches_tracked is a counter, not numerical state.
        self.named_buffers = [(n, b) for n, b in self.model.named_buffers() if b.dim() > 0]
        self.buffers = [b for _, b in self.named_buffers]
        self.bn_index = [i for i, (_, m) in enumerate(self.modules) if isinstance(m, nn.BatchNorm1d)]
        self.optimizer = promote_ops.sgd(self.params, lr=spec.train.lr, momentum=spec.train.momentum,
                                         promote=promote)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(spec.train.lr_milestones), gamma=spec.train.lr_gamma)
        # bf16-mixed runs each forward under bf16 autocast (a null context otherwise); the
        # loss is taken outside it, in float32 from the output cast back, so that autocast's
        # per-op policy never decides the loss's precision.
        self.precision: Callable[[], contextlib.AbstractContextManager[Any]] = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if config.controls.dtype == "bf16-mixed"
            else contextlib.nullcontext)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[Outputs, torch.Tensor]:
        """One SGD step on a batch; each module's output and the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision():
            outs = forward_layers(self.modules, xb)
        loss = promote_ops.mse_loss(outs[-1][1].to(self.dtype), yb, self.promote_loss)
        loss.backward()
        self.optimizer.step()
        return outs, loss

    def bn_inputs(self, outs: Outputs) -> list[torch.Tensor]:
        """Each BN layer's input in a forward's outputs (the output of the module before it)."""
        return [outs[i - 1][1].detach() for i in self.bn_index]

    def momenta(self) -> list[torch.Tensor | None]:
        """Each parameter's momentum buffer; None before the first step or with momentum 0 (SGD keeps none)."""
        return [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]

    def traced(self, outs: Outputs, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Every tensor a traced step digests, by its layout key (``TensorKey.key``)."""
        named: dict[str, torch.Tensor | None] = {
            f"{name}.out": out for name, out in outs if not name.startswith("relu")}
        named["loss"] = loss
        for (name, p), momentum in zip(self.named_params, self.momenta()):
            named[name] = p
            named[f"{name}.grad"] = p.grad
            named[f"{name}.momentum_buffer"] = momentum
        named.update(self.named_buffers)
        return named

    def first_step(self, xb: torch.Tensor, yb: torch.Tensor, outs: Outputs,
                   loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """What the first traced step's block keeps (``firststep``): its batch, every module's output, its tensors."""
        named = self.traced(outs, loss)
        named.update((f"{name}.out", out) for name, out in outs)
        named.update(input=xb, target=yb)
        return named

    def evaluate(self) -> Evaluation:
        """Eval-mode forward of every sample and the training and test MSE; leaves the model in train mode."""
        data = self.data
        self.model.eval()
        with torch.no_grad():
            with self.precision():
                outs = forward_layers(self.modules, data.inputs)
            pred = outs[-1][1].to(self.dtype)
            n_train = len(data.x_train)
            losses = torch.stack([promote_ops.mse_loss(pred[:n_train], data.y_train, self.promote_loss),
                                  promote_ops.mse_loss(pred[n_train:], data.y_test, self.promote_loss)])
        self.model.train()
        return Evaluation(outs=outs, losses=losses)

    def probe(self) -> list[torch.Tensor]:
        """Each module's train-mode output for the probe batch, in the run's dtype."""
        with torch.no_grad(), self.precision():
            outs = probe_forward(self.model, self.data.probe_x)
        return [t.to(self.dtype) for t in outs]

    def epoch_end(self, row: int, *, probe: bool, step_losses: torch.Tensor | None = None,
                  bn_inputs: Tensors = ()) -> EpochEnd:
        """The state at epoch row ``row``, with its eval-mode forward (and the probe's, if asked)."""
        return EpochEnd(row=row, params=self.params, buffers=self.buffers, grads=[p.grad for p in self.params],
                        momenta=self.momenta(), evaluation=self.evaluate(), probe=self.probe() if probe else None,
                        step_losses=step_losses, bn_inputs=bn_inputs)


# --------------------------------------------------------------------------- the record

class Recorder:
    """Collects digests and exact values while the run goes; never alters the tensors."""

    def __init__(self, spec: ExperimentSpec, config: RunConfig) -> None:
        self.layout = layout = TraceLayout.for_spec(spec)
        self.storage = config.controls.storage
        self.bn_eps = spec.model.bn_eps
        n_rows = config.epochs + 1
        self.params = np.empty((n_rows, layout.n_params), dtype=storage_numpy(self.storage))
        self.buffers = np.empty((n_rows, layout.n_buffers), dtype=self.params.dtype)
        self.epoch_digests = np.zeros((n_rows, len(layout.epoch_tensors)), dtype=np.uint64)
        self.step_rows: list[tuple[int, int]] = []
        self.step_digests: list[np.ndarray] = []
        self.train_loss = np.full(n_rows, np.nan)
        self.test_loss = np.full(n_rows, np.nan)
        self.step_loss = np.full((config.epochs, spec.steps_per_epoch), np.nan)
        self.min_var = np.full((n_rows, len(layout.bn_layers)), np.nan)
        self.probe_rows = probe_schedule(config.epochs)
        self.probe: list[np.ndarray] = []
        self.nonfinite: dict[str, Any] | None = None
        self.first_step: firststep.FirstStep | None = None
        self._first_shapes = firststep.first_step_shapes(spec, layout)
        self._probe_rows = set(self.probe_rows)
        self._param_sizes = [math.prod(shape) for _, shape in layout.params]
        self._buffer_sizes = [math.prod(shape) for _, shape in layout.buffers]

    def wants_probe(self, row: int) -> bool:
        """Whether epoch row ``row`` keeps the probe batch's activations."""
        return row in self._probe_rows

    def record_step(self, epoch: int, step: int, named: Mapping[str, torch.Tensor | None]) -> None:
        """A traced step: the digest of every step tensor, in computation order."""
        keys = self.layout.step_tensors
        tensors = [named[t.key] for t in keys]
        self.step_rows.append((epoch, step))
        self.step_digests.append(digest_all(tensors))
        if self.nonfinite is None:
            self._first_nonfinite(f"epoch {epoch} step {step}", [
                (t.phase, t.layer, t.key, v) for t, v in zip(keys, tensors) if v is not None], epoch, step)

    def record_first_step(self, named: Mapping[str, torch.Tensor | None]) -> None:
        """The first traced step's values: copies, taken before the next step changes the parameters."""
        values: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for key in self._first_shapes:
            t = named.get(key)
            if t is not None:
                values[key], dtypes[key] = to_storage(t).copy(), STORAGE_OF[t.dtype]
        for section, names in ((self.params[0], self.layout.params), (self.buffers[0], self.layout.buffers)):
            offset = 0
            for name, shape in names:
                n = math.prod(shape)
                values[f"initial.{name}"], dtypes[f"initial.{name}"] = section[offset:offset + n].copy(), self.storage
                offset += n
        self.first_step = firststep.make(values, dtypes, self._first_shapes)

    def record_epoch_end(self, end: EpochEnd) -> None:
        """An epoch row: exact parameters, buffers and losses, the epoch-end digests, the probe."""
        row = end.row
        if end.step_losses is not None:
            self.step_loss[row - 1] = end.step_losses.double().numpy()
        if end.bn_inputs:
            self.min_var[row] = min_batch_variance(end.bn_inputs, len(self.layout.bn_layers)) / self.bn_eps
        self.params[row] = to_storage(flatten(end.params))
        if end.buffers:
            self.buffers[row] = to_storage(flatten(end.buffers))
        losses = end.evaluation.losses
        self.train_loss[row], self.test_loss[row] = float(losses[0]), float(losses[1])
        self.epoch_digests[row] = self._epoch_row_digests(end)
        if end.probe is not None:
            self.probe.append(to_storage(flatten(end.probe)))
        if self.nonfinite is None and not self._finite_row(row):
            self._first_nonfinite(f"epoch-end {row - 1}", [
                ("update", layer, name, p) for (name, layer), p in zip(self.layout.param_layers, end.params)] + [
                ("eval", "loss", "eval.loss", end.evaluation.losses)], row - 1, None)

    def _epoch_row_digests(self, end: EpochEnd) -> list[int]:
        """The digest of every epoch tensor at ``end.row``, in layout order."""
        layout = self.layout
        # Parameters and buffers are digested from their stored copies (the same bytes);
        # the other tensors in one pass over a concatenation.
        digests = dict(zip((n for n, _ in layout.params), digest_slices(self.params[end.row], self._param_sizes)))
        digests.update(zip((n for n, _ in layout.buffers), digest_slices(self.buffers[end.row], self._buffer_sizes)))
        others: dict[str, torch.Tensor | None] = {"loss.steps": end.step_losses, "eval.loss": end.evaluation.losses}
        others.update(zip((f"{n}.grad" for n, _ in layout.params), end.grads))
        others.update(zip((f"{n}.momentum_buffer" for n, _ in layout.params), end.momenta))
        others.update((f"eval.{name}", out) for name, out in end.evaluation.outs if not name.startswith("relu"))
        digests.update(zip(others, digest_all(list(others.values()))))
        return [digests[t.key] for t in layout.epoch_tensors]

    def _finite_row(self, row: int) -> bool:
        """Whether the losses and every parameter recorded at ``row`` are finite."""
        return (math.isfinite(self.train_loss[row]) and math.isfinite(self.test_loss[row])
                and bool(np.isfinite(bits.to_float64(self.params[row], self.storage)).all()))

    def _first_nonfinite(self, where: str, tensors: list[tuple[str, str, str, torch.Tensor]], epoch: int,
                         step: int | None) -> None:
        """Keep the first of ``tensors`` (phase, layer, key, tensor) that holds a NaN or infinity."""
        for phase, layer, key, t in tensors:
            if not bool(torch.isfinite(t).all()):
                self.nonfinite = {"epoch": epoch, "step": step, "phase": phase, "layer": layer,
                                  "tensor": key, "row": where}
                return

    def result(self, train_seconds: float) -> record.RunResult:
        """Everything recorded, as the record's arrays."""
        return record.RunResult(
            params=self.params,
            buffers=self.buffers,
            train_loss=self.train_loss,
            test_loss=self.test_loss,
            step_loss=self.step_loss,
            min_var_over_eps=self.min_var,
            epoch_digests=self.epoch_digests,
            step_rows=np.array(self.step_rows, dtype=np.int64).reshape(-1, 2),
            step_digests=np.stack(self.step_digests) if self.step_digests
            else np.zeros((0, len(self.layout.step_tensors)), np.uint64),
            probe_rows=np.array(self.probe_rows, dtype=np.int64),
            probe=np.stack(self.probe),
            nonfinite=self.nonfinite,
            train_seconds=train_seconds,
            first_step=self.first_step,
        )


# --------------------------------------------------------------------------- the loop

ProgressFn = Callable[[int, int, float, float], None]


class Observer(Protocol):
    """Something that looks at the model at some epoch rows (e.g. the operator audit).

    ``observe`` is called at the end of an epoch row it ``wants``, after the row's values
    are recorded, with the model in train mode and the probe batch in the run's dtype.
    It must not change the model; its ``result()`` goes into record.json under
    ``extra[name]``.
    """

    name: str

    def wants(self, row: int) -> bool: ...

    def observe(self, row: int, model: nn.Sequential, probe_x: torch.Tensor) -> None: ...

    def result(self) -> dict[str, Any]: ...


def run(spec: ExperimentSpec, frozen: FrozenInputs, config: RunConfig,
        progress: ProgressFn | None = None, observers: Sequence[Observer] = ()) -> record.RunResult:
    """Train for ``config.epochs`` epochs and return everything the record holds."""
    training = Training(spec, frozen, config)
    rec = Recorder(spec, config)
    traced = set(config.trace_epochs) | {0}
    _end_row(training.epoch_end(0, probe=rec.wants_probe(0)), rec, training, observers)
    started = time.perf_counter()
    for epoch in range(config.epochs):
        step_losses, bn_inputs = [], []
        for step, (xb, yb) in enumerate(training.data.batches(epoch)):
            outs, loss = training.step(xb, yb)
            step_losses.append(loss.detach())
            bn_inputs += training.bn_inputs(outs)
            if epoch in traced:
                rec.record_step(epoch, step, training.traced(outs, loss))
            if (epoch, step) == firststep.FIRST_STEP:
                rec.record_first_step(training.first_step(xb, yb, outs, loss))
        training.scheduler.step()
        row = epoch + 1
        end = training.epoch_end(row, probe=rec.wants_probe(row), step_losses=torch.stack(step_losses),
                                 bn_inputs=bn_inputs)
        _end_row(end, rec, training, observers)
        if progress is not None:
            progress(row, config.epochs, rec.train_loss[row], rec.test_loss[row])
    return rec.result(train_seconds=time.perf_counter() - started)


def _end_row(end: EpochEnd, rec: Recorder, training: Training, observers: Sequence[Observer]) -> None:
    """Record an epoch row, then show the model to the observers that want the row."""
    rec.record_epoch_end(end)
    for observer in observers:
        if observer.wants(end.row):
            observer.observe(end.row, training.model, training.data.probe_x)
