"""A census of CPU numerical classes: which machines compute the experiment alike, where classes part, and why.

The machines are this one (``native``) and qemu CPU models across Intel and AMD
generations, each running the experiment with the numerics settings as they come (no
ISA cap, the default thread count of one).  A census is a matrix over ``cpu_model``
alone, so its folder is a matrix folder (resumable, ``summary.json`` beside the runs);
this module plans it and reads it back as classes.  Over a dask cluster the machines are the
cluster's hosts instead, one native run on each (a host whose worker holds
``BNAUDIT_HOST_CPU_MODEL`` stands for that qemu model), and the host itself reads its CPU's
vendor and features (``bnaudit.cluster``).

- **classes**: machines whose fingerprints are bit-identical (``compare.equivalence_classes``);
- **where two classes part**: the training split of one member of each
  (``compare.compare_pair``: epoch, step, phase, layer, tensor, share of elements, ulps);
- **what separates them**: the CPU features (as numpy's dispatcher reads them, under the
  model for an emulated machine, so they are qemu's, not its datasheet's) that every
  member of one class has and no member of the other, and the CPU vendor where it
  differs (MKL dispatches on the vendor: under an AMD CPUID it ignores
  ``MKL_ENABLE_INSTRUCTIONS``).

Length: one epoch by default.  Every kernel the training uses runs in epoch 0 on the
shapes of every later epoch, and on this experiment machines that part at all part in
step 0; a split that needs particular values (a tie, a subnormal) could first appear
later, which ``--epochs`` looks for.

qemu's translator has no AVX-512: a model that has it (Cascadelake-Server, Icelake-Server)
runs without it, and its features say so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bnaudit import compare, emulate
from bnaudit.compare import Difference
from bnaudit.matrix import folder
from bnaudit.matrix.plan import Grid, Plan, Variant, make_plan
from bnaudit.record import Fingerprint
from bnaudit.spec import ExperimentSpec

CENSUS_SCHEMA = "bnaudit.census/1"
DEFAULT_EPOCHS = 1
WHY_EPOCHS = ("every kernel of the training runs in epoch 0 on the shapes of every later epoch, and machines that "
              "part at all part inside its first step; a split that needs particular values could first show "
              "later (--epochs N looks longer)")
DEFAULT_MODELS = ("Nehalem", "Westmere", "SandyBridge", "IvyBridge", "Haswell", "Broadwell", "Skylake-Client",
                  "Cascadelake-Server", "Icelake-Server", "EPYC", "EPYC-Rome", "EPYC-Milan")
"""Intel generations from SSE4.2 to AVX2 (and two AVX-512 models, which qemu runs without AVX-512) and
three AMD ones: the census set beside ``native``."""
NATIVE = "native"

_AMD_PREFIXES = ("EPYC", "Opteron", "Phenom")


def vendor_of(model: str) -> str:
    """The CPUID vendor qemu reports for a model (its x86 definitions: AMD families, Hygon, else Intel)."""
    if model.startswith(_AMD_PREFIXES):
        return "AuthenticAMD"
    if model.startswith("Dhyana"):
        return "HygonGenuine"
    return "GenuineIntel"


@dataclasses.dataclass(frozen=True)
class Machine:
    """One machine of the census and what its run saw."""

    name: str
    """``native`` or the qemu model."""
    vendor: str
    """CPUID vendor (GenuineIntel, AuthenticAMD, ...)."""
    features: tuple[str, ...]
    """CPU features present, as numpy's dispatcher reads them (under the model, for an emulated one)."""
    capability: str
    """torch's CPU capability in the run (DEFAULT, AVX2, AVX512)."""
    digest: str
    """The run's fingerprint digest."""
    klass: int
    """Index of its class."""


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Where two classes first part, and what separates them."""

    i: int
    j: int
    first: Difference | None
    """The training split (or, if the training agrees, the eval pass's first difference)."""
    only_i: tuple[str, ...]
    """Features every member of class i has and no member of class j."""
    only_j: tuple[str, ...]
    vendors: tuple[tuple[str, ...], tuple[str, ...]] | None
    """The vendors of each side, where they do not overlap; None where a vendor is on both sides."""


@dataclasses.dataclass(frozen=True)
class Census:
    """Classes of machines that compute alike, and their splits."""

    folder: str
    epochs: int
    why_epochs: str
    machines: tuple[Machine, ...]
    classes: tuple[tuple[str, ...], ...]
    """Machine names per class, in order of first appearance."""
    splits: tuple[ClassSplit, ...]
    missing: tuple[str, ...]
    """Machines whose run did not complete (named in the matrix summary)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder, "epochs": self.epochs, "why_epochs": self.why_epochs,
            "machines": [dataclasses.asdict(m) for m in self.machines],
            "classes": [list(c) for c in self.classes],
            "splits": [{"i": s.i, "j": s.j, "first": None if s.first is None else dataclasses.asdict(s.first),
                        "only_i": list(s.only_i), "only_j": list(s.only_j),
                        "vendors": None if s.vendors is None else [list(v) for v in s.vendors]}
                       for s in self.splits],
            "missing": list(self.missing),
        }


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the census reads of a machine besides its run."""

    vendor: str
    """CPUID vendor ("?" where unknown)."""
    features: frozenset[str]
    """CPU features present, as numpy's dispatcher reads them."""


FactsOf = Callable[[Sequence[str]], Mapping[str, Facts]]
"""The facts of the machines named (``local_facts``, or ``cluster.Cluster.facts`` for hosts)."""


def plan(spec: ExperimentSpec, machines: Sequence[str], *, epochs: int = DEFAULT_EPOCHS,
         hosts: Sequence[str] = ()) -> Plan:
    """The census as a matrix plan: one run per machine, settings as they come, no operator audit;
    with ``hosts`` (a cluster's), one native run on each host instead of ``machines``."""
    models = (None,) if hosts else tuple(None if emulate.is_native(m) else m for m in machines)
    return make_plan([Variant("census", spec)], Grid(cpu_model=models), epochs=epochs, audit_every=0, hosts=hosts)


def machine_name(model: str | None, host: str | None = None) -> str:
    """A machine as the census names it: the cluster host, else ``native`` or the qemu model."""
    if host is not None:
        return host
    return NATIVE if model is None else model


def separating(features: Mapping[str, frozenset[str]], a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    """Features every machine of ``a`` has and no machine of ``b`` has, sorted."""
    common = frozenset.intersection(*(features[m] for m in a))
    seen_b = frozenset().union(*(features[m] for m in b))
    return tuple(sorted(common - seen_b))


def machine_features(names: Sequence[str], native: Mapping[str, bool], *, jobs: int = 1) -> dict[str, frozenset[str]]:
    """The CPU features present on each machine, as numpy's dispatcher reads them: ``native`` given, each
    emulated model's read by running the interpreter under qemu (``emulate.model_features``, a few
    seconds each, ``jobs`` at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    emulated = [n for n in names if n != NATIVE]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        found = dict(zip(emulated, pool.map(emulate.model_features, emulated)))
    found[NATIVE] = dict(native)
    return {n: frozenset(k for k, v in found[n].items() if v) for n in names}


def local_facts(native_vendor: str, native_features: Mapping[str, bool], *, jobs: int = 1) -> FactsOf:
    """Facts of ``native`` (given) and of qemu models (their vendor, and their features read under qemu)."""
    def facts(names: Sequence[str]) -> dict[str, Facts]:
        features = machine_features(names, native_features, jobs=jobs)
        return {n: Facts(vendor=native_vendor if n == NATIVE else vendor_of(n), features=features[n]) for n in names}
    return facts


def analyse(p: Plan, out: Path, facts_of: FactsOf) -> Census:
    """Read the census folder's records back as classes, splits and separating features."""
    out = Path(out)
    fps: dict[str, Fingerprint] = {}
    missing = []
    for run in p.runs:
        rec = folder.finished(p, run, out, with_reference=False)
        name = machine_name(run.controls.cpu_model, run.host)
        if rec is None:
            missing.append(name)
        else:
            fps[name] = rec.fingerprint
    return classify(fps, facts_of(list(fps)), where=str(out), epochs=p.epochs, missing=missing)


def classify(fps: Mapping[str, Fingerprint], facts: Mapping[str, Facts], *, where: str, epochs: int,
             missing: Sequence[str], why_epochs: str = WHY_EPOCHS) -> Census:
    """Machines' fingerprints (by machine name) as classes of bit-identical runs, where each pair of
    classes parts, and the features and vendors (by machine; "?" where unknown) that separate them."""
    names = list(fps)
    features = {n: facts[n].features for n in names}
    vendors = {n: facts[n].vendor for n in names}
    classes = compare.equivalence_classes([fps[n] for n in names]) if names else []
    members = tuple(tuple(names[k] for k in c.indices) for c in classes)
    klass = {n: i for i, ms in enumerate(members) for n in ms}
    machines = tuple(Machine(name=n, vendor=vendors[n], features=tuple(sorted(features[n])),
                             capability=str(fps[n].effective.get("cpu_capability", "?")), digest=fps[n].digest,
                             klass=klass[n]) for n in names)
    splits = []
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            pc = compare.compare_pair(fps[members[i][0]], fps[members[j][0]])
            vi, vj = {vendors[m] for m in members[i]}, {vendors[m] for m in members[j]}
            apart = not vi & vj and "?" not in vi | vj
            splits.append(ClassSplit(i=i, j=j, first=pc.first,
                                     only_i=separating(features, members[i], members[j]),
                                     only_j=separating(features, members[j], members[i]),
                                     vendors=(tuple(sorted(vi)), tuple(sorted(vj))) if apart else None))
    return Census(folder=where, epochs=epochs, why_epochs=why_epochs, machines=machines, classes=members,
                  splits=tuple(splits), missing=tuple(missing))
