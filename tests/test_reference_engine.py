"""The mpmath engine against independent oracles: closed-form decimals and torch float64."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnaudit import bits, controls, frozen, runner
from bnaudit.reference import engine
from bnaudit.spec import default_spec, from_dict

# --------------------------------------------------------------------------- hand-checkable case
#
# One BN unit: x = (1, 2, 4) -> Linear(1,1) w1=0.5 b1=-0.25 -> BatchNorm1d(1) weight 1.5 bias
# 0.25 (eps 1e-5, momentum 0.1 as float64) -> ReLU -> Linear(1,1) w2=-0.75 b2=0.125, targets
# (0.5, -1, 2), MSE, one SGD step with lr 0.01 (float64), momentum 0.9 (first step: buf = grad).
# By hand: z = (0.25, 0.75, 1.75), mean 11/12, biased variance 7/18, running_var uses 7/12.
# The strings below come from ``_decimal_oracle`` (Python's decimal module at 90 digits: the
# closed-form forward, gradients by central differences with h = 1e-30, accurate to > 50
# digits); ``test_decimal_oracle_reproduces_the_golden_strings`` re-derives them.

GOLDEN = {
    "loss": "4.70711968441868853027189350384435500408422624640528213743827",
    "bn1.out": ["-1.35354683457635239137900425820554453113625322765918135806188",
                "-0.150886708644088097844751064551386132784063306914795339515471",
                "2.25443354322044048922375532275693066392031653457397669757735"],
    "pred": ["0.125", "0.125", "-1.56582515741533036691781649206769799794023740093048252318301"],
    "grad": {
        "linear1.weight": "0.000183787091169208122564257126605095004009362647871376732435",
        "linear1.bias": "0",
        "bn1.weight": "2.382486518260865204021192887397083507333750711020767203666585",
        "bn1.bias": "1.78291257870766518345890824603384899897011870046524126159152",
        "linear2.weight": "-5.35927722942428546919535519013878334765754098886328149453037",
        "linear2.bias": "-1.87721677161022024461187766137846533196015826728698834878868",
    },
    "after_step": {
        "linear1.weight": "0.499998162129088307918736099054938023242533309451422386673234",
        "linear1.bias": "-0.25",
        "bn1.weight": "1.47617513481739134746383343579498491173415778529848504145048",
        "bn1.bias": "0.232170874212923347794267680831837476596188107995740152969721",
        "linear2.weight": "-0.696407227705757144192422765200582315667044939928883467224213",
        "linear2.bias": "0.143772167716102202836893016998941605540367053788832058410162",
    },
    "bn1.running_mean": "0.0916666666666666717551888628653008102749784787495930989583333",
    "bn1.running_var": "0.958333333333333331020368698697590540784100691477457682291666",
}
PARAM_NAMES = list(GOLDEN["grad"])
INIT = [0.5, -0.25, 1.5, 0.25, -0.75, 0.125, 0.0, 1.0]  # parameters, then running_mean, running_var
X = [1.0, 2.0, 4.0]
T = [0.5, -1.0, 2.0]


def _decimal_oracle() -> dict[str, object]:
    """The golden values from decimal arithmetic: no mpmath, no torch, no engine."""
    getcontext().prec = 90

    def exact(x: float) -> Decimal:
        f = Fraction(x)
        return Decimal(f.numerator) / Decimal(f.denominator)

    eps, m, lr = exact(1e-5), exact(0.1), exact(0.01)
    xs, ts = [Decimal(v) for v in X], [exact(v) for v in T]

    def forward(w1, b1, gamma, beta, w2, b2):
        z = [w1 * x + b1 for x in xs]
        mean = sum(z) / 3
        var = sum((v - mean) ** 2 for v in z) / 3
        invstd = 1 / (var + eps).sqrt()
        bn = [gamma * (v - mean) * invstd + beta for v in z]
        pred = [w2 * (v if v > 0 else Decimal(0)) + b2 for v in bn]
        return sum((p - t) ** 2 for p, t in zip(pred, ts)) / 3, mean, var, bn, pred

    p = [exact(v) for v in INIT[:6]]
    loss, mean, var, bn, pred = forward(*p)
    h = Decimal("1e-30")
    grads = []
    for k in range(6):
        up, dn = list(p), list(p)
        up[k] += h
        dn[k] -= h
        grads.append((forward(*up)[0] - forward(*dn)[0]) / (2 * h))
    return {"loss": loss, "bn1.out": bn, "pred": pred, "grad": dict(zip(PARAM_NAMES, grads)),
            "after_step": {n: v - lr * g for n, v, g in zip(PARAM_NAMES, p, grads)},
            "bn1.running_mean": m * mean, "bn1.running_var": (1 - m) + m * var * 3 / 2}


def _close(ctx, value, text: str, digits: int = 40) -> bool:
    golden = ctx.mpf(text)
    return abs(value - golden) <= ctx.mpf(10) ** (-digits) * max(1, abs(golden))


def test_decimal_oracle_reproduces_the_golden_strings():
    oracle = _decimal_oracle()
    for key in ("loss", "bn1.running_mean", "bn1.running_var"):
        assert abs(oracle[key] - Decimal(GOLDEN[key])) < Decimal("1e-55"), key
    for key in ("grad", "after_step"):
        for name in PARAM_NAMES:
            assert abs(oracle[key][name] - Decimal(GOLDEN[key][name])) < Decimal("1e-50"), f"{key} {name}"


def _tiny_spec():
    raw = {"data": {"samples": 6, "train": 3, "degree": 1, "noise_feature": False},
           "model": {"hidden_layers": 1, "hidden_units": 1},
           "train": {"batch_size": 3, "epochs": 1, "lr": 0.01, "lr_milestones": []}}
    return from_dict(raw, base=default_spec())


def test_hand_checkable_bn_unit_forward_backward_and_step():
    spec = _tiny_spec()
    ctx = engine.new_context(256)
    inputs = [[v] for v in [*X, 0.0, 1.0, -1.0]]
    net = engine.Network(spec, ctx, INIT, inputs, [*T, 0.0, 0.0, 0.0])
    loss, grads, outs = net.gradients(net.inputs[:3], net.targets[:3])
    # forward, checked before the backward
    assert _close(ctx, loss, GOLDEN["loss"]), f"forward: loss {loss}"
    for i, text in enumerate(GOLDEN["bn1.out"]):
        assert _close(ctx, outs[1][i][0], text), f"forward: bn1 output {i}"
    for i, text in enumerate(GOLDEN["pred"]):
        assert _close(ctx, outs[-1][i][0], text), f"forward: prediction {i}"
    assert _close(ctx, net.layers[1].running_mean[0], GOLDEN["bn1.running_mean"]), "forward: running_mean"
    assert _close(ctx, net.layers[1].running_var[0], GOLDEN["bn1.running_var"]), \
        "forward: running_var must use the unbiased variance"
    # backward
    for name in PARAM_NAMES:
        value = grads[name][0][0] if name.endswith("weight") and name.startswith("linear") else grads[name][0]
        assert _close(ctx, value, GOLDEN["grad"][name]), f"backward: {name}.grad = {value}"
    # update (SGD first step: buf = grad; p -= lr * buf)
    net.sgd_step(grads, ctx.mpf(spec.lr_at(0)))
    flat = net.flat_parameters()
    for name, value in zip(PARAM_NAMES, flat):
        assert _close(ctx, value, GOLDEN["after_step"][name]), f"update: {name} = {value}"


# --------------------------------------------------------------------------- against torch float64

@pytest.fixture(scope="module")
def default_inputs():
    spec = default_spec()
    return spec, frozen.load(spec)


def _torch_first_step(spec, fz):
    torch.set_num_threads(1)
    config = controls.RunConfig(controls.Controls(dtype="float64"), epochs=1, audit_every=0)
    model = runner.build_model(spec).double()
    runner.load_initial_state(model, spec, fz, config)
    idx = torch.from_numpy(fz.batches[0][: spec.train.batch_size].astype(np.int64))
    x = torch.from_numpy(fz.inputs[: spec.data.train])[idx]
    y = torch.from_numpy(fz.targets[: spec.data.train])[idx].unsqueeze(1)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr_at(0), momentum=spec.train.momentum, foreach=False)
    outs = runner.forward_layers(list(model.named_children()), x)
    loss = F.mse_loss(outs[-1][1], y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return model, outs, loss, grads


def _normwise_bits(ref: np.ndarray, got: np.ndarray) -> float:
    err = np.abs(ref - got).max()
    return 53.0 if err == 0 else -math.log2(err / np.abs(ref).max())


def test_first_step_matches_torch_float64(default_inputs):
    spec, fz = default_inputs
    model, outs, loss, grads = _torch_first_step(spec, fz)
    ctx = engine.new_context(256)
    net = engine.Network(spec, ctx, fz.init, fz.inputs, fz.targets)
    idx = [int(i) for i in fz.batches[0][: spec.train.batch_size]]
    mp_loss, mp_grads, mp_outs = net.gradients([net.inputs[i] for i in idx], [net.targets[i] for i in idx])
    # forward: every module's output, normwise within a few float64 roundings
    for (name, t), mine in zip(outs, mp_outs):
        ref = np.array([[float(v) for v in row] for row in mine])
        assert _normwise_bits(ref, t.detach().numpy()) > 48, f"forward: {name} output differs"
    assert abs(float(mp_loss) - loss.item()) <= 8 * 2**-52 * float(mp_loss), "forward: loss differs"
    # backward: every gradient, normwise against its layer's gradient scale (the bias of a Linear
    # feeding a BN has an exactly-zero gradient: torch returns rounding noise, ~1e-17 of the scale)
    for name, g in grads.items():
        layer = name.split(".")[0]
        ref = np.array([float(v) for v in engine._flatten(mp_grads[name])])
        scale = max(np.abs(np.array([float(v) for v in engine._flatten(mp_grads[f"{layer}.{k}"])])).max()
                    for k in ("weight", "bias"))
        err = np.abs(ref - g.numpy().reshape(-1)).max()
        assert err <= 2**-44 * scale, f"backward: {name}.grad differs by {err:.3g} (scale {scale:.3g})"
    # update: every parameter within a few float64 ulps
    net.sgd_step(mp_grads, ctx.mpf(spec.lr_at(0)))
    mine = np.array([float(v) for v in net.flat_parameters()])
    theirs = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    _assert_params_within_few_ulps(spec, theirs, mine)


def _assert_params_within_few_ulps(spec, theirs: np.ndarray, mine: np.ndarray) -> None:
    """Per parameter tensor: every element within 4 ulps of the tensor's largest value; over
    all parameters, elementwise in each element's own ulps, the median within 1.

    A weight that happens to be tiny is the difference of two ordinary numbers (w - lr g):
    its error is a few ulps of the tensor's scale, not of its own magnitude.  BN biases
    start at 0, so after the first step they *are* -lr * grad, and their gradient is a
    cancelling sum over the batch: there the bound is the gradient's (2^-44 of the
    largest term, as checked for the backward pass), times lr.
    """
    offset = 0
    for name, shape in spec.parameters():
        size = math.prod(shape)
        a, b = theirs[offset:offset + size], mine[offset:offset + size]
        offset += size
        if name.startswith("bn") and name.endswith(".bias"):
            assert np.abs(a - b).max() <= spec.lr_at(0) * 2**-44, f"update: {name} differs"
            continue
        worst = np.abs(a - b).max() / np.spacing(np.abs(b).max())
        assert worst <= 4, f"update: {name} differs by {worst:.1f} ulps of its largest value"
    ulps = bits.ulp_distance(theirs, mine, "float64")
    assert np.median(ulps) <= 1, f"update: median elementwise distance {np.median(ulps)} ulps"


def test_first_epoch_matches_torch_float64_run(default_inputs):
    spec, fz = default_inputs
    torch.set_num_threads(1)
    config = controls.RunConfig(controls.Controls(dtype="float64"), epochs=1, audit_every=0)
    result = runner.run(spec, fz, config)
    net = engine.Network(spec, engine.new_context(256), fz.init, fz.inputs, fz.targets)
    net.train_epoch(0, fz.batches[0])
    mine = np.array([float(v) for v in net.flat_parameters()])
    ulps = bits.ulp_distance(result.params[1], mine, "float64")
    assert np.median(ulps) <= 16, f"median {np.median(ulps)} ulps after one epoch"
    assert _normwise_bits(mine, result.params[1]) > 44
    buffers = np.array([float(v) for v in net.flat_buffers()])
    assert _normwise_bits(buffers, result.buffers[1]) > 44, "running statistics differ"
    train, test = net.eval_losses()
    assert abs(float(train) - result.train_loss[1]) <= 2**-40 * float(train), "eval-mode train loss differs"
    assert abs(float(test) - result.test_loss[1]) <= 2**-40 * float(test), "eval-mode test loss differs"


def test_no_bn_baseline_first_step_matches_torch_float64():
    spec = from_dict({"model": {"batchnorm": False}}, base=default_spec())
    fz = frozen.load(spec)  # generated into the cache (BNAUDIT_CACHE) for this custom spec
    model, outs, loss, grads = _torch_first_step(spec, fz)
    ctx = engine.new_context(256)
    net = engine.Network(spec, ctx, fz.init, fz.inputs, fz.targets)
    assert not any(isinstance(layer, engine.BatchNorm1d) for layer in net.layers)
    idx = [int(i) for i in fz.batches[0][: spec.train.batch_size]]
    mp_loss, mp_grads, _ = net.gradients([net.inputs[i] for i in idx], [net.targets[i] for i in idx])
    assert abs(float(mp_loss) - loss.item()) <= 8 * 2**-52 * float(mp_loss), "forward: loss differs"
    net.sgd_step(mp_grads, ctx.mpf(spec.lr_at(0)))
    mine = np.array([float(v) for v in net.flat_parameters()])
    theirs = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    _assert_params_within_few_ulps(spec, theirs, mine)


def test_engine_never_touches_the_global_context(default_inputs):
    spec, fz = default_inputs
    before = (mpmath.mp.prec, tuple(mpmath.mp._prec_rounding))
    net = engine.Network(spec, engine.new_context(333), fz.init, fz.inputs, fz.targets)
    net.train_epoch(0, fz.batches[0][: spec.train.batch_size])
    assert (mpmath.mp.prec, tuple(mpmath.mp._prec_rounding)) == before
    assert net.ctx.prec == 333


def test_state_round_trips_exactly_through_text(default_inputs):
    spec, fz = default_inputs
    ctx = engine.new_context(200)
    net = engine.Network(spec, ctx, fz.init, fz.inputs, fz.targets)
    net.train_epoch(0, fz.batches[0][: 2 * spec.train.batch_size])
    state = [engine.to_exact(v) for v in net.flat_state()]
    other = engine.Network(spec, engine.new_context(200), fz.init, fz.inputs, fz.targets)
    other.load_flat_state([engine.from_exact(other.ctx, t) for t in state], net.steps)
    assert [engine.to_exact(v) for v in other.flat_state()] == state
    assert other.steps == net.steps == 2


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, width=64), st.integers(-200, 200))
def test_double_double_and_exact_text(x, shift):
    ctx = engine.new_context(300)
    value = ctx.mpf(x) * ctx.mpf(3) ** shift / 7 if x != 0 else ctx.zero
    assert engine.from_exact(ctx, engine.to_exact(value)) == value
    hi, lo = engine.double_double(value)
    assert hi == float(value)
    if value != 0 and math.isfinite(hi) and abs(hi) > 1e-290:
        assert abs(value - (ctx.mpf(hi) + lo)) <= abs(value) * ctx.mpf(2) ** -104


_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_finite, _finite, st.integers(-80, 80)), min_size=1, max_size=20),
       st.sampled_from([64, 128, 512]))
def test_dot_and_sum_are_the_exact_value_rounded_once(terms, prec):
    """``_dot``/``_sum`` (integer form) equal the exact rational result rounded once to nearest.

    The oracle is independent of the engine: Fractions for the exact value, mpmath's
    ``from_rational`` for the one rounding.  Values mix signs, zeros, subnormals and
    exponents far apart (times 3^k for mantissas wider than a float's).
    """
    from mpmath.libmp import from_rational

    ctx = engine.new_context(prec)
    three = ctx.mpf(3)
    a = [ctx.mpf(x) * three ** k for x, _, k in terms]
    b = [ctx.mpf(y) / three ** k for _, y, k in terms]

    def fraction(v):  # the exact value of an mpf: +-man * 2^exp
        sign, man, exp, _ = v._mpf_
        return (-1) ** sign * Fraction(int(man)) * Fraction(2) ** exp

    exact_dot = sum(fraction(x) * fraction(y) for x, y in zip(a, b))
    exact_sum = sum(fraction(x) for x in a)
    for got, exact in ((engine._dot(ctx, a, b), exact_dot), (engine._sum(ctx, a), exact_sum)):
        want = from_rational(exact.numerator, exact.denominator, prec, "n")
        assert got._mpf_ == want
    # Straight from Python floats (the operator audit's path): the same exact value.
    xs, ys = [x for x, _, _ in terms], [y for _, y, _ in terms]
    exact_floats = sum(Fraction(x) * Fraction(y) for x, y in zip(xs, ys))
    got = engine._dot_fixed(ctx, engine._fixed_floats(xs), engine._fixed_floats(ys))
    assert got._mpf_ == from_rational(exact_floats.numerator, exact_floats.denominator, prec, "n")


# --------------------------------------------------------------------------- pinned details

def test_relu_passes_the_gradient_only_where_the_input_is_positive():
    """torch's threshold_backward: ReLU'(0) = 0, as ReLU'(x < 0)."""
    ctx = engine.new_context(64)
    mpf = ctx.mpf
    relu = engine.ReLU("relu1")
    x = [[mpf(-0.5), mpf(0), mpf(2)], [mpf(0), mpf("1e-30"), mpf(-3)]]
    out, cache = relu.forward(ctx, x)
    assert out == [[0, 0, 2], [0, mpf("1e-30"), 0]], f"forward: {out}"
    grad, params = relu.backward(ctx, cache, [[mpf(5), mpf(6), mpf(7)], [mpf(8), mpf(9), mpf(10)]], True)
    assert grad == [[0, 0, 7], [0, 9, 0]], f"backward: ReLU'(0) must be 0, got {grad}"
    assert params == {} and relu.params() == {} and relu.eval(ctx, x) == out


def test_linear_layer_pinned_forward_backward_and_input_gradient():
    ctx = engine.new_context(64)
    mpf = ctx.mpf
    lin = engine.Linear("linear1", [[mpf(1), mpf(2)], [mpf(-1), mpf(0.5)]], [mpf(0.25), mpf(-1)])
    x = [[mpf(3), mpf(-2)], [mpf(0.5), mpf(4)]]
    out, cache = lin.forward(ctx, x)
    assert out == [[-0.75, -5], [8.75, 0.5]] and lin.eval(ctx, x) == out, f"forward: {out}"
    g = [[mpf(1), mpf(2)], [mpf(-3), mpf(0.5)]]
    grad_in, grads = lin.backward(ctx, cache, g, True)
    # dL/dW[o][i] = sum_n g[n][o] x[n][i]; dL/db[o] = sum_n g[n][o]; dL/dx[n][i] = sum_o g[n][o] W[o][i]
    assert grads == {"weight": [[1.5, -14], [6.25, -2]], "bias": [-2, 2.5]}, f"backward: {grads}"
    assert grad_in == [[-1, 3], [-3.5, -5.75]], f"backward input: {grad_in}"
    assert lin.backward(ctx, cache, g, False)[0] is None
    assert lin.params() == {"weight": lin.weight, "bias": lin.bias}


def test_batchnorm_eval_and_probe_use_the_right_statistics():
    ctx = engine.new_context(128)
    mpf = ctx.mpf
    bn = engine.BatchNorm1d("bn1", [mpf(2)], [mpf(0.5)], [mpf(1)], [mpf(3)], mpf(1), mpf("0.25"))
    # eval: (x - running_mean) / sqrt(running_var + eps) * weight + bias = (x - 1) / 2 * 2 + 0.5
    assert bn.eval(ctx, [[mpf(5)], [mpf(-1)]]) == [[4.5], [-1.5]]
    assert bn.running_mean == [1] and bn.running_var == [3], "eval must not update the running statistics"
    out, _ = bn.forward(ctx, [[mpf(1)], [mpf(3)]], update_running=False)
    # batch mean 2, biased variance 1, eps 1: xhat = -+1/sqrt(2)
    tol = mpf(2) ** -120
    assert abs(out[0][0] - (0.5 - 2 / ctx.sqrt(2))) < tol and abs(out[1][0] - (0.5 + 2 / ctx.sqrt(2))) < tol
    assert bn.running_mean == [1] and bn.running_var == [3], "update_running=False must not update"
    _, cache = bn.forward(ctx, [[mpf(1)], [mpf(3)]])
    grad_in, grads = bn.backward(ctx, cache, [[mpf(1)], [mpf(-1)]], False)
    assert grad_in is None and set(grads) == {"weight", "bias"}, "no input gradient when none is needed"
    assert bn.backward(ctx, cache, [[mpf(1)], [mpf(-1)]], True)[0] is not None
    # running = 0.75 running + 0.25 batch (unbiased variance 2)
    assert bn.running_mean == [1.25] and bn.running_var == [2.75]
    assert bn.params() == {"weight": bn.weight, "bias": bn.bias}


def test_probe_leaves_the_state_alone_and_equals_a_train_forward(default_inputs):
    spec, fz = default_inputs
    net = engine.Network(spec, engine.new_context(96), fz.init, fz.inputs, fz.targets)
    state = [engine.to_exact(v) for v in net.flat_state()]
    x = net.inputs[:10]
    probe = net.probe(x)
    assert [engine.to_exact(v) for v in net.flat_state()] == state, "probe changed the state"
    outs, _ = net.forward(x)
    assert probe == outs
    assert [engine.to_exact(v) for v in net.flat_buffers()] != state[len(net.flat_parameters()):], \
        "the train-mode forward updates the running statistics"


def test_learning_rate_follows_the_schedule_and_momentum_the_second_step(default_inputs):
    spec, fz = default_inputs
    assert spec.lr_at(250) == 0.0025 and spec.lr_at(249) == 0.01
    order = fz.batches[0][: 2 * spec.train.batch_size]
    a = engine.Network(spec, engine.new_context(128), fz.init, fz.inputs, fz.targets)
    b = engine.Network(spec, engine.new_context(128), fz.init, fz.inputs, fz.targets)
    losses = a.train_epoch(250, order)
    assert len(losses) == 2 and a.steps == 2
    bs = spec.train.batch_size
    for s in range(2):
        idx = [int(i) for i in order[s * bs:(s + 1) * bs]]
        loss, grads, _ = b.gradients([b.inputs[i] for i in idx], [b.targets[i] for i in idx])
        if s == 0:
            first = grads
        b.sgd_step(grads, b.ctx.mpf(0.0025))
        assert loss == losses[s], f"step {s}: loss differs"
    assert [engine.to_exact(v) for v in a.flat_state()] == [engine.to_exact(v) for v in b.flat_state()]
    # torch's momentum: the buffer of the second step is 0.9 buf + grad, the first step's is grad itself
    name = "linear6.bias"
    assert b.momentum_buffer is not None
    one = engine.Network(spec, engine.new_context(128), fz.init, fz.inputs, fz.targets)
    assert one.flat_momentum() is None
    one.sgd_step(first, one.ctx.mpf(0.0025))
    assert one.momentum_buffer[name] == first[name]
    assert one.flat_parameters()[-1] == one.ctx.mpf(fz.init[len(one.flat_parameters()) - 1]) - one.ctx.mpf(
        0.0025) * first[name][0]


def test_wrong_state_sizes_are_refused(default_inputs):
    spec, fz = default_inputs
    ctx = engine.new_context(64)
    with pytest.raises(ValueError, match="initial state has 1520 values, the spec needs 1521"):
        engine.Network(spec, ctx, fz.init[:-1], fz.inputs, fz.targets)
    net = engine.Network(spec, ctx, fz.init, fz.inputs, fz.targets)
    n_p, n_b = len(net.flat_parameters()), len(net.flat_buffers())
    assert (n_p, n_b) == (1361, 160)
    with pytest.raises(ValueError, match="state has 3 values, expected 1521 or 2882"):
        net.load_flat_state([ctx.one] * 3, 0)
    # a state without momentum buffers (before the first step) loads as such
    values = [ctx.mpf(i) for i in range(n_p + n_b)]
    net.load_flat_state(values, 7)
    assert net.momentum_buffer is None and net.flat_momentum() is None and net.steps == 7
    assert net.flat_parameters() == values[:n_p] and net.flat_buffers() == values[n_p:]
    assert net.layers[0].weight[1][0] == 5 and net.layers[1].running_var[0] == n_p + 16
    full = values + [ctx.mpf(-i) for i in range(n_p)]
    net.load_flat_state(full, 9)
    assert net.flat_state() == full and net.momentum_buffer["linear1.weight"][1][0] == -5


def test_exact_text_and_double_double_pinned():
    ctx = engine.new_context(200)
    assert engine.to_exact(ctx.mpf(0.75)) == "3:-2" and engine.to_exact(ctx.mpf(-3)) == "-3:0"
    assert engine.to_exact(ctx.zero) == "0:0"
    third = ctx.one / 3
    assert engine.to_exact(third) == f"{(2**201 + 1) // 3:x}:-201", "1/3 rounded to 200 bits"
    assert engine.from_exact(ctx, "-3:0") == -3 and engine.from_exact(ctx, "a:-3") == 1.25
    for special in (ctx.inf, ctx.ninf, ctx.nan):
        with pytest.raises(ValueError, match="has no exact mantissa/exponent form"):
            engine.to_exact(special)
    hi, lo = engine.double_double(third)
    assert (hi.hex(), lo.hex()) == ("0x1.5555555555555p-2", "0x1.5555555555555p-56")
    assert engine.double_double(ctx.one + ctx.mpf(2) ** -60) == (1.0, 2.0**-60)


def test_exact_integer_vectors_pinned():
    ctx = engine.new_context(64)
    assert engine._fixed([ctx.mpf(0.75), ctx.mpf(-2), ctx.zero]) == ([3, -8, 0], -2)
    assert engine._fixed([]) == ([], 0) and engine._fixed([ctx.zero, ctx.zero]) == ([0, 0], 0)
    assert engine._fixed_floats([0.75, -2.0, 0.0]) == ([3, -8, 0], -2) and engine._fixed_floats([]) == ([], 0)
    assert engine._fixed_floats([2.0**-1074, 1.0]) == ([1, 2**1074], -1074)
    assert engine._dot_fixed(ctx, ([3, -8], -2), ([1, 1], 0)) == -1.25
    assert engine._sum_fixed(ctx, ([3, -8], -2)) == -1.25
    # one rounding, to the context's precision: 1 + 2^-70 is 1 at 64 bits
    assert engine._sum(ctx, [ctx.one, ctx.mpf(2) ** -70]) == 1
    assert engine._sum(engine.new_context(80), [ctx.one, ctx.mpf(2) ** -70]) != 1
    assert engine.new_context(77).prec == 77


def test_helpers_keep_shapes():
    assert engine._flatten([[1, 2], [3, 4]]) == [1, 2, 3, 4] and engine._flatten([1, 2]) == [1, 2]
    assert engine._flatten([]) == []
    assert engine._shape_like([[0, 0, 0], [0, 0, 0]], range(6)) == [[0, 1, 2], [3, 4, 5]]
    assert engine._shape_like([0, 0], [7, 8]) == [7, 8]
    assert engine._map(lambda v: -v, [[1, 2], [3, 4]]) == [[-1, -2], [-3, -4]]
    assert engine._map(lambda v: -v, [1, 2]) == [-1, -2]
    assert engine._map2(lambda a, b: a - b, [[5, 6]], [[1, 2]]) == [[4, 4]]
    assert engine._map2(lambda a, b: a - b, [5, 6], [1, 2]) == [4, 4]
