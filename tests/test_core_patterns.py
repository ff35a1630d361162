"""The attention core's onnxscript patterns (compiler/core_patterns.py): what exporters put after the
softmax and around the query-key product is matched, the graph still computes what it did, and
each refusal reaches the per-Softmax report as the pattern check's reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attention_compiler.cli import compile as compile_script  # noqa: E402
from compiler import compile_model
from compiler.attention_core import Core
from compiler.core_survey import survey

SHAPE = ["N", 2, "L", 8]  # batch, heads, length, head size


def _core(
    after: tuple[str, ...] = (),
    *,
    query_scale: str = "scalar",
    nan_value: float = 0.0,
    weights_output: bool = False,
    cast_to: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """Softmax(q @ K^T * scale) @ v as an exporter writes it, with ``after`` ('cast', 'guard') between the
    softmax and the context MatMul; ``query_scale`` 'position' multiplies q by an (L, 1) tensor first."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]
    q = "q"
    if query_scale == "position":
        nodes.append(helper.make_node("Mul", ["q", "per_position"], ["q_tuned"]))
        q = "q_tuned"
    nodes += [
        helper.make_node("MatMul", [q, "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
    ]
    read = "probs"
    for i, step in enumerate(after):
        if step == "cast":
            nodes.append(helper.make_node("Cast", [read], [f"cast_{i}"], to=cast_to))
            read = f"cast_{i}"
        else:
            nodes += [
                helper.make_node("IsNaN", [read], [f"nan_{i}"]),
                helper.make_node("Where", [f"nan_{i}", "nan_value", read], [f"guard_{i}"]),
            ]
            read = f"guard_{i}"
    value_type = cast_to if after and after[-1] == "cast" else TensorProto.FLOAT
    nodes.append(helper.make_node("MatMul", [read, "v"], ["out"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE) for n in "qk"]
    inputs.append(helper.make_tensor_value_info("v", value_type, SHAPE))
    outputs = [helper.make_tensor_value_info("out", value_type, SHAPE)]
    if weights_output:
        outputs.append(helper.make_tensor_value_info(read, value_type, ["N", 2, "L", "L"]))
    initializers = [
        numpy_helper.from_array(np.array(8**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(nan_value, np.float32), "nan_value"),
        numpy_helper.from_array(
            np.linspace(0.5, 1.5, 6, dtype=np.float32).reshape(6, 1), "per_position"
        ),
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _found(model: onnx.ModelProto) -> Core | str:
    ((_, found),) = survey(
        ir.from_proto(onnx.shape_inference.infer_shapes(model)).graph
    )  # targets infer shapes first
    return found


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out"], feeds)[0]


@pytest.mark.parametrize(
    "after",
    [(), ("cast",), ("guard",), ("cast", "cast"), ("guard", "cast", "cast"), ("cast", "guard")],
)
@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
def test_casts_and_nan_guards_after_the_softmax_fuse_and_keep_the_output(after, target):
    model = _core(after)
    core = _found(model)
    assert (
        isinstance(core, Core)
        and core.nan_guarded == ("guard" in after)
        and core.scale == pytest.approx(8**-0.5)
    )
    feeds = {
        n: np.random.default_rng(i).standard_normal((2, 2, 6, 8)).astype(np.float32)
        for i, n in enumerate("qkv")
    }
    fused = compile_model(model, target)
    assert not any(node.op_type == "Softmax" for node in fused.graph.node)
    # fp32: the fused op and the exported chain differ by rounding only
    np.testing.assert_allclose(_run(fused, feeds), _run(model, feeds), rtol=1e-5, atol=1e-5)


def test_a_query_scaled_per_position_keeps_its_mul_and_only_the_scalar_is_the_scale():
    """Llama 4 multiplies its queries by a per-position tensor before the product: that Mul belongs to q."""
    model = _core(query_scale="position")
    core = _found(model)
    assert (
        isinstance(core, Core)
        and core.q.producer().op_type == "Mul"
        and core.scale == pytest.approx(8**-0.5)
    )
    feeds = {
        n: np.random.default_rng(i).standard_normal((1, 2, 6, 8)).astype(np.float32)
        for i, n in enumerate("qkv")
    }
    np.testing.assert_allclose(
        _run(compile_model(model, "ort-cpu"), feeds), _run(model, feeds), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "model, reason",
    [
        (_core(("cast",), cast_to=TensorProto.DOUBLE), "a Cast after its softmax changes the type"),
        (_core(("guard",), nan_value=1.0), "what replaces NaN after its softmax is not 0"),
        (
            _core(("guard",), weights_output=True),
            "its weights are used outside the attention past a Cast or NaN guard",
        ),
    ],
    ids=["widening-cast", "guard-to-one", "guarded-weights-read"],
)
def test_each_refusal_is_the_pattern_checks_reason_in_the_report(tmp_path, capsys, model, reason):
    assert _found(model) == reason
    onnx.save(model, tmp_path / "m.onnx")
    assert (
        compile_script.main(
            [
                "--onnx",
                str(tmp_path / "m.onnx"),
                "--target",
                "ort-cpu",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert (
        f"left alone: attention at Softmax 'probs': not an attention core: {reason}"
        in capsys.readouterr().out
    )
