"""fp16 precision: half-precision weights and compute, float32 inputs, outputs and softmax."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

from compiler._ir import named

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_FP16_LOWEST = float(np.finfo(np.float16).min)


class Float16Pass(ir.passes.InPlacePass):
    """Every float32 tensor inside the graph becomes float16; the graph's float inputs and outputs
    stay float32 (a Cast at each edge), so callers feed and read what the fp32 graph took; each
    Softmax runs in float32 between two Casts. Fused attention ops take fp16 as they are (ONNX
    Runtime accumulates their softmax in float32). Float mask values below -65504 become -inf,
    fp16's range: that changes a result only where a row has no key above that.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        _weights_to_float16(graph)
        _compute_in_float16(graph)
        for node in [n for n in graph if n.op_type == "Softmax" and not n.domain]:
            _softmax_in_float32(graph, node)
        for node in graph:  # a fused op's mask fill must stay finite in fp16
            fill = node.attributes.get("mask_filter_value")
            if (
                node.domain == "com.microsoft"
                and fill is not None
                and fill.as_float() < _FP16_LOWEST
            ):
                node.attributes["mask_filter_value"] = ir.AttrFloat32(
                    "mask_filter_value", _FP16_LOWEST
                )
        if model.opset_imports.get("", 1) < 20:  # IsInf takes float16 from opset 20
            for node in [
                n
                for n in ir.traversal.RecursiveGraphIterator(graph)
                if n.op_type == "IsInf" and not n.domain
            ]:
                node.replace_input_with(0, _cast_before(node.graph, node, node.inputs[0], FLOAT))
        for value in [v for v in graph.inputs if _is_float(v)]:
            for edge in _layout_edge(value):
                _cast_after(graph, edge, FLOAT16)
        for i, value in enumerate(list(graph.outputs)):
            if _is_float(value):
                graph.outputs[i] = _cast_output(graph, value)
        return ir.passes.PassResult(model, True)


def _weights_to_float16(graph: ir.Graph) -> None:
    for value in graph.initializers.values():
        if _is_float(value) and not value.is_graph_input():  # an input's type is the caller's
            array = value.const_value.numpy()
            if "key_bias_floor" in value.name:  # a masked key's bias stays finite, as in float32
                array = np.maximum(array, _FP16_LOWEST)
            with np.errstate(over="ignore"):  # past fp16's range is +-inf, as the class says
                half = array.astype(np.float16)
            value.const_value = ir.tensor(half, name=value.name)
            value.type = ir.TensorType(FLOAT16)


def _compute_in_float16(graph: ir.Graph) -> None:
    """Every float constant, Cast and value in float16 (a Loop's body too: compiler/lowerings/),
    but the graph's own inputs and outputs."""
    edges = set(graph.inputs) | set(graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == FLOAT:
                node.attributes[attr.name] = ir.AttrTensor(
                    attr.name, ir.tensor(attr.value.numpy().astype(np.float16))
                )
        if node.op_type == "Cast" and not node.domain and node.attributes.get_int("to") == FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
        for value in node.outputs:
            if _is_float(value) and value not in edges:
                value.type = ir.TensorType(FLOAT16)


_WEIGHT_OPS = {"MatMul": (1,), "Gemm": (1, 2), "LayerNormalization": (1, 2), "Conv": (1, 2)}


def weight_beyond_float16(model: onnx.ModelProto) -> tuple[str, float] | None:
    """The first weight (a MatMul, Gemm, Conv or LayerNormalization initializer, or a bias added to a
    MatMul) whose values float16 cannot hold, with its largest magnitude; None when every weight fits.
    Other constants may pass the range on purpose (a -1e9 mask fill, which float16 holds as -inf)."""
    initializers = {t.name: t for t in model.graph.initializer}
    matmuls = {out for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for out in n.output}
    for node in model.graph.node:
        indices = _WEIGHT_OPS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        if (
            node.op_type == "Add"
            and node.domain in ("", "ai.onnx")
            and matmuls.intersection(node.input)
        ):
            indices = (0, 1)
        for index in indices:
            tensor = initializers.get(node.input[index]) if index < len(node.input) else None
            if tensor is None or tensor.data_type not in (
                onnx.TensorProto.FLOAT,
                onnx.TensorProto.DOUBLE,
            ):
                continue
            values = onnx.numpy_helper.to_array(tensor)
            peak = float(np.max(np.abs(values))) if values.size else 0.0
            if peak > -_FP16_LOWEST:
                return tensor.name, peak
    return None


def _is_float(value: ir.Value) -> bool:
    return value.type is not None and value.type.dtype == FLOAT


def _layout_edge(value: ir.Value) -> list[ir.Value]:
    """Where an input's cast goes: after the Transposes that only relayout it, else at the input.

    Besides keeping those Transposes out of the fp16 island, this avoids a crash of ONNX Runtime's
    CPU provider at session creation on Cast(fp16) -> Transpose -> MatMul with an fp16 weight
    (docs/BENCHMARKS.md, "fp16 on CPU", names the version).
    """
    users = [node for node, _ in value.uses()]
    if (
        users
        and not value.is_graph_output()
        and all(u.op_type == "Transpose" and not u.domain for u in users)
    ):
        for user in users:
            user.outputs[0].type = ir.TensorType(FLOAT)
        return [u.outputs[0] for u in users]
    return [value]


def _cast_after(graph: ir.Graph, value: ir.Value, to: ir.DataType) -> None:
    cast = named(ir.node("Cast", [value], {"to": to}, name=f"{value.name}/to_fp16"))
    cast.outputs[0].type = ir.TensorType(to)
    value.replace_all_uses_with(cast.outputs[0])
    cast.replace_input_with(0, value)
    producer = value.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), cast)
    else:
        graph.insert_after(producer, cast)


def _cast_before(graph: ir.Graph, node: ir.Node, value: ir.Value, to: ir.DataType) -> ir.Value:
    cast = named(
        ir.node(
            "Cast", [value], {"to": to}, name=f"{node.name}/to_{'fp32' if to == FLOAT else 'fp16'}"
        )
    )
    cast.outputs[0].type = ir.TensorType(to)
    graph.insert_before(node, cast)
    return cast.outputs[0]


def _softmax_in_float32(graph: ir.Graph, softmax: ir.Node) -> None:
    softmax.replace_input_with(0, _cast_before(graph, softmax, softmax.inputs[0], FLOAT))
    probs = softmax.outputs[0]
    back = named(ir.node("Cast", [probs], {"to": FLOAT16}, name=f"{softmax.name}/back_to_fp16"))
    back.outputs[0].type = ir.TensorType(FLOAT16)
    probs.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
    back.replace_input_with(0, probs)
    probs.type = ir.TensorType(FLOAT)
    graph.insert_after(softmax, back)


def _cast_output(graph: ir.Graph, value: ir.Value) -> ir.Value:
    """A float32 graph output read from what is now a float16 value."""
    name = value.name
    value.name = f"{name}/fp16"
    value.type = ir.TensorType(FLOAT16)
    cast = ir.node("Cast", [value], {"to": FLOAT}, name=f"{name}/to_fp32")
    out = cast.outputs[0]
    out.name, out.type, out.shape = name, ir.TensorType(FLOAT), value.shape
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, cast)
    else:
        graph.insert_before(next(iter(graph)), cast)
    return out
