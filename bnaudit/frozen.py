"""Frozen inputs: the data set, initial parameters and batch order, stored exactly.

A run never draws a random number.  Everything random is generated once, in float64,
by ``generate`` and stored as .npy files (plain arrays; loaded with pickling off)
beside a sha256 manifest that is checked on every load.  A run casts the float64
values to its dtype with round-to-nearest-even.  So two runs of one spec start from
the same values, bit for bit, and any difference between them comes from arithmetic.

Layout of a frozen folder:
    inputs.npy    (samples, n_inputs) float64: x, x^2, ..., x^degree[, z]
    targets.npy   (samples,) float64: y = sum c_k x^k + e
    init.npy      (n_params + n_buffers,) float64: parameters then BN buffers, spec order
    batches.npy   (epochs, train) uint32: the permutation of training rows in each epoch
    manifest.json spec hash, generator version, sha256 of each file

The default spec's folder ships in ``reference/frozen/<short hash>/``; any other spec
gets its folder generated on first use in the cache (``cache_root``).  A wheel carries
the shipped folders as package data (``bnaudit/shipped``), read in place and never
written; in a checkout, ``bnaudit frozen build`` regenerates ``reference/frozen``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from bnaudit import envinfo, fileio
from bnaudit.errors import InputError
from bnaudit.spec import SEED_STREAMS, ExperimentSpec, default_spec

GENERATOR_VERSION = 1
FILES = ("inputs.npy", "targets.npy", "init.npy", "batches.npy")
MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class FrozenInputs:
    """Everything a run needs besides arithmetic, as exact float64 / integer arrays."""

    spec_hash: str
    """Hash of the spec these inputs were generated for."""
    inputs: np.ndarray
    """(samples, n_inputs) float64 network inputs."""
    targets: np.ndarray
    """(samples,) float64 labels."""
    init: np.ndarray
    """(n_params + n_buffers,) float64 initial state in spec order."""
    batches: np.ndarray
    """(epochs, train) uint32: training-row order of each epoch."""
    digest: str
    """sha256 of the manifest's file table: names the frozen inputs in records."""

    @property
    def x(self) -> np.ndarray:
        """The scalar input x of each sample (the first feature)."""
        return self.inputs[:, 0]


def _streams(spec: ExperimentSpec) -> tuple[np.random.Generator, ...]:
    """Independent generators for data, init and batches (changing one leaves the others).

    The k-th stream is the k-th child of its own root seed's SeedSequence; where every root is
    ``data.seed`` (a spec without ``init_seed``/``order_seed``) they are one sequence's three children."""
    return tuple(np.random.Generator(np.random.PCG64(np.random.SeedSequence(spec.data.seed_of(name)).spawn(3)[k]))
                 for k, name in enumerate(SEED_STREAMS))


def generate(spec: ExperimentSpec) -> dict[str, np.ndarray]:
    """Draw the frozen arrays for ``spec`` (numpy PCG64, float64 throughout)."""
    data_rng, init_rng, batch_rng = _streams(spec)
    d = spec.data
    x = data_rng.uniform(d.x_low, d.x_high, size=d.samples)
    e = data_rng.normal(0.0, 1.0, size=d.samples) * d.noise_std
    z = data_rng.normal(0.0, 1.0, size=d.samples)
    powers = [x]
    for _ in range(1, d.degree):
        powers.append(powers[-1] * x)  # x^k by repeated multiplication, rounded once each
    y = np.zeros_like(x)
    for c in reversed(d.target):  # Horner: y = c0 + x (c1 + x (c2 + ...))
        y = y * x + c
    y = y + e
    columns = powers + ([z] if d.noise_feature else [])
    inputs = np.stack(columns, axis=1)

    # PyTorch's default init: Linear weight kaiming_uniform(a=sqrt(5)) and bias both
    # reduce to U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm weight 1, bias 0,
    # running mean 0, running variance 1.
    parts = []
    for _, kind, fan_in, fan_out in spec.layers():
        if kind == "linear":
            bound = 1.0 / math.sqrt(fan_in)
            parts.append(init_rng.uniform(-bound, bound, size=fan_out * fan_in))
            parts.append(init_rng.uniform(-bound, bound, size=fan_out))
        else:
            parts += [np.ones(fan_out), np.zeros(fan_out)]
    for name, shape in spec.buffers():
        parts.append(np.zeros(shape) if name.endswith("running_mean") else np.ones(shape))
    init = np.concatenate(parts).astype("<f8")

    batches = np.stack([batch_rng.permutation(d.train) for _ in range(spec.train.epochs)]).astype("<u4")
    return {
        "inputs.npy": inputs.astype("<f8"),
        "targets.npy": y.astype("<f8"),
        "init.npy": init,
        "batches.npy": batches,
    }


def write(spec: ExperimentSpec, folder: Path) -> Path:
    """Generate and write the frozen folder for ``spec`` atomically (temp folder, then rename)."""
    folder = Path(folder)
    arrays = generate(spec)
    blobs = {name: fileio.npy_bytes(arr) for name, arr in arrays.items()}
    manifest = {
        "schema": "bnaudit.frozen/1",
        "generator": GENERATOR_VERSION,
        "spec_hash": spec.hash,
        "spec": spec.to_dict(),
        "files": {name: hashlib.sha256(b).hexdigest() for name, b in sorted(blobs.items())},
    }
    with fileio.OutputLock.beside(folder, f"frozen inputs {folder}", wait=True):
        # Frozen inputs are a function of the spec: replacing a folder of them (force)
        # rewrites the same bytes; a folder of anything else is refused.
        fileio.prepare_output(folder, force=True, kind="frozen inputs")
        with fileio.atomic_folder(folder, "frozen inputs") as tmp:
            for name, blob in blobs.items():
                (tmp / name).write_bytes(blob)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return folder


def shipped_root() -> Path:
    """Where the default spec's shipped data lives (``frozen/`` and ``mpmath/`` below it).

    In order: ``BNAUDIT_REFERENCE_DIR``; the package data of an installed wheel
    (``bnaudit/shipped``, found through ``importlib.resources``); the ``reference/``
    folder of the source checkout the package was imported from.
    """
    override = envinfo.reference_dir()
    if override:
        return Path(override)
    installed = resources.files("bnaudit") / "shipped"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "reference"


def cache_root() -> Path:
    """Where custom specs' frozen inputs and references are made: ``BNAUDIT_CACHE``, else
    ``$XDG_CACHE_HOME/bnaudit``, else ``~/.cache/bnaudit``."""
    override = envinfo.cache_dir()
    if override:
        return Path(override)
    xdg = envinfo.xdg_cache_home()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bnaudit"


def folder_for(spec: ExperimentSpec) -> Path:
    """Where the frozen inputs of ``spec`` live: shipped for the default spec, else cache."""
    if spec.hash == default_spec().hash:
        return shipped_root() / "frozen" / spec.short_hash
    return cache_root() / "frozen" / spec.hash


def load(spec: ExperimentSpec, folder: Path | None = None) -> FrozenInputs:
    """Load and verify the frozen inputs of ``spec``; generate them first for a custom spec."""
    if folder is not None:
        return read(Path(folder), spec)
    folder = folder_for(spec)
    if not (folder / "manifest.json").exists():
        if spec.hash == default_spec().hash:
            raise InputError(f"frozen inputs missing at {folder}; regenerate with `bnaudit frozen build`")
        with fileio.OutputLock.beside(folder, f"frozen inputs {folder}", wait=True):
            made = (folder / "manifest.json").exists()  # by another run, while we waited
        if not made:
            write(spec, folder)
    return read(folder, spec)


def read(folder: Path, spec: ExperimentSpec) -> FrozenInputs:
    """Read a frozen folder, checking every file's sha256 and every array's shape."""
    try:
        manifest = fileio.read_json(folder / "manifest.json", "frozen manifest")
    except InputError as exc:
        raise InputError(f"frozen inputs {folder}: unreadable manifest ({exc.message})") from None
    if manifest.get("spec_hash") != spec.hash:
        raise InputError(f"frozen inputs {folder}: generated for another spec")
    files = manifest.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(FILES):
        raise InputError(f"frozen inputs {folder}: manifest does not list {', '.join(FILES)}")
    arrays = {}
    for name in FILES:
        if not isinstance(files[name], str):
            raise InputError(f"frozen inputs {folder}: manifest entry for {name} is not a sha256")
        arrays[name] = fileio.read_npy(folder / name, files[name], against="the manifest", max_bytes=MAX_FILE_BYTES)
    expected = {
        "inputs.npy": ((spec.data.samples, spec.n_inputs), "<f8"),
        "targets.npy": ((spec.data.samples,), "<f8"),
        "init.npy": ((_state_size(spec),), "<f8"),
        "batches.npy": ((spec.train.epochs, spec.data.train), "<u4"),
    }
    for name, (shape, dtype) in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != np.dtype(dtype):
            raise InputError(f"frozen input {folder / name}: expected {dtype} {shape}")
    table = json.dumps(files, sort_keys=True).encode()
    return FrozenInputs(
        spec_hash=spec.hash,
        inputs=arrays["inputs.npy"],
        targets=arrays["targets.npy"],
        init=arrays["init.npy"],
        batches=arrays["batches.npy"],
        digest=hashlib.sha256(table).hexdigest(),
    )


def _state_size(spec: ExperimentSpec) -> int:
    return sum(math.prod(shape) for _, shape in spec.parameters() + spec.buffers())
