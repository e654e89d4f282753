"""The test doubles are written from the upstream formats: they import none of the code they check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
DOUBLES = ("limitador_emulator.py", "k8s_emulator.py")


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("double", DOUBLES)
def test_a_test_double_imports_no_production_module(double: str) -> None:
    ours = {m for m in imported_modules(TESTS / double) if m.split(".")[0] == "extproc"}
    # Only code generated from protos/ (the wire declaration of Kuadrant's service) may be shared.
    assert {m for m in ours if not m.startswith("extproc._gen.")} == set()
