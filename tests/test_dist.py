"""check --tolerance dist:RATE: a run's outcome held to the band of an ensemble baseline.

A real nine-seed ensemble (five epochs) writes the baseline; a run of one of its seeds passes;
a run with a tenfold learning rate fails; ten held-out seeds fail no more often than the stated
false-alarm rate allows; and what cannot be judged (one run's baseline, another length, too few
seeds for the rate, an edited ensemble) is refused with one line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from mutations import UNKNOWN, drop, errors, put
from scipy import stats

from bnaudit import check, record
from bnaudit.errors import ExitCode

EPOCHS = "5"
RATE = "0.2"  # nine seeds: the band is the smallest and largest, a false-alarm rate of 2 / 10
LABEL = "float32_t1_native_nondet"


def _ensemble(out: Path, seeds: str, *extra: str) -> None:
    from bnaudit.cli import main

    assert main(["ensemble", "--seeds", seeds, "--epochs", EPOCHS, "--no-floor", "-j", "2", "--out", str(out),
                 "--json", *extra]) == 0


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _ensemble(root / "base", "1..9", "--baseline-out", str(root / "baseline.json"))
    _ensemble(root / "held-out", "10..19")
    return root


def _check(cli, root: Path, *args: str) -> tuple[int, dict, str]:
    code, out, err = cli("check", "--baseline", str(root / "baseline.json"), "--tolerance", f"dist:{RATE}", *args,
                         "--json")
    return code, (json.loads(out) if out.strip() else {}), err


def test_the_ensemble_baseline_holds_every_seeds_outcome_sealed(ensembles):
    raw = json.loads((ensembles / "baseline.json").read_text())
    assert errors("baseline", raw) == []
    block = raw["extra"]["baseline"]["ensemble"]
    assert block["seeds"] == list(range(1, 10)) and block["epochs"] == 5 and block["config"] == "bn"
    for seed, value in zip(block["seeds"], block["test_mse"], strict=True):
        rec = record.load(ensembles / "base" / "runs" / "runs" / f"bn-seed-{seed}" / LABEL)
        assert value == float(rec.test_loss[-1])  # exact: the JSON number is the float64
    assert raw["digest"] == record.load(ensembles / "base" / "runs" / "runs" / "bn-seed-1" / LABEL).digest
    for mutate in (put("extra", "baseline", "ensemble", UNKNOWN, value=1),
                   put("extra", "baseline", "ensemble", "seeds", value=[1]),
                   put("extra", "baseline", "ensemble", "test_mse", 0, value="much"),
                   put("extra", "baseline", "ensemble", "schema", value="bnaudit.ensemble-outcomes/2"),
                   drop("extra", "baseline", "ensemble", "unseeded")):
        changed = copy.deepcopy(raw)
        mutate(changed)
        assert errors("baseline", changed) != []


def test_a_run_of_a_baseline_seed_passes(ensembles, cli):
    code, doc, err = _check(cli, ensembles)  # a fresh run: the baseline's own configuration and first seed
    assert code == 0, err
    case = doc["cases"][0]
    assert errors("check", doc) == [] and case["verdict"] == "within"
    assert case["measured"]["band"]["k"] == 1 and case["measured"]["band"]["n"] == 9
    assert case["measured"]["band"]["false_alarm"] == pytest.approx(0.2)
    code, doc, _ = _check(cli, ensembles, "--seed", "5")
    assert code == 0 and doc["cases"][0]["verdict"] == "within"


def test_a_tenfold_learning_rate_fails(ensembles, cli, tmp_path):
    harmful = tmp_path / "lr10.toml"
    harmful.write_text("[train]\nlr = 0.1\n")
    code, _, err = _check(cli, ensembles, "--spec", str(harmful))
    assert code == ExitCode.MISMATCH and "is not the experiment of" in err and "--allow-different-spec" in err
    code, doc, err = _check(cli, ensembles, "--spec", str(harmful), "--allow-different-spec")
    assert code == ExitCode.DIFFERENT, err
    case = doc["cases"][0]
    assert case["verdict"] == "drift" and "another experiment" in case["measured"]["layer"]
    value, band = case["measured"]["value"], case["measured"]["band"]
    assert not band["low"] <= value <= band["high"]


def test_held_out_seeds_fail_no_more_often_than_the_stated_rate(ensembles, cli):
    raw = json.loads((ensembles / "baseline.json").read_text())
    values = raw["extra"]["baseline"]["ensemble"]["test_mse"]
    low, high = min(values), max(values)
    failed = 0
    for seed in range(10, 20):
        run = ensembles / "held-out" / "runs" / "runs" / f"bn-seed-{seed}" / LABEL
        code, doc, err = _check(cli, ensembles, "--record", str(run))
        outside = not low <= float(record.load(run).test_loss[-1]) <= high
        assert code == (ExitCode.DIFFERENT if outside else 0), err
        failed += outside
    # the band's rate is 2/10: ten held-out seeds failing this often must be a plausible draw from it
    assert stats.binomtest(failed, 10, check.band(values, float(RATE)).false_alarm).pvalue > 0.01, failed


def test_what_cannot_be_judged_is_refused_in_one_line(ensembles, cli, make_run, tmp_path):
    one = tmp_path / "one.json"
    code, _, err = cli("baseline", "create", "--record", str(make_run(5)), "--out", str(one))
    assert code == 0, err
    cases = [
        (["--baseline", str(one), "--tolerance", "dist:0.2"], ExitCode.MISMATCH, "one run's baseline"),
        (["--baseline", str(ensembles / "baseline.json"), "--tolerance", "dist:0.05"], ExitCode.USAGE,
         "at least 39 finite outcomes"),
        (["--baseline", str(ensembles / "baseline.json"), "--tolerance", "dist:0.2", "--record", str(make_run(3))],
         ExitCode.MISMATCH, "an outcome is compared at the ensemble's length"),
        (["--baseline", str(one), "--allow-different-spec"], ExitCode.USAGE, "only with --tolerance dist:RATE"),
        (["--baseline", str(one), "--tolerance", "dist:1.5"], ExitCode.USAGE, "between 0 and 1"),
        (["--baseline", str(one), "--tolerance", "dist:0.2:accuracy"], ExitCode.USAGE, "test_mse, train_mse"),
    ]
    for args, want, message in cases:
        code, _, err = cli("check", *args)
        assert code == want and message in err and len(err.strip().splitlines()) == 1, (args, code, err)
    kept = (ensembles / "baseline.json").read_bytes()
    code, _, err = cli("baseline", "update", "--out", str(ensembles / "baseline.json"), "--record", str(make_run(5)))
    assert code == ExitCode.USAGE and "is an ensemble baseline" in err
    code, _, err = cli("baseline", "update", "--out", str(ensembles / "baseline.json"))  # refused before a run
    assert code == ExitCode.USAGE and "is an ensemble baseline" in err and "running" not in err
    assert (ensembles / "baseline.json").read_bytes() == kept  # and it is left as it was
    edited = tmp_path / "edited.json"
    raw = json.loads((ensembles / "baseline.json").read_text())
    raw["extra"]["baseline"]["ensemble"]["test_mse"][0] *= 4  # widen the band by hand
    edited.write_text(json.dumps(raw))
    code, _, err = cli("check", "--baseline", str(edited), "--tolerance", "dist:0.2")
    assert code == ExitCode.BAD_INPUT and "edited or corrupt baseline" in err


def test_the_band_is_the_kth_order_statistic_with_its_exact_rate():
    values = [float(v) for v in range(1, 20)]  # 19 values
    b = check.band(values, 0.1)
    assert (b.k, b.low, b.high) == (1, 1.0, 19.0) and b.false_alarm == pytest.approx(0.1)
    b = check.band(values, 0.25)  # k = floor(0.25 * 20 / 2) = 2
    assert (b.k, b.low, b.high, b.false_alarm) == (2, 2.0, 18.0, 0.2)
    assert str(check.parse_tolerance("dist:0.1")) == "dist:0.1"
    assert str(check.parse_tolerance("dist:0.1:train_mse")) == "dist:0.1:train_mse"
