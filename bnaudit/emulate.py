"""Run the experiment under ``qemu-x86_64 -cpu MODEL``: every library sees the model's CPUID.

Environment caps (ATEN_CPU_CAPABILITY and friends) only steer the dispatchers that read
them; under qemu-user, MKL, oneDNN, ATen and numpy all dispatch on the emulated CPUID, so
the run takes the code paths a real CPU of that model would.  How far the caps get depends
on the host: on an AMD EPYC a native ``--isa default`` run and a run under ``-cpu Nehalem``
(both capability DEFAULT) part already on the initial state, in the first Linear layer's
output; on an Intel Xeon they are bit-identical, because MKL honours
``MKL_ENABLE_INSTRUCTIONS`` on Intel CPUs only (README, "What differs by host").  The caps
are a host-dependent, incomplete model of another CPU; the emulated CPUID is not.

qemu-user is a user-space emulator: the guest is the same Python interpreter binary
(``sys.executable``: a shell shim such as pyenv's cannot be emulated), the same torch,
the same files.  qemu prints "TCG doesn't support requested feature" warnings on stderr
for CPUID bits its translator leaves out (they are about features, e.g. ``pcid``, that
no kernel of this experiment uses); they are harmless and are left alone.

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import shutil
import subprocess

from bnaudit import envinfo
from bnaudit.errors import MissingTool, UsageError

QEMU = "qemu-x86_64"

# What the guest process reads as its emulated model (envinfo.emulated_model).
MODEL_VARIABLE = "BNAUDIT_CPU_MODEL"

# Tokens that mean "no emulation" where a list of CPU models is accepted (bnaudit matrix).
NATIVE_TOKENS = ("native", "none")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named CPU model standing for a real machine."""

    model: str
    """The qemu-x86_64 CPU model name."""
    machine: str
    """The real CPU it stands for."""


# The seed page's two machines (section "BN - Caution").
PRESETS: dict[str, Preset] = {
    "seed-i7": Preset("Haswell", "Intel Core i7-5930K (Haswell-E: AVX2 + FMA)"),
    "seed-i5": Preset("IvyBridge", "Intel Core i5-3317U (Ivy Bridge: AVX, no AVX2, no FMA)"),
}

INSTALL_HINT = "install it with `apt-get install qemu-user` (Debian/Ubuntu) or `dnf install qemu-user` (Fedora)"

# `qemu-x86_64 -cpu help` of qemu 7.2 lists ~185 models; a longer answer is not a model list.
_MAX_HELP_BYTES = 1 << 20


def qemu_path() -> str:
    """The qemu-x86_64 executable on PATH, or MissingTool (exit code 7) with the install hint."""
    path = shutil.which(QEMU)
    if path is None:
        raise MissingTool(f"--cpu-model needs {QEMU} (qemu-user), which is not on PATH; {INSTALL_HINT}")
    return path


def parse_models(help_text: str) -> tuple[str, ...]:
    """CPU model names from the output of ``qemu-x86_64 -cpu help`` (lines ``x86 NAME ...``)."""
    models = []
    for line in help_text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":
            models.append(parts[1])
    return tuple(models)


@functools.lru_cache(maxsize=4)
def _models_of(qemu: str) -> tuple[str, ...]:
    try:
        proc = subprocess.run([qemu, "-cpu", "help"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingTool(f"{qemu} -cpu help failed ({exc}); {INSTALL_HINT}") from None
    # qemu 7.2 exits with status 1 after printing the list: the list, not the status, is the answer.
    models = parse_models(proc.stdout[:_MAX_HELP_BYTES].decode("utf-8", "replace"))
    if not models:
        raise MissingTool(f"{qemu} -cpu help listed no x86 CPU models (exit code {proc.returncode}); is it "
                          f"qemu-user for x86-64? {INSTALL_HINT}")
    return models


def available_models() -> tuple[str, ...]:
    """CPU model names this qemu knows (``qemu-x86_64 -cpu help``)."""
    return _models_of(qemu_path())


def is_native(name: str | None) -> bool:
    """Whether a --cpu-model value means "no emulation"."""
    return name is None or name.strip().lower() in NATIVE_TOKENS


def resolve(name: str) -> str:
    """The qemu model of a preset or model name, checked against this qemu (UsageError, exit 2)."""
    preset = PRESETS.get(name)
    model = preset.model if preset is not None else name
    models = available_models()
    if model in models:
        return model
    # qemu's names are case-sensitive; accept another spelling of a unique model name.
    folded = [m for m in models if m.lower() == model.lower()]
    if len(folded) == 1:
        return folded[0]
    near = difflib.get_close_matches(model, list(models) + list(PRESETS), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise UsageError(f"unknown CPU model {name!r}: {hint}see `{QEMU} -cpu help`, or use a preset "
                     f"({', '.join(f'{k} = {v.model}' for k, v in PRESETS.items())})")


def wrap(argv: list[str], name: str) -> list[str]:
    """Prefix a command so it runs under the emulated CPU model.

    ``-E`` sets the guest's ``BNAUDIT_CPU_MODEL`` to the *resolved* qemu model, so the run's
    environment snapshot and summary name the CPU that was emulated (``Haswell``), while its
    config keeps the name the user gave (``seed-i7``).
    """
    model = resolve(name)
    return [qemu_path(), "-cpu", model, "-E", f"{MODEL_VARIABLE}={model}", *argv]


_FEATURE_PROBE = ("import json\n"
                  "try:\n    from numpy._core import _multiarray_umath as m\n"
                  "except ImportError:\n    from numpy.core import _multiarray_umath as m\n"
                  "print(json.dumps({k: bool(v) for k, v in m.__cpu_features__.items()}))\n")


@functools.cache
def model_features(name: str) -> dict[str, bool]:
    """The CPUID features a program sees under the emulated model, as numpy's dispatcher reads them.

    Measured by running the interpreter itself under qemu (a few seconds, once per model
    and process), since the model's feature list is qemu's own and (for features its
    translator lacks, such as AVX-512) not the model's datasheet.
    """
    import json
    import sys

    argv = wrap([sys.executable, "-I", "-c", _FEATURE_PROBE], name)
    try:
        # The environment a run gets, less bnaudit's own settings: an inherited
        # OPENBLAS_CORETYPE must not pick kernels the model lacks.
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True,
                             env=envinfo.uncontrolled(envinfo.environ())).stdout
        features = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise UsageError(f"cannot read the CPU features of the emulated model {name!r} "
                         f"({type(exc).__name__}); is {QEMU} working?") from None
    if not isinstance(features, dict):
        raise UsageError(f"cannot read the CPU features of the emulated model {name!r}")
    return {str(k): bool(v) for k, v in features.items()}


@dataclasses.dataclass(frozen=True)
class Slowdown:
    """Emulated against native wall time of the same configuration's training loop."""

    emulated_seconds: float
    """train_seconds of the emulated run."""
    native_seconds: float
    """train_seconds of the native run of the same configuration (cpu_model aside)."""

    @property
    def factor(self) -> float:
        """How many times longer the emulated training loop took."""
        return self.emulated_seconds / self.native_seconds if self.native_seconds > 0 else float("inf")
