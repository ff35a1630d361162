"""Fuse the attention core into ONNX Runtime's com.microsoft MultiHeadAttention."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler._ir import new_initializer
from compiler.attention_core import (Core, dead_rows, emitter, find_cores, full_bias, keys_bnsh, replace_core, unique_scope,
                                     zero_dead_context)

MS_DOMAIN = "com.microsoft"


class FuseOrtMultiHeadAttentionPass(ir.passes.InPlacePass):
    """The attention core (compiler/attention_core.py) -> one MultiHeadAttention node.

    The additive mask becomes ``attention_bias`` (broadcast over batch and heads, full over query
    and key), so -inf stays -inf: partially masked rows match torch exactly. MultiHeadAttention
    returns NaN for a row with every key masked; those rows get a zero context again (DESIGN.md),
    from the mask alone. A BNSH core's query is merged to (N, L, E) for the op and its keys and
    values go in as BNSH, which the op takes as they are.
    """

    @staticmethod
    def refuse(core: Core) -> str | None:
        if core.weights is not None:
            return "its weights are used outside the attention, and MultiHeadAttention cannot return them"
        if core.num_heads is None or core.head_dim is None:
            return "the graph does not state its head count and head size, which MultiHeadAttention needs"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cores = [core for core in find_cores(graph) if self.refuse(core) is None]
        for core in cores:
            new: list[ir.Node] = []
            scope = unique_scope(graph)
            add = emitter(graph, new, scope)
            bias = full_bias(graph, core, add)
            q, k = core.q, core.k
            if core.layout == "BNSH":
                merge = new_initializer(graph, "attention/merge_shape",
                                        np.asarray([0, 0, core.num_heads * core.head_dim], np.int64))
                q = add("Reshape", [add("Transpose", [q], "query_bsnh", {"perm": [0, 2, 1, 3]}), merge], "query_bsd")
                k = keys_bnsh(core, add)
            context = add("MultiHeadAttention", [q, k, core.v, None, None, bias], "MultiHeadAttention",
                          {"num_heads": core.num_heads, "scale": core.scale}, domain=MS_DOMAIN)
            if core.zeroes_dead_rows:
                context = zero_dead_context(graph, core, context, dead_rows(graph, bias, add), add)
            if core.layout == "BNSH":
                split = new_initializer(graph, "attention/heads_shape",
                                        np.asarray([0, 0, core.num_heads, core.head_dim], np.int64))
                context = add("Transpose", [add("Reshape", [context, split], "context_bsnh")], "context_bnsh",
                              {"perm": [0, 2, 1, 3]})
            replace_core(graph, core, new, context)
        if cores:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, bool(cores))
