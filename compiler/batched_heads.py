"""Attention written over (batch*heads, length, head size) tensors, read as (batch, heads, ...).

torch's nn.MultiheadAttention computes in 3-D batched MatMuls whenever it returns weights
(``need_weights=True``, its default, so every DETR-style module that calls it plainly). BLOOM's
``baddbmm`` does too, but runs its Softmax over a 4-D view between them, which this pass leaves
alone (README, "--onnx"). The 4-D core matcher and every
fused op want the heads on an axis of their own; this pass gives them one, with a Reshape on each
rank-3 input of the scores' path and the context's values, and one back on the context and on any
other reader of the probabilities. The onnx-attention target runs it; the ort targets do not, since
MultiHeadAttention on such cores measured slower than the 3-D graph (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, model_graphs, named, new_initializer, only_use
from compiler.attention_core import perm_of, unique_scope
from compiler.exported_cores import reaches_scores
from compiler.shape_values import entries


@dataclasses.dataclass
class _Batched:
    softmax: ir.Node
    path: list[ir.Node]  # from the scores' MatMul to the Softmax's input, in order
    context: ir.Node  # MatMul(probabilities, values)
    heads: int
    size: int  # the head size


class BatchedHeadsPass(ir.passes.InPlacePass):
    """Each Softmax over 3-D (batch*heads, L, S) scores of a 3-D MatMul, whose head count the
    graph states, becomes the same computation over (batch, heads, L, S)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = False
        for graph in model_graphs(model):
            for softmax in [n for n in graph if n.op_type == "Softmax" and not n.domain]:
                batched = _batched(softmax)
                if batched is not None:
                    _four_d(graph, batched)
                    found = True
        return ir.passes.PassResult(model, found)


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _batched(softmax: ir.Node) -> _Batched | None:
    """The 3-D core around ``softmax``, where its scores come from one 3-D MatMul through Adds and
    scalings whose outputs nothing else reads, and one MatMul multiplies it with 3-D values."""
    axis = softmax.attributes.get_int("axis", -1)
    scores = softmax.inputs[0]
    if _rank(scores) != 3 or axis not in (-1, 2):
        return None
    path, value = [], scores
    while (node := value.producer()) is not None and not node.domain and only_use(value):
        path.insert(0, node)
        if node.op_type == "MatMul":
            break
        if node.op_type not in ("Add", "Mul", "Div"):
            return None
        on_path = [x for x in node.inputs if _rank(x) == 3 and reaches_scores(x)]
        if len(on_path) != 1:
            return None
        value = on_path[0]
    if not path or path[0].op_type != "MatMul" or any(_rank(x) != 3 for x in path[0].inputs):
        return None
    readers = [u.node for u in softmax.outputs[0].uses()]
    contexts = [n for n in readers if n.op_type == "MatMul" and n.inputs[0] is softmax.outputs[0]]
    if len(contexts) != 1 or _rank(contexts[0].inputs[1]) != 3:
        return None
    split = _head_split(path[0].inputs[0], contexts[0])
    return _Batched(softmax, path, contexts[0], *split) if split else None


def _head_split(query: ir.Value, context: ir.Node) -> tuple[int, int] | None:
    """(H, hd), from the head split of the query, (L, N*H, hd) = Reshape(x of width E) before a
    Transpose(1, 0, 2), as torch's multi_head_attention_forward writes it: H is E over hd."""
    node = query.producer()
    while node is not None and not node.domain and node.op_type in ("Mul", "Div"):
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Transpose" or perm_of(node) != [1, 0, 2]:
        return None
    split = node.inputs[0].producer()
    if split is None or split.op_type != "Reshape" or split.domain:
        return None
    found = entries(split.inputs[1])
    size = found[0][2] if found is not None and len(found[0]) == 3 else None
    width = _width(split.inputs[0], context)
    if not isinstance(size, (int, float)) or size <= 0 or width is None or width % int(size):
        return None
    return width // int(size), int(size)


def _width(value: ir.Value, context: ir.Node) -> int | None:
    """E: the last axis of the (L, N, E) tensor split into heads where its shape says it, else the
    width the context's heads merge back into: (L, N*H, hd) after a Transpose(1, 0, 2), reshaped to
    (L*N, E) or (L, N, E) and multiplied by the out projection's constant weight."""
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    turn = only_use(context.outputs[0])
    merge = only_use(turn.outputs[0]) if turn is not None and perm_of(turn) == [1, 0, 2] else None
    if merge is None or merge.op_type != "Reshape" or merge.domain:
        return None
    shape = merge.outputs[0].shape
    if shape is not None and len(shape) in (2, 3) and isinstance(shape[-1], int):
        return shape[-1]
    user = only_use(merge.outputs[0])
    if user is None or user.domain or user.op_type not in ("MatMul", "Gemm"):
        return None
    weight = constant(user.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    return weight.shape[1] if user.attributes.get_int("transB", 0) else weight.shape[0]


def _four_d(graph: ir.Graph, core: _Batched) -> None:
    """Reshape the path's rank-3 inputs to (N, H, ...), run the path and the Softmax there, and give
    every reader of the probabilities and of the context the 3-D tensors they had."""
    h, probs = core.heads, core.softmax.outputs[0]
    scope = unique_scope(graph, "batched_heads")
    for node in [*core.path, core.context]:
        for i, x in enumerate(node.inputs):
            if x is not None and _rank(x) == 3 and x is not probs and x.producer() not in core.path:
                node.replace_input_with(i, _split(graph, node, x, h, f"{scope}/{len(graph)}"))
        out = node.outputs[0] if node is not core.context else None
        if out is not None:
            out.shape = _with_heads(out.shape, h)
    q, k_t = core.path[0].inputs
    for x, axis in ((q, 3), (k_t, 2), (core.context.inputs[1], 3)):
        if x.shape is not None:  # the head size where the exporter left it unknown
            x.shape = ir.Shape([core.size if i == axis else d for i, d in enumerate(x.shape)])
    core.softmax.attributes["axis"] = ir.AttrInt64("axis", -1)
    probs.shape = _with_heads(probs.shape, h)
    for use in [u for u in probs.uses() if u.node is not core.context]:
        use.node.replace_input_with(use.idx, _merged(graph, f"{scope}/weights", probs, use.node))
    context = core.context.outputs[0]
    before = list(context.uses())
    merged = _merged(graph, f"{scope}/context", context, after=core.context)
    for use in before:
        use.node.replace_input_with(use.idx, merged)
    if context.is_graph_output():
        graph.outputs[graph.outputs.index(context)] = merged
    context.shape = _with_heads(context.shape, h)


def _with_heads(shape: ir.Shape | None, heads: int) -> ir.Shape | None:
    if shape is None or len(shape) != 3:
        return None
    return ir.Shape([None, heads, shape[1], shape[2]])


def _split(graph: ir.Graph, reader: ir.Node, x: ir.Value, heads: int, scope: str) -> ir.Value:
    """(B, a, b) as (B / heads, heads, a, b); a tensor whose first axis is 1 broadcasts over both."""
    if x.shape is not None and x.shape[0] == 1:
        axis = new_initializer(graph, "batched/axis1", np.asarray([1], np.int64))
        node = ir.node("Unsqueeze", [x, axis], name=f"{scope}/heads")
    else:
        lead = new_initializer(graph, "batched/heads_lead", np.asarray([-1, heads], np.int64))
        tail = ir.node("Shape", [x], {"start": 1}, name=f"{scope}/tail")
        shape = ir.node("Concat", [lead, tail.outputs[0]], {"axis": 0}, name=f"{scope}/shape")
        graph.insert_before(reader, [named(tail), named(shape)])
        node = ir.node("Reshape", [x, shape.outputs[0]], name=f"{scope}/heads")
    graph.insert_before(reader, node)
    node.outputs[0].name = node.name
    node.outputs[0].shape = _with_heads(x.shape, heads)
    node.outputs[0].type = x.type
    return node.outputs[0]


def _merged(
    graph: ir.Graph,
    scope: str,
    x: ir.Value,
    reader: ir.Node | None = None,
    after: ir.Node | None = None,
) -> ir.Value:
    """(N, H, a, b) back to (N*H, a, b), before ``reader`` or after ``after``."""
    scope = f"{scope}/{len(graph)}"
    lead = new_initializer(graph, "batched/merged_lead", np.asarray([-1], np.int64))
    tail = named(ir.node("Shape", [x], {"start": 2}, name=f"{scope}/tail"))
    shape = named(ir.node("Concat", [lead, tail.outputs[0]], {"axis": 0}, name=f"{scope}/shape"))
    node = ir.node("Reshape", [x, shape.outputs[0]], name=f"{scope}/merged")
    if after is not None:
        graph.insert_after(after, [tail, shape, node])
    else:
        graph.insert_before(reader, [tail, shape, node])
    node.outputs[0].name = node.name
    node.outputs[0].type = x.type
    if x.shape is not None and len(x.shape) == 3:
        node.outputs[0].shape = x.shape
    return node.outputs[0]
