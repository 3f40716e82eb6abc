"""`bnaudit matrix`: sweep the numerics controls, one process per configuration, and summarise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bnaudit.cli import lists
from bnaudit.cli._options import SeedScopeOption, SpecOption
from bnaudit.cli.run import _epoch_list
from bnaudit.controls import DTYPES, ISAS

if TYPE_CHECKING:
    from bnaudit.cluster import Cluster
    from bnaudit.matrix.plan import Plan
    from bnaudit.matrix.results import MatrixSummary
    from bnaudit.spec import ExperimentSpec

ListOption = str | None


def matrix(
    dtype: Annotated[ListOption, typer.Option(metavar="LIST", help=f"Dtypes, comma-separated: {', '.join(DTYPES)}.")]
    = None,
    threads: Annotated[ListOption, typer.Option(metavar="LIST", help="Thread counts, e.g. 1,2.")] = None,
    isa: Annotated[ListOption, typer.Option(metavar="LIST", help=f"ISA caps: {', '.join(ISAS)}.")] = None,
    deterministic: Annotated[ListOption, typer.Option(
        metavar="off|on|both", help="Deterministic algorithms: off, on, or both.")] = None,
    onednn_isa: Annotated[ListOption, typer.Option(
        metavar="LIST", help="ONEDNN_MAX_CPU_ISA overrides, e.g. inherit,SSE41,AVX2 (inherit: what --isa sets).")]
    = None,
    mkl_cbwr: Annotated[ListOption, typer.Option(
        metavar="LIST", help="MKL_CBWR overrides, e.g. inherit,COMPATIBLE,AVX2,STRICT: STRICT binds to the branch "
                             "before it (AVX2,STRICT is one value); none removes the variable.")] = None,
    cpu_model: Annotated[ListOption, typer.Option(
        metavar="LIST", help="CPUs to emulate under qemu-x86_64 (models or presets seed-i7, seed-i5); "
                             "native runs on this CPU.")] = None,
    promote: Annotated[ListOption, typer.Option(
        metavar="LIST", help="Sets of operations computed in float64, e.g. none,bn,bn-stats,linear+bn+loss+optimizer "
                             "(+ joins the operations of one configuration).")] = None,
    numpy_disable: Annotated[ListOption, typer.Option(
        metavar="LIST", help="NPY_DISABLE_CPU_FEATURES values, e.g. inherit,X86_V4,X86_V3+X86_V4 (+ joins the targets "
                             "of one value).")] = None,
    openblas_coretype: Annotated[ListOption, typer.Option(
        metavar="LIST", help="OPENBLAS_CORETYPE values, e.g. inherit,Haswell,Nehalem.")] = None,
    dynamic_threads: Annotated[ListOption, typer.Option(
        metavar="off|on|both", help="OMP_DYNAMIC/MKL_DYNAMIC: off, on, or both.")] = None,
    kmp_deterministic_reduction: Annotated[ListOption, typer.Option(
        metavar="off|on|both", help="KMP_DETERMINISTIC_REDUCTION: off, on, or both.")] = None,
    flush_denormal: Annotated[ListOption, typer.Option(
        metavar="off|on|both", help="Flush subnormals to zero: off, on, or both.")] = None,
    preset: Annotated[str | None, typer.Option(
        help="A named matrix: seed-machines (the seed's two CPUs, with and without BN). Grid options given "
             "explicitly replace the preset's values.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of every run (default: the spec's; preset: its own).")]
    = None,
    spec: SpecOption = None,
    seeds: Annotated[ListOption, typer.Option(
        metavar="A..B", help="Run every configuration once per seed: a range A..B, a comma list, or both "
                             "(the frozen inputs of --seed-scope drawn from each).")] = None,
    seed_scope: SeedScopeOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Matrix folder (default: reports/matrix/<preset or grid>-<plan id>); re-running resumes it.")] = None,
    jobs: Annotated[int, typer.Option("-j", "--jobs", help="Configurations run at a time.")] = 1,
    force: Annotated[bool, typer.Option(
        "--force", help="Start the folder's matrix over (its runs are deleted).")] = False,
    trace_epochs: Annotated[str | None, typer.Option(
        metavar="E1,E2", help="Epochs digested step by step, besides epoch 0.")] = None,
    audit_every: Annotated[int, typer.Option(help="Operator audit every N epochs in each run (0 = off).")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print the summary as Markdown.")] = False,
    scheduler: Annotated[str | None, typer.Option(
        metavar="ADDRESS", help="A dask scheduler (tcp://HOST:PORT): every configuration runs once on each of its "
                                "workers, in runs/<worker name>/ (needs bnaudit[cluster]).")] = None,
) -> int:
    """Run every combination of the given controls, each in its own process, and say which change the bits."""
    from bnaudit.matrix.summary import run_matrix
    from bnaudit.report import matrix_view
    from bnaudit.spec import load_spec

    experiment = load_spec(spec)
    overrides = lists.grid_values(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                                  onednn_isa=onednn_isa, mkl_cbwr=mkl_cbwr, cpu_model=cpu_model,
                                  promote=promote, numpy_disable=numpy_disable, openblas_coretype=openblas_coretype,
                                  dynamic_threads=dynamic_threads,
                                  kmp_deterministic_reduction=kmp_deterministic_reduction,
                                  flush_denormal=flush_denormal)
    with cluster_of(scheduler) as cluster:
        plan = _plan(experiment, spec, preset, overrides, epochs=epochs, trace=_epoch_list(trace_epochs),
                     audit_every=audit_every, hosts=() if cluster is None else cluster.hosts(),
                     seeds=lists.seeds_and_scope(seeds, seed_scope))
        target = out if out is not None else Path("reports") / "matrix" / f"{preset or 'grid'}-{plan.plan_id}"
        with matrix_view.progress(plan, enabled=not (as_json or as_markdown)) as on_event:
            summary = run_matrix(plan, target, render_markdown=matrix_view.markdown, jobs=jobs, force=force,
                                 on_event=on_event, runner=None if cluster is None else cluster.run)
    _show(summary, target, as_json=as_json, as_markdown=as_markdown)
    return 0


@contextlib.contextmanager
def cluster_of(scheduler: str | None) -> Iterator[Cluster | None]:
    """The dask cluster at ``--scheduler`` (closed afterwards), or None: this machine."""
    if scheduler is None:
        yield None
        return
    from bnaudit.cluster import Cluster

    with Cluster(scheduler) as cluster:
        yield cluster


def _plan(experiment: ExperimentSpec, spec: Path | None, preset: str | None, overrides: dict[str, tuple[Any, ...]],
          *, epochs: int | None, trace: tuple[int, ...], audit_every: int, hosts: tuple[str, ...],
          seeds: tuple[tuple[int, ...], tuple[str, ...]] = ((), ())) -> Plan:
    from bnaudit.matrix import plan as mplan

    chosen, scope = seeds
    if preset is not None:
        return mplan.preset_plan(preset, experiment, epochs=epochs, overrides=overrides, trace_epochs=trace,
                                 audit_every=audit_every, hosts=hosts, seeds=chosen, seed_scope=scope)
    variants: tuple[mplan.Variant, ...] = (mplan.Variant("default" if spec is None else Path(spec).stem, experiment),)
    if chosen:
        variants = mplan.seeded(variants, chosen, scope)
    return mplan.make_plan(variants, mplan.Grid(**overrides), epochs=epochs, trace_epochs=trace,
                           audit_every=audit_every, hosts=hosts)


def _show(summary: MatrixSummary, target: Path, *, as_json: bool, as_markdown: bool) -> None:
    from bnaudit import fileio
    from bnaudit.errors import RunFailed
    from bnaudit.report import matrix_view

    if as_json:
        typer.echo(fileio.dumps(summary.to_dict()), nl=False)
    elif as_markdown:
        typer.echo(matrix_view.markdown(summary))
    else:
        matrix_view.render(summary)
    if not summary.complete:
        failed = [r for r in summary.runs if r.status != "ran" and r.status != "resumed"]
        raise RunFailed(f"{len(failed)} of {len(summary.runs)} configurations did not complete (first: "
                        f"{failed[0].key}: {failed[0].error or failed[0].status}); the others are summarised in "
                        f"{target}; re-run the same command to retry")


def register(app: typer.Typer) -> None:
    app.command("matrix")(matrix)
