"""Summarising a matrix folder from its records alone: one function per analysis.

``summarise`` loads every finished record of the plan, then, per experiment variant:

- ``classes``: classes of identical fingerprints (``compare.equivalence_classes``);
- ``control_verdict``: for each control that varies, from the pairs of runs that differ in
  it alone, whether it changes the bits, where it first does and how far the runs part;
- ``isa_agreements``: under which combinations of the other controls two ``--isa``
  settings agree bit for bit;
- ``machine_pairs``: the same configuration on two CPUs, where they part and how the gap grows;

and, over the whole plan, ``run_rows`` (with the slowdown of emulation) and ``notes``.  The
sentences come from ``findings``.  The analyses share their pair comparisons through
``Comparisons``: the cpu_model verdict and the CPU pairs compare the same pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import bits, compare, emulate, fileio, record
from bnaudit.compare import Difference, PairComparison
from bnaudit.controls import Controls
from bnaudit.layout import keyframe_schedule
from bnaudit.matrix import execute, folder
from bnaudit.matrix.execute import EventFn, Execution
from bnaudit.matrix.findings import findings
from bnaudit.matrix.plan import CONTROL_FIELDS, Plan, PlannedRun
from bnaudit.matrix.results import (
    Change,
    ClassRow,
    ControlVerdict,
    IsaAgreement,
    Largest,
    MachinePair,
    MatrixSummary,
    RunRow,
)
from bnaudit.record import Fingerprint, Record

CONTROLS_PREFIX = "config.controls."
"""How ``compare.facts`` names a control (``config.controls.threads``)."""


@dataclasses.dataclass(frozen=True)
class VariantRuns:
    """The finished runs of one experiment variant, in grid order."""

    variant: str
    """The variant's name."""
    keys: tuple[str, ...]
    """Run keys, in grid order."""
    controls: Mapping[str, Controls]
    """Each run's controls."""
    fingerprints: Mapping[str, Fingerprint]
    """Each run's fingerprint."""

    def groups(self, without: str) -> dict[tuple[Any, ...], list[str]]:
        """The runs grouped by their values of every control but ``without`` (groups and members in grid order)."""
        out: dict[tuple[Any, ...], list[str]] = {}
        for k in self.keys:
            c = self.controls[k]
            out.setdefault(tuple(getattr(c, f) for f in CONTROL_FIELDS if f != without), []).append(k)
        return out

    def identical(self, a: str, b: str) -> bool:
        fa, fb = record.comparable([self.fingerprints[a], self.fingerprints[b]])
        return fa.digest == fb.digest


class Comparisons:
    """``compare.compare_pair`` of two finished runs, computed at most once per pair."""

    def __init__(self, fingerprints: Mapping[str, Fingerprint]) -> None:
        self._fingerprints = fingerprints
        self._done: dict[tuple[str, str], PairComparison] = {}

    def __call__(self, a: str, b: str) -> PairComparison:
        if (a, b) not in self._done:
            # Runs of two dtypes have different storage: compared all the same, values aside.
            self._done[(a, b)] = compare.compare_pair(self._fingerprints[a], self._fingerprints[b],
                                                      allow_different_spec=True)
        return self._done[(a, b)]


# --------------------------------------------------------------------------- differences of a pair

def _change(diff: Difference, a: str, b: str) -> Change:
    return Change(epoch=diff.epoch, step=diff.step, phase=diff.phase, layer=diff.layer, tensor=diff.tensor,
                  where=diff.where, a=a, b=b)


def _value_gap(fa: Fingerprint, fb: Fingerprint) -> tuple[np.ndarray, np.ndarray] | None:
    """(keyframe rows both have, |a - b| per row and parameter element), or None if none or other parameters.

    The stored values are compared as float64, exact for every storage dtype, so that runs of two
    dtypes compare too; NaN (one side non-finite) counts as inf.
    """
    rows, ia, ib = np.intersect1d(fa.keyframe_rows, fb.keyframe_rows, return_indices=True)
    if not len(rows) or [n for n, _ in fa.params] != [n for n, _ in fb.params]:
        return None
    with np.errstate(invalid="ignore"):
        gap = np.abs(bits.to_float64(fa.keyframes[ia], fa.storage) - bits.to_float64(fb.keyframes[ib], fb.storage))
    return rows, np.where(np.isnan(gap), np.inf, gap)


def _largest(pc: PairComparison, fa: Fingerprint, fb: Fingerprint, a: str, b: str) -> Largest | None:
    """The largest divergence of a differing pair (across storage dtypes: |a - b| in float64 only)."""
    div = pc.divergence
    if div is not None and div.rows and div.layers:
        i, j = np.unravel_index(int(np.argmax(div.max_abs)), div.max_abs.shape)
        return Largest(max_abs=float(div.max_abs[i, j]), max_ulps=int(div.max_ulps.max()), row=int(div.rows[i]),
                       layer=str(div.layers[j]), a=a, b=b)
    found = _value_gap(fa, fb)  # no per-layer divergence: different storage dtypes
    if found is None:
        return None
    rows, gap = found
    i, k = np.unravel_index(int(np.argmax(gap)), gap.shape)
    layer_of = [name.split(".")[0] for name, shape in fa.params for _ in range(int(np.prod(shape)))]
    return Largest(max_abs=float(gap[i, k]), max_ulps=None, row=int(rows[i]), layer=layer_of[k], a=a, b=b)


def _distance_rows(fa: Fingerprint, fb: Fingerprint) -> dict[int, float]:
    """Epoch row -> largest |a - b| over all parameters (``_value_gap``)."""
    found = _value_gap(fa, fb)
    if found is None:
        return {}
    rows, gap = found
    return {int(r): float(v) for r, v in zip(rows, gap.max(axis=1), strict=True)}


def _series(pc: PairComparison) -> tuple[tuple[int, float], ...]:
    """(epoch row, largest parameter difference) at the keyframe rows and the last row."""
    div = pc.divergence
    if div is None or not div.rows:
        return ()
    marks = set(keyframe_schedule(max(div.rows))) | {div.rows[-1]}
    return tuple((int(r), float(v)) for r, v in zip(div.rows, div.overall(), strict=True) if r in marks)


# --------------------------------------------------------------------------- the analyses

def classes(runs: VariantRuns) -> list[ClassRow]:
    """The variant's classes of identical fingerprints, numbered in grid order of their first member."""
    out = []
    for n, cls in enumerate(compare.equivalence_classes([runs.fingerprints[k] for k in runs.keys]), start=1):
        members = tuple(runs.keys[i] for i in cls.indices)
        common = dict(cls.common)
        shared = {f: common[CONTROLS_PREFIX + f] for f in CONTROL_FIELDS if CONTROLS_PREFIX + f in common}
        block = runs.fingerprints[members[0]].divergence
        last = None if block is None else block.last_bits()
        out.append(ClassRow(variant=runs.variant, index=n, digest=cls.digest, members=members, shared=shared,
                            reference=None if last is None else last[1],
                            reference_row=None if last is None else last[0]))
    return out


def control_verdict(runs: VariantRuns, control: str, values: Sequence[Any], compared: Comparisons) -> ControlVerdict:
    """Does ``control`` change the bits: every pair of runs that differ in it alone, compared."""
    n_pairs = differing = 0
    largest: Largest | None = None
    first: Change | None = None
    firsts: Counter[str] = Counter()
    per_dtype: dict[str, list[int]] = {}  # dtype -> [differing pairs, pairs]
    for group in runs.groups(without=control).values():
        for a, b in itertools.combinations(group, 2):
            n_pairs += 1
            tally = per_dtype.setdefault(runs.controls[a].dtype, [0, 0])
            tally[1] += 1
            if runs.identical(a, b):
                continue
            differing += 1
            tally[0] += 1
            pc = compared(a, b)
            if pc.first is not None:
                change = _change(pc.first, a, b)
                firsts[f"{change.phase} {change.layer} {change.tensor or '(group)'}"] += 1
                if first is None or change.position() < first.position():
                    first = change
            big = _largest(pc, runs.fingerprints[a], runs.fingerprints[b], a, b)
            if big is not None and (largest is None or not big.max_abs <= largest.max_abs):  # NaN wins
                largest = big
    return ControlVerdict(
        variant=runs.variant, control=control, values=tuple(values), pairs=n_pairs, differing=differing,
        largest=largest, first=first, firsts=tuple(firsts.most_common()),
        by_dtype=() if control == "dtype" else tuple((d, n, m) for d, (n, m) in per_dtype.items()))


def isa_agreements(runs: VariantRuns, varying: Sequence[str]) -> list[IsaAgreement]:
    """For each pair of --isa settings, the combinations of the other controls under which they agree."""
    others = [f for f in CONTROL_FIELDS if f != "isa"]
    table: dict[tuple[str, str], tuple[int, list[dict[str, Any]]]] = {}
    for combo, group in runs.groups(without="isa").items():
        for a, b in itertools.combinations(group, 2):
            settings = (runs.controls[a].isa, runs.controls[b].isa)
            n, agree = table.get(settings, (0, []))
            if runs.identical(a, b):  # name the controls that vary in the grid
                agree.append({f: v for f, v in zip(others, combo, strict=True) if f in varying})
            table[settings] = (n + 1, agree)
    return [IsaAgreement(variant=runs.variant, a=sa, b=sb, compared=n, agree=tuple(agree))
            for (sa, sb), (n, agree) in table.items()]


def _float64_distance(plan: Plan, a: PlannedRun, b: PlannedRun,
                      fingerprints: Mapping[str, Fingerprint]) -> tuple[tuple[int, float, float], ...]:
    """Each run's distance from the float64 run of its configuration on its own CPU (see MachinePair)."""
    if a.controls.dtype == "float64":
        return ()
    distances = []
    for run in (a, b):
        twin = plan.twin(run, dtype="float64")
        if twin is None or twin.key not in fingerprints:
            return ()
        distances.append(_distance_rows(fingerprints[run.key], fingerprints[twin.key]))
    marks = set(keyframe_schedule(plan.epochs))
    return tuple((r, distances[0][r], distances[1][r]) for r in sorted(set(distances[0]) & set(distances[1]) & marks))


def machine_pairs(plan: Plan, runs: VariantRuns, compared: Comparisons) -> list[MachinePair]:
    """Every pair of runs that differ in the CPU alone: where they part, how the gap grows, which is nearer exact."""
    by_key = {r.key: r for r in plan.runs}
    out = []
    for group in runs.groups(without="cpu_model").values():
        for a, b in itertools.combinations(group, 2):
            ca, cb = runs.controls[a], runs.controls[b]
            pc = compared(a, b)
            out.append(MachinePair(
                variant=runs.variant, a=a, b=b, cpu_a=ca.cpu_model or "native", cpu_b=cb.cpu_model or "native",
                controls={f: v for f, v in ca.to_json().items() if f != "cpu_model"},
                identical=pc.identical, first=None if pc.first is None else _change(pc.first, a, b),
                growth_rate=pc.growth_rate, saturation_epoch=pc.saturation_epoch, series=_series(pc),
                closer_to_reference=pc.closer_to_reference,
                final_train_loss=(float(pc.final_train_loss[0]), float(pc.final_train_loss[1])),
                float64_distance=_float64_distance(plan, by_key[a], by_key[b], runs.fingerprints)))
    return out


def _slowdown(plan: Plan, run: PlannedRun, records: Mapping[str, Record]) -> float | None:
    """An emulated run's train_seconds over its native twin's, when both are finished."""
    if run.controls.cpu_model is None or run.key not in records:
        return None
    twin = plan.twin(run, cpu_model=None)
    if twin is None or twin.key not in records:
        return None
    return emulate.Slowdown(float(records[run.key].meta["train_seconds"]),
                            float(records[twin.key].meta["train_seconds"])).factor


def run_rows(plan: Plan, records: Mapping[str, Record], status: Mapping[str, tuple[str, str | None]],
             class_of: Mapping[str, int]) -> list[RunRow]:
    """Every configuration: its status, its class, what its process read back, its losses and slowdown."""
    rows = []
    for run in plan.runs:
        rec = records.get(run.key)
        fp = None if rec is None else rec.fingerprint
        state, error = status[run.key]
        rows.append(RunRow(
            key=run.key, variant=run.variant, controls=run.controls.to_json(), status=state,
            digest=None if fp is None else fp.digest, class_index=class_of.get(run.key),
            capability=None if fp is None else fp.effective.get("cpu_capability"),
            threads_read_back=None if fp is None else fp.effective.get("intra_op_threads"),
            emulated_model=None if fp is None else fp.environment.get("emulated_cpu_model"),
            train_seconds=None if rec is None else float(rec.meta["train_seconds"]),
            slowdown=_slowdown(plan, run, records),
            final_train_loss=None if fp is None else float(fp.train_loss[-1]),
            final_test_loss=None if fp is None else float(fp.test_loss[-1]),
            nonfinite=bool(fp is not None and fp.nonfinite), error=error))
    return rows


def notes(rows: Sequence[RunRow], class_rows: Sequence[ClassRow]) -> list[str]:
    """Caveats: failed and pending configurations, and a missing reference."""
    out = []
    failed = sum(r.status == "failed" for r in rows)
    pending = sum(r.status == "pending" for r in rows)
    if failed:
        out.append(f"{failed} configuration(s) failed and are left out of the comparisons; "
                   "re-run the same command to retry them")
    if pending:
        out.append(f"{pending} configuration(s) have not run yet")
    if class_rows and not any(c.reference for c in class_rows):
        out.append("no record carries a divergence from the mpmath reference (extra \"divergence\"): "
                   "closeness to the reference is not reported")
    return out


# --------------------------------------------------------------------------- the whole summary

def statuses(plan: Plan, finished: Mapping[str, Record],
             execution: Execution | None) -> dict[str, tuple[str, str | None]]:
    """Run key -> (ran | resumed | failed | pending, the failure's message)."""
    out: dict[str, tuple[str, str | None]] = {}
    if execution is not None:
        out.update({k: ("ran", None) for k in execution.ran})
        out.update({k: ("resumed", None) for k in execution.resumed})
        out.update({f.key: ("failed", f.message) for f in execution.failures})
    for run in plan.runs:
        if run.key in finished:
            out.setdefault(run.key, ("resumed", None))
        elif run.key not in out or out[run.key][0] != "failed":
            out[run.key] = ("pending", None)
    return out


def variant_runs(plan: Plan, variant: str, finished: Mapping[str, Record]) -> VariantRuns:
    keys = tuple(r.key for r in plan.runs if r.variant == variant and r.key in finished)
    return VariantRuns(variant=variant, keys=keys, controls={r.key: r.controls for r in plan.runs},
                       fingerprints={k: finished[k].fingerprint for k in keys})


def summarise(plan: Plan, out: Path, execution: Execution | None = None) -> MatrixSummary:
    """Read every record of the matrix folder and answer: which controls change the bits, and how."""
    out = Path(out)
    finished = {run.key: rec for run in plan.runs if (rec := folder.finished(plan, run, out)) is not None}
    compared = Comparisons({k: rec.fingerprint for k, rec in finished.items()})
    class_rows: list[ClassRow] = []
    verdicts: list[ControlVerdict] = []
    agreements: list[IsaAgreement] = []
    machines: list[MachinePair] = []
    for variant in plan.variants:
        runs = variant_runs(plan, variant.name, finished)
        if not runs.keys:
            continue
        class_rows += classes(runs)
        verdicts += [control_verdict(runs, c, getattr(plan.grid, c), compared) for c in plan.grid.varying()]
        if len(plan.grid.isa) > 1:
            agreements += isa_agreements(runs, plan.grid.varying())
        if len(plan.grid.cpu_model) > 1:
            machines += machine_pairs(plan, runs, compared)
    rows = run_rows(plan, finished, statuses(plan, finished, execution),
                    {m: c.index for c in class_rows for m in c.members})
    summary = MatrixSummary(
        plan_id=plan.plan_id, preset=plan.preset, folder=str(out), epochs=plan.epochs,
        variants=tuple((v.name, v.spec.hash) for v in plan.variants), grid=plan.grid.to_dict(), runs=tuple(rows),
        classes=tuple(class_rows), verdicts=tuple(verdicts), isa_agreement=tuple(agreements),
        machines=tuple(machines), wall_seconds=None if execution is None else execution.wall_seconds,
        notes=tuple(notes(rows, class_rows)),
        hosts=tuple(sorted({str(rec.fingerprint.environment.get("cpu_model") or "unknown CPU")
                            for rec in finished.values()})))
    return dataclasses.replace(summary, findings=findings(summary))


def write_summary(summary: MatrixSummary, out: Path, markdown: str) -> None:
    """summary.json and summary.md, each written under a temporary name and renamed."""
    fileio.write_text_atomic(Path(out) / "summary.json", fileio.dumps(summary.to_dict()))
    fileio.write_text_atomic(Path(out) / "summary.md", markdown)


def run_matrix(plan: Plan, out: Path, *, render_markdown: Callable[[MatrixSummary], str], jobs: int = 1,
               force: bool = False, on_event: EventFn | None = None,
               runner: execute.HostRunner | None = None) -> MatrixSummary:
    """Execute (resuming), summarise, and write summary.json and summary.md beside the runs."""
    execution = execute.execute(plan, out, jobs=jobs, force=force, on_event=on_event, runner=runner)
    summary = summarise(plan, out, execution)
    write_summary(summary, out, render_markdown(summary))
    return summary
