"""Every node a pass writes is valid in the opset of the graph it goes into (compiler/opset_forms.py):
users' graphs carry opsets 14 to 23, and ReduceMax's axes, Shape's start and end and Split's
num_outputs changed signature between them. Each target's and form's output passes onnx.checker's
full check at opsets 14, 16, 17, 18 and 20 and computes what its input computes (fp32, 1e-5 of scale)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from compiler import compile_model
from compiler.opset_forms import MatchOpsetPass, OpsetFormError
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import FP32_TOLERANCE, errors, random_inputs
from runtime.ort import OrtSession

FORMS = [
    ("portable", None),
    ("onnx-attention", None),
    ("onnx-attention", "attention-op-blocks"),
    ("ort-cpu", None),
    ("ort-cuda", None),
    ("tensorrt", None),
]
SPECS = {
    "causal+padding": AttentionSpec(
        16, 4, batch_first=True, self_attention=True, is_causal=True, key_padding_mask="bool"
    ),
    "float+padding": AttentionSpec(
        16, 2, batch_first=True, self_attention=True, key_padding_mask="bool", attn_mask="float"
    ),
    "causal": AttentionSpec(16, 2, batch_first=True, self_attention=True, is_causal=True),
}


def _at_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` declared at ``opset``, every node moved to its signature there (onnx's own
    version converter has no adapter down from Shape-15)."""
    lowered = ir.serde.deserialize_model(model)
    lowered.opset_imports[""] = opset
    MatchOpsetPass()(lowered)
    return ir.serde.serialize_model(lowered)


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return OrtSession(model, maxima=False).run(feeds)


@pytest.mark.parametrize("opset", [14, 16, 17, 18, 20])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_every_form_is_valid_at_the_graphs_opset_and_computes_what_it_does(
    small_blocks, spec_name, opset
):
    spec = SPECS[spec_name]
    canonical = build_mha(spec, AttentionWeights.random(spec))
    source = _at_opset(canonical, opset)
    onnx.checker.check_model(source, full_check=True)
    feeds = random_inputs(spec, (2, 11, 11), np.random.default_rng(opset))  # blocks of 4: ragged
    expected = _outputs(canonical, feeds)["attn_output"]
    assert errors(_outputs(source, feeds)["attn_output"], expected)[1] <= FP32_TOLERANCE
    for target, form in FORMS:
        compiled = compile_model(source, target, form=form)
        onnx.checker.check_model(compiled, full_check=True)
        wanted = max(opset, 23) if target == "onnx-attention" else opset
        assert compiled.opset_import[0].version == wanted, (target, form)
        if target != "tensorrt":  # its graph is the portable one, guard moved; TensorRT runs it
            actual = _outputs(compiled, feeds)["attn_output"]
            assert errors(actual, expected)[1] <= FP32_TOLERANCE, (target, form)


def _one_node_model(
    node: onnx.NodeProto, opset: int, inits=(), out=(onnx.TensorProto.FLOAT, [2, 1, 4])
) -> ir.Model:
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
        [onnx.helper.make_tensor_value_info("y", *out)],
        initializer=list(inits),
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(model)


def _run(model: ir.Model) -> np.ndarray:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    return _outputs(ir.serde.serialize_model(model), {"x": x})["y"]


def test_reduce_axes_move_between_input_and_attribute_with_the_same_result():
    axes = onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")
    as_input = _one_node_model(
        onnx.helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=1), 17, [axes]
    )
    MatchOpsetPass()(as_input)
    (node,) = as_input.graph
    assert len(node.inputs) == 1 and list(node.attributes["axes"].as_ints()) == [1]
    onnx.checker.check_model(ir.serde.serialize_model(as_input), full_check=True)
    expected = np.arange(24, dtype=np.float32).reshape(2, 3, 4).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(_run(as_input), expected)
    as_attribute = _one_node_model(
        onnx.helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1), 20
    )
    MatchOpsetPass()(as_attribute)
    (node,) = as_attribute.graph
    assert "axes" not in node.attributes and len(node.inputs) == 2
    np.testing.assert_allclose(
        _run(as_attribute), np.arange(24, dtype=np.float32).reshape(2, 3, 4).mean(1, keepdims=True)
    )


def test_shape_start_and_end_become_a_slice_before_opset_15():
    shape = onnx.helper.make_node("Shape", ["x"], ["y"], start=1, end=-1)
    model = _one_node_model(shape, 14, out=(onnx.TensorProto.INT64, [1]))
    MatchOpsetPass()(model)
    assert [n.op_type for n in model.graph] == ["Shape", "Slice"]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    x = np.zeros((2, 3, 4), np.float32)
    np.testing.assert_array_equal(_outputs(proto, {"x": x})["y"], [3])


def test_split_takes_num_outputs_from_opset_18_only():
    node = onnx.helper.make_node("Split", ["x"], ["y", "z"], axis=-1, num_outputs=2)
    model = _one_node_model(node, 17)
    MatchOpsetPass()(model)
    assert "num_outputs" not in next(iter(model.graph)).attributes
    node = onnx.helper.make_node("Split", ["x"], ["y", "z"], axis=-1)
    model = _one_node_model(node, 18)
    MatchOpsetPass()(model)
    assert next(iter(model.graph)).attributes["num_outputs"].as_int() == 2


def test_a_node_the_opset_lacks_is_refused_in_one_line():
    norm = onnx.helper.make_node("LayerNormalization", ["x", "x"], ["y"])
    with pytest.raises(OpsetFormError, match="LayerNormalization, which opset 14 does not have"):
        MatchOpsetPass()(_one_node_model(norm, 14))
    computed = onnx.helper.make_node("ReduceMax", ["x", "x"], ["y"])
    with pytest.raises(OpsetFormError, match="axes computed in the graph"):
        MatchOpsetPass()(_one_node_model(computed, 17))
