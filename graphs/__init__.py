"""Attention specs, their weights, and the canonical (unfused) ONNX graphs built from them."""

from graphs.live_modules import spec_from_module
from graphs.mha import build_mha
from graphs.spec import AttentionSpec, SpecError, TensorSig
from graphs.weights import AttentionWeights, WeightsError, expected_shapes

__all__ = [
    "AttentionSpec",
    "AttentionWeights",
    "SpecError",
    "TensorSig",
    "WeightsError",
    "build_mha",
    "expected_shapes",
    "spec_from_module",
]
