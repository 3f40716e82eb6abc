"""bnaudit's Python API: run, load, compare and check, as the commands of the same names do them.

Each function calls the core function its command calls (``bnaudit run``: ``launch.run``;
``bnaudit compare``: ``record.load`` and ``compare.compare_pair`` / ``compare_many``;
``bnaudit check``: ``gate.check``), so a result here is the one the CLI prints::

    from bnaudit.api import check, compare, load, run

    a = run("float32", epochs=3, out="runs/a")        # a real run, in its own process
    b = run("float32", epochs=3, perturb="linear1.weight[0,0]:1")
    pair = compare(a, b)                              # compare.PairComparison
    pair.identical, pair.first.where                  # False, "initial state (epoch 0, ...)"
    fp = load("baselines/float32.json")               # record.Fingerprint, verified
    result = check(a, "baselines/float32.json")       # check.CheckResult
    result.passed, result.exit_code                   # the verdict, and bnaudit check's exit code

``run(dtype="float32", *, epochs=None, threads=1, isa="native", deterministic=False, out=None,
spec=None, perturb=None, trace_epochs=(), audit_every=10, cpu_model=None, onednn_isa=None,
mkl_cbwr=None, promote=None, numpy_disable=None, openblas_coretype=None, dynamic_threads=False,
kmp_deterministic_reduction=False, flush_denormal=False, force=False, on_progress=None) -> Run``
    One run under controlled numerics, in a fresh process whose environment carries its
    controls (the caller's process never imports torch for it; threads and ISA caps take
    effect only when torch loads).  Options as ``bnaudit run``'s; ``out=None`` writes the
    record into a new temporary folder (``tempfile.mkdtemp``), which is the caller's to
    remove.  Returns ``Run``: the record folder, the record loaded back and verified, and
    the run's summary.
``load(path, *, key=None) -> Fingerprint``
    A record folder, a ``record.json``, a fingerprint file or a baseline file, every field,
    size limit and hash checked; a baseline's seal too, and with ``key`` (the signing key,
    as ``BNAUDIT_SIGNING_KEY`` holds it) its signature.
``compare(a, b, *more, allow_different_spec=False, same_length=False) -> PairComparison | ManyComparison``
    Two inputs: bit-identical, or the first difference, divergence, growth and environment
    differences; three or more: classes of bit-identical runs.  Inputs are paths (as
    ``load``), fingerprints or ``Run`` results.
``check(run, baseline, tolerance="exact", *, accept=(), dtype=None, threads=None, isa=None,
deterministic=None, epochs=None, profile=None, spec=None, out=None) -> CheckResult``
    Hold a run (a path, fingerprint or ``Run``) to a baseline file under a policy (exact,
    ``ulps:N``, ``rel:X``, ``bits:N``).  ``run=None`` runs the baseline's configuration here
    first, the options given overriding it (``bnaudit check --baseline FILE``); with a run
    they are refused, as with ``--record``.  The signing key is read from
    ``BNAUDIT_SIGNING_KEY``, as ``bnaudit check`` reads it.  Drift is a result
    (``result.passed`` False, ``result.exit_code`` 1), not an error.

Every failure is a ``BnauditError`` (``bnaudit.errors``) whose ``exit_code`` is the code the
CLI would exit with and whose ``message`` is the line it would print: a bad option is
``UsageError`` (2), an unusable or edited input ``InputError`` (3), inputs of different
experiments ``MismatchError`` (4), and so on (README, "Exit codes").

Importing this module imports neither torch nor mpmath.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, overload

from bnaudit import compare as _compare
from bnaudit import fileio, gate, record
from bnaudit.baseline import load_baseline, validate_key
from bnaudit.blocks import RunSummary
from bnaudit.check import CheckResult
from bnaudit.compare import ManyComparison, PairComparison
from bnaudit.errors import BnauditError, ExitCode, UsageError
from bnaudit.record import Fingerprint
from bnaudit.spec import load_spec

__all__ = ["BnauditError", "CheckResult", "ExitCode", "Fingerprint", "ManyComparison", "PairComparison", "Run",
           "check", "compare", "load", "run"]

PathArg = str | os.PathLike[str]
"""A file or folder name."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run: its record folder, the record loaded back, and what its process reported."""

    path: Path
    """The record folder."""
    fingerprint: Fingerprint
    """The record, loaded and verified (every file's sha256, every parameter against its digest)."""
    summary: RunSummary
    """The run process's summary: effective controls, final losses, timings, divergence, audit."""


RunArg = PathArg | Fingerprint | Run
"""A run given to ``compare`` or ``check``: a path (as ``load``), a loaded fingerprint or a ``Run``."""


def _require(name: str, value: object, kind: type, *, optional: bool = False) -> None:
    """Refuse an argument of the wrong type as a bad option (UsageError), as the CLI refuses a bad flag."""
    if value is None and optional:
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ + (" or None" if optional else "")
        raise UsageError(f"{name}={value!r}: expected {expected}")


def _epochs_traced(trace_epochs: Iterable[int]) -> tuple[int, ...]:
    """The traced epochs given, each checked to be an int (RunConfig.requested sorts them and adds epoch 0)."""
    values = tuple(trace_epochs)
    for e in values:
        _require("trace_epochs", e, int)
    return values


def run(
    dtype: str = "float32",
    *,
    epochs: int | None = None,
    threads: int = 1,
    isa: str = "native",
    deterministic: bool = False,
    out: PathArg | None = None,
    spec: PathArg | None = None,
    perturb: str | None = None,
    trace_epochs: Iterable[int] = (),
    audit_every: int = 10,
    cpu_model: str | None = None,
    onednn_isa: str | None = None,
    mkl_cbwr: str | None = None,
    promote: str | None = None,
    numpy_disable: str | None = None,
    openblas_coretype: str | None = None,
    dynamic_threads: bool = False,
    kmp_deterministic_reduction: bool = False,
    flush_denormal: bool = False,
    force: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Run:
    """Run the experiment under controlled numerics in its own process, as ``bnaudit run`` does; return the run.

    ``epochs``: default the spec's.  ``perturb``: ``"LAYER.PARAM[INDEX]:ULPS"``.
    ``promote``: ``"bn,loss"`` and the like, as ``bnaudit run --promote`` takes it.
    ``out``: the record folder (default: a new temporary folder); ``force`` replaces a
    record there.  ``on_progress`` receives the run process's progress events.
    Raises ``BnauditError`` (UsageError for a request this machine cannot honour,
    OutputError for an unusable ``out``, RunFailed if the run's process fails).
    """
    from bnaudit import controls, launch

    arguments: tuple[tuple[str, object, type, bool], ...] = (
        ("dtype", dtype, str, False), ("isa", isa, str, False), ("threads", threads, int, False),
        ("audit_every", audit_every, int, False), ("deterministic", deterministic, bool, False),
        ("force", force, bool, False), ("epochs", epochs, int, True), ("perturb", perturb, str, True),
        ("cpu_model", cpu_model, str, True), ("onednn_isa", onednn_isa, str, True), ("mkl_cbwr", mkl_cbwr, str, True),
        ("promote", promote, str, True), ("numpy_disable", numpy_disable, str, True),
        ("openblas_coretype", openblas_coretype, str, True), ("dynamic_threads", dynamic_threads, bool, False),
        ("kmp_deterministic_reduction", kmp_deterministic_reduction, bool, False),
        ("flush_denormal", flush_denormal, bool, False))
    for name, value, kind, optional in arguments:
        _require(name, value, kind, optional=optional)
    experiment = load_spec(None if spec is None else Path(spec))
    c = controls.from_options(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic,
                              onednn_isa=onednn_isa, mkl_cbwr=mkl_cbwr, cpu_model=cpu_model, promote=promote,
                              numpy_disable=numpy_disable, openblas_coretype=openblas_coretype,
                              dynamic_threads=dynamic_threads, kmp_deterministic_reduction=kmp_deterministic_reduction,
                              flush_denormal=flush_denormal)
    config = controls.RunConfig.requested(experiment, c, epochs=epochs, perturb=perturb,
                                          trace_epochs=_epochs_traced(trace_epochs), audit_every=audit_every)
    controls.validate(config, experiment)  # before a temporary folder is made for a run that cannot start
    target = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"bnaudit-{c.label()}-"))
    try:
        summary = launch.run(experiment, config, target, force=force, on_progress=on_progress)
    except BaseException:
        if out is None:  # the temporary folder made above, if the failed run left it empty
            with contextlib.suppress(OSError):
                target.rmdir()
        raise
    return Run(path=target, fingerprint=record.load(target), summary=RunSummary.from_json(summary))


def load(path: PathArg, *, key: str | bytes | None = None) -> Fingerprint:
    """Load a record folder, record.json, fingerprint or baseline file, fully verified.

    A baseline file (a fingerprint with a baseline block) is loaded as ``bnaudit check``
    loads it, its seal checked before anything else.  ``key``: the signing key; with it
    ``path`` must be a baseline signed with that key (InputError otherwise).
    """
    if not isinstance(path, str | os.PathLike):
        raise UsageError(f"load({path!r}): expected a path")
    if key is not None and not isinstance(key, str | bytes):
        raise UsageError(f"key: expected str or bytes, got {type(key).__name__}")
    p = Path(path)
    if key is not None or _is_baseline_file(p):
        secret = key.encode() if isinstance(key, str) else key
        return load_baseline(p, key=validate_key(secret)).fingerprint
    return record.load(p)


def _is_baseline_file(path: Path) -> bool:
    """Whether ``path`` is a JSON file with a baseline block (read within the fingerprint size limit)."""
    if path.name == "record.json" or not path.is_file():
        return False
    extra = fileio.read_json(path, "fingerprint").get("extra")
    return isinstance(extra, dict) and "baseline" in extra


def _path_of(value: RunArg, what: str) -> Path:
    if isinstance(value, Run):
        return value.path
    if isinstance(value, Fingerprint):
        return Path(value.source)
    if isinstance(value, str | os.PathLike):
        return Path(value)
    raise UsageError(f"{what}: expected a path, a Fingerprint or a Run, got {type(value).__name__}")


def _fingerprint_of(value: RunArg) -> Fingerprint:
    if isinstance(value, Run):
        return value.fingerprint
    if isinstance(value, Fingerprint):
        return value
    return load(_path_of(value, "compare"))


@overload
def compare(a: RunArg, b: RunArg, /, *, allow_different_spec: bool = False,
            same_length: bool = False) -> PairComparison: ...


@overload
def compare(a: RunArg, b: RunArg, c: RunArg, /, *more: RunArg,
            allow_different_spec: bool = False, same_length: bool = False) -> ManyComparison: ...


def compare(a: RunArg, b: RunArg, /, *more: RunArg,
            allow_different_spec: bool = False, same_length: bool = False) -> PairComparison | ManyComparison:
    """Compare runs bit for bit, as ``bnaudit compare`` does.

    Two runs: a ``PairComparison`` (``identical``; else ``first``, the first difference,
    the divergence, the growth and the environment differences).  Three or more: a
    ``ManyComparison`` (classes of bit-identical runs).  Runs of different experiments
    are refused (MismatchError) unless ``allow_different_spec``; runs of different lengths
    are compared over the epochs they all ran (``lengths`` says so), or refused with
    ``same_length``.  Where the experiment's
    exact sensitivity is stored, the growth is set beside it (``PairComparison.exact``).
    """
    from bnaudit.reference import sensitivity

    fps = [_fingerprint_of(x) for x in (a, b, *more)]
    exact = sensitivity.stored(fps[0].spec)
    if len(fps) == 2:
        return _compare.compare_pair(fps[0], fps[1], allow_different_spec=allow_different_spec, exact=exact,
                                     same_length=same_length)
    return _compare.compare_many(fps, allow_different_spec=allow_different_spec, exact=exact, same_length=same_length)


def check(
    run: RunArg | None,
    baseline: PathArg | Fingerprint,
    tolerance: str = "exact",
    *,
    accept: Sequence[PathArg] = (),
    dtype: str | None = None,
    threads: int | None = None,
    isa: str | None = None,
    deterministic: bool | None = None,
    epochs: int | None = None,
    profile: str | None = None,
    spec: PathArg | None = None,
    out: PathArg | None = None,
) -> CheckResult:
    """Hold a run to a baseline under a tolerance policy, as ``bnaudit check`` does; return the verdict.

    ``run``: a record (path, fingerprint or ``Run``), or None to run the baseline's
    configuration here first (the run options given override it; ``out`` keeps that
    run's record).  ``accept``: known-good fingerprints that pass a run identical to
    them.  Drift is ``result.passed`` False, not an exception; what cannot be judged
    (an edited baseline, another experiment) raises ``BnauditError``.
    """
    options = gate.RunOptions(dtype=dtype, threads=threads, isa=isa, deterministic=deterministic, epochs=epochs,
                              profile=profile, spec=None if spec is None else Path(spec))
    records = [] if run is None else [_path_of(run, "check")]
    return gate.check([_path_of(baseline, "check baseline")], records=records, options=options,
                      tolerance=tolerance, accept_paths=[Path(p) for p in accept],
                      out=None if out is None else Path(out))
