"""Reproduce one operation of a bnaudit run on this machine, and say whose bits it computes.

This file is copied, as it is, into the folder ``bnaudit compare A B --bundle DIR``
writes, as ``DIR/reproduce.py``.  It needs Python, numpy and torch (no bnaudit):

    python reproduce.py a       # the operation with run a's settings
    python reproduce.py b       # ... with run b's
    qemu-x86_64 -cpu MODEL "$(python3 -c 'import sys; print(sys.executable)')" reproduce.py b    # on an emulated CPU

``bundle.json`` holds the operation, its inputs (``.npy`` files beside it, identical
in both runs), both runs' settings and the digests both runs recorded for its outputs.
The settings' environment variables are set before torch loads (threads, instruction-
set caps); then the operation runs once and each output's digest (the first 64 bits of
sha256 of its raw bytes, as bnaudit's records hold them) is printed with the run it
matches.  Exit status 0 when the output matches the asked run's, 1 when it does not,
2 for a bad invocation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def digest(data: bytes) -> str:
    value = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    return format(value or 1, "016x")


def tensor(torch, np, spec):  # torch and numpy as main imported them, after the settings
    values = np.load(HERE / spec["file"], allow_pickle=False)
    if spec["dtype"] == "bfloat16":
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(values.copy())


def operation(torch, bundle, inputs):
    """The operation's outputs, by the names the runs traced them under."""
    F = torch.nn.functional
    op, layer = bundle["op"], bundle["layer"]
    if op == "linear":
        return {f"{layer}.out": F.linear(inputs["input"], inputs["weight"], inputs["bias"])}
    if op == "batch_norm":
        mean, var = inputs["running_mean"].clone(), inputs["running_var"].clone()
        out = F.batch_norm(inputs["input"], mean, var, inputs["weight"], inputs["bias"], True,
                           bundle["momentum"], bundle["eps"])
        return {f"{layer}.out": out, f"{layer}.running_mean": mean, f"{layer}.running_var": var}
    if op == "mse_loss":
        return {"loss": F.mse_loss(inputs["input"], inputs["target"])}
    raise SystemExit(f"reproduce.py: unknown operation {op!r}")


def main(argv: list[str]) -> int:
    bundle = json.loads((HERE / "bundle.json").read_text(encoding="utf-8"))
    if len(argv) != 2 or argv[1] not in bundle["sides"]:
        print(f"usage: python reproduce.py {'|'.join(bundle['sides'])}", file=sys.stderr)
        return 2
    side = bundle["sides"][argv[1]]
    # Before numpy loads: OpenBLAS reads OPENBLAS_CORETYPE once, when it is loaded, and an
    # inherited one (Haswell, say) would run AVX2 kernels on a CPU without them.
    names = set(bundle.get("controlled_names", ()))
    for key in [k for k in os.environ if k.startswith(tuple(bundle["controlled_prefixes"])) or k in names]:
        del os.environ[key]
    os.environ.update(side["environment"])

    import numpy as np
    import torch

    torch.set_num_threads(side["threads"])
    torch.use_deterministic_algorithms(side["deterministic"])
    torch.backends.mkldnn.set_flags(_deterministic=side["deterministic"])
    inputs = {name: tensor(torch, np, spec) for name, spec in bundle["inputs"].items()}
    for name in bundle.get("parameters", []):
        inputs[name].requires_grad_(True)
    precision = (torch.autocast("cpu", dtype=torch.bfloat16) if side["dtype"] == "bf16-mixed"
                 else contextlib.nullcontext())
    with precision:
        outputs = operation(torch, bundle, inputs)
    print(f"{bundle['op']} of {bundle['layer']}, settings of run {argv[1]} ({side['label']}), "
          f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    ok = True
    for name, expected in bundle["expected"].items():
        t = outputs[name].detach().contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        got = digest(raw)
        whose = [s for s, d in expected.items() if d == got]
        print(f"  {name}: {got}  " + (f"= run {' and '.join(whose)}" if whose else "matches neither run"))
        ok = ok and argv[1] in whose
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
