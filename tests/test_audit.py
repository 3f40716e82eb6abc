"""The operator audit on real runs: rounding-sized local errors, and a BN unit flagged on purpose."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnaudit import audit, controls, frozen, record, runner
from bnaudit.spec import default_spec


@pytest.fixture(scope="module")
def spec_and_inputs():
    spec = default_spec()
    return spec, frozen.load(spec)


def _model(spec, fz, dtype: str):
    config = controls.RunConfig(controls.Controls(dtype=dtype), epochs=1, audit_every=1)
    model = runner.build_model(spec).to(runner.TORCH_DTYPES[dtype])
    runner.load_initial_state(model, spec, fz, config)
    x = torch.from_numpy(fz.inputs[: spec.data.train]).to(runner.TORCH_DTYPES[dtype])[record.probe_indices(spec)]
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

    from bnaudit.report import reference_view

    spec, fz = spec_and_inputs
    model, x, config = _model(spec, fz, "float32")
    with torch.no_grad():
        model.linear1.weight[3] *= 1e-4
    observer = audit.OperatorAudit(spec, config)
    observer.observe(0, model, x)
    console = Console(record=True, width=160)
    reference_view.render_audit(observer.result(), out=console)
    text = console.export_text()
    assert "operator audit every 1 epochs (float32)" in text and "bn.invstd" in text
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
    assert flags[0]["amplification"] > 1000


def test_audit_off_and_bf16_mixed(spec_and_inputs):
    spec, _ = spec_and_inputs
    off = controls.RunConfig(controls.Controls(dtype="float32"), epochs=1, audit_every=0)
    assert audit.observers_for(spec, off) == []
    mixed = controls.RunConfig(controls.Controls(dtype="bf16-mixed"), epochs=1, audit_every=10)
    (observer,) = audit.observers_for(spec, mixed)
    assert not observer.wants(10) and observer.result()["skipped"]


def test_ulp_helper_matches_numpy_spacing():
    values = np.array([1.0, 3.0, 1e-30, 2.0**-130, 123456.789])
    assert np.array_equal(audit._ulp(values, torch.float64), np.spacing(values))
    f32 = values.astype(np.float32)
    assert np.array_equal(audit._ulp(f32.astype(np.float64), torch.float32), np.spacing(f32).astype(np.float64))
