"""The operator audit: each layer's forward recomputed in mpmath from the run's own values.

The reference (``bnaudit.reference``) says how far a run has drifted from exact
training; most of that drift is chaos amplifying old rounding errors.  The audit
separates the two: at every ``audit_every``-th epoch row it takes the run's own
parameters and the probe batch (the first batch_size training samples), runs the
train-mode forward of the probe batch in torch, and recomputes every operator from
*the same inputs the run's operator saw* (the run's own activations, weights and
biases, as exact rationals) in mpmath.  The difference is the operator's local
rounding error, reported in ulps of the run's dtype at the exact value:

* ``linear.out``: the Linear output x @ weight.T + bias;
* ``bn.mean``: the kernel's own batch mean (``save_mean`` of
  ``torch.native_batch_norm`` in training mode, running statistics not passed, so
  nothing is updated);
* ``bn.var``: the batch variance (biased, as BN normalises with it) from
  ``torch.var_mean`` on the BN input: the kernel does not return its variance;
* ``bn.invstd``: the kernel's own 1/sqrt(var + eps) (``save_invstd``);
* ``bn.out``: the BN output.

Rounding theory for float32: a correctly rounded result is within 0.5 ulp; a dot
product of length n with one rounding per addition within about n/2 ulp in the worst
case, typically a few ulps.  BN units whose batch variance is within a factor 100 of
eps, or whose |mean|/std is large, are flagged with their amplification
max_n |x_n| / sqrt(var + eps): the factor by which a relative rounding error of the
inputs becomes an absolute error of the normalised output (the seed's "division by
sigma" caution, measured).

The mpmath work runs at 128 bits: each exact quantity is a sum of at most 17 exact
products rounded once (relative error 2^-128), then one division or square root;
its error is ~2^-125 relative, 2^-72 of a float64 ulp, so the reported ulp errors are
exact to far more digits than printed.  The Linear sums take the run's floats straight
to exact integer vectors (``engine._fixed_floats``), the same values as through mpf.
Cost: ~11k multiply-adds per audited row (default spec), about 19 ms here, measured in
``result()["seconds"]``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from bnaudit import promote
from bnaudit.blocks import AUDIT_SCHEMA
from bnaudit.controls import RunConfig
from bnaudit.reference import engine
from bnaudit.spec import ExperimentSpec

AUDIT_PRECISION = 128
OPS = ("linear.out", "bn.mean", "bn.var", "bn.invstd", "bn.out")
VAR_OVER_EPS_FLAG = 100.0
MEAN_OVER_STD_FLAG = 100.0
MAX_FLAGS = 200

_FORMATS = {torch.float32: (24, -125), torch.float64: (53, -1021), torch.bfloat16: (8, -125)}
_STORAGE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16"}


def _ulp(exact: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """ulp of the dtype at each exact value (given as float64): 2^(max(e, emin) - p)."""
    p, emin = _FORMATS[dtype]
    _, e = np.frexp(np.abs(exact))
    e = np.where(exact == 0, emin, np.maximum(e, emin))
    return np.ldexp(1.0, e - p)


def _values(t: torch.Tensor) -> list[float]:
    """A tensor's values as Python floats (exact: float32 and bfloat16 embed in float64)."""
    return t.detach().to(torch.float64).reshape(-1).tolist()


def _rows(t: torch.Tensor) -> list[list[float]]:
    """A matrix's rows as Python floats (exact)."""
    return t.detach().to(torch.float64).tolist()


class OperatorAudit:
    """An ``Observer`` of the runner: the local error of each operator, every N epoch rows."""

    name = "operator_audit"

    def __init__(self, spec: ExperimentSpec, config: RunConfig, *, precision: int = AUDIT_PRECISION) -> None:
        self.spec = spec
        self.every = config.audit_every
        self.run_dtype = config.controls.dtype
        self.ctx = engine.new_context(precision)
        self.eps = self.ctx.mpf(spec.model.bn_eps)
        self.rows: list[int] = []
        self.errors: dict[str, dict[str, list[float]]] = {}
        self.errors_at_value: dict[str, dict[str, list[float]]] = {}
        self.flags: list[dict[str, Any]] = []
        self.n_flags = 0
        self.max_amplification: dict[str, list[float]] = {}
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.skipped: str | None = None
        if self.run_dtype == "bf16-mixed":
            self.skipped = "bf16-mixed runs are not audited (autocast casts are not replayed)"

    def wants(self, row: int) -> bool:
        return self.every > 0 and self.skipped is None and row % self.every == 0

    # ----------------------------------------------------------------- measuring

    def _errors(self, run: list[float], exact: list[Any], scale: Any, dtype: torch.dtype) -> tuple[float, float]:
        """(max |run - exact| / ulp(scale), max |run - exact| / ulp(exact)) in ``dtype``.

        ``scale`` is the magnitude rounding theory multiplies the unit roundoff by (the
        sum of |terms| of a dot product, say): an error of a few ulps of the scale is an
        accurately computed result, however much the exact value cancelled.
        """
        ctx = self.ctx
        diff = np.array([float(abs(ctx.mpf(r) - e)) for r, e in zip(run, exact)])
        at_scale = diff / _ulp(np.asarray(scale, dtype=np.float64), dtype)
        at_value = diff / _ulp(np.array([float(e) for e in exact]), dtype)
        return float(at_scale.max()), float(at_value.max())

    def _record(self, layer: str, op: str, measured: tuple[float, float]) -> None:
        self.errors.setdefault(layer, {}).setdefault(op, []).append(round(measured[0], 3))
        self.errors_at_value.setdefault(layer, {}).setdefault(op, []).append(float(f"{measured[1]:.4g}"))

    # ----------------------------------------------------------------- the observer

    def observe(self, row: int, model: nn.Sequential, probe_x: torch.Tensor) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        self.rows.append(row)
        with torch.no_grad():
            h = probe_x
            for name, module in model.named_children():
                if isinstance(module, nn.Linear):
                    out = module(h)
                    self._observe_linear(name, module, h, out)
                    h = out
                elif isinstance(module, nn.BatchNorm1d):
                    h = self._observe_bn(row, name, module, h)
                else:
                    h = module(h)
        self.seconds += time.perf_counter() - started
        self.cpu_seconds += time.process_time() - cpu_started

    def _observe_linear(self, name: str, module: nn.Linear, h: torch.Tensor, out: torch.Tensor) -> None:
        """out[n][o] = sum_i weight[o][i] x[n][i] + bias[o], exactly, from the run's own x, weight, bias."""
        ctx = self.ctx
        weight, bias, x = _rows(module.weight), _values(module.bias), _rows(h)
        rows = [engine._fixed_floats([*wr, b]) for wr, b in zip(weight, bias)]
        exact = []
        for xn in x:
            xe = engine._fixed_floats([*xn, 1.0])
            exact += [engine._dot_fixed(ctx, w, xe) for w in rows]  # exact sum of products, rounded once
        # The scale only sets the unit of the answer (3 digits suffice): float64 is plenty.
        scale = (np.abs(np.array(x)) @ np.abs(np.array(weight)).T + np.abs(np.array(bias))).reshape(-1)
        self._record(name, "linear.out", self._errors(out.to(torch.float64).reshape(-1).tolist(), exact, scale,
                                                      out.dtype))

    def _observe_bn(self, row: int, name: str, module: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        """Batch statistics and output of train-mode BN, exactly, from the run's own input."""
        ctx, mpf = self.ctx, self.ctx.mpf
        out, save_mean, save_invstd = promote.batch_forward(module, h)
        nxt = promote.probe_batch_norm(module, h)  # as runner.probe_forward
        var_run, _ = torch.var_mean(h, 0, unbiased=False)
        x = _rows(h)
        n = len(x)
        weight, bias = _values(module.weight), _values(module.bias)
        m_run, s_run, v_run = _values(save_mean), _values(save_invstd), _values(var_run)
        o_run = out.to(torch.float64).tolist()
        means, mean_scale, variances, invstds = [], [], [], []
        outs, out_scale, run_outs, amps = [], [], [], []
        for j in range(len(weight)):
            xj = [mpf(xn[j]) for xn in x]
            mean = engine._sum(ctx, xj) / n
            centred = [v - mean for v in xj]
            exact_centred = engine._fixed(centred)
            var = engine._dot_fixed(ctx, exact_centred, exact_centred) / n      # biased, as BN normalises
            invstd = 1 / ctx.sqrt(var + self.eps)
            w, b = mpf(weight[j]), mpf(bias[j])
            means.append(mean)
            mean_scale.append(sum(abs(xn[j]) for xn in x) / n)          # float64: a unit, not a value
            variances.append(var)
            invstds.append(invstd)
            unit_exact = [c * invstd * w + b for c in centred]
            f_mean, f_invstd = abs(float(mean)), float(invstd)
            unit_scale = [(abs(xn[j]) + f_mean) * f_invstd * abs(weight[j]) + abs(bias[j]) for xn in x]
            unit_run = [o_run[i][j] for i in range(n)]
            outs += unit_exact
            out_scale += unit_scale
            run_outs += unit_run
            # A relative error u of the inputs becomes an absolute error u * amplification of
            # the normalised output: the division by sigma the seed warns about.
            amplification = float(max(abs(v) for v in xj) * invstd)
            amps.append(amplification)
            var_over_eps = float(var / self.eps)
            mean_over_std = math.inf if var == 0 else float(abs(mean) / ctx.sqrt(var))
            why = []
            if var_over_eps < VAR_OVER_EPS_FLAG:
                why.append(f"variance {var_over_eps:.3g} eps < {VAR_OVER_EPS_FLAG:g} eps")
            if mean_over_std > MEAN_OVER_STD_FLAG:
                why.append(f"|mean|/std {mean_over_std:.3g} > {MEAN_OVER_STD_FLAG:g}")
            if why:
                self.n_flags += 1
                if len(self.flags) < MAX_FLAGS:
                    at_scale, at_value = self._errors(unit_run, unit_exact, unit_scale, out.dtype)
                    self.flags.append({
                        "row": row, "layer": name, "unit": j, "var_over_eps": float(f"{var_over_eps:.4g}"),
                        "mean_over_std": float(f"{mean_over_std:.4g}") if math.isfinite(mean_over_std) else None,
                        "amplification": float(f"{amplification:.4g}"), "why": why,
                        "out_ulps": round(at_scale, 3), "out_ulps_at_value": float(f"{at_value:.4g}")})
        self._record(name, "bn.mean", self._errors(m_run, means, mean_scale, save_mean.dtype))
        self._record(name, "bn.var", self._errors(v_run, variances, [float(v) for v in variances], var_run.dtype))
        self._record(name, "bn.invstd", self._errors(s_run, invstds, [float(v) for v in invstds], save_invstd.dtype))
        self._record(name, "bn.out", self._errors(run_outs, outs, out_scale, out.dtype))
        self.max_amplification.setdefault(name, []).append(float(f"{max(amps):.4g}"))
        return nxt

    def result(self) -> dict[str, Any]:
        """The audit block (JSON-able) for record.json's ``extra["operator_audit"]``."""
        worst = {layer: {op: max(values) for op, values in ops.items()} for layer, ops in self.errors.items()}
        return {
            "schema": AUDIT_SCHEMA,
            "every": self.every,
            "storage": self.run_dtype,
            "precision": self.ctx.prec,
            "ops": list(OPS),
            "rows": self.rows,
            "errors": self.errors,
            "errors_at_value": self.errors_at_value,
            "worst": worst,
            "max_amplification": self.max_amplification,
            "flags": self.flags,
            "n_flags": self.n_flags,
            "thresholds": {"var_over_eps": VAR_OVER_EPS_FLAG, "mean_over_std": MEAN_OVER_STD_FLAG},
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "note": "errors: |run - exact| in ulps of the run's dtype at the operator's scale (sum of |terms|); "
                    "errors_at_value: in ulps at the exact value itself (large where the result cancels); "
                    "exact = the operator applied to the run's own inputs in mpmath; "
                    "bn.var from torch.var_mean (the BN kernel does not return its variance)",
        }


def observers_for(spec: ExperimentSpec, config: RunConfig) -> list[OperatorAudit]:
    """The observers a run gets: the operator audit when ``config.audit_every`` > 0."""
    if config.audit_every <= 0:
        return []
    return [OperatorAudit(spec, config)]
