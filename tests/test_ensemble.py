"""bnaudit ensemble: outcome distributions over seeds, pairs compared seed by seed, and the 1-ulp floor.

A real ensemble through the CLI (four seeds, float32 against float64, three epochs, and the
floor on float32), whose every statistic is recomputed here from the records with scipy, whose
floor is checked against the floor runs' own unperturbed twins bit for bit, and which resumes
after a run is lost without redoing the others.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from mutations import UNKNOWN, Mutation, drop, errors, generic, put
from scipy import stats

from bnaudit import record
from bnaudit.errors import ExitCode
from bnaudit.matrix import ensemble

SEEDS = (1, 2, 3, 4)
ARGS = ("--seeds", "1..4", "--dtype", "float32,float64", "--epochs", "3", "-j", "2")
A, B = "bn dtype=float32", "bn dtype=float64"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from bnaudit.cli import main

    out = tmp_path_factory.mktemp("ensemble") / "e"
    assert main(["ensemble", *ARGS, "--out", str(out), "--json"]) == 0
    return out, json.loads((out / "ensemble.json").read_text())


def _final(out: Path, stage: str, dtype: str, seed: int) -> tuple[float, float, record.Record]:
    rec = record.load(out / stage / "runs" / f"bn-seed-{seed}" / f"{dtype}_t1_native_nondet")
    return float(rec.test_loss[-1]), float(rec.train_loss[-1]), rec


def test_the_pairs_statistics_are_scipys_on_the_records(made):
    out, doc = made
    assert errors("ensemble", doc) == []
    assert doc["configs"] == [A, B] and doc["seeds"] == list(SEEDS) and doc["epochs"] == 3 and doc["missing"] == []
    pair = next(p for p in doc["pairs"] if p["outcome"] == "test_mse")
    assert (pair["a"], pair["b"], pair["n"]) == (A, B, 4)
    d = np.array([_final(out, "runs", "float32", s)[0] - _final(out, "runs", "float64", s)[0] for s in SEEDS])
    assert pair["mean"] == float(d.mean()) and pair["median"] == float(np.median(d))
    assert pair["wilcoxon_p"] == float(stats.wilcoxon(d).pvalue)
    assert pair["sign_p"] == float(stats.binomtest(int((d > 0).sum()), int((d != 0).sum())).pvalue)
    assert (pair["a_better"], pair["b_better"]) == (int((d < 0).sum()), int((d > 0).sum()))
    assert pair["identical"] == 0  # float32 and float64 never compute the same bits
    assert pair["wilcoxon_p"] >= 0.125 and pair["verdict"].startswith(("indistinguishable", "no systematic"))
    dist = next(x for x in doc["distributions"] if x["config"] == A and x["outcome"] == "test_mse")
    values = [_final(out, "runs", "float32", s)[0] for s in SEEDS]
    assert dist["values"] == values and dist["median"] == float(np.median(values))
    assert dist["sd"] == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)


def test_the_floor_is_each_seeds_one_ulp_twin_against_the_same_seeds_run(made):
    out, doc = made
    floor = next(f for f in doc["floors"] if f["outcome"] == "test_mse")
    assert floor["config"] == A and floor["perturb"] == "linear1.weight[0,0]:+1" and floor["seeds"] == list(SEEDS)
    for seed, e in zip(SEEDS, floor["differences"], strict=True):
        plain_test, _, plain = _final(out, "runs", "float32", seed)
        moved_test, _, moved = _final(out, "floor", "float32", seed)
        assert e == moved_test - plain_test
        # the floor run's unperturbed twin, trained in its own process, is the ensemble's run bit for bit
        assert moved.floor is not None
        assert list(moved.floor.twin_digest_rows) == [format(int(x), "016x") for x in record.row_digests(
            plain.epoch_digests)]
    pair = next(p for p in doc["pairs"] if p["outcome"] == "test_mse")
    abs_d = [abs(_final(out, "runs", "float32", s)[0] - _final(out, "runs", "float64", s)[0]) for s in SEEDS]
    want = stats.mannwhitneyu(abs_d, [abs(x) for x in floor["differences"]], alternative="two-sided").pvalue
    assert pair["floor_mwu_p"] == float(want)


def test_the_report_and_figures_are_written(made):
    out, doc = made
    md = (out / "ensemble.md").read_text()
    assert md.startswith("### bnaudit ensemble: 2 configurations x 4 seeds, 3 epochs each (seeds draw init+order)")
    assert doc["pairs"][0]["verdict"] in md and "The 1-ulp floor" in md
    for name in ("distributions", "differences", "epochs"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_lost_run_is_reported_then_redone_alone(made, cli):
    out, _ = made
    lost = out / "runs" / "runs" / "bn-seed-3" / "float64_t1_native_nondet"
    kept = out / "runs" / "runs" / "bn-seed-2" / "float64_t1_native_nondet" / "record.json"
    stamp = os.stat(kept).st_mtime_ns
    saved = lost.with_name("saved")
    lost.rename(saved)  # as if the run had been interrupted before it wrote its record
    code, stdout, _ = cli("ensemble", *ARGS, "--out", str(out), "--collect", "--json")
    assert code == 0
    partial = json.loads(stdout)
    assert partial["missing"] == ["bn-seed-3/float64_t1_native_nondet"]
    assert [p["n"] for p in partial["pairs"]] == [3, 3]  # the pair on the seeds both have
    code, stdout, _ = cli("ensemble", *ARGS, "--out", str(out), "--json")
    assert code == 0 and json.loads(stdout)["missing"] == []
    summary = json.loads((out / "runs" / "summary.json").read_text())
    ran = [r["key"] for r in summary["runs"] if r["status"] == "ran"]
    assert ran == ["bn-seed-3/float64_t1_native_nondet"] and os.stat(kept).st_mtime_ns == stamp
    assert record.load(lost).digest == record.load(saved).digest  # and it is the same run, bit for bit


@pytest.mark.parametrize("args, message", [
    (["--seeds", "1"], "at least two seeds"),
    (["--networks", "bn,resnet"], "choose from bn, no-bn"),
    (["--collect", "--scheduler", "tcp://127.0.0.1:1"], "--collect runs nothing"),
    (["--seeds", "1..3", "--epochs", "0"], "--epochs must be between 1"),
    (["--perturb", "linear9.weight[0,0]:1"], "no tensor"),
])
def test_a_bad_ensemble_is_one_line_and_exit_2_before_anything_runs(cli, tmp_path, args, message):
    code, _, err = cli("ensemble", *args, "--out", str(tmp_path / "e"))
    assert code == ExitCode.USAGE, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def _outcomes(values: list[float], digest: str = "") -> dict[int, ensemble.Outcome]:
    return {s: ensemble.Outcome(seed=s, digest=digest or f"d{s}-{v}", path="", train=np.array([1.0, v]),
                                test=np.array([1.0, v])) for s, v in enumerate(values, start=1)}


def test_the_verdict_says_identical_systematic_or_noise_as_the_numbers_do():
    same = _outcomes([1.0, 2.0, 3.0], digest="x")
    assert ensemble.paired("a", "b", "test_mse", same, same, None).verdict.startswith("bit-identical on all 3 seeds")
    worse = _outcomes([2.0 + k / 10 for k in range(12)])
    better = _outcomes([1.0 + k / 7 for k in range(12)])
    p = ensemble.paired("a", "b", "test_mse", worse, better, None)
    assert p.b_better == 12 and p.wilcoxon_p == float(stats.wilcoxon([2.0 + k / 10 - 1 - k / 7 for k in range(12)])
                                                      .pvalue)
    assert p.verdict.startswith("systematic: a has the higher test MSE on 12 of 12 seeds")
    assert p.mean_ci is not None and p.mean_ci.low > 0 and p.rank_biserial == 1.0


def test_bn_is_paired_with_no_bn_in_the_same_controls():
    assert ensemble.pairs_of(["bn isa=default", "bn isa=avx2", "no-bn isa=default", "no-bn isa=avx2"]) == [
        ("bn isa=default", "bn isa=avx2"), ("no-bn isa=default", "no-bn isa=avx2"),
        ("bn isa=default", "no-bn isa=default"), ("bn isa=avx2", "no-bn isa=avx2")]


MUTATIONS: dict[str, list[tuple[str, str, Mutation]]] = {
    "ensemble": [
        ("made", "one seed", put("seeds", value=[1])),
        ("made", "unknown network", put("networks", value=["resnet"])),
        ("made", "unknown seed stream", put("scope", 0, value="weights")),
        ("made", "alpha above a half", put("alpha", value=0.9)),
        ("made", "distribution unknown key", put("distributions", 0, UNKNOWN, value=1)),
        ("made", "distribution of an unknown outcome", put("distributions", 0, "outcome", value="accuracy")),
        ("made", "pair p above one", put("pairs", 0, "wilcoxon_p", value=1.5)),
        ("made", "pair without its verdict", drop("pairs", 0, "verdict")),
        ("made", "pair interval without its end", drop("pairs", 0, "mean_ci", "high")),
        ("made", "rank-biserial above one", put("pairs", 0, "rank_biserial", value=2.0)),
        ("made", "floor unknown key", put("floors", 0, UNKNOWN, value=1)),
        ("made", "band row negative", put("bands", 0, "rows", 0, value=-1)),
        ("made", "spec hash short", put("spec_hash", value="abc")),
    ],
}
"""Per schema (tests/test_schemas.py asks for them here): (document, what is wrong, the mutation), with the generic."""


def test_the_ensemble_schema_refuses_mutated_real_answers(made):
    _, doc = made
    accepted = []
    for name, cases in MUTATIONS.items():
        for label, what, mutate in [*cases, *(("made", w, f) for w, f in generic(doc))]:
            changed = copy.deepcopy(doc)
            mutate(changed)
            if errors(name, changed) == []:
                accepted.append(f"{label}: {what}")
    assert accepted == []
    assert math.isfinite(doc["pairs"][0]["mean"])
