"""The onnx-attention, tensorrt and ort-cuda targets and the passes only they use, each pass alone:
(a) its output computes what its input computed on ONNX Runtime CPU (fp32: 1e-5 of scale),
(b) the structural change it promises; plus the fully-masked-row rule on every fused form."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from compiler import compile_model
from compiler.cleanup import CleanupPass
from compiler.fuse_onnx_attention import FuseOnnxAttentionPass
from compiler.guard_after_context import GuardAfterContextPass
from compiler.opset import UpgradeOpsetPass
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import errors, random_inputs
from runtime.ort import OrtSession

MASKED = AttentionSpec(
    16, 4, batch_first=True, key_padding_mask="bool", attn_mask="float", is_causal=True
)
WEIGHTS = AttentionSpec(
    16, 4, key_padding_mask="float", need_weights=True, average_attn_weights=False, add_bias_kv=True
)
PLAIN = AttentionSpec(16, 4, self_attention=True, batch_first=True)


def _apply(model: onnx.ModelProto, *passes: ir.passes.PassBase) -> onnx.ModelProto:
    ir_model = ir.serde.deserialize_model(model)
    ir.passes.Sequential(*passes, CleanupPass())(ir_model)
    out = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(out, full_check=True)
    return out


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _feeds(spec: AttentionSpec, shape=(3, 4, 6), seed=0) -> dict[str, np.ndarray]:
    """Random inputs in which batch entry 1 has every key padded and query row 2 sees no key."""
    feeds = random_inputs(spec, shape, np.random.default_rng(seed))
    if "key_padding_mask" in feeds:
        feeds["key_padding_mask"][1] = True if spec.key_padding_mask == "bool" else -np.inf
    if "attn_mask" in feeds:
        feeds["attn_mask"][..., 2, :] = True if spec.attn_mask == "bool" else -np.inf
    return feeds


def _assert_same(
    before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> None:
    want, got = OrtSession(before).run(feeds), OrtSession(after).run(feeds)
    for name in want:
        assert np.isfinite(got[name]).all(), name
        assert errors(got[name], want[name])[1] <= 1e-5, name


@pytest.mark.parametrize("spec", [MASKED, WEIGHTS, PLAIN])
def test_onnx_attention_fusion_is_one_attention_node_and_keeps_outputs(spec):
    before = build_mha(spec, AttentionWeights.random(spec, seed=2))
    after = _apply(before, UpgradeOpsetPass(23), FuseOnnxAttentionPass())
    assert _ops(after)["Attention"] == 1 and _ops(after)["Softmax"] == 0
    assert {o.domain: o.version for o in after.opset_import}[""] == 23 and after.ir_version >= 10
    attention = next(n for n in after.graph.node if n.op_type == "Attention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["q_num_heads"] == attrs["kv_num_heads"] == 4
    assert attrs.get("qk_matmul_output_mode") == (3 if spec.need_weights else None)
    _assert_same(before, after, _feeds(spec))


def test_onnx_attention_fusion_refuses_an_old_opset():
    model = build_mha(PLAIN, AttentionWeights.random(PLAIN))
    with pytest.raises(ir.passes.PassError, match="needs opset 23"):
        FuseOnnxAttentionPass()(ir.serde.deserialize_model(model))


@pytest.mark.parametrize("spec", [MASKED, WEIGHTS])
def test_guard_after_context_leaves_a_bare_matmul_softmax_matmul_chain(spec):
    before = build_mha(spec, AttentionWeights.random(spec, seed=3))
    after = _apply(before, GuardAfterContextPass())
    nodes = {out: n for n in after.graph.node for out in n.output}
    softmax = next(n for n in after.graph.node if n.op_type == "Softmax")
    readers = [n for n in after.graph.node if softmax.output[0] in n.input]
    assert "MatMul" in {n.op_type for n in readers}  # the context MatMul reads the softmax itself
    assert {n.op_type for n in readers} <= {"MatMul", "Where"}
    score_readers = [n.op_type for n in after.graph.node if softmax.input[0] in n.input]
    assert score_readers == ["Softmax"]  # no ReduceMax over the scores any more
    guard = next(n for n in after.graph.node if n.name == "attention/fully_masked/context")
    assert nodes[guard.input[2]].op_type == "MatMul"
    _assert_same(before, after, _feeds(spec))


def test_guard_after_context_leaves_unmasked_graphs_alone():
    model = build_mha(PLAIN, AttentionWeights.random(PLAIN))
    ir_model = ir.serde.deserialize_model(model)
    assert not GuardAfterContextPass()(ir_model).modified


@pytest.mark.parametrize("form", ["matmul-softmax", "attention-op"])
def test_tensorrt_forms(form):
    spec = MASKED
    model = build_mha(spec, AttentionWeights.random(spec, seed=5))
    compiled = compile_model(model, "tensorrt", form=form)
    assert _ops(compiled)["Attention" if form == "attention-op" else "Softmax"] == 1
    if form == "attention-op":
        assert compiled == compile_model(model, "onnx-attention")
    _assert_same(model, compiled, _feeds(spec))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ort_cuda_graph_keeps_its_masks_on_the_op_and_computes_what_the_canonical_graph_does(
    precision,
):
    """CUDA's MultiHeadAttention takes the masks into its own kernels, so its graph gives them to the
    op (one node, attention_bias) where the CPU graph lowers them (compiler/lowerings/); ONNX
    Runtime CPU, which runs the same op, checks the graph CUDA would run."""
    model = build_mha(MASKED, AttentionWeights.random(MASKED))
    cuda = compile_model(model, "ort-cuda", precision)
    fused = [n for n in cuda.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(fused) == 1 and len(fused[0].input) == 6 and fused[0].input[5]  # attention_bias
    assert not any(n.op_type in ("If", "Loop") for n in cuda.graph.node)
    assert any(n.op_type == "If" for n in compile_model(model, "ort-cpu", precision).graph.node)
    feeds = _feeds(MASKED)
    got, want = (
        OrtSession(cuda).run(feeds)["attn_output"],
        OrtSession(model).run(feeds)["attn_output"],
    )
    assert errors(got, want)[1] <= (1e-5 if precision == "fp32" else 1e-2)
