"""One vocabulary, one length rule, honest headers and 80 columns, on real runs.

Words for epochs are the layout's: "the initial state" is before training, "after epoch
N" counts epochs from 1, a step is "epoch E, step S" (from 1); no view says "row".  Runs
of different lengths are compared over the epochs they all ran, said in one line.
"""

from __future__ import annotations

import io
import re

import pytest

from bnaudit import api, check, compare, record
from bnaudit.baseline import load_baseline
from bnaudit.layout import after, during, epochs_text, nonfinite_when
from bnaudit.report import ci_summary, compare_view, junit, reference_view
from bnaudit.report import console as console_policy

ROW = re.compile(r"\brows?\b|epoch row|end of epoch|epoch 0\b|step 0\b")
"""What no user-facing line may say any more."""


@pytest.fixture(scope="module")
def runs(compare_runs):
    return compare_runs


@pytest.fixture(scope="module")
def apart(runs, make_run) -> tuple[record.Fingerprint, record.Fingerprint]:
    """Two runs whose training parts in the first step's forward pass on every host: float32, and float32 with
    Linear promoted (computed in float64, rounded once), which no float32 GEMM matches in every element."""
    return record.load(runs["t1"]), record.load(make_run(3, threads=1, promote=("linear",)))


def _terminal(render, *args) -> str:
    """What a view prints on an 80-column terminal."""
    out = console_policy.Console(file=io.StringIO(), force_terminal=True, width=80, record=True, color_system=None)
    render(*args, out)
    return out.export_text()


def test_the_words_for_epochs():
    assert after(0) == "the initial state"
    assert after(1) == "after epoch 1" and after(300) == "after epoch 300"
    assert during(0, 0) == "epoch 1, step 1" and during(4, 2) == "epoch 5, step 3"
    assert epochs_text(0, 7) == "epochs 1-7" and epochs_text(2, 3) == "epoch 3" and epochs_text(1, 3) == "epochs 2-3"
    # A record's non-finite place is 0-based (epoch, step), or (epoch, None) at an epoch's end.
    assert nonfinite_when({"epoch": 2, "step": 3}) == "epoch 3, step 4"
    assert nonfinite_when({"epoch": 2, "step": None}) == "after epoch 3"
    assert nonfinite_when({"epoch": "2", "step": 3}) == nonfinite_when({"epoch": True}) == "at an unrecorded epoch"


def test_compare_names_the_first_step_from_1_and_says_no_row(apart):
    c = compare.compare_pair(*apart)
    assert c.first is not None and (c.first.epoch, c.first.step) == (0, 0)  # the data stay 0-based
    assert c.first.where.startswith("epoch 1, step 1, phase forward, layer ")
    text = _terminal(compare_view.render, c) + compare_view.markdown(c)
    assert "first step (epoch 1, step 1)" in text and "after each epoch shown (0: the initial state" in text
    assert not ROW.search(text), ROW.search(text)
    eval_first = c.eval_first
    assert eval_first is not None and eval_first.where.startswith(
        "eval pass over the initial parameters" if eval_first.row == 0 else f"eval pass after epoch {eval_first.row}")


def test_a_perturbation_at_the_initial_state_is_named_so(runs):
    c = compare.compare_pair(record.load(runs["t1"]), record.load(runs["perturb"]))
    assert c.first is not None and c.first.row == 0 and c.first.where.startswith("the initial state (phase init)")
    assert compare_view.first_short(c.first).startswith("initial state: ")


def test_run_summary_tables_use_the_words_and_fit_80_columns(runs):
    fp = record.load(runs["t1"])
    assert fp.divergence is not None and fp.audit is not None
    divergence = _terminal(lambda b, out: reference_view.render_divergence(b, out=out), fp.divergence)
    audit = _terminal(lambda b, out: reference_view.render_audit(b, out=out), fp.audit)
    words = " ".join(divergence.split())  # wrapped at spaces on the terminal: the words are the line's
    assert fp.divergence.fewest().text in words
    assert "eN: after epoch N, e0: the initial state" in words
    assert "operator audit (float32), the initial state" in audit
    for text in (divergence, audit):
        assert not ROW.search(text), ROW.search(text)
        assert max(len(line) for line in text.splitlines()) <= 80


def test_fewest_correct_bits_has_one_definition(runs):
    """check's bits:N measure is the block's fewest: every layer's weights and activations, every epoch."""
    fp = record.load(runs["t1"])
    block = fp.divergence
    assert block is not None
    f = block.fewest()
    every = [(float(block.correct_bits[i, j]), block.rows[j], block.names[i])
             for i in range(len(block.names)) for j in range(len(block.rows))]
    low = min(every)
    assert (f.bits, f.row, f.series) == (low[0], low[1], low[2])
    assert any(name.endswith("activations") for name in block.names)  # the definition covers activations
    m = check.measure_bits(fp)
    assert (m.value, m.row, m.layer) == (f.bits, f.row, f.series)
    assert f.text.startswith(f"fewest correct bits {int(f.bits * 10) / 10:.1f} of 24 ({f.series}, {after(f.row)}): ")


def test_the_audit_header_names_the_audited_epochs():
    assert reference_view.audited_text((0,)) == "the initial state"
    assert reference_view.audited_text((0, 10, 20)) == "the initial state and after epochs 10 and 20"
    assert reference_view.audited_text((0, 10)) == "the initial state and after epoch 10"
    assert reference_view.audited_text((10, 20, 30)) == "after epochs 10, 20 and 30"
    assert reference_view.audited_text(tuple(range(0, 101, 10))) == (
        "the initial state and after epochs 10, 20, 30, 40, 50, 60, ... and 100")


def test_a_spec_without_bn_shows_no_bn_columns_and_no_flags(runs):
    fp = record.load(runs["nobn"])
    assert fp.audit is not None
    assert reference_view.audit_operators(fp.audit) == ("linear.out",)
    text = _terminal(lambda b, out: reference_view.render_audit(b, out=out), fp.audit)
    assert "linear.out" in text and "bn." not in text and "flagged BN units" not in text
    with_bn = _terminal(lambda b, out: reference_view.render_audit(b, out=out), record.load(runs["t1"]).audit)
    assert "bn.invstd" in with_bn and "flagged BN units" in with_bn


def test_compare_at_80_columns_wraps_and_keeps_every_word(apart):
    c = compare.compare_pair(*apart)
    text = _terminal(compare_view.render, c)
    assert max(len(line) for line in text.splitlines()) <= 80
    # Wrapped at spaces (a word longer than the line, such as a path, folded): nothing dropped or cut.
    plain = console_policy.Console(file=io.StringIO(), record=True, width=80, color_system=None)
    compare_view.render(c, plain)
    whole = plain.export_text()
    assert "".join(text.split()) == "".join(whole.split())
    assert max(len(line) for line in whole.splitlines()) > 80  # off a terminal: whole lines


def test_different_lengths_are_compared_on_the_common_prefix_in_compare_check_and_report(make_run, runs, tmp_path,
                                                                                       cli):
    t1, two = runs["t1"], make_run(2, threads=1)
    code, out, err = cli("compare", str(t1), str(two))
    assert code == 0 and "bit-identical" in out
    assert "  lengths: runs of 2 and 3 epochs: compared over the first 2 (--same-length refuses)" in out
    code, out, err = cli("compare", str(t1), str(two), "--same-length")
    assert code == 4 and out == "" and err.count("\n") == 1 and "refusing runs of different lengths" in err
    # check: a baseline of 3 epochs holds a 2-epoch run to its first 2, and says so
    baseline = tmp_path / "base.json"
    assert cli("baseline", "create", "--record", str(t1), "--out", str(baseline))[0] == 0
    code, out, _ = cli("check", "--baseline", str(baseline), "--record", str(two))
    assert code == 0 and "bit-identical to baseline" in out and "(first 2 of the baseline's 3 epochs)" in out
    code, _, err = cli("check", "--baseline", str(baseline), "--record", str(two), "--same-length")
    assert code == 4 and "refused by --same-length" in err and err.count("\n") == 1
    # report: one class over the common epochs, and the line that says so
    built = api_report(t1, two)
    assert len(built.classes) == 1 and built.lengths == (3, 2)
    assert compare.prefix_text(built.lengths) == "runs of 2 and 3 epochs: compared over the first 2 " \
                                                 "(--same-length refuses)"


def api_report(*paths):
    from bnaudit.report import build

    return build.build_report(list(paths))


def test_junit_says_when_the_checked_records_were_temporary(runs, tmp_path, cli):
    baseline = tmp_path / "base.json"
    assert cli("baseline", "create", "--record", str(runs["t1"]), "--out", str(baseline))[0] == 0
    pairs = [(load_baseline(baseline, key=None), record.load(runs["t2"]))]
    kept = check.run_check(pairs, check.parse_tolerance("exact"))
    gone = check.run_check(pairs, check.parse_tolerance("exact"), kept=False)
    assert kept.cases[0].kept and not gone.cases[0].kept
    assert gone.cases[0].to_dict()["candidate_kept"] is False
    assert f"run: {runs['t2']}" in junit.to_xml(kept)
    xml = junit.to_xml(gone)
    assert "made in a temporary folder that is gone after the check" in xml and str(runs["t2"]) not in xml
    assert ci_summary.case_line(gone.cases[0]) == ci_summary.case_line(kept.cases[0])


def test_the_run_says_what_it_does_after_its_last_epoch(tmp_path):
    events: list[dict] = []
    api.run(epochs=1, out=tmp_path / "r", on_progress=events.append)
    stages = [e["stage"] for e in events if "stage" in e]
    assert stages == ["audit", "vs reference", "writing record"]
    assert all(e["epoch"] == e["epochs"] == 1 for e in events if "stage" in e)
    assert [e["epoch"] for e in events if "stage" not in e][-1] == 1


def test_a_narrow_terminal_spreads_the_correct_bits_columns_over_the_run():
    rows = list(range(0, 101)) + list(range(110, 1001, 10))  # the reference's stored epochs of 1000
    assert [rows[i] for i in reference_view._sample_columns(rows, 6)] == [0, 5, 30, 200, 1000]
    assert [rows[i] for i in reference_view._sample_columns(rows, 12)] == [0, 1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 1000]
