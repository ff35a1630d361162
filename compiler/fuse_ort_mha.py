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
            cache = core.cache
            padding = _bool_key_padding(core) if cache is not None else None
            mask = combined_mask(core, add) if padding is None else None
            attrs = {"num_heads": core.num_heads, "scale": core.scale}
            keep = bias = None
            if cache is None and _keys_only(mask):  # the flash kernel, with the mask as one more head dimension
                q, k, v = _mask_in_head_dims(graph, core, mask, add)
            else:
                bias = full_bias(graph, core, add, mask)
                q, k, v = core.q, core.k, core.v
                if core.layout == "BNSH":
                    merge = new_initializer(graph, "attention/merge_shape",
                                            np.asarray([0, 0, core.num_heads * core.head_dim], np.int64))
                    q = add("Reshape", [add("Transpose", [q], "query_bsnh", {"perm": [0, 2, 1, 3]}), merge], "query_bsd")
                    k = keys_bnsh(core, add)
            if padding is not None:
                keep = add("Cast", [add("Not", [padding], "keep")], "key_padding_mask", {"to": ir.DataType.INT32})
                attrs["mask_filter_value"] = _LOWEST
            node = ir.node("MultiHeadAttention", [q, k, v, None, keep, bias] +
                           ([cache.past_key, cache.past_value] if cache is not None else []), attrs, domain=MS_DOMAIN,
                           name=f"{scope}/MultiHeadAttention", num_outputs=3 if cache is not None else 1)
            node.outputs[0].name = f"{scope}/MultiHeadAttention"
            new.append(node)
            context = node.outputs[0]
            if core.zeroes_dead_rows and keep is not None:
                context = _zero_fully_padded(graph, context, keep, add)
            elif core.zeroes_dead_rows:
                context = zero_dead_context(graph, core, context, dead_rows(graph, rank4(mask) or bias or mask, add), add)
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


def _keys_only(mask: ir.Value | None) -> bool:
    """Whether the mask is known to depend on the key alone, (N|1, H|1, 1, S): a padding mask."""
    return mask is not None and mask.shape is not None and len(mask.shape) == 4 and mask.shape[2] == 1


KEY_BIAS_FLOOR = -1e30  # masked keys' bias, finite: a row of -inf would turn a flash block's running max into NaN


def _mask_in_head_dims(graph: ir.Graph, core: Core, mask: ir.Value, add) -> tuple[ir.Value, ir.Value, ir.Value]:
    """q, k, v for MultiHeadAttention with no mask input, so its CPU kernel takes the flash path. A mask
    that depends on the key alone is an additive bias b[n, h, s]: each head of q gets one more
    dimension holding 1/scale and each head of k one holding b, so scale * (q'.k') = scale * q.k + b.
    v keeps its head size; the op takes the query-key and value head sizes apart. Where the mask says
    -inf, the bias is KEY_BIAS_FLOOR instead: exp of it is 0 all the same, and fully masked rows are
    zeroed from the mask itself."""
    h, d = core.num_heads, core.head_dim
    ints = lambda name, values: new_initializer(graph, f"attention/{name}", np.asarray(values, np.int64))  # noqa: E731
    widen = ints("widen_head", [0, 0, 0, 0, 0, 0, 0, 1])  # one more entry at the end of the last axis
    inverse_scale = new_initializer(graph, "attention/inverse_scale", np.asarray(1.0 / core.scale, np.float32))
    floor = new_initializer(graph, "attention/key_bias_floor", np.asarray(KEY_BIAS_FLOOR, np.float32))
    bias = add("Max", [mask, floor], "key_bias")  # (N|1, H|1, 1, S)
    if core.layout == "BSD":
        split, merge = ints("heads_shape", [0, 0, h, d]), ints("widened_merge_shape", [0, 0, h * (d + 1)])
        q = add("Pad", [add("Reshape", [core.q, split], "query_heads"), widen, inverse_scale], "query_widened")
        q = add("Reshape", [q, merge], "query_bsd")
        bias = add("Transpose", [bias], "key_bias_bshd", {"perm": [0, 3, 1, 2]})  # (N|1, S, H|1, 1)
        keys = add("Reshape", [core.k, split], "key_heads")
    else:
        merge = ints("widened_merge_shape", [0, 0, h * (d + 1)])
        q = add("Pad", [core.q, widen, inverse_scale], "query_widened")
        q = add("Reshape", [add("Transpose", [q], "query_bsnh", {"perm": [0, 2, 1, 3]}), merge], "query_bsd")
        bias = add("Transpose", [bias], "key_bias_bnsh", {"perm": [0, 1, 3, 2]})  # (N|1, H|1, S, 1)
        keys = keys_bnsh(core, add)
    keys = add("Pad", [keys, widen, zero_scalar(graph)], "key_widened")
    bias = add("Pad", [bias, ints("bias_first", [0, 0, 0, d, 0, 0, 0, 0]), zero_scalar(graph)], "key_bias_last")
    k = add("Add", [keys, bias], "key_with_bias")
    v = core.v
    if core.layout == "BNSH":  # the op takes 4-D keys and values of one head size only: give both as (N, S, E)
        k = add("Transpose", [k], "key_bshd", {"perm": [0, 2, 1, 3]})
        v = add("Reshape", [add("Transpose", [v], "value_bshd", {"perm": [0, 2, 1, 3]}), ints("merge_shape", [0, 0, h * d])],
                "value_bsd")
    return q, add("Reshape", [k, merge], "key_bsd"), v


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
