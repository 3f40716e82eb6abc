"""The package's shape: imports flow down the pipeline, light stages stay light, functions stay short.

These read the source (ast), so they hold for imports inside functions too, which a
run-time check of ``sys.modules`` would only see when that function ran.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bnaudit"
MAX_FUNCTION_LINES = 80

# Stages that must import neither torch nor mpmath, so that a light CI job (compare,
# check, report) runs without them.
LIGHT = ("bnaudit.api", "bnaudit.pytest_plugin", "bnaudit.fileio", "bnaudit.layout", "bnaudit.blocks",
         "bnaudit.firststep", "bnaudit.bundle", "bnaudit.record", "bnaudit.compare", "bnaudit.amplification",
         "bnaudit.reference.sensitivity", "bnaudit.divergence",
         "bnaudit.check", "bnaudit.baseline", "bnaudit.matrix", "bnaudit.report", "bnaudit.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every bnaudit module ``name`` imports, anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_leaves_import_no_stage():
    """fileio, layout, blocks, errors and interrupts are leaves: every stage may use them, they use no stage."""
    graph = _graph()
    allowed = {"bnaudit", "bnaudit.errors", "bnaudit.interrupts", "bnaudit.bits", "bnaudit.spec", "bnaudit.fileio",
               "bnaudit.layout", "bnaudit.envinfo"}
    for leaf in ("bnaudit.fileio", "bnaudit.layout", "bnaudit.blocks", "bnaudit.errors", "bnaudit.bits",
                 "bnaudit.interrupts"):
        assert graph[leaf] <= allowed, f"{leaf} imports {sorted(graph[leaf] - allowed)}"


def test_light_stages_import_neither_torch_nor_mpmath():
    """Transitively, at import time, in a fresh interpreter."""
    modules = sorted(m for m in _modules() if m.startswith(LIGHT))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "heavy = sorted({'torch', 'mpmath'} & set(sys.modules))\nprint(' '.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the light stages loads {out.stdout.strip()}"


def test_no_function_is_longer_than_the_limit():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
