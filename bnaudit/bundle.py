"""``compare --bundle DIR``: the operation where two runs' training parts, as a standalone reproducer.

When two runs first part at one forward operation of the first traced step, that
operation's inputs are identical in both (every tensor before it matched) and both runs
recorded them exactly (``firststep``).  The bundle holds them as ``.npy`` files, the
operation and its constants, both runs' settings (the numerics environment variables
``controls.child_environment`` sets, threads, determinism, dtype) and the digests both
runs recorded for its outputs, with ``reproduce.py`` (``bnaudit.reproducer``, needing only
numpy and torch).  Run with each side's settings on each machine (or emulated CPU), it
prints whose bits the operation computes there: when each machine reproduces its own
run's digest, this operation alone explains the split, which is what an upstream bug
report needs.

Operations a bundle can hold: a Linear layer, a BatchNorm layer in training mode (its
output and running statistics) and the MSE loss.  A split in the backward pass or the
update, or later than the first step, is refused with one line (exit 2): inside later
steps only digests exist, so there are no inputs to export.

numpy only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import controls, firststep
from bnaudit.compare import PairComparison
from bnaudit.errors import UsageError
from bnaudit.fileio import atomic_folder, npy_bytes, prepare_output
from bnaudit.record import Fingerprint

BUNDLE_SCHEMA = "bnaudit.bundle/1"


def plan(a: Fingerprint, b: Fingerprint, c: PairComparison) -> dict[str, Any]:
    """The operation to export: its kind, layer, inputs (tensor names in the block) and output tensors."""
    d = c.first
    if d is None or d.phase == "eval":
        raise UsageError("--bundle needs runs whose training parts; these "
                         + ("are identical" if d is None else "differ only in the eval pass"))
    if a.first_step is None or b.first_step is None:
        raise UsageError("--bundle needs the exact values of the first traced step, which inputs written by an "
                         "older bnaudit do not carry; run them again")
    if d.granularity != "step" or (d.epoch, d.step) != firststep.FIRST_STEP or d.phase != "forward":
        raise UsageError(f"--bundle reproduces one forward operation of the first step (epoch 1, step 1); "
                         f"these runs first part at {d.where}")
    modules = a.spec.modules()
    names = [n for n, _ in modules]
    kind = dict(modules).get(d.layer, "loss" if d.layer == "loss" else "?")
    before = "input" if d.layer == names[0] else f"{names[names.index(d.layer) - 1]}.out" if d.layer in names \
        else f"{names[-1]}.out"
    if kind == "linear":
        return {"op": "linear", "layer": d.layer, "outputs": [f"{d.layer}.out"],
                "inputs": {"input": before, "weight": f"initial.{d.layer}.weight",
                           "bias": f"initial.{d.layer}.bias"}, "parameters": ["weight", "bias"]}
    if kind == "bn":
        return {"op": "batch_norm", "layer": d.layer,
                "outputs": [f"{d.layer}.out", f"{d.layer}.running_mean", f"{d.layer}.running_var"],
                "inputs": {"input": before, "weight": f"initial.{d.layer}.weight",
                           "bias": f"initial.{d.layer}.bias", "running_mean": f"initial.{d.layer}.running_mean",
                           "running_var": f"initial.{d.layer}.running_var"}, "parameters": ["weight", "bias"],
                "eps": a.spec.model.bn_eps, "momentum": a.spec.model.bn_momentum}
    if kind == "loss":
        return {"op": "mse_loss", "layer": "loss", "outputs": ["loss"],
                "inputs": {"input": before, "target": "target"}, "parameters": []}
    raise UsageError(f"--bundle cannot reproduce {d.tensor} alone (a {kind} layer)")


def _side(fp: Fingerprint, outputs: list[str]) -> dict[str, Any]:
    ctl = fp.controls
    hit = np.flatnonzero((fp.step_rows[:, 0] == 0) & (fp.step_rows[:, 1] == 0))
    digests = dict(zip((t.key for t in fp.step_tensors), fp.step_digests[int(hit[0])]))
    return {"label": fp.label, "source": fp.source, "dtype": ctl.dtype, "threads": ctl.threads,
            "deterministic": ctl.deterministic, "environment": controls.child_environment(ctl, {}),
            "emulated_cpu_model": fp.environment.get("emulated_cpu_model"),
            "digests": {k: format(int(digests[k]), "016x") for k in outputs}}


def export(a: Fingerprint, b: Fingerprint, c: PairComparison, out: Path, *, force: bool = False) -> Path:
    """Write the bundle folder (atomically); refuse with UsageError when the split cannot be exported."""
    p = plan(a, b, c)
    blobs: dict[str, bytes] = {}
    inputs: dict[str, Any] = {}
    for name, key in p["inputs"].items():
        got_a, got_b = a.first_step.get(key), b.first_step.get(key)  # type: ignore[union-attr]
        if got_a is None or got_b is None:
            raise UsageError(f"--bundle: the first-step values lack {key}")
        if got_a[1] != got_b[1] or got_a[0].tobytes() != got_b[0].tobytes():
            raise UsageError(f"--bundle: the input {key} of {p['layer']} differs between the runs, so the split "
                             "is not this operation's alone")
        blobs[f"{name}.npy"] = npy_bytes(got_a[0])
        inputs[name] = {"file": f"{name}.npy", "dtype": got_a[1], "shape": list(got_a[0].shape), "tensor": key}
    side_a, side_b = _side(a, p["outputs"]), _side(b, p["outputs"])
    doc = {"schema": BUNDLE_SCHEMA, "op": p["op"], "layer": p["layer"], "split": c.first.where,  # type: ignore
           "inputs": inputs, "parameters": p["parameters"], "eps": p.get("eps"), "momentum": p.get("momentum"),
           "controlled_prefixes": list(controls.CONTROLLED_PREFIXES),
           "controlled_names": list(controls.CONTROLLED_NAMES),
           "expected": {k: {"a": side_a["digests"][k], "b": side_b["digests"][k]} for k in p["outputs"]},
           "sides": {"a": side_a, "b": side_b}}
    from bnaudit import reproducer  # the script is copied, not run

    script = Path(reproducer.__file__).read_text(encoding="utf-8")
    prepare_output(out, force=force, kind="bundle")
    with atomic_folder(out, "bundle") as tmp:
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        (tmp / "reproduce.py").write_text(script, encoding="utf-8")
        (tmp / "README.txt").write_text(readme(doc), encoding="utf-8")
        (tmp / "bundle.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def commands(doc: dict[str, Any]) -> list[str]:
    """The command that reproduces each side, on its own (emulated) CPU."""
    out = []
    for name, side in doc["sides"].items():
        model = side.get("emulated_cpu_model")
        # qemu-user runs an ELF binary, not a launcher script (pyenv's, a venv's): ask Python for its own.
        python = "\"$(python3 -c 'import sys; print(sys.executable)')\""
        prefix = f"qemu-x86_64 -cpu {model} {python}" if model else "python3"
        out.append(f"{prefix} reproduce.py {name}    # run {name}: {side['label']}")
    return out


def readme(doc: dict[str, Any]) -> str:
    lines = [f"The operation where two bnaudit runs' training parts: {doc['op']} of {doc['layer']}.",
             f"Split: {doc['split']}.", "",
             "Its inputs are identical in both runs; run it with each run's settings on that run's machine:", ""]
    lines += ["    " + c for c in commands(doc)]
    lines += ["", "Each prints the digest of every output and whose it is (a, b or neither); the exit status is 0",
              "when it matches the run whose settings it used.  Needs Python with numpy and torch.", ""]
    for k, e in doc["expected"].items():
        lines.append(f"    {k}: run a {e['a']}, run b {e['b']}")
    return "\n".join(lines) + "\n"
