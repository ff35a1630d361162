"""The tree keeps pyproject.toml's ruff rules (formatted at line length 100, free of syntax errors,
unused or undefined names and unsorted imports), and no function outside the tests runs past 50
lines."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGES = ["graphs", "compiler", "runtime", "attention_compiler", "scripts", "studies"]
FOLDERS = [*PACKAGES, "tests"]
LONGEST_FUNCTION = 50  # lines, its signature and docstring included


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_the_tree_keeps_ruffs_rules(command):
    pytest.importorskip("ruff", reason="needs ruff (pip install -e '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *FOLDERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_function_outside_the_tests_runs_past_50_lines():
    """Read with the ast module: every function and method, nested ones too, from its def to its
    last line."""
    import ast

    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, "\n".join(long)
