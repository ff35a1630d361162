"""Each pass alone: (a) its output graph computes what its input graph computed, on ONNX Runtime CPU
and random inputs, within float32 rounding (1e-5 of scale); (b) the structural change it promises."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from compiler.cleanup import CleanupPass
from compiler.fold_scale import FoldScalePass
from compiler.pack_projections import PackProjectionsPass
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import errors, random_inputs
from runtime.ort import OrtSession

SELF = AttentionSpec(
    16, 4, self_attention=True, batch_first=True, key_padding_mask="bool", need_weights=True
)
CROSS = AttentionSpec(16, 4, kdim=6, vdim=10, attn_mask="float", is_causal=True)
NO_BIAS = AttentionSpec(16, 4, self_attention=True, bias=False, add_bias_kv=True)


def _apply(pass_cls, model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    ir_model = ir.serde.deserialize_model(model)
    result = ir.passes.Sequential(pass_cls(), CleanupPass())(ir_model)
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.modified


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _assert_same_outputs(spec, before, after):
    a, b = OrtSession(before), OrtSession(after)
    rng = np.random.default_rng(0)
    for shape in ((2, 5, 7), (1, 3, 9)):
        feeds = random_inputs(spec, shape, rng)
        want, got = a.run(feeds), b.run(feeds)
        for name in want:
            assert errors(got[name], want[name])[1] <= 1e-5, name


@pytest.mark.parametrize("spec", [SELF, CROSS, NO_BIAS])
def test_fold_scale_removes_the_score_mul_and_keeps_outputs(spec):
    before = build_mha(spec, AttentionWeights.random(spec, seed=1))
    after, modified = _apply(FoldScalePass, before)
    assert modified
    assert _ops(before)["Mul"] == 1 and _ops(after)["Mul"] == 0
    assert _ops(after)["MatMul"] == _ops(before)["MatMul"]
    _assert_same_outputs(spec, before, after)


def test_fold_scale_scales_exactly_the_query_projection():
    weights = AttentionWeights.random(SELF, seed=1)
    after, _ = _apply(FoldScalePass, build_mha(SELF, weights))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    q_node = next(n for n in after.graph.node if n.name == "q_proj/MatMul")
    w_q, _, _ = weights.in_proj(SELF)
    np.testing.assert_allclose(
        inits[q_node.input[1]], w_q.T / 2.0, rtol=1e-7
    )  # head_dim 4: scale 1/2
    k_node = next(n for n in after.graph.node if n.name == "k_proj/MatMul")
    np.testing.assert_array_equal(inits[k_node.input[1]], weights.in_proj(SELF)[1].T)


@pytest.mark.parametrize(("spec", "matmuls_after"), [(SELF, 4), (NO_BIAS, 4)])
def test_pack_projections_makes_one_qkv_matmul_in_self_attention(spec, matmuls_after):
    before = build_mha(spec, AttentionWeights.random(spec, seed=2))
    after, modified = _apply(PackProjectionsPass, before)
    assert modified
    assert _ops(before)["MatMul"] == 6 and _ops(after)["MatMul"] == matmuls_after
    assert _ops(after)["Split"] == 1
    packed = next(n for n in after.graph.node if n.name == "qkv_proj/MatMul")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    assert inits[packed.input[1]].shape == (16, 48)
    _assert_same_outputs(spec, before, after)


@pytest.mark.parametrize(
    ("rows", "packed"), [((2, 5), True), ((4, 64), True), ((4, 65), False), (("batch", 5), False)]
)
def test_pack_projections_with_max_rows_packs_only_inputs_known_to_be_that_small(rows, packed):
    """max_rows=256: x of fixed shape (N, L, E) is packed where N x L <= 256, and only then."""
    from onnx import helper

    spec = AttentionSpec(16, 4, self_attention=True, batch_first=True)
    model = build_mha(spec, AttentionWeights.random(spec, seed=1))
    query = next(i for i in model.graph.input if i.name == "query")
    query.CopyFrom(helper.make_tensor_value_info("query", onnx.TensorProto.FLOAT, [*rows, 16]))
    ir_model = ir.serde.deserialize_model(model)
    result = ir.passes.Sequential(PackProjectionsPass(max_rows=256), CleanupPass())(ir_model)
    after = ir.serde.serialize_model(result.model)
    assert result.modified == packed
    assert (
        _ops(after)["MatMul"] == (4 if packed else 6) and _ops(after)["Split"] == packed
    )  # and scores, context, out_proj


def test_pack_projections_leaves_projections_of_different_inputs_alone():
    before = build_mha(CROSS, AttentionWeights.random(CROSS))
    after, modified = _apply(PackProjectionsPass, before)
    assert not modified and _ops(after) == _ops(before)


def test_pack_projections_packs_key_and_value_when_key_is_value():
    """Cross-attention over one memory tensor (as in a decoder): K and V share an input."""
    spec = AttentionSpec(16, 4)
    model = build_mha(spec, AttentionWeights.random(spec, seed=3))
    # Project the value from the key tensor, as in attn(x, mem, mem).
    v_proj = next(n for n in model.graph.node if n.name == "v_proj/MatMul")
    v_proj.input[0] = "key/to_batch_first"
    model.graph.node.remove(next(n for n in model.graph.node if n.name == "value/to_batch_first"))
    del model.graph.input[2]
    after, modified = _apply(PackProjectionsPass, model)
    assert modified
    assert [n.name for n in after.graph.node if n.op_type == "Split"] == ["kv_proj/Split"]
    assert _ops(after)["MatMul"] == 5
    a, b = OrtSession(model), OrtSession(after)
    feeds = {
        k: v
        for k, v in random_inputs(spec, (2, 3, 4), np.random.default_rng(1)).items()
        if k != "value"
    }
    assert errors(b.run(feeds)["attn_output"], a.run(feeds)["attn_output"])[1] <= 1e-5


def test_fold_scale_leaves_a_non_constant_scale_alone():
    spec = AttentionSpec(8, 2, self_attention=True)
    model = build_mha(spec, AttentionWeights.random(spec))
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    scale_name = mul.input[1]
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == scale_name))
    model.graph.input.append(
        onnx.helper.make_tensor_value_info(scale_name, onnx.TensorProto.FLOAT, [])
    )
    _, modified = _apply(FoldScalePass, model)
    assert not modified


def test_portable_target_packs_through_duplicated_layout_ops_and_folds_the_scale():
    """The pipeline's CSE merges two Transposes of one tensor, so K and V then pack."""
    from compiler import compile_model

    spec = AttentionSpec(16, 4)
    model = build_mha(spec, AttentionWeights.random(spec, seed=3))
    for node in model.graph.node:
        if node.name == "value/to_batch_first":
            node.input[0] = "key"
    del model.graph.input[2]
    after = compile_model(model, "portable")
    assert [n.name for n in after.graph.node if n.op_type == "Split"] == ["kv_proj/Split"]
    assert _ops(after)["Mul"] == 0 and _ops(after)["MatMul"] == 5
    feeds = {
        k: v
        for k, v in random_inputs(spec, (2, 3, 4), np.random.default_rng(1)).items()
        if k != "value"
    }
    assert (
        errors(
            OrtSession(after).run(feeds)["attn_output"], OrtSession(model).run(feeds)["attn_output"]
        )[1]
        <= 1e-5
    )


def test_portable_self_attention_has_one_projection_matmul_before_attention():
    from compiler import compile_model

    model = compile_model(build_mha(SELF, AttentionWeights.random(SELF)), "portable")
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls == ["qkv_proj/MatMul", "scores/MatMul", "context/MatMul", "out_proj/MatMul"]
