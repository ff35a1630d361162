"""Padding as one more dimension of each head: a mask that depends on the key alone goes into the
dot product, q.k + bias = [q, 1].[k, bias], so the op takes no mask and stays on its flash path."""

from __future__ import annotations

import onnx_ir as ir

from compiler.attention_core import Core, Emit
from compiler.mask_ops import float_constant, int_constant


def bsd_inputs(
    graph: ir.Graph,
    core: Core,
    inputs: tuple[ir.Value, ir.Value, ir.Value],
    add: Emit,
    bias: ir.Value | None,
    scaled: bool,
) -> tuple[ir.Value, ir.Value, ir.Value, int]:
    """q, k, v as (N, L, H*dq), (N, S, H*dq), (N, S, H*hd), and dq, from op_inputs' ``inputs``.
    ``scaled``: q times the core's scale, for an op that runs with scale 1. With a key bias
    (N|1, H|1, 1, S), each query head gets one more entry and each key head the key's bias, so that
    scale * q'.k' = scale * q.k + bias (dq = hd + 1); values keep their head size."""
    h, d = core.num_heads, core.head_dim
    merge = int_constant(graph, "merge_shape", [0, 0, h * d])
    q, k, v = inputs
    if scaled and core.scale != 1.0:
        q = add("Mul", [q, float_constant(graph, "scale", core.scale)], "query_scaled")
    query_entry = 1.0 if scaled else 1.0 / core.scale
    if (
        core.layout != "BSD"
    ):  # BNSH keys and values: the op takes 4-D ones of one head size only, so all go in as (N, S, E)
        k = add(
            "Reshape", [add("Transpose", [k], "key_bsnh", {"perm": [0, 2, 1, 3]}), merge], "key_bsd"
        )
        v = add(
            "Reshape",
            [add("Transpose", [v], "value_bsnh", {"perm": [0, 2, 1, 3]}), merge],
            "value_bsd",
        )
    if bias is None:
        return q, k, v, d
    q, k = widen_heads(graph, q, k, bias, h, d, query_entry, add)
    return q, k, v, d + 1


def widen_heads(
    graph: ir.Graph,
    q: ir.Value,
    k: ir.Value,
    bias: ir.Value,
    h: int,
    d: int,
    query_entry: float,
    add: Emit,
) -> tuple[ir.Value, ir.Value]:
    """BSD q (N, L, H*d) and k (N, S, H*d) with one more entry per head: ``query_entry`` in q, the key's
    bias (N|1, H|1, 1, S) in k, so that q'.k' = q.k + query_entry * bias."""
    ints = lambda name, values: int_constant(graph, name, values)  # noqa: E731
    split = ints("heads_shape", [0, 0, h, d])
    # one more entry at the end of the last axis
    widen = ints("widen_head", [0, 0, 0, 0, 0, 0, 0, 1])
    widened_merge = ints("widened_merge_shape", [0, 0, h * (d + 1)])
    entry = float_constant(graph, "query_entry", query_entry)
    q = add("Pad", [add("Reshape", [q, split], "query_heads"), widen, entry], "query_widened")
    bias = add("Transpose", [bias], "key_bias_bshd", {"perm": [0, 3, 1, 2]})  # (N|1, S, H|1, 1)
    last = ints("bias_last", [0, 0, 0, d, 0, 0, 0, 0])
    zero = float_constant(graph, "zero", 0.0)
    bias = add("Pad", [bias, last, zero], "key_bias_last")
    k = add("Pad", [add("Reshape", [k, split], "key_heads"), widen, zero], "key_widened")
    k = add("Add", [k, bias], "key_with_bias")
    return (
        add("Reshape", [q, widened_merge], "query_widened_bsd"),
        add("Reshape", [k, widened_merge], "key_widened_bsd"),
    )
