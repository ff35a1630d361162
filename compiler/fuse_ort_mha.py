"""Fuse the attention core into ONNX Runtime's com.microsoft MultiHeadAttention."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, new_initializer
from compiler.attention_core import (Core, as_output, combined_mask, dead_rows, emitter, find_cores, full_bias, keys_bnsh,
                                     rank4, replace_core, unfusable, unique_scope, zero_dead_context, zero_scalar)

MS_DOMAIN = "com.microsoft"
_LOWEST = float(np.finfo(np.float32).min)  # mask_filter_value: finite, so masked scores never meet exp(-inf)


class FuseOrtMultiHeadAttentionPass(ir.passes.InPlacePass):
    """The attention core (compiler/attention_core.py) -> one MultiHeadAttention node.

    The additive mask becomes ``attention_bias`` (broadcast over batch and heads, full over query
    and key), so -inf stays -inf: partially masked rows match torch exactly. MultiHeadAttention
    returns NaN for a row with every key masked; those rows get a zero context again (DESIGN.md),
    from the mask alone. A mask that is only a bool key padding mask goes in as the op's
    ``key_padding_mask`` instead, (N, S) rather than a float (N, 1, L, S) bias, which ONNX Runtime's
    CPU kernel also runs about twice as fast at length 4096 (docs/BENCHMARKS.md). A BNSH core's query is merged to (N, L, E) for the op and its keys and
    values go in as BNSH, which the op takes as they are. A KV cache goes in as the op's past_key and
    past_value, and its present outputs become the graph's.
    """

    @staticmethod
    def refuse(core: Core) -> str | None:
        if core.weights is not None:
            return "its weights are used outside the attention, and MultiHeadAttention cannot return them"
        if core.num_heads is None or core.head_dim is None:
            return "the graph does not state its head count and head size, which MultiHeadAttention needs"
        return unfusable(core)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cores = [core for core in find_cores(graph) if self.refuse(core) is None]
        for core in cores:
            new: list[ir.Node] = []
            scope = unique_scope(graph)
            add = emitter(graph, new, scope)
            padding = _bool_key_padding(core)
            mask = combined_mask(core, add) if padding is None else None
            bias = full_bias(graph, core, add, mask)
            q, k = core.q, core.k
            if core.layout == "BNSH":
                merge = new_initializer(graph, "attention/merge_shape",
                                        np.asarray([0, 0, core.num_heads * core.head_dim], np.int64))
                q = add("Reshape", [add("Transpose", [q], "query_bsnh", {"perm": [0, 2, 1, 3]}), merge], "query_bsd")
                k = keys_bnsh(core, add)
            attrs = {"num_heads": core.num_heads, "scale": core.scale}
            keep = None
            if padding is not None:
                keep = add("Cast", [add("Not", [padding], "keep")], "key_padding_mask", {"to": ir.DataType.INT32})
                attrs["mask_filter_value"] = _LOWEST
            cache = core.cache
            node = ir.node("MultiHeadAttention", [q, k, core.v, None, keep, bias] +
                           ([cache.past_key, cache.past_value] if cache is not None else []), attrs, domain=MS_DOMAIN,
                           name=f"{scope}/MultiHeadAttention", num_outputs=3 if cache is not None else 1)
            node.outputs[0].name = f"{scope}/MultiHeadAttention"
            new.append(node)
            context = node.outputs[0]
            if core.zeroes_dead_rows and keep is not None:
                context = _zero_fully_padded(graph, context, keep, add)
            elif core.zeroes_dead_rows:
                context = zero_dead_context(graph, core, context, dead_rows(graph, rank4(mask) or bias, add), add)
            if core.layout == "BNSH":
                split = new_initializer(graph, "attention/heads_shape",
                                        np.asarray([0, 0, core.num_heads, core.head_dim], np.int64))
                context = add("Transpose", [add("Reshape", [context, split], "context_bsnh")], "context_bnsh",
                              {"perm": [0, 2, 1, 3]})
            context = as_output(graph, core, context, add)
            replace_core(graph, core, new, context, present=tuple(node.outputs[1:]) if cache is not None else None)
        if cores:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, bool(cores))


def _bool_key_padding(core: Core) -> ir.Value | None:
    """The bool (N, S) graph input when the core's mask is exactly Unsqueeze(Where(it, -inf, 0), [1, 2])."""
    if core.layout != "BSD" or core.mask is None:
        return None
    unsqueeze = core.mask.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.domain:
        return None
    axes = constant(unsqueeze.inputs[1])
    where = unsqueeze.inputs[0].producer()
    if axes is None or axes.tolist() != [1, 2] or where is None or where.op_type != "Where" or where.domain:
        return None
    fill, zero = constant(where.inputs[1]), constant(where.inputs[2])
    padding = where.inputs[0]
    if fill is None or zero is None or fill.size != 1 or zero.size != 1 or not (np.isneginf(fill).all() and (zero == 0).all()):
        return None
    if not padding.is_graph_input() or padding.type is None or padding.type.dtype != ir.DataType.BOOL:
        return None
    return padding


def _zero_fully_padded(graph: ir.Graph, context: ir.Value, keep: ir.Value, add) -> ir.Value:
    """Zero context (N, L, E) for batch entries whose every key is padding."""
    axis = new_initializer(graph, "attention/last_axis", np.asarray([-1], np.int64))
    none_kept = add("Equal", [add("ReduceMax", [keep, axis], "fully_masked/ReduceMax", {"keepdims": 1}),
                              new_initializer(graph, "attention/zero_i32", np.zeros((), np.int32))], "fully_masked/Equal")
    dead = add("Unsqueeze", [none_kept, new_initializer(graph, "attention/axis2", np.asarray([2], np.int64))],
               "fully_masked/Unsqueeze")  # (N, 1, 1)
    return add("Where", [dead, zero_scalar(graph), context], "fully_masked/Where")
