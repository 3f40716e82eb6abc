"""Ensembles: the outcome of the training as a distribution over seeds, and pairs of configurations
compared seed by seed against the spread that rounding alone makes.

Where bits cannot agree, the question is whether a machine changes *what the training gives*, or
only reshuffles a chaotic trajectory.  An ensemble runs every configuration (a matrix grid: ISA
caps, CPU models, dtypes ...) of each network (``bn``, ``no-bn``) once per seed, where a seed
draws the initial parameters and the batch order (``spec.with_seed``; the data set fixed unless
the scope says otherwise), and beside it the *floor*: the same seeds on the first configuration
with one initial value moved by one ulp (``--perturb``), so that the spread rounding noise alone
produces is measured rather than assumed.

For each pair of configurations of a network, and for BN against no-BN in each configuration,
the outcomes are paired by seed (d = a - b) and judged with scipy.stats: Wilcoxon's signed-rank
test and the sign test for a systematic difference, bootstrap confidence intervals of the mean
and median difference, the share of seeds each side is better, and two effect sizes (Cohen's
d_z and the matched-pairs rank-biserial correlation).  Where a floor was run, |d| is set against
the floor's |e| (e = perturbed - unperturbed, same seeds) with a Mann-Whitney U test.  The
outcomes are the final eval-mode test and train MSE (test first: the seed page's "results").

This module plans, reads records and computes; it runs nothing (``run_matrix`` does) and imports
neither torch nor mpmath.  scipy is imported where a statistic is computed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import fileio, layout, record
from bnaudit.blocks import OUTCOME_NAMES, OUTCOME_WORDS, EnsembleOutcomes, outcome_series
from bnaudit.controls import Perturbation, parse_perturbation
from bnaudit.errors import UsageError
from bnaudit.matrix import folder
from bnaudit.matrix.plan import CONTROL_FIELDS, Grid, Plan, Variant, make_plan, no_bn_variant, seeded
from bnaudit.record import Fingerprint
from bnaudit.spec import DEFAULT_SEED_SCOPE, ExperimentSpec, with_seed

ENSEMBLE_SCHEMA = "bnaudit.ensemble/1"
NETWORKS = ("bn", "no-bn")
"""The seed page's network, and its baseline without BatchNorm."""
DEFAULT_SEEDS = "1..32"
DEFAULT_PERTURB = "linear1.weight[0,0]:1"
DEFAULT_ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 20151212
"""The bootstrap's own generator seed: the same ensemble gives the same intervals, digit for digit."""


# --- what runs ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Request:
    """An ensemble: networks x seeds x the grid's configurations, and the floor."""

    spec: ExperimentSpec
    networks: tuple[str, ...]
    seeds: tuple[int, ...]
    scope: tuple[str, ...] = DEFAULT_SEED_SCOPE
    grid: Grid = dataclasses.field(default_factory=Grid)
    epochs: int | None = None
    perturb: Perturbation | None = None
    """The floor's perturbation (None: no floor)."""

    def variants(self) -> tuple[Variant, ...]:
        """``<network>-seed-<n>``: every network once per seed."""
        base = {"bn": self.spec, "no-bn": no_bn_variant(self.spec)}
        return seeded([Variant(net, base[net]) for net in self.networks], self.seeds, self.scope, named=True)


def request(spec: ExperimentSpec, *, networks: Sequence[str], seeds: Sequence[int],
            scope: tuple[str, ...] = DEFAULT_SEED_SCOPE, grid: Grid | None = None, epochs: int | None = None,
            perturb: str | None = DEFAULT_PERTURB) -> Request:
    """Validate an ensemble (UsageError before anything runs)."""
    nets = tuple(dict.fromkeys(networks))
    bad = [n for n in nets if n not in NETWORKS]
    if bad or not nets:
        raise UsageError(f"--networks: {', '.join(bad) or 'none given'}; choose from {', '.join(NETWORKS)}")
    if not spec.model.batchnorm and "bn" in nets:
        raise UsageError("--networks bn: the spec has no BatchNorm ([model] batchnorm = false); use --networks no-bn")
    if len(seeds) < 2:
        raise UsageError("an ensemble needs at least two seeds (e.g. --seeds 1..32)")
    if epochs is not None and not 1 <= epochs <= spec.train.epochs:
        raise UsageError(f"--epochs must be between 1 and the spec's {spec.train.epochs}, got {epochs}")
    return Request(spec=spec, networks=nets, seeds=tuple(seeds), scope=scope, grid=grid or Grid(), epochs=epochs,
                   perturb=None if perturb is None else parse_perturbation(perturb, spec))


def plans(req: Request, hosts: Sequence[str] = ()) -> tuple[Plan, Plan | None]:
    """The ensemble's matrix, and the floor's (the first configuration, perturbed; None without a floor);
    ``hosts``: cluster workers, each of which runs every configuration."""
    runs = make_plan(req.variants(), req.grid, epochs=req.epochs, audit_every=0, hosts=hosts)
    if req.perturb is None:
        return runs, None
    first = runs.grid.controls()[0]
    floor = make_plan(req.variants(), req.grid, epochs=runs.epochs, audit_every=0, configurations=[first],
                      perturb=req.perturb, hosts=hosts)
    return runs, floor


# --- what came out ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Outcome:
    """One run's outcome."""

    seed: int
    digest: str
    path: str
    """The run's record folder."""
    train: np.ndarray
    """(epochs + 1,) eval-mode train MSE: the initial state, then after each epoch."""
    test: np.ndarray

    def final(self, outcome: str) -> float:
        return float(self.series(outcome)[-1])

    def series(self, outcome: str) -> np.ndarray:
        return outcome_series(outcome, self.train, self.test)


Table = dict[str, dict[int, Outcome]]
"""Configuration name -> seed -> outcome."""


def config_name(network: str, controls: Mapping[str, Any], varying: Sequence[str], host: str | None = None) -> str:
    """``bn isa=default``: the network, the controls the grid varies, and the cluster host (``@worker``)."""
    parts = [f"{f}={'native' if controls[f] is None and f == 'cpu_model' else controls[f]}" for f in varying]
    return " ".join([network, *parts, *([f"@{host}"] if host is not None else [])])


def _network_and_seed(variant: str) -> tuple[str, int]:
    net, _, seed = variant.rpartition("-seed-")
    return net, int(seed)


def collect(plan: Plan, out: Path, varying: Sequence[str] | None = None) -> tuple[Table, list[str]]:
    """The finished runs of an ensemble's matrix folder, by configuration and seed, and the runs missing;
    configurations are named by the controls in ``varying`` (default: those the plan's grid varies)."""
    varying = plan.grid.varying() if varying is None else varying
    table: Table = {}
    missing = []
    for run in plan.runs:
        net, seed = _network_and_seed(run.variant)
        name = config_name(net, {f: getattr(run.controls, f) for f in CONTROL_FIELDS}, varying, run.host)
        rec = folder.finished(plan, run, out, with_reference=False)
        if rec is None:
            missing.append(run.key)
            continue
        fp: Fingerprint = rec.fingerprint
        table.setdefault(name, {})[seed] = Outcome(seed=seed, digest=fp.digest, path=str(out / run.folder),
                                                   train=np.asarray(fp.train_loss), test=np.asarray(fp.test_loss))
    return table, missing


# --- statistics ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Distribution:
    """One configuration's outcome over its seeds."""

    config: str
    outcome: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    mean: float
    sd: float
    median: float
    q05: float
    q25: float
    q75: float
    q95: float
    nonfinite: int
    """Seeds whose outcome is NaN or infinite (left out of the statistics)."""


def distribution(config: str, outcome: str, runs: Mapping[int, Outcome]) -> Distribution:
    seeds = tuple(sorted(runs))
    values = np.array([runs[s].final(outcome) for s in seeds])
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        nan = math.nan
        return Distribution(config, outcome, seeds, tuple(values.tolist()), nan, nan, nan, nan, nan, nan, nan,
                            int(values.size))
    q = np.quantile(ok, [0.05, 0.25, 0.5, 0.75, 0.95])
    return Distribution(config=config, outcome=outcome, seeds=seeds, values=tuple(values.tolist()),
                        mean=float(ok.mean()), sd=float(ok.std(ddof=1)) if ok.size > 1 else math.nan,
                        median=float(q[2]), q05=float(q[0]), q25=float(q[1]), q75=float(q[3]), q95=float(q[4]),
                        nonfinite=int(values.size - ok.size))


@dataclasses.dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class Paired:
    """Two configurations compared seed by seed on one outcome: d = a - b (lower MSE is better)."""

    a: str
    b: str
    outcome: str
    n: int
    """Seeds both finished with a finite outcome."""
    identical: int
    """Seeds on which the two runs are bit-identical (the same digest)."""
    mean: float
    mean_ci: Interval | None
    median: float
    median_ci: Interval | None
    wilcoxon_p: float | None
    sign_p: float | None
    a_better: int
    b_better: int
    ties: int
    cohen_dz: float | None
    rank_biserial: float | None
    floor_mwu_p: float | None
    """Mann-Whitney U of |d| against the floor's |e| (None: no floor for this outcome)."""
    median_abs: float
    floor_median_abs: float | None
    verdict: str


@dataclasses.dataclass(frozen=True)
class Floor:
    """The 1-ulp floor of one configuration: e = perturbed - unperturbed, seed by seed."""

    config: str
    perturb: str
    outcome: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    median_abs: float
    identical: int
    """Seeds where the perturbation changed no outcome bit (it was rounded away)."""


def _ci(d: np.ndarray, statistic: Any, method: str) -> Interval | None:
    from scipy import stats

    if d.size < 3 or np.all(d == d[0]):
        return None
    with warnings.catch_warnings():  # a small or tied sample: the interval says what it can, not a warning
        warnings.simplefilter("ignore")
        res = stats.bootstrap((d,), statistic, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                              method=method, random_state=np.random.default_rng(BOOTSTRAP_SEED))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Interval(low, high) if math.isfinite(low) and math.isfinite(high) else None


def _fmt(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def paired(a: str, b: str, outcome: str, ra: Mapping[int, Outcome], rb: Mapping[int, Outcome],
           floor: Floor | None, alpha: float = DEFAULT_ALPHA) -> Paired:
    """``a`` against ``b`` on the seeds both have."""
    with warnings.catch_warnings():
        return _paired(a, b, outcome, ra, rb, floor, alpha)


def _paired(a: str, b: str, outcome: str, ra: Mapping[int, Outcome], rb: Mapping[int, Outcome],
            floor: Floor | None, alpha: float) -> Paired:
    from scipy import stats

    seeds = sorted(s for s in set(ra) & set(rb)
                   if math.isfinite(ra[s].final(outcome)) and math.isfinite(rb[s].final(outcome)))
    d = np.array([ra[s].final(outcome) - rb[s].final(outcome) for s in seeds])
    identical = sum(ra[s].digest == rb[s].digest for s in seeds)
    n, nonzero = len(seeds), int(np.count_nonzero(d))
    a_better, b_better = int(np.sum(d < 0)), int(np.sum(d > 0))
    wil = sign = dz = rb_corr = None
    warnings.simplefilter("ignore")  # ties and zeros: scipy says so on stderr; the counts are in the answer
    if nonzero >= 1:
        sign = float(stats.binomtest(b_better, nonzero, 0.5).pvalue)
    if nonzero >= 2:
        wil = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
        ranks = stats.rankdata(np.abs(d[d != 0]))
        plus, minus = float(ranks[d[d != 0] > 0].sum()), float(ranks[d[d != 0] < 0].sum())
        rb_corr = (plus - minus) / (plus + minus)
        sd = float(d.std(ddof=1))
        dz = float(d.mean()) / sd if sd > 0 else None
    mwu = None
    floor_abs = None
    if floor is not None and floor.outcome == outcome and len(floor.differences) >= 2 and n >= 2:
        e = np.abs(np.array([x for x in floor.differences if math.isfinite(x)]))
        floor_abs = float(np.median(e))
        if np.any(e > 0) or np.any(d != 0):
            mwu = float(stats.mannwhitneyu(np.abs(d), e, alternative="two-sided").pvalue)
    row = Paired(a=a, b=b, outcome=outcome, n=n, identical=identical, mean=float(d.mean()) if n else math.nan,
                 mean_ci=_ci(d, np.mean, "BCa"), median=float(np.median(d)) if n else math.nan,
                 median_ci=_ci(d, np.median, "percentile"), wilcoxon_p=wil, sign_p=sign, a_better=a_better,
                 b_better=b_better, ties=n - nonzero, cohen_dz=dz, rank_biserial=rb_corr, floor_mwu_p=mwu,
                 median_abs=float(np.median(np.abs(d))) if n else math.nan, floor_median_abs=floor_abs, verdict="")
    return dataclasses.replace(row, verdict=verdict(row, alpha))


def verdict(p: Paired, alpha: float) -> str:
    """The pair in one sentence."""
    what = OUTCOME_WORDS[p.outcome].removeprefix("final ")
    if p.n == 0:
        return "no seed with both runs finished"
    if p.identical == p.n:
        return f"bit-identical on all {p.n} seeds: no effect at all"
    if p.wilcoxon_p is not None and p.wilcoxon_p < alpha:
        worse, k = (p.a, p.b_better) if p.b_better > p.a_better else (p.b, p.a_better)
        return (f"systematic: {worse} has the higher {what} on {k} of {p.n} seeds "
                f"(Wilcoxon p = {_fmt(p.wilcoxon_p)}, sign test p = {_fmt(p.sign_p)})")
    tests = f"Wilcoxon p = {_fmt(p.wilcoxon_p)}, {p.n} seeds"
    if p.floor_mwu_p is None:
        return f"no systematic difference in {what} ({tests})"
    if p.floor_mwu_p >= alpha:
        return (f"indistinguishable from rounding noise ({tests}; |difference| against the 1-ulp floor: "
                f"Mann-Whitney p = {_fmt(p.floor_mwu_p)})")
    bigger = "larger" if p.median_abs > (p.floor_median_abs or 0.0) else "smaller"
    return (f"no systematic winner ({tests}), but the differences are {bigger} than the 1-ulp floor's "
            f"(Mann-Whitney p = {_fmt(p.floor_mwu_p)})")


def floor_of(config: str, perturb: str, outcome: str, plain: Mapping[int, Outcome], moved: Mapping[int, Outcome]
             ) -> Floor:
    seeds = tuple(sorted(set(plain) & set(moved)))
    e = [moved[s].final(outcome) - plain[s].final(outcome) for s in seeds]
    finite = [abs(x) for x in e if math.isfinite(x)]
    return Floor(config=config, perturb=perturb, outcome=outcome, seeds=seeds, differences=tuple(e),
                 median_abs=float(np.median(finite)) if finite else math.nan,
                 identical=sum(moved[s].digest == plain[s].digest for s in seeds))


def outcomes_of(req: Request, table: Table, config: str | None = None) -> tuple[EnsembleOutcomes, Path]:
    """An ensemble baseline's block for one configuration (default: the first), and the record of its
    first seed, which the baseline file is made from (UsageError: no such configuration, or too few seeds)."""
    name = config if config is not None else next(iter(table), None)
    if name is None or name not in table:
        raise UsageError(f"--baseline-config {config!r}: the ensemble's configurations are "
                         f"{', '.join(table) or 'none finished'}")
    runs = table[name]
    if len(runs) < 2:
        raise UsageError(f"--baseline-out: {name} has {len(runs)} finished seed(s); an ensemble baseline needs two")
    seeds = sorted(runs)
    first = runs[seeds[0]].path
    unseeded = with_seed(record.load(first).spec, 0, req.scope).hash
    block = EnsembleOutcomes(config=name, scope=req.scope, unseeded=unseeded, epochs=len(runs[seeds[0]].test) - 1,
                             seeds=tuple(seeds), digests=tuple(runs[s].digest for s in seeds),
                             values={o: tuple(runs[s].final(o) for s in seeds) for o in OUTCOME_NAMES})
    return block, Path(first)


# --- the answer ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EpochBand:
    """One configuration's outcome per epoch: the median and quartiles over seeds, at the keyframe rows."""

    config: str
    outcome: str
    rows: tuple[int, ...]
    """Epoch rows (0: the initial state; e: after epoch e)."""
    median: tuple[float, ...]
    q25: tuple[float, ...]
    q75: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """``bnaudit ensemble``'s answer."""

    folder: str
    spec_hash: str
    networks: tuple[str, ...]
    seeds: tuple[int, ...]
    scope: tuple[str, ...]
    epochs: int
    alpha: float
    configs: tuple[str, ...]
    distributions: tuple[Distribution, ...]
    bands: tuple[EpochBand, ...]
    pairs: tuple[Paired, ...]
    floors: tuple[Floor, ...]
    missing: tuple[str, ...]
    """Runs not finished (an interrupted or partial ensemble is analysed on the seeds it has)."""

    def to_dict(self) -> dict[str, Any]:
        return fileio.json_numbers(dataclasses.asdict(self))


def epoch_band(config: str, outcome: str, runs: Mapping[int, Outcome], epochs: int) -> EpochBand:
    rows = tuple(r for r in layout.keyframe_schedule(epochs))
    series = np.array([o.series(outcome)[list(rows)] for o in runs.values()])
    q = np.nanquantile(series, [0.25, 0.5, 0.75], axis=0) if len(series) else np.full((3, len(rows)), np.nan)
    return EpochBand(config=config, outcome=outcome, rows=rows, median=tuple(q[1].tolist()),
                     q25=tuple(q[0].tolist()), q75=tuple(q[2].tolist()))


def pairs_of(configs: Sequence[str]) -> list[tuple[str, str]]:
    """Every two configurations of one network, then BN against no-BN in the same controls."""
    by_net: dict[str, list[str]] = {}
    for c in configs:
        by_net.setdefault(c.split(" ", 1)[0], []).append(c)
    out = [p for names in by_net.values() for p in itertools.combinations(names, 2)]
    for c in by_net.get("bn", []):
        twin = "no-bn" + c[2:]
        if twin in configs:
            out.append((c, twin))
    return out


def analyse(req: Request, stages: Sequence[tuple[Plan, Path]], *, folder_text: str, alpha: float = DEFAULT_ALPHA
            ) -> tuple[Ensemble, Table]:
    """The ensemble's distributions, pairs and floors from its folders (the runs' matrix, then the
    floor's, if any), from what finished of them; also the outcomes by configuration and seed."""
    runs_plan = stages[0][0]
    table, missing = collect(*stages[0])
    moved: Table = {}
    for plan, out in stages[1:]:
        moved, floor_missing = collect(plan, out, runs_plan.grid.varying())
        missing += [f"floor/{k}" for k in floor_missing]
    configs = tuple(table)
    floors = []
    for name, runs in moved.items():
        plain = table.get(name, {})
        for outcome in OUTCOME_NAMES:
            floors.append(floor_of(name, str(req.perturb), outcome, plain, runs))

    def floor_for(a: str, b: str, outcome: str) -> Floor | None:
        net = a.split(" ", 1)[0]
        if net != b.split(" ", 1)[0]:
            return None  # BN against no-BN: not a rounding question
        return next((f for f in floors if f.outcome == outcome and f.config.split(" ", 1)[0] == net), None)

    pairs = [paired(a, b, o, table[a], table[b], floor_for(a, b, o), alpha)
             for a, b in pairs_of(configs) for o in OUTCOME_NAMES]
    dists = [distribution(c, o, table[c]) for c in configs for o in OUTCOME_NAMES]
    bands = [epoch_band(c, o, table[c], runs_plan.epochs) for c in configs for o in OUTCOME_NAMES]
    answer = Ensemble(folder=folder_text, spec_hash=req.spec.hash, networks=req.networks, seeds=req.seeds,
                      scope=req.scope, epochs=runs_plan.epochs, alpha=alpha, configs=configs,
                      distributions=tuple(dists), bands=tuple(bands), pairs=tuple(pairs), floors=tuple(floors),
                      missing=tuple(missing))
    return answer, table
