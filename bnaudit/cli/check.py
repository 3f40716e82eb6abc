"""`bnaudit check` and `bnaudit baseline create|update`: the CI gate for numerical drift."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnaudit.cli._options import SpecOption
from bnaudit.controls import DTYPES, ISAS

if TYPE_CHECKING:
    from bnaudit.check import Baseline
    from bnaudit.controls import RunConfig
    from bnaudit.record import Fingerprint
    from bnaudit.spec import ExperimentSpec

STEP_SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"

DtypeOption = Annotated[str | None, typer.Option(help=f"Arithmetic of the run: {', '.join(DTYPES)}.")]
ThreadsOption = Annotated[int | None, typer.Option(min=1, max=1024, help="Intra-op, OpenMP and MKL threads.")]
IsaOption = Annotated[str | None, typer.Option(help=f"Cap every dispatcher at this ISA: {', '.join(ISAS)}.")]
DeterministicOption = Annotated[bool | None, typer.Option(
    "--deterministic/--no-deterministic", help="torch deterministic algorithms.")]
EpochsOption = Annotated[int | None, typer.Option(min=1, help="Epochs to run (instead of --profile).")]
ProfileOption = Annotated[str | None, typer.Option(
    metavar="smoke|full", help="smoke: a few epochs, for every commit; full: the spec's epochs, for nightly jobs.")]


def _run_options_given(**options: object) -> list[str]:
    return [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]


def _execute(spec: ExperimentSpec, config: RunConfig, folder: Path, *, quiet: bool) -> tuple[Fingerprint, float]:
    """One run in its own process (controls applied there); its fingerprint and wall time."""
    from bnaudit import launch, record

    if not quiet:
        typer.echo(f"bnaudit: running {config.controls.label()} for {config.epochs} epochs", err=True)
    started = time.perf_counter()
    launch.run(spec, config, folder)
    return record.load(folder), time.perf_counter() - started


def _load_spec(path: Path | None) -> ExperimentSpec | None:
    if path is None:
        return None
    from bnaudit.spec import load_spec

    return load_spec(path)


def check(
    baseline: Annotated[list[Path] | None, typer.Option(
        "--baseline", metavar="FILE",
        help="Baseline file (bnaudit baseline create); repeat for several dtypes.")] = None,
    run_record: Annotated[list[Path] | None, typer.Option(
        "--record", metavar="RUN",
        help="Check this record folder or fingerprint instead of running; repeatable.")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="Check only the baseline of this dtype (default: every baseline given).")] = None,
    threads: ThreadsOption = None,
    isa: IsaOption = None,
    deterministic: DeterministicOption = None,
    epochs: EpochsOption = None,
    spec: SpecOption = None,
    profile: ProfileOption = None,
    tolerance: Annotated[str, typer.Option(
        metavar="POLICY", help="exact (default), ulps:N, rel:X or bits:N.")] = "exact",
    accept_class: Annotated[list[Path] | None, typer.Option(
        "--accept-class", metavar="FILE", help="A known-good fingerprint: identical to it passes; repeatable.")] = None,
    junit: Annotated[Path | None, typer.Option(metavar="FILE", help="Write a JUnit XML report here.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Keep the runs' records in this folder (default: a temporary folder, removed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Run the experiment (or take --record) and hold it to a baseline under a tolerance policy.

    Exit 0 within policy, 1 drift beyond it, 2 bad option, 3 unusable input, 4 refused
    comparison (another experiment or dtype), 8 bits:N without a reference divergence.
    """
    from bnaudit import check as core
    from bnaudit import envinfo, record
    from bnaudit.errors import MismatchError, UsageError
    from bnaudit.report import ci_summary
    from bnaudit.report import junit as junit_report

    policy = core.parse_tolerance(tolerance)
    if profile is not None:
        core.profile_epochs(profile, 1)  # reject a bad name before any work
    if not baseline:
        raise UsageError("--baseline FILE is required (make one with bnaudit baseline create)")
    if accept_class and not policy.is_drift:
        raise UsageError(f"--accept-class names known drift classes; it has no meaning with --tolerance {policy}")
    baselines = [core.load_baseline(p) for p in baseline]
    classes = core.load_accept_classes(accept_class or [])
    core.validate_accept_classes(classes, baselines)
    experiment = _load_spec(spec)
    accepted = [str(p) for p in accept_class or []]
    if run_record:
        given = _run_options_given(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                                   epochs=epochs, spec=spec, profile=profile, out=out)
        if given:
            raise UsageError(f"--record checks an existing run; {', '.join(given)} cannot be combined with it")
        pairs = core.pair_candidates(baselines, [record.load(r) for r in run_record])
        result = core.run_check(pairs, policy, accept=classes, accept_paths=accepted)
    else:
        chosen = [b for b in baselines if dtype is None or b.dtype == dtype]
        if not chosen:
            raise MismatchError(f"no baseline for dtype {dtype} (baselines: "
                                f"{', '.join(sorted({b.dtype for b in baselines}))})")
        core.pair_candidates(chosen, [])  # refuses two baselines of one dtype
        plans = [core.plan_run(b, threads=threads, isa=isa, deterministic=deterministic, epochs=epochs,
                               profile=profile, spec=experiment) for b in chosen]
        pairs, seconds = [], []
        with tempfile.TemporaryDirectory(prefix="bnaudit-check-") as tmp:
            root = out if out is not None else Path(tmp)
            for b, (exp, config) in zip(chosen, plans, strict=True):
                fp, took = _execute(exp, config, root / config.controls.label(), quiet=as_json)
                pairs.append((b, fp))
                seconds.append(took)
            result = core.run_check(pairs, policy, accept=classes, accept_paths=accepted, seconds=seconds)
    if junit is not None:
        junit_report.write(junit, result)
    summary_file = envinfo.environ().get(STEP_SUMMARY_VARIABLE)
    if summary_file:
        ci_summary.append_step_summary(Path(summary_file), result)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1, sort_keys=True))
    else:
        for line in ci_summary.lines(result):
            typer.echo(line)
    return int(result.exit_code)


baseline_app = typer.Typer(help="Baselines for bnaudit check: a vetted fingerprint with the environment it came from.",
                           no_args_is_help=True)


def _make_baseline(out: Path, run_record: Path | None, *, update: bool, force: bool, dtype: str | None,
                   threads: int | None, isa: str | None, deterministic: bool | None, epochs: int | None,
                   profile: str | None, spec: Path | None) -> Baseline:
    from bnaudit import check as core
    from bnaudit.errors import InputError, MismatchError, OutputError, UsageError

    if profile is not None:
        core.profile_epochs(profile, 1)
    if run_record is not None:
        given = _run_options_given(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                                   epochs=epochs, profile=profile, spec=spec)
        if given:
            raise UsageError(f"--record makes the baseline from an existing run; {', '.join(given)} "
                             "cannot be combined with it")
        return core.write_baseline(out, run_record, update=update, force=force)
    if not update and out.exists() and not force:  # fail before a long run, not after it
        raise OutputError(f"{out} already exists; use bnaudit baseline update, or --force")
    old = None
    if update:
        if not out.exists():
            raise InputError(f"{out}: no baseline to update; make one with bnaudit baseline create")
        try:
            old = core.load_baseline(out)
        except InputError as exc:
            if not force:
                raise InputError(f"{exc.message} (pass --force to replace it)") from None
        if old is not None and dtype is not None and dtype != old.dtype and not force:
            raise MismatchError(f"{out} is a {old.dtype} baseline, not {dtype}; pass --force to replace it")
    experiment, config = core.plan_run(old, dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                                       epochs=epochs, profile=profile, spec=_load_spec(spec), allow_longer=True)
    with tempfile.TemporaryDirectory(prefix="bnaudit-baseline-") as tmp:
        folder = Path(tmp) / config.controls.label()
        _execute(experiment, config, folder, quiet=False)
        return core.write_baseline(out, folder, update=update, force=force)


def _render_baseline(b: Baseline, verb: str, as_json: bool) -> None:
    from bnaudit.check import case_name

    fp = b.fingerprint
    if as_json:
        typer.echo(json.dumps({"baseline": b.path, "case": case_name(fp), "dtype": b.dtype, "epochs": fp.epochs,
                               "digest": fp.digest, "spec_hash": fp.spec.hash, "created": b.created,
                               "updated": b.updated, "made_from": b.made_from,
                               "cpu_model": fp.environment.get("cpu_model")}, indent=1, sort_keys=True))
    else:
        typer.echo(f"{verb} baseline {b.path}: {case_name(fp)}, {fp.epochs} epochs, spec {fp.spec.short_hash}, "
                   f"digest {fp.digest[:16]}, from {b.made_from} on {fp.environment.get('cpu_model', 'unknown CPU')}")


OutOption = Annotated[Path, typer.Option(metavar="FILE", help="The baseline file to write.")]
RecordOption = Annotated[Path | None, typer.Option(
    "--record", metavar="RUN", help="Make it from this record folder or fingerprint instead of running.")]
ForceOption = Annotated[bool, typer.Option(help="create: replace an existing file; update: replace a baseline "
                                                "that is unreadable or of another experiment.")]
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
        b = _make_baseline(out, run_record, update=update, force=force, dtype=dtype, threads=threads, isa=isa,
                           deterministic=deterministic, epochs=epochs, profile=profile, spec=spec)
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
