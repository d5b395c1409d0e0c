"""Imports point one way: the build package may use the engines, never the reverse (serving an
engine directory must not need, or import, the build code)."""

from __future__ import annotations

import ast
from pathlib import Path

import reranker_runtime

PACKAGE = Path(reranker_runtime.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engines_and_model_family_never_import_the_build_package() -> None:
    modules = [*sorted((PACKAGE / "engines").glob("*.py")), PACKAGE / "model_family.py"]
    assert len(modules) > 5
    offenders = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in modules
        for name in _imports(path)
        if name.startswith("reranker_runtime.engine_build")
    }
    assert offenders == set()
