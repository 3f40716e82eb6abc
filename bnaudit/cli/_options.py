"""Options and output conventions shared by several commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import typer

from bnaudit import fileio
from bnaudit._version import __version__
from bnaudit.controls import DTYPES, ISAS

if TYPE_CHECKING:
    from bnaudit.spec import ExperimentSpec

ERROR_SCHEMA = "bnaudit.error/1"
RUN_SCHEMA = "bnaudit.run-summary/1"
ENV_SCHEMA = "bnaudit.env/1"
BASELINE_WRITTEN_SCHEMA = "bnaudit.baseline-written/1"


def json_document(schema: str, body: dict[str, Any]) -> str:
    """A ``--json`` output: its schema and the bnaudit version that wrote it, then the body.

    Strict JSON: a non-finite number (the losses of a run that diverged) is written as the
    string "nan", "inf" or "-inf", as in every other document bnaudit writes.
    """
    return json.dumps(fileio.json_numbers({"schema": schema, "bnaudit": __version__, **body}), indent=1,
                      sort_keys=True, allow_nan=False)


SameLengthOption = Annotated[bool, typer.Option(
    "--same-length", help="Refuse runs of different lengths instead of comparing the epochs they all ran.")]
SpecOption = Annotated[Path | None, typer.Option("--spec", help="TOML file overriding the embedded default spec.")]
SeedOption = Annotated[int | None, typer.Option(
    min=0, max=2**63 - 1, help="Draw the frozen inputs of --seed-scope from this seed (default: the spec's "
                               "data.seed; that seed gives the spec itself, bit for bit).")]
SeedScopeOption = Annotated[str | None, typer.Option(
    metavar="SCOPE", help="What --seed draws: init+order (the default: initial parameters and batch order, the "
                          "data set fixed), init, order, data, or all.")]


def experiment_of(spec: Path | None, seed: int | None, seed_scope: str | None) -> ExperimentSpec:
    """The ``--spec`` file's experiment (the embedded default without one), reseeded by ``--seed``."""
    from bnaudit import spec as specs
    from bnaudit.cli import lists

    experiment = specs.load_spec(spec)
    scope = lists.seed_scope(seed_scope, seeded=seed is not None, option="--seed")
    return experiment if seed is None else specs.with_seed(experiment, seed, scope)

# --dtype and --isa are choices (shell completion offers them, a typo is a usage error,
# exit 2); controls.DTYPES and ISAS are the source, and the Literals must list the same.
Dtype = Literal["float32", "float64", "bfloat16", "bf16-mixed"]
Isa = Literal["native", "default", "avx2", "avx512"]
assert get_args(Dtype) == DTYPES and get_args(Isa) == ISAS

DtypeOption = Annotated[Dtype, typer.Option(help="Arithmetic of the run.")]
IsaOption = Annotated[Isa, typer.Option(help="Cap every dispatcher (ATen, oneDNN, MKL) at this ISA.")]
