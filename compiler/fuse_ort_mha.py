"""Fuse the attention core into ONNX Runtime's com.microsoft MultiHeadAttention."""

from __future__ import annotations

import onnx_ir as ir

from compiler.attention_core import dead_rows, emitter, find_cores, full_bias, replace_core, zero_dead_context

MS_DOMAIN = "com.microsoft"


class FuseOrtMultiHeadAttentionPass(ir.passes.InPlacePass):
    """The attention core (compiler/attention_core.py) -> one MultiHeadAttention node.

    The additive mask becomes ``attention_bias`` (broadcast over batch and heads, full over query
    and key), so -inf stays -inf: partially masked rows match torch exactly. MultiHeadAttention
    returns NaN for a row with every key masked; where the graph had the guard, those rows are set
    to a zero context again (DESIGN.md), from the mask alone. Cores whose weights are used
    elsewhere (need_weights) are left unfused: this op cannot return them.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cores = [core for core in find_cores(graph) if core.weights is None]
        for core in cores:
            new: list[ir.Node] = []
            add = emitter(graph, new)
            bias = full_bias(graph, core, add)
            context = add("MultiHeadAttention", [core.q, core.k, core.v, None, None, bias], "MultiHeadAttention",
                          {"num_heads": core.num_heads, "scale": core.scale}, domain=MS_DOMAIN)
            if core.guarded and bias is not None:
                context = zero_dead_context(graph, core, context, dead_rows(graph, bias, add), add)
            replace_core(graph, core, new, context)
        if cores:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, bool(cores))
