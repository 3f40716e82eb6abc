"""The operator audit on real runs: rounding-sized local errors, and a BN unit flagged on purpose."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bnaudit import audit, controls, frozen, runner
from bnaudit.layout import probe_indices
from bnaudit.spec import default_spec


@pytest.fixture(scope="module")
def spec_and_inputs():
    spec = default_spec()
    return spec, frozen.load(spec)


def _model(spec, fz, dtype: str):
    config = controls.RunConfig(controls.Controls(dtype=dtype), epochs=1, audit_every=1)
    model = runner.build_model(spec).to(runner.TORCH_DTYPES[dtype])
    runner.load_initial_state(model, spec, fz, config)
    x = torch.from_numpy(fz.inputs[: spec.data.train]).to(runner.TORCH_DTYPES[dtype])[probe_indices(spec)]
    return model, x, config


def test_float32_run_operators_are_within_a_few_ulps(spec_and_inputs):
    spec, fz = spec_and_inputs
    torch.set_num_threads(1)
    config = controls.RunConfig(controls.Controls(dtype="float32"), epochs=10, audit_every=5)
    observers = audit.observers_for(spec, config)
    runner.run(spec, fz, config, observers=observers)
    block = observers[0].result()
    assert block["rows"] == [0, 5, 10]
    assert json.loads(json.dumps(block)) == block
    for layer, ops in block["worst"].items():
        for op, ulps in ops.items():
            # dot products of <= 17 terms and BN statistics of 10 samples: rounding theory bounds
            # these by a few ulps of their scale (the measured values are 0.5 to 4)
            assert 0 < ulps <= 8, f"{layer} {op}: {ulps} ulps"
        assert set(ops) == ({"linear.out"} if layer.startswith("linear") else
                            {"bn.mean", "bn.var", "bn.invstd", "bn.out"})
    assert block["n_flags"] == 0 and block["seconds"] > 0


def test_bfloat16_linear_is_correctly_rounded(spec_and_inputs):
    """bfloat16 Linear on CPU accumulates in float32 and rounds once: within half an ulp."""
    spec, fz = spec_and_inputs
    model, x, config = _model(spec, fz, "bfloat16")
    observer = audit.OperatorAudit(spec, config)
    observer.observe(0, model, x)
    worst = observer.result()["worst"]
    for layer, ops in worst.items():
        if layer.startswith("linear"):
            assert ops["linear.out"] <= 0.5 + 1e-9, f"{layer}: {ops['linear.out']}"


def test_tiny_variance_unit_is_flagged_with_its_amplification(spec_and_inputs):
    spec, fz = spec_and_inputs
    model, x, config = _model(spec, fz, "float32")
    with torch.no_grad():
        model.linear1.weight[3] *= 1e-4  # bn1 unit 3 now sees a nearly constant input
    running = model.bn1.running_mean.clone(), model.bn1.running_var.clone()
    observer = audit.OperatorAudit(spec, config)
    observer.observe(0, model, x)
    block = observer.result()
    flagged = [f for f in block["flags"] if f["layer"] == "bn1"]
    assert [f["unit"] for f in flagged] == [3], block["flags"]
    f = flagged[0]
    assert f["var_over_eps"] < 100 and "variance" in f["why"][0]
    # |x| / sqrt(var + eps) of the flagged unit, far above an ordinary unit's (~2 to 3 for 10 samples)
    assert f["amplification"] > 20 and f["amplification"] == block["max_amplification"]["bn1"][0], f
    # the flag is about the unit, not a failure of the kernel: the output is still accurate
    assert f["out_ulps"] <= 8
    # the audit did not touch the running statistics
    assert torch.equal(model.bn1.running_mean, running[0]) and torch.equal(model.bn1.running_var, running[1])


def test_rendering_names_the_flagged_unit(spec_and_inputs):
    from rich.console import Console

    from bnaudit.blocks import AuditBlock
    from bnaudit.report import reference_view

    spec, fz = spec_and_inputs
    model, x, config = _model(spec, fz, "float32")
    with torch.no_grad():
        model.linear1.weight[3] *= 1e-4
    observer = audit.OperatorAudit(spec, config)
    observer.observe(0, model, x)
    console = Console(record=True, width=160)
    reference_view.render_audit(AuditBlock.from_json(observer.result(), "test"), out=console)
    text = console.export_text()
    # rich wraps a title at its table's width: read the words
    assert "operator audit (float32), the initial state: worst local error in ulps" in " ".join(text.split())
    assert "bn.invstd" in text
    assert "flagged BN units (1 in all)" in text and "variance" in text


def test_large_mean_over_std_is_flagged(spec_and_inputs):
    spec, fz = spec_and_inputs
    model, x, config = _model(spec, fz, "float64")
    with torch.no_grad():
        model.linear2.weight[0] *= 1e-3
        model.linear2.bias[0] = 50.0  # bn2 unit 0: mean ~50, std ~1e-3
    observer = audit.OperatorAudit(spec, config)
    observer.observe(0, model, x)
    flags = [f for f in observer.result()["flags"] if f["layer"] == "bn2" and f["unit"] == 0]
    assert flags and any("|mean|/std" in why for why in flags[0]["why"])
    assert isinstance(flags[0]["mean_over_std"], float) and flags[0]["mean_over_std"] > 100
    out_ulps = flags[0]["out_ulps"]
    assert isinstance(out_ulps, float) and out_ulps == round(out_ulps, 3)
    assert flags[0]["amplification"] > 1000


def test_audit_off_and_bf16_mixed(spec_and_inputs):
    spec, _ = spec_and_inputs
    off = controls.RunConfig(controls.Controls(dtype="float32"), epochs=1, audit_every=0)
    assert audit.observers_for(spec, off) == []
    mixed = controls.RunConfig(controls.Controls(dtype="bf16-mixed"), epochs=1, audit_every=10)
    (observer,) = audit.observers_for(spec, mixed)
    assert not observer.wants(10) and not observer.wants(0)
    assert observer.result()["skipped"] == "bf16-mixed runs are not audited (autocast casts are not replayed)"


def test_ulp_helper_matches_numpy_spacing():
    values = np.array([1.0, 3.0, 1e-30, 2.0**-130, 123456.789])
    assert np.array_equal(audit._ulp(values, torch.float64), np.spacing(values))
    f32 = values.astype(np.float32)
    assert np.array_equal(audit._ulp(f32.astype(np.float64), torch.float32), np.spacing(f32).astype(np.float64))


# --------------------------------------------------------------------------- a known error, reported as itself
#
# A designed network whose float32 forward is exact up to BN's square root: Linear(2, 2) with the
# identity weight on inputs 1..10 and 2..20, so its output is its input, then BN, whose batch means
# (5.5, 11) and biased variances (8.25, 33) are exact too.  An error of K ulps injected into one
# operator's result must come back as K ulps: every other audit assertion is an upper bound, which
# an audit reporting 1/4 of the truth would also pass.

K = 64
EXACT_X = torch.tensor([[float(i), 2.0 * i] for i in range(1, 11)], dtype=torch.float32)


def _designed(spec):
    from collections import OrderedDict

    model = torch.nn.Sequential(OrderedDict([
        ("linear1", torch.nn.Linear(2, 2)), ("bn1", torch.nn.BatchNorm1d(2, eps=spec.model.bn_eps)),
        ("relu1", torch.nn.ReLU()), ("linear2", torch.nn.Linear(2, 1))]))
    with torch.no_grad():
        model.linear1.weight.copy_(torch.eye(2))
        model.linear1.bias.zero_()
        model.linear2.weight.copy_(torch.tensor([[0.5, -0.25]]))
        model.linear2.bias.fill_(0.125)
    config = controls.RunConfig(controls.Controls(dtype="float32"), epochs=1, audit_every=1)
    return model, audit.OperatorAudit(spec, config)


def _plus_ulps(t: torch.Tensor, k: int, index=None) -> torch.Tensor:
    """t moved by k float32 steps away from zero (every element, or one): k ulps in magnitude."""
    moved = t.detach().clone()
    flat = moved.view(-1).view(torch.int32)
    if index is None:
        flat += k
    else:
        flat[index] += k
    return moved


def test_exact_operators_are_reported_exact(spec_and_inputs):
    spec, _ = spec_and_inputs
    model, observer = _designed(spec)
    observer.observe(0, model, EXACT_X)
    block = observer.result()
    assert block["errors"]["linear1"]["linear.out"] == [0.0], "an exact Linear output has no error"
    assert block["errors_at_value"]["linear1"]["linear.out"] == [0.0]
    assert block["errors"]["bn1"]["bn.mean"] == [0.0] and block["errors"]["bn1"]["bn.var"] == [0.0]
    assert block["errors"]["bn1"]["bn.invstd"][0] <= 1.0 and block["errors"]["bn1"]["bn.out"][0] <= 4.0
    assert set(block["errors"]) == {"linear1", "bn1", "linear2"} and block["max_amplification"]["bn1"][0] > 1


def test_an_injected_linear_error_of_k_ulps_is_reported_as_k_ulps(spec_and_inputs):
    spec, _ = spec_and_inputs
    model, observer = _designed(spec)
    # element (3, 0) of linear1's output is 4 = x, with scale |4 * 1| + |8 * 0| + 0 = 4: K ulps at both
    model.linear1.register_forward_hook(lambda module, args, out: _plus_ulps(out, K, index=3 * 2 + 0))
    observer.observe(0, model, EXACT_X)
    block = observer.result()
    assert block["errors"]["linear1"]["linear.out"] == [float(K)], block["errors"]["linear1"]
    assert block["errors_at_value"]["linear1"]["linear.out"] == [float(K)], block["errors_at_value"]["linear1"]
    assert block["worst"]["linear1"]["linear.out"] == float(K)


def test_injected_bn_errors_of_k_ulps_are_reported_as_k_ulps(spec_and_inputs, monkeypatch):
    spec, _ = spec_and_inputs
    model, observer = _designed(spec)
    with torch.no_grad():
        model.bn1.weight.fill_(4.0)  # exact scaling; the output's scale carries it too
    real_bn, real_var_mean = torch.native_batch_norm, torch.var_mean

    def bn_off_by_k(*args):
        out, mean, invstd = real_bn(*args)
        return _plus_ulps(out, K), _plus_ulps(mean, K), _plus_ulps(invstd, K)

    def var_off_by_k(*args, **kwargs):
        var, mean = real_var_mean(*args, **kwargs)
        return _plus_ulps(var, K), mean

    monkeypatch.setattr(torch, "native_batch_norm", bn_off_by_k)
    monkeypatch.setattr(torch, "var_mean", var_off_by_k)
    observer.observe(0, model, EXACT_X)
    monkeypatch.undo()
    block = observer.result()
    at_scale, at_value = block["errors"]["bn1"], block["errors_at_value"]["bn1"]
    # the mean and the variance were exact: their error is the injected one, at their own scale
    assert at_scale["bn.mean"] == [float(K)] == at_value["bn.mean"], (at_scale, at_value)
    assert at_scale["bn.var"] == [float(K)] == at_value["bn.var"], (at_scale, at_value)
    # invstd and the output carry their own rounding (<= 1 and a few ulps) on top
    assert K - 1 <= at_scale["bn.invstd"][0] <= K + 1, at_scale
    assert K - 4 <= at_value["bn.out"][0] <= K + 4, at_value
    assert 4 <= at_scale["bn.out"][0] <= K + 4, at_scale  # in ulps of the larger scale: fewer, never more


def test_a_constant_unit_is_flagged_for_both_reasons_and_flags_are_capped(spec_and_inputs, monkeypatch):
    spec, _ = spec_and_inputs
    model, observer = _designed(spec)
    with torch.no_grad():
        model.linear1.weight[1] = 0.0
        model.linear1.bias[1] = 3.0  # bn1 unit 1: the constant 3, variance exactly 0
    monkeypatch.setattr(audit, "MAX_FLAGS", 3)  # (200 in a run) kept listed; the rest only counted
    for row in range(MAX := 5):
        observer.observe(row, model, EXACT_X)
    block = observer.result()
    assert block["n_flags"] == MAX and len(block["flags"]) == 3
    flag = block["flags"][0]
    assert (flag["row"], flag["layer"], flag["unit"]) == (0, "bn1", 1)
    assert flag["var_over_eps"] == 0.0 and flag["mean_over_std"] is None
    assert set(flag) == {"row", "layer", "unit", "var_over_eps", "mean_over_std", "amplification", "why", "out_ulps",
                         "out_ulps_at_value"}
    assert isinstance(flag["out_ulps"], float) and flag["out_ulps"] <= 1, "a constant unit's output is accurate"
    assert flag["out_ulps"] == round(flag["out_ulps"], 3) and isinstance(flag["out_ulps_at_value"], float)
    assert flag["why"] == ["variance 0 eps < 100 eps", "|mean|/std inf > 100"]
    assert flag["amplification"] == float(f"{3 / math.sqrt(spec.model.bn_eps):.4g}")
    assert block["rows"] == list(range(MAX))


def test_audit_block_fields(spec_and_inputs):
    spec, _ = spec_and_inputs
    model, observer = _designed(spec)
    assert observer.wants(0) and observer.wants(7) and observer.ctx.prec == audit.AUDIT_PRECISION == 128
    assert observer.spec is spec and observer.run_dtype == "float32" and observer.every == 1
    observer.observe(0, model, EXACT_X)
    observer.observe(1, model, EXACT_X * 3)
    block = observer.result()
    assert block["schema"] == "bnaudit.audit/1" and block["every"] == 1 and block["storage"] == "float32"
    assert block["precision"] == 128 and block["ops"] == ["linear.out", "bn.mean", "bn.var", "bn.invstd", "bn.out"]
    assert block["rows"] == [0, 1] and block["skipped"] is None and block["n_flags"] == 0 and block["flags"] == []
    assert block["thresholds"] == {"var_over_eps": 100.0, "mean_over_std": 100.0}
    assert block["seconds"] > 0 and block["cpu_seconds"] > 0
    assert block["note"] == (
        "errors: |run - exact| in ulps of the run's dtype at the operator's scale (sum of |terms|); "
        "errors_at_value: in ulps at the exact value itself (large where the result cancels); "
        "exact = the operator applied to the run's own inputs in mpmath; "
        "bn.var from torch.var_mean (the BN kernel does not return its variance)")
    for layer, ops in block["errors"].items():
        for op, values in ops.items():
            assert len(values) == 2 and all(v == round(v, 3) for v in values), (layer, op, values)
            assert block["worst"][layer][op] == max(values)
            assert all(v == float(f"{v:.4g}") for v in block["errors_at_value"][layer][op])
    assert all(len(v) == 2 for v in block["max_amplification"].values())
    every10 = audit.OperatorAudit(spec, controls.RunConfig(controls.Controls(dtype="float32"), epochs=1))
    assert [r for r in range(31) if every10.wants(r)] == [0, 10, 20, 30]
    custom = audit.OperatorAudit(spec, controls.RunConfig(controls.Controls(dtype="float64"), epochs=1), precision=80)
    assert custom.ctx.prec == 80 and custom.eps == custom.ctx.mpf(spec.model.bn_eps)


def test_ulp_of_each_format():
    values = np.array([1.0, 3.0, 0.0, 2.0**-130, -6.0])
    assert audit._ulp(values, torch.bfloat16).tolist() == [2.0**-7, 2.0**-6, 2.0**-133, 2.0**-133, 2.0**-5]
    assert audit._ulp(values, torch.float32).tolist() == [2.0**-23, 2.0**-22, 2.0**-149, 2.0**-149, 2.0**-21]
    assert audit._ulp(values, torch.float64).tolist() == [2.0**-52, 2.0**-51, 2.0**-1074, 2.0**-182, 2.0**-50]


def test_the_layer_after_bn_sees_the_runs_own_bn_output(spec_and_inputs):
    """What the audit feeds the next layer is train-mode BN with the layer's own weight, bias and eps."""
    spec, _ = spec_and_inputs
    model, observer = _designed(spec)
    with torch.no_grad():
        model.bn1.eps = 1e-3
        model.bn1.weight.copy_(torch.tensor([1.5, -0.75]))
        model.bn1.bias.copy_(torch.tensor([0.25, 2.0]))
    seen = []
    model.linear2.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    observer.observe(0, model, EXACT_X)
    with torch.no_grad():
        want = torch.relu(torch.nn.functional.batch_norm(EXACT_X, None, None, model.bn1.weight, model.bn1.bias,
                                                         True, 0.0, 1e-3))
    assert len(seen) == 1 and torch.equal(seen[0], want), "the next layer saw another BN output than the run's"


def test_time_spent_adds_up_over_audited_rows(spec_and_inputs, monkeypatch):
    class Clock:
        """Each reading 0.12345 s after the last."""

        def __init__(self):
            self.now = 1000.0

        def tick(self):
            self.now += 0.12345
            return self.now

    wall, cpu = Clock(), Clock()
    monkeypatch.setattr(audit, "time", type("FakeTime", (), {"perf_counter": staticmethod(wall.tick),
                                                             "process_time": staticmethod(cpu.tick)}))
    spec, _ = spec_and_inputs
    model, observer = _designed(spec)
    observer.observe(0, model, EXACT_X)
    observer.observe(1, model, EXACT_X)
    block = observer.result()
    assert (block["seconds"], block["cpu_seconds"]) == (0.247, 0.247), "two rows of 0.12345 s, to the ms"


def test_audit_every_zero_or_one(spec_and_inputs):
    spec, _ = spec_and_inputs
    never = audit.OperatorAudit(spec, controls.RunConfig(controls.Controls(dtype="float32"), epochs=3, audit_every=0))
    assert not any(never.wants(r) for r in range(3)), "audit_every 0 audits nothing"
    every = controls.RunConfig(controls.Controls(dtype="float32"), epochs=3, audit_every=1)
    (observer,) = audit.observers_for(spec, every)
    assert isinstance(observer, audit.OperatorAudit) and [r for r in range(4) if observer.wants(r)] == [0, 1, 2, 3]
