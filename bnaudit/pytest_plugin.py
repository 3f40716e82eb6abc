"""pytest plugin: hold this machine to a committed bnaudit baseline, as snapshot tests hold output to a file.

A project's test asks for the ``bnaudit_baseline`` fixture and checks a baseline::

    def test_float32_still_matches(bnaudit_baseline):
        bnaudit_baseline.check("baselines/float32.json", epochs=5)

``check`` runs the baseline's configuration on this machine (in its own process, as
``bnaudit check --baseline FILE`` does; the options given override it) or takes
``record=RUN``, and fails the test with ``bnaudit check``'s verdict lines when the run
drifts beyond ``tolerance`` (default ``exact``): the case, the policy, the first
difference and the likeliest causes.  What cannot be judged (an edited baseline, a
record of another experiment) fails the test with bnaudit's one-line error and its exit
code.  A relative baseline path is taken from the test file's folder.

``pytest --bnaudit-update`` writes each baseline instead, regenerating one that exists,
through the code of ``bnaudit baseline create --force`` (``gate.make_baseline``): a run
made here with the options given (defaults as ``bnaudit run``'s, the spec's epochs),
or ``record=RUN``; the signing key ``BNAUDIT_SIGNING_KEY`` signs it when set.  Without
the flag a missing baseline fails the test, naming the flag; nothing is ever written.

Loading the plugin imports nothing of bnaudit beyond the package itself (no numpy, torch
or mpmath): installing bnaudit registers it as the ``pytest11`` entry point ``bnaudit``,
so pytest loads it in every session.  With plugin autoloading off
(``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``), ``pytest -p bnaudit.pytest_plugin`` loads it;
with autoloading on, ``-p bnaudit`` names it (``-p bnaudit.pytest_plugin`` would register
the one module twice, and pytest stops).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bnaudit.check import CheckResult
    from bnaudit.errors import BnauditError
    from bnaudit.gate import RunOptions

UPDATE_FLAG = "--bnaudit-update"

_WRITTEN = pytest.StashKey[list[str]]()
"""The baselines this session wrote, one line each, for the terminal summary."""

PathArg = str | os.PathLike[str]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bnaudit", "bnaudit baseline checks")
    group.addoption(UPDATE_FLAG, action="store_true", default=False,
                    help="Write (or regenerate) the baselines that bnaudit_baseline.check names, instead of "
                         "checking them.")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_WRITTEN] = []


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption(UPDATE_FLAG):
        return f"bnaudit: {UPDATE_FLAG}: baselines are written, not checked"
    return None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    written = config.stash.get(_WRITTEN, [])
    if written:
        terminalreporter.section("bnaudit baselines written")
        for line in written:
            terminalreporter.write_line(line)


def _error_text(exc: BnauditError) -> str:
    return f"bnaudit: error: {exc.message} (exit {int(exc.exit_code)}, {exc.exit_code.name})"


class BaselineCheck:
    """What the ``bnaudit_baseline`` fixture gives a test: ``check`` one baseline (or write it, under the flag)."""

    def __init__(self, folder: Path, update: bool, written: list[str]) -> None:
        self.folder = folder
        """Where a relative baseline path is taken from: the requesting test file's folder."""
        self.update = update
        """Whether this session writes baselines (``--bnaudit-update``) instead of checking them."""
        self._written = written

    def check(
        self,
        baseline: PathArg,
        *,
        record: PathArg | None = None,
        tolerance: str = "exact",
        accept: Sequence[PathArg] = (),
        dtype: str | None = None,
        threads: int | None = None,
        isa: str | None = None,
        deterministic: bool | None = None,
        epochs: int | None = None,
        profile: str | None = None,
        spec: PathArg | None = None,
    ) -> CheckResult | None:
        """Fail the test unless this machine's run (or ``record``) is within ``tolerance`` of ``baseline``.

        Returns the verdict (``check.CheckResult``) of a passing check; under
        ``--bnaudit-update`` writes the baseline instead and returns None.  The run
        options override the baseline's configuration (``bnaudit check``'s options);
        with ``record`` they are refused, as with ``--record``.
        """
        from bnaudit import api, gate
        from bnaudit.errors import BnauditError
        from bnaudit.report import ci_summary

        path = self.folder / Path(baseline)
        options = gate.RunOptions(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                                  epochs=epochs, profile=profile, spec=None if spec is None else Path(spec))
        try:
            if self.update:
                self._write(path, None if record is None else Path(record), options)
                return None
            if not path.exists():
                pytest.fail(f"bnaudit: no baseline at {path}; run pytest with {UPDATE_FLAG} to write it",
                            pytrace=False)
            result = api.check(record, path, tolerance, accept=accept, dtype=dtype, threads=threads, isa=isa,
                               deterministic=deterministic, epochs=epochs, profile=profile, spec=spec)
        except BnauditError as exc:
            pytest.fail(_error_text(exc), pytrace=False)
        for warning in result.warnings:
            warnings.warn(f"bnaudit: {warning}", stacklevel=2)
        if not result.passed:
            pytest.fail("\n".join(ci_summary.lines(result)), pytrace=False)
        return result

    def _write(self, path: Path, record: Path | None, options: RunOptions) -> None:
        """``bnaudit baseline create --force --out PATH`` (with ``--record`` when given)."""
        from bnaudit import gate

        path.parent.mkdir(parents=True, exist_ok=True)
        b = gate.make_baseline(path, source=record, options=options, force=True)
        fp = b.fingerprint
        self._written.append(f"{path}: {fp.controls.label()}, {fp.epochs} epochs, spec {fp.spec.short_hash}, "
                             f"digest {fp.digest[:16]}")


@pytest.fixture
def bnaudit_baseline(request: pytest.FixtureRequest) -> BaselineCheck:
    """Check this machine against a committed bnaudit baseline: ``bnaudit_baseline.check(FILE, epochs=N)``."""
    config = request.config
    return BaselineCheck(Path(request.path).parent, bool(config.getoption(UPDATE_FLAG)), config.stash[_WRITTEN])
