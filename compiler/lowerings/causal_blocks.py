"""A causal mask (with padding, or inside a Hugging Face mask) in blocks of queries: the keys left
of a block's diagonal are all visible, which is flash attention; the diagonal block is small and
computed in the graph, and the two are merged by their softmax denominators."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.attention_core import Core, Emit, choose
from compiler.lowerings import Masked, causal_chunks
from compiler.lowerings.causal_chunks import chunkable, chunked_causal
from compiler.lowerings.head_padding import bsd_inputs
from compiler.lowerings.query_blocks import padding_or_blocks
from compiler.mask_ops import (
    KEY_BIAS_FLOOR,
    MS_DOMAIN,
    all_true,
    dead_causal_rows,
    float_constant,
    floored,
    int_constant,
    loop_over,
    no_key_bias,
    split_blocks,
)
from compiler.mask_terms import CausalInside

CAUSAL_BLOCK = 512  # queries per block (docs/BENCHMARKS.md, "Masks")
CAUSAL_FROM = 2048  # the shortest query length whose causal mask goes in blocks


def causal_blocks(
    graph: ir.Graph,
    core: Core,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    dq: int,
    add: Emit,
    scope: str,
) -> ir.Value:
    """Causal self-attention of BSD q (scaled already: the op runs with scale 1), k, v of head sizes dq,
    dq, hd, as (N, L, H*hd), without any (L, S) tensor.

    Queries go in blocks of b = min(L, CAUSAL_BLOCK) (q, k, v padded with zeros to a multiple of b: a
    padded key lies after every real query, so no real query sees it). For block i:
    - the diagonal block is computed in the graph: scores s (N, H, b, b) with the causal triangle,
      their row maximum m, p = exp(s - m), z = sum(p), u = p @ v;
    - the keys before it, all visible, go to MultiHeadAttention with no mask (flash), with one more
      key first: kappa, whose score is m (one more query entry m, kappa's 1 there, 0 for every real
      key) and whose value is one more column (1 for kappa, 0 for real keys). The op returns
      r = sum_j e^(s_j) v_j / (Z + e^m) and x = e^m / (Z + e^m), with Z the visible keys' sum;
    - the two merge exactly: out = (r + x u) / ((1 - x) + x z). Nothing divides by x, so a row whose
      past outweighs its diagonal by more than exp's range (x = 0) is r, as it should be.
    """
    h, dv = core.num_heads, core.head_dim
    if dq == dv and chunkable(core, None):
        return chunked_causal(graph, core, q, k, v, add, scope)
    axes = [
        int_constant(graph, n, [i])
        for n, i in (("axis1", 1), ("axis2", 2), ("axis3", 3), ("last_axis", -1))
    ]
    length, block, blocks, (qp, kp, vp) = split_blocks(graph, q, k, v, CAUSAL_BLOCK, add, "causal")
    parts = _CausalBlock.build(graph, h, dq, dv, axes, q, (qp, kp, vp), block, add)
    stacked = loop_over(graph, add, blocks, "causal", f"{scope}/causal/block", parts.step)
    context = add(
        "Reshape",
        [
            add("Transpose", [stacked], "causal/blocks_first", {"perm": [1, 0, 2, 3]}),
            parts.ints("merge_shape", [0, -1, h * dv]),
        ],
        "causal/context_padded",
    )
    zero = parts.ints("zero1", [0])
    return add("Slice", [context, zero, length, parts.axis1], "causal/context")


@dataclass
class _CausalBlock:
    """What every block of causal_blocks reads (built once, outside its Loop), and the block's
    computation: the diagonal in the graph, the keys before it through the flash kernel with
    kappa, and the exact merge of the two."""

    graph: ir.Graph
    h: int
    dq: int
    dv: int
    block: ir.Value
    axis1: ir.Value
    axis2: ir.Value
    axis3: ir.Value
    last: ir.Value
    q_heads: ir.Value  # (N, Lp, H, dq)
    q_bnsh: ir.Value
    k_t: ir.Value  # (N, H, dq, Lp)
    v_bnsh: ir.Value
    keys: ir.Value  # (N, 1 + Lp, H*(dq+1)): kappa, then the keys
    values: ir.Value
    triangle: ir.Value  # (1, 1, b, b): -inf above the diagonal
    floor: ir.Value

    def ints(self, name: str, values: Any) -> ir.Value:
        return int_constant(self.graph, name, values)

    @classmethod
    def build(
        cls,
        graph: ir.Graph,
        h: int,
        dq: int,
        dv: int,
        axes: list[ir.Value],
        q: ir.Value,
        padded: tuple[ir.Value, ir.Value, ir.Value],
        block: ir.Value,
        add: Emit,
    ) -> _CausalBlock:
        """``axes``: 1, 2, 3 and -1; ``padded``: q, k, v padded to a multiple of the block."""
        qp, kp, vp = padded
        heads = [
            add(
                "Reshape",
                [x, int_constant(graph, f"causal/{n}_heads_shape", [0, 0, h, d])],
                f"causal/{name}",
            )
            for x, n, d, name in (
                (qp, "q", dq, "query_heads"),
                (kp, "k", dq, "key_heads"),
                (vp, "v", dv, "value_heads"),
            )
        ]
        q_bnsh = add("Transpose", [heads[0]], "causal/query_bnsh", {"perm": [0, 2, 1, 3]})
        k_t = add("Transpose", [heads[1]], "causal/key_bnhs", {"perm": [0, 2, 3, 1]})
        v_bnsh = add("Transpose", [heads[2]], "causal/value_bnsh", {"perm": [0, 2, 1, 3]})
        batch = add("Shape", [q], "causal/batch", {"start": 0, "end": 1})
        zero = float_constant(graph, "zero", 0.0)
        keys = _with_kappa(graph, add, heads[1], h, dq, "key", batch, zero)
        values = _with_kappa(graph, add, heads[2], h, dv, "value", batch, zero)
        triangle = _triangle_block(graph, add, block)
        floor = float_constant(graph, "key_bias_floor", KEY_BIAS_FLOOR)
        sizes = (graph, h, dq, dv, block, *axes)
        return cls(*sizes, heads[0], q_bnsh, k_t, v_bnsh, keys, values, triangle, floor)

    def step(self, op: Emit, index: ir.Value) -> ir.Value:
        start = op("Mul", [index, self.block], "start")
        end = op("Add", [start, self.block], "end")
        top, z, u = self._diagonal(op, start, end)
        r, x = self._before_diagonal(op, start, end, top)
        return self._merged(op, r, x, u, z)

    def _diagonal(
        self, op: Emit, start: ir.Value, end: ir.Value
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """The diagonal block's row maximum m, z = sum(exp(s - m)) and u = exp(s - m) @ v."""
        q_block = op("Slice", [self.q_bnsh, start, end, self.axis2], "query")  # (N, H, b, dq)
        key_t = op("Slice", [self.k_t, start, end, self.axis3], "key_t")
        scores = op(
            "Add", [op("MatMul", [q_block, key_t], "scores"), self.triangle], "causal_scores"
        )  # (N, H, b, b)
        row_max = op("ReduceMax", [scores, self.last], "row_max", {"keepdims": 1})
        top = op("Max", [row_max, self.floor], "top")  # (N, H, b, 1)
        p = op("Exp", [op("Sub", [scores, top], "shifted")], "exp")
        z = op("ReduceSum", [p, self.last], "denominator", {"keepdims": 1})
        value = op("Slice", [self.v_bnsh, start, end, self.axis2], "value")
        u = op("MatMul", [p, value], "numerator")  # (N, H, b, hd)
        return top, z, u

    def _before_diagonal(
        self, op: Emit, start: ir.Value, end: ir.Value, top: ir.Value
    ) -> tuple[ir.Value, ir.Value]:
        """The keys before the block through MultiHeadAttention's flash kernel, kappa first:
        r, the context over them, and x, kappa's share of the softmax (N, H, b, 1)."""
        h, dq, dv, ints, last = self.h, self.dq, self.dv, self.ints, self.last
        query = op(
            "Concat",
            [
                op("Slice", [self.q_heads, start, end, self.axis1], "query_heads"),
                op("Transpose", [top], "top_bshd", {"perm": [0, 2, 1, 3]}),
            ],
            "query_kappa",
            {"axis": -1},
        )
        merge = ints("causal/q_kappa_merge", [0, 0, h * (dq + 1)])
        query = op("Reshape", [query, merge], "query_kappa_bsd")
        past = op("Add", [start, ints("one", [1])], "past_end")
        past_keys = op("Slice", [self.keys, ints("zero1", [0]), past, self.axis1], "past_keys")
        past_values = op(
            "Slice", [self.values, ints("zero1", [0]), past, self.axis1], "past_values"
        )
        attended = op(
            "MultiHeadAttention",
            [query, past_keys, past_values],
            "MultiHeadAttention",
            {"num_heads": h, "scale": 1.0},
            MS_DOMAIN,
        )  # (N, b, H*(hd+1))
        split = ints("causal/v_kappa_heads", [0, 0, h, dv + 1])
        attended = op(
            "Transpose",
            [op("Reshape", [attended, split], "past_heads")],
            "past_bnsh",
            {"perm": [0, 2, 1, 3]},
        )
        zero = ints("zero1", [0])
        r = op("Slice", [attended, zero, ints("causal/value_size", [dv]), last], "past_context")
        wider = ints("causal/value_size_1", [dv + 1])
        x = op("Slice", [attended, ints("causal/value_size", [dv]), wider, last], "kappa_weight")
        return r, x

    def _merged(self, op: Emit, r: ir.Value, x: ir.Value, u: ir.Value, z: ir.Value) -> ir.Value:
        """out = (r + x u) / ((1 - x) + x z), as (N, b, H*hd)."""
        numerator = op("Add", [r, op("Mul", [x, u], "diagonal_share")], "numerator_sum")
        past_share = op("Sub", [float_constant(self.graph, "one", 1.0), x], "past_share")
        denominator = op("Add", [past_share, op("Mul", [x, z], "diagonal_z")], "denominator_sum")
        merged = op("Div", [numerator, denominator], "context")
        return op(
            "Reshape",
            [
                op("Transpose", [merged], "context_bshd", {"perm": [0, 2, 1, 3]}),
                self.ints("merge_shape", [0, 0, self.h * self.dv]),
            ],
            "context_bsd",
        )


def _triangle_block(graph: ir.Graph, add: Emit, block: ir.Value) -> ir.Value:
    """(1, 1, b, b): -inf above the diagonal, 0 on and below it."""
    triangle = np.triu(np.full((CAUSAL_BLOCK, CAUSAL_BLOCK), -np.inf, np.float32), 1)
    return add(
        "Slice",
        [
            float_constant(graph, "causal/triangle", triangle[None, None]),
            int_constant(graph, "zeros2", [0, 0]),
            add("Concat", [block, block], "causal/block_square", {"axis": 0}),
            int_constant(graph, "axes23", [2, 3]),
        ],
        "causal/triangle_block",
    )


def _with_kappa(
    graph: ir.Graph,
    add: Emit,
    heads: ir.Value,
    h: int,
    size: int,
    name: str,
    batch: ir.Value,
    zero: ir.Value,
) -> ir.Value:
    """(N, 1 + Lp, H*(size+1)): kappa first, then ``heads`` with a zero entry appended to each head."""
    one_hot = np.zeros((1, 1, h, size + 1), np.float32)
    one_hot[..., -1] = 1.0
    one_hot = float_constant(graph, f"causal/kappa_{name}_one_hot", one_hot)
    dims = int_constant(graph, f"causal/kappa_{name}_dims", [1, h, size + 1])
    shape = add("Concat", [batch, dims], f"causal/kappa_{name}_shape", {"axis": 0})
    kappa = add("Expand", [one_hot, shape], f"causal/kappa_{name}")
    widen = int_constant(graph, "widen_head", [0, 0, 0, 0, 0, 0, 0, 1])
    widened = add("Pad", [heads, widen, zero], f"causal/{name}_widened")
    rows = add("Concat", [kappa, widened], f"causal/{name}_with_kappa", {"axis": 1})
    merge = int_constant(graph, f"causal/{name}_kappa_merge", [0, 0, h * (size + 1)])
    return add("Reshape", [rows, merge], f"causal/{name}_kappa_bsd")


def causal_inside_blocks(
    graph: ir.Graph,
    core: Core,
    inputs: tuple[ir.Value, ir.Value, ir.Value],
    inside: CausalInside,
    add: Emit,
    scope: str,
) -> ir.Value:
    """Attention (N, L, E) under a CausalInside mask: its padding as a key bias, its causal part as
    causal_blocks. A query whose every visible key is padding gets what the mask's graph gives it:
    the mean of all values where ``lowest`` is finite (every score equal), else zero where the
    graph guarded such rows, else NaN."""
    key_bias = None
    if inside.rest:
        key_bias = add(
            "Where",
            [
                _visible(inside, add),
                float_constant(graph, "zero", 0.0),
                float_constant(graph, "neg_inf", -np.inf),
            ],
            "key_bias_terms",
        )
    bias = floored(graph, key_bias, add) if key_bias is not None else None
    context = causal_blocks(
        graph, core, *bsd_inputs(graph, core, inputs, add, bias, True), add, scope
    )
    if key_bias is None:
        return context
    dead = add(
        "Squeeze",
        [
            add(
                "Transpose",
                [dead_causal_rows(graph, key_bias, add)],
                "fully_masked/query_rows",
                {"perm": [0, 2, 1, 3]},
            ),
            int_constant(graph, "axis3", [3]),
        ],
        "fully_masked/rows_nl",
    )  # (N, L, 1)
    fill = _dead_row_fill(graph, core, inputs[2], inside.lowest, add)
    return add("Where", [dead, fill, context], "fully_masked/filled")


def _dead_row_fill(graph: ir.Graph, core: Core, v: ir.Value, lowest: float, add: Emit) -> ir.Value:
    """What the mask's graph gives a query whose every visible key is padding: the mean of the
    values under a finite ``lowest`` (every score equal), else zero where the graph guards such
    rows, else NaN."""
    if not np.isfinite(lowest):
        zero = core.zeroes_dead_rows
        return float_constant(graph, "zero" if zero else "nan", 0.0 if zero else np.nan)
    if core.layout == "BSD":
        axis = int_constant(graph, "axis1", [1])
        return add("ReduceMean", [v, axis], "fully_masked/mean_value", {"keepdims": 1})
    axis = int_constant(graph, "axis2", [2])
    mean = add("ReduceMean", [v, axis], "fully_masked/mean_value", {"keepdims": 1})
    return add(
        "Reshape",
        [
            add("Transpose", [mean], "fully_masked/mean_bsnh", {"perm": [0, 2, 1, 3]}),
            int_constant(graph, "merge_shape", [0, 0, core.num_heads * core.head_dim]),
        ],
        "fully_masked/mean_bsd",
    )


def _visible(inside: CausalInside, add: Emit) -> ir.Value:
    """(N|1, 1, 1, S) bool: the keys the padding part leaves visible."""
    visible = inside.rest[0]
    for i, other in enumerate(inside.rest[1:]):
        visible = add("And", [visible, other], f"visible_{i + 1}")
    return visible


def nothing_padded(graph: ir.Graph, inside: CausalInside, add: Emit) -> ir.Value:
    """(1,) bool: whether the padding part hides no key at run time (a batch of one prompt, or of
    prompts of one length), so that the mask is causal alone."""
    return all_true(graph, _visible(inside, add), add, "nothing_padded")


def causal(
    graph: ir.Graph, core: Core, inputs_of, raw: ir.Value | None, emit: Emit, name: str
) -> ir.Value:
    """Causal self-attention (N, L, E) in blocks, with the key bias ``raw`` if any; ``inputs_of(emit)``
    gives q, k, v (op_inputs' form). A key bias that is 0 everywhere at run time (padding that hides
    no key) takes the form of a causal mask alone, GroupQueryAttention's chunks, where they apply."""

    def build(op, op_name: str, bias: ir.Value | None) -> ir.Value:
        return causal_blocks(
            graph, core, *bsd_inputs(graph, core, inputs_of(op), op, bias, True), op, op_name
        )

    if raw is None:
        return build(emit, name, None)
    if not chunkable(core, None):
        return build(emit, name, floored(graph, raw, emit))
    return choose(
        no_key_bias(graph, raw, emit),
        name,
        emit,
        lambda op, n: build(op, n, None),
        lambda op, n: build(op, n, floored(graph, raw, op)),
    )


def causal_from(core: Core, padded: bool) -> int:
    """The shortest query length whose causal mask (with padding if ``padded``) goes in blocks:
    sooner where GroupQueryAttention's chunks take it."""
    return causal_chunks.CHUNKS_FROM if not padded and chunkable(core, None) else CAUSAL_FROM


class CausalBlocks:
    """A causal mask, with or without padding, and nothing else."""

    def applies(self, masked: Masked) -> bool:
        return masked.terms.causal and not masked.terms.other

    def start(self, masked: Masked) -> int:
        return causal_from(masked.core, masked.raw is not None)

    def emit(self, masked: Masked, emit: Emit, name: str) -> ir.Value:
        return causal(masked.graph, masked.core, masked.inputs, masked.raw, emit, name)


class CausalInsideBlocks:
    """A Hugging Face mask (causal And padding): its causal part as causal blocks where the queries
    are the keys (L = S, as in every self-attention without a cache), else as QueryBlocks takes any
    other mask."""

    def applies(self, masked: Masked) -> bool:
        return masked.terms.causal_inside is not None

    def start(self, masked: Masked) -> int:
        return CAUSAL_FROM

    def emit(self, masked: Masked, emit: Emit, name: str) -> ir.Value:
        q, _, v = masked.inputs(emit)
        axis = 1 if masked.core.layout == "BSD" else 2
        square = emit(
            "Equal",
            [
                emit("Shape", [q], "query_len", {"start": 1, "end": 2}),
                emit("Shape", [v], "key_len", {"start": axis, "end": axis + 1}),
            ],
            "square",
        )
        causal_parts = partial(_causal_parts, masked)
        return choose(square, name, emit, causal_parts, partial(padding_or_blocks, masked))


def _with_padding(masked: Masked, emit: Emit, name: str) -> ir.Value:
    inputs = masked.inputs(emit)
    inside = masked.terms.causal_inside
    return causal_inside_blocks(masked.graph, masked.core, inputs, inside, emit, name)


def _causal_parts(masked: Masked, emit: Emit, name: str) -> ir.Value:
    """Where GroupQueryAttention's chunks take a causal mask alone: them, when no key is padding."""
    inside = masked.terms.causal_inside
    if not inside.rest or not chunkable(masked.core, None):
        return _with_padding(masked, emit, name)
    padded = nothing_padded(masked.graph, inside, emit)
    graph, core = masked.graph, masked.core

    def causal_alone(op: Emit, op_name: str) -> ir.Value:
        return causal(graph, core, masked.inputs, None, op, op_name)

    return choose(padded, name, emit, causal_alone, partial(_with_padding, masked))
