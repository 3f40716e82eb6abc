"""`bnaudit compare`: are these runs bit-identical, and if not, where do they part and why."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli._options import SameLengthOption


def compare(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="A B [C ...]", help="Fingerprint files, record folders or record.json files.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print Markdown (a pull-request comment).")] = False,
    allow_different_spec: Annotated[bool, typer.Option(
        "--allow-different-spec",
        help="Compare what still can be across different specs, frozen inputs or storage dtypes.")] = False,
    same_length: SameLengthOption = False,
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", metavar="DIR",
        help="Export the operation where the training parts (a forward operation of the first step) as a "
             "standalone reproducer: its exact inputs, both runs' settings and digests, and reproduce.py.",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --bundle folder.")] = False,
) -> int:
    """Compare runs bit for bit: identical, or the first difference, the divergence and the environment diff.

    Runs of different lengths are compared over the epochs they all ran (said in one line).

    Exit codes: 0 all identical, 1 they differ, 3 an input is unusable, 4 different experiments (refused),
    or different lengths with --same-length.
    """
    from bnaudit import compare as core
    from bnaudit import record
    from bnaudit.errors import ExitCode, UsageError
    from bnaudit.report import compare_view

    if len(inputs) < 2:
        raise UsageError("compare needs at least two inputs (A B [C ...])")
    if as_json and as_markdown:
        raise UsageError("choose one of --json and --markdown")
    if bundle is not None and len(inputs) != 2:
        raise UsageError("--bundle exports the split of two inputs (A B)")
    from bnaudit.reference import sensitivity

    fps = [record.load(p) for p in inputs]
    exact = sensitivity.stored(fps[0].spec)
    if len(fps) == 2:
        result: core.PairComparison | core.ManyComparison = core.compare_pair(
            fps[0], fps[1], allow_different_spec=allow_different_spec, exact=exact, same_length=same_length)
    else:
        result = core.compare_many(fps, allow_different_spec=allow_different_spec, exact=exact,
                                   same_length=same_length)
    if bundle is not None:
        from bnaudit import bundle as bundles

        assert isinstance(result, core.PairComparison)
        bundles.export(fps[0], fps[1], result, bundle, force=force)
    if as_json:
        typer.echo(compare_view.to_json(result))
    elif as_markdown:
        typer.echo(compare_view.markdown(result))
    else:
        compare_view.render(result)
    if bundle is not None and not as_json:
        typer.echo(f"bundle written to {bundle} (see its README.txt)", err=as_markdown)
    return int(ExitCode.OK if result.identical else ExitCode.DIFFERENT)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
