"""Numerics controls: what a run asks for, the environment that makes it so, and read-back.

ISA caps and thread pools are read once, when torch, MKL, oneDNN and OpenMP load, so a
run's controls are applied by starting a fresh process with its environment set
(``launch.py``); inside that process ``apply`` sets what torch lets us set at run time
and ``readback`` records what actually took effect.  A request the machine cannot honour
is an error, never a silent fallback.

This module does not import torch: the parent process validates and builds environments
without loading it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from types import ModuleType
from typing import Any

import numpy as np

from bnaudit import envinfo
from bnaudit.errors import InputError, UsageError
from bnaudit.spec import ExperimentSpec

DTYPES = ("float32", "float64", "bfloat16", "bf16-mixed")
ISAS = ("native", "default", "avx2", "avx512")

# The storage dtype of parameters for each run dtype (bf16-mixed keeps float32 masters).
STORAGE_DTYPE = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "bf16-mixed": "float32"}

# One --isa level reaches every dispatcher that reads the environment at load time:
# ATen's kernels, oneDNN's JIT, and MKL (MKL_ENABLE_INSTRUCTIONS is ignored on AMD CPUs;
# MKL_CBWR, the conditional-numerical-reproducibility branch, is honoured on both).
ISA_ENVIRONMENT = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "MKL_CBWR": "AVX512"},
}
EXPECTED_CAPABILITY = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}

ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
               "AVX512_CORE_FP16", "AVX512_CORE_AMX", "ALL")
MKL_CBWR_BRANCHES = ("AUTO", "COMPATIBLE", "SSE2", "SSE3", "SSSE3", "SSE4_1", "SSE4_2", "AVX", "AVX2",
                     "AVX512_MIC", "AVX512", "AVX512_E1", "AVX512_MIC_E1")

# Operations ``--promote`` can compute in float64 inside a float32 or bfloat16 run
# (``promote.py``), in the order they are listed; bn-stats is BN's statistics alone.
PROMOTABLE = ("linear", "bn", "bn-stats", "loss", "optimizer")
PROMOTING_DTYPES = ("float32", "bfloat16")

# Dispatchers beyond --isa, each steered by one documented variable read at start-up
# (README, "Dispatch controls"): numpy's own CPU dispatch (NPY_DISABLE_CPU_FEATURES, numpy's
# dispatch targets, e.g. X86_V4), the OpenBLAS numpy loads (OPENBLAS_CORETYPE, one of its
# dynamic-arch kernel sets), OpenMP's and MKL's dynamic thread adjustment (OMP_DYNAMIC,
# MKL_DYNAMIC), Intel OpenMP's deterministic reductions (KMP_DETERMINISTIC_REDUCTION) and the
# x86 flush-to-zero/denormals-are-zero mode (torch.set_flush_denormal).  Each is read back in
# the run's process (``readback``) and checked (``verify``); what no library exposes is listed
# as unverified in the record, never assumed.
OPENBLAS_CORETYPES = ("Katmai", "Coppermine", "Northwood", "Prescott", "Banias", "Atom", "Core2", "Penryn",
                      "Dunnington", "Nehalem", "Athlon", "Opteron", "Opteron_SSE3", "Barcelona", "Nano",
                      "Sandybridge", "Bulldozer", "Piledriver", "Haswell", "Steamroller", "Excavator", "Zen",
                      "SkylakeX", "Cooperlake", "SapphireRapids")
"""OpenBLAS's x86-64 core names (its dynamic.c ``corename``), which OPENBLAS_CORETYPE takes."""

DISPATCH_FIELDS = ("numpy_disable", "openblas_coretype", "dynamic_threads", "kmp_deterministic_reduction",
                   "flush_denormal")
"""Controls files leave out at their default, so that records of runs that do not use them are as before."""

# Inherited variables that would silently change a run; the child gets only ours
# (``envinfo.uncontrolled`` is the filter, shared with the emulated-CPU probe).
CONTROLLED_PREFIXES = envinfo.CONTROLLED_PREFIXES
CONTROLLED_NAMES = envinfo.CONTROLLED_NAMES


def numpy_targets() -> tuple[str, ...]:
    """The CPU dispatch targets of this numpy (what NPY_DISABLE_CPU_FEATURES can switch off), e.g. X86_V4."""
    return tuple(str(t) for t in getattr(_umath(), "__cpu_dispatch__", ()))


def _umath() -> ModuleType:
    """numpy's ufunc core, which holds its CPU dispatch tables (numpy._core in 2.x, numpy.core in 1.x)."""
    import importlib

    try:
        return importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy 1.x
        return importlib.import_module("numpy.core._multiarray_umath")


def parse_numpy_disable(text: str) -> str:
    """``--numpy-disable``: numpy dispatch targets to switch off (comma or space list), canonical: sorted, upper."""
    tokens = sorted({t.upper() for t in re.split(r"[\s,+]+", text.strip()) if t})
    known = numpy_targets()
    unknown = [t for t in tokens if t not in known]
    if not tokens or unknown:
        raise UsageError(f"--numpy-disable {text!r}: this numpy dispatches to {', '.join(known) or 'no targets'}; "
                         "give some of them")
    return " ".join(tokens)


def parse_openblas_coretype(text: str) -> str:
    """``--openblas-coretype``: one of OpenBLAS's core names (case-insensitive), canonically spelled."""
    match = next((c for c in OPENBLAS_CORETYPES if c.lower() == text.strip().lower()), None)
    if match is None:
        raise UsageError(f"--openblas-coretype {text!r}: expected one of {', '.join(OPENBLAS_CORETYPES)}")
    return match


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """One initial-state element moved by a number of ulps in the run's dtype."""

    tensor: str
    """State-dict name, e.g. ``linear1.weight``."""
    index: tuple[int, ...]
    """Element index within that tensor."""
    ulps: int
    """Signed number of representable steps (positive: towards +inf)."""

    def __str__(self) -> str:
        return f"{self.tensor}[{','.join(map(str, self.index))}]:{self.ulps:+d}"

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Perturbation | None:
        """A record's ``config.perturb`` (None: no perturbation), validated field by field."""
        if raw is None:
            return None
        ok = (isinstance(raw, dict) and set(raw) == {"tensor", "index", "ulps"}
              and isinstance(raw["tensor"], str) and 0 < len(raw["tensor"]) <= 64
              and isinstance(raw["index"], list) and 0 < len(raw["index"]) <= 8
              and all(type(i) is int and 0 <= i < 1 << 20 for i in raw["index"])
              and type(raw["ulps"]) is int and abs(raw["ulps"]) < 1 << 62)
        if not ok:
            raise InputError(f"{where}: config.perturb is malformed")
        return cls(raw["tensor"], tuple(raw["index"]), raw["ulps"])


_PERTURB = re.compile(r"^([a-z]+\d+\.[a-z_]+)\[(\d+(?:,\d+)*)\]:([+-]?\d+)$")


def parse_perturbation(text: str, spec: ExperimentSpec) -> Perturbation:
    """Parse ``LAYER.PARAM[INDEX]:ULPS`` and check it against the spec's tensors."""
    m = _PERTURB.match(text.replace(" ", ""))
    if not m:
        raise UsageError(f"--perturb {text!r}: expected LAYER.PARAM[INDEX]:ULPS, e.g. linear1.weight[3,2]:1")
    name, index, ulps = m.group(1), tuple(int(i) for i in m.group(2).split(",")), int(m.group(3))
    shapes = dict(spec.parameters() + spec.buffers())
    if name not in shapes:
        raise UsageError(f"--perturb: no tensor {name!r}; tensors are {', '.join(shapes)}")
    shape = shapes[name]
    if len(index) == 1 and len(shape) > 1:
        flat = index[0]
        if flat >= math.prod(shape):
            raise UsageError(f"--perturb: flat index {flat} out of range for {name} {shape}")
        index = tuple(int(i) for i in np.unravel_index(flat, shape))
    if len(index) != len(shape) or any(i >= s for i, s in zip(index, shape)):
        raise UsageError(f"--perturb: index {list(index)} out of range for {name} of shape {list(shape)}")
    if ulps == 0 or abs(ulps) > 2**20:
        raise UsageError("--perturb: ULPS must be a non-zero integer of at most 2^20")
    return Perturbation(name, index, ulps)


def parse_promote(text: str) -> tuple[str, ...]:
    """``--promote``: a comma list of PROMOTABLE operations (``none``: nothing), in PROMOTABLE's order."""
    tokens = [t.strip().lower() for t in text.split(",")]
    if tokens == ["none"]:
        return ()
    unknown = [t for t in tokens if t not in PROMOTABLE]
    if unknown or not tokens:
        raise UsageError(f"--promote {text!r}: expected a comma list of {', '.join(PROMOTABLE)} (or none)")
    if {"bn", "bn-stats"} <= set(tokens):
        raise UsageError(f"--promote {text!r}: bn already promotes BN's statistics; give bn or bn-stats")
    return tuple(op for op in PROMOTABLE if op in tokens)


def promote_text(ops: tuple[str, ...]) -> str:
    """Promoted operations as people and folder names read them: ``bn+loss``, or ``none``."""
    return "+".join(ops) or "none"


@dataclasses.dataclass(frozen=True)
class Controls:
    """The numerics a run asks for."""

    dtype: str = "float32"
    """float32, float64, bfloat16 (pure) or bf16-mixed (float32 masters, bf16 autocast)."""
    threads: int = 1
    """Intra-op threads, and the OpenMP / MKL pool sizes."""
    isa: str = "native"
    """Instruction-set cap applied to every dispatcher; native = no cap."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms and oneDNN's deterministic flag."""
    onednn_isa: str | None = None
    """Override of ONEDNN_MAX_CPU_ISA alone (a lever of its own in matrix sweeps)."""
    mkl_cbwr: str | None = None
    """Override of MKL_CBWR alone ("none" removes it), e.g. "COMPATIBLE" or "AVX2,STRICT"."""
    cpu_model: str | None = None
    """qemu-x86_64 CPU model to emulate; None runs natively."""
    promote: tuple[str, ...] = ()
    """Operations computed in float64 and rounded once to the run's dtype (``parse_promote``)."""
    numpy_disable: str | None = None
    """NPY_DISABLE_CPU_FEATURES: numpy dispatch targets switched off (``parse_numpy_disable``)."""
    openblas_coretype: str | None = None
    """OPENBLAS_CORETYPE: the kernel set OpenBLAS uses instead of the one it detects."""
    dynamic_threads: bool = False
    """OMP_DYNAMIC and MKL_DYNAMIC: let OpenMP and MKL use fewer threads than asked (off: the pools are fixed)."""
    kmp_deterministic_reduction: bool = False
    """KMP_DETERMINISTIC_REDUCTION: Intel OpenMP's reductions in a fixed order (refused under GNU OpenMP)."""
    flush_denormal: bool = False
    """torch.set_flush_denormal: subnormal inputs and results flushed to zero (FTZ/DAZ)."""

    def label(self) -> str:
        """A short, filesystem-safe name of this configuration."""
        parts = [self.dtype, f"t{self.threads}", self.isa, "det" if self.deterministic else "nondet"]
        if self.onednn_isa:
            parts.append(f"onednn-{self.onednn_isa.lower()}")
        if self.mkl_cbwr:
            parts.append("cbwr-" + self.mkl_cbwr.lower().replace(",", "-"))
        if self.cpu_model:
            parts.append(f"cpu-{self.cpu_model}")
        if self.promote:
            parts.append(f"promote-{promote_text(self.promote)}")
        if self.numpy_disable:
            parts.append("npy-off-" + self.numpy_disable.lower().replace(" ", "-"))
        if self.openblas_coretype:
            parts.append(f"openblas-{self.openblas_coretype.lower()}")
        switches = (("dynamic", self.dynamic_threads), ("kmp-detred", self.kmp_deterministic_reduction),
                    ("ftz", self.flush_denormal))
        parts += [name for name, on in switches if on]
        return "_".join(parts)

    def to_json(self) -> dict[str, Any]:
        """The controls as records, fingerprints and plans write them: ``promote`` and the dispatch controls
        only when they ask for something, so that files of runs without them are as they were before they existed."""
        d: dict[str, Any] = dataclasses.asdict(self)
        if self.promote:
            d["promote"] = list(self.promote)
        else:
            del d["promote"]
        for name in DISPATCH_FIELDS:
            if d[name] == getattr(Controls, name):
                del d[name]
        return d

    @property
    def storage(self) -> str:
        return STORAGE_DTYPE[self.dtype]

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Controls:
        """The controls a record or fingerprint says it asked for, validated field by field."""
        if not isinstance(raw, dict) or set(raw) - {f.name for f in dataclasses.fields(cls)}:
            raise InputError(f"{where}: config.controls is malformed")
        values = {**dataclasses.asdict(cls()), **raw}
        promote = values["promote"]
        ok = (values["dtype"] in DTYPES and values["isa"] in ISAS
              and isinstance(promote, (list, tuple)) and all(isinstance(op, str) for op in promote)
              and list(promote) == [op for op in PROMOTABLE if op in promote]
              and not {"bn", "bn-stats"} <= set(promote) and (not promote or values["dtype"] in PROMOTING_DTYPES)
              and isinstance(values["threads"], int) and not isinstance(values["threads"], bool)
              and 1 <= values["threads"] <= 4096 and isinstance(values["deterministic"], bool)
              and all(values[k] is None or (isinstance(values[k], str) and 0 < len(values[k]) <= 64)
                      for k in ("onednn_isa", "mkl_cbwr", "cpu_model", "numpy_disable"))
              and (values["openblas_coretype"] is None or values["openblas_coretype"] in OPENBLAS_CORETYPES)
              and all(isinstance(values[k], bool)
                      for k in ("dynamic_threads", "kmp_deterministic_reduction", "flush_denormal")))
        if not ok:
            raise InputError(f"{where}: config.controls holds a value out of range")
        return cls(**{**values, "promote": tuple(promote)})


def from_options(*, promote: str | None = None, numpy_disable: str | None = None,
                 openblas_coretype: str | None = None, **fields: Any) -> Controls:
    """The controls ``bnaudit run`` and ``api.run`` ask for: the text options parsed, the others as given."""
    return Controls(**fields, promote=() if promote is None else parse_promote(promote),
                    numpy_disable=None if numpy_disable is None else parse_numpy_disable(numpy_disable),
                    openblas_coretype=None if openblas_coretype is None else parse_openblas_coretype(openblas_coretype))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run request: controls plus what to run and record."""

    controls: Controls
    """The numerics."""
    epochs: int
    """Epochs to run (a prefix of the spec's schedule)."""
    perturb: Perturbation | None = None
    """An initial-state element moved by some ulps (the chaos floor), or None."""
    trace_epochs: tuple[int, ...] = (0,)
    """Epochs whose every step is digested tensor by tensor (epoch 0 always)."""
    audit_every: int = 10
    """Operator audit (mpmath recomputation of each layer on the run's own values) every N epochs; 0 = off."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "controls": self.controls.to_json(),
            "epochs": self.epochs,
            "perturb": None if self.perturb is None else {
                "tensor": self.perturb.tensor, "index": list(self.perturb.index), "ulps": self.perturb.ulps},
            "trace_epochs": list(self.trace_epochs),
            "audit_every": self.audit_every,
        }

    @classmethod
    def requested(cls, spec: ExperimentSpec, controls: Controls, *, epochs: int | None = None,
                  perturb: str | None = None, trace_epochs: tuple[int, ...] = (),
                  audit_every: int = 10) -> RunConfig:
        """What ``bnaudit run`` (and ``bnaudit.api.run``) asks for: the spec's epochs unless given,
        ``perturb`` parsed against the spec's tensors, epoch 0 always traced."""
        return cls(controls=controls, epochs=spec.train.epochs if epochs is None else epochs,
                   perturb=None if perturb is None else parse_perturbation(perturb, spec),
                   trace_epochs=tuple(sorted({*trace_epochs, 0})), audit_every=audit_every)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        p = raw.get("perturb")
        return cls(
            controls=Controls.from_json(raw["controls"], "config"),
            epochs=int(raw["epochs"]),
            perturb=None if p is None else Perturbation(
                str(p["tensor"]), tuple(int(i) for i in p["index"]), int(p["ulps"])),
            trace_epochs=tuple(int(e) for e in raw.get("trace_epochs", (0,))),
            audit_every=int(raw.get("audit_every", 10)),
        )


def validate(config: RunConfig, spec: ExperimentSpec, *, check_cpu: bool = True) -> None:
    """Reject requests that are malformed or that this CPU cannot honour (exit code 2)."""
    c = config.controls
    if c.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {c.dtype!r}; choose from {', '.join(DTYPES)}")
    if c.isa not in ISAS:
        raise UsageError(f"unknown ISA {c.isa!r}; choose from {', '.join(ISAS)}")
    if c.promote and c.dtype not in PROMOTING_DTYPES:
        raise UsageError(f"--promote needs --dtype float32 or bfloat16, not {c.dtype}: "
                         + ("float64 is what promotion computes in" if c.dtype == "float64"
                            else "under bf16-mixed, autocast already chooses each operation's precision"))
    if not 1 <= c.threads <= 1024:
        raise UsageError(f"--threads must be between 1 and 1024, got {c.threads}")
    if c.onednn_isa is not None and c.onednn_isa.upper() not in ONEDNN_ISAS:
        raise UsageError(f"unknown oneDNN ISA {c.onednn_isa!r}; choose from {', '.join(ONEDNN_ISAS)}")
    if c.mkl_cbwr is not None and c.mkl_cbwr.lower() != "none":
        branch, _, strict = c.mkl_cbwr.upper().partition(",")
        if branch not in MKL_CBWR_BRANCHES or strict not in ("", "STRICT"):
            raise UsageError(f"unknown MKL_CBWR value {c.mkl_cbwr!r}; e.g. COMPATIBLE, AVX2, AVX2,STRICT")
    if c.numpy_disable is not None and parse_numpy_disable(c.numpy_disable) != c.numpy_disable:
        raise UsageError(f"--numpy-disable {c.numpy_disable!r}: expected {parse_numpy_disable(c.numpy_disable)!r}")
    if c.openblas_coretype is not None:
        parse_openblas_coretype(c.openblas_coretype)
    if not 1 <= config.epochs <= spec.train.epochs:
        raise UsageError(f"--epochs must be between 1 and the spec's {spec.train.epochs}, got {config.epochs}")
    if config.audit_every < 0:
        raise UsageError("--audit-every must be >= 0 (0 turns the operator audit off)")
    bad = [e for e in config.trace_epochs if not 0 <= e < config.epochs]
    if bad:
        raise UsageError(f"--trace-epochs {bad} outside the run's epochs 0..{config.epochs - 1}")
    _check_record_size(spec, config)
    if check_cpu and c.cpu_model is None and c.isa != "native":
        supported = envinfo.supported_isas()
        if c.isa not in supported:
            raise UsageError(
                f"this CPU cannot run --isa {c.isa} (it supports {', '.join(supported)}); "
                "use --cpu-model to emulate another CPU"
            )
    if check_cpu and c.cpu_model is not None and c.isa != "native":
        from bnaudit import emulate

        supported = envinfo.supported_isas(emulate.model_features(c.cpu_model))
        if c.isa not in supported:
            why = "; qemu emulates no AVX-512" if c.isa == "avx512" else ""
            raise UsageError(f"the emulated CPU {c.cpu_model} cannot run --isa {c.isa} (under qemu it supports "
                             f"{', '.join(supported)}{why})")


def _check_record_size(spec: ExperimentSpec, config: RunConfig) -> None:
    """Refuse, before any work, a run whose record no bnaudit command could load back."""
    from bnaudit.fileio import MAX_JSON_BYTES, MAX_NPY_BYTES
    from bnaudit.layout import estimated_bytes

    sizes = estimated_bytes(spec, config.epochs, config.controls.storage)
    for name, size in sizes.items():
        limit = MAX_JSON_BYTES if name.endswith(".json") else MAX_NPY_BYTES
        if size > limit:
            raise UsageError(f"a {config.epochs}-epoch run of this spec would write a {name} of "
                             f"{size / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB bnaudit loads; "
                             "use fewer epochs or a smaller network")


def child_environment(controls: Controls, base: dict[str, str]) -> dict[str, str]:
    """The environment a run's process starts with: inherited controls removed, ours set."""
    env = envinfo.uncontrolled(base)
    n = str(controls.threads)
    dynamic = "TRUE" if controls.dynamic_threads else "FALSE"
    env.update({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
                "OMP_DYNAMIC": dynamic, "MKL_DYNAMIC": dynamic})
    # Idle OpenMP threads sleep instead of spinning: no effect on how work is split (so
    # none on the bits), but several multi-threaded runs side by side (matrix -j N) no
    # longer starve each other.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.update(ISA_ENVIRONMENT[controls.isa])
    if controls.onednn_isa:
        env["ONEDNN_MAX_CPU_ISA"] = controls.onednn_isa.upper()
    if controls.mkl_cbwr:
        if controls.mkl_cbwr.lower() == "none":
            env.pop("MKL_CBWR", None)
        else:
            env["MKL_CBWR"] = controls.mkl_cbwr.upper()
    if controls.cpu_model:
        env["BNAUDIT_CPU_MODEL"] = controls.cpu_model
    if controls.numpy_disable:
        env["NPY_DISABLE_CPU_FEATURES"] = controls.numpy_disable
    if controls.openblas_coretype:
        env["OPENBLAS_CORETYPE"] = controls.openblas_coretype
    if controls.kmp_deterministic_reduction:
        env["KMP_DETERMINISTIC_REDUCTION"] = "TRUE"
    return env


def apply(controls: Controls, torch: ModuleType) -> None:
    """Set what torch lets a process set at run time (call right after importing torch)."""
    torch.set_num_threads(controls.threads)
    try:
        torch.set_num_interop_threads(controls.threads)
    except RuntimeError:
        pass  # already started: read back and checked below
    torch.use_deterministic_algorithms(controls.deterministic)
    torch.backends.mkldnn.set_flags(_deterministic=controls.deterministic)
    torch.set_flush_denormal(controls.flush_denormal)
    from threadpoolctl import threadpool_limits

    threadpool_limits(controls.threads, user_api="blas")  # numpy's OpenBLAS, as OPENBLAS_NUM_THREADS asks


def readback(torch: ModuleType) -> dict[str, Any]:
    """What actually took effect in this process."""
    from threadpoolctl import threadpool_info

    keys = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "architecture")
    pools = [{k: p[k] for k in keys if p.get(k) is not None} for p in threadpool_info()]
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "threadpools": sorted(pools, key=lambda p: (p.get("user_api", ""), p.get("prefix", ""))),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "mkldnn_deterministic": bool(torch._C._get_mkldnn_deterministic()),
        "numpy_dispatch": _numpy_dispatch(),
        "omp_dynamic": _omp_dynamic(),
        "flush_denormal": _flushes_denormals(torch),
    }


def _numpy_dispatch() -> list[str]:
    """The dispatch targets numpy's kernels run now (``__cpu_targets_info__``), e.g. ["X86_V3", "baseline(X86_V2)"]."""
    info = getattr(_umath(), "__cpu_targets_info__", {})
    return sorted({str(t.get("current")) for kernels in info.values() for t in kernels.values()})


def _omp_dynamic() -> bool | None:
    """omp_get_dynamic() of the OpenMP runtime torch loaded (None: no OpenMP pool, or no such symbol)."""
    import ctypes

    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "openmp":
            try:
                return bool(ctypes.CDLL(pool["filepath"]).omp_get_dynamic())
            except (OSError, AttributeError):
                return None
    return None


def _flushes_denormals(torch: ModuleType) -> bool:
    """Whether this process flushes subnormals: the smallest float32 subnormal times one, computed."""
    tiny = torch.tensor([1.401298464324817e-45], dtype=torch.float32)
    return bool((tiny * torch.tensor([1.0]))[0].item() == 0.0)


def openmp_runtime(effective: dict[str, Any]) -> str | None:
    """The OpenMP runtime's library prefix (libgomp, libiomp, libomp) in a read-back, or None."""
    return next((str(p.get("prefix")) for p in effective.get("threadpools", []) if p.get("user_api") == "openmp"),
                None)


def unverified(controls: Controls) -> list[str]:
    """What a run asks for that no library of it exposes for read-back (recorded, never assumed)."""
    out = []
    if controls.dynamic_threads:
        out.append("MKL_DYNAMIC=TRUE: MKL is linked into torch without mkl_get_dynamic; OMP_DYNAMIC is read back")
    if controls.kmp_deterministic_reduction:
        out.append("KMP_DETERMINISTIC_REDUCTION=TRUE: Intel OpenMP has no call that reports it")
    return out


def verify(controls: Controls, effective: dict[str, Any]) -> None:
    """Fail if the process did not get what the controls asked for."""
    want = EXPECTED_CAPABILITY.get(controls.isa)
    if want is not None and effective["cpu_capability"] != want:
        raise UsageError(
            f"--isa {controls.isa} asked for capability {want} but torch runs {effective['cpu_capability']} "
            "(this CPU cannot honour it)"
        )
    if effective["intra_op_threads"] != controls.threads:
        raise UsageError(f"asked for {controls.threads} threads, torch uses {effective['intra_op_threads']}")
    if effective["deterministic_algorithms"] != controls.deterministic:
        raise UsageError("the deterministic-algorithms flag did not take effect")
    for pool in effective.get("threadpools", []):
        if pool.get("internal_api") == "openblas" and pool.get("num_threads") != controls.threads:
            raise UsageError(f"asked for {controls.threads} threads, OpenBLAS uses {pool.get('num_threads')}")
    _verify_dispatch(controls, effective)


def _verify_dispatch(controls: Controls, effective: dict[str, Any]) -> None:
    """The dispatch controls took effect, as far as the process can tell (``unverified``: where it cannot)."""
    if controls.numpy_disable:
        running = {t.removeprefix("baseline(").rstrip(")") for t in effective.get("numpy_dispatch", ())}
        still = sorted(running & set(controls.numpy_disable.split()))
        if still:
            raise UsageError(f"NPY_DISABLE_CPU_FEATURES={controls.numpy_disable} asked, but numpy still dispatches "
                             f"to {', '.join(still)} (a baseline target cannot be switched off)")
    if controls.openblas_coretype:
        cores = [p.get("architecture") for p in effective.get("threadpools", [])
                 if p.get("internal_api") == "openblas"]
        if not cores:
            raise UsageError(f"OPENBLAS_CORETYPE={controls.openblas_coretype}: this process loads no OpenBLAS")
        if any(str(c).lower() != controls.openblas_coretype.lower() for c in cores):
            raise UsageError(f"OPENBLAS_CORETYPE={controls.openblas_coretype} asked, but OpenBLAS runs core "
                             f"{', '.join(map(str, cores))} (an alias, or a core this CPU cannot run)")
    if effective.get("omp_dynamic") is not None and effective["omp_dynamic"] != controls.dynamic_threads:
        raise UsageError(f"OMP_DYNAMIC={'TRUE' if controls.dynamic_threads else 'FALSE'} did not take effect")
    runtime = openmp_runtime(effective)
    if controls.kmp_deterministic_reduction and runtime not in ("libiomp", "libomp"):
        raise UsageError(f"--kmp-deterministic-reduction: this torch's OpenMP runtime is {runtime or 'none'}, "
                         "which does not read KMP_DETERMINISTIC_REDUCTION (Intel and LLVM OpenMP do)")
    flushes = bool(effective.get("flush_denormal", False))
    if flushes != controls.flush_denormal:
        raise UsageError(f"flush-to-zero {'on' if controls.flush_denormal else 'off'} asked, but this process "
                         f"{'flushes' if flushes else 'keeps'} subnormals")
