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


@pytest.fixture
def run_cli():
    """Run a script from scripts/ in a fresh interpreter, as a user would."""

    def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


def parse_triton_config(text: str):
    """A config.pbtxt through the model_config protobuf tritonclient ships; the calling test skips
    where tritonclient is missing, and only that test (the module still collects)."""
    model_config_pb2 = pytest.importorskip(
        "tritonclient.grpc.model_config_pb2",
        reason="needs tritonclient[grpc] (pip install -e '.[test]')",
    )
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())
