"""docs/RELIABILITY.md names the tests behind each row; every name must be a test in the suite."""

import re

from conftest import ROOT

DOC = ROOT / "docs" / "RELIABILITY.md"
REFERENCE = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def test_every_row_names_tests_that_exist():
    text = DOC.read_text()
    failure_rows = [line for line in text.split("## Failures and responses")[1].split("\n## ")[0].splitlines()
                    if line.startswith("| ") and not line.startswith("| Failure")]
    assert len(failure_rows) >= 25
    for row in failure_rows:
        assert REFERENCE.search(row), f"row without a test: {row[:80]}"
    for path, name in REFERENCE.findall(text):
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is named in RELIABILITY.md but is no test"
