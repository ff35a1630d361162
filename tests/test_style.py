"""The tree keeps pyproject.toml's ruff rules: formatted at line length 100, and free of syntax
errors, unused or undefined names and unsorted imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

FOLDERS = ["graphs", "compiler", "runtime", "scripts", "tests"]


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
