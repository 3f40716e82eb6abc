"""`bnaudit reference build|verify`: the mpmath high-precision reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnaudit.cli._options import SpecOption
from bnaudit.errors import UsageError
from bnaudit.reference.store import (
    DEFAULT_CHECK_PRECISION,
    DEFAULT_PRECISION,
    MIN_AGREEMENT_DIGITS,
    VERIFY_RANDOM_ROWS,
    VERIFY_RANDOM_WITHIN,
)

reference_app = typer.Typer(help="The mpmath high-precision reference trajectory.", no_args_is_help=True)



@reference_app.command("build")
def reference_build(
    spec: SpecOption = None,
    precision: Annotated[int, typer.Option(
        metavar="BITS", help="Working precision of the stored trajectory (bits).")] = DEFAULT_PRECISION,
    check_precision: Annotated[int, typer.Option(
        metavar="BITS", help="Precision of the independent recomputation that certifies it (bits).",
    )] = DEFAULT_CHECK_PRECISION,
    epochs: Annotated[int | None, typer.Option(help="Epochs to build (default: the spec's).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Reference folder (default: reference/mpmath/<hash> for the default spec, else the cache).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing reference.")] = False,
    min_digits: Annotated[float, typer.Option(
        help="Decimal digits both precisions must agree on at every stored row.")] = MIN_AGREEMENT_DIGITS,
    jobs: Annotated[int | None, typer.Option(
        "-j", "--jobs", min=1, help="Processes: 2 computes the two precisions side by side (same values); "
             "default 2 where two CPUs are available, else 1.")] = None,
) -> int:
    """Compute the reference at two precisions (resumes an interrupted build) and store it."""
    from bnaudit import frozen
    from bnaudit.reference import build
    from bnaudit.reference import store as ref_store
    from bnaudit.report import escape, reference_view
    from bnaudit.spec import load_spec

    experiment = load_spec(spec)
    inputs = frozen.load(experiment)
    target = out if out is not None else ref_store.folder_for(experiment)
    n = experiment.train.epochs if epochs is None else epochs
    with reference_view.build_progress(n, f"reference {experiment.short_hash}") as advance:

        def progress(done: int, total: int, info: dict[str, Any]) -> None:
            if info.get("note"):  # a damaged checkpoint: what was unreadable, where the build resumes
                typer.echo(f"bnaudit: note: {escape.printable(info['note'])}", err=True)
            advance(done, total, info)

        ref = build.build(experiment, inputs, target, precision=precision, check_precision=check_precision,
                          epochs=epochs, min_digits=min_digits, progress=progress, force=force,
                          jobs=build.default_jobs() if jobs is None else jobs)
    reference_view.render_reference(ref)
    return 0


def _verify_epochs(text: str) -> int | None:
    """--epochs: a number of epochs, or "all" (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"--epochs must be a number of epochs or 'all', got {text!r}")
    return value


@reference_app.command("verify")
def reference_verify(
    spec: SpecOption = None,
    epochs: Annotated[str, typer.Option(
        metavar="N|all",
        help="Every stored row up to epoch N is recomputed and must match bit for bit; 'all': every "
             "stored row (a replay of the whole trajectory: about 6-7 minutes of one free core for the "
             "default spec's 1000 epochs).")] = "2",
    random_rows: Annotated[int, typer.Option(
        min=0, metavar="K",
        help=f"Also recompute K stored rows drawn at random (one from each of K stretches) from the rows "
             f"after epoch N up to epoch {VERIFY_RANDOM_WITHIN}, a new draw each call; 0: none. Every check "
             f"replays from epoch 0; the bound keeps the default verify at about 15-30 s of one core.",
    )] = VERIFY_RANDOM_ROWS,
    seed: Annotated[int | None, typer.Option(
        min=0, metavar="N",
        help="Seed of the random draw, to repeat one (the output line names the seed used).")] = None,
    folder: Annotated[Path | None, typer.Option(
        "--reference", help="Reference folder (default: where runs look for it).")] = None,
) -> int:
    """Check the reference's manifest, then recompute rows from epoch 0: they must match exactly."""
    from bnaudit import frozen
    from bnaudit.reference import build
    from bnaudit.reference import store as ref_store
    from bnaudit.report import escape
    from bnaudit.spec import load_spec

    prefix = _verify_epochs(epochs)
    experiment = load_spec(spec)
    ref = ref_store.load(experiment, folder)
    done = build.verify(ref, frozen.load(experiment), epochs=prefix, random_rows=random_rows,
                        within=VERIFY_RANDOM_WITHIN, seed=seed)
    if len(done.rows) == len(ref.rows):
        which = f"all {len(done.rows)} stored rows ({done.rows[0]}..{done.rows[-1]})"
    else:
        which = f"rows {done.rows[0]}..{done.epochs}" if done.epochs > 0 else "row 0"
        if done.pool is not None:
            which += (f" and {', '.join(map(str, done.drawn))} (drawn from rows {done.pool[0]}..{done.pool[1]}, "
                      f"--seed {done.seed})")
    typer.echo(f"reference {escape.printable(ref.path)} verified: manifest sha256 OK, {which} recomputed from "
               f"epoch 0 at {ref.precision} bits match bit for bit ({done.seconds:.1f} s); {ref.epochs} epochs stored, "
               f"precisions agree on >= {ref.agreement.min():.1f} digits")
    return 0


def register(app: typer.Typer) -> None:
    app.add_typer(reference_app, name="reference")
