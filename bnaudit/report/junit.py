"""JUnit XML for CI systems: one test case per dtype/configuration checked.

A case beyond the policy is a ``<failure>`` whose message is the plain line of
``ci_summary.case_line`` (what the CI log shows) and whose text adds the details.  The
file is written under a temporary name and renamed, so a reader never sees half of it.
Every attribute and text goes through ``escape.xml``: whatever a name, path or record
value holds, the document is well-formed XML 1.0.
"""

from __future__ import annotations

import datetime
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

from bnaudit.check import CaseResult, CheckResult
from bnaudit.fileio import write_text_atomic
from bnaudit.report import ci_summary, escape

SUITE = "bnaudit check"


def _details(case: CaseResult) -> str:
    rows = [
        f"case: {escape.printable(case.name)}",
        f"verdict: {case.verdict.value}",
        f"policy: {case.tolerance}",
        f"baseline: {escape.printable(case.baseline)} ({case.baseline_epochs} epochs)",
        (f"run: {escape.printable(case.candidate)} ({case.epochs} epochs compared)" if case.kept else
         f"run: {escape.printable(case.name)}, made in a temporary folder that is gone after the check "
         f"({case.epochs} epochs compared; bnaudit check --out DIR keeps the records)"),
        f"measured: {ci_summary.measured_text(case)}",
        f"first divergence: {ci_summary.first_text(case)}",
    ]
    if case.accepted_by:
        rows.append(f"accepted class: {escape.printable(case.accepted_by)}")
    found = ci_summary.causes(case, limit=10)
    if found:
        rows.append("environment differences (likely causes first):")
        rows += [f"  {x}" for x in found]
    return escape.xml("\n".join(rows), multiline=True)


def to_xml(result: CheckResult, *, timestamp: str | None = None, hostname: str | None = None) -> str:
    """The JUnit document as text (``hostname``: the machine that judged, default this one)."""
    stamp = timestamp or datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    host = escape.xml(hostname if hostname is not None else platform.node())
    total = f"{sum(c.seconds for c in result.cases):.3f}"
    tests, failures = str(len(result.cases)), str(len(result.failed))
    root = ET.Element("testsuites", name=SUITE, tests=tests, failures=failures, errors="0", time=total)
    suite = ET.SubElement(root, "testsuite", name=escape.xml(f"{SUITE} ({result.tolerance})"), tests=tests,
                          failures=failures, errors="0", skipped="0", time=total, timestamp=escape.xml(stamp),
                          hostname=host)
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="tolerance", value=escape.xml(result.tolerance))
    for path in result.accept_classes:
        ET.SubElement(props, "property", name="accept-class", value=escape.xml(path))
    for case in result.cases:
        tc = ET.SubElement(suite, "testcase", classname=escape.xml(f"bnaudit.check.{case.dtype}"),
                           name=escape.xml(case.name), time=f"{case.seconds:.3f}")
        line = escape.xml(ci_summary.case_line(case))
        if not case.passed:
            failure = ET.SubElement(tc, "failure", message=line,
                                    type=escape.xml(f"{case.verdict.value} ({case.tolerance})"))
            failure.text = _details(case)
        ET.SubElement(tc, "system-out").text = line + "\n" + _details(case)
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def error_xml(message: str, kind: str, code: int, *, timestamp: str | None = None,
              hostname: str | None = None) -> str:
    """The JUnit document of a check that could not judge (exit 3, 4, 8...): one ``<error>`` case.

    A CI test reporter then shows why the gate did not run, instead of finding no file.
    """
    stamp = timestamp or datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    root = ET.Element("testsuites", name=SUITE, tests="1", failures="0", errors="1", time="0.000")
    suite = ET.SubElement(root, "testsuite", name=SUITE, tests="1", failures="0", errors="1", skipped="0",
                          time="0.000", timestamp=escape.xml(stamp),
                          hostname=escape.xml(hostname if hostname is not None else platform.node()))
    tc = ET.SubElement(suite, "testcase", classname="bnaudit.check", name="check", time="0.000")
    error = ET.SubElement(tc, "error", message=escape.xml(message), type=escape.xml(f"{kind} (exit {code})"))
    error.text = escape.xml(f"bnaudit check could not judge: {message}", multiline=True)
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write(path: Path, result: CheckResult) -> None:
    """Write the JUnit file atomically."""
    write_text_atomic(Path(path), to_xml(result))


def write_error(path: Path, message: str, kind: str, code: int) -> None:
    """Write the JUnit file of a check that could not judge, atomically."""
    write_text_atomic(Path(path), error_xml(message, kind, code))
