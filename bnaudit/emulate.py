"""Run the experiment under ``qemu-x86_64 -cpu MODEL``: every library sees the model's CPUID.

Environment caps (ATEN_CPU_CAPABILITY and friends) only steer the dispatchers that read
them; under qemu-user, MKL, oneDNN, ATen and numpy all dispatch on the emulated CPUID, so
the run takes the code paths a real CPU of that model would.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

from bnaudit.errors import MissingTool, UsageError

QEMU = "qemu-x86_64"

# The seed page's two machines (section "BN - Caution").
PRESETS = {
    "seed-i7": ("Haswell", "Intel Core i7-5930K (Haswell-E: AVX2 + FMA)"),
    "seed-i5": ("IvyBridge", "Intel Core i5-3317U (Ivy Bridge: AVX, no AVX2, no FMA)"),
}

INSTALL_HINT = "install it with `apt-get install qemu-user` (Debian/Ubuntu)"


def qemu_path() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise MissingTool(f"--cpu-model needs {QEMU}, which is not installed; {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def available_models() -> tuple[str, ...]:
    """CPU model names this qemu knows (``qemu-x86_64 -cpu help``)."""
    out = subprocess.run([qemu_path(), "-cpu", "help"], capture_output=True, text=True, timeout=60).stdout
    models = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "x86":
            models.append(parts[1])
    return tuple(models)


def resolve(name: str) -> str:
    """A preset or qemu model name, checked against this qemu."""
    model = PRESETS[name][0] if name in PRESETS else name
    models = available_models()
    if model not in models:
        raise UsageError(f"unknown CPU model {name!r}; see `{QEMU} -cpu help` or use a preset ({', '.join(PRESETS)})")
    return model


def wrap(argv: list[str], name: str) -> list[str]:
    """Prefix a command so it runs under the emulated CPU model."""
    return [qemu_path(), "-cpu", resolve(name), *argv]
