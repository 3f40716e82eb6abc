"""Options and output conventions shared by several commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bnaudit import __version__

ERROR_SCHEMA = "bnaudit.error/1"
RUN_SCHEMA = "bnaudit.run-summary/1"
ENV_SCHEMA = "bnaudit.env/1"


def json_document(schema: str, body: dict[str, Any]) -> str:
    """A ``--json`` output: its schema and the bnaudit version that wrote it, then the body."""
    return json.dumps({"schema": schema, "bnaudit": __version__, **body}, indent=1, sort_keys=True)


SpecOption = Annotated[Path | None, typer.Option("--spec", help="TOML file overriding the embedded default spec.")]
