"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SpecOption = Annotated[Path | None, typer.Option("--spec", help="TOML file overriding the embedded default spec.")]
