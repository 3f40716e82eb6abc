"""The experiment spec: every number of the BN noisy-feature experiment, and its hash.

The default spec is embedded (``specs/default.toml``) so ``bnaudit run`` needs no
file; ``--spec FILE`` gives a TOML file whose keys override the default's.  The spec
hash is sha256 over a canonical JSON form; it goes into every output so that runs of
different experiments are never compared by accident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from bnaudit.errors import InputError, UsageError
from bnaudit.fileio import read_bounded

SPEC_SCHEMA = 1
MAX_SPEC_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The toy 1-D regression data set."""

    seed: int
    """Root seed of the frozen inputs (numpy SeedSequence)."""
    samples: int
    """Number of samples, train and test together."""
    train: int
    """The first ``train`` samples train; the rest test."""
    x_low: float
    """Lower bound of x ~ Uniform(x_low, x_high)."""
    x_high: float
    """Upper bound of x."""
    target: tuple[float, ...]
    """Polynomial coefficients c_k of y = sum c_k x^k + e."""
    noise_std: float
    """Standard deviation of the label noise e."""
    degree: int
    """Inputs are x, x^2, ..., x^degree."""
    noise_feature: bool
    """Whether a pure-noise input z ~ N(0, 1) is appended."""
    init_seed: int | None = None
    """Root seed of the initial parameters where it is not ``seed`` (``--seed`` with scope init); None: ``seed``."""
    order_seed: int | None = None
    """Root seed of the batch order where it is not ``seed`` (``--seed`` with scope order); None: ``seed``."""

    def seed_of(self, stream: str) -> int:
        """The root seed of one of the frozen streams: ``data``, ``init`` or ``order``."""
        own = {"data": None, "init": self.init_seed, "order": self.order_seed}[stream]
        return self.seed if own is None else own


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The multilayer perceptron."""

    hidden_layers: int
    """Number of hidden Linear layers."""
    hidden_units: int
    """Width of every hidden layer."""
    batchnorm: bool
    """Linear -> BatchNorm1d -> ReLU when true, else Linear -> ReLU (the baseline)."""
    bn_eps: float
    """BatchNorm eps added to the batch variance."""
    bn_momentum: float
    """BatchNorm running-statistics momentum (torch convention)."""


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The optimiser and its schedule."""

    loss: str
    """Loss function; only "mse" (mean over the batch)."""
    lr: float
    """Initial SGD learning rate."""
    momentum: float
    """SGD momentum, torch's formulation."""
    batch_size: int
    """Samples per step; must divide the training set."""
    epochs: int
    """Epochs of the full experiment (a run may stop earlier: a prefix)."""
    lr_milestones: tuple[int, ...]
    """Epochs at whose start the learning rate is multiplied by lr_gamma."""
    lr_gamma: float
    """Learning-rate factor at each milestone."""


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """A whole experiment; its hash identifies it in every record and fingerprint."""

    name: str
    """A human label; part of the hash."""
    data: DataSpec
    """The data set."""
    model: ModelSpec
    """The network."""
    train: TrainSpec
    """The training procedure."""

    @property
    def n_inputs(self) -> int:
        return self.data.degree + (1 if self.data.noise_feature else 0)

    @property
    def steps_per_epoch(self) -> int:
        return self.data.train // self.train.batch_size

    def layers(self) -> list[tuple[str, str, int, int]]:
        """(name, kind, fan_in, fan_out) of every layer with state, in forward order."""
        out: list[tuple[str, str, int, int]] = []
        width_in = self.n_inputs
        for i in range(1, self.model.hidden_layers + 1):
            out.append((f"linear{i}", "linear", width_in, self.model.hidden_units))
            if self.model.batchnorm:
                out.append((f"bn{i}", "bn", self.model.hidden_units, self.model.hidden_units))
            width_in = self.model.hidden_units
        out.append((f"linear{self.model.hidden_layers + 1}", "linear", width_in, 1))
        return out

    def modules(self) -> list[tuple[str, str]]:
        """(name, kind) of every module of the network, ReLUs included, in forward order."""
        out: list[tuple[str, str]] = []
        last = f"linear{self.model.hidden_layers + 1}"
        for name, kind, _, _ in self.layers():
            out.append((name, kind))
            if name == last:
                break
            if kind == "bn" or not self.model.batchnorm:
                out.append((f"relu{name.removeprefix(kind)}", "relu"))
        return out

    def parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        """Trainable tensors (torch state_dict names and shapes), in forward order."""
        out: list[tuple[str, tuple[int, ...]]] = []
        for name, kind, fan_in, fan_out in self.layers():
            if kind == "linear":
                out += [(f"{name}.weight", (fan_out, fan_in)), (f"{name}.bias", (fan_out,))]
            else:
                out += [(f"{name}.weight", (fan_out,)), (f"{name}.bias", (fan_out,))]
        return out

    def buffers(self) -> list[tuple[str, tuple[int, ...]]]:
        """BatchNorm running statistics (state_dict names and shapes), in forward order."""
        return [
            (f"{name}.{b}", (fan_out,))
            for name, kind, _, fan_out in self.layers()
            if kind == "bn"
            for b in ("running_mean", "running_var")
        ]

    def lr_at(self, epoch: int) -> float:
        """The learning rate in force during ``epoch`` (0-based), as torch's MultiStepLR gives it."""
        lr = self.train.lr
        for milestone in self.train.lr_milestones:
            if epoch >= milestone:
                lr *= self.train.lr_gamma
        return lr

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SPEC_SCHEMA,
            "name": self.name,
            "data": _section_dict(self.data),
            "model": _section_dict(self.model),
            "train": _section_dict(self.train),
        }

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON form (floats by shortest round-trip repr)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.hash[:12]


OPTIONAL_SEEDS = ("init_seed", "order_seed")
"""Fields written only where set: a spec without them hashes as it did before they existed."""

SEED_STREAMS = ("data", "init", "order")
"""What a seed draws: the data set, the initial parameters, the batch order."""
DEFAULT_SEED_SCOPE = ("init", "order")
"""What ``--seed`` reseeds unless told: the network's start and the batch order, the data set fixed."""


def _section_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name in OPTIONAL_SEEDS and value is None:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def parse_seed_scope(text: str) -> tuple[str, ...]:
    """``init+order`` (the default), ``init``, ``order``, ``data``, ``all`` ... as the streams it names."""
    parts = [p.strip() for p in text.split("+")]
    if parts == ["all"]:
        return SEED_STREAMS
    bad = [p for p in parts if p not in SEED_STREAMS]
    if bad or not parts:
        raise UsageError(f"--seed-scope {text!r}: expected all or streams joined by +, from {', '.join(SEED_STREAMS)}")
    return tuple(s for s in SEED_STREAMS if s in parts)


def with_seed(spec: ExperimentSpec, seed: int, scope: tuple[str, ...] = DEFAULT_SEED_SCOPE) -> ExperimentSpec:
    """The spec with the streams of ``scope`` drawn from ``seed`` and the others as they were.

    Each stream is drawn from its own root seed exactly as the spec's single seed draws it, so a
    seed equal to the spec's own gives the spec itself (the same hash, frozen inputs and reference)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UsageError(f"--seed {seed!r}: expected a non-negative 63-bit integer")
    d = spec.data
    roots = {s: seed if s in scope else d.seed_of(s) for s in SEED_STREAMS}
    data = dataclasses.replace(d, seed=roots["data"],
                               init_seed=None if roots["init"] == roots["data"] else roots["init"],
                               order_seed=None if roots["order"] == roots["data"] else roots["order"])
    return dataclasses.replace(spec, data=data)


_SECTIONS = {"data": DataSpec, "model": ModelSpec, "train": TrainSpec}


def _check_value(where: str, value: Any, annotation: str) -> Any:
    """Validate one field against its declared type; return it normalised."""
    if annotation == "int | None":
        if value is None:
            return None
        annotation = "int"
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"spec: {where} must be an integer, got {value!r}")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"spec: {where} must be a finite number, got {value!r}")
        return float(value)
    if annotation == "bool":
        if not isinstance(value, bool):
            raise InputError(f"spec: {where} must be true or false, got {value!r}")
        return value
    if annotation == "str":
        if not isinstance(value, str):
            raise InputError(f"spec: {where} must be a string, got {value!r}")
        return value
    if annotation.startswith("tuple[int"):
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise InputError(f"spec: {where} must be a list of integers, got {value!r}")
        return tuple(value)
    if annotation.startswith("tuple[float"):
        if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value
        ):
            raise InputError(f"spec: {where} must be a list of finite numbers, got {value!r}")
        return tuple(float(v) for v in value)
    raise AssertionError(annotation)  # pragma: no cover - every field type is listed above


def from_dict(raw: dict[str, Any], *, base: ExperimentSpec | None = None) -> ExperimentSpec:
    """Build a spec from a mapping, each key overriding ``base`` (or required without it)."""
    if not isinstance(raw, dict):
        raise InputError("spec: top level must be a table")
    unknown = set(raw) - {"name", "schema", *_SECTIONS}
    if unknown:
        raise InputError(f"spec: unknown key(s) {', '.join(sorted(unknown))}")
    if "schema" in raw and (type(raw["schema"]) is not int or raw["schema"] != SPEC_SCHEMA):
        raise InputError(f"spec: schema {raw['schema']!r} is not supported (expected the integer {SPEC_SCHEMA})")
    sections = {}
    for key, cls in _SECTIONS.items():
        given = raw.get(key, {})
        if not isinstance(given, dict):
            raise InputError(f"spec: [{key}] must be a table")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(given) - set(names)
        if unknown:
            raise InputError(f"spec: unknown key(s) in [{key}]: {', '.join(sorted(unknown))}")
        values = {}
        for fname, f in names.items():
            if fname in given:
                values[fname] = _check_value(f"{key}.{fname}", given[fname], str(f.type))
            elif base is not None:
                values[fname] = getattr(getattr(base, key), fname)
            elif f.default is not dataclasses.MISSING:
                values[fname] = f.default
            else:
                raise InputError(f"spec: missing {key}.{fname}")
        if key == "data":  # a stream's own seed equal to the root seed is no seed of its own: the same hash
            values.update({f: None for f in OPTIONAL_SEEDS if values[f] == values["seed"]})
        sections[key] = cls(**values)
    name = raw.get("name", base.name if base else None)
    if not isinstance(name, str) or not name:
        raise InputError("spec: name must be a non-empty string")
    spec = ExperimentSpec(name=name, **sections)
    validate(spec)
    return spec


def validate(spec: ExperimentSpec) -> None:
    """Reject specs the experiment cannot run (each with the field that is wrong, and why).

    The checks run in order and each only once those before it hold, so that no check
    divides by a batch size of 0 or raises to the power of an unchecked degree.  The
    ranges keep every quantity of the experiment finite in bfloat16 and float32:
    |x|^degree and the targets stay below 1e30, the learning rate never exceeds 10.
    """
    d, m, t = spec.data, spec.model, spec.train
    checks: list[tuple[Callable[[], bool], str]] = [
        (lambda: 0 < d.train < d.samples, "data.train must be between 0 and data.samples"),
        (lambda: d.samples <= 100_000, "data.samples must be at most 100000"),
        (lambda: 1 <= d.degree <= 16, "data.degree must be between 1 and 16"),
        (lambda: d.x_low < d.x_high, "data.x_low must be below data.x_high"),
        (lambda: max(abs(d.x_low), abs(d.x_high)) ** d.degree <= 1e30,
         "data.x_low and data.x_high must keep |x|^degree below 1e30 (float32 overflows at 3.4e38)"),
        (lambda: all(abs(c) <= 1e6 for c in d.target), "data.target coefficients must be at most 1e6 in size"),
        (lambda: 0 <= d.noise_std <= 1e6, "data.noise_std must be in [0, 1e6]"),
        (lambda: 0 <= d.seed < 2**63, "data.seed must be a non-negative 63-bit integer"),
        (lambda: all(v is None or 0 <= v < 2**63 for v in (d.init_seed, d.order_seed)),
         "data.init_seed and data.order_seed must be non-negative 63-bit integers"),
        (lambda: 1 <= m.hidden_layers <= 32, "model.hidden_layers must be between 1 and 32"),
        (lambda: 1 <= m.hidden_units <= 1024, "model.hidden_units must be between 1 and 1024"),
        (lambda: 0 < m.bn_eps <= 1, "model.bn_eps must be in (0, 1]"),
        (lambda: 0 <= m.bn_momentum <= 1, "model.bn_momentum must be in [0, 1]"),
        (lambda: t.loss == "mse", 'train.loss must be "mse"'),
        (lambda: 0 < t.lr <= 10, "train.lr must be in (0, 10]"),
        (lambda: 0 <= t.momentum < 1, "train.momentum must be in [0, 1)"),
        (lambda: t.batch_size >= 2, "train.batch_size must be >= 2 (BatchNorm needs two samples)"),
        (lambda: d.train % t.batch_size == 0, "train.batch_size must divide data.train"),
        (lambda: 1 <= t.epochs <= 100_000, "train.epochs must be between 1 and 100000"),
        (lambda: list(t.lr_milestones) == sorted(set(t.lr_milestones)), "train.lr_milestones must increase"),
        (lambda: 0 < t.lr_gamma <= 10, "train.lr_gamma must be in (0, 10]"),
        (lambda: spec.lr_at(t.epochs) >= 1e-30 and max(spec.lr_at(e) for e in (0, *t.lr_milestones)) <= 10,
         "train.lr and train.lr_gamma must keep the learning rate in [1e-30, 10] at every milestone"),
    ]
    for ok, message in checks:
        if not ok():
            raise InputError(f"spec: {message}")


def default_spec() -> ExperimentSpec:
    """The embedded spec of the seed's BN noisy-feature experiment."""
    text = resources.files("bnaudit.specs").joinpath("default.toml").read_text()
    return from_dict(tomllib.loads(text))


def load_spec(path: Path | str | None) -> ExperimentSpec:
    """The default spec, or the default overridden by the TOML file at ``path``."""
    base = default_spec()
    if path is None:
        return base
    path = Path(path)
    try:
        raw = tomllib.loads(read_bounded(path, "spec", MAX_SPEC_BYTES).decode("utf-8"))
    except InputError as exc:
        raise InputError(f"spec {exc.message}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"spec {path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"spec {path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise InputError(f"spec {path}: not valid TOML (nested too deeply)") from None
    try:
        return from_dict(raw, base=base)
    except InputError as exc:
        raise InputError(f"{path}: {exc.message}") from None


def spec_from_record_dict(raw: Any) -> ExperimentSpec:
    """Rebuild a spec stored in a record or fingerprint (complete, no defaults filled in)."""
    if not isinstance(raw, dict):
        raise InputError("spec: stored spec must be an object")
    return from_dict(raw)
