"""The one base error of bnaudit and the exit codes it maps to.

Every failure a user can cause (a wrong flag, a corrupt file, a machine that cannot
honour a request) is raised as a ``BnauditError`` subclass.  The CLI turns it into
one line on stderr and the exit code below; nothing else in the code base chooses
an exit code.  README's exit-code table is this enum.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes: a documented contract (README, "Exit codes")."""

    OK = 0
    """Success; for compare/check: identical, or within policy."""
    DIFFERENT = 1
    """compare: the inputs differ; check: drift beyond the chosen policy."""
    USAGE = 2
    """A bad flag or value, or a request this machine cannot honour (e.g. an ISA it lacks)."""
    BAD_INPUT = 3
    """An input file is unreadable, corrupt, oversized, tampered with or of the wrong kind."""
    MISMATCH = 4
    """The inputs are of different experiments (spec, schema, epochs): comparison refused."""
    OUTPUT = 5
    """The output location cannot be written, or already holds results."""
    RUN_FAILED = 6
    """The training process died or reported an internal failure."""
    MISSING_TOOL = 7
    """An external tool is missing (qemu-user for CPU emulation)."""
    REFERENCE = 8
    """The mpmath reference is missing, or failed its own precision check."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C or SIGTERM); partial results are left in a folder that never parses as complete."""


BRIEF = {
    ExitCode.OK: "ok (compare, check: identical or within policy)",
    ExitCode.DIFFERENT: "different (check: drift beyond the policy)",
    ExitCode.USAGE: "bad flag or value, or a request this machine cannot honour",
    ExitCode.BAD_INPUT: "an input file unreadable, corrupt, edited or of the wrong kind",
    ExitCode.MISMATCH: "inputs of different experiments",
    ExitCode.OUTPUT: "output cannot be written or already holds results",
    ExitCode.RUN_FAILED: "the run failed",
    ExitCode.MISSING_TOOL: "an external tool (qemu-user) is missing",
    ExitCode.REFERENCE: "the mpmath reference is missing or failed its check",
    ExitCode.INTERRUPTED: "interrupted",
}
"""Each exit code in a few words: the table every command's ``--help`` ends with."""


class BnauditError(Exception):
    """Base of every error bnaudit reports to a user: a message and an exit code."""

    exit_code: ExitCode = ExitCode.RUN_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(BnauditError):
    """A bad option value, or a request this machine cannot honour."""

    exit_code = ExitCode.USAGE


class InputError(BnauditError):
    """An input file that cannot be trusted or used."""

    exit_code = ExitCode.BAD_INPUT


class MismatchError(BnauditError):
    """Inputs that describe different experiments."""

    exit_code = ExitCode.MISMATCH


class OutputError(BnauditError):
    """An output location that cannot be written safely."""

    exit_code = ExitCode.OUTPUT


class RunFailed(BnauditError):
    """A training process that died or failed."""

    exit_code = ExitCode.RUN_FAILED


class MissingTool(BnauditError):
    """An external program bnaudit needs for this request is not installed."""

    exit_code = ExitCode.MISSING_TOOL


class ReferenceFailure(BnauditError):
    """The high-precision reference is missing or not accurate enough."""

    exit_code = ExitCode.REFERENCE


class Interrupted(BnauditError):
    """The user interrupted the work."""

    exit_code = ExitCode.INTERRUPTED
