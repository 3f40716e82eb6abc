"""What a matrix runs: the grid of control values, its experiments, and every configuration's folder."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bnaudit import controls, emulate, fileio
from bnaudit.controls import Controls, Perturbation, RunConfig
from bnaudit.errors import UsageError
from bnaudit.spec import DEFAULT_SEED_SCOPE, ExperimentSpec, from_dict, with_seed

MATRIX_SCHEMA = "bnaudit.matrix/1"

HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A cluster host's name, as it appears in folder names."""

CONTROL_FIELDS = tuple(f.name for f in dataclasses.fields(Controls))
"""The controls, in the order they are reported: every field of ``Controls``."""

INHERIT = "inherit"
"""In lever lists, the token for "no override: what --isa sets" (``None`` in Controls)."""

# Epochs of the seed-machines preset.  Emulation is ~25x slower than native: about 0.25 s per float32
# epoch on an idle core of this project's machine, ~2 s per epoch with 5 engineers sharing its 2 cores,
# plus 12-60 s to import torch under qemu.  Its 8 emulated runs of 60 epochs take ~5 min at -j 1 on an
# idle machine and ~25 min on a busy one.  The machines' float32 gap grows by ~1.7 (ln) per epoch from
# the first epoch (measured), so 60 epochs show where they part, the growth and, in float32, the
# saturation.  --epochs overrides it (up to the spec's 1000: about 35 min at -j 1 on an idle machine).
SEED_MACHINES_EPOCHS = 60

PRESETS = {
    "seed-machines": "the BN noisy-feature experiment on the seed's two CPUs emulated (seed-i7 = Haswell, "
                     "seed-i5 = IvyBridge) and natively, with and without BatchNorm, float32 and float64, "
                     f"{SEED_MACHINES_EPOCHS} epochs",
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The values each control takes; the matrix is their cartesian product (one field per ``Controls`` field)."""

    dtype: tuple[str, ...] = ("float32",)
    """Run dtypes."""
    threads: tuple[int, ...] = (1,)
    """Thread counts."""
    isa: tuple[str, ...] = ("native",)
    """ISA caps."""
    deterministic: tuple[bool, ...] = (False,)
    """Deterministic-algorithm settings."""
    onednn_isa: tuple[str | None, ...] = (None,)
    """oneDNN ISA overrides (None: what --isa sets)."""
    mkl_cbwr: tuple[str | None, ...] = (None,)
    """MKL_CBWR overrides (None: what --isa sets; "none": removed)."""
    cpu_model: tuple[str | None, ...] = (None,)
    """Emulated CPU models (None: this machine)."""
    promote: tuple[tuple[str, ...], ...] = ((),)
    """Sets of operations computed in float64 (``()``: none)."""
    numpy_disable: tuple[str | None, ...] = (None,)
    """NPY_DISABLE_CPU_FEATURES values (None: not set)."""
    openblas_coretype: tuple[str | None, ...] = (None,)
    """OPENBLAS_CORETYPE values (None: OpenBLAS's own choice)."""
    dynamic_threads: tuple[bool, ...] = (False,)
    """Dynamic thread adjustment of OpenMP and MKL."""
    kmp_deterministic_reduction: tuple[bool, ...] = (False,)
    """Intel OpenMP's deterministic reductions."""
    flush_denormal: tuple[bool, ...] = (False,)
    """Flush-to-zero of subnormals."""

    def controls(self) -> list[Controls]:
        """Every configuration, in a stable order (last control varies fastest)."""
        axes = [getattr(self, f) for f in CONTROL_FIELDS]
        return [Controls(**dict(zip(CONTROL_FIELDS, values, strict=True))) for values in itertools.product(*axes)]

    def varying(self) -> tuple[str, ...]:
        """Controls that take more than one value."""
        return tuple(f for f in CONTROL_FIELDS if len(getattr(self, f)) > 1)

    def to_dict(self) -> dict[str, list[Any]]:
        """The grid as matrix.json holds it; ``promote`` and the dispatch controls only when they vary from
        their default (so that the plan id, and the folder name, of a matrix without them are what they were
        before they existed)."""
        d = {f: list(getattr(self, f)) for f in CONTROL_FIELDS}
        if self.promote == ((),):
            del d["promote"]
        else:
            d["promote"] = [list(ops) for ops in self.promote]
        for name in controls.DISPATCH_FIELDS:
            if getattr(self, name) == (getattr(Controls, name),):
                del d[name]
        return d


assert tuple(f.name for f in dataclasses.fields(Grid)) == CONTROL_FIELDS, "Grid needs one field per Controls field"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One experiment of the matrix (the preset runs the spec with and without BatchNorm)."""

    name: str
    """Short name, used in folder names and tables ("bn", "no-bn")."""
    spec: ExperimentSpec
    """The experiment."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One configuration of one variant, and where its record goes."""

    variant: str
    """Name of the experiment variant."""
    config: RunConfig
    """What the run's process is asked to do."""
    folder: str
    """Record folder, relative to the matrix folder (``runs/[<host>/][<variant>/]<label>``)."""
    host: str | None = None
    """The cluster host (a worker's name) the run is pinned to; None: this machine."""

    @property
    def controls(self) -> Controls:
        return self.config.controls

    @property
    def key(self) -> str:
        """Unique name within the matrix."""
        return self.folder.removeprefix("runs/")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A whole matrix: experiments, grid, epochs, and every run."""

    variants: tuple[Variant, ...]
    """The experiments (one unless a preset adds a baseline)."""
    grid: Grid
    """The controls' values."""
    epochs: int
    """Epochs of every run."""
    trace_epochs: tuple[int, ...]
    """Epochs digested step by step (0 always)."""
    audit_every: int
    """Operator-audit interval passed to every run (0 = off)."""
    preset: str | None
    """The preset this plan came from, if any."""
    runs: tuple[PlannedRun, ...]
    """Every configuration, in grid order (per host, hosts in their order)."""
    hosts: tuple[str, ...] = ()
    """Cluster hosts every configuration runs on (``bnaudit.cluster``); empty: this machine."""
    configurations: tuple[Controls, ...] | None = None
    """The configurations run, where they are a chosen list rather than the grid's whole product
    (``bnaudit solve``'s stages; the grid then holds the values they take); None: the product."""
    on_hosts: tuple[str, ...] | None = None
    """The host each of ``configurations`` runs on, where each runs on one host rather than on all of
    ``hosts`` (``bnaudit solve`` over a cluster); None: every configuration on every host."""
    perturb: Perturbation | None = None
    """The initial-state element every run moves by some ulps (``bnaudit ensemble``'s chaos floor); None: none."""

    def spec_of(self, variant: str) -> ExperimentSpec:
        return next(v.spec for v in self.variants if v.name == variant)

    def twin(self, run: PlannedRun, **changes: Any) -> PlannedRun | None:
        """The run of the same variant whose controls are ``run``'s with ``changes``, if the grid has it."""
        want = dataclasses.replace(run.controls, **changes)
        return next((r for r in self.runs if r.variant == run.variant and r.host == run.host and r.controls == want),
                    None)

    def identity(self) -> dict[str, Any]:
        """What makes two matrix folders the same experiment and grid."""
        return {
            "schema": MATRIX_SCHEMA,
            "variants": [{"name": v.name, "spec_hash": v.spec.hash} for v in self.variants],
            "grid": self.grid.to_dict(),
            "epochs": self.epochs,
            "trace_epochs": list(self.trace_epochs),
            "audit_every": self.audit_every,
            **({"hosts": list(self.hosts)} if self.hosts else {}),  # absent: plan ids as before hosts existed
            **({"configurations": [c.label() for c in self.configurations]}
               if self.configurations is not None else {}),
            **({"on_hosts": list(self.on_hosts)} if self.on_hosts is not None else {}),
            **({"perturb": str(self.perturb)} if self.perturb is not None else {}),
        }

    @property
    def plan_id(self) -> str:
        """12 hex digits of the identity's hash (names the default folder, so it must stay stable)."""
        return fileio.canonical_sha256(self.identity())[:12]

    def manifest(self) -> dict[str, Any]:
        """matrix.json."""
        return {
            **self.identity(),
            "plan_id": self.plan_id,
            "preset": self.preset,
            "specs": {v.name: v.spec.to_dict() for v in self.variants},
            "runs": [{"variant": r.variant, "folder": r.folder, "config": r.config.to_dict(),
                      **({"host": r.host} if r.host is not None else {})} for r in self.runs],
        }


def seeded(variants: Sequence[Variant], seeds: Sequence[int], scope: tuple[str, ...] = DEFAULT_SEED_SCOPE, *,
           named: bool = False) -> tuple[Variant, ...]:
    """Each variant once per seed: ``<variant>-seed-N`` where there are several (or ``named``), else ``seed-N``."""
    keep = named or len(variants) > 1
    return tuple(Variant(f"{v.name}-seed-{n}" if keep else f"seed-{n}", with_seed(v.spec, n, scope))
                 for v in variants for n in seeds)


def no_bn_variant(spec: ExperimentSpec) -> ExperimentSpec:
    """The seed's baseline network: the same experiment with ``[model] batchnorm = false``."""
    return from_dict({"model": {"batchnorm": False}}, base=spec)


def make_plan(variants: Sequence[Variant], grid: Grid, *, epochs: int | None = None,
              trace_epochs: tuple[int, ...] = (0,), audit_every: int = 10, preset: str | None = None,
              check_cpu: bool = True, hosts: Sequence[str] = (),
              configurations: Sequence[Controls] | None = None, on_hosts: Sequence[str] | None = None,
              perturb: Perturbation | None = None) -> Plan:
    """Validate every configuration (UsageError, exit 2, before anything runs) and name its folder.

    ``hosts``: cluster hosts (worker names) each configuration runs on, in ``runs/<host>/``; the
    CPU checks of ``validate`` are this machine's, so a plan over hosts is checked without them.
    ``configurations``: run these (in this order) instead of the grid's product; the grid is
    then ignored and replaced by the values they take (``grid_of``).
    ``on_hosts``: with ``configurations``, the one host each of them runs on (``bnaudit solve``'s
    stages over a cluster), instead of every configuration on every host of ``hosts``.
    ``perturb``: every run moves this initial-state element (and runs its unperturbed twin).
    """
    chosen = None if configurations is None else tuple(configurations)
    if chosen is not None:
        if not chosen:
            raise UsageError("a matrix needs at least one configuration")
        grid = grid_of(chosen)
    if on_hosts is not None:
        if chosen is None or len(on_hosts) != len(chosen) or hosts:
            raise ValueError("on_hosts places each of the configurations, instead of hosts")
        hosts = tuple(dict.fromkeys(on_hosts))
    if not variants:
        raise UsageError("a matrix needs at least one experiment")
    bad_host = next((h for h in hosts if not HOST_NAME.match(h)), None)
    if bad_host is not None:
        raise UsageError(f"host name {bad_host!r}: expected letters, digits, '.', '_' or '-' (at most 64)")
    if len(set(hosts)) != len(hosts):
        raise UsageError("two cluster hosts share a name; give each worker its own --name")
    n_epochs = epochs if epochs is not None else min(v.spec.train.epochs for v in variants)
    for model in sorted({m for m in grid.cpu_model if m is not None}):
        emulate.resolve(model)  # MissingTool (7) without qemu, UsageError (2) for an unknown model
    nested = len(variants) > 1
    runs = []
    placed = [(h, c) for h in hosts or (None,) for c in (grid.controls() if chosen is None else chosen)] \
        if on_hosts is None else list(zip(on_hosts, chosen or ()))
    for host in dict.fromkeys(h for h, _ in placed):
        for variant in variants:
            for c in (c for h, c in placed if h == host):
                config = RunConfig(controls=c, epochs=n_epochs, perturb=perturb, trace_epochs=trace_epochs,
                                   audit_every=audit_every)
                controls.validate(config, variant.spec, check_cpu=check_cpu and host is None)
                folder = "runs/" + "".join(f"{p}/" for p in (host, variant.name if nested else None) if p)
                runs.append(PlannedRun(variant=variant.name, config=config, folder=folder + c.label(), host=host))
    repeated = [k for k, n in Counter(r.folder for r in runs).items() if n > 1]
    if repeated:  # e.g. --mkl-cbwr avx2,AVX2: same label twice
        raise UsageError(f"two configurations of the grid share the folder {repeated[0]}; remove the repeated value")
    return Plan(variants=tuple(variants), grid=grid, epochs=n_epochs, trace_epochs=trace_epochs,
                audit_every=audit_every, preset=preset, runs=tuple(runs), hosts=tuple(hosts), configurations=chosen,
                on_hosts=None if on_hosts is None else tuple(on_hosts), perturb=perturb)


def grid_of(configurations: Sequence[Controls]) -> Grid:
    """The values each control takes in a list of configurations, in order of first appearance."""
    return Grid(**{f: tuple(dict.fromkeys(getattr(c, f) for c in configurations)) for f in CONTROL_FIELDS})


def preset_plan(name: str, spec: ExperimentSpec, *, epochs: int | None, overrides: dict[str, tuple[Any, ...]],
                trace_epochs: tuple[int, ...] = (0,), audit_every: int = 10, hosts: Sequence[str] = (),
                seeds: Sequence[int] = (), seed_scope: tuple[str, ...] = DEFAULT_SEED_SCOPE) -> Plan:
    """A named plan; explicit grid options (``overrides``) replace the preset's values; ``seeds``
    runs each of its experiments once per seed."""
    if name != "seed-machines":
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    grid = Grid(dtype=("float32", "float64"), cpu_model=("seed-i7", "seed-i5", None))
    grid = dataclasses.replace(grid, **overrides)
    variants: tuple[Variant, ...] = (Variant("bn", spec), Variant("no-bn", no_bn_variant(spec)))
    if seeds:
        variants = seeded(variants, seeds, seed_scope)
    return make_plan(variants, grid, epochs=SEED_MACHINES_EPOCHS if epochs is None else epochs,
                     trace_epochs=trace_epochs, audit_every=audit_every, preset=name, hosts=hosts)
