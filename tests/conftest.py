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
# The scripts import each other as top-level modules (compile.py imports console, config...), and
# the tests import them the same way: scripts/ is on the path once, here.
sys.path.insert(0, str(ROOT / "scripts"))


def run_script(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run a script from scripts/ in this process: its main(argv), with stdout and stderr captured
    and its exit status returned as a fresh interpreter's would be (no interpreter start, no
    second import of torch and onnxruntime)."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(script.removesuffix(".py"))
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
    import compiler.fuse_ort_mha as compiler_fuse_ort_mha
    import compiler.mask_forms as compiler_mask_forms

    monkeypatch.setattr(compiler_mask_forms, "CAUSAL_BLOCK", 4)
    monkeypatch.setattr(compiler_mask_forms, "CHUNK_BLOCK", 4)
    monkeypatch.setattr(compiler_fuse_ort_mha, "CAUSAL_FROM", 8)
    monkeypatch.setattr(compiler_fuse_ort_mha, "CHUNKS_FROM", 8)
    monkeypatch.setattr(compiler_fuse_ort_mha, "ROWS_FROM", 8)
    monkeypatch.setattr(compiler_fuse_ort_mha, "BLOCKS_FROM", 8)
