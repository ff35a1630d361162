from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests (tests/test_properties.py): 'ci' replays a fixed set of examples, so CI is quick
# and repeatable; 'thorough' draws fresh ones, for a run by hand (docs/RELIABILITY.md).
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]
# The scripts and the studies import each other as top-level modules (corpus.py imports model_zoo,
# triton_server.py triton_guard), and the tests import them the same way: both folders are on the
# path once, here.
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "studies")]
# compile.py and bench.py in scripts/ only run the installed commands' modules
COMMANDS = {
    "compile.py": "attention_compiler.cli.compile",
    "bench.py": "attention_compiler.cli.bench",
}


def run_script(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run a command in this process: its main(argv), with stdout and stderr captured
    and its exit status returned as a fresh interpreter's would be (no interpreter start, no
    second import of torch and onnxruntime)."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(COMMANDS.get(script, script.removesuffix(".py")))
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = module.main(argv)
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess([script, *argv], status or 0, out.getvalue(), err.getvalue())


def run_fresh(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run a script from scripts/ in a fresh interpreter, exactly as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def run_cli():
    """A script's command line, run in this process (run_fresh for a new interpreter)."""
    return run_script


def parse_triton_config(text: str):
    """A config.pbtxt through the model_config protobuf tritonclient ships; the calling test skips
    where tritonclient is missing, and only that test (the module still collects)."""
    model_config_pb2 = pytest.importorskip(
        "tritonclient.grpc.model_config_pb2",
        reason="needs tritonclient[grpc] (pip install -e '.[test]')",
    )
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 queries, and the long forms from length 8 on, so that short inputs cover both forms
    and ragged last blocks."""
    from compiler.lowerings import causal_blocks, causal_chunks, padded_rows, query_blocks

    monkeypatch.setattr(causal_blocks, "CAUSAL_BLOCK", 4)
    monkeypatch.setattr(query_blocks, "QUERY_BLOCK", 4)
    monkeypatch.setattr(causal_chunks, "CHUNK_BLOCK", 4)
    monkeypatch.setattr(causal_blocks, "CAUSAL_FROM", 8)
    monkeypatch.setattr(causal_chunks, "CHUNKS_FROM", 8)
    monkeypatch.setattr(padded_rows, "ROWS_FROM", 8)
    monkeypatch.setattr(query_blocks, "BLOCKS_FROM", 8)
