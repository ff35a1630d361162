"""Small helpers over onnx_ir values that the passes share."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array behind an initializer or a Constant node's output, else None. An initializer that
    is also a graph input (``keep_initializers_as_inputs``) is a default a caller may override, so
    it is no constant: nothing may fold or fuse it as one."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and not producer.domain:
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def overridable(value: ir.Value | None) -> bool:
    """An initializer the graph also lists as an input: a default a caller may replace."""
    return value is not None and value.is_graph_input() and value.const_value is not None


def uniform(value: ir.Value | None, depth: int = 8) -> float | bool | None:
    """The one value every element of ``value`` takes, where constants fix it (through Expand,
    reshapes, Cast and Where); else None."""
    array = constant(value)
    node = value.producer() if value is not None and array is None and depth > 0 else None
    if node is not None and node.op_type == "ConstantOfShape" and not node.domain:
        attr = node.attributes.get("value")
        array = attr.as_tensor().numpy() if attr is not None else np.zeros(1, np.float32)
    if array is not None:
        flat = array.reshape(-1)
        return flat[0].item() if flat.size and (flat == flat[0]).all() else None
    if node is None or node.domain:
        return None
    if node.op_type in ("Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity"):
        return uniform(node.inputs[0], depth - 1)
    if node.op_type == "Cast":
        inner = uniform(node.inputs[0], depth - 1)
        to = ir.DataType(node.attributes.get_int("to", 0))
        return None if inner is None else (bool(inner) if to == ir.DataType.BOOL else float(inner))
    if node.op_type == "Where":
        condition = uniform(node.inputs[0], depth - 1)
        if condition is not None:
            return uniform(node.inputs[1 if condition else 2], depth - 1)
        picked = {uniform(node.inputs[1], depth - 1), uniform(node.inputs[2], depth - 1)}
        return picked.pop() if len(picked) == 1 else None
    return None


_KEEPS_VALUES = (
    "Cast",
    "Expand",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Transpose",
    "Identity",
)


def finite(value: ir.Value | None, depth: int = 8) -> bool:
    """Whether every element of ``value`` is finite, as far as constants fix it: a finite constant,
    entries gathered from one (T5's relative position bias from its table), or a Where choosing
    between such values, through ops that move values without changing them.
    False where the graph does not say (a graph input, a sum that may overflow)."""
    array = constant(value)
    if array is not None:
        return array.dtype.kind in "iub" or bool(np.isfinite(array).all())
    node = value.producer() if value is not None and depth > 0 else None
    if node is None or node.domain:
        return False
    if node.op_type == "Where":
        return finite(node.inputs[1], depth - 1) and finite(node.inputs[2], depth - 1)
    if node.op_type in ("Gather", "GatherElements", "GatherND"):  # entries of its data (a table)
        return finite(node.inputs[0], depth - 1)
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        return attr is None or bool(np.isfinite(attr.as_tensor().numpy()).all())
    return node.op_type in _KEEPS_VALUES and finite(node.inputs[0], depth - 1)


def nested_graphs(graph: ir.Graph) -> list[ir.Graph]:
    """``graph`` and every graph inside its nodes (If branches, Loop and Scan bodies), outermost first."""
    found = [graph]
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found += nested_graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                found += [g for sub in attr.value for g in nested_graphs(sub)]
    return found


def model_graphs(model: ir.Model) -> list[ir.Graph]:
    """Every graph of ``model``, main graph first, each nested one told its root (``root``), so that
    what a pass adds there takes names unique in the whole model and constants from the main graph."""
    graphs = nested_graphs(model.graph)
    for graph in graphs[1:]:
        graph.meta["root"] = model.graph
    return graphs


def root(graph: ir.Graph) -> ir.Graph:
    """The main graph a nested graph belongs to (as model_graphs recorded it); a main graph is its own."""
    return graph.meta.get("root", graph)


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` under a name not yet taken in the model; in a nested graph it goes to the main
    graph, whose values every nested graph can read."""
    graph = root(graph)
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    unique, i = name, 1
    while unique in taken:
        i += 1
        unique = f"{name}_{i}"
    array = np.ascontiguousarray(array)
    value = ir.Value(
        name=unique,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=unique),
    )
    graph.register_initializer(value)
    return value


def only_use(value: ir.Value) -> ir.Node | None:
    """The single consumer of ``value``, or None when it has several or is a graph output."""
    if value.is_graph_output() or len(value.uses()) != 1:
        return None
    return next(iter(value.uses())).node


def named(node: ir.Node) -> ir.Node:
    """Name a new node's outputs after the node, as the graph builder does, so graphs stay readable."""
    for i, value in enumerate(node.outputs):
        value.name = node.name if len(node.outputs) == 1 else f"{node.name}:{i}"
    return node


def module_path(name: str, metadata: Mapping[str, str]) -> str:
    """The module a node came from: torch's dynamo exporter records its name scopes in the node's
    metadata; the legacy exporter names nodes by module path (``/m/encoder/layer.0/.../Softmax``)."""
    scopes = metadata.get("pkg.torch.onnx.name_scopes")
    if scopes:
        names = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        return names[-2] if len(names) >= 2 else ""
    return ".".join(p for p in name.split("/")[:-1] if p) if name.startswith("/") else ""
