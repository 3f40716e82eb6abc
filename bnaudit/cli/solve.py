"""`bnaudit solve`: the cheapest settings that make a set of machines compute the experiment alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnaudit.cli._options import SpecOption
from bnaudit.controls import DTYPES

if TYPE_CHECKING:
    from collections.abc import Mapping

    from bnaudit.cluster import Cluster
    from bnaudit.matrix.plan import Plan
    from bnaudit.matrix.solve import StageRunner


def solve(
    machines: Annotated[str | None, typer.Option(
        metavar="LIST", help="Machines, comma-separated: native (this one) and qemu CPU models (default: native and "
                             "the census's 12 models).")] = None,
    lever: Annotated[list[str] | None, typer.Option(
        metavar="CONTROL=VALUE", help="A setting to try, e.g. isa=default, mkl-cbwr=COMPATIBLE, deterministic=on; "
                                      "repeat it (default: the ISA caps, MKL branches, oneDNN caps, deterministic "
                                      "algorithms and the dispatch controls).")] = None,
    max_levers: Annotated[int, typer.Option(help="Most settings combined in one recipe.")] = 3,
    dtype: Annotated[str, typer.Option(help=f"Run dtype: {', '.join(DTYPES)}.")] = "float32",
    epochs: Annotated[int, typer.Option(
        min=1, help="Epochs of the screening runs (default 1: machines that part, part in the first step).")] = 1,
    verify_epochs: Annotated[int | None, typer.Option(
        min=1, help="Epochs at which the best recipe is verified on every machine (default: the spec's).")] = None,
    cost_epochs: Annotated[int | None, typer.Option(
        min=1, help="Epochs of the runs that time each recipe on this machine (default: the spec's).")] = None,
    cost_repeats: Annotated[int, typer.Option(min=1, help="Rounds of the timing runs; the cost is the median.")] = 3,
    spec: SpecOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Solve folder (default: reports/solve/<solve id>); re-running resumes it.")] = None,
    jobs: Annotated[int, typer.Option("-j", "--jobs", min=1, help="Runs at a time (the timing runs: one).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Start every stage of the folder's solve over.")] = False,
    records: Annotated[list[str] | None, typer.Option(
        metavar="[NAME=]DIR", help="A real machine's records (e.g. its matrix folder from CI); repeat it per machine. "
                                   "Nothing is run: the configurations every machine ran are compared.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    scheduler: Annotated[str | None, typer.Option(
        metavar="ADDRESS", help="A dask scheduler (tcp://HOST:PORT): the machines are its workers' hosts, each "
                                "run pinned to its host; the timing runs stay on this machine (needs "
                                "bnaudit[cluster]).")] = None,
) -> int:
    """Find the cheapest settings that make every machine bit-identical: screened on one machine per class,
    verified at full length on all, timed on this one."""
    from bnaudit import envinfo, fileio
    from bnaudit._version import __version__
    from bnaudit.cli import lists
    from bnaudit.cli.matrix import cluster_of
    from bnaudit.errors import UsageError
    from bnaudit.matrix import census
    from bnaudit.matrix import solve as core
    from bnaudit.report import solve_view
    from bnaudit.spec import load_spec

    if records:
        return _from_records(records, dtype=dtype, as_json=as_json,
                             other=[n for n, v in (("--machines", machines), ("--lever", lever), ("--spec", spec),
                                                   ("--out", out), ("--scheduler", scheduler)) if v])
    if scheduler is not None and machines is not None:
        raise UsageError("with --scheduler the machines are the cluster's hosts (a worker started with "
                         "BNAUDIT_HOST_CPU_MODEL=MODEL stands for that model); --machines does not apply")
    experiment = load_spec(spec)
    levers = [core.parse_lever(t) for t in (lever or core.DEFAULT_LEVERS)]
    settings = {"dtype": dtype, "epochs": epochs, "verify_epochs": verify_epochs, "cost_epochs": cost_epochs,
                "cost_repeats": cost_repeats, "max_levers": max_levers}
    with cluster_of(scheduler) as cluster:
        if cluster is None:
            names = ((census.NATIVE, *census.DEFAULT_MODELS) if machines is None
                     else tuple(lists.split_list(machines, "--machines")))
        else:
            names, settings["cluster"] = cluster.hosts(), True
        target = Path("reports") / "solve" / core.solve_id(experiment, names, levers, **settings) if out is None \
            else out
        facts = census.local_facts(envinfo.cpu_vendor(), envinfo.cpu_features(), jobs=jobs) if cluster is None \
            else cluster.facts
        result = core.solve(experiment, names, levers, target, _stage_runner(cluster, force=force, quiet=as_json),
                            dtype=dtype, screen_epochs=epochs, verify_epochs=verify_epochs, cost_epochs=cost_epochs,
                            cost_repeats=cost_repeats, max_levers=max_levers, jobs=jobs, force=force,
                            facts_of=facts, on_cluster=cluster is not None)
    doc = {"schema": core.SOLVE_SCHEMA, "bnaudit": __version__, **result.to_dict()}
    fileio.write_text_atomic(target / "solve.json", fileio.dumps(doc))
    fileio.write_text_atomic(target / "solve.md", solve_view.markdown(result))
    if as_json:
        typer.echo(fileio.dumps(doc), nl=False)
    else:
        solve_view.render(result)
    return 0


def _stage_runner(cluster: Cluster | None, *, force: bool, quiet: bool) -> StageRunner:
    """Each stage as a matrix (its runs pinned to their hosts, on a cluster), with its progress unless ``quiet``."""
    from bnaudit.matrix.summary import run_matrix
    from bnaudit.report import matrix_view, solve_view

    def run_stage(name: str, plan: Plan, folder: Path, n_jobs: int) -> Mapping[str, str]:
        if not quiet:
            solve_view.stage_line(name, plan)
        with matrix_view.progress(plan, enabled=not quiet) as on_event:
            summary = run_matrix(plan, folder, render_markdown=matrix_view.markdown, jobs=n_jobs, force=force,
                                 on_event=on_event, runner=cluster.run if plan.hosts and cluster else None)
        return {r.key: r.error or r.status for r in summary.runs if r.status not in ("ran", "resumed")}
    return run_stage


def _from_records(sources: list[str], *, dtype: str, as_json: bool, other: list[str]) -> int:
    from bnaudit import fileio
    from bnaudit._version import __version__
    from bnaudit.errors import UsageError
    from bnaudit.matrix import fleet
    from bnaudit.report import solve_view

    if other:
        raise UsageError(f"--records solves from what the machines ran; {', '.join(other)} do not apply")
    result = fleet.from_records([fleet.parse_source(t) for t in sources], dtype=dtype)
    doc = {"schema": fleet.FLEET_SCHEMA, "bnaudit": __version__, **result.to_dict()}
    if as_json:
        typer.echo(fileio.dumps(doc), nl=False)
    else:
        solve_view.render_fleet(result)
    return 0


def register(app: typer.Typer) -> None:
    app.command("solve")(solve)
