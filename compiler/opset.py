"""Raise the default-domain opset, for targets whose fused op only exists in newer opsets."""

from __future__ import annotations

import onnx.helper
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

from compiler.opset_forms import MatchOpsetPass

_SOFTMAX_LIKE = ("Softmax", "LogSoftmax", "Hardmax")


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """onnxscript's version converter (it adapts every node whose semantics changed), plus the IR
    version the new opset needs, which the converter leaves alone, the signatures it carries over
    unchanged (compiler/opset_forms.py), and the Softmax adapter it lacks:
    before opset 13 Softmax flattens its input to 2-D at ``axis`` (default 1), from 13 on it works on
    the one ``axis`` (default -1), and the converter carries the node over unchanged."""

    def __init__(self, opset: int) -> None:
        super().__init__()
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 1) >= self.opset:
            return ir.passes.PassResult(model, False)
        if model.opset_imports.get("", 1) < 13:
            for node in [n for n in model.graph if n.op_type in _SOFTMAX_LIKE and not n.domain]:
                _softmax_as_opset_13(model.graph, node)
        ConvertVersionPass(self.opset, fallback=False)(model)
        if model.opset_imports.get("") != self.opset:
            raise ir.passes.PassError(f"could not convert the graph to opset {self.opset}")
        MatchOpsetPass()(model)  # the ops the converter carries over unchanged (ReduceMean-13)
        needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", self.opset)])
        model.ir_version = max(model.ir_version, needed)
        return ir.passes.PassResult(model, True)


def _softmax_as_opset_13(graph: ir.Graph, node: ir.Node) -> None:
    """Rewrite an opset-12 Softmax so that it means the same in opset 13: over the last axis as it
    is, with the axis explicit; otherwise Flatten at the axis, normalise the 2-D rows, Reshape back."""
    axis = node.attributes.get_int("axis", 1)
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if rank is not None and -rank <= axis < rank and axis % rank == rank - 1:
        node.attributes["axis"] = ir.AttrInt64("axis", -1)
        return
    shape = ir.node("Shape", [x], name=f"{node.name}/input_shape")
    flat = ir.node("Flatten", [x], {"axis": axis}, name=f"{node.name}/flatten")
    graph.insert_before(node, [shape, flat])
    node.replace_input_with(0, flat.outputs[0])
    node.attributes["axis"] = ir.AttrInt64("axis", -1)
    back = ir.node("Reshape", [node.outputs[0], shape.outputs[0]], name=f"{node.name}/reshape")
    graph.insert_after(node, [back])
    output = node.outputs[0]
    output.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
    back.replace_input_with(0, output)  # replace_all_uses_with also rewired the Reshape's own input
    back.outputs[0].type, back.outputs[0].shape, output.shape = (
        output.type,
        x.shape,
        None,
    )  # the rows are 2-D
    if back.outputs[0].is_graph_output():
        name, output.name = output.name, f"{output.name}/rows"
        back.outputs[0].name = name
