"""A causal mask alone as GroupQueryAttention's chunked prefill: its CPU kernel computes only the
keys a query sees."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from compiler.attention_core import Core, Emit
from compiler.mask_ops import MS_DOMAIN, int_constant, loop_over, split_blocks

CHUNK_BLOCK = 1024  # queries per GroupQueryAttention call of the causal chunks
# the same for a causal mask alone where GroupQueryAttention's chunks take it (chunkable)
CHUNKS_FROM = 1536


def chunkable(core: Core, key_bias: ir.Value | None) -> bool:
    """Whether causal_blocks runs GroupQueryAttention's chunks: no key bias, a head size its CPU
    kernel takes (a multiple of 8)."""
    return key_bias is None and core.head_dim is not None and core.head_dim % 8 == 0


def chunked_causal(
    graph: ir.Graph, core: Core, q: ir.Value, k: ir.Value, v: ir.Value, add: Emit, scope: str
) -> ir.Value:
    """Causal self-attention of BSD q (scaled already), k, v (one head size, a multiple of 8) as
    (N, L, H*hd), by ONNX Runtime's GroupQueryAttention as a chunked prefill: one batch entry and a
    block of at most CHUNK_BLOCK queries at a time, the keys before the block given as its past. Its CPU
    kernel computes only the keys a query sees (docs/BENCHMARKS.md, "Causal kernels", has what that
    saves); it holds (H, b, S) scores per call, linear in S. It takes a past with one batch entry
    only, hence the entries one by one."""
    h, d = core.num_heads, core.head_dim
    ints = lambda name, values: int_constant(graph, name, values)  # noqa: E731
    batch = add("Shape", [q], "chunks/batch", {"start": 0, "end": 1})
    length, block, blocks, (qp, kp, vp) = split_blocks(graph, q, k, v, CHUNK_BLOCK, add, "chunks")
    heads = ints("heads_shape", [0, 0, h, d])
    k_bnsh, v_bnsh = (
        add(
            "Transpose",
            [add("Reshape", [x, heads], f"chunks/{name}_heads")],
            f"chunks/{name}_bnsh",
            {"perm": [0, 2, 1, 3]},
        )
        for x, name in ((kp, "key"), (vp, "value"))
    )
    axes01, axes02, zero1, one = (
        ints("axes01", [0, 1]),
        ints("axes02", [0, 2]),
        ints("zero1", [0]),
        ints("one", [1]),
    )

    chunks = _Chunks(h, (qp, kp, vp), k_bnsh, v_bnsh, block, blocks, axes01, axes02, zero1, one)
    count = add("Mul", [batch, blocks], "chunks/calls")
    stacked = loop_over(
        graph, add, count, "chunks", f"{scope}/chunks", chunks.step
    )  # (N * blocks, 1, b, H*hd)
    shape = add(
        "Concat",
        [batch, ints("chunks/rows_and_width", [-1, h * d])],
        "chunks/context_shape",
        {"axis": 0},
    )
    context = add("Reshape", [stacked, shape], "chunks/context_padded")
    return add("Slice", [context, zero1, length, ints("axis1", [1])], "chunks/context")


@dataclass
class _Chunks:
    """One call of chunked_causal' Loop: batch entry index // blocks, its block index % blocks,
    with the keys and values before the block as GroupQueryAttention's past."""

    h: int
    padded: tuple[ir.Value, ir.Value, ir.Value]  # q, k, v (N, Lp, E)
    k_bnsh: ir.Value
    v_bnsh: ir.Value
    block: ir.Value
    blocks: ir.Value
    axes01: ir.Value
    axes02: ir.Value
    zero1: ir.Value
    one: ir.Value

    def step(self, op: Emit, index: ir.Value) -> ir.Value:
        h, (qp, kp, vp), block, blocks = self.h, self.padded, self.block, self.blocks
        k_bnsh, v_bnsh, axes01, axes02 = self.k_bnsh, self.v_bnsh, self.axes01, self.axes02
        zero1, one = self.zero1, self.one
        entry = op("Div", [index, blocks], "entry")  # (1,): this call's batch entry, then its block
        start = op(
            "Mul",
            [op("Sub", [index, op("Mul", [entry, blocks], "entry_start")], "block_index"), block],
            "start",
        )
        end = op("Add", [start, block], "end")
        after = op("Add", [entry, one], "entry_end")
        first, last = (
            op("Concat", [entry, start], "from", {"axis": 0}),
            op("Concat", [after, end], "to", {"axis": 0}),
        )
        rows = [
            op("Slice", [x, first, last, axes01], f"{name}_block")
            for x, name in ((qp, "query"), (kp, "key"), (vp, "value"))
        ]
        past_first = op("Concat", [entry, zero1], "past_from", {"axis": 0})
        past_last = op("Concat", [after, start], "past_to", {"axis": 0})
        past = [
            op("Slice", [x, past_first, past_last, axes02], f"past_{name}")
            for x, name in ((k_bnsh, "key"), (v_bnsh, "value"))
        ]
        seen = op(
            "Cast", [op("Sub", [end, one], "last_key")], "seqlens_k", {"to": ir.DataType.INT32}
        )
        total = op(
            "Cast", [op("Squeeze", [end, zero1], "total_i64")], "total", {"to": ir.DataType.INT32}
        )
        return op(
            "GroupQueryAttention",
            [*rows, *past, seen, total],
            "GroupQueryAttention",
            {"num_heads": h, "kv_num_heads": h, "scale": 1.0},
            MS_DOMAIN,
            outputs=3,
        )[0]  # (1, b, H*hd)
