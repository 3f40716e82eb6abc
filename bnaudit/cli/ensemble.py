"""`bnaudit ensemble`: outcome distributions over seeds, pairs compared seed by seed, and the 1-ulp floor."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnaudit.cli._options import SeedScopeOption, SpecOption

if TYPE_CHECKING:
    from bnaudit.matrix.ensemble import Request, Table
    from bnaudit.matrix.plan import Plan

ListOption = str | None


def ensemble(
    seeds: Annotated[str, typer.Option(metavar="A..B", help="Seeds: a range A..B, a comma list, or both.")] = "1..32",
    seed_scope: SeedScopeOption = None,
    networks: Annotated[str, typer.Option(
        metavar="LIST", help="bn (the seed page's network), no-bn (its baseline without BatchNorm), or bn,no-bn.")]
    = "bn",
    dtype: Annotated[ListOption, typer.Option(metavar="LIST", help="Dtypes, comma-separated.")] = None,
    threads: Annotated[ListOption, typer.Option(metavar="LIST", help="Thread counts, e.g. 1,2.")] = None,
    isa: Annotated[ListOption, typer.Option(metavar="LIST", help="ISA caps, e.g. default,avx2.")] = None,
    cpu_model: Annotated[ListOption, typer.Option(
        metavar="LIST", help="CPUs to emulate under qemu (models, seed-i7, seed-i5; native: this CPU).")] = None,
    mkl_cbwr: Annotated[ListOption, typer.Option(metavar="LIST", help="MKL_CBWR overrides.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of every run (default: the spec's).")] = None,
    perturb: Annotated[str, typer.Option(
        metavar="LAYER.PARAM[INDEX]:ULPS", help="The floor's perturbation, run on the first configuration per seed.")]
    = "linear1.weight[0,0]:1",
    floor: Annotated[bool, typer.Option("--floor/--no-floor", help="Run the 1-ulp floor too.")] = True,
    alpha: Annotated[float, typer.Option(min=1e-6, max=0.5, help="Significance level of the verdicts.")] = 0.05,
    spec: SpecOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Ensemble folder (default: reports/ensemble/<plan id>); re-running resumes it.")] = None,
    jobs: Annotated[int, typer.Option("-j", "--jobs", min=1, help="Runs at a time.")] = 1,
    force: Annotated[bool, typer.Option(
        "--force", help="Start the folder's runs over (with --collect: only replace --baseline-out).")] = False,
    collect: Annotated[bool, typer.Option(
        "--collect", help="Run nothing: analyse the runs the folder holds (a partial or running ensemble).")] = False,
    scheduler: Annotated[str | None, typer.Option(
        metavar="ADDRESS", help="A dask scheduler (tcp://HOST:PORT): its workers run (bnaudit[cluster]).")] = None,
    baseline_out: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Also write an ensemble baseline for bnaudit check --tolerance dist:RATE: one "
                             "configuration's outcomes over the seeds, sealed (signed with BNAUDIT_SIGNING_KEY).")]
    = None,
    baseline_config: Annotated[str | None, typer.Option(
        metavar="NAME", help="The configuration of --baseline-out, as the answer names it (default: first).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> int:
    """Run every configuration once per seed and say whether a configuration changes what the training gives,
    or only reshuffles it as much as a 1-ulp change does."""
    from bnaudit import fileio
    from bnaudit._version import __version__
    from bnaudit.cli import lists
    from bnaudit.cli.matrix import cluster_of
    from bnaudit.errors import RunFailed, UsageError
    from bnaudit.matrix import ensemble as core
    from bnaudit.matrix.plan import Grid
    from bnaudit.report import ensemble_view
    from bnaudit.spec import load_spec

    chosen, scope = lists.seeds_and_scope(seeds, seed_scope)
    overrides = lists.grid_values(dtype=dtype, threads=threads, isa=isa, cpu_model=cpu_model, mkl_cbwr=mkl_cbwr)
    req = core.request(load_spec(spec), networks=lists.split_list(networks, "--networks"), seeds=chosen,
                       scope=scope, grid=Grid(**overrides), epochs=epochs, perturb=perturb if floor else None)
    if collect and scheduler:
        raise UsageError("--collect runs nothing; --scheduler does not apply")
    if baseline_config is not None and baseline_out is None:
        raise UsageError("--baseline-config names the configuration of --baseline-out; give --baseline-out too")
    with cluster_of(scheduler) as cluster:
        runs_plan, floor_plan = core.plans(req, hosts=() if cluster is None else cluster.hosts())
        target = out if out is not None else Path("reports") / "ensemble" / runs_plan.plan_id
        stages = [(runs_plan, target / "runs"), *([(floor_plan, target / "floor")] if floor_plan else [])]
        failed = 0 if collect else sum(  # --force with --collect replaces the baseline file, never the runs
            _run(plan, folder, jobs=jobs, force=force, quiet=as_json, runner=None if cluster is None else cluster.run)
            for plan, folder in stages)
    answer, table = core.analyse(req, stages, folder_text=str(target), alpha=alpha)
    doc = {"schema": core.ENSEMBLE_SCHEMA, "bnaudit": __version__, **answer.to_dict()}
    fileio.write_text_atomic(target / "ensemble.json", fileio.dumps(doc))
    fileio.write_text_atomic(target / "ensemble.md", ensemble_view.markdown(answer))
    ensemble_view.figures(answer, table, target / "figures")
    if baseline_out is not None:
        _write_baseline(req, table, baseline_out, baseline_config, force=force)
    if as_json:
        typer.echo(fileio.dumps(doc), nl=False)
    else:
        ensemble_view.render(answer)
    if failed:
        raise RunFailed(f"{failed} runs did not complete; the answer above uses the seeds that did; re-run the same "
                        "command to retry")
    return 0


def _write_baseline(req: Request, table: Table, out: Path, config: str | None, *, force: bool) -> None:
    """--baseline-out: the configuration's first seed's record, sealed with every seed's outcome."""
    from bnaudit import gate
    from bnaudit.baseline import write_baseline
    from bnaudit.matrix import ensemble as core

    block, source = core.outcomes_of(req, table, config)
    write_baseline(out, source, update=False, force=force, key=gate.signing_key(), ensemble=block)


def _run(plan: Plan, folder: Path, *, jobs: int, force: bool, quiet: bool, runner: object) -> int:
    """Run (resuming) one of the ensemble's matrices; the number of runs that did not complete."""
    from bnaudit.matrix.summary import run_matrix
    from bnaudit.report import matrix_view

    with matrix_view.progress(plan, enabled=not quiet) as on_event:
        summary = run_matrix(plan, folder, render_markdown=matrix_view.markdown, jobs=jobs, force=force,
                             on_event=on_event, runner=runner)  # type: ignore[arg-type]
    return sum(r.status not in ("ran", "resumed") for r in summary.runs)


def register(app: typer.Typer) -> None:
    app.command("ensemble")(ensemble)
