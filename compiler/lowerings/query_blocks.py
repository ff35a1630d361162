"""Any other mask in blocks of queries, each block's rows of the mask as its op's bias: bounds the
memory of the (N, H, L, S) bias and scores rather than saving time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler.attention_core import (
    Core,
    Emit,
    choose,
    dead_rows,
    no_key_left,
    summed,
    zero_dead_context,
)
from compiler.lowerings import Masked
from compiler.lowerings.padded_rows import padded_rows
from compiler.mask_ops import (
    MS_DOMAIN,
    Attend,
    as_4d,
    first_rows,
    float_constant,
    int_constant,
    loop_over,
    rows_alike,
)
from compiler.mask_terms import MaskTerms

QUERY_BLOCK = 512  # queries per block
BLOCKS_FROM = 2048  # the shortest query length whose other masks go in query blocks (for memory)


def query_blocks(
    graph: ir.Graph,
    core: Core,
    inputs: tuple[ir.Value, ir.Value, ir.Value],
    terms: MaskTerms,
    key_bias: ir.Value | None,
    add: Emit,
    scope: str,
    zero_dead: bool,
    attend: Attend | None = None,
) -> ir.Value:
    """Attention (N, L, E) with any additive mask, in blocks of b = min(L, QUERY_BLOCK) queries, so
    that the op (on its masked path) holds (N, H, b, S) scores instead of (N, H, L, S):
    each block takes its rows of every mask term (a causal term is made anew for its rows; terms
    that broadcast over queries go in whole). Blocks all have b rows, the last one overlapping its
    predecessor, so the Loop's outputs stack; the overlap is dropped after it. ``zero_dead``: rows
    whose every key is -inf get a zero context, read from each block's bias. ``attend(op, query,
    keys, values, bias)`` runs one block (query (N, b, E), keys and values BNSH): by default
    MultiHeadAttention."""
    h, d = core.num_heads, core.head_dim
    ints = lambda name, values: int_constant(graph, name, values)  # noqa: E731
    q, k, v = inputs
    to_bnsh = {"perm": [0, 2, 1, 3]}
    heads = ints("heads_shape", [0, 0, h, d])
    if core.layout == "BSD":
        # keys and values as BNSH once: the op takes them as they are (no copy per block)
        k, v = (
            add(
                "Transpose",
                [add("Reshape", [x, heads], f"blocks/{n}_heads")],
                f"blocks/{n}_bnsh",
                to_bnsh,
            )
            for x, n in ((k, "key"), (v, "value"))
        )
    length = add("Shape", [q], "blocks/length", {"start": 1, "end": 2})
    keys = add("Shape", [k], "blocks/keys", {"start": 2, "end": 3})
    block = add("Min", [length, ints("causal/block", [QUERY_BLOCK])], "blocks/block_len")
    one = ints("one", [1])
    up = add("Sub", [add("Add", [length, block], "blocks/length_up"), one], "blocks/length_up_1")
    count = add("Div", [up, block], "blocks/count")
    last_start = add("Sub", [length, block], "blocks/last_start")
    axis1 = ints("axis1", [1])

    parts = (graph, h, d, core.scale, (q, k, v), terms, key_bias, block, last_start, keys)
    blocks = _QueryBlock(*parts, axis1, heads, zero_dead, attend)
    stacked = loop_over(graph, add, count, "blocks", f"{scope}/blocks/block", blocks.step)
    return _unblocked(graph, add, stacked, count, block, last_start, h * d)


def _unblocked(
    graph: ir.Graph,
    add: Emit,
    stacked: ir.Value,
    count: ir.Value,
    block: ir.Value,
    last_start: ir.Value,
    width: int,
) -> ir.Value:
    """(N, L, width) from the Loop's (count, N, b, width): all blocks but the last in order, then
    the rows of the last that the one before it did not cover."""
    ints = lambda name, values: int_constant(graph, name, values)  # noqa: E731
    one, axis1 = ints("one", [1]), ints("axis1", [1])
    but_last = add("Sub", [count, one], "blocks/but_last")
    head = add(
        "Slice",
        [stacked, ints("zero1", [0]), but_last, ints("axis0", [0])],
        "blocks/but_last_blocks",
    )
    head = add(
        "Reshape",
        [
            add("Transpose", [head], "blocks/head_first", {"perm": [1, 0, 2, 3]}),
            ints("merge_shape", [0, -1, width]),
        ],
        "blocks/head",
    )
    tail = add(
        "Squeeze",
        [
            add(
                "Slice",
                [stacked, add("Sub", [count, one], "blocks/last"), count, ints("axis0", [0])],
                "blocks/last_block",
            ),
            ints("axis0", [0]),
        ],
        "blocks/last_rows",
    )
    covered = add(
        "Mul", [add("Sub", [count, one], "blocks/covered_blocks"), block], "blocks/covered"
    )
    tail = add(
        "Slice",
        [tail, add("Sub", [covered, last_start], "blocks/overlap"), block, axis1],
        "blocks/tail",
    )
    return add("Concat", [head, tail], "blocks/context", {"axis": 1})


@dataclass
class _QueryBlock:
    """One block of query_blocks' Loop: its rows of every mask term, the op over them, and (with
    ``zero_dead``) a zero context for rows whose every key is -inf."""

    graph: ir.Graph
    h: int
    d: int
    scale: float | None
    qkv: tuple[ir.Value, ir.Value, ir.Value]  # q (N, L, E), k and v BNSH
    terms: MaskTerms
    key_bias: ir.Value | None
    block: ir.Value
    last_start: ir.Value
    keys: ir.Value
    axis1: ir.Value
    heads: ir.Value
    zero_dead: bool
    attend: Attend | None

    def ints(self, name: str, values: Any) -> ir.Value:
        return int_constant(self.graph, name, values)

    def step(self, op: Emit, index: ir.Value) -> ir.Value:
        graph, block, last_start, q, k, v = self.graph, self.block, self.last_start, *self.qkv
        terms, key_bias, attend, axis1 = self.terms, self.key_bias, self.attend, self.axis1
        start = op("Min", [op("Mul", [index, block], "start_unclamped"), last_start], "start")
        end = op("Add", [start, block], "end")
        parts = []
        for i, term in enumerate(terms.other):
            parts.append(_rows_of(graph, term, start, end, op, f"term_{i}"))
        if terms.causal:
            parts.append(self._causal(op, start, end))
        if key_bias is not None:
            parts.append(key_bias)
        bias = parts[0] if parts else None  # none: an unmasked core in blocks, for memory alone
        for i, part in enumerate(parts[1:]):
            bias = op("Add", [bias, part], f"bias_{i + 1}")
        query = op("Slice", [q, start, end, axis1], "query")
        if attend is None:
            context = op(
                "MultiHeadAttention",
                [query, k, v, None, None, bias],
                "MultiHeadAttention",
                {"num_heads": self.h, "scale": self.scale},
                MS_DOMAIN,
            )  # (N, b, H*hd)
        else:
            context = attend(op, query, k, v, bias)
        if self.zero_dead and bias is not None:
            context = self._zeroed(op, context, bias)
        return context

    def _causal(self, op: Emit, start: ir.Value, end: ir.Value) -> ir.Value:
        """The causal term of the block's rows: -inf where the key comes after the query."""
        graph, ints, keys = self.graph, self.ints, self.keys
        rows = op(
            "Unsqueeze",
            [
                op(
                    "Range",
                    [
                        op("Squeeze", [start], "start_scalar"),
                        op("Squeeze", [end], "end_scalar"),
                        int_constant(graph, "one_i64", 1),
                    ],
                    "positions",
                ),
                ints("axes013", [0, 1, 3]),
            ],
            "query_positions",
        )
        cols = op(
            "Unsqueeze",
            [
                op(
                    "Range",
                    [
                        int_constant(graph, "zero_i64", 0),
                        op("Squeeze", [keys], "keys_scalar"),
                        int_constant(graph, "one_i64", 1),
                    ],
                    "key_positions",
                ),
                ints("axes012", [0, 1, 2]),
            ],
            "key_positions_row",
        )
        return op(
            "Where",
            [
                op("Greater", [cols, rows], "future"),
                float_constant(graph, "neg_inf", -np.inf),
                float_constant(graph, "zero", 0.0),
            ],
            "causal",
        )

    def _zeroed(self, op: Emit, context: ir.Value, bias: ir.Value) -> ir.Value:
        graph, ints, heads, h, d = self.graph, self.ints, self.heads, self.h, self.d
        to_bnsh = {"perm": [0, 2, 1, 3]}
        dead = no_key_left(graph, bias, op, "dead")  # (N|1, H|1, b, 1)
        return op(
            "Reshape",
            [
                op(
                    "Where",
                    [
                        op("Transpose", [dead], "dead_bshd", to_bnsh),
                        float_constant(graph, "zero", 0.0),
                        op("Reshape", [context, heads], "context_heads"),
                    ],
                    "zeroed",
                ),
                ints("merge_shape", [0, 0, h * d]),
            ],
            "context_zeroed",
        )


def _rows_of(
    graph: ir.Graph, term: ir.Value, start: ir.Value, end: ir.Value, op, name: str
) -> ir.Value:
    """Rows [start, end) of a mask term's query axis (its second last), as a 4-D bias; a term whose
    query axis is 1 (it broadcasts) keeps it, whatever the graph's shapes say, by clamping."""
    rank = len(term.shape)
    axis = int_constant(graph, f"axis{rank - 2}", [rank - 2])
    if term.shape[rank - 2] != 1:
        one = int_constant(graph, "one", [1])
        size = op("Shape", [term], f"{name}/rows", {"start": rank - 2, "end": rank - 1})
        first = op("Min", [start, op("Sub", [size, one], f"{name}/last_row")], f"{name}/first")
        stop = op(
            "Max",
            [
                op("Min", [end, size], f"{name}/stop_clamped"),
                op("Add", [first, one], f"{name}/one_row"),
            ],
            f"{name}/stop",
        )
        term = op("Slice", [term, first, stop, axis], f"{name}/block_rows")
    return as_4d(graph, term, op, name, rank)


def blocks(masked: Masked, emit: Emit, name: str) -> ir.Value:
    """query_blocks over the masked core's terms."""
    inputs = masked.inputs(emit)
    m = masked
    return query_blocks(m.graph, m.core, inputs, m.terms, m.raw, emit, name, m.zero_dead)


def padding_or_blocks(masked: Masked, emit: Emit, name: str) -> ir.Value:
    """Terms whose rows all match at run time are padding after all: cut per entry, flash; else
    query blocks."""
    alike = rows_alike(masked.graph, masked.terms.other, emit)
    return choose(alike, name, emit, partial(_padded, masked), partial(blocks, masked))


def _padded(masked: Masked, emit: Emit, name: str) -> ir.Value:
    graph, core, raw = masked.graph, masked.core, masked.raw
    key_bias = summed(
        first_rows(graph, masked.terms.other, emit) + ([raw] if raw is not None else []),
        emit,
        "key_bias",
    )
    inputs = masked.inputs(emit)
    context = padded_rows(graph, core, inputs, key_bias, emit, name)
    if not masked.zero_dead:
        return context
    return zero_dead_context(graph, core, context, dead_rows(graph, key_bias, emit), emit)


class QueryBlocks:
    """Any other mask: its rows per block of queries, or, where they all match at run time and no
    causal mask comes with them, padding cut per entry."""

    def applies(self, masked: Masked) -> bool:
        return bool(masked.terms.other)

    def start(self, masked: Masked) -> int:
        return BLOCKS_FROM

    def emit(self, masked: Masked, emit: Emit, name: str) -> ir.Value:
        form = blocks if masked.terms.causal else padding_or_blocks
        return form(masked, emit, name)
