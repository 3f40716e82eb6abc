"""GitHub Actions annotations: ``::error title=...::message`` lines, escaped as the runner reads them.

Printed on stderr (the runner reads workflow commands from both streams), so that
``--json`` output on stdout stays one JSON document.  Only under Actions
(``GITHUB_ACTIONS=true``, read by ``envinfo``); elsewhere nothing is printed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnaudit.report import escape

if TYPE_CHECKING:
    from bnaudit.check import CheckResult


def _data(text: str) -> str:
    """A command's message: % escaped (CR and LF, the runner's other escapes, are made visible first)."""
    return text.replace("%", "%25")


def _property(text: str) -> str:
    """A command's property value: also : and , escaped."""
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def error(title: str, message: str) -> str:
    """One ``::error`` workflow command: one line whatever the text (control characters shown escaped)."""
    return f"::error title={_property(escape.printable(title))}::{_data(escape.printable(message))}"


def check_errors(result: CheckResult) -> list[str]:
    """One annotation per case that failed its policy."""
    from bnaudit.report import ci_summary

    return [error(f"bnaudit check: {case.name}", ci_summary.case_line(case)) for case in result.failed]
