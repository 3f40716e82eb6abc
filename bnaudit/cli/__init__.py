"""The bnaudit command line: thin typer commands, and the one place errors become exit codes.

Each module of this package registers its commands (``register(app)``); a command
parses its options, calls one core function, renders the result and returns an exit
code.  ``main`` maps every ``BnauditError`` and click usage error to one line on stderr
and the documented exit code (httpie's split); no command handles errors itself.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors click; older releases use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from bnaudit import envinfo, interrupts
from bnaudit._version import __version__
from bnaudit.cli._options import ERROR_SCHEMA, json_document
from bnaudit.errors import BRIEF, BnauditError, ExitCode

EXIT_CODES = "Exit codes: " + "; ".join(f"{int(code)} {text}" for code, text in BRIEF.items()) + "."
"""The epilog of every --help (README, "Exit codes", says more)."""

app = typer.Typer(
    name="bnaudit",
    help="Audit the numerical reproducibility of the batch-norm noisy-feature experiment.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},  # command groups inherit it
    epilog="Environment: " + "; ".join(f"{k}: {v}" for k, v in envinfo.VARIABLES.items()) + ".\n\n" + EXIT_CODES,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnaudit {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print bnaudit's version and exit.")] = False,
) -> None:
    """Audit the numerical reproducibility of the batch-norm noisy-feature experiment."""


def _register_commands() -> None:
    modules = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in modules:
        module = importlib.import_module(f"{__name__}.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
    _add_epilog(app)


def _add_epilog(group: typer.Typer) -> None:
    """Every command's and group's --help ends with the exit codes."""
    for command in group.registered_commands:
        command.epilog = command.epilog or EXIT_CODES
    for sub in group.registered_groups:
        sub.epilog = sub.epilog or EXIT_CODES
        if sub.typer_instance is not None:
            sub.typer_instance.info.epilog = sub.typer_instance.info.epilog or EXIT_CODES
            _add_epilog(sub.typer_instance)


_register_commands()


def fail(message: str, code: int, *, as_json: bool = False) -> int:
    """Print one error line on stderr (with ``as_json``, the error object on stdout too); return the code.

    Messages quote untrusted text (keys of a hostile spec, file contents): anything
    unprintable is escaped, so the error stays one line.  After an interrupt every
    failure is the interrupt: a library that swallowed it, or turned it into an error
    of its own, does not change what happened.
    """
    if interrupts.received() and code != ExitCode.INTERRUPTED:
        message, code = "interrupted", ExitCode.INTERRUPTED
    one_line = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)
    if as_json:  # under --json a program reads stdout: the error is there too, as an object
        name = ExitCode(code).name if code in set(ExitCode) else str(code)
        sys.stdout.write(json_document(ERROR_SCHEMA, {"error": {"code": int(code), "name": name,
                                                                "message": one_line}}) + "\n")
        sys.stdout.flush()
    sys.stderr.write(f"bnaudit: error: {one_line}\n")
    if envinfo.github_actions():  # the line again, as an annotation on the run's page
        from bnaudit.report import annotations

        sys.stderr.write(annotations.error(f"bnaudit (exit {int(code)})", one_line) + "\n")
    sys.stderr.flush()
    return int(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, map every failure to one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args

    def failed(message: str, code: int) -> int:
        return fail(message, code, as_json=as_json)

    try:
        code = app(args=args, prog_name="bnaudit", standalone_mode=False)
        if code == ExitCode.INTERRUPTED:  # typer turns a Ctrl-C it catches into a silent 130
            return failed("interrupted", ExitCode.INTERRUPTED)
    except BnauditError as exc:
        return failed(exc.message, exc.exit_code)
    except click_exceptions.NoArgsIsHelpError as exc:  # bare `bnaudit`, `bnaudit baseline`: the help, readable
        sys.stdout.write(exc.format_message().rstrip("\n") + "\n")
        where = exc.ctx.command_path if exc.ctx is not None else "bnaudit"
        return failed(f"{where}: no command given (its help is above)", ExitCode.USAGE)
    except click_exceptions.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        return failed(f"{where}{exc.format_message()}", ExitCode.USAGE)
    except click_exceptions.ClickException as exc:
        return failed(exc.format_message(), ExitCode.USAGE)
    except (typer.Abort, KeyboardInterrupt):
        return failed("interrupted", ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug in bnaudit: still one line, the traceback on request
        if envinfo.debug():
            raise
        return failed(f"internal error: {type(exc).__name__}: {exc} (set BNAUDIT_DEBUG=1 for the traceback)",
                      ExitCode.RUN_FAILED)
    if interrupts.received():  # a library swallowed the interrupt and the command went on
        return failed("interrupted", ExitCode.INTERRUPTED)
    if isinstance(code, int):
        return code
    return int(ExitCode.OK)
