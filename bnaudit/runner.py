"""The instrumented torch training run of the BN noisy-feature experiment.

The loop is the plain PyTorch recipe (nn.Sequential, mse_loss, SGD with momentum,
MultiStepLR); the instrumentation only reads tensors:
  - every step of a traced epoch (epoch 0 always): a digest of every tensor the step
    computes, in the order it computes them (forward, backward, update);
  - every epoch end: digests of the state (parameters, momentum, running statistics,
    last gradients), of the eval-mode activations, and exact copies of parameters,
    buffers and losses;
  - at snapshot epochs: the activations of a fixed probe batch, for the reference.
The data flow of training is untouched, so a recorded run computes the same bits as a
bare loop with the same settings.  Only this module and ``worker.py`` import torch.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch._utils import _flatten_dense_tensors

from bnaudit import bits, record
from bnaudit.controls import RunConfig
from bnaudit.frozen import FrozenInputs
from bnaudit.spec import ExperimentSpec

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "bf16-mixed": torch.float32}


def build_model(spec: ExperimentSpec) -> nn.Sequential:
    """Linear -> [BatchNorm1d ->] ReLU, hidden_layers times, then Linear(units, 1)."""
    shapes = {name: (fan_in, fan_out) for name, _, fan_in, fan_out in spec.layers()}
    mods: list[tuple[str, nn.Module]] = []
    for name, kind in spec.modules():
        if kind == "linear":
            mods.append((name, nn.Linear(*shapes[name])))
        elif kind == "bn":
            mods.append((name, nn.BatchNorm1d(shapes[name][1], eps=spec.model.bn_eps,
                                              momentum=spec.model.bn_momentum)))
        else:
            mods.append((name, nn.ReLU()))
    return nn.Sequential(OrderedDict(mods))


def digest_slices(values: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """64-bit digest (record.digest) of consecutive pieces of a contiguous 1-D array.

    The digest of a piece is the digest of the tensor whose values it holds (same bytes).
    """
    buf = memoryview(values).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    width = values.itemsize
    out, offset = [], 0
    for size in sizes:
        out.append(record.digest(buf[offset: offset + size * width]))
        offset += size * width
    return out


def digest_all(tensors: list[torch.Tensor | None]) -> np.ndarray:
    """64-bit digest (record.digest) of each tensor's bytes (0 for None), with one copy per dtype.

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


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
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


def load_initial_state(model: nn.Sequential, spec: ExperimentSpec, frozen: FrozenInputs,
                       config: RunConfig) -> None:
    """Copy the frozen float64 state into the model, rounded to nearest in the run's storage dtype."""
    storage = config.controls.storage
    values = bits.from_float64(frozen.init, storage)
    if config.perturb is not None:
        values = values.copy()
        offset = 0
        for name, shape in spec.parameters() + spec.buffers():
            size = math.prod(shape)
            if name == config.perturb.tensor:
                flat = offset + int(np.ravel_multi_index(config.perturb.index, shape))
                values[flat] = bits.step_ulps(values[flat: flat + 1], config.perturb.ulps, storage)[0]
            offset += size
    if storage == "bfloat16":
        state = torch.from_numpy(values.view("<i2").copy()).view(torch.bfloat16)
    else:
        state = torch.from_numpy(values.copy())
    sd = model.state_dict()
    offset = 0
    for name, shape in spec.parameters() + spec.buffers():
        size = math.prod(shape)
        sd[name].copy_(state[offset: offset + size].reshape(shape))
        offset += size


class Recorder:
    """Collects digests and exact values while the run goes; never alters the tensors."""

    def __init__(self, spec: ExperimentSpec, model: nn.Sequential, config: RunConfig) -> None:
        self.layout = record.TraceLayout.for_spec(spec)
        n_rows = config.epochs + 1
        self.params = np.empty((n_rows, self.layout.n_params), dtype=record.storage_numpy(config.controls.storage))
        self.buffers = np.empty((n_rows, self.layout.n_buffers), dtype=self.params.dtype)
        self.epoch_digests = np.zeros((n_rows, len(self.layout.epoch_tensors)), dtype=np.uint64)
        self.step_rows: list[tuple[int, int]] = []
        self.step_digests: list[np.ndarray] = []
        self.train_loss = np.full(n_rows, np.nan)
        self.test_loss = np.full(n_rows, np.nan)
        self.step_loss = np.full((config.epochs, spec.steps_per_epoch), np.nan)
        self.min_var = np.full((n_rows, len(self.layout.bn_layers)), np.nan)
        self.probe_rows = record.snapshot_rows(config.epochs)
        self.probe: list[np.ndarray] = []
        self.nonfinite: dict[str, Any] | None = None

    def first_nonfinite(self, row: str, where: list[tuple[str, str, str, torch.Tensor]], epoch: int,
                        step: int | None) -> None:
        if self.nonfinite is not None:
            return
        for phase, layer, tensor, t in where:
            if not bool(torch.isfinite(t).all()):
                self.nonfinite = {"epoch": epoch, "step": step, "phase": phase, "layer": layer,
                                  "tensor": tensor, "row": row}
                return


def forward_layers(modules: Sequence[tuple[str, nn.Module]], x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
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
                h = F.batch_norm(h, None, None, module.weight, module.bias, True, 0.0, module.eps)
            else:
                h = module(h)
            outs.append(h)
    return outs


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
    dtype = TORCH_DTYPES[config.controls.dtype]
    mixed = config.controls.dtype == "bf16-mixed"
    model = build_model(spec).to(dtype)
    load_initial_state(model, spec, frozen, config)
    params = [p for _, p in model.named_parameters()]
    buffers = [b for _, b in model.named_buffers() if b.dim() > 0]  # num_batches_tracked is not state
    modules = list(model.named_children())
    bn_index = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.BatchNorm1d)]

    inputs = torch.from_numpy(bits.to_float64(bits.from_float64(frozen.inputs, config.controls.storage),
                                              config.controls.storage)).to(dtype)
    # Rounded once, to nearest in the storage dtype (torch's float64 -> bfloat16 cast goes
    # through float32 and can round twice).
    targets = torch.from_numpy(bits.to_float64(bits.from_float64(frozen.targets, config.controls.storage),
                                               config.controls.storage)).to(dtype).unsqueeze(1)
    n_train = spec.data.train
    x_train, y_train = inputs[:n_train], targets[:n_train]
    y_test = targets[n_train:]
    probe_x = x_train[record.probe_indices(spec)]

    optimizer = torch.optim.SGD(params, lr=spec.train.lr, momentum=spec.train.momentum, foreach=False)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(spec.train.lr_milestones), gamma=spec.train.lr_gamma)
    rec = Recorder(spec, model, config)
    layout = rec.layout
    param_names = [name for name, _ in layout.params]
    param_sizes = [math.prod(shape) for _, shape in layout.params]
    buffer_names = [name for name, _ in layout.buffers]
    buffer_sizes = [math.prod(shape) for _, shape in layout.buffers]
    grad_keys = [f"{name}.grad" for name in param_names]
    momentum_keys = [f"{name}.momentum_buffer" for name in param_names]
    epoch_keys = [t.key for t in layout.epoch_tensors]
    trace = set(config.trace_epochs) | {0}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mixed else None
    batches = torch.from_numpy(frozen.batches.astype(np.int64))
    bs = spec.train.batch_size

    def end_of_epoch(row: int, epoch: int, last_grads: list[torch.Tensor | None],
                     step_losses: torch.Tensor | None) -> None:
        model.eval()
        with torch.no_grad():
            if autocast is not None:
                with autocast():
                    outs = forward_layers(modules, inputs)
            else:
                outs = forward_layers(modules, inputs)
            pred = outs[-1][1].to(dtype)
            train_loss = F.mse_loss(pred[:n_train], y_train)
            test_loss = F.mse_loss(pred[n_train:], y_test)
        model.train()
        rec.params[row] = to_storage(flatten(params))
        if buffers:
            rec.buffers[row] = to_storage(flatten(buffers))
        rec.train_loss[row] = train = float(train_loss)
        rec.test_loss[row] = test = float(test_loss)
        losses = torch.stack([train_loss, test_loss])
        # Parameters and buffers are digested from their stored copies (the same bytes);
        # the other tensors in one pass over a concatenation.
        digests = dict(zip(param_names, digest_slices(rec.params[row], param_sizes)))
        digests.update(zip(buffer_names, digest_slices(rec.buffers[row], buffer_sizes)))
        others: dict[str, torch.Tensor | None] = {"loss.steps": step_losses, "eval.loss": losses}
        others.update(zip(grad_keys, last_grads))
        others.update(zip(momentum_keys, (optimizer.state.get(p, {}).get("momentum_buffer") for p in params)))
        others.update((f"eval.{name}", out) for name, out in outs if not name.startswith("relu"))
        digests.update(zip(others, digest_all(list(others.values()))))
        rec.epoch_digests[row] = [digests[key] for key in epoch_keys]
        if row in rec.probe_rows:
            with torch.no_grad():
                if autocast is not None:
                    with autocast():
                        probe = probe_forward(model, probe_x)
                else:
                    probe = probe_forward(model, probe_x)
            rec.probe.append(to_storage(flatten([t.to(dtype) for t in probe])))
        for observer in observers:
            if observer.wants(row):
                observer.observe(row, model, probe_x)
        if rec.nonfinite is None and not (math.isfinite(train) and math.isfinite(test) and np.isfinite(
                bits.to_float64(rec.params[row], config.controls.storage)).all()):
            rec.first_nonfinite(f"epoch-end {epoch}", [
                ("update", layer, name, p) for (name, layer), p in zip(layout.param_layers, params)] + [
                ("eval", "loss", "eval.loss", losses)], epoch, None)

    end_of_epoch(0, -1, [None] * len(params), None)
    started = time.perf_counter()
    for epoch in range(config.epochs):
        detailed = epoch in trace
        step_losses = []
        bn_inputs: list[torch.Tensor] = []
        order = batches[epoch]
        for step in range(spec.steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            xb, yb = x_train[idx], y_train[idx]
            optimizer.zero_grad(set_to_none=True)
            if autocast is not None:
                with autocast():
                    outs = forward_layers(modules, xb)
            else:
                outs = forward_layers(modules, xb)
            loss = F.mse_loss(outs[-1][1].to(dtype), yb)
            loss.backward()
            optimizer.step()
            step_losses.append(loss.detach())
            bn_inputs.extend(outs[i - 1][1].detach() for i in bn_index)
            if detailed:
                named: dict[str, torch.Tensor | None] = {
                    f"{name}.out": out for name, out in outs if not name.startswith("relu")}
                named["loss"] = loss
                for (name, p) in model.named_parameters():
                    named[name] = p
                    named[f"{name}.grad"] = p.grad
                    named[f"{name}.momentum_buffer"] = optimizer.state[p]["momentum_buffer"]
                for name, b in model.named_buffers():
                    if b.dim() > 0:
                        named[name] = b
                rec.step_rows.append((epoch, step))
                rec.step_digests.append(digest_all([named[t.key] for t in layout.step_tensors]))
                rec.first_nonfinite(f"epoch {epoch} step {step}",
                                    [(t.phase, t.layer, t.key, v) for t in layout.step_tensors
                                     if (v := named[t.key]) is not None], epoch, step)
        scheduler.step()
        losses_now = torch.stack(step_losses)
        rec.step_loss[epoch] = losses_now.double().numpy()
        if bn_index:
            # Smallest per-unit batch variance of each BN input over the epoch's steps
            # (biased, as BN normalises with it), in float64 from the run's values, in one
            # reduction per epoch (torch's var is ~10x slower than this at these sizes).
            x = torch.stack(bn_inputs).double()                    # (steps * n_bn, batch, units)
            centred = x - x.mean(1, keepdim=True)
            var = (centred * centred).mean(1).view(spec.steps_per_epoch, len(bn_index), -1)
            rec.min_var[epoch + 1] = var.amin((0, 2)).numpy() / spec.model.bn_eps
        end_of_epoch(epoch + 1, epoch, [p.grad for p in params], losses_now)
        if progress is not None:
            progress(epoch + 1, config.epochs, rec.train_loss[epoch + 1], rec.test_loss[epoch + 1])
    elapsed = time.perf_counter() - started

    return record.RunResult(
        params=rec.params,
        buffers=rec.buffers,
        train_loss=rec.train_loss,
        test_loss=rec.test_loss,
        step_loss=rec.step_loss,
        min_var_over_eps=rec.min_var,
        epoch_digests=rec.epoch_digests,
        step_rows=np.array(rec.step_rows, dtype=np.int64).reshape(-1, 2),
        step_digests=np.stack(rec.step_digests) if rec.step_digests
        else np.zeros((0, len(layout.step_tensors)), np.uint64),
        probe_rows=np.array(rec.probe_rows, dtype=np.int64),
        probe=np.stack(rec.probe),
        nonfinite=rec.nonfinite,
        train_seconds=elapsed,
    )
