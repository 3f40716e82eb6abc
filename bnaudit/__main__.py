"""The ``bnaudit`` command (``python -m bnaudit`` and the console script).

The entry point is here, outside ``bnaudit.cli``, so that a signal that arrives while
the CLI and its libraries are still being imported is one line and an exit code like
any other, never a traceback.  SIGTERM is handled as SIGINT is: the code that cleans
up after Ctrl-C (temporary folders, child processes, locks) runs for both.  When the
interrupt is raised, and why, is ``bnaudit.interrupts``.
"""

from __future__ import annotations

import sys

from bnaudit import interrupts

INTERRUPTED = 130  # errors.ExitCode.INTERRUPTED, before anything else is imported


def _interrupted() -> int:
    sys.stderr.write("bnaudit: error: interrupted\n")
    sys.stderr.flush()
    return INTERRUPTED


def entry() -> None:
    """Run the CLI; every failure, signals during start-up included, is one line and a code."""
    try:
        interrupts.install()
        from bnaudit.cli import main
    except KeyboardInterrupt:
        sys.exit(_interrupted())
    try:
        code = main()
    except KeyboardInterrupt:  # after main's own handlers, e.g. while its error line is written
        code = _interrupted()
    interrupts.hold_for_exit()
    sys.exit(code)


if __name__ == "__main__":
    entry()
