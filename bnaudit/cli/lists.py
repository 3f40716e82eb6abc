"""Comma-separated option values of `bnaudit matrix`: one parser per control, each refusing with the option's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnaudit import controls, emulate, spec
from bnaudit.errors import UsageError
from bnaudit.matrix.plan import INHERIT


def split_list(text: str, option: str) -> list[str]:
    """A comma-separated option value as a list of distinct, non-empty tokens (order kept)."""
    tokens = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in tokens):
        raise UsageError(f"{option} {text!r}: expected a comma-separated list without empty items")
    return list(dict.fromkeys(tokens))


MAX_SEEDS = 10_000
"""Seeds one option may name (``--seeds 1..100000`` is a typo more often than a plan)."""


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """``A..B`` (both included), a comma list, or both mixed: ``1..32``, ``3,5,9``, ``1..4,10``."""
    out: list[int] = []
    for t in split_list(text, option):
        low, sep, high = t.partition("..")
        try:
            values = range(int(low), int(high) + 1) if sep else range(int(t), int(t) + 1)
        except ValueError:
            raise UsageError(f"{option} {text!r}: {t!r} is not a seed or a range A..B of seeds") from None
        if not values or values.start < 0 or values.stop > 2**63:
            raise UsageError(f"{option} {text!r}: {t!r} must be non-negative seeds, A..B with A <= B")
        if len(out) + len(values) > MAX_SEEDS:
            raise UsageError(f"{option} {text!r}: more than {MAX_SEEDS} seeds")
        out += values
    return tuple(dict.fromkeys(out))


def seed_scope(text: str | None, *, seeded: bool, option: str) -> tuple[str, ...]:
    """``--seed-scope`` (default: init+order), refused where ``option`` (--seed, --seeds) was not given."""
    if text is not None and not seeded:
        verb = "draws" if option == "--seed" else "draw"
        raise UsageError(f"--seed-scope says what {option} {verb}; give {option} too")
    return spec.DEFAULT_SEED_SCOPE if text is None else spec.parse_seed_scope(text)


def seeds_and_scope(seeds: str | None, scope: str | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``--seeds`` and ``--seed-scope`` parsed: the seeds (none: the spec's own) and the streams they draw."""
    return (() if seeds is None else parse_seeds(seeds)), seed_scope(scope, seeded=seeds is not None,
                                                                      option="--seeds")


def parse_threads(text: str) -> tuple[int, ...]:
    values = []
    for t in split_list(text, "--threads"):
        try:
            values.append(int(t))
        except ValueError:
            raise UsageError(f"--threads {text!r}: {t!r} is not a whole number") from None
    return tuple(dict.fromkeys(values))


_SWITCH = {"off": False, "false": False, "no": False, "0": False, "on": True, "true": True, "yes": True, "1": True}


def parse_deterministic(text: str) -> tuple[bool, ...]:
    """``off``, ``on``, ``both`` (= off,on), or a comma list of on/off/true/false."""
    out: list[bool] = []
    for t in split_list(text, "--deterministic"):
        low = t.lower()
        if low == "both":
            values = [False, True]
        elif low in _SWITCH:
            values = [_SWITCH[low]]
        else:
            raise UsageError(f"--deterministic {text!r}: use off, on, both, or a list such as off,on")
        out += [v for v in values if v not in out]
    return tuple(out)


def parse_onednn(text: str) -> tuple[str | None, ...]:
    """oneDNN ISA caps; ``inherit`` keeps the one --isa sets."""
    return tuple(dict.fromkeys(None if t.lower() == INHERIT else t.upper() for t in split_list(text, "--onednn-isa")))


def parse_mkl_cbwr(text: str) -> tuple[str | None, ...]:
    """MKL_CBWR values.  ``STRICT`` binds to the branch before it, so ``COMPATIBLE,AVX2,STRICT``
    is the two values COMPATIBLE and AVX2,STRICT (MKL's own spelling); ``none`` removes the
    variable; ``inherit`` keeps the one --isa sets."""
    split_list(text, "--mkl-cbwr")  # no empty items
    tokens = [t.strip() for t in text.split(",")]  # not de-duplicated: STRICT may follow several branches
    values: list[str] = []
    for t in tokens:
        if t.upper() == "STRICT":
            if not values or values[-1].lower() in (INHERIT, "none") or values[-1].upper().endswith(",STRICT"):
                raise UsageError(f"--mkl-cbwr {text!r}: STRICT must follow a branch name, e.g. AVX2,STRICT")
            values[-1] = f"{values[-1]},STRICT"
        else:
            values.append(t.upper() if t.lower() not in (INHERIT, "none") else t.lower())
    return tuple(None if v == INHERIT else v for v in dict.fromkeys(values))


def parse_cpu_models(text: str) -> tuple[str | None, ...]:
    """CPU models (or presets) to emulate; ``native`` runs on this machine's own CPU."""
    return tuple(dict.fromkeys(None if emulate.is_native(t) else t for t in split_list(text, "--cpu-model")))


def parse_promote_sets(text: str) -> tuple[tuple[str, ...], ...]:
    """Sets of promoted operations, comma-separated, the operations of one set joined by ``+``:
    ``none,bn,bn+loss`` is three configurations (nothing promoted, BN, BN and the loss)."""
    sets = []
    for t in split_list(text, "--promote"):
        try:
            sets.append(controls.parse_promote(t.replace("+", ",")))
        except UsageError:
            raise UsageError(f"--promote {text!r}: {t!r} is not a set of {', '.join(controls.PROMOTABLE)} "
                             "joined by + (or none)") from None
    return tuple(dict.fromkeys(sets))


def parse_numpy_disable_sets(text: str) -> tuple[str | None, ...]:
    """NPY_DISABLE_CPU_FEATURES values, the targets of one value joined by ``+`` (``inherit``: not set)."""
    return tuple(dict.fromkeys(None if t.lower() == INHERIT else controls.parse_numpy_disable(t)
                               for t in split_list(text, "--numpy-disable")))


def parse_openblas_coretypes(text: str) -> tuple[str | None, ...]:
    """OPENBLAS_CORETYPE values (``inherit``: OpenBLAS's own choice)."""
    return tuple(dict.fromkeys(None if t.lower() == INHERIT else controls.parse_openblas_coretype(t)
                               for t in split_list(text, "--openblas-coretype")))


def _switches(option: str) -> Callable[[str], tuple[bool, ...]]:
    def parse(text: str) -> tuple[bool, ...]:
        try:
            return parse_deterministic(text)
        except UsageError:
            raise UsageError(f"{option} {text!r}: use off, on, both, or a list such as off,on") from None
    return parse


PARSERS: dict[str, Callable[[str], tuple[Any, ...]]] = {
    "dtype": lambda text: tuple(split_list(text, "--dtype")),
    "threads": parse_threads,
    "isa": lambda text: tuple(split_list(text, "--isa")),
    "deterministic": parse_deterministic,
    "onednn_isa": parse_onednn,
    "mkl_cbwr": parse_mkl_cbwr,
    "cpu_model": parse_cpu_models,
    "promote": parse_promote_sets,
    "numpy_disable": parse_numpy_disable_sets,
    "openblas_coretype": parse_openblas_coretypes,
    "dynamic_threads": _switches("--dynamic-threads"),
    "kmp_deterministic_reduction": _switches("--kmp-deterministic-reduction"),
    "flush_denormal": _switches("--flush-denormal"),
}
"""The parser of each grid option, by ``matrix.plan.Grid`` field."""


def grid_values(**given: str | None) -> dict[str, tuple[Any, ...]]:
    """The grid options given (None: not given), parsed, by Grid field: what replaces the Grid's defaults."""
    return {name: PARSERS[name](text) for name, text in given.items() if text is not None}
