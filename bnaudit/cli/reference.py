"""`bnaudit reference build|verify`: the mpmath high-precision reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.cli._options import SpecOption

reference_app = typer.Typer(help="The mpmath high-precision reference trajectory.", no_args_is_help=True)


@reference_app.command("build")
def reference_build(
    spec: SpecOption = None,
    precision: Annotated[int, typer.Option(
        metavar="BITS", help="Working precision of the stored trajectory (bits).")] = 512,
    check_precision: Annotated[int, typer.Option(
        metavar="BITS", help="Precision of the independent recomputation that certifies it (bits).")] = 640,
    epochs: Annotated[int | None, typer.Option(help="Epochs to build (default: the spec's).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Reference folder (default: reference/mpmath/<hash> for the default spec, else the cache).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing reference.")] = False,
    min_digits: Annotated[float, typer.Option(
        help="Decimal digits both precisions must agree on at every stored row.")] = 30.0,
    jobs: Annotated[int | None, typer.Option(
        help="Processes: 2 computes the two precisions side by side (same values); "
             "default 2 where two CPUs are available, else 1.")] = None,
) -> int:
    """Compute the reference at two precisions (resumes an interrupted build) and store it."""
    from bnaudit import frozen
    from bnaudit.reference import build
    from bnaudit.reference import store as ref_store
    from bnaudit.report import reference_view
    from bnaudit.spec import load_spec

    experiment = load_spec(spec)
    inputs = frozen.load(experiment)
    target = out if out is not None else ref_store.folder_for(experiment)
    n = experiment.train.epochs if epochs is None else epochs
    with reference_view.build_progress(n, f"reference {experiment.short_hash}") as advance:
        ref = build.build(experiment, inputs, target, precision=precision, check_precision=check_precision,
                          epochs=epochs, min_digits=min_digits, progress=advance, force=force,
                          jobs=build.default_jobs() if jobs is None else jobs)
    reference_view.render_reference(ref)
    return 0


@reference_app.command("verify")
def reference_verify(
    spec: SpecOption = None,
    epochs: Annotated[int, typer.Option(help="Epochs to recompute and match bit for bit.")] = 2,
    folder: Annotated[Path | None, typer.Option(
        "--reference", help="Reference folder (default: where runs look for it).")] = None,
) -> int:
    """Check the reference's manifest, then recompute its first epochs: they must match exactly."""
    from bnaudit import frozen
    from bnaudit.reference import build
    from bnaudit.reference import store as ref_store
    from bnaudit.spec import load_spec

    experiment = load_spec(spec)
    ref = ref_store.load(experiment, folder)
    rows = build.verify(ref, frozen.load(experiment), epochs=epochs)
    typer.echo(f"reference {ref.path} verified: manifest sha256 OK, rows {rows[0]}..{rows[-1]} recomputed at "
               f"{ref.precision}/{ref.check_precision} bits match bit for bit; {ref.epochs} epochs stored, "
               f"precisions agree on >= {ref.agreement.min():.1f} digits")
    return 0


def register(app: typer.Typer) -> None:
    app.add_typer(reference_app, name="reference")
