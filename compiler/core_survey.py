"""Every Softmax of a graph, read as an attention core or with the reason it is not one: our own
graphs' cores (the pattern OwnCore of compiler/core_patterns.py), then the exporters'
(compiler/exported_cores.py)."""

from __future__ import annotations

import onnx_ir as ir

from compiler._ir import constant
from compiler.attention_core import Cache, Core, guard_nodes, over_keys
from compiler.core_patterns import OWN_CORE
from compiler.exported_cores import match_exported


def survey(graph: ir.Graph) -> list[tuple[ir.Node, Core | str]]:
    """Every Softmax of the graph with its core, or the reason it is not one."""
    own = {
        core.softmax: core
        for node in list(graph)
        if node.op_type == "Reshape"
        and not node.domain
        and (core := _own_core(node, graph)) is not None
    }
    return [
        (node, own.get(node) or match_exported(node, graph))
        for node in list(graph)
        if node.op_type == "Softmax" and not node.domain
    ]


def find_cores(graph: ir.Graph) -> list[Core]:
    return [found for _, found in survey(graph) if isinstance(found, Core)]


def _own_core(merge: ir.Node, graph: ir.Graph) -> Core | None:
    """The core of our own graphs whose head merge is ``merge`` (compiler/core_patterns.py, OwnCore)."""
    match = OWN_CORE.found(graph, merge)
    if not match:
        return None
    b = match.bindings
    softmax = b["probs"].producer()
    if not over_keys(softmax, graph):
        return None
    split = constant(b["q_split"])
    heads, head_dim = int(split[2]), int(split[3])
    scale = float(constant(b["scale"]).reshape(())) if b["scale"] is not None else 1.0
    read, context_mm = b["read"], b["attended"].producer()
    weights_used = read.is_graph_output() or len(read.uses()) > 1
    guard = []
    if b["guarded"]:
        where = read.producer()
        guard = [where, *guard_nodes(where.inputs[0].producer())]
    scores_mm = b["product"].producer()
    cache = _own_cache(b, scores_mm) if b["cached"] else None
    between = [
        x.producer() for x in (b["scores"], b["scaled"]) if x is not b["product"]
    ]  # the mask's Add, the scale's Mul
    nodes = [
        softmax,
        *dict.fromkeys(between),
        *guard,
        scores_mm,
        context_mm,
        merge.inputs[0].producer(),
        merge,
    ]
    return Core(
        "BSD",
        b["q_in"],
        b["k_in"],
        b["v_in"],
        heads,
        head_dim,
        scale,
        b["mask"],
        merge.outputs[0],
        read if weights_used else None,
        softmax,
        context_mm,
        guard,
        nodes,
        cache,
    )


def _own_cache(b: dict[str, ir.Value], scores_mm: ir.Node) -> Cache:
    """The KV cache OwnCore bound: past and present keys and values, and the Concats and the key
    Transpose that join them."""
    nodes = [
        scores_mm.inputs[1].producer(),
        b["present_key"].producer(),
        b["present_value"].producer(),
    ]
    return Cache(b["past_key"], b["past_value"], b["present_key"], b["present_value"], nodes)
