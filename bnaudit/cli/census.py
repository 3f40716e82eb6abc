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
    scheduler: Annotated[str | None, typer.Option(
        metavar="ADDRESS", help="A dask scheduler (tcp://HOST:PORT): the machines are its workers' hosts, one "
                                "native run on each, in runs/<worker name>/ (needs bnaudit[cluster]).")] = None,
) -> int:
    """Group machines into classes of bit-identical runs: where each pair of classes parts, and which CPU
    features and vendors separate them."""
    from bnaudit import emulate, envinfo, fileio
    from bnaudit._version import __version__
    from bnaudit.cli import lists
    from bnaudit.cli.matrix import cluster_of
    from bnaudit.errors import RunFailed, UsageError
    from bnaudit.matrix import census as core
    from bnaudit.matrix.summary import run_matrix
    from bnaudit.report import census_view, matrix_view
    from bnaudit.spec import load_spec

    if scheduler is not None and models is not None:
        raise UsageError("with --scheduler the machines are the cluster's hosts (a worker started with "
                         "BNAUDIT_HOST_CPU_MODEL=MODEL stands for that model); --models does not apply")
    experiment = load_spec(spec)
    named = core.DEFAULT_MODELS if models is None else lists.split_list(models, "--models")
    machines = (core.NATIVE, *(m for m in named if not emulate.is_native(m)))
    n_epochs = core.DEFAULT_EPOCHS if epochs is None else epochs
    with cluster_of(scheduler) as cluster:
        plan = core.plan(experiment, machines, epochs=n_epochs, hosts=() if cluster is None else cluster.hosts())
        target = out if out is not None else Path("reports") / "census" / plan.plan_id
        with matrix_view.progress(plan, enabled=not as_json) as on_event:
            summary = run_matrix(plan, target, render_markdown=matrix_view.markdown, jobs=jobs, force=force,
                                 on_event=on_event, runner=None if cluster is None else cluster.run)
        facts = core.local_facts(envinfo.cpu_vendor(), envinfo.cpu_features(), jobs=jobs) if cluster is None \
            else cluster.facts
        result = core.analyse(plan, target, facts)
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
