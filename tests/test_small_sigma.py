"""The small-sigma regime of the seed page's BN caution (examples/small-sigma), measured by the operator audit.

Real 1-epoch runs of two committed variants, audited at row 0 (the initial parameters): at input scale 2 the
first BN's batch variance is hundreds of eps and nothing is flagged; at scale 0.0002 it is
far below eps, every unit of bn1 is flagged, the amplification of an input's relative
error approaches max|x| / sqrt(eps), and BN's output, measured at its own (cancelled)
value, is off by thousands of ulps although the operator rounds well at its scale.  These
are properties of the data and of BN's formula, the same on every host.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bnaudit.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "small-sigma"


@pytest.fixture(scope="module")
def audited(make_run):
    return {s: make_run(1, spec_path=EXAMPLES / f"scale-{s}.toml") for s in ("2", "0.0002")}


def _audit(run: Path) -> dict:
    return json.loads((run / "record.json").read_text())["extra"]["operator_audit"]


def test_the_variants_are_the_default_experiment_with_smaller_inputs_and_no_noise_feature():
    for s in ("2", "0.2", "0.02", "0.002", "0.0002"):
        spec = load_spec(EXAMPLES / f"scale-{s}.toml")
        assert (spec.data.x_low, spec.data.x_high, spec.data.noise_feature) == (-float(s), float(s), False)
        assert spec.model.batchnorm and spec.model.bn_eps == 1e-5


def test_at_input_scale_2_no_bn_unit_is_flagged(audited):
    audit = _audit(audited["2"])
    assert audit["n_flags"] == 0
    var = np.load(audited["2"] / "min_var.npy")
    assert var[1, 0] > 100  # the first BN's smallest batch variance over the epoch, in units of eps


def test_at_input_scale_0_0002_every_unit_of_the_first_bn_is_flagged_and_its_output_cancels(audited):
    audit = _audit(audited["0.0002"])
    var = np.load(audited["0.0002"] / "min_var.npy")
    assert var[1, 0] < 1e-6
    bn1 = [f for f in audit["flags"] if f["layer"] == "bn1" and f["row"] == 0]
    assert len(bn1) == 16 and all(f["var_over_eps"] < 1e-2 and f["mean_over_std"] > 100 for f in bn1)
    # the amplification max|x| / sqrt(var + eps) is bounded by the input's size over sqrt(eps)
    assert 50 < max(audit["max_amplification"]["bn1"]) < 1 / math.sqrt(1e-5)
    assert audit["worst"]["bn1"]["bn.out"] < 4              # rounds well at the operator's scale ...
    assert max(audit["errors_at_value"]["bn1"]["bn.out"]) > 1000   # ... not at its own cancelled value
