"""Mutations of real JSON documents, and the errors a bnaudit schema finds in one.

Shared by the schema tests (``test_schemas.py``) and the tests whose documents are too
costly to make twice (``test_solve.py``): each mutation is a function that changes a deep
copy in place, and fails loudly if the path it names is not in the real document, so that a
mutation cannot pass by changing nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any

import jsonschema
import referencing
from referencing.jsonschema import DRAFT202012

from bnaudit import schemas

UNKNOWN = "surprise"
Mutation = Callable[[Any], None]


@cache
def registry() -> referencing.Registry:
    """Every schema under its $id, so that the references between them resolve."""
    resources = [(i, DRAFT202012.create_resource(s)) for i, s in schemas.all_schemas().items()]
    return referencing.Registry().with_resources(resources)


def errors(name: str, doc: Any) -> list[str]:
    """What the schema NAME finds wrong in DOC, one line per error (none: it validates)."""
    validator = jsonschema.Draft202012Validator(schemas.load(name), registry=registry())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def _parent(doc: Any, path: tuple[Any, ...]) -> tuple[Any, Any]:
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node, path[-1]


def drop(*path: Any) -> Mutation:
    def apply(doc: Any) -> None:
        node, key = _parent(doc, path)
        assert key in node, f"{'/'.join(map(str, path))} is not in the real document"
        del node[key]
    return apply


def put(*path: Any, value: Any) -> Mutation:
    def apply(doc: Any) -> None:
        node, key = _parent(doc, path)
        assert isinstance(node, dict) or key < len(node), f"{'/'.join(map(str, path))} is not in the real document"
        node[key] = value
    return apply


def cut(*path: Any) -> Mutation:
    """A hex digest one digit short."""
    def apply(doc: Any) -> None:
        node, key = _parent(doc, path)
        assert re.fullmatch(r"[0-9a-f]{12,}", node[key]), f"{'/'.join(map(str, path))} is not a digest"
        node[key] = node[key][:-1]
    return apply


def generic(doc: dict[str, Any]) -> list[tuple[str, Mutation]]:
    """Each top-level key removed (every one the writers write is required), an unknown one, a wrong schema."""
    out: list[tuple[str, Mutation]] = [(f"no {k}", drop(k)) for k in sorted(doc)]
    out.append(("unknown top-level key", put(UNKNOWN, value=1)))
    out.append(("wrong schema", put("schema", value=doc["schema"].rpartition("/")[0] + "/99")))
    return out
