"""Property-based equivalence over the whole spec space (hypothesis).

Each example draws a spec (every torch option, every mask kind, head_dim and num_heads down to 1,
KV-cache steps against torch's one causal pass over past and new tokens),
a shape (lengths down to 1), a share of masked keys (none, some, all) and a seed, compiles it for
every target ONNX Runtime CPU runs, and compares each graph with the float64 NumPy reference and
with torch in float64. Tolerances: fp32 1e-5 of the output's scale (float32 rounding through two
projections and a softmax), fp16 1e-2 (an 11-bit significand).

The 'ci' profile (the default; tests/conftest.py) runs a fixed set of examples so CI is fast and
repeatable; ``HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py`` draws 500 fresh ones
per test (docs/RELIABILITY.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compiler import compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    compare_cases,
    random_inputs,
    reference_cases,
)
from runtime.ort import OrtSession
from runtime.reference import mha_reference

# ort-cuda emits the ort-cpu graph and tensorrt's attention-op form the onnx-attention graph
# (tests/test_new_targets.py): these four are every graph ONNX Runtime CPU can run.
CPU_TARGETS = ("portable", "onnx-attention", "ort-cpu", "tensorrt")
MASKS = st.sampled_from([None, "bool", "float"])


@st.composite
def specs(draw: st.DrawFn) -> AttentionSpec:
    heads, head_dim = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    self_attention = draw(st.booleans())
    width = st.none() if self_attention else st.none() | st.integers(1, 9)
    attn_mask = draw(MASKS)
    need_weights = draw(st.booleans())
    if self_attention and draw(
        st.booleans()
    ):  # a KV-cache step: SRC is then the past's length, 1 to 6
        return AttentionSpec(
            heads * head_dim,
            heads,
            bias=draw(st.booleans()),
            batch_first=draw(st.booleans()),
            self_attention=True,
            key_padding_mask=draw(MASKS),
            is_causal=True,
            kv_cache=True,
        )
    return AttentionSpec(
        heads * head_dim,
        heads,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        kdim=draw(width),
        vdim=draw(width),
        batch_first=draw(st.booleans()),
        self_attention=self_attention,
        key_padding_mask=draw(MASKS),
        attn_mask=attn_mask,
        attn_mask_3d=attn_mask is not None and draw(st.booleans()),
        is_causal=draw(st.booleans()),
        need_weights=need_weights,
        average_attn_weights=not need_weights or draw(st.booleans()),
    )


SHAPES = st.tuples(
    st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)
)  # (batch, tgt_len, src_len)


def term_scale(
    spec: AttentionSpec, weights: AttentionWeights, feeds: dict[str, np.ndarray]
) -> dict[str, float]:
    """Per output, the largest magnitude among the terms it sums: the reference run on |weights| and
    |inputs| (masks as they are). Rounding error scales with the terms, not with their sum, which
    cancellation can make small: at embed_dim 1 an fp16 output of 1e-3 carries an error of 4e-5."""
    magnitudes = AttentionWeights.from_state_dict(
        spec, {k: np.abs(v) for k, v in weights.tensors.items()}
    )
    inputs = {k: np.abs(v) if k in ("query", "key", "value") else v for k, v in feeds.items()}
    return {
        name: float(np.nanmax(np.abs(out), initial=0.0))
        for name, out in mha_reference(spec, magnitudes, inputs).items()
    }


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@given(
    spec=specs(),
    shape=SHAPES,
    mask_rate=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_every_cpu_target_equals_numpy_and_torch(precision, spec, shape, mask_rate, seed):
    """fp32 within 1e-5 of the output's scale. fp16 within 1e-2 of the terms' scale (term_scale):
    its weights alone are rounded by up to 2**-11 of their size."""
    weights = AttentionWeights.random(spec, seed)
    canonical = build_mha(spec, weights)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    scale = term_scale(
        spec, weights, random_inputs(spec, shape, np.random.default_rng(seed), mask_rate)
    )
    # the references' outputs once for all targets: the same inputs, the same float64 results
    cases = reference_cases(spec, weights, shapes=[shape], seed=seed, mask_rate=mask_rate)
    for target in CPU_TARGETS:
        session = OrtSession(compile_model(canonical, target, precision))
        report = compare_cases(session, spec, cases, tolerance)
        assert {c.reference for c in report.comparisons} == {"numpy", "torch"}
        if precision == "fp32":
            assert report.passed, f"{target} {spec}\n{report.table()}"
        for c in report.comparisons:
            assert c.max_abs_error <= tolerance * scale[c.output], (
                f"{target} {precision} {spec}\n{report.table()}"
            )


UNMASKED = {
    "key_padding_mask": None,
    "attn_mask": None,
    "attn_mask_3d": False,
    "is_causal": False,
    "kv_cache": False,
}


@given(spec=specs(), shape=SHAPES, seed=st.integers(0, 2**16), data=st.data())
def test_nan_and_inf_propagate_as_in_the_float64_reference(spec, shape, seed, data):
    """A NaN or infinity in an input reaches exactly the outputs it reaches in the NumPy reference,
    and no other output is NaN. Masks are off: where a non-finite value sits at a masked key, some
    targets let it through and some do not (docs/RELIABILITY.md). That finite inputs never give a
    NaN, masks on, is the equivalence test's: its references are finite. torch's CPU kernel can
    drop a NaN query (RELIABILITY.md), so torch is not the reference here."""
    spec = dataclasses.replace(spec, **UNMASKED)
    weights = AttentionWeights.random(spec, seed)
    feeds = random_inputs(spec, shape, np.random.default_rng(seed))
    name = data.draw(st.sampled_from([n for n in ("query", "key", "value") if n in feeds]))
    index = tuple(data.draw(st.integers(0, d - 1)) for d in feeds[name].shape)
    feeds[name][index] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    _nan_where_the_reference_has_it(spec, weights, feeds, f"{name}{index} = {feeds[name][index]}")


def _nan_where_the_reference_has_it(spec, weights, feeds, what: str) -> None:
    """Every CPU target's outputs are NaN exactly where the float64 reference's are."""
    with np.errstate(invalid="ignore", over="ignore"):
        expected = mha_reference(spec, weights, feeds)
    canonical = build_mha(spec, weights)
    for target in CPU_TARGETS:
        got = OrtSession(compile_model(canonical, target, "fp32")).run(feeds)
        for output, want in expected.items():
            assert np.array_equal(np.isnan(got[output]), np.isnan(want)), (
                f"{target}: {what}, {output}, {spec}"
            )


FLOAT_MASKS = ("key_padding_mask", "attn_mask")


@given(spec=specs(), shape=SHAPES, seed=st.integers(0, 2**16), data=st.data())
def test_nan_in_a_float_mask_propagates_as_in_the_float64_reference(spec, shape, seed, data):
    """A NaN in a float mask reaches exactly the outputs it reaches in the NumPy reference (and in
    torch), also where every other key of its row is -inf: the fully-masked-row guard took such a
    row for dead and gave it the zero context."""
    kinds = {m: data.draw(st.sampled_from(["float", getattr(spec, m)])) for m in FLOAT_MASKS}
    if spec.kv_cache:
        kinds["attn_mask"] = None
    if "float" not in kinds.values():
        kinds["key_padding_mask"] = "float"
    spec = dataclasses.replace(
        spec, **kinds, attn_mask_3d=spec.attn_mask_3d and kinds["attn_mask"] is not None
    )
    weights = AttentionWeights.random(spec, seed)
    rng = np.random.default_rng(seed)
    feeds = random_inputs(spec, shape, rng, data.draw(st.sampled_from([0.0, 0.3, 1.0])))
    name = data.draw(st.sampled_from([m for m in FLOAT_MASKS if kinds[m] == "float"]))
    index = tuple(data.draw(st.integers(0, d - 1)) for d in feeds[name].shape)
    if data.draw(st.booleans()):  # every other key of the row -inf
        feeds[name][index[:-1]] = -np.inf
    feeds[name][index] = np.nan
    _nan_where_the_reference_has_it(spec, weights, feeds, f"{name}{index} = NaN")
