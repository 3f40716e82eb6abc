"""Rendering of `bnaudit census`: the classes of machines, where they part, and what separates them.

Everything here reads a ``matrix.census.Census``; the terminal lines, census.md and the
JSON (``to_dict``) say the same thing.
"""

from __future__ import annotations

from rich.text import Text

from bnaudit.compare import Difference
from bnaudit.matrix.census import Census, ClassSplit
from bnaudit.report import console as console_policy
from bnaudit.report import escape
from bnaudit.report.compare_view import first_text

console = console_policy.stdout()

FEATURES_SHOWN = 12
"""Separating features named in the text views (the JSON has them all)."""


def _names(features: tuple[str, ...]) -> str:
    if not features:
        return "nothing the other lacks"
    more = len(features) - FEATURES_SHOWN
    return ", ".join(features[:FEATURES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _where(d: Difference | None) -> str:
    return "bit-identical" if d is None else first_text(d)


def headline(c: Census) -> str:
    n = len(c.machines)
    return (f"{n} machine{'' if n == 1 else 's'} in {len(c.classes)} class{'' if len(c.classes) == 1 else 'es'} of "
            f"bit-identical runs, {c.epochs} epoch{'' if c.epochs == 1 else 's'} each")


def class_lines(c: Census) -> list[str]:
    out = []
    for i, members in enumerate(c.classes):
        shown = []
        for name in members:
            m = next(m for m in c.machines if m.name == name)
            shown.append(f"{name} ({m.vendor}, torch {m.capability})")
        out.append(f"class {i + 1}: {', '.join(shown)}")
    return out


def split_line(c: Census, s: ClassSplit) -> str:
    text = (f"class {s.i + 1} vs class {s.j + 1}: {_where(s.first)}; class {s.i + 1} has {_names(s.only_i)}; "
            f"class {s.j + 1} has {_names(s.only_j)}")
    if s.vendors is not None:
        text += f"; vendors {'/'.join(s.vendors[0])} vs {'/'.join(s.vendors[1])}"
        if not s.only_i and not s.only_j:
            text += (" (no CPU feature separates them; the vendor does, and MKL dispatches on it, as it may on "
                     "other CPUID fields this census does not read: family, model, cache sizes)")
    return text


def lines(c: Census) -> list[str]:
    """Every line of the text view."""
    why = f": {c.why_epochs}" if c.epochs == 1 else " (asked for)"
    out = [headline(c), f"length: {c.epochs} epoch{'' if c.epochs == 1 else 's'}{why}", *class_lines(c)]
    out += [split_line(c, s) for s in c.splits]
    out += [f"note: {name}: its run did not complete (see {c.folder}/summary.md)" for name in c.missing]
    return out


def render(c: Census) -> None:
    console.print(Text.assemble(("bnaudit census", "bold"), "  ", escape.terminal(c.folder)))
    for line in lines(c):
        console.print(Text.assemble("  ", escape.terminal(line)))


def markdown(c: Census) -> str:
    """census.md: the same lines for people, a table of the machines."""
    rows = ["| machine | vendor | torch capability | class | features |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| {escape.markdown(m.name)} | {m.vendor} | {m.capability} | {m.klass + 1} | "
             f"{escape.markdown(', '.join(m.features))} |" for m in c.machines]
    body = [f"- {escape.markdown(line)}" for line in lines(c)[1:]]
    return "\n".join([f"### bnaudit census: {escape.markdown(headline(c))}", "", *body, "", *rows, ""])
