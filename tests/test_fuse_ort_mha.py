"""FuseOrtMultiHeadAttentionPass alone and within the ort-cpu target."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from compiler import compile_model
from compiler.targets import attention_form
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import FP16_TOLERANCE, FP32_TOLERANCE, check_session, errors, random_inputs
from runtime.ort import OrtSession
from runtime.reference import mha_reference


def _ops(model):
    return collections.Counter((n.domain, n.op_type) for n in model.graph.node)


@pytest.mark.parametrize(
    ("maxima", "attention_op"), [(None, False), ((2, 128), True), ((None, 383), True)]
)
def test_ort_cpu_self_attention_projects_inside_attention_below_384_and_flash_above(
    maxima, attention_op
):
    """Below ATTENTION_UNTIL (384) tokens com.microsoft.Attention takes the layer's input and the packed
    Q/K/V weights (it projects inside the op: no Split, no head split); from there on
    MultiHeadAttention's flash path. A length the model declares decides it at compile time; else
    an If on the length. The projections are not left in the main graph either way."""
    from graphs.builder import declare_maxima

    spec = AttentionSpec(512, 8, batch_first=True, self_attention=True)
    source = build_mha(spec, AttentionWeights.random(spec))
    if maxima is not None:
        declare_maxima(source, *maxima)
    model = compile_model(source, "ort-cpu")
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(model)
    assert ops[("", "Softmax")] == 0 and ops[("", "MatMul")] == 1  # out_proj only
    if maxima is None:
        (branch,) = [n for n in model.graph.node if n.op_type == "If"]
        long_form, short = (
            next(a.g for a in branch.attribute if a.name == name)
            for name in ("then_branch", "else_branch")
        )
        assert [n.op_type for n in short.node] == ["Attention"]
        # q, k, v each by its columns of the packed weight (constants ONNX Runtime folds), no Split of (N, L, 3E)
        assert [n.op_type for n in long_form.node] == ["Slice", "Slice", "MatMul", "Add"] * 3 + [
            "MultiHeadAttention"
        ]
    else:
        assert ops[("com.microsoft", "Attention")] == attention_op
        assert ops[("com.microsoft", "MultiHeadAttention")] == (not attention_op)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"key_padding_mask": "bool"},
        {"is_causal": True, "key_padding_mask": "float"},
        {"attn_mask": "float"},
    ],
    ids=lambda o: "-".join(o) or "no-mask",
)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_attention_op_form_equals_the_reference(options, precision):
    """The short form (com.microsoft.Attention on x and the packed weights, masks as attention_bias)
    against the float64 reference, with a fully masked row where the mask allows one."""
    spec = AttentionSpec(32, 4, batch_first=True, self_attention=True, **options)
    weights = AttentionWeights.random(spec, seed=2)
    model = compile_model(build_mha(spec, weights), "ort-cpu", precision)
    assert any(n.op_type == "Attention" for n in _all_nodes(model.graph))
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    report = check_session(
        OrtSession(model),
        spec,
        weights,
        shapes=((2, 5, 5), (3, 9, 9)),
        tolerance=tolerance,
        mask_rate=0.5,
    )
    assert report.passed, report


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


def test_ort_cpu_packs_a_kv_cache_graph_whose_steps_take_few_rows():
    spec = AttentionSpec(
        64, 4, batch_first=True, self_attention=True, is_causal=True, kv_cache=True
    )
    model = compile_model(build_mha(spec, AttentionWeights.random(spec)), "ort-cpu")
    assert _ops(model)[("", "MatMul")] == 2 and _ops(model)[("", "Split")] == 1


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_keeps_the_core_unfused(average):
    spec = AttentionSpec(
        16, 4, need_weights=True, average_attn_weights=average, key_padding_mask="bool"
    )
    model = compile_model(build_mha(spec, AttentionWeights.random(spec)), "ort-cpu")
    ops = _ops(model)
    assert ops[("com.microsoft", "MultiHeadAttention")] == 0 and ops[("", "Softmax")] == 1


@pytest.mark.parametrize(
    "options",
    [
        {"key_padding_mask": "bool"},
        {"key_padding_mask": "float", "attn_mask": "float", "attn_mask_3d": True},
        {"attn_mask": "bool", "is_causal": True, "kdim": 6, "vdim": 6},
    ],
)
def test_fused_graph_keeps_the_fully_masked_row_rule(options):
    """MultiHeadAttention alone returns NaN on such rows; the fused graph returns out_proj.bias."""
    spec = AttentionSpec(16, 4, batch_first=True, **options)
    weights = AttentionWeights.random(spec, seed=4)
    canonical = build_mha(spec, weights)
    fused = compile_model(canonical, "ort-cpu")
    assert (
        attention_form(fused) == "com.microsoft.MultiHeadAttention"
        and _ops(fused)[("", "Softmax")] == 0
    )
    feeds = random_inputs(spec, (3, 4, 6), np.random.default_rng(0))
    if "key_padding_mask" in feeds:
        feeds["key_padding_mask"][1] = True if spec.key_padding_mask == "bool" else -np.inf
    if "attn_mask" in feeds:
        feeds["attn_mask"][..., 2, :] = True if spec.attn_mask == "bool" else -np.inf
    got, want = OrtSession(fused).run(feeds), OrtSession(canonical).run(feeds)
    assert np.isfinite(got["attn_output"]).all()
    assert errors(got["attn_output"], want["attn_output"])[1] <= 1e-5
    if "attn_mask" in feeds:  # query row 2 sees no key in any batch entry
        bias = np.broadcast_to(weights.tensors["out_proj.bias"], (3, 16))
        np.testing.assert_allclose(got["attn_output"][:, 2], bias, rtol=0, atol=1e-6)


def test_the_manifest_names_the_form_each_target_got(run_cli, tmp_path):
    import json

    result = run_cli(
        "compile.py",
        *"--embed-dim 64 --num-heads 4 --self-attention --causal --target".split(),
        *"ort-cpu --check --out".split(),
        tmp_path / "o",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["target"] == "ort-cpu" and "MultiHeadAttention" in manifest["target_form"]
    assert (
        manifest["attention_form"] == "com.microsoft.Attention, com.microsoft.GroupQueryAttention"
    )  # short, long
    assert manifest["check"]["passed"]


def test_scores_used_outside_the_core_stay_unfused():
    """A graph that also outputs the raw scores cannot lose them to the fused op."""
    spec = AttentionSpec(16, 4, batch_first=True, self_attention=True, key_padding_mask="bool")
    model = build_mha(spec, AttentionWeights.random(spec))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("scores/MatMul", onnx.TensorProto.FLOAT, None)
    )
    fused = compile_model(model, "ort-cpu")
    assert (
        _ops(fused)[("com.microsoft", "MultiHeadAttention")] == 0
        and _ops(fused)[("", "Softmax")] == 1
    )


@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_key_padding_mask_goes_into_one_more_head_dimension(precision, mask, monkeypatch):
    """No mask input at all, so ONNX Runtime's CPU kernel takes its flash path: each query head gets one
    more entry (1/scale) and each key head the key's bias, so scale * q'.k' = scale * q.k + bias. No
    (N, 1, L, S) bias is built, and the masked keys' bias stays finite in the precision. (The form of
    long inputs; ROWS_FROM is lowered so that the check's short inputs take it.)"""
    import compiler.lowerings.padded_rows

    monkeypatch.setattr(compiler.lowerings.padded_rows, "ROWS_FROM", 1)
    spec = AttentionSpec(16, 4, batch_first=True, self_attention=True, key_padding_mask=mask)
    weights = AttentionWeights.random(spec)
    model = compile_model(build_mha(spec, weights), "ort-cpu", precision)
    branch = next(n for n in model.graph.node if n.op_type == "If")
    rows = next(a.g for a in branch.attribute if a.name == "then_branch")
    loop = next(n for n in rows.node if n.op_type == "Loop")
    body = next(a.g for a in loop.attribute if a.name == "body")
    per_entry = next(n for n in body.node if n.op_type == "If")
    widened = next(a.g for a in per_entry.attribute if a.name == "else_branch")
    mha = next(n for n in widened.node if n.op_type == "MultiHeadAttention")
    assert len([i for i in mha.input if i]) == 3  # query, key, value
    assert not any(n.op_type == "Expand" for n in rows.node)
    floor = next(t for t in model.graph.initializer if "key_bias_floor" in t.name)
    assert (
        np.isfinite(onnx.numpy_helper.to_array(floor)).all()
        and onnx.numpy_helper.to_array(floor) < -6e4
    )
    shapes = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert shapes["attention/widened_merge_shape"].tolist() == [
        0,
        0,
        4 * (4 + 1),
    ]  # head size 4 + 1
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    report = check_session(OrtSession(model), spec, weights, tolerance=tolerance)
    assert report.passed, report.table()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_ort_cuda_gives_a_causal_mask_alone_to_the_ops_own_flag(precision, batch_first):
    """ONNX Runtime's CUDA MultiHeadAttention runs flash attention only without attention_bias and
    key_padding_mask, and its ``unidirectional`` flag is the causal mask of self-attention: ort-cuda
    sets it where the causal mask is the only one. Checked on the CPU kernel, which has the same
    flag, against the float64 reference (fp32 1e-5, fp16 1e-2); with padding, or in cross-attention
    (where L and S differ), the mask stays a bias."""
    spec = AttentionSpec(16, 4, batch_first=batch_first, self_attention=True, is_causal=True)
    weights = AttentionWeights.random(spec, seed=7)
    model = compile_model(build_mha(spec, weights), "ort-cuda", precision)
    (op,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert [i for i in op.input if i] == list(op.input[:3]) and any(
        a.name == "unidirectional" and a.i == 1 for a in op.attribute
    )
    session = OrtSession(model)
    for length in (1, 6, 9):
        feeds = random_inputs(spec, (2, length, length), np.random.default_rng(length))
        got, want = (
            session.run(feeds)["attn_output"],
            mha_reference(spec, weights, feeds)["attn_output"],
        )
        assert errors(got, want)[1] <= (FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE)
    for other in (
        AttentionSpec(16, 4, self_attention=True, is_causal=True, key_padding_mask="bool"),
        AttentionSpec(16, 4, is_causal=True),
    ):
        model = compile_model(build_mha(other, AttentionWeights.random(other)), "ort-cuda")
        (op,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
        assert (
            not any(a.name == "unidirectional" for a in op.attribute)
            and len(op.input) >= 6
            and op.input[5]
        )
