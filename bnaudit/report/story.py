"""The report's story: what the runs show, in plain sentences computed from the model.

The report opens with these, before any table or figure: which runs are bit-identical;
where each compared pair first parts (the tensor, the step, the share of elements, the
ulps), how fast the gap grows and against what exact arithmetic gives over the same epochs;
how many correct bits each class keeps and which is closer to exact arithmetic; and the
likely cause in the environment, with its values.  Each sentence is built from the same
objects ``bnaudit compare`` prints (``compare.Difference``, ``divergence.closer``,
``amplification.Beside``), so the two never say different things.

With a few pairs (``DETAILED_PAIRS``) every pair is told in full.  With more, as from a
matrix of many classes, the same facts are told once per control, as the matrix summary
does: the runs that differ in that control alone, where their compared pairs part, how the
gap grows, which value keeps more correct bits, the likely cause.  Pairs that differ in
several controls at once are counted, not told: no one control can be named their cause.

Epoch words are the layout's (``layout.after``, ``layout.during``, ``layout.epochs_text``):
"the initial state" is before training, "after epoch N" is the end of the N-th epoch,
counted from 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Sequence

from bnaudit import bits, compare
from bnaudit.blocks import Fewest
from bnaudit.layout import PHASES, after, at, epochs_text
from bnaudit.matrix.results import shown
from bnaudit.report.model import CONTROL_KEYS, ClassInfo, PairView, ReferenceView, Report, RunEntry

CAUSES_SHOWN = 2
"""Environment facts named as the likely cause of a pair's split."""
DETAILED_PAIRS = 3
"""Up to this many compared pairs, each is told in full (three or four sentences a pair); beyond, the
findings are told per control, so that a matrix of a dozen classes still reads in a few bullets."""
MEMBERS_LISTED = 6
"""Members of one class named in the compact class sentence (the class table names them all)."""
PERTURB = "perturb"
"""The pseudo-control of a --perturb run against its unperturbed twin (``Report.varying_controls`` says so)."""


def fewest_bits(ref: ReferenceView) -> tuple[float, int]:
    """The run's fewest correct bits and the epoch row where they were fewest: ``DivergenceBlock.fewest``, the
    one definition check's bits:N, the run summary, the report's sentences and its runs table use."""
    return ref.fewest.bits, ref.fewest.row


def _factor(ln: float) -> str:
    return f"x{math.exp(min(ln, 700)):.3g}"


def count(n: int, word: str, many: str | None = None) -> str:
    """"1 class", "12 classes": a count and its noun, singular or plural."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def _and(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def value_text(v: object) -> str:
    """An environment fact's value, short."""
    if v is None:
        return "unset"
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- the controls of runs and pairs


def control_value(run: RunEntry, control: str) -> object:
    """A run's value of a control (``Controls`` field), or its perturbation (``PERTURB``: "" when none)."""
    return run.perturb_text if control == PERTURB else getattr(run.controls, control)


def setting(control: str, value: object) -> str:
    """A control's value for people, as the matrix summary shows it (``matrix.results.shown``)."""
    if control == PERTURB:
        return value_text(value) if value else "none"
    return shown(control, value)


def setting_of(run: RunEntry, control: str) -> str:
    """The run named by its value of ``control``: "the 2-thread run", "the isa avx2 run", "the perturbed run"."""
    if control == PERTURB:
        return "the perturbed run" if run.perturb else "the unperturbed run"
    if control == "threads":
        return f"the {run.controls.threads}-thread run"
    return f"the {_setting_words(control, control_value(run, control))} run"


def _setting_words(control: str, value: object) -> str:
    """A control and its value, short: "float32" (a dtype names itself), "threads 2", "isa avx2"."""
    return setting(control, value) if control == "dtype" else f"{_name(control)} {setting(control, value)}"


def differing(a: RunEntry, b: RunEntry) -> tuple[str, ...]:
    """The controls two runs differ in (``Controls`` field order, then ``PERTURB``)."""
    return tuple(k for k in (*CONTROL_KEYS, PERTURB) if control_value(a, k) != control_value(b, k))


def _name(control: str) -> str:
    return "the perturbation" if control == PERTURB else control.replace("_", " ")


@dataclasses.dataclass(frozen=True)
class ControlStory:
    """One control's part of the grouped findings: its runs that differ in it alone, and its compared pairs."""

    control: str
    """A ``Controls`` field (dtype, threads, isa, ...) or ``PERTURB``."""
    values: tuple[str, ...]
    """Its values across the runs, for people, in input order."""
    pairs: int
    """Pairs of runs that differ in this control and in nothing else (the matrix summary's verdict pairs)."""
    differing: int
    """Of those, the pairs whose runs are in different classes: the control changed their bits."""
    compared: tuple[PairView, ...]
    """The report's compared pairs (``Report.pairs``) that differ in this control alone."""


def control_stories(report: Report) -> list[ControlStory]:
    """Every control that varies across the runs, with its pairs (``Report.varying_controls`` order).

    The runs are paired as the matrix summary's verdicts pair them (``matrix.summary.control_verdict``): two
    runs count for a control when they differ in it and in nothing else; their bits differ when their classes
    do.  Computed here from the runs' controls and classes, which the model carries (the matrix's own
    grouping needs its plan and fingerprints, and knows nothing of --perturb runs).
    """
    alone: dict[str, list[tuple[RunEntry, RunEntry]]] = {}
    for a, b in itertools.combinations(report.runs, 2):
        diff = differing(a, b)
        if len(diff) == 1:
            alone.setdefault(diff[0], []).append((a, b))
    out = []
    for control in report.varying_controls:
        pairs = alone.get(control, [])
        values = tuple(dict.fromkeys(setting(control, control_value(r, control)) for r in report.runs))
        compared = tuple(p for p in report.pairs if differing(report.run(p.a), report.run(p.b)) == (control,))
        out.append(ControlStory(control=control, values=values, pairs=len(pairs),
                                differing=sum(a.class_name != b.class_name for a, b in pairs), compared=compared))
    return out


def _tags(report: Report, control: str, pairs: Sequence[PairView]) -> list[str]:
    """What tells apart the pairs of one control: the other controls' values that vary among them ("float32"),
    else the classes ("B vs A")."""
    runs = [report.run(p.b) for p in pairs]
    others = [k for k in (*CONTROL_KEYS, PERTURB)
              if k != control and len({repr(control_value(r, k)) for r in runs}) > 1]
    tags = [", ".join(_setting_words(k, control_value(r, k)) for k in others) for r in runs]
    if len(set(tags)) < len(tags):
        tags = [f"{report.run(p.b).class_name} vs {report.run(p.a).class_name}" for p in pairs]
    return tags


# --------------------------------------------------------------------------- the classes


def _compact_classes(report: Report) -> str:
    """The classes, naming the members of those with more than one run (the class table names every one)."""
    n, classes = len(report.runs), report.classes
    alone = [c.name for c in classes if len(c.members) == 1]
    if len(alone) == len(classes):
        span = classes[0].name if len(classes) == 1 else f"{classes[0].name} to {classes[-1].name}"
        return (f"No two of the {n} runs are bit-identical: {len(classes)} classes of one run each ({span}, "
                f"as in the runs table).")

    def members(c: ClassInfo) -> str:
        shown_ = list(c.members[:MEMBERS_LISTED])
        if len(c.members) > MEMBERS_LISTED:
            shown_.append(f"{len(c.members) - MEMBERS_LISTED} more")
        return f"{c.name} ({len(c.members)} runs: {_and(shown_)})"

    text = (f"The {n} runs fall into {count(len(classes), 'class', 'classes')} of bit-identical results: "
            + "; ".join(members(c) for c in classes if len(c.members) > 1))
    if alone:
        text += f"; the other {count(len(alone), 'run')} {'is' if len(alone) == 1 else 'are each'} a class " \
                f"of {'its' if len(alone) == 1 else 'their'} own ({', '.join(alone)})"
    return text + "."


def classes_sentence(report: Report, compact: bool | None = None) -> str:
    """Which runs are bit-identical: every class and its members, or (``compact``, the grouped findings'
    default) the classes of more than one run."""
    n = len(report.runs)
    if len(report.classes) == 1:
        if n <= 2:
            return "The run is its own class." if n == 1 else "Both runs are bit-identical (one class)."
        return f"All {n} runs are bit-identical (one class)."
    if grouped(report) if compact is None else compact:
        return _compact_classes(report)
    parts = "; ".join(f"{c.name}: {', '.join(c.members)}" for c in report.classes)
    return f"The {n} runs fall into {len(report.classes)} classes of bit-identical results ({parts})."


# --------------------------------------------------------------------------- one pair, in full


def _beside_exact(p: PairView, storage: str) -> str | None:
    """The pair's growth against exact arithmetic over the same epochs, when measured."""
    b = p.exact
    if b is None or b.seen.amplification is None or b.exact.amplification is None:
        return None
    added = b.added or 0.0
    return (f"over {epochs_text(b.seen.start, b.seen.end)} exact arithmetic (mpmath) grows a "
            f"difference {_factor(b.exact.amplification)} where this one grew {_factor(b.seen.amplification)}, so "
            + (f"{storage} rounding adds {_factor(added)}" if added >= 0
               else f"it grew {_factor(-added)} less than exact arithmetic does"))


def _growth(p: PairView, storage: str) -> str | None:
    if p.growth_rate is None:
        return None
    text = f"The gap then grows {_factor(p.growth_rate)} per epoch"
    text += (f" until it saturates {after(p.saturation_epoch)}" if p.saturation_epoch is not None
             else ", without saturating over the epochs compared")
    exact = _beside_exact(p, storage)
    return text + (f"; {exact}" if exact else "") + "."


def _cause(report: Report, p: PairView) -> str | None:
    controls = differing(report.run(p.a), report.run(p.b))
    if len(controls) > 1:  # the environment differs in each; which one parts them is not known
        ra, rb = report.run(p.a), report.run(p.b)
        return (f"No single cause: {p.b} differs from {p.a} in {len(controls)} controls ("
                + _and([f"{_name(k)} {setting(k, control_value(ra, k))} vs {setting(k, control_value(rb, k))}"
                        for k in controls]) + ").")
    causes = [(k, va, vb) for k, va, vb in p.environment_diff if compare.is_cause(k)][:CAUSES_SHOWN]
    if not causes:
        return None
    return "Likely cause: " + "; ".join(f"{k} is {value_text(va)} in {p.a} and {value_text(vb)} in {p.b}"
                                        for k, va, vb in causes) + "."


def _closer_counts(p: PairView) -> dict[str, int]:
    assert p.closer is not None
    return {side: sum(who == side for who in p.closer.values()) for side in ("a", "b", "tie")}


def _closer_when(report: Report, p: PairView) -> str:
    """After which epoch ``divergence.closer`` compared the pair: the last both references measured."""
    ra, rb = report.references.get(p.a), report.references.get(p.b)
    common = sorted(set(ra.rows.tolist()) & set(rb.rows.tolist())) if ra is not None and rb is not None else []
    return after(int(common[-1])) if common else "at the last common epoch"


def closer_sentence(report: Report, p: PairView) -> str | None:
    """Which run of a pair keeps more correct bits per layer, after the last epoch both measured."""
    if not p.closer:
        return None
    when = _closer_when(report, p)
    counts = _closer_counts(p)
    n = len(p.closer)
    if counts["a"] == counts["b"]:
        lead = f"Neither {p.a} nor {p.b} is closer to exact arithmetic {when}"
    else:
        win, lose = (p.a, p.b) if counts["a"] > counts["b"] else (p.b, p.a)
        lead = f"{win} is closer to exact arithmetic {when} than {lose}"
    return (f"{lead}: more correct bits in {counts['a']} of {n} layers for {p.a}, {counts['b']} for "
            f"{p.b}, {counts['tie']} tied (weights and biases against the mpmath reference).")


def pair_sentences(report: Report, p: PairView) -> list[str]:
    if p.identical:
        return [f"{p.b} and {p.a} are bit-identical."]
    what = "The 1-ulp perturbation of" if p.kind == "perturb" else ""
    lead = f"{what} {p.b} parts from {p.a}" if what else f"{p.b} parts from {p.a}"
    out = [f"{lead} {at(p.first.text) if p.first is not None else 'at no training tensor (their digests differ)'}."]
    storage = report.run(p.a).storage
    out += [s for s in (_growth(p, storage), closer_sentence(report, p),
                        _cause(report, p) if p.kind == "pair" else None) if s]
    return out


def bits_sentence(report: Report) -> str | None:
    """How many correct bits each class keeps (its first run with a reference)."""
    kept = []
    for c in report.classes:
        label = next((m for m in c.members if m in report.references), None)
        if label is None:
            continue
        ref = report.references[label]
        f = ref.fewest
        kept.append(f"{c.name} {bits.correct_bits_text(f.bits)} of {ref.precision} ({f.series}, {after(f.row)})")
    if not kept:
        return None
    return (f"Fewest correct bits against the mpmath reference ({Fewest.WHAT}): " + "; ".join(kept) + ".")


# --------------------------------------------------------------------------- one control, for many pairs


def _when(first: compare.Difference | None) -> tuple[int, int, int, int]:
    """Training order of a first difference: the initial state, the steps of epoch 1, the end of epoch 1, ...
    (none last)."""
    if first is None:
        return (1 << 62, 0, 0, 0)
    phase = PHASES.index(first.phase) if first.phase in PHASES else len(PHASES)
    if first.row == 0 or first.phase == "init":
        return (0, 0, 0, phase)
    row = first.row if first.row is not None else first.epoch + 1
    return (row, 0, first.step, phase) if first.step is not None and first.row is None else (row, 1, 0, phase)


def _parting(pairs: Sequence[PairView], tags: Sequence[str]) -> str:
    """Where the pairs first part, earliest first, the pairs that part at one place together (their tags and
    largest ulps)."""
    places: dict[str, list[int]] = {}
    for i in sorted(range(len(pairs)), key=lambda i: _when(pairs[i].first)):
        first = pairs[i].first
        places.setdefault(first.where if first is not None else "", []).append(i)
    told = []
    for where, idx in places.items():
        notes = [", ".join(tags[i] for i in idx)] if len(places) > 1 and any(tags) else []
        known = [u for i in idx if (f := pairs[i].first) is not None and (u := f.max_ulps) is not None]
        if known:
            most = max(known)
            notes.append(f"{'up to ' if len(known) > 1 else ''}{most} ulp{'' if most == 1 else 's'}")
        told.append((at(where) if where else "at no training tensor (their digests differ)")
                    + (f" ({'; '.join(n for n in notes if n)})" if any(notes) else ""))
    lead = "first parts" if len(pairs) == 1 else "all first part" if len(places) == 1 else "first part"
    return f"{lead} " + " and ".join(told)


def _growth_part(pairs: Sequence[PairView], tags: Sequence[str]) -> str | None:
    grown = []
    for p, tag in zip(pairs, tags, strict=True):
        if p.growth_rate is None:
            continue
        until = f"until {after(p.saturation_epoch)}" if p.saturation_epoch is not None else "without saturating"
        grown.append(f"{_factor(p.growth_rate)} {until}" + (f" ({tag})" if tag else ""))
    return "the gap grows per epoch " + _and(grown) if grown else None


def _exact_part(pairs: Sequence[PairView], tags: Sequence[str]) -> str | None:
    beside = []
    for p, tag in zip(pairs, tags, strict=True):
        b = p.exact
        if b is None or b.added is None:
            continue
        beside.append(f"{_factor(abs(b.added))} {'more' if b.added >= 0 else 'less'}" + (f" ({tag})" if tag else ""))
    return "beside exact arithmetic (mpmath) over the same epochs it grows " + _and(beside) if beside else None


def _closer_part(report: Report, control: str, pairs: Sequence[PairView], tags: Sequence[str]) -> str | None:
    """Which value of the control keeps more correct bits, pair by pair (``divergence.closer``'s layer count)."""
    winners: dict[str, list[str]] = {}
    whens = set()
    for p, tag in zip(pairs, tags, strict=True):
        if not p.closer:
            continue
        counts = _closer_counts(p)
        whens.add(_closer_when(report, p))
        side = "neither" if counts["a"] == counts["b"] else setting_of(
            report.run(p.a if counts["a"] > counts["b"] else p.b), control)
        winners.setdefault(side, []).append(tag)
    if not winners:
        return None
    n = sum(len(t) for t in winners.values())
    when = f" {whens.pop()}" if len(whens) == 1 else ""
    told = [f"{side} in {len(t)} of {n}" + (f" ({', '.join(x for x in t if x)})" if any(t) else "")
            for side, t in sorted(winners.items(), key=lambda kv: (kv[0] == "neither", -len(kv[1])))]
    return f"closer to exact arithmetic{when} (more layers keeping more correct bits): " + ", ".join(told)


def _cause_part(control: str, pairs: Sequence[PairView]) -> str | None:
    """The environment facts that differ in every pair, beyond the control as asked (config.*)."""
    if control == PERTURB:
        return None
    facts = [{k: (va, vb) for k, va, vb in p.environment_diff if compare.is_cause(k) and not k.startswith("config.")}
             for p in pairs]
    keys = [k for k in facts[0] if all(k in f for f in facts)][:CAUSES_SHOWN]
    if not keys:
        return None

    def values(k: str) -> str:
        seen = {(value_text(f[k][0]), value_text(f[k][1])) for f in facts}
        return f"{k} {' vs '.join(seen.pop())}" if len(seen) == 1 else f"{k} (differs in each)"
    return "likely cause: " + ", ".join(values(k) for k in keys)


def control_sentence(report: Report, s: ControlStory) -> str:
    """One control: does it change the bits, and for the pairs compared, where, how fast, which value is closer
    to exact arithmetic, and why."""
    name = _name(s.control)
    values = " vs ".join(s.values) if len(s.values) == 2 else ", ".join(s.values)
    head = f"{name} ({values})"
    head = head[0].upper() + head[1:] if s.control == PERTURB else head
    if not s.pairs:  # the control varies only together with another: nothing to put on it alone
        return (f"{head}: no two runs differ in {name} alone, so its effect is not told apart from the other "
                "controls'.")
    if not s.differing:
        return (f"{head}: does not change the bits ({count(s.pairs, 'pair')} of runs that differ in {name} "
                "alone, all bit-identical).")
    text = f"{head}: changes the bits in {s.differing} of {count(s.pairs, 'pair')} of runs that differ in it alone"
    apart = [p for p in s.compared if not p.identical]
    if not apart:
        if s.control == "dtype":
            text += ("; runs of two dtypes are not compared value by value: the correct bits below set each "
                     "against the mpmath reference")
        return text + "."
    tags = _tags(report, s.control, apart)
    if len(apart) == 1:  # named by its classes, as in the runs table
        one = apart[0]
        compared = f"the pair compared in detail ({report.run(one.b).class_name} vs {report.run(one.a).class_name})"
    else:
        compared = f"the {len(apart)} pairs compared in detail" + (f" ({', '.join(tags)})" if any(tags) else "")
    parts = [f"{compared} {_parting(apart, tags)}", _growth_part(apart, tags), _exact_part(apart, tags),
             _closer_part(report, s.control, apart, tags), _cause_part(s.control, apart)]
    return f"{text}; " + "; ".join(x for x in parts if x) + "."


def several_sentence(report: Report) -> str | None:
    """The compared pairs that differ in more than one control: counted, not told as one control's doing."""
    combos: Counter[tuple[str, ...]] = Counter()
    apart = 0
    for p in report.pairs:
        controls = differing(report.run(p.a), report.run(p.b))
        if len(controls) > 1:
            combos[controls] += 1
            apart += not p.identical
    if not combos:
        return None
    n = sum(combos.values())
    kinds = _and([f"{m} in {_and([_name(k) for k in c])}" for c, m in combos.items()])
    split = (("it differs" if n == 1 else f"all {n} differ") if apart == n
             else f"{apart} of {n} differ") + " in bits"
    return (f"{count(n, 'pair')} compared {'differs' if n == 1 else 'differ'} in several controls at once "
            f"({kinds}); {split}, but no one control can be named the cause, so "
            + ("it is left out above (the pairs table has it)." if n == 1
               else "they are left out above (the pairs table has each)."))


def bits_by_dtype(report: Report) -> str | None:
    """The fewest correct bits of each class, a clause per dtype, classes of one value together."""
    kept: dict[str, dict[str, list[str]]] = {}  # dtype -> bits shown -> classes
    precision: dict[str, int] = {}
    rows = set()
    for c in report.classes:
        label = next((m for m in c.members if m in report.references), None)
        if label is None:
            continue
        ref, dtype = report.references[label], report.run(label).controls.dtype
        value, row = fewest_bits(ref)
        rows.add(row)
        precision[dtype] = ref.precision
        kept.setdefault(dtype, {}).setdefault(bits.correct_bits_text(value), []).append(c.name)
    if not kept:
        return None

    def clause(dtype: str, values: dict[str, list[str]]) -> str:
        if len(values) == 1:
            (value, names), = values.items()
            return (f"{dtype} {value} of {precision[dtype]} in "
                    + (f"every class ({', '.join(names)})" if len(names) > 1 else f"class {names[0]}"))
        ordered = sorted(values.items(), key=lambda kv: -float(kv[0]))
        return f"{dtype} (of {precision[dtype]}) " + ", ".join(f"{v} in {_and(names)}" for v, names in ordered)
    when = f", all {after(rows.pop())}" if len(rows) == 1 else ""
    return (f"Fewest correct bits against the mpmath reference ({Fewest.WHAT}{when}): "
            + "; ".join(clause(d, v) for d, v in kept.items()) + ".")


# --------------------------------------------------------------------------- the story


def grouped(report: Report, detail_up_to: int = DETAILED_PAIRS) -> bool:
    """Whether the findings are told per control (more than ``detail_up_to`` compared pairs)."""
    return len(report.pairs) > detail_up_to


def sentences(report: Report, *, detail_up_to: int = DETAILED_PAIRS) -> tuple[str, ...]:
    """The story, sentence by sentence: every pair in full, or (more than ``detail_up_to`` pairs) per control."""
    if not grouped(report, detail_up_to):
        out = [classes_sentence(report, compact=False)]
        for p in report.pairs:
            out += pair_sentences(report, p)
        kept = bits_sentence(report)
    else:
        out = [classes_sentence(report, compact=True)]
        out += [control_sentence(report, s) for s in control_stories(report)]
        out += [s for s in (several_sentence(report),) if s]
        kept = bits_by_dtype(report)
    return tuple(out + ([kept] if kept else []))
