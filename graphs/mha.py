"""The canonical, unfused ONNX form of torch.nn.MultiheadAttention (standard ops, opset 18).

Every Reshape uses 0 (copy) or -1 and every sequence-dependent shape is computed with Shape, so
one graph serves every batch size and length. Internally the graph is batch-first,
(N, L, E) -> (N, H, L, hd); sequence-first inputs and outputs are transposed at the edges.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from graphs.builder import GraphBuilder
from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights


def build_mha(spec: AttentionSpec, weights: AttentionWeights) -> onnx.ModelProto:
    g = GraphBuilder()
    q_in = to_batch_first(g, spec, "query")
    k_in = q_in if spec.self_attention else to_batch_first(g, spec, "key")
    v_in = q_in if spec.self_attention else to_batch_first(g, spec, "value")
    if spec.batch_first:
        add_attention(g, spec, weights, q_in, k_in, v_in, output="attn_output")
    else:
        out = add_attention(g, spec, weights, q_in, k_in, v_in)
        g.op("Transpose", [out], "out_proj/to_seq_first", outputs=["attn_output"], perm=[1, 0, 2])
    return g.model(
        "multi_head_attention",
        spec.inputs(),
        spec.outputs(),
        doc="torch.nn.MultiheadAttention, canonical form",
    )


def add_attention(
    g: GraphBuilder,
    spec: AttentionSpec,
    weights: AttentionWeights,
    q_in: str,
    k_in: str,
    v_in: str,
    *,
    key_padding_mask: str = "key_padding_mask",
    attn_mask: str = "attn_mask",
    output: str | None = None,
) -> str:
    """nn.MultiheadAttention over batch-first (N, L, E) values; returns the batch-first attn_output.

    The mask inputs are named by the caller (a block's ``src_key_padding_mask``, say) and used
    only where the spec has them; ``attn_output_weights`` is added as a graph value when asked.
    """
    w_q, w_k, w_v = weights.in_proj(spec)
    b_q, b_k, b_v = weights.in_bias(spec) or (None, None, None)
    q = linear(g, "q_proj", q_in, w_q, b_q)
    k = linear(g, "k_proj", k_in, w_k, b_k)
    v = linear(g, "v_proj", v_in, w_v, b_v)
    if spec.extra_keys:
        k, v = _append_extra_keys(g, spec, weights, k, v)

    q_h, k_t, v_h = _heads(g, spec, q, k, v)
    scores = g.op("MatMul", [q_h, k_t], "scores/MatMul")
    scores = g.op(
        "Mul",
        [scores, g.const("scores/scale_value", np.float32(1.0 / math.sqrt(spec.head_dim)))],
        "scores/scale",
    )
    mask = _additive_mask(g, spec, q_in, k_in, key_padding_mask, attn_mask)
    if mask is not None:
        scores = g.op("Add", [scores, mask], "scores/add_mask")
    probs = g.op("Softmax", [scores], "softmax/Softmax", axis=-1)
    if spec.has_mask_input:
        probs = _zero_fully_masked_rows(g, scores, probs)
    context = g.op("MatMul", [probs, v_h], "context/MatMul")
    context = g.op("Transpose", [context], "context/merge_heads/Transpose", perm=[0, 2, 1, 3])
    merged = g.ints("context/merge_heads/shape", [0, 0, spec.embed_dim])
    context = g.op("Reshape", [context, merged], "context/merge_heads/Reshape")
    w_o, b_o = weights.tensors["out_proj.weight"], weights.tensors.get("out_proj.bias")
    out = linear(g, "out_proj", context, w_o, b_o, output=output)
    if spec.need_weights:
        _weights_output(g, spec, probs)
    return out


def _heads(g: GraphBuilder, spec: AttentionSpec, q: str, k: str, v: str) -> tuple[str, str, str]:
    """q as (N, H, L, hd), k transposed for the scores (N, H, hd, S), v as (N, H, S, hd); with a
    KV cache, k and v follow the past (present = past, then this step's)."""
    split = g.ints("heads/shape", [0, 0, spec.num_heads, spec.head_dim])

    def heads(x: str, name: str, perm: list[int]) -> str:
        reshaped = g.op("Reshape", [x, split], f"heads/{name}/Reshape")
        return g.op("Transpose", [reshaped], f"heads/{name}/Transpose", perm=perm)

    q_h = heads(q, "q", [0, 2, 1, 3])
    if not spec.kv_cache:
        return q_h, heads(k, "k", [0, 2, 3, 1]), heads(v, "v", [0, 2, 1, 3])
    k_h = heads(k, "k", [0, 2, 1, 3])
    present_k = g.op(
        "Concat", ["past_key", k_h], "cache/present_key", outputs=["present_key"], axis=2
    )
    k_t = g.op("Transpose", [present_k], "cache/keys_transposed", perm=[0, 1, 3, 2])
    v_h = g.op(
        "Concat",
        ["past_value", heads(v, "v", [0, 2, 1, 3])],
        "cache/present_value",
        outputs=["present_value"],
        axis=2,
    )
    return q_h, k_t, v_h


def _weights_output(g: GraphBuilder, spec: AttentionSpec, probs: str) -> None:
    """attn_output_weights: averaged over heads, or per head."""
    if spec.average_attn_weights:
        g.op(
            "ReduceMean",
            [probs, g.ints("weights/head_axis", [1])],
            "weights/average_heads",
            outputs=["attn_output_weights"],
            keepdims=0,
        )
    else:
        g.op("Identity", [probs], "weights/per_head", outputs=["attn_output_weights"])


def to_batch_first(g: GraphBuilder, spec: AttentionSpec, name: str) -> str:
    if spec.batch_first:
        return name
    return g.op("Transpose", [name], f"{name}/to_batch_first", perm=[1, 0, 2])


def linear(
    g: GraphBuilder,
    scope: str,
    x: str,
    weight: np.ndarray,
    bias: np.ndarray | None,
    output: str | None = None,
) -> str:
    """x @ weight.T + bias, torch's Linear, as MatMul and Add so later passes can pack them."""
    last = output is not None
    y = g.op(
        "MatMul",
        [x, g.const(f"{scope}/weight_t", np.ascontiguousarray(weight.T))],
        f"{scope}/MatMul",
        outputs=[output] if last and bias is None else None,
    )
    if bias is None:
        return y
    return g.op(
        "Add",
        [y, g.const(f"{scope}/bias", bias)],
        f"{scope}/Add",
        outputs=[output] if last else None,
    )


def _append_extra_keys(
    g: GraphBuilder, spec: AttentionSpec, weights: AttentionWeights, k: str, v: str
) -> tuple[str, str]:
    """torch appends bias_k/bias_v, then a zero key and value, after the real keys of each batch entry."""
    batch = g.op("Shape", [k], "extra_keys/batch", start=0, end=1)
    shape = g.op(
        "Concat",
        [batch, g.ints("extra_keys/row_shape", [1, spec.embed_dim])],
        "extra_keys/shape",
        axis=0,
    )
    ks, vs = [k], [v]
    if spec.add_bias_kv:
        ks.append(
            g.op(
                "Expand",
                [g.const("bias_kv/bias_k", weights.tensors["bias_k"]), shape],
                "bias_kv/expand_k",
            )
        )
        vs.append(
            g.op(
                "Expand",
                [g.const("bias_kv/bias_v", weights.tensors["bias_v"]), shape],
                "bias_kv/expand_v",
            )
        )
    if spec.add_zero_attn:
        zeros = g.op(
            "Expand",
            [g.const("zero_attn/zero", np.zeros((1, 1, spec.embed_dim), np.float32)), shape],
            "zero_attn/Expand",
        )
        ks.append(zeros)
        vs.append(zeros)
    return (
        g.op("Concat", ks, "extra_keys/concat_k", axis=1),
        g.op("Concat", vs, "extra_keys/concat_v", axis=1),
    )


def _additive_mask(
    g: GraphBuilder, spec: AttentionSpec, q_in: str, k_in: str, kpm_name: str, attn_name: str
) -> str | None:
    """Sum of every mask as float (0 allowed, -inf not), broadcastable to (N, H, L, S')."""
    terms = []
    if spec.key_padding_mask is not None:
        m = _as_float(g, "mask/key_padding", kpm_name, spec.key_padding_mask)
        m = _pad_extra_keys(g, spec, m, 2, "mask/key_padding")
        axes = g.ints("mask/key_padding/axes", [1, 2])
        terms.append(g.op("Unsqueeze", [m, axes], "mask/key_padding/Unsqueeze"))
    if spec.attn_mask is not None:
        terms.append(_attn_mask_term(g, spec, attn_name))
    if spec.is_causal:
        causal = _causal(g, q_in, k_in, past="past_key" if spec.kv_cache else None)
        terms.append(_pad_extra_keys(g, spec, causal, 2, "mask/causal"))
    if not terms:
        return None
    total = terms[0]
    for i, term in enumerate(terms[1:]):
        total = g.op("Add", [total, term], f"mask/combine_{i}")
    return total


def _attn_mask_term(g: GraphBuilder, spec: AttentionSpec, attn_name: str) -> str:
    """attn_mask as a float term: (L, S'), or (N, H, L, S') from the 3-D (N*H, L, S')."""
    rank = 3 if spec.attn_mask_3d else 2
    m = _as_float(g, "mask/attn", attn_name, spec.attn_mask)
    m = _pad_extra_keys(g, spec, m, rank, "mask/attn")
    if not spec.attn_mask_3d:
        return m
    lens = g.op("Shape", [m], "mask/attn/lengths", start=1)
    heads = g.ints("mask/attn/batch_heads", [-1, spec.num_heads])
    shape = g.op("Concat", [heads, lens], "mask/attn/shape", axis=0)
    return g.op("Reshape", [m, shape], "mask/attn/split_heads")


def _as_float(g: GraphBuilder, scope: str, name: str, kind: str) -> str:
    if kind == "float":
        return name
    return g.op("Where", [name, _neg_inf(g), _zero(g)], f"{scope}/bool_to_float")


def _pad_extra_keys(g: GraphBuilder, spec: AttentionSpec, m: str, rank: int, scope: str) -> str:
    """The appended bias and zero keys are always allowed: torch pads every mask with 0 for them."""
    if not spec.extra_keys:
        return m
    pads = [0] * (2 * rank)
    pads[-1] = spec.extra_keys
    return g.op("Pad", [m, g.ints(f"{scope}/extra_keys_pads", pads)], f"{scope}/pad_extra_keys")


def _causal(g: GraphBuilder, q_in: str, k_in: str, past: str | None = None) -> str:
    """(L, S) with -inf where key j lies after query i. With a KV cache the keys are the past's and
    then the query's own, so query i sits at past_len + i (lengths read from the inputs, not from
    present, so a fused op can produce present). Without one, L = S (self-attention) or the mask is
    top-left aligned, as torch's SDPA."""
    squeeze0 = g.ints("mask/causal/axis0", [0])
    tgt = g.op(
        "Squeeze",
        [g.op("Shape", [q_in], "mask/causal/tgt_len", start=1, end=2), squeeze0],
        "mask/causal/tgt_scalar",
    )
    zero, one = g.const("mask/causal/start", np.int64(0)), g.const("mask/causal/step", np.int64(1))
    if past is None:
        src = g.op(
            "Squeeze",
            [g.op("Shape", [k_in], "mask/causal/src_len", start=1, end=2), squeeze0],
            "mask/causal/src_scalar",
        )
        first, end = zero, tgt
    else:
        first = g.op(
            "Squeeze",
            [g.op("Shape", [past], "mask/causal/past_len", start=2, end=3), squeeze0],
            "mask/causal/past_scalar",
        )
        src = end = g.op("Add", [first, tgt], "mask/causal/total_len")
    rows = g.op(
        "Unsqueeze",
        [g.op("Range", [first, end, one], "mask/causal/rows"), g.ints("mask/causal/axis1", [1])],
        "mask/causal/rows_col",
    )
    cols = g.op(
        "Unsqueeze",
        [g.op("Range", [zero, src, one], "mask/causal/cols"), squeeze0],
        "mask/causal/cols_row",
    )
    future = g.op("Greater", [cols, rows], "mask/causal/future")
    return g.op("Where", [future, _neg_inf(g), _zero(g)], "mask/causal/to_float")


def _zero_fully_masked_rows(g: GraphBuilder, scores: str, probs: str) -> str:
    """Softmax of an all -inf row is NaN; docs/ARCHITECTURE.md asks for a zero context there instead.
    A row is dead where its largest score is -inf and it holds no NaN: ReduceMax may pass over a
    NaN (which one it keeps depends on the order), and a NaN from the inputs must reach the output."""
    axis = g.ints("softmax/fully_masked/axis", [-1])
    row_max = g.op("ReduceMax", [scores, axis], "softmax/fully_masked/ReduceMax", keepdims=1)
    row_sum = g.op("ReduceSum", [scores, axis], "softmax/fully_masked/ReduceSum", keepdims=1)
    hidden = g.op("IsInf", [row_max], "softmax/fully_masked/IsInf", detect_positive=0)
    nan = g.op("IsNaN", [row_sum], "softmax/fully_masked/IsNaN")
    no_nan = g.op("Not", [nan], "softmax/fully_masked/Not")
    dead = g.op("And", [hidden, no_nan], "softmax/fully_masked/And")
    return g.op("Where", [dead, _zero(g), probs], "softmax/fully_masked/Where")


def _neg_inf(g: GraphBuilder) -> str:
    return g.const("mask/neg_inf", np.float32(-np.inf))


def _zero(g: GraphBuilder) -> str:
    return g.const("mask/zero", np.float32(0.0))
