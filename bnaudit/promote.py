"""Precision promotion: chosen operations of a float32 or bfloat16 run computed in float64.

``bnaudit run --promote bn,linear,loss,optimizer`` (any subset, or ``bn-stats``) asks
which operation's rounding costs the run its bits.  A promoted operation takes the
run's own values, widens them exactly to float64, computes there, and rounds each
output once, to nearest-even, back to the run's dtype:

* ``linear``: ``x @ weight.T + bias`` of every Linear layer, forward and backward (the
  gradients of x, weight and bias are each rounded once);
* ``bn``: every BatchNorm layer whole: batch statistics, normalisation, affine, running
  statistics, and their backward;
* ``bn-stats``: BatchNorm's statistics only, the quantity the seed page's caution names
  (batch mean and variance, 1/sqrt(var + eps), the running statistics), each rounded
  once; the normalisation ``(x - mean) * invstd * weight + bias`` stays in the run's
  dtype, as do its gradients up to the statistics;
* ``loss``: the MSE loss and its gradient;
* ``optimizer``: SGD's momentum and parameter update (torch's formulation: buf = m buf + g,
  p = p - lr buf), the new parameter and momentum buffer each rounded once.

Everything else (ReLU, the data, what is stored) stays as it was, so a promoted run
differs from its plain twin only where the chosen operations round.  "Rounded once"
matters for bfloat16: torch's float64 -> bfloat16 cast goes through float32 and can
round twice; ``round_once`` goes through float32 by round-to-odd, which is exact.
``bf16-mixed`` is refused: autocast already picks each operation's precision.

Like ``runner``, this module imports torch and runs only in a run's own process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded once, to nearest-even, in ``dtype`` (float32 or bfloat16)."""
    if dtype == torch.float64:
        return x
    f = x.to(torch.float32)                        # one rounding, to nearest-even
    if dtype == torch.float32:
        return f
    # float32 by round-to-odd (truncate, then set the last bit when inexact), then one
    # nearest-even rounding to bfloat16: correct, as float32 keeps 16 more bits than it.
    back = f.to(torch.float64)
    inexact = back != x
    pattern = f.view(torch.int32)
    pattern = torch.where(inexact & (back.abs() > x.abs()), pattern - 1, pattern)  # towards zero
    pattern = torch.where(inexact, pattern | 1, pattern)
    return pattern.view(torch.float32).to(torch.bfloat16)


class _Up(torch.autograd.Function):
    """Widen to float64 (exact); the gradient going back is rounded once to the input's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return x.to(torch.float64)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return round_once(grad, ctx.dtype)


class _Down(torch.autograd.Function):
    """Round once from float64 to ``dtype``; the gradient coming in is widened exactly."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return round_once(x, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(torch.float64), None


def up(x: torch.Tensor) -> torch.Tensor:
    return _Up.apply(x)


def down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _Down.apply(x, dtype)


# --------------------------------------------------------------------------- the operations

class PromotedLinear(nn.Linear):
    """A Linear layer computed in float64, its output rounded once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return down(F.linear(up(x), up(self.weight), up(self.bias)), x.dtype)


class PromotedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with its statistics (``stats_only``) or all of it computed in float64."""

    def __init__(self, num_features: int, *, eps: float, momentum: float, stats_only: bool) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.stats_only = stats_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
        out, _, _ = self.batch_forward(x, update=self.training)
        return out

    def batch_forward(self, x: torch.Tensor, *, update: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, mean, 1/sqrt(var + eps)) in the run's dtype; batch statistics in train mode.

        ``update`` moves the running statistics (train mode only); the probe and the
        audit normalise with the batch's statistics without it.
        """
        running_mean, running_var = self.running_mean, self.running_var
        assert running_mean is not None and running_var is not None and self.momentum is not None
        dtype, m = x.dtype, float(self.momentum)
        x64 = up(x)
        if self.training:
            var64, mean64 = torch.var_mean(x64, 0, unbiased=False)
            if update:
                n = x.shape[0]
                with torch.no_grad():
                    rm = (1 - m) * running_mean.double() + m * mean64.detach()
                    rv = (1 - m) * running_var.double() + m * var64.detach() * (n / (n - 1))
                    running_mean.copy_(round_once(rm, dtype))
                    running_var.copy_(round_once(rv, dtype))
        else:
            mean64, var64 = running_mean.double(), running_var.double()
        invstd64 = torch.rsqrt(var64 + self.eps)
        if self.stats_only:
            mean, invstd = down(mean64, dtype), down(invstd64, dtype)
            return (x - mean) * invstd * self.weight + self.bias, mean.detach(), invstd.detach()
        out64 = (x64 - mean64) * invstd64 * up(self.weight) + up(self.bias)
        return (down(out64, dtype), round_once(mean64.detach(), dtype),
                round_once(invstd64.detach(), dtype))


def batch_forward(module: nn.BatchNorm1d, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train-mode BN of ``h`` with the batch's own statistics, running statistics untouched.

    (output, mean, 1/sqrt(var + eps)) as the run computes them: torch's kernel
    (``native_batch_norm``'s ``save_mean`` and ``save_invstd``), or the promoted one.
    """
    if isinstance(module, PromotedBatchNorm1d):
        return module.batch_forward(h, update=False)
    return torch.native_batch_norm(h, module.weight, module.bias, None, None, True, 0.0, module.eps)


def probe_batch_norm(module: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
    """The output of train-mode BN as the probe forward computes it: the batch's own statistics,
    running statistics untouched (``F.batch_norm`` with none passed, or the promoted layer's)."""
    if isinstance(module, PromotedBatchNorm1d):
        return module.batch_forward(h, update=False)[0]
    return F.batch_norm(h, None, None, module.weight, module.bias, True, 0.0, module.eps)


def mse_loss(pred: torch.Tensor, target: torch.Tensor, promoted: bool) -> torch.Tensor:
    """The MSE loss (mean over the batch), in float64 and rounded once when ``promoted``."""
    if not promoted:
        return F.mse_loss(pred, target)
    return down(F.mse_loss(up(pred), up(target)), pred.dtype)


class PromotedSGD(torch.optim.SGD):
    """torch's SGD with momentum (no dampening, no weight decay, not Nesterov), updated in float64.

    The state is torch's (``momentum_buffer`` in the parameter's dtype), so the run's
    trace reads it as it reads plain SGD's.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), float(group["momentum"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.double()
                delta = g
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    delta = g.clone() if buf is None else buf.double() * momentum + g
                    state["momentum_buffer"] = round_once(delta, p.dtype)
                p.copy_(round_once(p.double() - lr * delta, p.dtype))


def linear(fan_in: int, fan_out: int, promote: tuple[str, ...]) -> nn.Linear:
    """A Linear layer, promoted when ``promote`` names it."""
    return (PromotedLinear if "linear" in promote else nn.Linear)(fan_in, fan_out)


def batch_norm(units: int, eps: float, momentum: float, promote: tuple[str, ...]) -> nn.BatchNorm1d:
    """A BatchNorm1d layer, all of it (``bn``) or its statistics (``bn-stats``) promoted when asked."""
    if "bn" in promote or "bn-stats" in promote:
        return PromotedBatchNorm1d(units, eps=eps, momentum=momentum, stats_only="bn" not in promote)
    return nn.BatchNorm1d(units, eps=eps, momentum=momentum)


def sgd(params: list[nn.Parameter], *, lr: float, momentum: float, promote: tuple[str, ...]) -> torch.optim.SGD:
    """torch's SGD (one parameter at a time, as the runs always did), promoted when asked."""
    return (PromotedSGD if "optimizer" in promote else torch.optim.SGD)(
        params, lr=lr, momentum=momentum, foreach=False)
