"""Ctrl-C and SIGTERM: when the interrupt is raised, and the rule that no output is committed after one.

A leaf that imports nothing of bnaudit, so the entry point installs it before anything
else is imported.  Three things CPython and the libraries do with a bare
KeyboardInterrupt, each seen on a ``bnaudit report`` interrupted at random moments:

* raised inside an import, it can leave a C extension half-initialised (matplotlib:
  a fatal error at exit, status -6) or come back as another error (``__set_name__``
  wraps it in a RuntimeError).  So while the main thread is importing, the interrupt
  waits, polled every ``RETRY_S`` by a timer (SIGALRM), and is raised within
  ``RETRY_S`` of the import's end: a delay of at most one import;
* crossing some of CPython's C code, it is marked unhandled, and CPython ends the
  process by SIGINT (status -2) after bnaudit has chosen its exit code.  The exception
  raised is a subclass, ``Interrupted``, which CPython does not mark;
* a library may swallow it (matplotlib's font matching, seen: the report completed)
  or turn it into another error (pybind11: a TypeError).  So the interrupt is also
  remembered: ``check()`` raises it again before any output is committed, and the CLI
  maps any error that follows an interrupt to the interrupt.

Objects the interrupt leaves half-built may complain as they are collected ("Exception
ignored in ..."): after an interrupt those are silenced, the one error line is all.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType

RETRY_S = 0.05
_IMPORT_MACHINERY = "<frozen importlib._bootstrap>"
_received = False
_holding = 0
_STOPS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by bnaudit's handler."""


def install() -> None:
    """Handle SIGINT and SIGTERM (and the retry timer, SIGALRM) in this process."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(signum, _handle)


def received() -> bool:
    """Whether this process has been interrupted (only where ``install`` was called)."""
    return _received


def check() -> None:
    """Raise ``Interrupted`` if an interrupt came, even one a library swallowed."""
    if _received:
        raise Interrupted


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the interrupt back while the block runs (a commit: renames that belong together).

    An interrupt that comes meanwhile is raised when the block ends.  (Blocking the
    signal would not do: it is delivered to any thread that does not block it, numpy's
    and OpenBLAS's included, and the handler then runs in the main thread all the same.)
    """
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
    check()


def hold_for_exit() -> None:
    """From here on no signal changes the exit status bnaudit chose.

    Without it, a signal that comes while the interpreter finalizes (a tenth of a second
    with matplotlib loaded) finds the default disposition restored and kills the
    process: status -2 for a command that had finished.  CPython leaves an ignored
    signal ignored while it finalizes.
    """
    signal.setitimer(signal.ITIMER_REAL, 0)
    for signum in (*_STOPS, signal.SIGALRM):
        signal.signal(signum, signal.SIG_IGN)


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename == _IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


def _handle(signum: int, frame: FrameType | None) -> None:
    global _received
    if signum != signal.SIGALRM:
        _received = True
    if not _received or _holding:  # a timer bnaudit did not set; or a commit, which raises it at its end
        return
    if _importing(frame):
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    sys.unraisablehook = _quiet
    raise Interrupted


def _quiet(unraisable: object) -> None:
    """After an interrupt nothing but its one error line is printed."""
