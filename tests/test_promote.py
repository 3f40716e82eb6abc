"""Precision promotion (``--promote``): float64 operations inside a float32 or bfloat16 run.

The rounding is checked against ``bits.from_float64`` (numpy, one rounding by
construction); the operations against numpy's float64 formulas applied to the values a
real run recorded at its first step, so each promoted output must be the float64 result
rounded once, bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bnaudit import bits, compare, controls, promote, record
from bnaudit.errors import ExitCode, InputError, UsageError
from bnaudit.spec import default_spec

SPEC = default_spec()


# --------------------------------------------------------------------------- rounding once

def _hazards() -> np.ndarray:
    """float64 values where rounding to float32 first and then to bfloat16 goes wrong, and edge cases."""
    one_plus_half = 1.0 + 2.0**-8                # a bfloat16 tie: rounds to even, 1.0
    return np.array([
        one_plus_half + 2.0**-30,                 # above the tie by less than a float32 half-ulp: 1 + 2^-7
        one_plus_half - 2.0**-30,                 # below it: 1.0
        -(one_plus_half + 2.0**-30),
        1.0 + 3 * 2.0**-8 - 2.0**-31,             # just below the tie between 1 + 2^-7 and 1 + 2^-6
        one_plus_half, 1.0 + 3 * 2.0**-8,          # exact ties: to even
        2.0**-133, 2.0**-134, 2.0**-134 + 2.0**-160, 3 * 2.0**-135,   # bfloat16 subnormals and their ties
        3.3961e38, 3.4e38, 1e39, -1e39,           # past bfloat16's largest value: inf
        0.0, -0.0, np.inf, -np.inf, 1e-300,
    ])


@pytest.mark.parametrize("dtype, storage", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_round_once_is_one_rounding_to_nearest_even(dtype, storage):
    rng = np.random.default_rng(5)
    values = np.concatenate([_hazards(), rng.standard_normal(4000) * np.exp2(rng.integers(-140, 120, 4000))])
    got = promote.round_once(torch.from_numpy(values), dtype)
    assert got.dtype == dtype
    want = bits.from_float64(values, storage)
    got_bits = bits.as_bits(got.view(torch.int16 if storage == "bfloat16" else torch.int32).numpy()
                            .view("<u2" if storage == "bfloat16" else "<u4"), storage)
    assert got_bits.tolist() == bits.as_bits(want, storage).tolist()


def test_round_once_to_bfloat16_differs_from_torchs_cast_where_that_rounds_twice():
    x = torch.tensor([1.0 + 2.0**-8 + 2.0**-30], dtype=torch.float64)
    assert x.to(torch.bfloat16).item() == 1.0                      # torch: via float32, twice
    assert promote.round_once(x, torch.bfloat16).item() == 1.0 + 2.0**-7
    nan = promote.round_once(torch.tensor([float("nan")], dtype=torch.float64), torch.bfloat16)
    assert torch.isnan(nan).all()


# --------------------------------------------------------------------------- the operations, in isolation

def test_a_promoted_linear_and_its_gradients_are_the_float64_ones_rounded_once():
    torch.manual_seed(3)
    plain = nn.Linear(7, 5)
    prom = promote.PromotedLinear(7, 5)
    prom.load_state_dict(plain.state_dict())
    wide = nn.Linear(7, 5).double()
    wide.load_state_dict({k: v.double() for k, v in plain.state_dict().items()})
    x = torch.randn(11, 7)
    x.requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    out, out64 = prom(x), wide(x64)
    assert out.dtype == torch.float32
    assert torch.equal(out, out64.float())
    g = torch.randn(11, 5)
    out.backward(g)
    out64.backward(g.double())
    assert torch.equal(prom.weight.grad, wide.weight.grad.float())
    assert torch.equal(prom.bias.grad, wide.bias.grad.float())
    assert torch.equal(x.grad, x64.grad.float())


def test_promoted_sgd_is_torchs_momentum_formula_in_float64():
    p = nn.Parameter(torch.tensor([1.0, -2.5, 3e-3], dtype=torch.float32))
    opt = promote.sgd([p], lr=0.01, momentum=0.9, promote=("optimizer",))
    assert isinstance(opt, promote.PromotedSGD)
    grads = [np.array([0.3, -0.7, 1e-4]), np.array([-0.11, 0.5, 2e-3])]
    p64, buf = p.detach().double().numpy().copy(), None
    for g in grads:
        p.grad = torch.from_numpy(g).float()
        g64 = g.astype(np.float32).astype(np.float64)
        buf = g64.copy() if buf is None else buf.astype(np.float32).astype(np.float64) * 0.9 + g64
        want = (p64 - 0.01 * buf).astype(np.float32)
        opt.step()
        assert p.detach().numpy().tolist() == want.tolist()
        assert opt.state[p]["momentum_buffer"].numpy().tolist() == buf.astype(np.float32).tolist()
        p64 = want.astype(np.float64)
    assert isinstance(promote.sgd([p], lr=0.1, momentum=0.0, promote=()), torch.optim.SGD)


def test_promoted_bn_keeps_state_names_and_eval_uses_the_running_statistics():
    bn = promote.batch_norm(4, 1e-5, 0.1, ("bn",))
    assert isinstance(bn, promote.PromotedBatchNorm1d) and not bn.stats_only
    assert set(bn.state_dict()) == set(nn.BatchNorm1d(4).state_dict())
    assert promote.batch_norm(4, 1e-5, 0.1, ("bn-stats",)).stats_only
    assert type(promote.batch_norm(4, 1e-5, 0.1, ("linear",))) is nn.BatchNorm1d
    x = torch.randn(9, 4) * 3 + 1
    bn.train()
    bn(x)
    assert bn.num_batches_tracked.item() == 1
    x64 = x.double()
    assert torch.equal(bn.running_mean, (0.1 * x64.mean(0)).float())
    assert torch.equal(bn.running_var, (0.9 + 0.1 * x64.var(0, unbiased=True)).float())
    bn.eval()
    y = bn(x)
    want = (x64 - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + 1e-5)
    assert torch.allclose(y.double(), want, rtol=2**-23, atol=0)


# --------------------------------------------------------------------------- requests

@pytest.mark.parametrize("text, ops", [
    ("bn", ("bn",)), ("loss,linear", ("linear", "loss")), ("optimizer, bn-stats", ("bn-stats", "optimizer")),
    ("none", ()), ("BN,Linear", ("linear", "bn")), ("linear,bn,loss,optimizer", ("linear", "bn", "loss", "optimizer")),
])
def test_promote_lists_parse_into_one_canonical_order(text, ops):
    assert controls.parse_promote(text) == ops


@pytest.mark.parametrize("text", ["", "bn,", "relu", "bn,bn-stats", "everything", "none,bn"])
def test_bad_promote_lists_are_usage_errors(text):
    with pytest.raises(UsageError, match="--promote"):
        controls.parse_promote(text)


@pytest.mark.parametrize("dtype", ["float64", "bf16-mixed"])
def test_promotion_needs_a_float32_or_bfloat16_run(dtype):
    config = controls.RunConfig(controls=controls.Controls(dtype=dtype, promote=("bn",)), epochs=1)
    with pytest.raises(UsageError, match="--promote needs --dtype float32 or bfloat16"):
        controls.validate(config, SPEC, check_cpu=False)


def test_controls_write_promote_only_when_they_promote_and_read_it_back_strictly():
    plain = controls.Controls()
    assert "promote" not in plain.to_json()
    prom = controls.Controls(promote=("bn", "loss"))
    assert prom.to_json()["promote"] == ["bn", "loss"] and prom.label().endswith("_promote-bn+loss")
    assert controls.Controls.from_json(json.loads(json.dumps(prom.to_json())), "x") == prom
    assert controls.Controls.from_json(plain.to_json(), "x") == plain
    assert controls.RunConfig.from_dict(controls.RunConfig(controls=prom, epochs=2).to_dict()).controls == prom
    for bad in (["loss", "bn"], ["bn", "bn-stats"], ["relu"], "bn", [1], ["bn", "bn"]):
        with pytest.raises(InputError, match=r"config\.controls"):
            controls.Controls.from_json({**plain.to_json(), "promote": bad}, "x")
    with pytest.raises(InputError, match=r"config\.controls"):
        controls.Controls.from_json({**plain.to_json(), "dtype": "float64", "promote": ["bn"]}, "x")


# --------------------------------------------------------------------------- real runs, checked at their first step

@pytest.fixture(scope="module")
def runs(make_run):
    return {name: make_run(1, promote=ops) for name, ops in (
        ("plain", ()), ("linear", ("linear",)), ("bn", ("bn",)), ("bn-stats", ("bn-stats",)), ("loss", ("loss",)),
        ("optimizer", ("optimizer",)))}


def _values(fp: record.Fingerprint, key: str) -> np.ndarray:
    got = fp.first_step.get(key)
    assert got is not None, key
    values, storage = got
    return bits.to_float64(values, storage)


def _rounded(values: np.ndarray, storage: str = "float32") -> list[int]:
    return bits.as_bits(bits.from_float64(values, storage), storage).reshape(-1).tolist()


def _stored(fp: record.Fingerprint, key: str) -> list[int]:
    values, storage = fp.first_step.get(key)
    return bits.as_bits(values, storage).reshape(-1).tolist()


def _bn64(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return mean, var, 1 / np.sqrt(var + eps)


def test_promoted_linear_is_the_exact_product_rounded_once(runs):
    fp = record.load(runs["linear"])
    x, w, b = _values(fp, "input"), _values(fp, "initial.linear1.weight"), _values(fp, "initial.linear1.bias")
    assert _stored(fp, "linear1.out") == _rounded(x @ w.T + b)
    # the next Linear takes the ReLU of the BN output, as the run computed it
    h, w2, b2 = _values(fp, "relu1.out"), _values(fp, "initial.linear2.weight"), _values(fp, "initial.linear2.bias")
    assert _stored(fp, "linear2.out") == _rounded(h @ w2.T + b2)


def test_promoted_bn_is_the_float64_normalisation_rounded_once(runs):
    fp = record.load(runs["bn"])
    eps, m = SPEC.model.bn_eps, SPEC.model.bn_momentum
    x = _values(fp, "linear1.out")
    mean, var, invstd = _bn64(x, eps)
    w, b = _values(fp, "initial.bn1.weight"), _values(fp, "initial.bn1.bias")
    assert _stored(fp, "bn1.out") == _rounded((x - mean) * invstd * w + b)
    n = x.shape[0]
    rm0, rv0 = _values(fp, "initial.bn1.running_mean"), _values(fp, "initial.bn1.running_var")
    assert _stored(fp, "bn1.running_mean") == _rounded((1 - m) * rm0 + m * mean)
    assert _stored(fp, "bn1.running_var") == _rounded((1 - m) * rv0 + m * var * (n / (n - 1)))


def test_promoted_bn_statistics_leave_the_normalisation_in_the_runs_dtype(runs):
    fp = record.load(runs["bn-stats"])
    x = _values(fp, "linear1.out")
    mean, _, invstd = _bn64(x, SPEC.model.bn_eps)
    f32 = np.float32
    w, b = _values(fp, "initial.bn1.weight").astype(f32), _values(fp, "initial.bn1.bias").astype(f32)
    want = (x.astype(f32) - mean.astype(f32)) * invstd.astype(f32) * w + b    # float32 operations, one by one
    assert _stored(fp, "bn1.out") == bits.as_bits(want, "float32").reshape(-1).tolist()


def test_promoted_loss_is_the_float64_mean_of_squares_rounded_once(runs):
    fp = record.load(runs["loss"])
    pred, y = _values(fp, "linear6.out"), _values(fp, "target")
    assert _stored(fp, "loss") == _rounded(np.array(np.mean((pred - y) ** 2)))


def test_promoted_optimizer_updates_every_parameter_in_float64_rounded_once(runs):
    fp = record.load(runs["optimizer"])
    lr = SPEC.train.lr
    for name, _ in SPEC.parameters():
        p0, g = _values(fp, f"initial.{name}"), _values(fp, f"{name}.grad")
        assert _stored(fp, name) == _rounded(p0 - lr * g), name
        assert _stored(fp, f"{name}.momentum_buffer") == _rounded(g), name   # the first buffer is the gradient


def test_the_rounding_checks_tell_a_promoted_run_from_a_plain_one(runs):
    plain = record.load(runs["plain"])
    # plain float32 BN and its float64 twin rounded once part somewhere in the first BN's output
    x = _values(plain, "linear1.out")
    mean, _, invstd = _bn64(x, SPEC.model.bn_eps)
    w, b = _values(plain, "initial.bn1.weight"), _values(plain, "initial.bn1.bias")
    assert _stored(plain, "bn1.out") != _rounded((x - mean) * invstd * w + b)


@pytest.mark.parametrize("name, tensor", [("linear", "linear1.out"), ("bn", "bn1.out"), ("bn-stats", "bn1.out")])
def test_compare_says_a_promotion_changes_the_bits_and_names_it(runs, name, tensor):
    a, b = record.load(runs["plain"]), record.load(runs[name])
    pair = compare.compare_pair(a, b)
    assert not pair.identical
    assert pair.first.tensor == tensor and pair.first.epoch == 0 and pair.first.step == 0
    assert any(key == "config.controls.promote" for key, _, _ in pair.environment_diff)


def test_a_bfloat16_run_rounds_its_promoted_linear_once(make_run):
    fp = record.load(make_run(1, dtype="bfloat16", promote=("linear",)))
    x, w, b = _values(fp, "input"), _values(fp, "initial.linear1.weight"), _values(fp, "initial.linear1.bias")
    assert _stored(fp, "linear1.out") == _rounded(x @ w.T + b, "bfloat16")


def test_the_cli_refuses_a_bad_promotion_in_one_line(cli, tmp_path):
    code, out, err = cli("run", "--epochs", "1", "--promote", "relu", "--out", str(tmp_path / "r"))
    assert code == ExitCode.USAGE and len(err.strip().splitlines()) == 1 and "--promote 'relu'" in err
    code, out, err = cli("run", "--epochs", "1", "--dtype", "float64", "--promote", "bn", "--out", str(tmp_path / "r"))
    assert code == ExitCode.USAGE and "--promote needs --dtype float32 or bfloat16" in err
    assert not (tmp_path / "r").exists()


def test_a_promoted_record_says_so_and_a_plain_one_is_as_before(runs):
    raw = json.loads((runs["bn"] / "record.json").read_text())
    assert raw["config"]["controls"]["promote"] == ["bn"]
    plain = json.loads((runs["plain"] / "record.json").read_text())
    assert "promote" not in plain["config"]["controls"]
    assert record.load(runs["bn"]).controls.promote == ("bn",)


def test_a_matrix_sweeps_promotion_as_a_control(cli, tmp_path):
    out = tmp_path / "m"
    code, text, err = cli("matrix", "--promote", "none,bn-stats,linear+loss", "--epochs", "1", "--audit-every", "0",
                          "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["grid"]["promote"] == [[], ["bn-stats"], ["linear", "loss"]]
    assert [r["controls"].get("promote") for r in summary["runs"]] == [None, ["bn-stats"], ["linear", "loss"]]
    verdict = next(v for v in summary["verdicts"] if v["control"] == "promote")
    assert verdict["values"] == [[], ["bn-stats"], ["linear", "loss"]] and verdict["differing"] == verdict["pairs"] == 3
    assert len({r["class_index"] for r in summary["runs"]}) == 3
    code, text, err = cli("matrix", "--promote", "none,bn+bn-stats", "--epochs", "1", "--out", str(tmp_path / "x"))
    assert code == ExitCode.USAGE and "'bn+bn-stats' is not a set of" in err and not (tmp_path / "x").exists()
