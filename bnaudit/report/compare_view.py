"""`bnaudit compare` output: rich tables for people, Markdown for a pull request, JSON for machines.

All three are rendered from the same ``compare.PairComparison`` / ``compare.ManyComparison``
objects.  JSON is explicit, field by field, with a schema version, and reads back into the
same objects (``from_json``); non-finite floats travel as the strings "inf", "-inf", "nan".

The divergence table is compact and on a log scale: one row per layer, one column per
selected epoch (at most ``MAX_COLUMNS``, roughly log-spaced, always the last; 0 is the initial state), each
cell log10 of the largest |a - b| of the layer's parameters; "=" marks bit-identical
values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnaudit import amplification, fileio
from bnaudit._version import __version__
from bnaudit.amplification import Beside, Window, beside_from_dict, window_from_dict
from bnaudit.compare import (
    ClassPair,
    Difference,
    EquivalenceClass,
    LayerDivergence,
    ManyComparison,
    PairComparison,
    StepTensorDelta,
    prefix_text,
)
from bnaudit.errors import InputError
from bnaudit.layout import after, during, epochs_text, nonfinite_when
from bnaudit.report import console as console_policy
from bnaudit.report import escape

SCHEMA = "bnaudit.compare/2"
"""2: ``eval_first`` and ``first_step``: the eval pass apart from the training split, the first step in detail."""
MAX_COLUMNS = 10
MAX_ENV_ROWS = 12
MAX_VALUE_CHARS = 48

Result = PairComparison | ManyComparison


# --------------------------------------------------------------------------- shared text

def _series(steps: Sequence[int], last: int) -> list[int]:
    out, scale = [0], 1
    while scale <= last:
        out += [m * scale for m in steps if m * scale <= last]
        scale *= 10
    return out


def selected_rows(rows: Sequence[int], max_columns: int = MAX_COLUMNS) -> list[int]:
    """Indexes into ``rows`` of the columns to show: all if they fit, else round, roughly log-spaced rows.

    Round rows (1-2-5, then 1-3, then powers of ten) are rows every fingerprint carries too
    (``layout.keyframe_schedule``), so a record and a fingerprint show the same columns.
    The first and the last row are always shown.
    """
    n = len(rows)
    if n <= max_columns:
        return list(range(n))
    where = {int(r): i for i, r in enumerate(rows)}
    for steps in ((1, 2, 5), (1, 3), (1,)):
        picked = sorted({0, n - 1} | {where[m] for m in _series(steps, int(rows[-1])) if m in where})
        if len(picked) <= max_columns:
            return picked
    marks = np.unique(np.linspace(0, n - 1, max_columns).round().astype(int))
    return [int(i) for i in marks]


def log_cell(value: float) -> str:
    """log10 of a divergence, one decimal; "=" for none, "inf"/"nan" as such."""
    if value == 0:
        return "="
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return f"{math.log10(value):.1f}"


def value_text(value: Any) -> str:
    """A fact's value in a table cell: lists joined, long values shortened."""
    if value is None:
        text = "-"
    elif isinstance(value, list):
        text = ",".join(map(str, value)) or "[]"
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def list_diff(a: Any, b: Any) -> str | None:
    """For two lists (e.g. CPU features): what only one side has, or None."""
    if not isinstance(a, list) or not isinstance(b, list):
        return None
    only_a = [x for x in a if x not in b]
    only_b = [x for x in b if x not in a]
    return f"only a: {','.join(map(str, only_a)) or '-'}; only b: {','.join(map(str, only_b)) or '-'}"


def first_text(d: Difference | None) -> str:
    """The first difference in one line."""
    return "none: bit-identical" if d is None else d.text


def split_lines(c: PairComparison) -> list[str]:
    """Where two runs part, as the training's story: the training split, the first step in detail, then the
    side passes (eval, probe)."""
    probe = f"also differs: {first_text(c.probe_first)}; the probe pass never feeds back into training" \
        if c.probe_first is not None else None
    if c.identical:
        return [probe] if probe else []
    training = c.first if c.first is not None and c.first.phase != "eval" else None
    lines = [f"training split: {first_text(training)}" if training is not None
             else "training split: none (every training tensor compared is bit-identical)"]
    if c.first_step:
        n = len(c.first_step)
        shown = "; ".join(_delta_text(d) for d in c.first_step[:FIRST_STEP_SHOWN])
        more = f"; and {n - FIRST_STEP_SHOWN} more" if n > FIRST_STEP_SHOWN else ""
        lines.append(f"first step ({during(0, 0)}): {n} traced tensor{'' if n == 1 else 's'} differ: {shown}{more}")
    if c.eval_first is not None:
        lines.append(f"also differs: {first_text(c.eval_first)}; the eval pass never feeds back into training")
    if probe:
        lines.append(probe)
    elif not c.probe_compared:
        lines.append("probe pass: not compared (a fingerprint file keeps no probe activations; "
                     "compare the two record folders)")
    return lines


FIRST_STEP_SHOWN = 4
"""Tensors of the first step named in the text outputs (JSON has them all)."""


def _delta_text(d: StepTensorDelta) -> str:
    ulps = f"{d.max_ulps} ulp{'' if d.max_ulps == 1 else 's'}"
    return (f"{d.tensor} {d.differing}/{d.elements} elements, <= {ulps} "
            f"(max |a - b| {d.max_abs:.2g} at scale {d.scale:.3g})")


def first_short(d: Difference | None) -> str:
    """The first difference in a few words (for a table cell)."""
    if d is None:
        return "identical"
    if d.row == 0:
        when = "initial state"
    elif d.step is None:
        when = after(d.row if d.row is not None else d.epoch + 1)
    else:
        when = f"{during(d.epoch, d.step)} {d.phase}"
    what = d.tensor or f"{d.layer} ({d.phase} group)"
    ulps = "" if d.max_ulps is None else f", {d.max_ulps} ulp{'' if d.max_ulps == 1 else 's'}"
    return f"{when}: {what}{ulps}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def window_text(w: Window) -> str:
    """A growth window in words: its least-squares slope and epochs, its endpoint rate, its sub-windows' range."""
    text = f"{_rate(w.slope)} ln/epoch over {epochs_text(w.start, w.end)} (least-squares; end to end {_rate(w.rate)}"
    if w.low is not None and w.high is not None:
        text += f", sub-windows of {max(1, (w.end - w.start + 1) // 2)}+ epochs {w.low:.3g} to {w.high:.3g}"
    return text + ")"


def _factor(ln: float) -> str:
    return f"e^{ln:.3g} (x{math.exp(min(ln, 700)):.3g})"


def exact_text(b: Beside, storage: str) -> str:
    """A measured growth beside the exact-arithmetic amplification over the same rows."""
    moved = f"{b.tensor}[{','.join(str(i) for i in b.index)}] moved by 2^-{b.scale}"
    seen, exact, added = b.seen.amplification, b.exact.amplification, b.added
    if seen is None or exact is None or added is None:
        return f"exact arithmetic ({moved}): not comparable over {epochs_text(b.seen.start, b.seen.end)}"
    rounding = (f"{storage} rounding adds {_factor(added)}" if added >= 0
                else f"it grew {_factor(-added)} less than exact arithmetic does")
    return (f"exact arithmetic (mpmath, {moved}) grows a difference {window_text(b.exact)}, "
            f"a factor {_factor(exact)}; this one grew {_factor(seen)}: {rounding}")


def growth_text(c: PairComparison) -> str:
    if c.growth_window is not None:
        rate = f"growth {window_text(c.growth_window)}"
    elif c.growth_rate is not None:
        rate = f"growth rate {c.growth_rate:.3g} ln/epoch"
    else:
        rate = "growth rate: -"
    sat = (f"saturates {after(c.saturation_epoch)}" if c.saturation_epoch is not None
           else "no saturation within the compared epochs")
    return f"{rate}; {sat}"


def exact_line(c: PairComparison) -> str | None:
    """The growth beside exact arithmetic, or why it is not there (None for identical runs)."""
    if c.identical or c.divergence is None:
        return None
    if c.exact is None and c.exact_known:
        return (f"exact arithmetic: no window of one epoch or more where the difference is still small (at most "
                f"{amplification.SMALL:g} of the largest initial parameter), so the exact growth does not apply")
    if c.exact is None:
        return ("exact arithmetic: no sensitivity measured for this experiment "
                "(`bnaudit reference sensitivity --save`)")
    return exact_text(c.exact, c.storage)


def compared_text(c: PairComparison) -> str:
    what = "per-tensor digests" if c.granularity == "epoch-tensor" else "per-(phase, layer) group digests"
    epochs = c.rows_compared - 1
    return (f"the initial state and {epochs} epoch{'' if epochs == 1 else 's'} ({what}); {c.steps_compared} traced "
            f"steps (per-tensor digests); parameter values in {c.value_rows} of those {c.rows_compared} states; "
            f"storage {c.storage}")


def divergence_table(div: LayerDivergence) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the log10 max |a - b| table (layers x selected epochs, 0 the initial state), plus an
    "all" row."""
    cols = selected_rows(div.rows)
    headers = ["layer"] + [str(div.rows[i]) for i in cols]
    body = [[layer] + [log_cell(float(div.max_abs[i, j])) for i in cols] for j, layer in enumerate(div.layers)]
    overall = div.overall()
    body.append(["all"] + [log_cell(float(overall[i])) for i in cols])
    return headers, body


def _verdict(result: Result) -> str:
    return "bit-identical" if result.identical else "DIFFERENT"


# --------------------------------------------------------------------------- terminal

def render(result: Result, console: Console | None = None) -> None:
    """Print a comparison for people."""
    console = console or console_policy.stdout()
    if isinstance(result, PairComparison):
        _render_pair(result, console)
    else:
        _render_many(result, console)


def _render_pair(c: PairComparison, console: Console) -> None:
    style = "bold green" if c.identical else "bold red"
    console.print(f"[bold]bnaudit compare[/bold]: [{style}]{_verdict(c)}[/{style}]", highlight=False)
    # Paths, labels and names from the files are Text: rich would read them as markup and emoji codes.
    console.print(escape.terminal(f"  a  {c.a}  ({c.labels[0]})"))
    console.print(escape.terminal(f"  b  {c.b}  ({c.labels[1]})"))
    console.print(escape.terminal(f"  compared: {compared_text(c)}"))
    if prefix_text(c.lengths):
        console.print(escape.terminal(f"  lengths: {prefix_text(c.lengths)}"))
    for d in c.spec_differences:
        console.print(escape.terminal(f"  spec differs (allowed): {d}"))
    for line in split_lines(c):
        head, _, rest = line.partition(": ")
        console.print(Text.assemble((head, "bold"), ": ", escape.terminal(rest)))
    _render_env(c, console)
    if c.divergence is not None and c.divergence.rows:
        headers, body = divergence_table(c.divergence)
        console.print("[bold]divergence[/bold]: log10 max |a - b| of parameters per layer, after each epoch "
                      "shown (0: the initial state; = identical)", highlight=False)
        table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 1, 0, 1))
        for i, h in enumerate(headers):
            table.add_column(escape.terminal(h), justify="left" if i == 0 else "right", no_wrap=True)
        for row in body:
            table.add_row(*(escape.terminal(cell) for cell in row), style="bold" if row[0] == "all" else None)
        console.print(table)
        console.print(escape.terminal(f"  {growth_text(c)}"))
        exact = exact_line(c)
        if exact is not None:
            console.print(escape.terminal(f"  {exact}"))
    elif not c.identical:
        console.print("  no parameter values to compare (different storage dtypes)", highlight=False)
    loss_a, loss_b = c.final_train_loss
    if not c.identical:
        console.print(escape.terminal(f"  final train MSE: a {loss_a:.6g}, b {loss_b:.6g}"))
    for side, nf in zip("ab", c.nonfinite, strict=True):
        if nf:
            console.print(escape.terminal(f"  {side} went non-finite: {nonfinite_when(nf)}, "
                                          f"{nf.get('phase')} {nf.get('tensor')}"))
    if c.closer_to_reference:
        text = ", ".join(f"{layer} {who}" for layer, who in c.closer_to_reference.items())
        console.print(escape.terminal(f"  closer to exact arithmetic (mpmath reference): {text}"))


def _render_env(c: PairComparison, console: Console) -> None:
    if not c.environment_diff:
        console.print("  environment: no differences in config, effective controls or environment snapshot",
                      highlight=False)
        return
    console.print("[bold]environment differences[/bold] (likely causes first)", highlight=False)
    table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 2, 0, 0))
    table.add_column("  fact", no_wrap=True)
    table.add_column("a")
    table.add_column("b")
    for key, va, vb in c.environment_diff[:MAX_ENV_ROWS]:
        extra = list_diff(va, vb)
        table.add_row(escape.terminal("  " + key), escape.terminal(value_text(va)),
                      escape.terminal(value_text(vb) + (f" ({extra})" if extra else "")))
    console.print(table)
    if len(c.environment_diff) > MAX_ENV_ROWS:
        console.print(f"  … and {len(c.environment_diff) - MAX_ENV_ROWS} more (--json lists all)", highlight=False)


def _render_many(m: ManyComparison, console: Console) -> None:
    style = "bold green" if m.identical else "bold red"
    console.print(f"[bold]bnaudit compare[/bold]: {len(m.sources)} inputs, [{style}]{len(m.classes)} "
                  f"class{'es' if len(m.classes) != 1 else ''} of bit-identical runs[/{style}]", highlight=False)
    if prefix_text(m.lengths):
        console.print(escape.terminal(f"  lengths: {prefix_text(m.lengths)}"))
    for k, cls in enumerate(m.classes, 1):
        members = f"{len(cls.members)} member{'s' if len(cls.members) != 1 else ''}"
        console.print(Text.assemble((f"class {k}", "bold"), escape.terminal(f" ({members}, digest {cls.digest[:16]})")))
        for src, label in zip(cls.members, cls.labels, strict=True):
            console.print(escape.terminal(f"    {src}  ({label})"))
        if cls.common and len(m.classes) > 1:
            shared = "; ".join(f"{k}={value_text(v)}" for k, v in cls.common[:4])
            more = f" (+{len(cls.common) - 4} more)" if len(cls.common) > 4 else ""
            console.print(escape.terminal(f"    shares: {shared}{more}"))
    if m.pairs:
        console.print("[bold]first divergence between classes[/bold]", highlight=False)
        table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 2, 0, 0))
        for h in PAIR_HEADERS:
            table.add_column(h)
        for p in m.pairs:
            table.add_row(*(escape.terminal(cell) for cell in _pair_row(p)))
        console.print(table)


PAIR_HEADERS = ("classes", "first difference", "log10 max|Δ| at end", "growth/epoch", "likely cause")


def _pair_row(p: ClassPair) -> list[str]:
    c = p.comparison
    final = log_cell(float(c.divergence.overall()[-1])) if c.divergence is not None and c.divergence.rows else "-"
    cause = c.environment_diff[0] if c.environment_diff else None
    cause_text = "-" if cause is None else f"{cause[0]}: {value_text(cause[1])} vs {value_text(cause[2])}"
    return [f"{p.i + 1} vs {p.j + 1}", first_short(c.first), final,
            "-" if c.growth_rate is None else f"{c.growth_rate:.3g}", cause_text]


# --------------------------------------------------------------------------- markdown

def _md(text: Any) -> str:
    return escape.markdown(text, cell=True)


def _md_table(headers: list[str], rows: list[list[str]], *, markdown_columns: tuple[int, ...] = ()) -> list[str]:
    """A table of plain-text cells, escaped, except the ``markdown_columns``, which hold Markdown already."""
    out = ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(c if i in markdown_columns else _md(c) for i, c in enumerate(r)) + " |" for r in rows]
    return out


def markdown(result: Result) -> str:
    """The comparison as GitHub-flavoured Markdown (a pull-request comment)."""
    lines: list[str] = []
    if isinstance(result, PairComparison):
        c = result
        lines += [f"### bnaudit compare: **{_verdict(c)}**", "",
                  f"- a: {escape.markdown_code(c.a)} ({escape.markdown(c.labels[0])})",
                  f"- b: {escape.markdown_code(c.b)} ({escape.markdown(c.labels[1])})",
                  f"- compared: {escape.markdown(compared_text(c))}"]
        if prefix_text(c.lengths):
            lines.append(f"- lengths: {escape.markdown(prefix_text(c.lengths))}")
        lines += [f"- spec differs (allowed): {escape.markdown(d)}" for d in c.spec_differences]
        for line in split_lines(c):
            head, _, rest = line.partition(": ")
            lines.append(f"- **{head}**: {escape.markdown(rest)}")
        lines.append("")
        if c.environment_diff:
            lines += ["**Environment differences** (likely causes first)", ""]
            lines += _md_table(["fact", "a", "b"], [[k, value_text(va), value_text(vb)]
                                                     for k, va, vb in c.environment_diff[:MAX_ENV_ROWS]])
            if len(c.environment_diff) > MAX_ENV_ROWS:
                lines.append(f"\n… and {len(c.environment_diff) - MAX_ENV_ROWS} more")
            lines.append("")
        if c.divergence is not None and c.divergence.rows:
            headers, body = divergence_table(c.divergence)
            lines += ["**Divergence**: log10 max \\|a − b\\| of parameters per layer, after each epoch shown "
                      "(0: the initial state; = identical)", ""]
            lines += _md_table(headers, body)
            lines += ["", escape.markdown(growth_text(c)) + "."]
            exact = exact_line(c)
            if exact is not None:
                lines += ["", escape.markdown(exact) + "."]
            lines += ["",
                      f"Final train MSE: a {c.final_train_loss[0]:.6g}, b {c.final_train_loss[1]:.6g}.", ""]
        if c.closer_to_reference:
            lines += ["**Closer to exact arithmetic** (mpmath reference): "
                      + escape.markdown(", ".join(f"{k} {v}" for k, v in c.closer_to_reference.items())), ""]
    else:
        m = result
        lines += [f"### bnaudit compare: {len(m.sources)} inputs, {len(m.classes)} class"
                  f"{'es' if len(m.classes) != 1 else ''} of bit-identical runs", ""]
        if prefix_text(m.lengths):
            lines += [f"Lengths: {escape.markdown(prefix_text(m.lengths))}.", ""]
        rows = []
        for k, cls in enumerate(m.classes, 1):
            shared = "; ".join(f"{key}={value_text(v)}" for key, v in cls.common[:6]) if len(m.classes) > 1 else ""
            rows.append([str(k), "<br>".join(escape.markdown_code(s, cell=True) for s in cls.members),
                         cls.digest[:16], shared or "-"])
        lines += _md_table(["class", "members", "digest", "members share"], rows, markdown_columns=(1,))
        if m.pairs:
            lines += ["", "**First divergence between classes**", ""]
            lines += _md_table(list(PAIR_HEADERS), [_pair_row(p) for p in m.pairs])
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- JSON

def _float(value: float) -> float | int | str | None:
    """A measured float for the comparison JSON (``fileio.json_number``: non-finite as strings)."""
    return fileio.json_number(float(value))


def _unfloat(value: Any) -> float:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"comparison JSON: {value!r} is not a number")
    return float(value)


def _float_table(array: np.ndarray) -> list[list[float | int | str | None]]:
    return [[_float(v) for v in row] for row in array]


def _difference_dict(d: Difference | None) -> dict[str, Any] | None:
    return None if d is None else dataclasses.asdict(d)


def _divergence_dict(div: LayerDivergence | None) -> dict[str, Any] | None:
    if div is None:
        return None
    return {"rows": list(div.rows), "layers": list(div.layers), "max_abs": _float_table(div.max_abs),
            "max_rel": _float_table(div.max_rel), "max_ulps": [[int(v) for v in row] for row in div.max_ulps]}


def pair_dict(c: PairComparison) -> dict[str, Any]:
    """A PairComparison as JSON-ready data, field by field."""
    return {
        "a": c.a, "b": c.b, "identical": c.identical, "first": _difference_dict(c.first),
        "divergence": _divergence_dict(c.divergence),
        "growth_rate": None if c.growth_rate is None else _float(c.growth_rate),
        "saturation_epoch": c.saturation_epoch,
        "environment_diff": [[k, va, vb] for k, va, vb in c.environment_diff],
        "closer_to_reference": c.closer_to_reference, "granularity": c.granularity,
        "steps_compared": c.steps_compared, "rows_compared": c.rows_compared, "value_rows": c.value_rows,
        "storage": c.storage, "labels": list(c.labels), "spec_differences": list(c.spec_differences),
        "final_train_loss": [_float(v) for v in c.final_train_loss], "nonfinite": list(c.nonfinite),
        "eval_first": _difference_dict(c.eval_first),
        "first_step": None if c.first_step is None else [
            {**dataclasses.asdict(d), "max_abs": _float(d.max_abs), "scale": _float(d.scale)} for d in c.first_step],
        "growth_window": None if c.growth_window is None else c.growth_window.to_dict(),
        "exact": None if c.exact is None else c.exact.to_dict(), "exact_known": c.exact_known,
        "probe_first": _difference_dict(c.probe_first), "probe_compared": c.probe_compared,
        "lengths": list(c.lengths),
    }


def many_dict(m: ManyComparison) -> dict[str, Any]:
    """A ManyComparison as JSON-ready data."""
    return {
        "sources": list(m.sources), "identical": m.identical,
        "classes": [{"digest": cls.digest, "members": list(cls.members), "labels": list(cls.labels),
                     "indices": list(cls.indices), "common": [[k, v] for k, v in cls.common]} for cls in m.classes],
        "pairs": [{"i": p.i, "j": p.j, "comparison": pair_dict(p.comparison)} for p in m.pairs],
        "lengths": list(m.lengths),
    }


def to_json(result: Result) -> str:
    """The comparison as JSON text (sorted keys, strict JSON: no NaN literals)."""
    if isinstance(result, PairComparison):
        body = {"schema": SCHEMA, "bnaudit": __version__, "kind": "pair",
                "verdict": "identical" if result.identical else "different", "pair": pair_dict(result)}
    else:
        body = {"schema": SCHEMA, "bnaudit": __version__, "kind": "many",
                "verdict": "identical" if result.identical else "different", "many": many_dict(result)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _difference_from(raw: Any) -> Difference | None:
    if raw is None:
        return None
    names = {f.name for f in dataclasses.fields(Difference)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise InputError("comparison JSON: malformed first difference")
    return Difference(**raw)


def _divergence_from(raw: Any) -> LayerDivergence | None:
    if raw is None:
        return None
    try:
        return LayerDivergence(
            rows=tuple(int(r) for r in raw["rows"]), layers=tuple(str(s) for s in raw["layers"]),
            max_abs=np.array([[_unfloat(v) for v in r] for r in raw["max_abs"]], dtype=np.float64)
            .reshape(len(raw["rows"]), len(raw["layers"])),
            max_rel=np.array([[_unfloat(v) for v in r] for r in raw["max_rel"]], dtype=np.float64)
            .reshape(len(raw["rows"]), len(raw["layers"])),
            max_ulps=np.array(raw["max_ulps"], dtype=np.int64).reshape(len(raw["rows"]), len(raw["layers"])))
    except (KeyError, TypeError, ValueError):
        raise InputError("comparison JSON: malformed divergence table") from None


def _delta_from(raw: Any) -> StepTensorDelta:
    names = {f.name for f in dataclasses.fields(StepTensorDelta)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise InputError("comparison JSON: malformed first-step tensor")
    return StepTensorDelta(**{**raw, "max_abs": _unfloat(raw["max_abs"]), "scale": _unfloat(raw["scale"])})


def _lengths_from(raw: Any, n: int) -> Any:
    """Each input's epochs (absent in an older bnaudit's output: zeros for a pair, none for many)."""
    if not isinstance(raw, list) or len(raw) != n or not all(isinstance(x, int) and not isinstance(x, bool)
                                                              and x >= 0 for x in raw):
        raise InputError("comparison JSON: malformed lengths")
    return tuple(raw)


def pair_from_dict(raw: Any) -> PairComparison:
    """Inverse of ``pair_dict``."""
    try:
        rate = raw["growth_rate"]
        return PairComparison(
            a=raw["a"], b=raw["b"], identical=bool(raw["identical"]), first=_difference_from(raw["first"]),
            divergence=_divergence_from(raw["divergence"]), growth_rate=None if rate is None else _unfloat(rate),
            saturation_epoch=raw["saturation_epoch"],
            environment_diff=tuple((str(k), va, vb) for k, va, vb in raw["environment_diff"]),
            closer_to_reference=raw["closer_to_reference"], granularity=raw["granularity"],
            steps_compared=int(raw["steps_compared"]), rows_compared=int(raw["rows_compared"]),
            value_rows=int(raw["value_rows"]), storage=str(raw["storage"]),
            labels=(str(raw["labels"][0]), str(raw["labels"][1])),
            spec_differences=tuple(str(s) for s in raw["spec_differences"]),
            final_train_loss=(_unfloat(raw["final_train_loss"][0]), _unfloat(raw["final_train_loss"][1])),
            nonfinite=(raw["nonfinite"][0], raw["nonfinite"][1]), eval_first=_difference_from(raw["eval_first"]),
            first_step=None if raw["first_step"] is None else tuple(_delta_from(d) for d in raw["first_step"]),
            growth_window=None if raw.get("growth_window") is None
            else window_from_dict(raw["growth_window"], "comparison JSON: growth window"),
            exact=None if raw.get("exact") is None else beside_from_dict(raw["exact"], "comparison JSON: exact"),
            exact_known=bool(raw.get("exact_known")),
            probe_first=_difference_from(raw.get("probe_first")), probe_compared=bool(raw.get("probe_compared")),
            lengths=_lengths_from(raw.get("lengths", [0, 0]), 2))
    except (KeyError, TypeError, ValueError, IndexError):
        raise InputError("comparison JSON: malformed pair comparison") from None


def from_json(text: str) -> Result:
    """Read ``to_json``'s output back into the comparison objects."""
    data = text.encode("utf-8")
    if len(data) > fileio.MAX_JSON_BYTES:
        raise InputError(f"comparison JSON: {len(data)} bytes is larger than any comparison")
    raw = fileio.parse_json(data, "comparison JSON", "comparison")
    if raw.get("schema") != SCHEMA:
        raise InputError(f"comparison JSON: schema is not {SCHEMA}")
    if raw.get("kind") == "pair":
        return pair_from_dict(raw.get("pair"))
    try:
        m = raw["many"]
        classes = tuple(EquivalenceClass(digest=c["digest"], members=tuple(c["members"]), labels=tuple(c["labels"]),
                                         indices=tuple(int(i) for i in c["indices"]),
                                         common=tuple((str(k), v) for k, v in c["common"])) for c in m["classes"])
        pairs = tuple(ClassPair(i=int(p["i"]), j=int(p["j"]), comparison=pair_from_dict(p["comparison"]))
                      for p in m["pairs"])
        return ManyComparison(sources=tuple(m["sources"]), classes=classes, pairs=pairs,
                              lengths=_lengths_from(m.get("lengths", []), len(m["sources"]) if "lengths" in m else 0))
    except (KeyError, TypeError, ValueError):
        raise InputError("comparison JSON: malformed comparison of many inputs") from None


__all__ = ["SCHEMA", "from_json", "markdown", "render", "to_json"]
