"""`bnaudit census`: which machines (this one and qemu CPU models) compute the experiment alike, and why not."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli._options import SpecOption


def census(
    models: Annotated[str | None, typer.Option(
        metavar="LIST", help="qemu CPU models beside this machine, comma-separated (default: Intel Nehalem to "
                             "Icelake-Server and AMD EPYC to EPYC-Milan); 'native' is always included.")] = None,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Epochs of every run (default 1: machines that part, part in the first step).")] = None,
    spec: SpecOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Census folder (default: reports/census/<plan id>); re-running resumes it.")] = None,
    jobs: Annotated[int, typer.Option("-j", "--jobs", min=1, help="Machines run at a time.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Start the folder's census over.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the census as JSON.")] = False,
) -> int:
    """Group machines into classes of bit-identical runs: where each pair of classes parts, and which CPU
    features and vendors separate them."""
    from bnaudit import emulate, envinfo, fileio
    from bnaudit._version import __version__
    from bnaudit.cli import lists
    from bnaudit.errors import RunFailed
    from bnaudit.matrix import census as core
    from bnaudit.matrix.summary import run_matrix
    from bnaudit.report import census_view, matrix_view
    from bnaudit.spec import load_spec

    experiment = load_spec(spec)
    named = core.DEFAULT_MODELS if models is None else lists.split_list(models, "--models")
    machines = (core.NATIVE, *(m for m in named if not emulate.is_native(m)))
    plan = core.plan(experiment, machines, epochs=core.DEFAULT_EPOCHS if epochs is None else epochs)
    target = out if out is not None else Path("reports") / "census" / plan.plan_id
    with matrix_view.progress(plan, enabled=not as_json) as on_event:
        summary = run_matrix(plan, target, render_markdown=matrix_view.markdown, jobs=jobs, force=force,
                             on_event=on_event)
    result = core.analyse(plan, target, envinfo.cpu_vendor(), envinfo.cpu_features(), jobs=jobs)
    doc = {"schema": core.CENSUS_SCHEMA, "bnaudit": __version__, **result.to_dict()}
    fileio.write_text_atomic(target / "census.json", fileio.dumps(doc))
    fileio.write_text_atomic(target / "census.md", census_view.markdown(result))
    if as_json:
        typer.echo(fileio.dumps(doc), nl=False)
    else:
        census_view.render(result)
    if not summary.complete:
        raise RunFailed(f"{len(result.missing)} of {len(plan.runs)} machines did not complete (first: "
                        f"{result.missing[0]}); the census above covers the others; re-run the same command to retry")
    return 0


def register(app: typer.Typer) -> None:
    app.command("census")(census)
