"""bnaudit: numerical-reproducibility auditing of the batch-norm noisy-feature experiment.

``import bnaudit`` stays light: it imports neither torch, nor mpmath, nor any stage of
the pipeline, because every run's process (``bnaudit.worker``) imports this package
before its controls (threads, ISA caps) take effect.  The public API (``bnaudit.api``:
``run``, ``load``, ``compare``, ``check``) is loaded on first use, through the module
``__getattr__`` below.

``compare`` and ``check`` are reached as ``bnaudit.api.compare`` and
``bnaudit.api.check`` (or ``from bnaudit.api import compare, check``): ``bnaudit.compare``
and ``bnaudit.check`` are the core modules of those names, and a package attribute
cannot be both a submodule and a function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnaudit._version import __version__

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ loads them
    from bnaudit.api import (
        BnauditError,
        CheckResult,
        ExitCode,
        Fingerprint,
        ManyComparison,
        PairComparison,
        Run,
        load,
        run,
    )

__all__ = ["BnauditError", "CheckResult", "ExitCode", "Fingerprint", "ManyComparison", "PairComparison", "Run",
           "__version__", "api", "load", "run"]

_LAZY = frozenset(__all__) - {"__version__"}
"""``bnaudit.api`` and the names of its ``__all__`` re-exported here (all but the two that are module names)."""


def __getattr__(name: str) -> Any:
    """Load ``bnaudit.api`` on first use of one of its names (PEP 562)."""
    if name in _LAZY:
        import bnaudit.api as api  # not "from bnaudit import api": that asks this function for "api" again

        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
