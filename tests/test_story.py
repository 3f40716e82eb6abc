"""The report's findings (``bnaudit.report.story``) on real short runs.

A few pairs are told pair by pair; many are told once per control, as the matrix summary
tells them: the pairs of runs that differ in that control alone, where the compared ones
part, how the gap grows, which value keeps more correct bits, the likely cause.  Pairs
that differ in several controls are counted, never put on one.  The expected counts here
come from the runs' own controls and classes, not from the story's helpers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest

from bnaudit.controls import Controls

EPOCHS = 3  # conftest's compare_runs: made once per session, shared with test_compare and test_report
CONTROLS = tuple(f.name for f in dataclasses.fields(Controls))


@pytest.fixture(scope="module")
def grid(compare_runs, make_run) -> dict[str, Path]:
    """A real 2x2 grid in float32 (threads 1, 2 x isa native, default) and the 1-ulp perturbed twin of its
    baseline: four compared pairs (threads, isa, both, the perturbation) where every control changes the bits."""
    return {"t1": compare_runs["t1"], "t2": compare_runs["t2"],
            "d1": make_run(EPOCHS, threads=1, isa="default"), "d2": make_run(EPOCHS, threads=2, isa="default"),
            "perturb": compare_runs["perturb"]}


@pytest.fixture(scope="module")
def grid_report(grid):
    from bnaudit.report import build

    return build.build_report(list(grid.values()))


def controls_apart(a, b) -> list[str]:
    """The controls two runs differ in, a perturbation counting as one more (independent of the story's)."""
    out = [k for k in CONTROLS if getattr(a.controls, k) != getattr(b.controls, k)]
    return out + (["perturb"] if a.perturb_text != b.perturb_text else [])


def alone(report, control: str) -> tuple[int, int]:
    """(pairs of runs that differ in ``control`` alone, how many of them are in different classes)."""
    pairs = [(a, b) for a, b in itertools.combinations(report.runs, 2) if controls_apart(a, b) == [control]]
    return len(pairs), sum(a.class_name != b.class_name for a, b in pairs)


def one_starting(sentences, lead: str) -> str:
    found = [s for s in sentences if s.startswith(lead)]
    assert len(found) == 1, f"{len(found)} findings start with {lead!r}: {sentences}"
    return found[0]


# --------------------------------------------------------------------------- many pairs: per control


def test_the_grid_is_told_one_sentence_per_control(grid_report) -> None:
    from bnaudit.report import story

    report = grid_report
    told = story.sentences(report, detail_up_to=0)  # grouped whatever this host's classes are
    assert told[0] == story.classes_sentence(report, compact=True)
    # the grid's pairs that differ in one control alone: fixed by the grid, whatever the bits do
    assert [alone(report, c)[0] for c in ("threads", "isa", "perturb")] == [2, 2, 1]
    for control, lead in (("threads", "threads (1 vs 2): "), ("isa", "isa (native vs default): "),
                          ("perturb", "The perturbation (none vs linear1.weight[0,0]:+1): ")):
        sentence = one_starting(told, lead)
        n, apart = alone(report, control)
        if apart:
            assert f"changes the bits in {apart} of {n} pair" in sentence, sentence
        else:
            assert f"does not change the bits ({n} pair" in sentence, sentence
        compared = [p for p in report.pairs if not p.identical
                    and controls_apart(report.run(p.a), report.run(p.b)) == [control]]
        for p in compared:  # the compared pairs' own facts, from bnaudit.compare
            assert p.first is not None and p.first.where in sentence, sentence
            if p.growth_rate is not None:
                assert f"x{math.exp(p.growth_rate):.3g} " in sentence, sentence
            if p.exact is not None and p.exact.added is not None:
                assert f"x{math.exp(abs(p.exact.added)):.3g} {'more' if p.exact.added >= 0 else 'less'}" in sentence
        with_closer = [p for p in compared if p.closer]
        if with_closer:
            shares = [int(k) for k in re.findall(r" in \d+ of (\d+)", sentence.split("closer to exact")[1])]
            assert shares and set(shares) == {len(with_closer)}, sentence
    assert not any(s.startswith("dtype") for s in told)  # one dtype: not a control here
    assert len(told) <= 6, told


def test_a_pair_that_differs_in_two_controls_is_counted_not_put_on_one(grid, make_run) -> None:
    """The pair differs in threads and in a promoted Linear, whose bits no float32 GEMM matches: apart on
    every host, whatever threads do here."""
    from bnaudit.report import build, story

    report = build.build_report([grid["t1"], make_run(EPOCHS, threads=2, promote=("linear",))])
    told = story.sentences(report, detail_up_to=0)
    both = [p for p in report.pairs if len(controls_apart(report.run(p.a), report.run(p.b))) > 1]
    (p,) = both  # the threads-2 promoted run against the baseline
    assert not p.identical
    several = [s for s in told if "several controls" in s]
    assert len(several) == 1 and several[0].startswith("1 pair compared differs in several controls"), told
    assert "(1 in threads and promote)" in several[0] and "no one control can be named the cause" in several[0]
    assert not any(p.b in s for s in told), "a two-control pair must not be told under one control"
    # told in full (few pairs), it names both controls and no single cause
    cause = story.pair_sentences(report, p)[-1]
    assert cause == (f"No single cause: {p.b} differs from {p.a} in 2 controls (threads 1 vs 2 and "
                     "promote none vs linear)."), cause


def test_controls_that_only_vary_together_are_not_told_apart(grid) -> None:
    from bnaudit.report import build, story

    report = build.build_report([grid["t1"], grid["d2"]])  # threads and isa both differ, nothing else
    told = story.sentences(report, detail_up_to=0)
    for lead in ("threads (1 vs 2): ", "isa (native vs default): "):
        name = lead.split(" ")[0]
        assert one_starting(told, lead) == (f"{lead}no two runs differ in {name} alone, so its effect is not told "
                                            "apart from the other controls'.")
    (p,) = report.pairs
    if not p.identical:
        assert ("1 pair compared differs in several controls at once (1 in threads and isa); it differs in bits"
                in " ".join(told)), told


def test_the_default_groups_beyond_three_pairs_and_says_the_bits_per_dtype(grid, grid_report) -> None:
    from bnaudit import bits
    from bnaudit.report import build, story

    report = grid_report
    grouped = len(report.pairs) > 3
    assert story.grouped(report) is grouped
    # the grid without its perturbed run: three pairs where every control changes the bits, still told in full
    plain = build.build_report([grid[k] for k in ("t1", "t2", "d1", "d2")])
    assert story.grouped(plain) is (len(plain.pairs) > 3)
    assert story.sentences(plain)[0] == story.classes_sentence(plain, compact=False)
    told = story.sentences(report)
    if grouped:
        assert told == story.sentences(report, detail_up_to=0)
    else:
        assert told == story.sentences(report, detail_up_to=len(report.pairs))
    kept = one_starting(story.sentences(report, detail_up_to=0), "Fewest correct bits")
    assert kept.startswith("Fewest correct bits against the mpmath reference (the fewest of any layer's weights or "
                           "activations at any measured epoch")
    for c in report.classes:
        value, _ = story.fewest_bits(report.references[c.members[0]])
        assert f"{bits.correct_bits_text(value)} " in kept and re.search(rf"\b{c.name}\b", kept), kept
    assert "float32" in kept and "of 24" in kept


def test_the_compact_classes_name_which_runs_are_identical(grid_report, compare_runs) -> None:
    """Every class of more than one run is named with its members; the rest are counted."""
    from bnaudit.report import build, story

    report = build.build_report([*grid_report.sources, compare_runs["rerun"]])  # the rerun joins t1's class
    (shared,) = [c for c in report.classes if len(c.members) > 1]
    text = story.classes_sentence(report, compact=True)
    single = [c.name for c in report.classes if len(c.members) == 1]
    assert text.startswith(f"The 6 runs fall into {len(report.classes)} classes of bit-identical results: "
                           f"{shared.name} (2 runs: {shared.members[0]} and {shared.members[1]})"), text
    assert text.endswith(f"the other {len(single)} runs are each a class of their own ({', '.join(single)}).")
    alone_ = story.classes_sentence(grid_report, compact=True)
    if all(len(c.members) == 1 for c in grid_report.classes):
        assert alone_ == "No two of the 5 runs are bit-identical: 5 classes of one run each (A to E, as in the " \
                         "runs table)."


# --------------------------------------------------------------------------- a few pairs: in full


def test_two_runs_keep_the_detailed_sentences(compare_runs) -> None:
    from bnaudit.report import build, story

    report = build.build_report([compare_runs["t1"], compare_runs["t2"]])
    (p,) = report.pairs
    told = story.sentences(report)
    assert not story.grouped(report)
    assert told == (story.classes_sentence(report), *story.pair_sentences(report, p), story.bits_sentence(report))
    a, b = "float32_t1_native_nondet", "float32_t2_native_nondet"
    assert (p.a, p.b) == (a, b)
    if p.identical:
        assert told[:2] == ("Both runs are bit-identical (one class).", f"{b} and {a} are bit-identical.")
        return
    assert told[0] == f"The 2 runs fall into 2 classes of bit-identical results (A: {a}; B: {b})."
    assert told[1] == f"{b} parts from {a} {story.at(p.first.text)}."
    assert f"Likely cause: config.controls.threads is 1 in {a} and 2 in {b}" in " ".join(told)


def test_a_place_in_training_reads_after_parts() -> None:
    from bnaudit.report import story

    assert story.at("epoch 1, step 1, phase forward, layer bn1, tensor bn1.out") == \
        "at epoch 1, step 1, phase forward, layer bn1, tensor bn1.out"
    assert story.at("after epoch 99 (phase update), layer linear2") == "after epoch 99 (phase update), layer linear2"
    assert story.at("eval pass after epoch 3, layer bn1") == "in the eval pass after epoch 3, layer bn1"
    assert story.at("the initial state (phase init), layer linear1") == \
        "at the initial state (phase init), layer linear1"


# --------------------------------------------------------------------------- the header and the tables' words


def test_the_header_counts_runs_and_classes_in_words(compare_runs, grid_report) -> None:
    from bnaudit.report import build, tables

    def runs_fact(report) -> str:
        return dict(tables.header_facts(report))["runs"]

    assert runs_fact(build.build_report([compare_runs["t1"], compare_runs["rerun"]])) == \
        "2 runs in 1 class of bit-identical results"
    assert runs_fact(build.build_report([compare_runs["t1"]])) == "1 run in 1 class of bit-identical results"
    n = len(grid_report.classes)
    assert runs_fact(grid_report) == f"5 runs in {n} class{'' if n == 1 else 'es'} of bit-identical results"


def test_no_finding_or_table_says_row(grid_report) -> None:
    """Epochs are the layout's words ("after epoch 3", ``layout.epochs_text`` for a span); "row" is the arrays'
    word, never the reader's."""
    from bnaudit import layout
    from bnaudit.report import story, tables

    report = grid_report
    texts = [*story.sentences(report), *story.sentences(report, detail_up_to=99)]
    for table in (tables.key_table(report), tables.pair_table(report), tables.class_table(report)):
        headers, rows = table
        texts += headers + [cell for row in rows for cell in row]
    texts += [v for _, v in tables.header_facts(report)]
    assert not [t for t in texts if re.search(r"\brows?\b", t)], [t for t in texts if re.search(r"\brows?\b", t)]
    headers, rows = tables.pair_table(report)
    for p, row in zip(report.pairs, rows, strict=True):
        if p.exact is not None and p.exact.added is not None:
            span = layout.epochs_text(p.exact.seen.start, p.exact.seen.end)
            assert row[headers.index("beyond exact arithmetic")] == f"x{math.exp(p.exact.added):.3g} over {span}"
        if p.saturation_epoch is not None:
            assert row[headers.index("saturates at")] == f"after epoch {p.saturation_epoch}"
