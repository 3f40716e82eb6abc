"""`bnaudit reference build|verify`: the mpmath high-precision reference."""

from __future__ import annotations

import re
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
        help="Decimal digits both precisions must agree on in every stored state.")] = MIN_AGREEMENT_DIGITS,
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
        help="Every stored state up to after epoch N is recomputed and must match bit for bit; 'all': every "
             "stored state (a replay of the whole trajectory: about 6-7 minutes of one free core for the "
             "default spec's 1000 epochs).")] = "2",
    random_rows: Annotated[int, typer.Option(
        min=0, metavar="K",
        help=f"Also recompute K stored states drawn at random (one from each of K stretches) from those "
             f"after epochs N+1 to {VERIFY_RANDOM_WITHIN}, a new draw each call; 0: none. Every check "
             f"replays from epoch 0; the bound keeps the default verify at about 15-30 s of one core.",
    )] = VERIFY_RANDOM_ROWS,
    seed: Annotated[int | None, typer.Option(
        min=0, metavar="N",
        help="Seed of the random draw, to repeat one (the output line names the seed used).")] = None,
    folder: Annotated[Path | None, typer.Option(
        "--reference", help="Reference folder (default: where runs look for it).")] = None,
) -> int:
    """Check the reference's manifest, then recompute stored states from the initial one: they must match exactly."""
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
        which = f"all {len(done.rows)} stored states (the initial state to after epoch {done.rows[-1]})"
    else:
        which = (f"the initial state and the states after epochs 1-{done.epochs}" if done.epochs > 1
                 else "the initial state and the state after epoch 1" if done.epochs == 1 else "the initial state")
        if done.pool is not None:
            which += (f", and after epochs {', '.join(map(str, done.drawn))} (drawn from after epochs "
                      f"{done.pool[0]}-{done.pool[1]}, --seed {done.seed})")
    typer.echo(f"reference {escape.printable(ref.path)} verified: manifest sha256 OK, {which} recomputed from "
               f"the initial state at {ref.precision} bits match bit for bit ({done.seconds:.1f} s); {ref.epochs} "
               "epochs stored, "
               f"precisions agree on >= {ref.agreement.min():.1f} digits")
    return 0


_ELEMENT = re.compile(r"^([A-Za-z0-9_]+\.[A-Za-z0-9_]+)\[([0-9]{1,6}(?:,[0-9]{1,6})?)\]$")
_WINDOW = re.compile(r"^([0-9]{1,6})\.\.([0-9]{1,6})$")


def _element(text: str, spec: Any) -> tuple[str, tuple[int, ...]]:
    """``linear1.weight[0,0]`` -> ("linear1.weight", (0, 0)), a parameter of the spec and an index inside it."""
    m = _ELEMENT.match(text.strip())
    if m is None:
        raise UsageError(f"--element {text!r}: expected TENSOR[INDEX], e.g. linear1.weight[0,0] or bn1.bias[3]")
    shapes = dict(spec.parameters())
    name, index = m.group(1), tuple(int(i) for i in m.group(2).split(","))
    if name not in shapes:
        raise UsageError(f"--element: no parameter {name!r}; parameters are {', '.join(shapes)}")
    shape = shapes[name]
    if len(index) != len(shape) or not all(0 <= i < n for i, n in zip(index, shape)):
        raise UsageError(f"--element: index {list(index)} out of range for {name} of shape {list(shape)}")
    return name, index


def _windows(texts: list[str] | None, epochs: int) -> list[tuple[int, int]]:
    from bnaudit.reference import sensitivity

    if not texts:
        return sensitivity.default_windows(epochs)
    out = []
    for text in texts:
        m = _WINDOW.match(text.strip())
        if m is None or not 0 <= int(m.group(1)) < int(m.group(2)) <= epochs:
            raise UsageError(f"--window {text!r}: expected A..B with 0 <= A < B <= {epochs} (the epochs run)")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


@reference_app.command("sensitivity")
def reference_sensitivity(
    spec: SpecOption = None,
    epochs: Annotated[int, typer.Option(
        min=1, max=100_000, help="Epochs both copies train (about 1 s an epoch for the default spec).")] = 10,
    element: Annotated[str, typer.Option(
        metavar="TENSOR[INDEX]", help="The initial parameter that is moved.")] = "linear1.weight[0,0]",
    scale: Annotated[int, typer.Option(
        min=20, max=100_000, metavar="N",
        help="Move it by a relative 2^-N (by 2^-N if it is 0): small, so that the two stay in the linear "
             "regime and the growth rates do not depend on N.")] = 200,
    precision: Annotated[int | None, typer.Option(
        metavar="BITS", help="Bits of the engine (default N + 312; at least N + 100).")] = None,
    window: Annotated[list[str] | None, typer.Option(
        metavar="A..B", help="Measure the growth from after epoch A (0: the initial state) to after epoch B; "
                             "repeatable (default 0..7, and 0..epochs when longer).")] = None,
    save: Annotated[bool, typer.Option(
        "--save", help="Keep the measurement where compare and --perturb runs look for it (beside the shipped "
                       "reference for the default spec, in the cache for a custom one).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurement as JSON.")] = False,
) -> int:
    """Measure how the training amplifies a tiny perturbation, in exact arithmetic (no float rounding)."""
    from bnaudit import frozen
    from bnaudit.cli._options import json_document
    from bnaudit.reference import sensitivity
    from bnaudit.report import escape, reference_view
    from bnaudit.spec import load_spec

    experiment = load_spec(spec)
    if epochs > experiment.train.epochs:
        raise UsageError(f"--epochs {epochs}: the spec trains {experiment.train.epochs} epochs")
    tensor, index = _element(element, experiment)
    windows = _windows(window, epochs)
    bits = scale + 312 if precision is None else precision
    if bits - scale < 100 or bits > 100_000:
        raise UsageError(f"--precision {bits}: must be at least --scale + 100 ({scale + 100}) and at most 100000")
    with reference_view.build_progress(epochs, f"sensitivity {experiment.short_hash}", enabled=not as_json,
                                       agreement=False) as advance:
        result = sensitivity.measure(experiment, frozen.load(experiment), epochs=epochs, tensor=tensor, index=index,
                                     scale=scale, precision=bits, progress=lambda done, total: advance(done, total, {}))
    if save:
        sensitivity.save(result, windows, sensitivity.path_for(experiment))
    if as_json:
        typer.echo(json_document(sensitivity.SENSITIVITY_SCHEMA, result.to_dict(windows)))
    else:
        reference_view.render_sensitivity(result, windows)
        if save:
            typer.echo(f"saved {escape.printable(sensitivity.path_for(experiment))}")
    return 0


def register(app: typer.Typer) -> None:
    app.add_typer(reference_app, name="reference")
