"""JSON Schemas (draft 2020-12) of bnaudit's machine-readable documents, shipped in the package.

One ``<name>.schema.json`` per document, its ``$id`` the document's ``schema`` string
(``fingerprint`` -> ``bnaudit.fingerprint/1``); ``defs`` holds what they share.  The
schemas refer to each other by those ids (``../bnaudit.defs/1#/$defs/sha256``), so a
validator needs all of them registered under their ``$id`` (``all_schemas``).

The standard library only: validating is the caller's business (the tests use jsonschema).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SUFFIX = ".schema.json"


def names() -> list[str]:
    """The names of the shipped schemas (``fingerprint``, ``record``, ..., ``defs``), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in resources.files(__name__).iterdir() if p.name.endswith(SUFFIX))


def load(name: str) -> dict[str, Any]:
    """The schema called ``name`` (e.g. ``fingerprint``) as a dict; KeyError for an unknown name."""
    if name not in names():
        raise KeyError(f"no bnaudit schema {name!r}; schemas are {', '.join(names())}")
    schema: dict[str, Any] = json.loads(resources.files(__name__).joinpath(name + SUFFIX).read_text("utf-8"))
    return schema


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every schema by its ``$id`` (the registry a validator needs to follow the references between them)."""
    return {schema["$id"]: schema for schema in map(load, names())}
