"""Every target's graph on ONNX Runtime CPU against torch.nn.MultiheadAttention in float64.

Every structural variant meets every mask combination (attention_compiler/benchmark/matrix.py); weights are random with
non-zero biases (torch initialises biases to zero, which would hide a missing bias). Each graph is
checked at two (batch, tgt_len, src_len) shapes. fp32 tolerance: 1e-5 of the output's scale (the
measured error is near 1e-7; float32 epsilon is 1.2e-7); fp16: 1e-2 (measured near 1e-3).
"""

from __future__ import annotations

import functools

import pytest

from attention_compiler.benchmark.matrix import SHAPES, option_matrix
from compiler import compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    check_session,
    compare_cases,
    reference_cases,
)
from runtime.ort import OrtSession

MATRIX = [pytest.param(o, id=i) for i, o in option_matrix()]


@functools.lru_cache(maxsize=4)  # the cases run option set by option set
def _references(options: frozenset):
    """The spec, its weights, the canonical graph, and the references' outputs (float64 NumPy and
    torch) at both shapes: the same for all eight target and precision cases of an option set."""
    spec = AttentionSpec(**dict(options))
    weights = AttentionWeights.random(spec, seed=7)
    cases = reference_cases(spec, weights, shapes=SHAPES, seed=1)
    return spec, build_mha(spec, weights), cases


# ort-cuda compiles to the ort-cpu graph and tensorrt's attention-op form to the onnx-attention graph
# (tests/test_new_targets.py), so these four cover every graph a target emits.
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("target", ["portable", "onnx-attention", "ort-cpu", "tensorrt"])
@pytest.mark.parametrize(
    "options", MATRIX
)  # nearest the test: each option set's cases run together
def test_every_target_matches_torch(options, target, precision):
    spec, canonical, cases = _references(frozenset(options.items()))
    model = compile_model(canonical, target, precision)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    report = compare_cases(OrtSession(model), spec, cases, tolerance)
    assert {c.reference for c in report.comparisons} == {"numpy", "torch"}
    assert report.passed, report.table()


@pytest.mark.parametrize("batch_first", [False, True])
def test_wide_heads_match_torch(batch_first):
    """A realistic width: 64 wide, 8 heads, masks and weights on."""
    spec = AttentionSpec(
        64,
        8,
        batch_first=batch_first,
        key_padding_mask="bool",
        attn_mask="float",
        is_causal=True,
        need_weights=True,
    )
    weights = AttentionWeights.random(spec, seed=3)
    report = check_session(
        OrtSession(build_mha(spec, weights)), spec, weights, shapes=((2, 33, 33), (1, 17, 40))
    )
    assert report.passed, report.table()
