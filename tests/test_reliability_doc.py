"""docs/RELIABILITY.md names the tests behind each row; every name must be a test in the suite. The
repository stands alone: its docs and code point at no file outside it."""

import re

from conftest import ROOT

DOC = ROOT / "docs" / "RELIABILITY.md"
REFERENCE = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def test_every_row_names_tests_that_exist():
    text = DOC.read_text()
    failure_rows = [
        line
        for line in text.split("## Failures and responses")[1].split("\n## ")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| Failure")
    ]
    assert len(failure_rows) >= 25
    for row in failure_rows:
        assert REFERENCE.search(row), f"row without a test: {row[:80]}"
    for path, name in REFERENCE.findall(text):
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), (
            f"{path}::{name} is named in RELIABILITY.md but is no test"
        )


def test_the_repository_points_at_no_design_file_outside_it():
    """Users have only the repository: docs/ARCHITECTURE.md carries the architecture and the contract,
    and every module or doc path it names exists."""
    tracked = [
        p
        for folder in (
            "attention_compiler",
            "compiler",
            "graphs",
            "runtime",
            "scripts",
            "studies",
            "tests",
            "docs",
        )
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".md")
    ] + [ROOT / "README.md"]
    outside = (
        "../" + "shared",
        "DESIGN" + ".md",
    )  # spelled apart, so that this file does not name them
    for path in tracked:
        text = path.read_text()
        assert not any(name in text for name in outside), (
            f"{path} points at a file outside the repository"
        )
    rooms = "attention_compiler|compiler|graphs|runtime|scripts|studies|tests|docs"
    for doc in ("docs/ARCHITECTURE.md", "README.md", "docs/BENCHMARKS.md", "docs/RELIABILITY.md"):
        text = (ROOT / doc).read_text()
        for name in re.findall(rf"`((?:{rooms})/[\w/]+\.(?:py|md))`", text):
            assert (ROOT / name).exists(), f"{doc} names {name}, which is not in the repository"
