"""A solver for a fleet: the cheapest settings that make every machine compute the experiment alike.

The machines are the census's (``native`` and qemu CPU models), or the hosts of a dask cluster
(``on_cluster``: each stage's runs pinned to their host, the host's CPU read there).  A *lever* is one control at one
value (``isa=default``, ``mkl_cbwr=COMPATIBLE``, ``deterministic=on``); a *recipe* is a set of
levers of distinct controls.  The search runs in stages, each a matrix folder of its own under
the solve folder, ``<stage>-<plan id>`` (so an interrupted solve resumes where it stopped, and a
run that any stage folder of the solve already holds, at the same length, is read rather than
made again), and learns as it goes rather than running the cartesian product:

1. ``baseline``: every machine with the settings as they come; its classes of bit-identical
   runs are the census's.  One class: nothing to solve.
2. ``screen-1``: every lever on one *representative* per class.  A lever that changes no bit
   on any representative is *neutral* and pruned; one whose bits equal another lever's on
   every representative is *the same as* it and pruned; where each lever first changes the
   training (``compare``'s split against the baseline) is kept for the report.  A lever a
   machine cannot honour (``--isa avx2`` on a Nehalem) is *infeasible* and named with why.
3. ``screen-2``, ``screen-3``: recipes of 2, then 3 surviving levers of distinct controls,
   only while no smaller recipe made the representatives agree, and never one whose
   environment and calls equal a smaller recipe's (``isa=default`` already sets
   ``MKL_CBWR=SSE4_2``).
4. ``confirm``: the recipes that made the representatives agree, on every other machine (a
   lever can split a class as well as join two).
5. ``cost``: this machine's training time under each recipe against none, at ``cost_epochs``,
   run one after another (never side by side) in the same process setup, the recipes
   interleaved over ``cost_repeats`` rounds; the cost is the median ratio.
6. ``verify-K``: the cheapest recipe on every machine at ``verify_epochs`` (the spec's whole
   schedule by default); if it parts later than the screen looked, the next one.

Where no recipe of at most ``max_levers`` levers makes every machine agree, the answer is the
smallest partition found, its classes and what separates them (CPU features, CPUID vendor).

This module plans, reads records and decides; it runs nothing itself (``StageRunner`` does),
and imports neither torch nor mpmath.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bnaudit import compare, controls, emulate, envinfo, fileio, record
from bnaudit.compare import Difference
from bnaudit.controls import Controls, RunConfig
from bnaudit.errors import InputError, RunFailed, UsageError
from bnaudit.matrix import census, folder
from bnaudit.matrix.plan import CONTROL_FIELDS, Grid, Plan, Variant, make_plan
from bnaudit.record import Fingerprint
from bnaudit.spec import ExperimentSpec

SOLVE_SCHEMA = "bnaudit.solve/1"

LEVER_FIELDS = ("isa", "mkl_cbwr", "onednn_isa", "deterministic", "numpy_disable", "openblas_coretype",
                "flush_denormal", "dynamic_threads", "kmp_deterministic_reduction", "promote")
"""Controls a lever may set (the dtype, the thread count and the CPU are the question, not the answer)."""
SWITCHES = ("deterministic", "flush_denormal", "dynamic_threads", "kmp_deterministic_reduction")
"""Levers that are on or off: written ``deterministic=on``."""

DEFAULT_LEVERS = ("isa=default", "isa=avx2", "mkl_cbwr=COMPATIBLE", "mkl_cbwr=SSE4_2", "mkl_cbwr=AVX2",
                  "onednn_isa=SSE41", "onednn_isa=AVX2", "deterministic=on", "numpy_disable=X86_V3+X86_V4",
                  "openblas_coretype=Nehalem", "flush_denormal=on")
"""What the solver tries by default: every ISA cap and MKL branch a fleet from SSE4.2 to AVX2 can
share, deterministic algorithms, and the dispatch controls beyond ``--isa``.  Left out: dynamic
threads and Intel OpenMP's deterministic reductions (the runs use one thread, and the pip torch
ships GNU OpenMP, which refuses the latter) and ``promote`` (a change of the computation, not
a setting); ``--lever`` adds them."""
DEFAULT_MAX_LEVERS = 3
VARIANT = "solve"

_OPTION = {"threads": "--threads", "isa": "--isa", "mkl_cbwr": "--mkl-cbwr", "onednn_isa": "--onednn-isa",
           "deterministic": "--deterministic", "numpy_disable": "--numpy-disable",
           "openblas_coretype": "--openblas-coretype", "flush_denormal": "--flush-denormal",
           "dynamic_threads": "--dynamic-threads", "kmp_deterministic_reduction": "--kmp-deterministic-reduction",
           "promote": "--promote"}
_CALLS = {"deterministic": ("torch.use_deterministic_algorithms(True)",
                            "torch.backends.mkldnn.set_flags(_deterministic=True)"),
          "flush_denormal": ("torch.set_flush_denormal(True)",)}
_NOT_FOR_CI = ("BNAUDIT_CPU_MODEL", "OMP_WAIT_POLICY")
"""Variables bnaudit sets that a CI file does not need: its own, and one with no effect on the bits."""


@dataclasses.dataclass(frozen=True)
class Lever:
    """One control at one value."""

    field: str
    value: Any

    @property
    def text(self) -> str:
        if self.field in SWITCHES:
            return f"{self.field}={'on' if self.value else 'off'}"
        if self.field == "promote":
            return f"promote={controls.promote_text(self.value)}"
        if self.field == "numpy_disable":
            return f"numpy_disable={self.value.replace(' ', '+')}"
        return f"{self.field}={self.value}"

    def run_options(self) -> list[str]:
        """The equivalent ``bnaudit run`` options."""
        if self.field in SWITCHES:
            return [_OPTION[self.field]] if self.value else []  # off is every switch's default
        text = self.text.partition("=")[2]
        return [_OPTION[self.field], text]


def parse_lever(text: str) -> Lever:
    """``isa=default``, ``mkl-cbwr=AVX2,STRICT``, ``deterministic=on`` ... (UsageError otherwise)."""
    name, sep, value = text.strip().partition("=")
    field = name.strip().replace("-", "_")
    if not sep or not value.strip():
        raise UsageError(f"--lever {text!r}: expected CONTROL=VALUE, e.g. isa=default or mkl-cbwr=COMPATIBLE")
    if field not in LEVER_FIELDS:
        raise UsageError(f"--lever {text!r}: {name.strip()!r} is not a control a lever can set; choose from "
                         f"{', '.join(LEVER_FIELDS)}")
    value = value.strip()
    if field in SWITCHES:
        if value.lower() not in ("on", "off"):
            raise UsageError(f"--lever {text!r}: {field} takes on or off")
        return Lever(field, value.lower() == "on")
    if field in ("mkl_cbwr", "onednn_isa") and value.lower() != "none":
        value = value.upper()
    parsed = controls.from_options(**{field: value})
    return Lever(field, getattr(parsed, field))


Recipe = tuple[Lever, ...]
"""Levers of distinct controls, in the controls' order; ``()`` is the settings as they come."""


def recipe_of(levers: Sequence[Lever]) -> Recipe:
    return tuple(sorted(levers, key=lambda lv: CONTROL_FIELDS.index(lv.field)))


def recipe_text(recipe: Recipe) -> str:
    return " + ".join(lv.text for lv in recipe) or "none"


def run_options(recipe: Recipe) -> list[str]:
    return [o for lv in recipe for o in lv.run_options()]


def configured(base: Controls, recipe: Recipe, machine: str) -> Controls:
    """The controls of ``machine`` (``native`` or a qemu model) under ``recipe``."""
    model = None if emulate.is_native(machine) else machine
    return dataclasses.replace(base, cpu_model=model, **{lv.field: lv.value for lv in recipe})


def environment(base: Controls, recipe: Recipe) -> tuple[list[str], list[str], list[str]]:
    """The recipe for a CI file: variables to set (``NAME=value``), variables to remove, and calls
    to make in the program (right after importing torch).  The thread variables are part of every
    recipe: the solver's runs fix the pools, and a fleet must too."""
    env = controls.child_environment(configured(base, recipe, census.NATIVE), {})
    lines = [f"{k}={v}" for k, v in sorted(env.items()) if k not in _NOT_FOR_CI]
    unset = ["MKL_CBWR"] if any(lv.field == "mkl_cbwr" and str(lv.value).lower() == "none" for lv in recipe) else []
    calls = [c for lv in recipe if lv.value is True for c in _CALLS.get(lv.field, ())]
    if any(lv.field == "promote" for lv in recipe):
        calls.append("compute " + controls.promote_text(configured(base, recipe, census.NATIVE).promote)
                     + " in float64 (bnaudit --promote: a change of the computation, not a setting)")
    return lines, unset, calls


def _effect(base: Controls, recipe: Recipe) -> tuple[Any, ...]:
    """What a recipe does to a run: its environment and its in-process settings."""
    c = configured(base, recipe, census.NATIVE)
    env = controls.child_environment(c, {})
    return (tuple(sorted(env.items())), c.deterministic, c.flush_denormal, c.promote)


# --- what the stages found --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Infeasible:
    """A lever some machine cannot honour."""

    lever: str
    machine: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Change:
    """Where a lever first changes one representative's training against the settings as they come."""

    machine: str
    first: Difference | None
    """None: the digests differ but no training tensor does (the eval pass or the probe does)."""


@dataclasses.dataclass(frozen=True)
class Tried:
    """One recipe run on the representatives."""

    recipe: str
    levers: int
    classes: int
    """Classes among the representatives under it."""
    pruned: str | None
    """Why it is not taken further: "neutral", "the same bits as X", None (kept)."""
    changes: tuple[Change, ...] = ()
    """Single levers only: where it first changes each representative it changes."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A recipe that made the representatives agree, and what became of it."""

    recipe: str
    levers: tuple[str, ...]
    run_options: tuple[str, ...]
    environment: tuple[str, ...]
    unset: tuple[str, ...]
    calls: tuple[str, ...]
    classes: int
    """Classes over every machine at the screen's length."""
    cost: float | None
    """Median ratio of this machine's training time under the recipe to none; None: not measured."""
    seconds: tuple[float, ...]
    """This machine's training seconds under the recipe, one per cost round."""
    verified_epochs: int | None
    """The length at which every machine was found bit-identical under it (None: not verified)."""
    parted: str | None
    """Where the machines parted when verified at full length, if they did."""


@dataclasses.dataclass(frozen=True)
class Solution:
    """The solve's answer."""

    folder: str
    dtype: str
    machines: tuple[str, ...]
    screen_epochs: int
    verify_epochs: int
    cost_epochs: int
    cost_repeats: int
    classes_before: tuple[tuple[str, ...], ...]
    representatives: tuple[str, ...]
    levers: tuple[str, ...]
    infeasible: tuple[Infeasible, ...]
    tried: tuple[Tried, ...]
    candidates: tuple[Candidate, ...]
    """Recipes that made the representatives agree, cheapest first."""
    best: str | None
    """The cheapest recipe verified bit-identical on every machine; None: none found."""
    baseline_seconds: tuple[float, ...]
    """This machine's training seconds with the settings as they come, one per cost round."""
    partition: census.Census | None
    """Where no recipe makes every machine agree: the classes under the recipe that leaves the fewest."""
    partition_recipe: str | None
    causes: tuple[str, ...]
    """What separates the partition's classes, in words."""
    runs: dict[str, int]
    """Runs each stage needed (baseline, screen-K, confirm, partition, cost, verify-K)."""
    exhaustive_runs: int
    """Runs a search of every combination of the feasible levers on every machine would need at the
    screen's length, against the search's baseline, screen, confirm and partition runs."""

    @property
    def search_runs(self) -> int:
        return sum(n for stage, n in self.runs.items() if not stage.startswith(("cost", "verify")))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["search_runs"] = self.search_runs
        d["partition"] = None if self.partition is None else self.partition.to_dict()
        d["run_options"] = None if self.best is None else list(self._best().run_options)
        return d

    def _best(self) -> Candidate:
        return next(c for c in self.candidates if c.recipe == self.best)


# --- the stages ---------------------------------------------------------------------------------------

StageRunner = Callable[[str, Plan, Path, int], Mapping[str, str]]
"""Runs one stage's plan in its folder with ``jobs`` runs at a time (``summary.run_matrix`` with a
progress view, say) and returns the error of each run that did not complete, by run key."""


@dataclasses.dataclass
class _Search:
    spec: ExperimentSpec
    base: Controls
    machines: tuple[str, ...]
    out: Path
    run_stage: StageRunner
    jobs: int
    force: bool = False
    on_cluster: bool = False
    """The machines are cluster hosts: their runs are native runs pinned to them."""
    fps: dict[tuple[Recipe, str, int], Fingerprint] = dataclasses.field(default_factory=dict)
    errors: dict[tuple[Recipe, str, int], str] = dataclasses.field(default_factory=dict)
    runs: dict[str, int] = dataclasses.field(default_factory=dict)
    """Runs each stage needed (made, resumed or read from an earlier stage's folder)."""

    def controls_of(self, recipe: Recipe, machine: str) -> Controls:
        """The controls of a machine's run under ``recipe`` (a cluster host's: a native run there)."""
        return configured(self.base, recipe, census.NATIVE if self.on_cluster else machine)

    def stage(self, name: str, wanted: Sequence[tuple[Recipe, str]], epochs: int, *, jobs: int | None = None,
              rounds: int = 1, here: bool = False) -> dict[int, dict[tuple[Recipe, str], float]]:
        """Run (or resume) the (recipe, machine) pairs not yet known at this length, in the folder
        ``<name>-<plan id>``; ``rounds`` > 1 runs each that many times (the cost stage) and returns
        each round's training seconds.  A pair whose record some earlier stage folder of this solve
        holds (another solve's stage, a solve with other levers) is read from there, not run again.
        ``here``: on this machine, whatever the machines are (the cost stage; its fingerprints are
        then not a cluster host's and are not kept)."""
        pinned = self.on_cluster and not here
        keep = rounds == 1 and (pinned or not self.on_cluster)
        fresh = {(r, m) for r, m in wanted if not keep or (r, m, epochs) not in self.fps}
        self.runs[name] = self.runs.get(name, 0) + len(fresh) * rounds
        todo = []
        for r, m in wanted:
            if keep and (r, m, epochs) not in self.fps:
                found = None if self.force else self.earlier(self.controls_of(r, m), epochs, m if pinned else None)
                if found is not None:
                    self.fps[(r, m, epochs)] = found
                    continue
            if not keep or (r, m, epochs) not in self.fps:
                todo.append((r, m))
        if not todo:
            return {}
        configs = [configured(self.base, r, census.NATIVE) if here else self.controls_of(r, m) for r, m in todo]
        variants = [Variant(f"round-{k + 1}" if rounds > 1 else VARIANT, self.spec) for k in range(rounds)]
        plan = make_plan(variants, Grid(), epochs=epochs, audit_every=0, configurations=configs,
                         on_hosts=[m for _, m in todo] if pinned else None)
        target = self.out / f"{name}-{plan.plan_id}"
        errors = self.run_stage(name, plan, target, self.jobs if jobs is None else jobs)
        pairs = {(pair[1] if pinned else None, c): pair for pair, c in zip(todo, configs)}
        by_round: dict[int, dict[tuple[Recipe, str], float]] = {}
        for run in plan.runs:
            k = int(run.variant.removeprefix("round-")) - 1 if rounds > 1 else 0
            pair = pairs[(run.host, run.controls)]
            rec = folder.finished(plan, run, target, with_reference=False)
            if rec is None:
                self.errors[(*pair, epochs)] = errors.get(run.key, "did not complete")
                continue
            by_round.setdefault(k, {})[pair] = float(rec.meta["train_seconds"])
            if keep:
                self.fps[(*pair, epochs)] = rec.fingerprint
        return by_round

    def earlier(self, c: Controls, epochs: int, host: str | None = None) -> Fingerprint | None:
        """The fingerprint of this configuration at this length (on this cluster host), if a stage folder
        of the solve holds it."""
        want = RunConfig(controls=c, epochs=epochs, audit_every=0).to_dict()
        if not self.out.is_dir():
            return None
        for stage in sorted(p for p in self.out.iterdir() if p.is_dir()):
            path = stage / "runs" / (f"{host}/{c.label()}" if host is not None else c.label())
            if not (path / "record.json").is_file():
                continue
            try:
                rec = record.load_record(path)
            except InputError:
                continue
            if rec.spec.hash == self.spec.hash and rec.fingerprint.config == want:
                return rec.fingerprint
        return None

    def classes(self, recipe: Recipe, machines: Sequence[str], epochs: int) -> list[tuple[str, ...]] | None:
        """Machines whose runs under ``recipe`` are bit-identical; None if a run is missing."""
        if any((recipe, m, epochs) not in self.fps for m in machines):
            return None
        found = compare.equivalence_classes([self.fps[(recipe, m, epochs)] for m in machines])
        return [tuple(machines[i] for i in c.indices) for c in found]

    def missing(self, recipe: Recipe, machines: Sequence[str], epochs: int) -> str | None:
        for m in machines:
            if (recipe, m, epochs) in self.errors:
                return f"{m}: {self.errors[(recipe, m, epochs)]}"
        return None


def feasible(spec: ExperimentSpec, base: Controls, levers: Sequence[Lever], machines: Sequence[str],
             hosts: Mapping[str, census.Facts] | None = None) -> tuple[list[Lever], list[Infeasible]]:
    """The levers every machine can honour (``controls.validate`` under its CPU; for cluster hosts,
    ``hosts``, the ISA caps their CPU features allow), and why not the others."""
    ok, bad = [], []
    for lv in levers:
        reason = None
        for m in machines:
            try:
                if hosts is None:
                    controls.validate(RunConfig(controls=configured(base, (lv,), m), epochs=1, audit_every=0), spec)
                else:
                    _host_honours(hosts[m], lv)
            except UsageError as exc:
                reason = Infeasible(lever=lv.text, machine=m, reason=str(exc))
                break
        if reason is None:
            ok.append(lv)
        else:
            bad.append(reason)
    return ok, bad


def _host_honours(facts: census.Facts, lever: Lever) -> None:
    """UsageError where a host's CPU cannot take the lever (an ISA cap above its features)."""
    if lever.field != "isa" or lever.value == "native":
        return
    supported = envinfo.supported_isas({f: True for f in facts.features})
    if lever.value not in supported:
        raise UsageError(f"this host's CPU cannot run --isa {lever.value} (it supports {', '.join(supported)})")


def _redundant(base: Controls, recipe: Recipe) -> bool:
    """A recipe that does what one of its sub-recipes does (the same environment and calls)."""
    effect = _effect(base, recipe)
    return any(_effect(base, sub) == effect for k in range(len(recipe)) for sub in itertools.combinations(recipe, k))


def split_causes(c: census.Census) -> list[str]:
    """What separates each pair of a partition's classes, in words."""
    out = []
    for s in c.splits:
        pair = f"classes {s.i + 1} and {s.j + 1}"
        if s.vendors is not None:
            vi, vj = s.vendors
            amd = "AuthenticAMD" in vi + vj
            out.append(f"{pair}: CPUID vendor {'/'.join(vi)} vs {'/'.join(vj)}"
                       + (": MKL dispatches on the vendor, and under an AMD CPUID it ignores "
                          "MKL_ENABLE_INSTRUCTIONS" if amd else ""))
        for side, only in ((s.i, s.only_i), (s.j, s.only_j)):
            if only:
                fma = " (FMA vs no FMA: fused multiply-adds round once where the others round twice)" \
                    if "FMA3" in only else ""
                out.append(f"{pair}: only class {side + 1} has {', '.join(only)}{fma}")
        if s.vendors is None and not s.only_i and not s.only_j:
            out.append(f"{pair}: no CPU feature or vendor this solve reads separates them (family, model or "
                       "cache sizes may)")
    return out


def solve(spec: ExperimentSpec, machines: Sequence[str], levers: Sequence[Lever], out: Path,
          run_stage: StageRunner, *, dtype: str = "float32", screen_epochs: int = census.DEFAULT_EPOCHS,
          verify_epochs: int | None = None, cost_epochs: int | None = None, cost_repeats: int = 3,
          max_levers: int = DEFAULT_MAX_LEVERS, jobs: int = 1, force: bool = False,
          facts_of: census.FactsOf | None = None, on_cluster: bool = False) -> Solution:
    """Search, verify and cost; see the module's docstring for the stages.  ``facts_of``: the machines'
    CPU vendors and features (``census.local_facts``; default: vendor and features unknown for
    ``native``); ``on_cluster``: the machines are the hosts of the cluster ``run_stage`` runs on."""
    names, verify_n, cost_n = _request(spec, machines, screen_epochs, verify_epochs, cost_epochs, cost_repeats,
                                       max_levers, on_cluster)
    facts_of = facts_of or census.local_facts("?", {})
    base = Controls(dtype=dtype)
    unique = list(dict.fromkeys(levers))
    for lv in unique:  # a value no machine could take is the request's fault, not a machine's
        controls.validate(RunConfig(controls=configured(base, (lv,), census.NATIVE), epochs=1, audit_every=0), spec,
                          check_cpu=False)
    ok, infeasible = feasible(spec, base, unique, names, facts_of(names) if on_cluster else None)
    s = _Search(spec=spec, base=base, machines=names, out=Path(out), run_stage=run_stage, jobs=jobs, force=force,
                on_cluster=on_cluster)

    # 1. the census
    none: Recipe = ()
    s.stage("baseline", [(none, m) for m in names], screen_epochs)
    broken = s.missing(none, names, screen_epochs)
    if broken is not None:
        raise RunFailed(f"the run with the settings as they come failed on {broken}; nothing to solve from; "
                        "re-run the same command to retry")
    before = s.classes(none, names, screen_epochs)
    assert before is not None
    reps = tuple(c[0] for c in before)
    recipes: dict[str, Recipe] = {"none": none}
    tried, agreeing = ([], [none]) if len(before) == 1 else _screen(s, ok, reps, screen_epochs, max_levers, recipes)

    # 4. confirm on every machine
    others = [m for m in names if m not in reps]
    if agreeing and others:
        s.stage("confirm", [(r, m) for r in agreeing for m in others], screen_epochs)
    whole = {r: s.classes(r, names, screen_epochs) for r in agreeing}
    solutions = [r for r, got in whole.items() if got is not None and len(got) == 1]

    # 5. cost on this machine
    rounds: dict[int, dict[tuple[Recipe, str], float]] = {}
    costed = [r for r in solutions if r != none and _native_ok(spec, base, r)]
    if costed:
        rounds = s.stage("cost", [(r, census.NATIVE) for r in (none, *costed)], cost_n, jobs=1, rounds=cost_repeats,
                         here=True)
    order = sorted(solutions, key=lambda r: (_cost(rounds, r) is None, _cost(rounds, r) or 0.0, len(r)))

    # 6. verify the cheapest at full length, then the next if it parts
    verified, parted = _verify(s, order, names, screen_epochs, verify_n)

    candidates = []
    for r in order + [r for r in agreeing if r not in order]:
        env, unset, calls = environment(base, r)
        got = whole[r]
        candidates.append(Candidate(recipe=recipe_text(r), levers=tuple(lv.text for lv in r),
                                    run_options=tuple(run_options(r)), environment=tuple(env), unset=tuple(unset),
                                    calls=tuple(calls), classes=0 if got is None else len(got), cost=_cost(rounds, r),
                                    seconds=_seconds(rounds, r), verified_epochs=verified.get(r), parted=parted.get(r)))
    best = next((recipe_text(r) for r in order if r in verified), None)

    # no recipe: the smallest partition found, and what separates its classes
    partition = partition_recipe = None
    causes: list[str] = []
    if best is None:
        recipe, n = _fewest(s, tried, recipes, agreeing, names, reps, screen_epochs)
        if any(r in parted for r in order) and s.classes(order[0], names, verify_n) is not None:
            recipe, n = order[0], verify_n  # agreed over the screen, parted at full length
        elif recipe != none:
            s.stage("partition", [(recipe, m) for m in names], screen_epochs)
        partition = _partition(s, recipe, names, n, facts_of)
        partition_recipe = recipe_text(recipe)
        causes = split_causes(partition)

    return Solution(folder=str(out), dtype=dtype, machines=names, screen_epochs=screen_epochs,
                    verify_epochs=verify_n, cost_epochs=cost_n, cost_repeats=cost_repeats,
                    classes_before=tuple(before), representatives=reps, levers=tuple(lv.text for lv in unique),
                    infeasible=tuple(infeasible), tried=tuple(tried), candidates=tuple(candidates), best=best,
                    baseline_seconds=_seconds(rounds, none), partition=partition, partition_recipe=partition_recipe,
                    causes=tuple(causes), runs=dict(s.runs), exhaustive_runs=_exhaustive(ok, names))


def _request(spec: ExperimentSpec, machines: Sequence[str], screen_epochs: int, verify_epochs: int | None,
             cost_epochs: int | None, cost_repeats: int, max_levers: int, on_cluster: bool = False
             ) -> tuple[tuple[str, ...], int, int]:
    """The machines (``native`` once) and the verify and cost lengths; UsageError for a request that cannot be."""
    names = tuple(dict.fromkeys(m if on_cluster else census.NATIVE if emulate.is_native(m) else m for m in machines))
    if len(names) < 2:
        raise UsageError("solve needs at least two machines (e.g. --machines native,Nehalem,Haswell"
                         + (", or a cluster of two hosts)" if on_cluster else ")"))
    if not 1 <= max_levers <= len(LEVER_FIELDS):
        raise UsageError(f"--max-levers must be between 1 and {len(LEVER_FIELDS)}, got {max_levers}")
    if cost_repeats < 1:
        raise UsageError(f"--cost-repeats must be at least 1, got {cost_repeats}")
    full = spec.train.epochs
    verify_n = full if verify_epochs is None else verify_epochs
    cost_n = full if cost_epochs is None else cost_epochs
    for flag, n in (("--epochs", screen_epochs), ("--verify-epochs", verify_n), ("--cost-epochs", cost_n)):
        if not 1 <= n <= full:
            raise UsageError(f"{flag} must be between 1 and the spec's {full}, got {n}")
    if verify_n < screen_epochs:
        raise UsageError(f"--verify-epochs ({verify_n}) must be at least --epochs ({screen_epochs})")
    return names, verify_n, cost_n


def _screen(s: _Search, ok: Sequence[Lever], reps: tuple[str, ...], epochs: int, max_levers: int,
            recipes: dict[str, Recipe]) -> tuple[list[Tried], list[Recipe]]:
    """Stages 2-3: every lever on the representatives, pruned, then combinations of the survivors
    while none agrees.  Returns what was tried and the recipes that made the representatives agree;
    ``recipes`` gains every recipe run, by its text."""
    none: Recipe = ()
    tried: list[Tried] = []
    agreeing: list[Recipe] = []
    survivors: list[Lever] = []
    singles = [(lv,) for lv in ok]
    recipes.update((recipe_text(r), r) for r in singles)
    s.stage("screen-1", [(r, m) for r in singles for m in reps], epochs)
    seen: dict[tuple[str, ...], str] = {}
    for r in singles:
        got = s.classes(r, reps, epochs)
        if got is None:
            failed = f"failed: {s.missing(r, reps, epochs)}"
            tried.append(Tried(recipe=recipe_text(r), levers=1, classes=0, pruned=failed))
            continue
        digests = tuple(s.fps[(r, m, epochs)].digest for m in reps)
        changes = tuple(Change(machine=m, first=compare.compare_pair(s.fps[(none, m, epochs)],
                                                                     s.fps[(r, m, epochs)]).first)
                        for m in reps if s.fps[(r, m, epochs)].digest != s.fps[(none, m, epochs)].digest)
        pruned = None
        if not changes:
            pruned = "neutral"
        elif digests in seen:
            pruned = f"the same bits as {seen[digests]}"
        else:
            seen[digests] = recipe_text(r)
            survivors.append(r[0])
        tried.append(Tried(recipe=recipe_text(r), levers=1, classes=len(got), pruned=pruned, changes=changes))
        if len(got) == 1 and pruned is None:
            agreeing.append(r)
    size = 2
    while not agreeing and size <= max_levers:
        combos = [recipe_of(c) for c in itertools.combinations(survivors, size)
                  if len({lv.field for lv in c}) == size and not _redundant(s.base, recipe_of(c))]
        if not combos:
            break
        recipes.update((recipe_text(r), r) for r in combos)
        s.stage(f"screen-{size}", [(r, m) for r in combos for m in reps], epochs)
        for combo in combos:
            got = s.classes(combo, reps, epochs)
            why = None if got is not None else f"failed: {s.missing(combo, reps, epochs)}"
            tried.append(Tried(recipe=recipe_text(combo), levers=size, classes=0 if got is None else len(got),
                               pruned=why))
            if got is not None and len(got) == 1:
                agreeing.append(combo)
        size += 1
    return tried, agreeing


Rounds = dict[int, dict[tuple[Recipe, str], float]]
"""The cost stage's training seconds: round, then (recipe, machine)."""


def _seconds(rounds: Rounds, r: Recipe) -> tuple[float, ...]:
    return tuple(rounds[k][(r, census.NATIVE)] for k in sorted(rounds) if (r, census.NATIVE) in rounds[k])


def _cost(rounds: Rounds, r: Recipe) -> float | None:
    """The median over rounds of this machine's time under ``r`` against none (None: not measured)."""
    if r == ():
        return 1.0
    ratios = [rounds[k][(r, census.NATIVE)] / rounds[k][((), census.NATIVE)]
              for k in sorted(rounds) if (r, census.NATIVE) in rounds[k] and ((), census.NATIVE) in rounds[k]]
    return statistics.median(ratios) if ratios else None


def _verify(s: _Search, order: Sequence[Recipe], names: Sequence[str], screen_epochs: int, verify_n: int
            ) -> tuple[dict[Recipe, int], dict[Recipe, str]]:
    """Stage 6: the cheapest recipe on every machine at ``verify_n`` epochs, then the next while one parts."""
    verified: dict[Recipe, int] = {}
    parted: dict[Recipe, str] = {}
    for k, r in enumerate(order):
        if verify_n == screen_epochs:
            verified[r] = verify_n
            break
        s.stage(f"verify-{k + 1}", [(r, m) for m in names], verify_n)
        got = s.classes(r, names, verify_n)
        if got is None:
            parted[r] = f"did not complete: {s.missing(r, names, verify_n)}"
            continue
        if len(got) == 1:
            verified[r] = verify_n
            break
        a, b = got[0][0], got[1][0]
        first = compare.compare_pair(s.fps[(r, a, verify_n)], s.fps[(r, b, verify_n)]).first
        parted[r] = f"{a} vs {b}: " + ("the digests differ outside the training" if first is None else first.where)
    return verified, parted


def _exhaustive(ok: Sequence[Lever], names: Sequence[str]) -> int:
    """Runs every combination of the feasible levers (at most one value per control) on every machine needs."""
    total = len(names)
    by_field: dict[str, int] = {}
    for lv in ok:
        by_field[lv.field] = by_field.get(lv.field, 0) + 1
    for n in by_field.values():
        total *= n + 1
    return total


def _native_ok(spec: ExperimentSpec, base: Controls, recipe: Recipe) -> bool:
    try:
        controls.validate(RunConfig(controls=configured(base, recipe, census.NATIVE), epochs=1, audit_every=0), spec)
    except UsageError:
        return False
    return True


def _fewest(s: _Search, tried: Sequence[Tried], recipes: Mapping[str, Recipe], agreeing: Sequence[Recipe],
            names: Sequence[str], reps: Sequence[str], epochs: int) -> tuple[Recipe, int]:
    """The recipe that leaves the fewest classes (over every machine where known, else over the
    representatives), fewer levers first; the settings as they come where nothing does better."""
    def classes(r: Recipe) -> int:
        got = s.classes(r, names, epochs) or s.classes(r, reps, epochs)
        return len(names) + 1 if got is None else len(got)
    scored = [(classes(recipes[t.recipe]), t.levers, t.recipe) for t in tried
              if not (t.pruned or "").startswith("failed")]
    scored += [(classes(r), len(r), recipe_text(r)) for r in agreeing]
    best = min(scored, default=(len(reps), 0, "none"))
    if best[0] >= len(reps):
        return (), epochs
    return recipes[best[2]], epochs


def _partition(s: _Search, recipe: Recipe, names: Sequence[str], epochs: int, facts_of: census.FactsOf
               ) -> census.Census:
    """The machines' classes under ``recipe``, as a census reads them (splits, separating features)."""
    fps = {m: s.fps[(recipe, m, epochs)] for m in names if (recipe, m, epochs) in s.fps}
    return census.classify(fps, facts_of(list(fps)), where=str(s.out), epochs=epochs,
                           missing=[m for m in names if m not in fps])


def solve_id(spec: ExperimentSpec, machines: Sequence[str], levers: Sequence[Lever], **settings: Any) -> str:
    """12 hex digits naming the default solve folder: the experiment, the machines, the levers and the lengths."""
    return fileio.canonical_sha256({"spec": spec.hash, "machines": list(machines),
                                    "levers": [lv.text for lv in levers], **settings})[:12]

