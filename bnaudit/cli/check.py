"""`bnaudit check` and `bnaudit baseline create|update`: the CI gate for numerical drift."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnaudit.cli._options import BASELINE_WRITTEN_SCHEMA, Dtype, Isa, SameLengthOption, SpecOption, json_document

if TYPE_CHECKING:
    from bnaudit.baseline import Baseline

STEP_SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"

DtypeOption = Annotated[Dtype | None, typer.Option(help="Arithmetic of the run (default: float32, or the source's).")]
ThreadsOption = Annotated[int | None, typer.Option(min=1, max=1024, help="Intra-op, OpenMP and MKL threads.")]
IsaOption = Annotated[Isa | None, typer.Option(
    help="Cap every dispatcher (ATen, oneDNN, MKL) at this ISA (default: the baseline's, or native).")]
DeterministicOption = Annotated[bool | None, typer.Option(
    "--deterministic/--no-deterministic", help="torch deterministic algorithms.")]
EpochsOption = Annotated[int | None, typer.Option(min=1, help="Epochs to run (instead of --profile).")]
ProfileOption = Annotated[str | None, typer.Option(
    metavar="smoke|full", help="smoke: a few epochs, for every commit; full: the spec's epochs, for nightly jobs.")]


def _announce(line: str) -> None:
    """Say on stderr which run is about to start (stdout is the verdict's)."""
    typer.echo(line, err=True)


def check(
    baseline: Annotated[list[Path] | None, typer.Option(
        "--baseline", metavar="FILE",
        help="Baseline file (bnaudit baseline create); repeat for several dtypes.")] = None,
    run_record: Annotated[list[Path] | None, typer.Option(
        "--record", metavar="RUN",
        help="Check this record folder or fingerprint instead of running; repeatable.")] = None,
    dtype: Annotated[Dtype | None, typer.Option(
        help="Check only the baseline of this dtype (default: every baseline given).")] = None,
    threads: ThreadsOption = None,
    isa: IsaOption = None,
    deterministic: DeterministicOption = None,
    epochs: EpochsOption = None,
    spec: SpecOption = None,
    profile: ProfileOption = None,
    tolerance: Annotated[str, typer.Option(
        metavar="POLICY", help="exact (default), ulps:N, rel:X, bits:N, or dist:RATE[:train_mse] (the final test MSE "
                               "within an ensemble baseline's band, false-alarm rate at most RATE).")] = "exact",
    seed: Annotated[int | None, typer.Option(
        min=0, max=2**63 - 1, help="dist: run the ensemble's experiment at this seed.")] = None,
    allow_different_spec: Annotated[bool, typer.Option(
        "--allow-different-spec", help="dist: hold a run of another experiment (e.g. a changed --spec) to the "
                                       "ensemble's band, naming what differs.")] = False,
    accept_class: Annotated[list[Path] | None, typer.Option(
        "--accept-class", metavar="FILE", help="A known-good fingerprint: identical to it passes; repeatable.")] = None,
    same_length: SameLengthOption = False,
    junit: Annotated[Path | None, typer.Option(metavar="FILE", help="Write a JUnit XML report here.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Keep the runs' records in this folder (default: a temporary folder, removed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Run the experiment (or take --record) and hold it to a baseline under a tolerance policy.

    Exit 0 within policy, 1 drift beyond it, 2 bad option, 3 unusable input (edited, or
    with BNAUDIT_SIGNING_KEY set: unsigned or wrongly signed), 4 refused comparison
    (another experiment or dtype; a run longer than the baseline, or shorter with --same-length),
    8 bits:N without a reference divergence.  A run shorter than the baseline is checked against
    the baseline's first epochs, and each case line says so.
    """
    from bnaudit import envinfo, gate
    from bnaudit.errors import BnauditError, OutputError, UsageError
    from bnaudit.report import annotations, ci_summary
    from bnaudit.report import junit as junit_report

    options = gate.RunOptions(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic, epochs=epochs,
                              profile=profile, spec=spec, seed=seed)
    try:
        result = gate.check(baseline or [], records=run_record or [], options=options, tolerance=tolerance,
                            accept_paths=accept_class or [], out=out, announce=None if as_json else _announce,
                            allow_different_spec=allow_different_spec, same_length=same_length)
    except BnauditError as exc:
        if not isinstance(exc, UsageError | OutputError):  # it could not judge: say so where CI looks
            kind, code = exc.exit_code.name, int(exc.exit_code)
            _step_summary(ci_summary.error_markdown(exc.message, kind, code))
            if junit is not None:
                junit_report.write_error(junit, exc.message, kind, code)
        raise
    for warning in result.warnings:
        typer.echo(f"bnaudit: warning: {warning}", err=True)
    if as_json:  # the verdict first: a file that cannot be written must not hide it
        typer.echo(json.dumps(result.to_dict(), indent=1, sort_keys=True))
    else:
        for line in ci_summary.lines(result):
            typer.echo(line)
    if envinfo.github_actions():
        for line in annotations.check_errors(result):
            typer.echo(line, err=True)
    _step_summary(result)
    if junit is not None:
        junit_report.write(junit, result)
    return int(result.exit_code)


def _step_summary(content: object) -> None:
    """Append to GitHub's step summary when one is set; one that cannot be written is a warning, never a failure."""
    from bnaudit import envinfo
    from bnaudit.errors import OutputError
    from bnaudit.report import ci_summary

    summary_file = envinfo.environ().get(STEP_SUMMARY_VARIABLE)
    if not summary_file:
        return
    try:
        ci_summary.append_step_summary(Path(summary_file), content)  # type: ignore[arg-type]
    except OutputError as exc:
        typer.echo(f"bnaudit: warning: {exc.message} (the verdict above stands)", err=True)


baseline_app = typer.Typer(help="Baselines for bnaudit check: a vetted fingerprint with the environment it came from.",
                           no_args_is_help=True)


def _render_baseline(b: Baseline, verb: str, as_json: bool) -> None:
    from bnaudit.baseline import Signature

    unsigned = Signature.UNSIGNED
    fp = b.fingerprint
    if as_json:
        typer.echo(json_document(BASELINE_WRITTEN_SCHEMA, {
            "baseline": b.path, "case": fp.controls.label(), "dtype": b.dtype, "epochs": fp.epochs,
            "digest": fp.digest, "spec_hash": fp.spec.hash, "created": b.created, "updated": b.updated,
            "made_from": b.made_from, "signed": b.signature is not unsigned,
            "cpu_model": fp.environment.get("cpu_model")}))
    else:
        typer.echo(f"{verb} baseline {b.path}: {fp.controls.label()}, {fp.epochs} epochs, spec {fp.spec.short_hash}, "
                   f"digest {fp.digest[:16]}, from {b.made_from} on {fp.environment.get('cpu_model', 'unknown CPU')}"
                   f"{'' if b.signature is unsigned else ', signed'}")


OutOption = Annotated[Path, typer.Option(metavar="FILE", help="The baseline file to write.")]
RecordOption = Annotated[Path | None, typer.Option(
    "--record", metavar="RUN", help="Make it from this record folder or fingerprint instead of running.")]
ForceOption = Annotated[bool, typer.Option("--force", help="create: replace an existing file; update: replace a "
                                                           "baseline that is unreadable or of another experiment.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")]


def _baseline_command(update: bool, doc: str) -> Callable[..., int]:
    """``baseline create`` and ``baseline update``: one body, two verbs."""

    def command(
        out: OutOption,
        run_record: RecordOption = None,
        dtype: DtypeOption = None,
        threads: ThreadsOption = None,
        isa: IsaOption = None,
        deterministic: DeterministicOption = None,
        epochs: EpochsOption = None,
        profile: ProfileOption = None,
        spec: SpecOption = None,
        force: ForceOption = False,
        as_json: JsonOption = False,
    ) -> int:
        from bnaudit import gate

        options = gate.RunOptions(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                                  epochs=epochs, profile=profile, spec=spec)
        b = gate.make_baseline(out, source=run_record, options=options, update=update, force=force,
                               announce=_announce)
        _render_baseline(b, "updated" if update else "wrote", as_json)
        return 0

    command.__doc__ = doc
    return command


baseline_app.command("create")(_baseline_command(
    False, "Write a new baseline: run the experiment here (defaults as bnaudit run), or take --record."))
baseline_app.command("update")(_baseline_command(
    True, "Replace a baseline with a new run of its configuration (options override it), or with --record."))


def register(app: typer.Typer) -> None:
    app.command("check")(check)
    app.add_typer(baseline_app, name="baseline")
