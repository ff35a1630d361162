"""Fuse the attention core into ONNX Runtime's com.microsoft MultiHeadAttention."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, named, new_initializer, only_use

MS_DOMAIN = "com.microsoft"


@dataclass
class _Core:
    """The matched attention core: (q, k, v) in (N, L, E) form, its scale, mask and bounding nodes."""

    q: ir.Value
    k: ir.Value
    v: ir.Value
    num_heads: int
    head_dim: int
    scale: float
    mask: ir.Value | None
    guarded: bool
    output: ir.Value
    nodes: list[ir.Node]


class FuseOrtMultiHeadAttentionPass(ir.passes.InPlacePass):
    """Reshape/Transpose head split, MatMul, [Mul scale], [Add mask], Softmax, [fully-masked guard],
    MatMul, head merge -> one MultiHeadAttention node.

    The additive mask becomes ``attention_bias`` (broadcast over batch and heads, full over query
    and key), so -inf stays -inf: partially masked rows match torch exactly. MultiHeadAttention
    returns NaN for a row with every key masked; where the graph had the guard, those rows are set
    to a zero context again (DESIGN.md), from the mask alone. Cores whose softmax output is used
    elsewhere (need_weights) are left unfused: this op cannot return the weights.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Softmax" or node.domain or node.graph is None:
                continue
            core = _match(node, graph)
            if core is None:
                continue
            _rewrite(graph, core)
            modified = True
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and not node.domain else None


def _perm(node: ir.Node | None) -> list[int] | None:
    return None if node is None else list(node.attributes.get_ints("perm", []))


def _heads(value: ir.Value, perm: list[int]) -> tuple[ir.Value, int, int] | None:
    """value = Transpose(Reshape(x, [0, 0, H, hd]), perm): (x, H, hd)."""
    transpose = _producer(value, "Transpose")
    if _perm(transpose) != perm:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    shape = constant(reshape.inputs[1]) if reshape is not None else None
    if shape is None or shape.tolist()[:2] != [0, 0] or len(shape) != 4 or min(shape[2:]) <= 0:
        return None
    return reshape.inputs[0], int(shape[2]), int(shape[3])


def _match(softmax: ir.Node, graph: ir.Graph) -> _Core | None:
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    nodes = [softmax]
    probs = softmax.outputs[0]
    guarded = False
    consumer = only_use(probs, graph)
    if consumer is not None and consumer.op_type == "Where" and consumer.inputs[2] is probs:
        nodes.append(consumer)
        guarded = True
        probs = consumer.outputs[0]
        consumer = only_use(probs, graph)
    if consumer is None or consumer.op_type != "MatMul" or consumer.inputs[0] is not probs:
        return None  # the weights are used outside the core (need_weights)
    context_mm = consumer
    merge_t = only_use(context_mm.outputs[0], graph)
    merge_r = only_use(merge_t.outputs[0], graph) if merge_t is not None else None
    if _perm(merge_t) != [0, 2, 1, 3] or merge_r is None or merge_r.op_type != "Reshape":
        return None
    v = _heads(context_mm.inputs[1], [0, 2, 1, 3])

    scores = final_scores = softmax.inputs[0]
    inner: list[ir.Value] = []  # score tensors between the scores MatMul and the mask Add
    mask = None
    add = _producer(scores, "Add")
    if add is not None:
        mm_side = next((i for i in (0, 1) if _producer(add.inputs[i], "MatMul") or _producer(add.inputs[i], "Mul")), None)
        if mm_side is None:
            return None
        mask, scores = add.inputs[1 - mm_side], add.inputs[mm_side]
        inner.append(scores)
        nodes.append(add)
    scale = 1.0
    mul = _producer(scores, "Mul")
    if mul is not None:
        factor = next((constant(x) for x in mul.inputs if constant(x) is not None), None)
        if factor is None or factor.size != 1:
            return None
        scale = float(factor.reshape(()))
        scores = next(x for x in mul.inputs if constant(x) is None)
        inner.append(scores)
        nodes.append(mul)
    scores_mm = _producer(scores, "MatMul")
    if scores_mm is None:
        return None
    if any(only_use(v, graph) is None for v in inner):
        return None  # an intermediate score tensor is used outside the core
    q = _heads(scores_mm.inputs[0], [0, 2, 1, 3])
    k = _heads(scores_mm.inputs[1], [0, 2, 3, 1])
    if q is None or k is None or v is None or len({q[1:], k[1:], v[1:]}) != 1:
        return None
    if guarded:  # the guard's ReduceMax/IsInf read the scores; they go with the core
        where = nodes[1]
        dead = _producer(where.inputs[0], "IsInf")
        row_max = _producer(dead.inputs[0], "ReduceMax") if dead is not None else None
        if row_max is None or row_max.inputs[0] is not final_scores:
            return None
        nodes += [dead, row_max]
    nodes += [scores_mm, context_mm, merge_t, merge_r]
    return _Core(q[0], k[0], v[0], q[1], q[2], scale, mask, guarded, merge_r.outputs[0], nodes)


def _rewrite(graph: ir.Graph, core: _Core) -> None:
    new: list[ir.Node] = []

    def add(op: str, inputs: list, name: str, attrs: dict | None = None, domain: str = "") -> ir.Value:
        new.append(named(ir.node(op, inputs, attrs or {}, domain=domain, name=f"attention/{name}")))
        return new[-1].outputs[0]

    bias = None
    if core.mask is not None:  # attention_bias must be full over (L, S'): broadcast the mask to it
        lengths = add("Concat", [new_initializer(graph, "attention/ones2", np.ones(2, np.int64)),
                                 add("Shape", [core.q], "tgt_len", {"start": 1, "end": 2}),
                                 add("Shape", [core.k], "src_len", {"start": 1, "end": 2})], "bias_shape", {"axis": 0})
        bias = add("Expand", [core.mask, lengths], "attention_bias")
    context = add("MultiHeadAttention", [core.q, core.k, core.v, None, None, bias], "MultiHeadAttention",
                  {"num_heads": core.num_heads, "scale": core.scale}, domain=MS_DOMAIN)
    if core.guarded and bias is not None:
        axis = new_initializer(graph, "attention/last_axis", np.asarray([-1], np.int64))
        dead = add("IsInf", [add("ReduceMax", [bias, axis], "fully_masked/ReduceMax", {"keepdims": 1})],
                   "fully_masked/IsInf", {"detect_positive": 0})
        dead = add("Transpose", [dead], "fully_masked/Transpose", {"perm": [0, 2, 1, 3]})  # (N|1, L, H|1, 1)
        split = new_initializer(graph, "attention/heads_shape", np.asarray([0, 0, core.num_heads, core.head_dim], np.int64))
        heads = add("Reshape", [context, split], "fully_masked/split_heads")
        zero = new_initializer(graph, "attention/zero", np.zeros((), np.float32))
        kept = add("Where", [dead, zero, heads], "fully_masked/Where")
        merge = new_initializer(graph, "attention/merge_shape",
                                np.asarray([0, 0, core.num_heads * core.head_dim], np.int64))
        context = add("Reshape", [kept, merge], "fully_masked/merge_heads")
    graph.insert_before(core.nodes[-1], new)
    core.output.replace_all_uses_with(context, replace_graph_outputs=True)
    graph.remove(core.nodes, safe=True)
