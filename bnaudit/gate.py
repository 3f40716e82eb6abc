"""``bnaudit check`` and ``bnaudit baseline create|update``: plan the runs, run them, judge them.

The one module of the gate that starts runs (``bnaudit.check`` judges, ``bnaudit.baseline``
reads and writes the file).  A check reproduces each baseline's configuration on this
machine, with the options given overriding it, or takes ``--record RUN...``; every
option and every input is refused or accepted before the first run starts.  Each run
has its own process (``launch.run``, imported only when a run starts: the controls are
applied there, before torch loads), so that this module stays light.

Profiles: ``smoke`` runs ``SMOKE_EPOCHS`` (for every commit), ``full`` the spec's epochs
(nightly); by default a check runs the baseline's length.

Integrity: the signing key (``BNAUDIT_SIGNING_KEY``, through ``envinfo``) is read here,
once per command, and handed to ``bnaudit.baseline``: with it, baselines are signed when
written, and a check accepts only baselines (and accepted classes) signed with it.
Under bits:N a record's divergence from the reference is recomputed from its verified
arrays (``with_reference``); the block it carries is never what is judged.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bnaudit import divergence, envinfo, record
from bnaudit.baseline import (
    KEY_VARIABLE,
    Baseline,
    Signature,
    load_baseline,
    open_for_update,
    refuse_another_experiment,
    validate_key,
    write_baseline,
)
from bnaudit.blocks import DivergenceBlock
from bnaudit.check import (
    CheckResult,
    Policy,
    Tolerance,
    pair_candidates,
    parse_tolerance,
    refuse_accept_classes,
    require_ensemble,
    run_check,
    validate_accept_classes,
)
from bnaudit.controls import Controls, RunConfig
from bnaudit.errors import InputError, MismatchError, OutputError, ReferenceFailure, UsageError
from bnaudit.record import Fingerprint
from bnaudit.spec import ExperimentSpec, default_spec, load_spec, with_seed

SMOKE_EPOCHS = 5
"""Epochs of the smoke profile: fingerprint rows 0, 1, 2, 3 and 5 carry exact parameters, and a
whole check stays under the 15 s target on the project's 2-core machine
(benchmarks/bench_check_smoke.py)."""


def profile_epochs(profile: str, spec_epochs: int) -> int:
    """Epochs run by a profile: smoke (a few epochs) or full (the spec's)."""
    if profile == "smoke":
        return min(SMOKE_EPOCHS, spec_epochs)
    if profile == "full":
        return spec_epochs
    raise UsageError(f"--profile {profile!r}: choose smoke or full")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The run options of ``bnaudit check`` and ``bnaudit baseline create|update`` (None: not given)."""

    dtype: str | None = None
    threads: int | None = None
    isa: str | None = None
    deterministic: bool | None = None
    epochs: int | None = None
    profile: str | None = None
    spec: Path | None = None
    seed: int | None = None
    """dist:RATE only: run the ensemble's experiment at this seed (its scope's streams drawn from it)."""

    def given(self) -> list[str]:
        """The flags given, as the user typed them."""
        return [f"--{f.name}" for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def check_profile(self) -> None:
        """Refuse a bad --profile name before any work."""
        if self.profile is not None:
            profile_epochs(self.profile, 1)

    def load_spec(self) -> ExperimentSpec | None:
        return None if self.spec is None else load_spec(self.spec)


Announce = Callable[[str], None]
"""Where a command says what it is about to run (the CLI: stderr; None: silence)."""


# --------------------------------------------------------------------------- planning

def _baseline_config(baseline: Baseline) -> RunConfig:
    """The run request stored in a baseline (its controls were validated when it loaded)."""
    fp = baseline.fingerprint
    try:
        return dataclasses.replace(RunConfig.from_dict(fp.config), controls=fp.controls)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{baseline.path}: malformed run request in config") from None


def plan_run(baseline: Baseline | None, *, dtype: str | None = None, threads: int | None = None,
             isa: str | None = None, deterministic: bool | None = None, epochs: int | None = None,
             profile: str | None = None, spec: ExperimentSpec | None = None,
             allow_longer: bool = False, any_spec: bool = False) -> tuple[ExperimentSpec, RunConfig]:
    """The run that reproduces a baseline's configuration, with the options given overriding it.

    Without a baseline (``baseline create``) the defaults are ``bnaudit run``'s.  Epochs:
    ``epochs``, else the profile's, else the baseline's (the spec's without one).  A
    candidate may not be longer than its baseline (MismatchError) unless ``allow_longer``
    (``baseline update`` may lengthen a baseline).  ``any_spec``: ``spec`` may be another
    experiment than the baseline's (dist:RATE with --allow-different-spec).
    """
    if epochs is not None and profile is not None:
        raise UsageError("give --profile or --epochs, not both")
    if baseline is None:
        experiment = spec if spec is not None else default_spec()
        config = RunConfig(controls=Controls(), epochs=experiment.train.epochs)
        limit = experiment.train.epochs
    else:
        fp = baseline.fingerprint
        if spec is not None and spec.hash != fp.spec.hash and not any_spec:
            hint = "; --allow-different-spec holds it to the ensemble anyway" if baseline.ensemble else ""
            raise MismatchError(f"--spec {spec.short_hash} is not the experiment of {baseline.path} "
                                f"(spec {fp.spec.short_hash}){hint}")
        experiment = fp.spec if spec is None else spec
        config = _baseline_config(baseline)
        limit = fp.epochs
    changes: dict[str, Any] = {k: v for k, v in (("dtype", dtype), ("threads", threads), ("isa", isa),
                                                 ("deterministic", deterministic)) if v is not None}
    n = epochs if epochs is not None else (
        profile_epochs(profile, experiment.train.epochs) if profile is not None else limit)
    if baseline is not None and n > limit and not allow_longer:
        raise MismatchError(f"{baseline.path} covers {limit} epochs; cannot check {n} "
                            "(make a longer baseline, or check fewer epochs: --profile smoke, --epochs N)")
    config = dataclasses.replace(config, controls=dataclasses.replace(config.controls, **changes), epochs=n,
                                 trace_epochs=tuple(e for e in config.trace_epochs if e < n) or (0,))
    return experiment, config


def _plan(baseline: Baseline | None, options: RunOptions, spec: ExperimentSpec | None, *,
          allow_longer: bool = False, any_spec: bool = False) -> tuple[ExperimentSpec, RunConfig]:
    """``plan_run`` with a command's options (``--seed``: the ensemble's experiment at that seed)."""
    experiment, config = plan_run(baseline, dtype=options.dtype, threads=options.threads, isa=options.isa,
                                  deterministic=options.deterministic, epochs=options.epochs,
                                  profile=options.profile, spec=spec, allow_longer=allow_longer, any_spec=any_spec)
    if options.seed is not None:
        if baseline is None or baseline.ensemble is None:
            raise UsageError("--seed picks a seed of an ensemble baseline's experiment (--tolerance dist:RATE)")
        experiment = with_seed(experiment, options.seed, baseline.ensemble.scope)
    return experiment, config


# --------------------------------------------------------------------------- candidates

def execute(spec: ExperimentSpec, config: RunConfig, folder: Path, announce: Announce | None) -> tuple[Fingerprint,
                                                                                                       float]:
    """One run in its own process (``launch.run``: controls applied there); its fingerprint and wall time.

    The run's process does not inherit the signing key: its environment snapshot records
    every ``BNAUDIT_`` variable, and the record, the baseline made from it and every
    comparison would show the secret.
    """
    from bnaudit import launch

    if announce is not None:
        announce(f"bnaudit: running {config.controls.label()} for {config.epochs} epochs")
    env = {k: v for k, v in envinfo.environ().items() if k != KEY_VARIABLE}
    started = time.perf_counter()
    launch.run(spec, config, folder, base_env=env)
    return record.load(folder), time.perf_counter() - started


def signing_key() -> bytes | None:
    """``BNAUDIT_SIGNING_KEY`` (None when unset or empty, as in a fork's pull request), refused if too short."""
    return validate_key(envinfo.signing_key())


def with_reference(fp: Fingerprint) -> Fingerprint:
    """The candidate as bits:N judges it: a record folder's divergence recomputed from its verified arrays.

    A record's arrays are verified when it loads (every file's sha256, every parameter
    against its epoch digest), the block in its record.json only by an unkeyed checksum:
    so the block judged is the one computed here from the arrays and the stored reference
    (``divergence.from_record``).  A carried block measured against the same reference
    that differs from it is refused (InputError); one measured against another reference
    is simply replaced.  No reference stored: ReferenceFailure, never the carried block.
    A fingerprint file has no probe activations: its block is judged as loaded.
    """
    folder = Path(fp.source)
    if not (folder / "record.json").is_file():
        return fp
    rec = record.load_record(folder)
    if rec.fingerprint.digest != fp.digest:
        raise InputError(f"{folder}: changed while it was being checked")
    block = divergence.from_record(rec)
    if block is None:
        if fp.divergence is None:
            return fp  # check.measure_bits says: no divergence from the reference
        raise ReferenceFailure(f"{folder}: no mpmath reference is stored here for spec {fp.spec.short_hash}, so "
                               "the divergence block the record carries cannot be recomputed from its arrays; "
                               "bits:N cannot be judged (bnaudit reference build)")
    fresh = DivergenceBlock.from_json(block, str(folder))
    carried = fp.divergence
    if carried is not None and dict(carried.reference) == dict(fresh.reference) \
            and carried.to_json() != fresh.to_json():
        raise InputError(f"{folder}: carries a divergence block that its own arrays do not give (edited?)")
    return dataclasses.replace(fp, extra={**fp.extra, "divergence": block}, divergence=fresh)


def load_accept_classes(paths: Sequence[Path | str], *, key: bytes | None = None) -> list[Fingerprint]:
    """Load the accepted-class fingerprints (files or record folders), each validated.

    With a signing key each must be a baseline file signed with it (``bnaudit baseline
    create --record FP --out FILE`` where the key is kept): an accepted class passes a
    run as surely as the baseline does, so it is held to the same signature.
    """
    if key is None:
        return [record.load(Path(p)) for p in paths]
    return [load_baseline(p, key=key).fingerprint for p in paths]


def signature_warnings(baselines: Sequence[Baseline]) -> list[str]:
    """One line per signed baseline loaded without a key (its signature unchecked)."""
    return [f"{b.path} is signed, but BNAUDIT_SIGNING_KEY is not set: its signature was not checked"
            for b in baselines if b.signature is Signature.UNCHECKED]


def _judge(pairs: Sequence[tuple[Baseline, Fingerprint]], policy: Tolerance, classes: Sequence[Fingerprint],
           accept_paths: Sequence[Path], seconds: Sequence[float] | None = None, any_spec: bool = False,
           same_length: bool = False, kept: bool = True) -> CheckResult:
    """``run_check``, each record's reference divergence recomputed first under bits:N (records still on disk)."""
    if policy.policy is Policy.BITS:
        pairs = [(b, with_reference(c)) for b, c in pairs]
    return run_check(pairs, policy, accept=classes, accept_paths=[str(p) for p in accept_paths], seconds=seconds,
                     any_spec=any_spec, same_length=same_length, kept=kept)


def _run_and_judge(chosen: Sequence[Baseline], options: RunOptions, spec: ExperimentSpec | None, policy: Tolerance,
                   classes: Sequence[Fingerprint], accept_paths: Sequence[Path], out: Path | None,
                   announce: Announce | None, any_spec: bool = False, same_length: bool = False) -> CheckResult:
    """Run each chosen baseline's configuration (all planned before the first starts), then judge the runs."""
    pair_candidates(chosen, [])  # refuses two baselines of one dtype
    plans = [_plan(b, options, spec, any_spec=any_spec) for b in chosen]
    for b, (_, config) in zip(chosen, plans, strict=True):
        if b.ensemble is not None and policy.policy is Policy.DIST and config.epochs != b.ensemble.epochs:
            raise MismatchError(f"{b.path}'s ensemble holds outcomes after {b.ensemble.epochs} epochs; a "
                                f"{config.epochs}-epoch run is not compared (an outcome is compared at the "
                                "ensemble's length)")
    pairs, seconds = [], []
    with tempfile.TemporaryDirectory(prefix="bnaudit-check-") as tmp:
        root = out if out is not None else Path(tmp)
        for b, (experiment, config) in zip(chosen, plans, strict=True):
            fp, took = execute(experiment, config, root / config.controls.label(), announce)
            pairs.append((b, fp))
            seconds.append(took)
        return _judge(pairs, policy, classes, accept_paths, seconds, any_spec=any_spec, same_length=same_length,
                      kept=out is not None)


# --------------------------------------------------------------------------- the commands

def check(baseline_paths: Sequence[Path], *, records: Sequence[Path] = (), options: RunOptions = RunOptions(),
          tolerance: str = "exact", accept_paths: Sequence[Path] = (), out: Path | None = None,
          announce: Announce | None = None, allow_different_spec: bool = False,
          same_length: bool = False) -> CheckResult:
    """``bnaudit check``: run the experiment per baseline (or take ``records``) and judge it.

    ``options.dtype`` picks the baselines to check; the other options override their
    run configuration.  Every option and input (signatures included) is checked before
    any run starts.
    """
    policy = parse_tolerance(tolerance)
    options.check_profile()
    if policy.policy is not Policy.DIST and (allow_different_spec or options.seed is not None):
        raise UsageError("--allow-different-spec and --seed hold a run to an ensemble: only with --tolerance dist:RATE")
    if not baseline_paths:
        raise UsageError("--baseline FILE is required (make one with bnaudit baseline create)")
    if accept_paths:
        refuse_accept_classes(policy)
    key = signing_key()
    baselines = [load_baseline(p, key=key) for p in baseline_paths]
    if policy.policy is Policy.DIST:
        for b in baselines:
            require_ensemble(b, policy)
    classes = load_accept_classes(accept_paths, key=key)
    validate_accept_classes(classes, baselines)
    spec = options.load_spec()
    if records:
        given = options.given() + (["--out"] if out is not None else [])
        if given:
            raise UsageError(f"--record checks an existing run; {', '.join(given)} cannot be combined with it")
        result = _judge(pair_candidates(baselines, [record.load(r) for r in records]), policy, classes, accept_paths,
                        any_spec=allow_different_spec, same_length=same_length)
    else:
        chosen = [b for b in baselines if options.dtype is None or b.dtype == options.dtype]
        if not chosen:
            raise MismatchError(f"no baseline for dtype {options.dtype} (baselines: "
                                f"{', '.join(sorted({b.dtype for b in baselines}))})")
        result = _run_and_judge(chosen, options, spec, policy, classes, accept_paths, out, announce,
                                any_spec=allow_different_spec, same_length=same_length)
    return dataclasses.replace(result, warnings=tuple(signature_warnings(baselines)))


def make_baseline(out: Path, *, source: Path | None = None, options: RunOptions = RunOptions(),
                  update: bool = False, force: bool = False, announce: Announce | None = None) -> Baseline:
    """``bnaudit baseline create|update``: from ``source`` (a record), or from a run made here.

    ``update`` runs the existing baseline's configuration (options override it); every
    refusal comes before the run, not after it.
    """
    options.check_profile()
    key = signing_key()
    if source is not None:
        given = options.given()
        if given:
            raise UsageError(f"--record makes the baseline from an existing run; {', '.join(given)} "
                             "cannot be combined with it")
        return write_baseline(out, source, update=update, force=force, key=key)
    if not update and out.exists() and not force:
        raise OutputError(f"{out} already exists; use bnaudit baseline update, or --force")
    old = open_for_update(out, force=force, key=key) if update else None
    if old is not None and old.ensemble is not None:  # before the run: one run does not replace an ensemble
        raise UsageError(f"{out} is an ensemble baseline ({len(old.ensemble.seeds)} seeds); one run does not "
                         "replace it: remake it with bnaudit ensemble ... --baseline-out FILE --force")
    experiment, config = _plan(old, options, options.load_spec(), allow_longer=True)
    if old is not None:
        refuse_another_experiment(out, old, spec=experiment, dtype=config.controls.dtype, force=force)
    with tempfile.TemporaryDirectory(prefix="bnaudit-baseline-") as tmp:
        folder = Path(tmp) / config.controls.label()
        execute(experiment, config, folder, announce)
        return write_baseline(out, folder, update=update, force=force, key=key)
