"""Ctrl-C and SIGTERM at the moments where CPython and the libraries mishandle a bare KeyboardInterrupt.

Each test starts a real interpreter with bnaudit's handlers installed, waits for it to
say it has reached the moment, and signals it: no timing guesses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnaudit import cli, interrupts
from bnaudit.errors import ExitCode


def _start(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "script.py"
    script.write_text("import sys\nfrom bnaudit import interrupts\ninterrupts.install()\n" + textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_when_ready(proc: subprocess.Popen[str], signum: int = signal.SIGINT) -> tuple[str, str]:
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return out, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_waits_for_the_import_it_lands_in(tmp_path, signum):
    """The module's body runs to its end; the interrupt is raised within RETRY_S of the import's end."""
    (tmp_path / "slow.py").write_text("print('ready', flush=True)\nimport time\ntime.sleep(1.0)\nWHOLE = True\n")
    proc = _start("""
        import time
        sys.path.insert(0, '.')
        try:
            import slow
            time.sleep(30)
            print('not interrupted')
        except interrupts.Interrupted:
            print('whole' if sys.modules['slow'].WHOLE else 'half')
            sys.exit(130)
        """, tmp_path)
    out, err = _signal_when_ready(proc, signum)
    assert (proc.returncode, out, err) == (130, "whole\n", "")


def test_an_interrupt_outside_an_import_is_raised_at_once(tmp_path):
    proc = _start("""
        import time
        start = time.monotonic()
        try:
            print('ready', flush=True)
            time.sleep(30)
        except interrupts.Interrupted:
            print(time.monotonic() - start < 10)
        """, tmp_path)
    out, _ = _signal_when_ready(proc)
    assert out == "True\n"


def test_an_interrupt_a_library_swallows_still_commits_nothing(tmp_path):
    """A library's bare ``except:`` eats the exception; the atomic folder still refuses to commit."""
    proc = _start("""
        import time
        from pathlib import Path
        from bnaudit import fileio
        try:
            with fileio.atomic_folder(Path('out'), 'a test folder') as tmp:
                (tmp / 'part').write_text('x')
                try:
                    print('ready', flush=True)
                    time.sleep(30)
                except BaseException:  # what a careless library does
                    pass
                (tmp / 'marker').write_text('complete')
        except interrupts.Interrupted:
            sys.exit(130)
        """, tmp_path)
    _signal_when_ready(proc)
    assert proc.returncode == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]


def test_an_interrupt_during_a_commit_is_raised_after_it(tmp_path):
    """The renames that replace a folder are never cut in half: the new folder is whole, nothing is left."""
    proc = _start("""
        import time
        from pathlib import Path
        from bnaudit import interrupts
        Path('a').mkdir()
        try:
            with interrupts.held():
                Path('a').rename('b')
                print('ready', flush=True)
                time.sleep(0.5)
                Path('b').rename('c')
        except interrupts.Interrupted:
            sys.exit(130)
        """, tmp_path)
    _signal_when_ready(proc)
    assert proc.returncode == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "script.py"]


def test_a_signal_while_the_interpreter_finalizes_does_not_change_the_status(tmp_path):
    """Signalled while modules are torn down (after CPython restored the default handlers), numpy's
    threads up: without ``hold_for_exit`` the process ends by SIGINT (-2) after choosing its status."""
    proc = _start("""
        import time
        import numpy
        numpy.ones((64, 64)) @ numpy.ones((64, 64))

        class SlowToCollect:
            def __del__(self, sleep=time.sleep, out=sys.stdout):
                out.write('ready\\n')
                out.flush()
                sleep(0.5)

        kept = SlowToCollect()
        interrupts.hold_for_exit()
        sys.exit(0)
        """, tmp_path)
    _, err = _signal_when_ready(proc)
    assert (proc.returncode, err) == (0, "")


def test_any_failure_after_an_interrupt_is_the_interrupt(monkeypatch, capsys):
    """pybind11 turns a KeyboardInterrupt into a TypeError, ``__set_name__`` into a RuntimeError."""
    monkeypatch.setattr(interrupts, "_received", True)
    assert cli.fail("internal error: TypeError: affine_transform(): incompatible function arguments",
                    ExitCode.RUN_FAILED) == ExitCode.INTERRUPTED
    assert capsys.readouterr().err == "bnaudit: error: interrupted\n"
    assert cli.fail("interrupted with 1 of 2 configurations finished", ExitCode.INTERRUPTED) == 130
    assert capsys.readouterr().err == "bnaudit: error: interrupted with 1 of 2 configurations finished\n"


def test_a_command_that_goes_on_after_a_swallowed_interrupt_ends_interrupted(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(interrupts, "_received", True)
    assert cli.main(["--version"]) == ExitCode.INTERRUPTED
    assert capsys.readouterr().err == "bnaudit: error: interrupted\n"


def test_without_an_interrupt_nothing_changes(capsys):
    assert not interrupts.received()
    interrupts.check()
    with interrupts.held():
        pass
    assert cli.fail("a message", ExitCode.USAGE) == ExitCode.USAGE
    assert capsys.readouterr().err == "bnaudit: error: a message\n"
