"""What a check says in CI: one plain line per case, a closing line, and a Markdown step summary.

The plain lines are what a CI log shows and what JUnit failures carry; the Markdown is
appended to the file named by ``GITHUB_STEP_SUMMARY`` (GitHub shows it on the run's page).
Both come from the same ``check.CheckResult``.  The plain texts quote paths, labels and a
record's values with their control characters made visible (``escape.printable``): each is
one line, and a terminal shows it as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnaudit.check import CaseResult, CheckResult, Policy, Verdict
from bnaudit.errors import OutputError
from bnaudit.report import escape

ENV_SHOWN = 3
"""Environment differences named in a plain line (the most likely causes come first)."""
_NOT_CAUSES = ("config.epochs", "config.trace_epochs", "config.audit_every")


def _short(value: Any, width: int = 48) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return escape.printable(text if len(text) <= width else text[: width - 3] + "...")


def causes(case: CaseResult, limit: int = ENV_SHOWN) -> list[str]:
    """The first environment differences, as "key: baseline -> run"."""
    out = []
    for key, a, b in case.environment_diff:
        if key.startswith(_NOT_CAUSES):
            continue
        out.append(f"{key}: {_short(a)} -> {_short(b)}")
        if len(out) == limit:
            break
    return out


def first_text(case: CaseResult) -> str:
    """The first divergence in words, with its ulps where values were available."""
    d = case.first
    if d is None:
        return "none"
    text = d.where
    if d.fraction_differing is not None:
        text += f", {d.fraction_differing:.1%} of elements differ"
    if d.max_ulps is not None:
        text += f", max {d.max_ulps} ulps"
    return escape.printable(text)


def measured_text(case: CaseResult) -> str:
    if case.measured is None:
        return "-"
    return escape.printable(case.measured.describe(case.tolerance.policy))


def _span(case: CaseResult) -> str:
    if case.epochs == case.baseline_epochs:
        return f"{case.epochs} epochs"
    return f"first {case.epochs} of the baseline's {case.baseline_epochs} epochs"


def case_line(case: CaseResult) -> str:
    """One plain line: PASS/FAIL, the case, the verdict, and where it first diverged."""
    return escape.printable(_case_line(case))


def _case_line(case: CaseResult) -> str:
    head = f"{'PASS' if case.passed else 'FAIL'} {case.name}"
    tol = case.tolerance
    if case.verdict is Verdict.IDENTICAL:
        body = f"bit-identical to baseline {case.baseline} ({_span(case)})"
        if tol.policy is Policy.BITS and case.measured is not None:
            body += f"; {measured_text(case)}, at least {tol.limit} required"
        return f"{head}: {body}"
    where = f"first divergence: {first_text(case)}"
    if case.verdict is Verdict.ACCEPTED:
        return f"{head}: differs from baseline {case.baseline} but is bit-identical to accepted class " \
               f"{case.accepted_by} ({_span(case)}); {where}"
    if case.verdict is Verdict.WITHIN:
        return f"{head}: within {tol}: {measured_text(case)}, against baseline {case.baseline} " \
               f"({_span(case)}); {where}"
    if tol.policy is Policy.BITS:
        failed = f"fewer than {tol.limit} correct bits: {measured_text(case)}"
    elif case.measured is None:
        failed = f"drift beyond {tol}: digests differ"
    else:
        failed = f"drift beyond {tol}: {measured_text(case)}"
    text = f"{head}: {failed} against baseline {case.baseline} ({_span(case)}); {where}"
    found = causes(case)
    if found:
        text += f"; environment differs: {'; '.join(found)}"
    return text


def summary_line(result: CheckResult) -> str:
    """The closing line: the outcome and, when it failed, the policy that failed."""
    n = len(result.cases)
    if result.passed:
        kinds = sorted({c.verdict.value for c in result.cases})
        return f"bnaudit check: PASS, {n} case{'s' if n != 1 else ''} within {result.tolerance} ({', '.join(kinds)})"
    return (f"bnaudit check: FAIL, {len(result.failed)} of {n} case{'s' if n != 1 else ''} beyond policy "
            f"{result.failed_policy}")


def lines(result: CheckResult) -> list[str]:
    return [case_line(c) for c in result.cases] + [summary_line(result)]


def _cell(text: str) -> str:
    return escape.markdown(text, cell=True)


def _code(text: str, *, cell: bool = False) -> str:
    return escape.markdown_code(text, cell=cell)


_MARK = {Verdict.IDENTICAL: "✅ identical", Verdict.ACCEPTED: "✅ accepted class", Verdict.WITHIN: "✅ within policy",
         Verdict.DRIFT: "❌ drift", Verdict.INACCURATE: "❌ too few correct bits"}


def markdown(result: CheckResult) -> str:
    """The step summary: outcome, a table with one row per case, and the likely causes of failures."""
    status = "PASS" if result.passed else "FAIL"
    out = [f"## bnaudit check: {status} (policy {_code(str(result.tolerance))})", ""]
    if result.accept_classes:
        out += ["Accepted classes: " + ", ".join(_code(a) for a in result.accept_classes), ""]
    out += ["| case | verdict | epochs | measured | first divergence | baseline |",
            "|---|---|---|---|---|---|"]
    for c in result.cases:
        verdict = _MARK[c.verdict] + (f" ({_code(c.accepted_by, cell=True)})" if c.accepted_by else "")
        out.append(f"| {_code(c.name, cell=True)} | {verdict} | {c.epochs} | {_cell(measured_text(c))} | "
                   f"{_cell(first_text(c))} | {_code(c.baseline, cell=True)} |")
    for c in result.failed:
        found = causes(c, limit=10)
        if found:
            # Raw HTML: GitHub reads no Markdown inside <summary>, so the name is HTML-escaped.
            out += ["", f"<details><summary>{escape.html(c.name)}: environment differences, likely causes first"
                        "</summary>", ""]
            out += [f"- {_code(x)}" for x in found]
            out += ["", "</details>"]
    out += ["", summary_line(result), ""]
    return "\n".join(out) + "\n"


def error_markdown(message: str, kind: str, code: int) -> str:
    """The step-summary text of a check that could not judge (exit 3, 4, 8...)."""
    return f"### bnaudit check: could not judge ({kind}, exit {code})\n\n{escape.markdown(message)}\n\n"


def append_step_summary(path: Path, result: CheckResult | str) -> None:
    """Append the Markdown summary (or a prepared text) to GitHub's step-summary file (one write)."""
    text = result if isinstance(result, str) else markdown(result)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise OutputError(f"cannot append the step summary to {path}: {exc.strerror or exc}") from None
