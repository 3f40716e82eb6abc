"""`bnaudit run`, `bnaudit env` and `bnaudit frozen`: one controlled run, and what it stands on."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli._options import (
    ENV_SCHEMA,
    RUN_SCHEMA,
    DtypeOption,
    IsaOption,
    SeedOption,
    SeedScopeOption,
    SpecOption,
    experiment_of,
    json_document,
)


def _epoch_list(text: str | None) -> tuple[int, ...]:
    from bnaudit.errors import UsageError

    if not text:
        return (0,)
    try:
        values = {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise UsageError(f"--trace-epochs {text!r}: expected comma-separated epoch numbers") from None
    return tuple(sorted(values | {0}))


def default_out(label: str, spec_hash: str) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("reports") / "runs" / f"{label}-{spec_hash[:8]}-{stamp}"


def run(
    dtype: DtypeOption = "float32",
    threads: Annotated[int, typer.Option(min=1, max=1024, help="Intra-op, OpenMP and MKL threads.")] = 1,
    isa: IsaOption = "native",
    deterministic: Annotated[bool, typer.Option("--deterministic/--no-deterministic",
                                                help="torch deterministic algorithms.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Epochs to run (default: the spec's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Record folder (default: reports/runs/<config>-<time>).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing record folder (only ever one bnaudit wrote).")] = False,
    spec: SpecOption = None,
    seed: SeedOption = None,
    seed_scope: SeedScopeOption = None,
    perturb: Annotated[str | None, typer.Option(
        metavar="LAYER.PARAM[INDEX]:ULPS", help="Move one initial value by some ulps (the chaos floor).")] = None,
    trace_epochs: Annotated[str | None, typer.Option(
        metavar="E1,E2", help="Epochs digested step by step, besides epoch 0.")] = None,
    audit_every: Annotated[int, typer.Option(help="Operator audit every N epochs (0 = off).")] = 10,
    cpu_model: Annotated[str | None, typer.Option(
        help="Run under qemu-x86_64 -cpu MODEL (or preset seed-i7, seed-i5).")] = None,
    onednn_isa: Annotated[str | None, typer.Option(help="Override ONEDNN_MAX_CPU_ISA alone.")] = None,
    mkl_cbwr: Annotated[str | None, typer.Option(help="Override MKL_CBWR alone ('none' removes it).")] = None,
    promote: Annotated[str | None, typer.Option(
        metavar="OPS", help="Compute these in float64, each output rounded once to the run's dtype: a comma list "
                            "of linear, bn, bn-stats (BN's statistics only), loss, optimizer.")] = None,
    numpy_disable: Annotated[str | None, typer.Option(
        metavar="TARGETS", help="NPY_DISABLE_CPU_FEATURES: numpy dispatch targets to switch off, e.g. X86_V4.")] = None,
    openblas_coretype: Annotated[str | None, typer.Option(
        metavar="CORE", help="OPENBLAS_CORETYPE: the OpenBLAS kernel set, e.g. Haswell, SkylakeX, Nehalem.")] = None,
    dynamic_threads: Annotated[bool, typer.Option(
        "--dynamic-threads", help="OMP_DYNAMIC/MKL_DYNAMIC on: the pools may use fewer threads than asked.")] = False,
    kmp_deterministic_reduction: Annotated[bool, typer.Option(
        "--kmp-deterministic-reduction", help="KMP_DETERMINISTIC_REDUCTION (Intel or LLVM OpenMP only).")] = False,
    flush_denormal: Annotated[bool, typer.Option(
        "--flush-denormal", help="Flush subnormal numbers to zero (FTZ/DAZ).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> int:
    """Run the experiment under controlled numerics and write its record and fingerprint."""
    from bnaudit import controls, launch
    from bnaudit.blocks import RunSummary
    from bnaudit.report import run_summary

    experiment = experiment_of(spec, seed, seed_scope)
    c = controls.from_options(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                              onednn_isa=onednn_isa, mkl_cbwr=mkl_cbwr, cpu_model=cpu_model, promote=promote,
                              numpy_disable=numpy_disable, openblas_coretype=openblas_coretype,
                              dynamic_threads=dynamic_threads, kmp_deterministic_reduction=kmp_deterministic_reduction,
                              flush_denormal=flush_denormal)
    config = controls.RunConfig.requested(experiment, c, epochs=epochs, perturb=perturb,
                                          trace_epochs=_epoch_list(trace_epochs), audit_every=audit_every)
    target = out if out is not None else default_out(c.label(), experiment.hash)
    exact = initial = None
    if config.perturb is not None:  # read before the run: a corrupt file stops it at once
        from bnaudit import frozen
        from bnaudit.layout import TraceLayout
        from bnaudit.reference import sensitivity

        exact = sensitivity.stored(experiment)
        initial = frozen.load(experiment).init[:TraceLayout.for_spec(experiment).n_params]
    with run_summary.progress(config.epochs, c.label(), enabled=not as_json) as advance:
        summary = launch.run(experiment, config, target, force=force, on_progress=advance)
    decoded = RunSummary.from_json(summary)
    if as_json:
        beside = None if decoded.floor is None or initial is None \
            else run_summary.floor_beside(decoded.floor, exact, initial)
        summary = {**summary, "exact": None if beside is None else beside.to_dict()}
        typer.echo(json_document(RUN_SCHEMA, summary))
    else:
        run_summary.render(decoded, exact, initial)
    return 0


def env(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> int:
    """Print this machine's environment snapshot and the ISAs it can run."""
    import torch

    from bnaudit import envinfo
    from bnaudit.report import run_summary

    snap = envinfo.snapshot(torch)
    snap["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if as_json:
        typer.echo(json_document(ENV_SCHEMA, snap))
    else:
        run_summary.render_env(snap)
    return 0


frozen_app = typer.Typer(help="The frozen inputs: data set, initial parameters, batch order.", no_args_is_help=True)


@frozen_app.command("build")
def frozen_build(
    spec: SpecOption = None,
    seed: SeedOption = None,
    seed_scope: SeedScopeOption = None,
    out: Annotated[Path | None, typer.Option(help="Folder (default: where runs look for them).")] = None,
) -> int:
    """(Re)generate the frozen inputs of a spec, with their sha256 manifest."""
    from bnaudit import frozen
    from bnaudit.report import escape

    experiment = experiment_of(spec, seed, seed_scope)
    folder = frozen.write(experiment, out if out is not None else frozen.folder_for(experiment))
    loaded = frozen.read(folder, experiment)
    typer.echo(f"wrote {escape.printable(folder)} (spec {experiment.short_hash}, frozen digest {loaded.digest[:16]})")
    return 0


@frozen_app.command("verify")
def frozen_verify(spec: SpecOption = None, seed: SeedOption = None, seed_scope: SeedScopeOption = None) -> int:
    """Check the stored frozen inputs against their manifest and their generator, bit for bit."""
    import numpy as np

    from bnaudit import frozen
    from bnaudit.errors import InputError

    experiment = experiment_of(spec, seed, seed_scope)
    loaded = frozen.load(experiment)
    fresh = frozen.generate(experiment)
    for name, array in (("inputs.npy", loaded.inputs), ("targets.npy", loaded.targets),
                        ("init.npy", loaded.init), ("batches.npy", loaded.batches)):
        if not np.array_equal(array.view(np.uint8), fresh[name].view(np.uint8)):
            raise InputError(f"frozen input {name} differs from what the generator produces")
    typer.echo(f"frozen inputs of spec {experiment.short_hash} verified: manifest and generator agree bit for bit")
    return 0


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("env")(env)
    app.add_typer(frozen_app, name="frozen")
