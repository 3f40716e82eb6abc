"""The environment snapshot: the one place that reads os.environ, platform and versions.

CPU features come from CPUID as numpy sees it (``__cpu_features__``), not from
/proc/cpuinfo: under ``qemu-x86_64 -cpu MODEL`` /proc/cpuinfo still shows the host,
while CPUID, which is what MKL, oneDNN and ATen dispatch on, shows the emulated model.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# Environment variables that can change numerics or threading, by prefix or name.
NUMERICS_PREFIXES = ("ATEN_", "ONEDNN_", "DNNL_", "MKL", "OMP_", "KMP_", "GOMP_", "OPENBLAS_", "BNAUDIT_", "TORCH_",
                     "NNPACK", "NPY_")
NUMERICS_NAMES = ("LD_PRELOAD", "LD_LIBRARY_PATH", "GLIBC_TUNABLES", "CUBLAS_WORKSPACE_CONFIG", "PYTORCH_JIT")

# CPUID features that decide which kernels the libraries pick.
ISA_FEATURES = ("SSE41", "SSE42", "AVX", "F16C", "FMA3", "AVX2", "AVX512F", "AVX512CD", "AVX512BW",
                "AVX512DQ", "AVX512VL", "AVX512VNNI", "AVX512BF16", "AVX512FP16", "AMX_BF16", "AMX_TILE")

# What each --isa level needs from the CPU (ATen's own requirements for its kernels).
ISA_REQUIREMENTS = {
    "default": (),
    "avx2": ("AVX2", "FMA3"),
    "avx512": ("AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL"),
}


VARIABLES = {
    "BNAUDIT_CACHE": "where custom specs' frozen inputs and references are made (default $XDG_CACHE_HOME/bnaudit, "
                     "else ~/.cache/bnaudit)",
    "XDG_CACHE_HOME": "the user's cache folder, used when BNAUDIT_CACHE is unset",
    "BNAUDIT_REFERENCE_DIR": "a folder with frozen/ and mpmath/ to use instead of the shipped data",
    "BNAUDIT_SIGNING_KEY": "the secret that signs baselines and makes check refuse unsigned ones (never recorded)",
    "BNAUDIT_DEBUG": "show the traceback of an internal error",
    "GITHUB_STEP_SUMMARY": "check appends its verdict table to this file (set by GitHub Actions)",
    "GITHUB_ACTIONS": "'true': errors and failed checks are also printed as ::error annotations",
    "BNAUDIT_HOST_CPU_MODEL": "in a dask worker's environment: the qemu CPU model that host stands for (its runs "
                              "are made under it)",
}
"""Every environment variable bnaudit reads for itself, and what it does (README and ``bnaudit --help`` list them).

The numerics variables a run records or sets (``NUMERICS_PREFIXES``, ``NUMERICS_NAMES``,
``controls.CONTROLLED_PREFIXES``) are another list: bnaudit passes them to runs, it does
not act on them.  ``BNAUDIT_CPU_MODEL`` is set by bnaudit for an emulated run's process."""


CONTROLLED_PREFIXES = ("ATEN_", "ONEDNN_", "DNNL_", "MKL", "OMP_", "KMP_", "GOMP_", "BNAUDIT_CPU_MODEL")
"""Inherited variables that would silently change a run: a run's process gets only bnaudit's."""
CONTROLLED_NAMES = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OPENBLAS_DEFAULT_NUM_THREADS",
                    "NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES")
"""... and of OpenBLAS's and numpy's variables, the ones bnaudit sets (the others, such as
OPENBLAS_VERBOSE, reach the run and are recorded: a machine may need them)."""


def uncontrolled(base: dict[str, str]) -> dict[str, str]:
    """``base`` without the variables bnaudit controls (``CONTROLLED_PREFIXES``, ``CONTROLLED_NAMES``).

    An inherited OPENBLAS_CORETYPE=Haswell, say, makes OpenBLAS run AVX2 kernels under an
    emulated CPU without AVX2: an illegal instruction instead of the model's own kernels.
    """
    return {k: v for k, v in base.items() if not k.startswith(CONTROLLED_PREFIXES) and k not in CONTROLLED_NAMES}


def environ() -> dict[str, str]:
    """A copy of the process environment (for building a child's environment)."""
    return dict(os.environ)


def reference_dir() -> str | None:
    """``BNAUDIT_REFERENCE_DIR``: where the shipped ``reference/`` data lives, if moved."""
    return os.environ.get("BNAUDIT_REFERENCE_DIR") or None


def cache_dir() -> str | None:
    """``BNAUDIT_CACHE``: where custom specs' frozen inputs and references are cached."""
    return os.environ.get("BNAUDIT_CACHE") or None


def xdg_cache_home() -> str | None:
    """``XDG_CACHE_HOME``: the user's cache folder (the XDG base directory rule), if set."""
    value = os.environ.get("XDG_CACHE_HOME")
    return value if value and os.path.isabs(value) else None  # the spec: a relative path is ignored


def signing_key() -> bytes | None:
    """``BNAUDIT_SIGNING_KEY``: the secret that signs and checks baselines (a CI secret), or None."""
    value = os.environ.get("BNAUDIT_SIGNING_KEY")
    return value.encode("utf-8") if value else None


def github_actions() -> bool:
    """``GITHUB_ACTIONS=true``: running as a GitHub Actions step (errors become annotations too)."""
    return os.environ.get("GITHUB_ACTIONS") == "true"


def debug() -> bool:
    """``BNAUDIT_DEBUG``: show tracebacks of internal errors."""
    return bool(os.environ.get("BNAUDIT_DEBUG"))


SECRETS = ("BNAUDIT_SIGNING_KEY",)
"""Variables never recorded anywhere (records, fingerprints, ``bnaudit env``, test headers)."""


def numerics_environment() -> dict[str, str]:
    """The environment variables that can change numerics or threading, sorted (secrets left out)."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if (k.startswith(NUMERICS_PREFIXES) or k in NUMERICS_NAMES) and k not in SECRETS
    }


def cpu_features() -> dict[str, bool]:
    """CPUID features as numpy's runtime dispatcher detected them."""
    try:
        from numpy._core import _multiarray_umath as umath  # type: ignore[attr-defined]  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import _multiarray_umath as umath
    return {k: bool(v) for k, v in umath.__cpu_features__.items()}


def supported_isas(features: dict[str, bool] | None = None) -> list[str]:
    """The --isa levels this CPU can honour, lowest first."""
    features = cpu_features() if features is None else features
    return [isa for isa, needs in ISA_REQUIREMENTS.items() if all(features.get(f, False) for f in needs)]


def cpu_model() -> str:
    """The host CPU's model name (under emulation this is the host, see ``emulated_model``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_vendor() -> str:
    """The host CPU's CPUID vendor (GenuineIntel, AuthenticAMD, ...), from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip() or "unknown"
    except OSError:
        pass
    return "unknown"


def host_cpu_model() -> str | None:
    """BNAUDIT_HOST_CPU_MODEL: the qemu CPU model a cluster host stands for (``bnaudit.cluster``), or None."""
    return os.environ.get("BNAUDIT_HOST_CPU_MODEL", "").strip() or None


def emulated_model() -> str | None:
    """The qemu CPU model this process runs under, as set by bnaudit's launcher."""
    return os.environ.get("BNAUDIT_CPU_MODEL") or None


def torch_build(torch: ModuleType) -> dict[str, str]:
    """Library versions inside the torch build: MKL, oneDNN, OpenMP, compiler."""
    text = torch.__config__.show()
    found = {}
    patterns = {
        "mkl": r"Math Kernel Library Version ([^\s]+)",
        "onednn": r"MKL-DNN v([^\s]+)",
        "openmp": r"OpenMP (\d+)",
        "compiler": r"- (GCC [^\n]+|Clang [^\n]+)",
        "build_cpu_capability": r"CPU capability usage: ([A-Z0-9_]+)",
    }
    for key, pattern in patterns.items():
        m = re.search(pattern, text)
        found[key] = m.group(1).strip() if m else "unknown"
    return found


def python_startup() -> dict[str, Any]:
    """How this interpreter started: isolated or not, and any startup module it ran (with its sha256).

    A ``sitecustomize`` or ``usercustomize`` module runs before any code of bnaudit and
    can change numerics (patch torch, scale a loss); isolated mode keeps out the ones on
    PYTHONPATH and in the user's site, and one installed in site-packages is named here.
    """
    import hashlib

    out: dict[str, Any] = {"isolated": bool(sys.flags.isolated)}
    for name in ("sitecustomize", "usercustomize"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None) if module is not None else None
        if path:
            try:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except OSError:
                digest = None
            out[name] = {"path": path, "sha256": digest}
    return out


def snapshot(torch: ModuleType | None = None) -> dict[str, Any]:
    """Everything about this process that could change the bits of a run."""
    import numpy

    features = cpu_features()
    snap: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "emulated_cpu_model": emulated_model(),
        "machine": platform.machine(),
        "cpu_features": [f for f in ISA_FEATURES if features.get(f)],
        "supported_isas": supported_isas(features),
        "logical_cpus": os.cpu_count(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "numpy": numpy.__version__,
        "environment": numerics_environment(),
        "python_startup": python_startup(),
    }
    if torch is not None:
        snap["torch"] = torch.__version__
        snap["torch_build"] = torch_build(torch)
    return snap
