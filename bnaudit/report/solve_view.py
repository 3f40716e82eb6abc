"""Rendering of `bnaudit solve`: the recipe, what it costs, and how the search got there.

Everything here reads a ``matrix.solve.Solution``; the terminal lines, solve.md and the JSON
(``to_dict``) say the same thing.
"""

from __future__ import annotations

from rich.text import Text

from bnaudit.matrix.fleet import FleetSolution
from bnaudit.matrix.plan import Plan
from bnaudit.matrix.solve import Candidate, Solution, Tried
from bnaudit.report import census_view, escape
from bnaudit.report import console as console_policy
from bnaudit.report.compare_view import first_text

console = console_policy.stdout()
err_console = console_policy.stderr()


def _n(k: int, word: str, plural: str | None = None) -> str:
    return f"{k} {word if k == 1 else plural or word + 's'}"


def _cost(c: Candidate, s: Solution) -> str:
    if c.cost is None:
        return "cost not measured (this machine cannot run it)" if not c.seconds else "cost not measured"
    return (f"cost ×{c.cost:.3f} of this machine's training time ({s.cost_epochs} epochs, median of "
            f"{_n(len(c.seconds), 'round')})")


def _verdict(c: Candidate, s: Solution) -> str:
    if c.verified_epochs is not None:
        return f"bit-identical on every machine over {_n(c.verified_epochs, 'epoch')}"
    if c.parted is not None:
        return f"agreed over {_n(s.screen_epochs, 'epoch')}, parted over {s.verify_epochs}: {c.parted}"
    if c.classes == 1:
        return f"one class over {_n(s.screen_epochs, 'epoch')} (not verified at {s.verify_epochs})"
    return f"{_n(c.classes, 'class', 'classes')} over every machine (the representatives agreed)"


def headline(s: Solution) -> str:
    start = (f"{_n(len(s.machines), 'machine')}, {_n(len(s.classes_before), 'class', 'classes')} with the settings "
             "as they come")
    if s.best is not None:
        best = next(c for c in s.candidates if c.recipe == s.best)
        return f"{start}; {s.best}: {_verdict(best, s)}, {_cost(best, s)}"
    fewest = "?" if s.partition is None else str(len(s.partition.classes))
    return (f"{start}; no recipe of the levers tried makes them one: the fewest is {fewest} classes, under "
            f"{s.partition_recipe}")


def _tried_line(t: Tried) -> str:
    if t.pruned is not None and t.pruned.startswith("failed"):
        return f"{t.recipe}: {t.pruned}"
    text = f"{t.recipe}: {_n(t.classes, 'class', 'classes')} on the representatives"
    if t.pruned == "neutral":
        return text + "; neutral (changes no bit on any of them): pruned"
    if t.pruned is not None:
        return text + f"; {t.pruned}: pruned"
    for ch in t.changes[:1]:
        text += f"; first changes {ch.machine} at {first_text(ch.first) if ch.first else 'the eval or probe pass'}"
    return text


def recipe_lines(c: Candidate) -> list[str]:
    """The recipe as a CI file and a bnaudit command take it."""
    out = ["environment: " + " ".join(c.environment)]
    if c.unset:
        out.append("remove: " + " ".join(c.unset))
    out += [f"in the program, after importing torch: {call}" for call in c.calls]
    out.append("bnaudit run " + " ".join(c.run_options) if c.run_options else "bnaudit run (no options)")
    return out


def lines(s: Solution) -> list[str]:
    """Every line of the text view."""
    out = [headline(s)]
    out += [f"as they come, class {i + 1}: {', '.join(c)}" for i, c in enumerate(s.classes_before)]
    if len(s.classes_before) > 1:
        out.append(f"screened over {_n(s.screen_epochs, 'epoch')} on one machine per class: "
                   f"{', '.join(s.representatives)}")
    out += [f"{x.lever}: infeasible on {x.machine}: {x.reason}" for x in s.infeasible]
    out += [_tried_line(t) for t in s.tried]
    for c in s.candidates:
        out.append(f"candidate {c.recipe}: {_verdict(c, s)}; {_cost(c, s)}")
    best = next((c for c in s.candidates if c.recipe == s.best), None)
    if best is not None:
        out += recipe_lines(best)
    if s.partition is not None:
        out += [f"under {s.partition_recipe}: " + line for line in census_view.class_lines(s.partition)]
        out += [f"under {s.partition_recipe}: " + census_view.split_line(s.partition, sp) for sp in s.partition.splits]
        out += list(s.causes)
    later = [f"{stage} {_n(n, 'run')}" for stage, n in s.runs.items() if stage.startswith(("cost", "verify"))]
    then = f"; then {', '.join(later)}" if later else ""
    out.append(f"search: {_n(s.search_runs, 'run')} of {_n(s.screen_epochs, 'epoch')}, against {s.exhaustive_runs} for "
               f"every combination of the feasible levers on every machine{then}")
    return out


def stage_line(name: str, plan: Plan) -> None:
    """One line on stderr as each stage starts."""
    err_console.print(Text.assemble(("solve", "bold"), f" {name}: {_n(len(plan.runs), 'run')} of "
                                    f"{_n(plan.epochs, 'epoch')}"))


def render(s: Solution) -> None:
    console.print(Text.assemble(("bnaudit solve", "bold"), "  ", escape.terminal(s.folder)))
    for line in lines(s):
        console.print(Text.assemble("  ", escape.terminal(line)))


def markdown(s: Solution) -> str:
    """solve.md: the same lines for people, a table of the candidates and the recipe as a CI block."""
    rows = ["| recipe | classes | verified | cost |", "| --- | --- | --- | --- |"]
    rows += [f"| {escape.markdown(c.recipe)} | {c.classes} | {escape.markdown(_verdict(c, s))} | "
             f"{'' if c.cost is None else f'×{c.cost:.3f}'} |" for c in s.candidates]
    body = [f"- {escape.markdown(line)}" for line in lines(s)[1:]]
    best = next((c for c in s.candidates if c.recipe == s.best), None)
    block = [] if best is None else ["", "```sh", *(f"export {e}" for e in best.environment),
                                     *(f"unset {u}" for u in best.unset), "```"]
    return "\n".join([f"### bnaudit solve: {escape.markdown(headline(s))}", "", *body, "", *rows, *block, ""])


def fleet_lines(f: FleetSolution) -> list[str]:
    """Every line of the text view of a solve from a fleet's records."""
    best = next((c for c in f.candidates if c.recipe == f.best), None)
    start = (f"{_n(len(f.machines), 'machine')} ({', '.join(f.machines)}), "
             f"{_n(len(f.candidates), 'configuration')} run on all")
    if best is not None:
        cost = "cost not measured" if best.cost is None else f"cost ×{best.cost:.3f} (median over the machines)"
        out = [f"{start}; {best.recipe}: bit-identical on every machine; {cost}"]
    elif f.partition is not None:
        out = [f"{start}; none is bit-identical on every machine: the fewest is {len(f.partition.classes)} classes, "
               f"under {f.partition_recipe}"]
    else:
        out = [f"{start}; no configuration was run on every machine"]
    for c in f.candidates:
        cost = "" if c.cost is None else f"; cost ×{c.cost:.3f}"
        verdict = ("bit-identical on every machine" if c.classes == 1
                   else f"{_n(c.classes, 'class', 'classes')}: {c.parted}")
        out.append(f"{c.recipe}: {verdict}{cost}")
    out += [f"{recipe}: not on {', '.join(missing)}" for recipe, missing in f.incomplete]
    if best is not None:
        out += recipe_lines(best)
    if f.partition is not None:
        out += [f"under {f.partition_recipe}: " + line for line in census_view.class_lines(f.partition)]
        out += list(f.causes)
    return out


def render_fleet(f: FleetSolution) -> None:
    console.print(Text.assemble(("bnaudit solve --records", "bold")))
    for line in fleet_lines(f):
        console.print(Text.assemble("  ", escape.terminal(line)))
