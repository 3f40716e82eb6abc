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

# Inherited variables that would silently change a run; the child gets only ours.
CONTROLLED_PREFIXES = ("ATEN_", "ONEDNN_", "DNNL_", "MKL", "OMP_", "KMP_", "GOMP_", "BNAUDIT_CPU_MODEL")


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
        return "_".join(parts)

    def to_json(self) -> dict[str, Any]:
        """The controls as records, fingerprints and plans write them: ``promote`` only when it names something,
        so that files of unpromoted runs are as they were before promotion existed."""
        d: dict[str, Any] = dataclasses.asdict(self)
        if self.promote:
            d["promote"] = list(self.promote)
        else:
            del d["promote"]
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
                      for k in ("onednn_isa", "mkl_cbwr", "cpu_model")))
        if not ok:
            raise InputError(f"{where}: config.controls holds a value out of range")
        return cls(**{**values, "promote": tuple(promote)})


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
    env = {k: v for k, v in base.items() if not k.startswith(CONTROLLED_PREFIXES)}
    n = str(controls.threads)
    env.update({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"})
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
    }


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
