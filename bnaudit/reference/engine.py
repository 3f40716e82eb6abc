"""The experiment in exact-as-you-like arithmetic: scalar mpmath, formula by formula.

This is the BN noisy-feature experiment of ``bnaudit run`` with every real number an
mpmath ``mpf`` on a private context (``mpmath.MPContext()``; the global ``mp`` is never
touched).  The code is written like micrograd: one scalar formula per line, each
forward quantity beside its derivative, torch's names (``weight``, ``bias``, ``eps``,
``momentum``, ``running_mean``, ``running_var``).  It does what torch does, not what a
textbook says:

* inputs, targets and the initial state are the frozen float64 values, read as exact
  rationals (``ctx.mpf(float)`` is exact);
* Linear: ``out = x @ weight.T + bias``;
* BatchNorm1d in training mode normalises with the batch mean and the *biased* batch
  variance, and updates ``running_var`` with the *unbiased* one (times n/(n-1));
  ``running = (1 - momentum) * running + momentum * batch_stat``; eval mode uses the
  running statistics;
* ReLU: derivative 0 at 0 (torch's ``threshold_backward`` passes the gradient only
  where the input is > 0);
* MSE: mean over the batch of (pred - y)^2;
* SGD with momentum, torch's formulation: the first step sets ``buf = grad``, later
  steps ``buf = momentum * buf + grad`` (dampening 0), then ``p = p - lr * buf``; the
  learning rate of an epoch is ``spec.lr_at(epoch)`` (MultiStepLR).

Error argument.  Every operation below rounds once to ``prec`` bits (relative error at
most 2^-prec); dot products and sums go through ``_dot``/``_sum``, which add the exact
products and round once.  (They do so in Python integers: a vector of mpf is written
exactly as integers at its smallest exponent (``_fixed``), so that a dot product is one
C-level sum of integer products and one rounding.  On converted vectors that is 4.5
times as fast as mpmath's ``mpf_sum`` of exact ``mpf_mul`` products, with the same bits;
a Linear layer converts each weight row once per step and each input row once, and
reuses them for the whole batch.)  One training step is a few hundred operations deep,
so one step loses at most ~10 bits to rounding; what costs precision is the chaos of
training, which amplifies any perturbation (the default spec: by about e^1.15 per epoch over
its first 7 epochs, ``sensitivity.py``).  That growth is not estimated here but measured:
the build (``build.py``) runs the trajectory at two precisions and stores only what they
agree on.

No torch and no numpy in the arithmetic: numpy is only touched to read the frozen
arrays (converted element by element to exact ``mpf``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import mpmath
from mpmath.libmp import from_man_exp

from bnaudit.spec import ExperimentSpec

Vector = list[Any]
"""A list of mpf (a bias, a BN parameter, one sample's activations)."""
Matrix = list[list[Any]]
"""A list of rows of mpf: a Linear weight (out x in), or a batch (samples x units)."""


def new_context(prec: int) -> mpmath.MPContext:
    """A private mpmath context at ``prec`` bits (never the global ``mp``)."""
    ctx = mpmath.MPContext()
    ctx.prec = prec
    return ctx


# --------------------------------------------------------------------------- exact sums

Fixed = tuple[list[Any], int]
"""A vector as integers at one common exponent: v[k] = ints[k] * 2^exp, exactly."""


def _fixed(v: Sequence[Any]) -> Fixed:
    """The exact integer form of a vector of finite mpf (the smallest exponent of its non-zeros)."""
    parts = [x._mpf_ for x in v]
    exp = min((p[2] for p in parts if p[1]), default=0)
    return [(-man if sign else man) << (e - exp) if man else 0 for sign, man, e, _ in parts], exp


def _fixed_floats(v: Sequence[float]) -> Fixed:
    """The exact integer form of a vector of finite Python floats (each is n / 2^k exactly)."""
    ratios = [x.as_integer_ratio() for x in v]
    big = max((d for _, d in ratios), default=1)                    # the largest 2^k
    return [n * (big // d) for n, d in ratios], 1 - big.bit_length()


def _dot_fixed(ctx: mpmath.MPContext, a: Fixed, b: Fixed) -> Any:
    """sum a_k b_k over two exact integer vectors: products and sum exact, rounded once to ctx.prec."""
    prec, rnd = ctx._prec_rounding
    return ctx.make_mpf(from_man_exp(sum(map(operator.mul, a[0], b[0])), a[1] + b[1], prec, rnd))


def _sum_fixed(ctx: mpmath.MPContext, a: Fixed) -> Any:
    """sum a_k, exact, rounded once to ctx.prec."""
    prec, rnd = ctx._prec_rounding
    return ctx.make_mpf(from_man_exp(sum(a[0]), a[1], prec, rnd))


def _dot(ctx: mpmath.MPContext, a: Sequence[Any], b: Sequence[Any]) -> Any:
    """sum a_k b_k, products exact, rounded once to ctx.prec (what ``ctx.fdot`` computes, faster)."""
    return _dot_fixed(ctx, _fixed(a), _fixed(b))


def _sum(ctx: mpmath.MPContext, a: Sequence[Any]) -> Any:
    """sum a_k exactly, rounded once (``ctx.fsum`` for mpf inputs)."""
    return _sum_fixed(ctx, _fixed(a))


# --------------------------------------------------------------------------- the layers

@dataclasses.dataclass
class Linear:
    """nn.Linear: out[n][o] = sum_i weight[o][i] * x[n][i] + bias[o]."""

    name: str
    weight: Matrix
    bias: Vector

    def forward(self, ctx: mpmath.MPContext, x: Matrix) -> tuple[Matrix, Any]:
        one = ctx.one
        # bias folded into the dot product: one rounding per output, not two.
        rows = [_fixed([*w, b]) for w, b in zip(self.weight, self.bias)]
        out = []
        for xn in x:
            xe = _fixed([*xn, one])
            out.append([_dot_fixed(ctx, w, xe) for w in rows])
        return out, x

    def backward(self, ctx: mpmath.MPContext, x: Matrix, grad_out: Matrix,
                 need_input_grad: bool) -> tuple[Matrix | None, dict[str, Any]]:
        n_out, n_in = len(self.weight), len(self.weight[0])
        g_cols = [_fixed([g[o] for g in grad_out]) for o in range(n_out)]      # dL/dout, per output unit
        x_cols = [_fixed([xn[i] for xn in x]) for i in range(n_in)]
        grad_weight = [[_dot_fixed(ctx, g_cols[o], x_cols[i]) for i in range(n_in)] for o in range(n_out)]
        grad_bias = [_sum_fixed(ctx, g_cols[o]) for o in range(n_out)]
        grad_in = None
        if need_input_grad:
            w_cols = [_fixed([self.weight[o][i] for o in range(n_out)]) for i in range(n_in)]
            grad_in = [[_dot_fixed(ctx, g, w_col) for w_col in w_cols] for g in map(_fixed, grad_out)]
        return grad_in, {"weight": grad_weight, "bias": grad_bias}

    def eval(self, ctx: mpmath.MPContext, x: Matrix) -> Matrix:
        return self.forward(ctx, x)[0]

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight, "bias": self.bias}


@dataclasses.dataclass
class BatchNorm1d:
    """nn.BatchNorm1d (affine, tracking running statistics), per unit j over the batch."""

    name: str
    weight: Vector
    bias: Vector
    running_mean: Vector
    running_var: Vector
    eps: Any
    momentum: Any

    def forward(self, ctx: mpmath.MPContext, x: Matrix, *, update_running: bool = True) -> tuple[Matrix, Any]:
        n = len(x)
        units = len(self.weight)
        unbias = ctx.mpf(n) / (n - 1)             # torch: running_var uses var * n / (n - 1)
        out_cols, cache = [], []
        for j in range(units):
            xj = [xn[j] for xn in x]
            mean = _sum(ctx, xj) / n
            centred = [v - mean for v in xj]
            exact_centred = _fixed(centred)
            var = _dot_fixed(ctx, exact_centred, exact_centred) / n     # biased: normalisation uses it
            invstd = 1 / ctx.sqrt(var + self.eps)
            xhat = [c * invstd for c in centred]
            w, b = self.weight[j], self.bias[j]
            out_cols.append([w * h + b for h in xhat])
            cache.append((xhat, invstd))
            if update_running:
                # torch: running = (1 - momentum) * running + momentum * batch_stat
                self.running_mean[j] = (1 - self.momentum) * self.running_mean[j] + self.momentum * mean
                self.running_var[j] = (1 - self.momentum) * self.running_var[j] + self.momentum * (var * unbias)
        out = [[col[i] for col in out_cols] for i in range(n)]
        return out, cache

    def backward(self, ctx: mpmath.MPContext, cache: Any, grad_out: Matrix,
                 need_input_grad: bool) -> tuple[Matrix | None, dict[str, Any]]:
        n = len(grad_out)
        grad_weight, grad_bias, grad_cols = [], [], []
        for j, (xhat, invstd) in enumerate(cache):
            g = [gn[j] for gn in grad_out]
            exact_g = _fixed(g)
            sum_g = _sum_fixed(ctx, exact_g)
            sum_g_xhat = _dot_fixed(ctx, exact_g, _fixed(xhat))
            grad_weight.append(sum_g_xhat)                       # d out / d weight = xhat
            grad_bias.append(sum_g)                              # d out / d bias = 1
            # d xhat: dx_i = weight * invstd / n * (n g_i - sum g - xhat_i sum g xhat)
            # (mean and biased variance both depend on every x_i of the batch).
            scale = self.weight[j] * invstd / n
            grad_cols.append([scale * (n * gi - sum_g - h * sum_g_xhat) for gi, h in zip(g, xhat)])
        grad_in = [[col[i] for col in grad_cols] for i in range(n)] if need_input_grad else None
        return grad_in, {"weight": grad_weight, "bias": grad_bias}

    def eval(self, ctx: mpmath.MPContext, x: Matrix) -> Matrix:
        """Eval mode: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias; nothing updated."""
        invstd = [1 / ctx.sqrt(rv + self.eps) for rv in self.running_var]
        return [[(v - rm) * s * w + b
                 for v, rm, s, w, b in zip(xn, self.running_mean, invstd, self.weight, self.bias)]
                for xn in x]

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight, "bias": self.bias}


@dataclasses.dataclass
class ReLU:
    """nn.ReLU: max(x, 0); derivative 1 where x > 0, else 0 (0 at 0, as torch)."""

    name: str

    def forward(self, ctx: mpmath.MPContext, x: Matrix) -> tuple[Matrix, Any]:
        zero = ctx.zero
        return [[v if v > 0 else zero for v in xn] for xn in x], x

    def backward(self, ctx: mpmath.MPContext, x: Matrix, grad_out: Matrix,
                 need_input_grad: bool) -> tuple[Matrix | None, dict[str, Any]]:
        zero = ctx.zero
        return [[g if v > 0 else zero for g, v in zip(gn, xn)] for gn, xn in zip(grad_out, x)], {}

    def eval(self, ctx: mpmath.MPContext, x: Matrix) -> Matrix:
        return self.forward(ctx, x)[0]

    def params(self) -> dict[str, Any]:
        return {}


Layer = Linear | BatchNorm1d | ReLU


# --------------------------------------------------------------------------- the network

def mse(ctx: mpmath.MPContext, pred: Vector, y: Vector) -> tuple[Any, Vector]:
    """MSE (mean over the batch) and its gradient 2 (pred - y) / n."""
    n = len(pred)
    diff = [p - t for p, t in zip(pred, y)]
    exact_diff = _fixed(diff)
    loss = _dot_fixed(ctx, exact_diff, exact_diff) / n
    return loss, [2 * d / n for d in diff]


class Network:
    """The spec's network on one mpmath context, with its SGD state.

    The state is exactly torch's: parameters, BN running statistics and the SGD
    momentum buffers (None until the first step).  ``train_epoch`` runs one epoch of
    the frozen batch order; ``probe`` and ``eval_losses`` only read the state.
    """

    def __init__(self, spec: ExperimentSpec, ctx: mpmath.MPContext, init: Any, inputs: Any, targets: Any) -> None:
        self.spec, self.ctx = spec, ctx
        mpf = ctx.mpf
        self.eps = mpf(spec.model.bn_eps)
        self.bn_momentum = mpf(spec.model.bn_momentum)
        self.momentum = mpf(spec.train.momentum)
        self.inputs: Matrix = [[mpf(float(v)) for v in row] for row in inputs]
        self.targets: Vector = [mpf(float(v)) for v in targets]
        self.layers: list[Layer] = []
        shapes = {name: (fan_in, fan_out) for name, _, fan_in, fan_out in spec.layers()}
        flat = [mpf(float(v)) for v in init]  # init: the frozen float64 array (or any sequence of floats)
        offset = 0

        def take(count: int) -> Vector:
            nonlocal offset
            out = flat[offset: offset + count]
            offset += count
            return out

        for name, kind in spec.modules():
            if kind == "linear":
                fan_in, fan_out = shapes[name]
                w = take(fan_in * fan_out)
                self.layers.append(Linear(name, [w[o * fan_in:(o + 1) * fan_in] for o in range(fan_out)],
                                          take(fan_out)))
            elif kind == "bn":
                units = shapes[name][1]
                self.layers.append(BatchNorm1d(name, take(units), take(units), [], [], self.eps, self.bn_momentum))
            else:
                self.layers.append(ReLU(name))
        for layer in self.layers:                       # buffers follow all parameters in the frozen init
            if isinstance(layer, BatchNorm1d):
                layer.running_mean = take(len(layer.weight))
                layer.running_var = take(len(layer.weight))
        if offset != len(flat):
            raise ValueError(f"initial state has {len(flat)} values, the spec needs {offset}")
        self.momentum_buffer: dict[str, Any] | None = None
        self.steps = 0

    # ----------------------------------------------------------------- state access

    def parameters(self) -> list[tuple[str, Any]]:
        """(state_dict name, value) in spec.parameters() order; weights as row lists."""
        return [(f"{layer.name}.{k}", v) for layer in self.layers for k, v in layer.params().items()]

    def flat_parameters(self) -> Vector:
        return [v for _, value in self.parameters() for v in _flatten(value)]

    def flat_buffers(self) -> Vector:
        out: Vector = []
        for layer in self.layers:
            if isinstance(layer, BatchNorm1d):
                out += layer.running_mean + layer.running_var
        return out

    def flat_momentum(self) -> Vector | None:
        if self.momentum_buffer is None:
            return None
        return [v for name, _ in self.parameters() for v in _flatten(self.momentum_buffer[name])]

    def flat_state(self) -> Vector:
        """Parameters, buffers, momentum buffers: everything the next epoch depends on."""
        return self.flat_parameters() + self.flat_buffers() + (self.flat_momentum() or [])

    def load_flat_state(self, values: Sequence[Any], steps: int) -> None:
        """Inverse of ``flat_state`` (resuming a build)."""
        values = list(values)
        n_p, n_b = len(self.flat_parameters()), len(self.flat_buffers())
        if len(values) not in (n_p + n_b, 2 * n_p + n_b):
            raise ValueError(f"state has {len(values)} values, expected {n_p + n_b} or {2 * n_p + n_b}")
        params, buffers, momentum = values[:n_p], values[n_p:n_p + n_b], values[n_p + n_b:]
        offset = 0
        for layer in self.layers:
            for key, value in layer.params().items():
                size = len(_flatten(value))
                setattr(layer, key, _shape_like(value, params[offset:offset + size]))
                offset += size
        offset = 0
        for layer in self.layers:
            if isinstance(layer, BatchNorm1d):
                units = len(layer.weight)
                layer.running_mean = list(buffers[offset:offset + units])
                layer.running_var = list(buffers[offset + units:offset + 2 * units])
                offset += 2 * units
        if momentum:
            self.momentum_buffer, offset = {}, 0
            for name, value in self.parameters():
                size = len(_flatten(value))
                self.momentum_buffer[name] = _shape_like(value, momentum[offset:offset + size])
                offset += size
        else:
            self.momentum_buffer = None
        self.steps = steps

    # ----------------------------------------------------------------- training

    def forward(self, x: Matrix) -> tuple[list[Matrix], list[Any]]:
        """Train-mode forward (updates BN running statistics); every module's output and cache."""
        outs, caches = [], []
        h = x
        for layer in self.layers:
            h, cache = layer.forward(self.ctx, h)
            outs.append(h)
            caches.append(cache)
        return outs, caches

    def gradients(self, x: Matrix, y: Vector) -> tuple[Any, dict[str, Any], list[Matrix]]:
        """One train-mode forward and backward: (loss, grads by state_dict name, module outputs)."""
        ctx = self.ctx
        outs, caches = self.forward(x)
        pred = [row[0] for row in outs[-1]]
        loss, grad_pred = mse(ctx, pred, y)
        grad: Matrix = [[g] for g in grad_pred]
        grads: dict[str, Any] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            grad_in, pgrads = layer.backward(ctx, caches[i], grad, need_input_grad=i > 0)
            for key, value in pgrads.items():
                grads[f"{layer.name}.{key}"] = value
            if grad_in is not None:
                grad = grad_in
        return loss, grads, outs

    def sgd_step(self, grads: dict[str, Any], lr: Any) -> None:
        """torch.optim.SGD(momentum, dampening=0, nesterov=False, weight_decay=0).step()."""
        m = self.momentum
        first = self.momentum_buffer is None
        if first:
            self.momentum_buffer = {}
        assert self.momentum_buffer is not None
        for layer in self.layers:
            for key, value in layer.params().items():
                name = f"{layer.name}.{key}"
                g = grads[name]
                if first:
                    buf = _map(lambda gi: gi, g)                          # buf = grad.clone()
                else:
                    buf = _map2(lambda b, gi: m * b + gi, self.momentum_buffer[name], g)
                self.momentum_buffer[name] = buf
                setattr(layer, key, _map2(lambda p, b: p - lr * b, value, buf))

    def train_epoch(self, epoch: int, order: Sequence[int]) -> list[Any]:
        """One epoch over ``order`` (frozen.batches[epoch]); the loss of every step."""
        bs = self.spec.train.batch_size
        lr = self.ctx.mpf(self.spec.lr_at(epoch))
        losses = []
        for s in range(len(order) // bs):
            idx = [int(i) for i in order[s * bs:(s + 1) * bs]]
            loss, grads, _ = self.gradients([self.inputs[i] for i in idx], [self.targets[i] for i in idx])
            self.sgd_step(grads, lr)
            self.steps += 1
            losses.append(loss)
        return losses

    # ----------------------------------------------------------------- read-only views

    def probe(self, x: Matrix) -> list[Matrix]:
        """Train-mode forward with the batch's own statistics, running statistics untouched."""
        outs, h = [], x
        for layer in self.layers:
            if isinstance(layer, BatchNorm1d):
                h, _ = layer.forward(self.ctx, h, update_running=False)
            else:
                h, _ = layer.forward(self.ctx, h)
            outs.append(h)
        return outs

    def eval_outputs(self, x: Matrix) -> Vector:
        """Eval-mode predictions (BN normalises with the running statistics)."""
        h = x
        for layer in self.layers:
            h = layer.eval(self.ctx, h)
        return [row[0] for row in h]

    def eval_losses(self) -> tuple[Any, Any]:
        """Eval-mode MSE on the training and test samples (as the run's epoch rows)."""
        pred = self.eval_outputs(self.inputs)
        n = self.spec.data.train
        train, _ = mse(self.ctx, pred[:n], self.targets[:n])
        test, _ = mse(self.ctx, pred[n:], self.targets[n:])
        return train, test


# --------------------------------------------------------------------------- helpers

def _flatten(value: Any) -> list[Any]:
    if value and isinstance(value[0], list):
        return [v for row in value for v in row]
    return list(value)


def _shape_like(template: Any, flat: Sequence[Any]) -> Any:
    if template and isinstance(template[0], list):
        width = len(template[0])
        return [list(flat[r * width:(r + 1) * width]) for r in range(len(template))]
    return list(flat)


def _map(fn: Any, value: Any) -> Any:
    if value and isinstance(value[0], list):
        return [[fn(v) for v in row] for row in value]
    return [fn(v) for v in value]


def _map2(fn: Any, a: Any, b: Any) -> Any:
    if a and isinstance(a[0], list):
        return [[fn(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
    return [fn(x, y) for x, y in zip(a, b)]


# --------------------------------------------------------------------------- exact text and pairs

def to_exact(value: Any) -> str:
    """An mpf as exact text "[-]mantissa_hex:exponent" (value = +-mantissa * 2^exponent)."""
    sign, man, exp, _ = value._mpf_
    if not man and exp:
        raise ValueError(f"{value} has no exact mantissa/exponent form")
    return f"{'-' if sign else ''}{int(man):x}:{exp}"


def from_exact(ctx: mpmath.MPContext, text: str) -> Any:
    """Inverse of ``to_exact``, exact (mantissas never exceed the precision they were written at)."""
    man, exp = text.split(":")
    return ctx.make_mpf(from_man_exp(int(man, 16), int(exp)))


def double_double(value: Any) -> tuple[float, float]:
    """(hi, lo): hi = value rounded to nearest float64, lo = (value - hi) rounded to nearest.

    hi + lo carries about 106 bits of the value (more when lo's exponent allows); it
    is what the stored reference keeps.
    """
    hi = float(value)
    lo = float(value - hi)  # value - hi is exact at any prec >= 53 + the exponent gap; then rounded once
    return hi, lo
