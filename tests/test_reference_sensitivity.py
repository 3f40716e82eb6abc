"""bnaudit reference sensitivity: the training's own amplification of a perturbation, in exact arithmetic.

The engine is the real one, at short epoch counts.  Expected values are independent:
the row-0 distance from the frozen weight itself, the growth rates of a made-up series
by hand, and the 0..7 rate of the default spec from an independent mpmath replay
(issue 14: about 1.15 ln per epoch).
"""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
from referencing import Registry, Resource

from bnaudit import frozen, schemas
from bnaudit.reference import sensitivity
from bnaudit.spec import load_spec


@pytest.fixture(scope="module")
def default():
    spec = load_spec(None)
    return spec, frozen.load(spec)


@pytest.fixture(scope="module")
def three(default):
    return sensitivity.measure(*default, epochs=3)


def test_row_0_is_the_perturbation_itself_in_its_tensor_only(default, three):
    spec, inputs = default
    w = float(np.asarray(inputs.init)[0])  # linear1.weight[0,0] is the first value of the frozen state
    assert three.log_overall[0] == pytest.approx(math.log(abs(w)) - 200 * math.log(2), abs=1e-12)
    assert three.layers[0] == "linear1" and three.log_distance[0][0] == three.log_overall[0]
    assert all(v is None for v in three.log_distance[0][1:])  # nothing else moved yet
    assert all(v is not None for v in three.log_distance[1])  # one epoch later, every layer has
    assert three.rows == (0, 1, 2, 3) and three.precision == 512 and three.scale == 200


def test_the_rates_do_not_depend_on_the_size_of_the_perturbation(default, three):
    """The linear regime: 2^-300 instead of 2^-200 shifts ln d by 100 ln 2 at every row, and nothing else."""
    smaller = sensitivity.measure(*default, epochs=3, scale=300, precision=612)
    shift = [a - b for a, b in zip(three.log_overall, smaller.log_overall)]
    assert shift == pytest.approx([100 * math.log(2)] * 4, abs=1e-9)
    assert smaller.window(0, 3).rate == pytest.approx(three.window(0, 3).rate, abs=1e-9)


def test_a_zero_parameter_is_moved_by_the_absolute_amount(default):
    spec, inputs = default
    s = sensitivity.measure(spec, inputs, epochs=1, tensor="bn1.bias", index=(0,), scale=200)
    assert s.log_overall[0] == pytest.approx(-200 * math.log(2), abs=1e-12)  # BN biases start at 0
    assert s.log_distance[0][s.layers.index("bn1")] == s.log_overall[0]


def test_too_little_precision_under_the_perturbation_is_refused(default):
    with pytest.raises(ValueError, match="leaves only 50 bits"):
        sensitivity.measure(*default, epochs=1, scale=200, precision=250)


def _series(values):
    return sensitivity.Sensitivity(spec_hash="0" * 64, tensor="linear1.weight", index=(0, 0), scale=200,
                                   precision=512, rows=tuple(range(len(values))), layers=("linear1",),
                                   log_distance=tuple((v,) for v in values), log_overall=tuple(values), seconds=0.0)


def test_window_rates_by_hand():
    s = _series([0.0, 2.0, 2.5, 6.0, 6.0])
    w = s.window(0, 4)
    assert w.rate == 1.5  # (6 - 0) / 4
    # least squares of y on x = 0..4: mean x 2, mean y 3.3; sum (x-2)(y-3.3) = 6.6+1.3+0+2.7+5.4 = 16, sum (x-2)^2 = 10
    assert w.slope == pytest.approx(1.6, abs=1e-12)
    # sub-windows of at least 2 epochs: (0,2) 1.25, (0,3) 2, (0,4) 1.5, (1,3) 2, (1,4) 4/3, (2,4) 1.75
    assert (w.low, w.high) == (1.25, 2.0)
    one = s.window(1, 2)
    assert (one.rate, one.low, one.high) == (0.5, None, None)
    assert s.layer_window("linear1", 0, 4) == w
    holed = _series([None, 1.0, 2.0])
    assert holed.window(0, 2).rate is None and holed.window(1, 2).rate == 1.0
    for bad in ((2, 2), (3, 1), (0, 5), (-1, 2)):
        with pytest.raises(ValueError, match=r"not inside rows 0\.\.4"):
            s.window(*bad)
    assert sensitivity.bits_per_epoch(math.log(2)) == 1.0
    assert sensitivity.default_windows(3) == [(0, 3)] and sensitivity.default_windows(20) == [(0, 7), (0, 20)]
    assert sensitivity.amplification(s) == 6.0


def test_the_default_spec_grows_as_an_independent_replay_measured(default):
    """Issue 14's own mpmath replay: about 1.15 ln per epoch over rows 0..7."""
    s = sensitivity.measure(*default, epochs=7)
    w = s.window(0, 7)
    assert w.rate == pytest.approx(1.15, abs=0.01)
    assert w.low is not None and w.high is not None and w.low < 1.15 < w.high


def test_a_network_without_batchnorm_is_measured_too(tmp_path):
    path = tmp_path / "nobn.toml"
    path.write_text("[model]\nbatchnorm = false\n")
    spec = load_spec(path)
    s = sensitivity.measure(spec, frozen.load(spec), epochs=2)
    assert not any(layer.startswith("bn") for layer in s.layers) and s.window(0, 2).rate is not None


def test_the_cli_prints_the_table_and_the_json_its_schema_describes(cli):
    code, out, err = cli("reference", "sensitivity", "--epochs", "2", "--window", "0..2", "--window", "1..2")
    assert code == 0, err
    assert "linear1.weight[0,0] moved by a relative 2^-200, both copies at 512 bits, 2 epochs" in out
    assert "growth over epochs 1-2:" in out and "growth over epoch 2:" in out
    code, out, err = cli("reference", "sensitivity", "--epochs", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    registry = Registry().with_resources((uri, Resource.from_contents(s)) for uri, s in schemas.all_schemas().items())
    jsonschema.Draft202012Validator(schemas.load("sensitivity"), registry=registry).validate(doc)
    assert doc["perturbation"] == {"tensor": "linear1.weight", "index": [0, 0], "relative": "2^-200"}
    assert [(w["start"], w["end"]) for w in doc["windows"]] == [(0, 2)]
    assert doc["windows"][0]["rate"] == pytest.approx((doc["log_overall"][2] - doc["log_overall"][0]) / 2)


@pytest.mark.parametrize("argv, message", [
    (["--element", "linear1.weight"], "expected TENSOR[INDEX]"),
    (["--element", "linear9.weight[0,0]"], "no parameter 'linear9.weight'"),
    (["--element", "linear1.weight[16,0]"], "out of range for linear1.weight"),
    (["--element", "linear1.bias[0,0]"], "out of range for linear1.bias"),
    (["--window", "3..2"], "expected A..B with 0 <= A < B <= 2"),
    (["--window", "0..9"], "expected A..B"),
    (["--precision", "250"], "at least --scale + 100"),
    (["--epochs", "100000"], "the spec trains"),
    (["--scale", "5"], "Invalid value for '--scale'"),
])
def test_bad_options_are_one_line_and_exit_2(cli, argv, message):
    code, out, err = cli("reference", "sensitivity", "--epochs", "2", *argv)
    assert code == 2 and not out.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnaudit: error: ") and "Traceback" not in err, err
    assert message in lines[0], lines[0]
