"""A fleet's own records, solved: which configuration every machine already ran computes alike everywhere.

Where the machines are real hosts (CI runners of several CPU kinds), each runs a matrix of
candidate settings itself (``bnaudit matrix --isa native,default --mkl-cbwr inherit,COMPATIBLE``)
and keeps its folder as an artifact; ``bnaudit solve --records NAME=DIR ...`` reads them back.
Nothing is run: a configuration every machine ran is a candidate, bit-identical on all of them
at the records' length or not, and its cost is the median over machines of its training time
against the settings as they come on the same machine (where a machine has both).  Where no
configuration agrees, the answer is the partition of the one that leaves the fewest classes,
with the CPU features each record's environment names and the vendor its CPU's name gives.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnaudit import compare, record
from bnaudit.controls import Controls
from bnaudit.errors import InputError, UsageError
from bnaudit.matrix import census
from bnaudit.matrix.plan import CONTROL_FIELDS, HOST_NAME
from bnaudit.matrix.solve import (
    Candidate,
    Lever,
    Recipe,
    environment,
    recipe_of,
    recipe_text,
    run_options,
    split_causes,
)
from bnaudit.record import Fingerprint

FLEET_SCHEMA = "bnaudit.solve-records/1"
MAX_RECORDS = 10_000
"""Records and fingerprints read from one fleet (a folder tree holding more is refused)."""


@dataclasses.dataclass(frozen=True)
class FleetSolution:
    """What a real fleet's records say: which of the configurations every machine ran agree everywhere."""

    machines: tuple[str, ...]
    dtype: str
    sources: tuple[tuple[str, str], ...]
    """(machine, folder) of each input."""
    candidates: tuple[Candidate, ...]
    """Every configuration every machine ran, at each length: agreeing ones first, cheapest first."""
    incomplete: tuple[tuple[str, tuple[str, ...]], ...]
    """Configurations some machine lacks: (recipe at its length, the machines without it)."""
    best: str | None
    partition: census.Census | None
    partition_recipe: str | None
    causes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["partition"] = None if self.partition is None else self.partition.to_dict()
        best = next((c for c in self.candidates if c.recipe == self.best), None)
        d["run_options"] = None if best is None else list(best.run_options)
        return d


def parse_source(text: str) -> tuple[str, Path]:
    """``--records [NAME=]DIR``: one machine's records (NAME defaults to the folder's name)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name or text, text
    if not HOST_NAME.match(name):
        raise UsageError(f"--records {text!r}: machine name {name!r}: expected letters, digits, '.', '_' or '-'")
    return name, Path(path)


def _gather(name: str, root: Path) -> list[tuple[str, Fingerprint, float | None]]:
    """Every record (and lone fingerprint file) under ``root``: (machine, fingerprint, training seconds).

    A record made under emulation names its machine ``NAME/MODEL``.  A file that does not load
    is refused (InputError, naming it): a fleet's verdict never rests on the files that happened
    to parse."""
    if not root.is_dir():
        raise UsageError(f"--records {root}: not a folder")
    found: list[tuple[Fingerprint, float | None]] = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        where = Path(here)
        if "record.json" in files:
            rec = record.load_record(where)
            found.append((rec.fingerprint, float(rec.meta["train_seconds"])))
        elif "fingerprint.json" in files:
            found.append((record.read_fingerprint(where / "fingerprint.json"), None))
        if len(found) > MAX_RECORDS:
            raise InputError(f"--records {root}: more than {MAX_RECORDS} records; give one machine's folder")
    if not found:
        raise InputError(f"--records {root}: no record.json or fingerprint.json under it")
    out: list[tuple[str, Fingerprint, float | None]] = []
    for fp, seconds in found:
        model = fp.config.get("controls", {}).get("cpu_model")
        out.append((name if model is None else f"{name}/{model}", fp, seconds))
    return out


def _at(r: Recipe, n: int) -> str:
    return f"{recipe_text(r)} over {n} epoch{'' if n == 1 else 's'}"


def _recipe_of_controls(c: Controls) -> Recipe:
    default = Controls(dtype=c.dtype)
    levers = [Lever(f, getattr(c, f)) for f in CONTROL_FIELDS
              if f not in ("dtype", "cpu_model") and getattr(c, f) != getattr(default, f)]
    return recipe_of(levers)


def _fleet_vendor(fp: Fingerprint) -> str:
    """The CPUID vendor of the machine that made a record: the emulated model's, else read from the CPU's name."""
    model = fp.environment.get("emulated_cpu_model")
    if isinstance(model, str) and model:
        return census.vendor_of(model)
    text = str(fp.environment.get("cpu_model", ""))
    return "AuthenticAMD" if "AMD" in text else "GenuineIntel" if "Intel" in text else "?"


def from_records(sources: Sequence[tuple[str, Path]], *, dtype: str = "float32") -> FleetSolution:
    """Solve from what a fleet already ran (CI artifacts): no run is made."""
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        raise UsageError("two --records folders share a machine name; give each NAME=DIR")
    gathered = [g for name, root in sources for g in _gather(name, root)]
    specs = {fp.spec.hash for _, fp, _ in gathered}
    if len(specs) > 1:
        raise InputError(f"the records hold {len(specs)} experiments (spec hashes differ); a fleet solve compares "
                         "one: give each machine's records of the same spec")
    machines = tuple(dict.fromkeys(m for m, _, _ in gathered))
    if len(machines) < 2:
        raise UsageError("a fleet solve needs the records of at least two machines")
    table: dict[tuple[Recipe, int], dict[str, tuple[Fingerprint, float | None]]] = {}
    for machine, fp, seconds in gathered:
        c = Controls.from_json(fp.config.get("controls"), fp.source)
        if c.dtype != dtype or fp.config.get("perturb") is not None:
            continue
        key = (_recipe_of_controls(c), fp.epochs)
        slot = table.setdefault(key, {})
        if machine in slot and slot[machine][0].digest != fp.digest:
            raise InputError(f"{fp.source}: {machine} holds two runs of {recipe_text(key[0])} over {fp.epochs} "
                             "epochs with different digests; a machine must compute one configuration alike")
        slot[machine] = (fp, seconds)
    if not table:
        raise InputError(f"no {dtype} run without --perturb in the records; --dtype chooses another")
    complete = {k: v for k, v in table.items() if all(m in v for m in machines)}
    incomplete = tuple((_at(r, n), tuple(m for m in machines if m not in v))
                       for (r, n), v in table.items() if (r, n) not in complete)

    def cost(r: Recipe, n: int) -> tuple[float | None, tuple[float, ...]]:
        mine, base = complete[(r, n)], table.get(((), n), {})
        ratios = []
        for m in machines:
            t, t0 = mine[m][1], (base[m][1] if m in base else None)
            if t is not None and t0:
                ratios.append(t / t0)
        seconds = tuple(t for m in machines if (t := mine[m][1]) is not None)
        return (statistics.median(ratios) if ratios else None), seconds

    rows = []
    for (r, n), v in complete.items():
        got = compare.equivalence_classes([v[m][0] for m in machines])
        env, unset, calls = environment(Controls(dtype=dtype), r)
        ratio, timed = cost(r, n)
        parted = None
        if len(got) > 1:
            a, b = machines[got[0].indices[0]], machines[got[1].indices[0]]
            first = compare.compare_pair(v[a][0], v[b][0]).first
            parted = f"{a} vs {b}: " + ("the digests differ outside the training" if first is None else first.where)
        rows.append(Candidate(recipe=_at(r, n), levers=tuple(lv.text for lv in r),
                              run_options=tuple(run_options(r)), environment=tuple(env), unset=tuple(unset),
                              calls=tuple(calls), classes=len(got), cost=ratio, seconds=timed,
                              verified_epochs=n if len(got) == 1 else None, parted=parted))
    rows.sort(key=lambda c: (c.classes, -(c.verified_epochs or 0), c.cost is None, c.cost or 0.0, len(c.levers)))
    best = rows[0].recipe if rows and rows[0].classes == 1 else None
    partition = partition_recipe = None
    causes: list[str] = []
    if best is None and rows:
        pick = rows[0]
        (r, n) = next(k for k in complete if _at(*k) == pick.recipe)
        fps = {m: complete[(r, n)][m][0] for m in machines}
        facts = {m: census.Facts(vendor=_fleet_vendor(fp),
                                 features=frozenset(str(f) for f in fp.environment.get("cpu_features", ())))
                 for m, fp in fps.items()}
        partition = census.classify(fps, facts, where="", epochs=n, missing=(), why_epochs="the records' own length")
        partition_recipe = pick.recipe
        causes = split_causes(partition)
    return FleetSolution(machines=machines, dtype=dtype, sources=tuple((n, str(p)) for n, p in sources),
                         candidates=tuple(rows), incomplete=incomplete, best=best, partition=partition,
                         partition_recipe=partition_recipe, causes=tuple(causes))
