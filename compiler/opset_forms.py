"""Give every node the signature of the opset its model imports, once, after every pass.

The passes build nodes in the signatures of opset 18 (axes as an input, Shape's start and end),
while users' graphs carry opsets 14 to 23: an exporter's opset-17 graph takes ReduceMax's axes as an
attribute, and the version converter raising a graph to opset 23 leaves an opset-13 ReduceMean's
attribute in place. onnxscript's converter adapts whole models between opsets, not a graph whose
nodes mix two; this pass moves each node to its model's form, in both directions, and refuses, in
one line, a node the opset cannot hold.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from compiler._ir import constant, model_graphs, named, new_initializer

# op: the first opset whose signature takes ``axes`` as an input rather than an attribute
AXES_INPUT_SINCE = {
    "ReduceSum": 13,
    "Squeeze": 13,
    "Unsqueeze": 13,
    **{
        f"Reduce{kind}": 18
        for kind in ("Max", "Min", "Mean", "Prod", "L1", "L2", "LogSum", "LogSumExp", "SumSquare")
    },
}
SHAPE_SLICE_SINCE = 15  # Shape's start and end attributes
SPLIT_NUM_OUTPUTS_SINCE = 18  # Split without a ``split`` input needs num_outputs from 18 on


class OpsetFormError(ir.passes.PassError):
    """A node a pass would write that the model's opset cannot express."""


class MatchOpsetPass(ir.passes.InPlacePass):
    """Each default-domain node of every graph in the form of the model's opset; then every node is
    checked against its schema at that opset."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        modified = False
        for graph in model_graphs(model):
            for node in [n for n in graph if n.domain in ("", "ai.onnx")]:
                modified |= _matched(graph, node, opset)
        for graph in model_graphs(model):
            for node in graph:
                _check_schema(node, opset)
        return ir.passes.PassResult(model, modified)


def _matched(graph: ir.Graph, node: ir.Node, opset: int) -> bool:
    """Rewrite ``node`` into ``opset``'s form; whether anything changed."""
    since = AXES_INPUT_SINCE.get(node.op_type)
    if since is not None:
        return _axes_as_input(node) if opset >= since else _axes_as_attribute(node)
    if node.op_type == "Shape" and opset < SHAPE_SLICE_SINCE:
        return _shape_sliced(graph, node)
    if node.op_type == "Split":
        return _split_outputs(node, opset)
    return False


def _axes_as_attribute(node: ir.Node) -> bool:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    axes = constant(node.inputs[1])
    if axes is None:
        raise OpsetFormError(
            f"node {node.name!r} ({node.op_type}) takes axes computed in the graph, which this "
            "model's opset can only take as an attribute"
        )
    node.attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in axes.reshape(-1)])
    node.resize_inputs(1)
    return True


def _axes_as_input(node: ir.Node) -> bool:
    attr = node.attributes.pop("axes", None)
    if attr is None:
        return False
    axes = new_initializer(node.graph, f"{node.name}/axes", np.array(attr.as_ints(), np.int64))
    node.resize_inputs(2)
    node.replace_input_with(1, axes)
    return True


def _shape_sliced(graph: ir.Graph, node: ir.Node) -> bool:
    """Shape(x, start, end) as Slice(Shape(x), start, end), the form before opset 15."""
    start = node.attributes.pop("start", None)
    end = node.attributes.pop("end", None)
    if start is None and end is None:
        return False
    bounds = [
        start.as_int() if start is not None else 0,
        end.as_int() if end is not None else np.iinfo(np.int64).max,
    ]
    starts, ends, axes = (
        new_initializer(graph, f"{node.name}/{part}", np.array([v], np.int64))
        for part, v in zip(("start", "end", "axis"), (*bounds, 0))
    )
    output = node.outputs[0]
    cut = named(ir.node("Slice", [output, starts, ends, axes], name=f"{node.name}/slice"))
    graph.insert_after(node, [cut])
    output.replace_all_uses_with(cut.outputs[0], replace_graph_outputs=True)
    cut.replace_input_with(0, output)  # replace_all_uses_with rewired the Slice's own input too
    cut.outputs[0].name, output.name = output.name, f"{output.name}/whole"
    cut.outputs[0].type, cut.outputs[0].shape = output.type, output.shape
    output.shape = None
    return True


def _split_outputs(node: ir.Node, opset: int) -> bool:
    has_split = len(node.inputs) > 1 and node.inputs[1] is not None
    if opset < SPLIT_NUM_OUTPUTS_SINCE and "num_outputs" in node.attributes:
        node.attributes.pop("num_outputs")
        return True
    if opset >= SPLIT_NUM_OUTPUTS_SINCE and not has_split and "num_outputs" not in node.attributes:
        node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))
        return True
    return False


def _check_schema(node: ir.Node, opset: int) -> None:
    """Refuse a default-domain node whose op, attributes or input count the opset lacks."""
    if node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        raise OpsetFormError(
            f"node {node.name!r} is a {node.op_type}, which opset {opset} does not have"
        ) from None
    unknown = sorted(set(node.attributes) - set(schema.attributes))
    if unknown:
        raise OpsetFormError(
            f"node {node.name!r} ({node.op_type}) has attribute {unknown[0]!r}, which opset "
            f"{opset}'s {node.op_type} does not take"
        )
    if len(node.inputs) > schema.max_input:
        raise OpsetFormError(
            f"node {node.name!r} ({node.op_type}) has {len(node.inputs)} inputs; opset {opset}'s "
            f"takes at most {schema.max_input}"
        )
