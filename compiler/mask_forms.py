"""Exact forms of an attention mask that keep ONNX Runtime's CPU MultiHeadAttention on its flash path.

That kernel runs flash attention (linear memory, no (N, H, L, S) score tensor) only when it gets no
mask at all: any key_padding_mask, attention_bias or unidirectional sends it to the path that writes
every score. So the mask is moved out of the op's inputs:
- a mask that depends on the key alone (padding) becomes one more dimension of each head
  (``widen_heads``): q.k + bias = [q, 1].[k, bias];
- a causal mask becomes query blocks (``causal_blocks``): the keys left of a block's diagonal are
  all visible, which is flash attention; the diagonal block is small and computed in the graph,
  and the two are merged by their softmax denominators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, new_initializer, uniform
from compiler.attention_core import Core, Emit, emitter, keys_bnsh, no_key_left, producer_of

MS_DOMAIN = "com.microsoft"
KEY_BIAS_FLOOR = (
    -1e30
)  # masked keys' bias, finite: a block of -inf scores would make a flash block's running max NaN
CAUSAL_BLOCK = 512  # queries per block (docs/BENCHMARKS.md, "Masks")
CHUNK_BLOCK = 1024  # queries per GroupQueryAttention call of the causal chunks
CAUSAL_FROM = 2048  # the shortest query length whose causal mask goes in blocks
CHUNKS_FROM = (
    1536  # the same for a causal mask alone where GroupQueryAttention's chunks take it (chunkable)
)
ROWS_FROM = 1024  # the shortest query length whose padding is cut per batch entry
BLOCKS_FROM = 2048  # the shortest query length whose other masks go in query blocks (for memory)
ATTENTION_UNTIL = (
    384  # below it, com.microsoft.Attention outruns the flash MultiHeadAttention without a mask
)


@dataclass
class CausalInside:
    """A mask built as Hugging Face builds it, ``Where(causal AND rest, 0, lowest)``: a bool causal
    comparison of key and query positions, And-ed with the rest (padding), then made additive with
    ``lowest`` (the dtype's lowest, or -inf in torch's legacy SDPA export). Kept whole in
    ``MaskTerms.other`` for the forms that take it so; the long form reads these parts. A query whose
    every key is hidden gets ``lowest`` everywhere: the mean of all values (a uniform softmax) where
    it is finite."""

    rest: list[ir.Value]  # the other And operands (bool), each (N|1, 1, 1, S): padding
    lowest: float


@dataclass
class MaskTerms:
    """The additive terms a core's mask is the sum of, sorted by what they depend on."""

    keys: list[ir.Value] = field(default_factory=list)  # rank 4, (N|1, H|1, 1, S): padding
    causal: bool = False  # query i sees keys 0..i, with L = S (self-attention)
    other: list[ir.Value] = field(default_factory=list)
    # a KV cache's causal mask: query i sees keys 0..past + i, ``past`` this scalar (the rows' first position)
    past: ir.Value | None = None
    causal_inside: CausalInside | None = None  # ``other`` is one such mask

    @property
    def key_only(self) -> bool:
        return bool(self.keys) and not self.causal and not self.other and self.past is None


def mask_terms(core: Core) -> MaskTerms:
    terms = MaskTerms()
    pending = [core.mask, *core.extra_masks] if core.mask is not None else []
    while pending:
        term = pending.pop()
        if (add := producer_of(term, "Add")) is not None and len(pending) < 8:
            pending += list(add.inputs)
        elif _is_self_causal(term) and not terms.causal:
            terms.causal = True
        elif (
            core.cache is not None
            and terms.past is None
            and (past := _causal_after(term)) is not None
        ):
            terms.past = past
        elif (
            term.shape is not None
            and len(term.shape) == 4
            and term.shape[2] == 1
            and term.shape[3] != 1
        ):
            terms.keys.append(term)
        else:
            terms.other.append(term)
    if core.cache is None and len(terms.other) == 1 and not terms.keys and not terms.causal:
        terms.causal_inside = causal_inside(terms.other[0])
    return terms


def causal_inside(term: ir.Value) -> CausalInside | None:
    """The parts of ``Where(B, 0, lowest)`` whose bool B is an And of a causal comparison
    (``kv <= q`` with kv = Range(0, S) on the last axis and q = Range(0, L) on axis 2 of four) and
    other operands; constant-true operands drop out. None for any other mask."""
    where = producer_of(term, "Where")
    if (
        where is None
        or term.shape is None
        or len(term.shape) != 4
        or not _is_scalar(where.inputs[1], 0.0)
    ):
        return None
    lowest = constant(
        where.inputs[2]
    )  # low enough that a score added to it is lost: every hidden key alike
    if lowest is None or lowest.size != 1 or not float(lowest.reshape(())) <= -1e30:
        return None
    operands, pending, causal = [], [where.inputs[0]], False
    while pending and len(operands) < 8:
        value = pending.pop()
        node = value.producer()
        if node is not None and not node.domain and node.op_type in ("And", "Expand", "Cast"):
            if node.op_type == "Cast" and node.attributes.get_int("to", 0) != ir.DataType.BOOL:
                operands.append(value)
            else:
                pending += list(node.inputs) if node.op_type == "And" else [node.inputs[0]]
        elif _is_causal_comparison(value) and not causal:
            causal = True
        elif uniform(value) is not True:
            operands.append(value)
    if not causal or pending or not all(_key_only(x) for x in operands):
        return None
    return CausalInside(operands, float(lowest.reshape(())))


def _key_only(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and len(shape) == 4 and shape[1] == 1 and shape[2] == 1


def _is_causal_comparison(value: ir.Value) -> bool:
    """LessOrEqual(kv, q) or GreaterOrEqual(q, kv), each position a Range from 0 unsqueezed to axis 3
    (keys) or 2 (queries) of four: key j is visible to query i when j <= i."""
    node = value.producer()
    if node is None or node.domain or node.op_type not in ("LessOrEqual", "GreaterOrEqual"):
        return False
    keys, queries = node.inputs if node.op_type == "LessOrEqual" else node.inputs[::-1]
    return _range_axis(keys) == (3, 4) and _range_axis(queries) == (2, 4)


def _range_axis(value: ir.Value, depth: int = 6) -> tuple[int, int] | None:
    """(the axis Range(0, n, 1) lies on, the rank) for Unsqueezes of it, else None."""
    node = value.producer()
    if node is None or node.domain or depth == 0:
        return None
    if node.op_type == "Range":
        return (0, 1) if _is_scalar(node.inputs[0], 0) and _is_scalar(node.inputs[2], 1) else None
    if node.op_type == "Cast":
        return _range_axis(node.inputs[0], depth - 1)
    if (
        node.op_type != "Unsqueeze"
        or len(node.inputs) < 2
        or (axes := constant(node.inputs[1])) is None
    ):
        return None
    inner = _range_axis(node.inputs[0], depth - 1)
    if inner is None:
        return None
    axis, rank = inner
    rank += axes.size
    inserted = sorted(int(a) % rank for a in axes.reshape(-1))
    for (
        a
    ) in inserted:  # positions in the output: each inserted axis at or before the range's shifts it
        if a <= axis:
            axis += 1
    return axis, rank


def _causal_greater(term: ir.Value) -> ir.Node | None:
    """The Greater(cols, rows) of a term Where(Greater(cols, rows), -inf, 0), else None."""
    where = producer_of(term, "Where")
    greater = producer_of(where.inputs[0], "Greater") if where is not None else None
    if (
        greater is None
        or not _is_scalar(where.inputs[1], -np.inf)
        or not _is_scalar(where.inputs[2], 0.0)
    ):
        return None
    return greater


def _is_self_causal(term: ir.Value) -> bool:
    """Where(Greater(cols, rows), -inf, 0) with rows = Range(0, n) on axis 0 and cols = Range(0, n) on
    axis 1, one n (graphs/mha.py's causal mask of a self-attention): key j is hidden from query i > j."""
    greater = _causal_greater(term)
    if greater is None:
        return False
    cols, rows = (_unsqueezed_range(x, axis) for x, axis in zip(greater.inputs, (0, 1)))
    return (
        cols is not None
        and rows is not None
        and (cols is rows or (cols.inputs[1] is rows.inputs[1] and _is_scalar(rows.inputs[0], 0)))
    )


def _causal_after(term: ir.Value) -> ir.Value | None:
    """p where the term is Where(Greater(cols, rows), -inf, 0) with rows = Range(p, n) on axis 0 and
    cols = Range(0, n) on axis 1 (graphs/mha.py's causal mask with a KV cache of p keys): query i
    sees keys 0..p + i. Where p is 0 at run time, that is a self-attention's causal mask."""
    greater = _causal_greater(term)
    if greater is None:
        return None
    cols = _unsqueezed_range(greater.inputs[0], 0)
    rows = _unsqueezed_range(greater.inputs[1], 1, any_start=True)
    if (
        cols is None
        or rows is None
        or cols.inputs[1] is not rows.inputs[1]
        or _is_scalar(rows.inputs[0], 0)
    ):
        return None
    return rows.inputs[0]


def _unsqueezed_range(value: ir.Value, axis: int, any_start: bool = False) -> ir.Node | None:
    """Range(0, n, 1) (or Range(p, n, 1) with ``any_start``) for value = Unsqueeze(it, [axis])."""
    unsqueeze = producer_of(value, "Unsqueeze")
    axes = (
        constant(unsqueeze.inputs[1])
        if unsqueeze is not None and len(unsqueeze.inputs) > 1
        else None
    )
    if axes is None or axes.tolist() != [axis]:
        return None
    range_ = producer_of(unsqueeze.inputs[0], "Range")
    if (
        range_ is None
        or not (any_start or _is_scalar(range_.inputs[0], 0))
        or not _is_scalar(range_.inputs[2], 1)
    ):
        return None
    return range_


def _is_scalar(value: ir.Value | None, expected: float) -> bool:
    array = constant(value)
    return array is not None and array.size == 1 and float(array.reshape(())) == expected


def _ints(graph: ir.Graph, name: str, values) -> ir.Value:
    return new_initializer(graph, f"attention/{name}", np.asarray(values, np.int64))


def _floats(graph: ir.Graph, name: str, values) -> ir.Value:
    return new_initializer(graph, f"attention/{name}", np.asarray(values, np.float32))


def floored(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """A key bias (N|1, H|1, 1, S) with -inf raised to KEY_BIAS_FLOOR: exp of it is 0 all the same, and
    a fully masked row is zeroed from the mask itself where the graph asks for that."""
    return add("Max", [bias, _floats(graph, "key_bias_floor", KEY_BIAS_FLOOR)], "key_bias")


def op_inputs(graph: ir.Graph, core: Core, add: Emit) -> tuple[ir.Value, ir.Value, ir.Value]:
    """q, k, v for MultiHeadAttention: q as (N, L, E); a BNSH core's keys and values stay BNSH, which
    the op takes without a copy. Every form reads these, built once outside any If: a value an If
    reads is one ONNX Runtime's transpose optimizer cannot cancel against the exporter's transposes."""
    if core.layout == "BSD":
        return core.q, core.k, core.v
    merge = _ints(graph, "merge_shape", [0, 0, core.num_heads * core.head_dim])
    q = add(
        "Reshape",
        [add("Transpose", [core.q], "query_bsnh", {"perm": [0, 2, 1, 3]}), merge],
        "query_bsd",
    )
    k, v = keys_bnsh(core, add), core.v
    if core.num_heads > 1 and any(_head_axis(x) == 1 for x in (k, v)):
        # multi-query keys and values, which the graph's MatMuls broadcast over the query heads:
        # MultiHeadAttention takes as many as the query has (Falcon)
        heads = _ints(graph, "query_heads", [1, core.num_heads, 1, 1])
        k, v = (
            add("Expand", [x, heads], f"{name}_per_head") for x, name in ((k, "key"), (v, "value"))
        )
    return q, k, v


def _head_axis(value: ir.Value) -> int | str | None:
    """Axis 1 of a rank-4 value as shape inference left it: a number, a symbol, or None."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dim = shape[1]
    return dim if isinstance(dim, int) else None


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
    merge = _ints(graph, "merge_shape", [0, 0, h * d])
    q, k, v = inputs
    if scaled and core.scale != 1.0:
        q = add("Mul", [q, _floats(graph, "scale", core.scale)], "query_scaled")
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
    split = _ints(graph, "heads_shape", [0, 0, h, d])
    widen = _ints(
        graph, "widen_head", [0, 0, 0, 0, 0, 0, 0, 1]
    )  # one more entry at the end of the last axis
    widened_merge = _ints(graph, "widened_merge_shape", [0, 0, h * (d + 1)])
    q = add(
        "Pad",
        [
            add("Reshape", [q, split], "query_heads"),
            widen,
            _floats(graph, "query_entry", query_entry),
        ],
        "query_widened",
    )
    bias = add("Transpose", [bias], "key_bias_bshd", {"perm": [0, 3, 1, 2]})  # (N|1, S, H|1, 1)
    bias = add(
        "Pad",
        [bias, _ints(graph, "bias_last", [0, 0, 0, d, 0, 0, 0, 0]), _floats(graph, "zero", 0.0)],
        "key_bias_last",
    )
    k = add(
        "Add",
        [
            add(
                "Pad",
                [add("Reshape", [k, split], "key_heads"), widen, _floats(graph, "zero", 0.0)],
                "key_widened",
            ),
            bias,
        ],
        "key_with_bias",
    )
    return add("Reshape", [q, widened_merge], "query_widened_bsd"), add(
        "Reshape", [k, widened_merge], "key_widened_bsd"
    )


def _blocked(
    graph: ir.Graph, q: ir.Value, k: ir.Value, v: ir.Value, most: int, add: Emit, name: str
):
    """(length, block, blocks, (q, k, v) padded to blocks x block rows) for BSD q, k, v of one length:
    as few blocks as blocks of at most ``most`` rows allow, all of one size, so that the padding adds
    fewer rows than there are blocks (blocks of exactly ``most`` would pad 1.5 x ``most`` tokens to
    2 x ``most``). A padded key lies after every real query: causal hides it."""
    one = _ints(graph, "one", [1])

    def ceil(a: ir.Value, b: ir.Value, out: str) -> ir.Value:
        return add(
            "Div", [add("Sub", [add("Add", [a, b], f"{out}_up"), one], f"{out}_up_1"), b], out
        )

    length = add("Shape", [q], f"{name}/length", {"start": 1, "end": 2})
    blocks = ceil(length, _ints(graph, f"{name}/most", [most]), f"{name}/blocks")
    block = ceil(length, blocks, f"{name}/block_len")
    extra = add("Sub", [add("Mul", [blocks, block], f"{name}/padded"), length], f"{name}/extra")
    pads = add(
        "Concat",
        [_ints(graph, "zeros4", [0, 0, 0, 0]), extra, _ints(graph, "zeros1", [0])],
        f"{name}/pads",
        {"axis": 0},
    )
    padded = tuple(
        add("Pad", [x, pads], f"{name}/{part}_padded")
        for x, part in ((q, "query"), (k, "key"), (v, "value"))
    )
    return length, block, blocks, padded


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
        return _causal_chunks(graph, core, q, k, v, add, scope)
    axes = [
        _ints(graph, n, [i])
        for n, i in (("axis1", 1), ("axis2", 2), ("axis3", 3), ("last_axis", -1))
    ]
    length, block, blocks, (qp, kp, vp) = _blocked(graph, q, k, v, CAUSAL_BLOCK, add, "causal")
    parts = _CausalBlock.build(graph, h, dq, dv, axes, q, (qp, kp, vp), block, add)
    stacked = _loop(graph, add, blocks, "causal", f"{scope}/causal/block", parts.step)
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
        return _ints(self.graph, name, values)

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
                [x, _ints(graph, f"causal/{n}_heads_shape", [0, 0, h, d])],
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
        zero = _floats(graph, "zero", 0.0)
        keys = _with_kappa(graph, add, heads[1], h, dq, "key", batch, zero)
        values = _with_kappa(graph, add, heads[2], h, dv, "value", batch, zero)
        triangle = _triangle_block(graph, add, block)
        floor = _floats(graph, "key_bias_floor", KEY_BIAS_FLOOR)
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
        past_share = op("Sub", [_floats(self.graph, "one", 1.0), x], "past_share")
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
            _floats(graph, "causal/triangle", triangle[None, None]),
            _ints(graph, "zeros2", [0, 0]),
            add("Concat", [block, block], "causal/block_square", {"axis": 0}),
            _ints(graph, "axes23", [2, 3]),
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
    one_hot = _floats(graph, f"causal/kappa_{name}_one_hot", one_hot)
    dims = _ints(graph, f"causal/kappa_{name}_dims", [1, h, size + 1])
    shape = add("Concat", [batch, dims], f"causal/kappa_{name}_shape", {"axis": 0})
    kappa = add("Expand", [one_hot, shape], f"causal/kappa_{name}")
    widen = _ints(graph, "widen_head", [0, 0, 0, 0, 0, 0, 0, 1])
    widened = add("Pad", [heads, widen, zero], f"causal/{name}_widened")
    rows = add("Concat", [kappa, widened], f"causal/{name}_with_kappa", {"axis": 1})
    merge = _ints(graph, f"causal/{name}_kappa_merge", [0, 0, h * (size + 1)])
    return add("Reshape", [rows, merge], f"causal/{name}_kappa_bsd")


def chunkable(core: Core, key_bias: ir.Value | None) -> bool:
    """Whether causal_blocks runs GroupQueryAttention's chunks: no key bias, a head size its CPU
    kernel takes (a multiple of 8)."""
    return key_bias is None and core.head_dim is not None and core.head_dim % 8 == 0


def _causal_chunks(
    graph: ir.Graph, core: Core, q: ir.Value, k: ir.Value, v: ir.Value, add: Emit, scope: str
) -> ir.Value:
    """Causal self-attention of BSD q (scaled already), k, v (one head size, a multiple of 8) as
    (N, L, H*hd), by ONNX Runtime's GroupQueryAttention as a chunked prefill: one batch entry and a
    block of at most CHUNK_BLOCK queries at a time, the keys before the block given as its past. Its CPU
    kernel computes only the keys a query sees (docs/BENCHMARKS.md, "Causal kernels", has what that
    saves); it holds (H, b, S) scores per call, linear in S. It takes a past with one batch entry
    only, hence the entries one by one."""
    h, d = core.num_heads, core.head_dim
    ints = lambda name, values: _ints(graph, name, values)  # noqa: E731
    batch = add("Shape", [q], "chunks/batch", {"start": 0, "end": 1})
    length, block, blocks, (qp, kp, vp) = _blocked(graph, q, k, v, CHUNK_BLOCK, add, "chunks")
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
    stacked = _loop(
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
    """One call of _causal_chunks' Loop: batch entry index // blocks, its block index % blocks,
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


def causal_bias(graph: ir.Graph, q: ir.Value, add: Emit) -> ir.Value:
    """(1, 1, L, L): -inf where key j lies after query i, for BSD q (N, L, E)."""
    length = add(
        "Squeeze",
        [
            add("Shape", [q], "causal_mask/length", {"start": 1, "end": 2}),
            _ints(graph, "axis0", [0]),
        ],
        "causal_mask/length_scalar",
    )
    rows = add(
        "Range",
        [_ints(graph, "zero_i64", 0), length, _ints(graph, "one_i64", 1)],
        "causal_mask/positions",
    )
    future = add(
        "Greater",
        [
            add("Unsqueeze", [rows, _ints(graph, "axes01", [0, 1, 2])], "causal_mask/keys"),
            add("Unsqueeze", [rows, _ints(graph, "axes013", [0, 1, 3])], "causal_mask/queries"),
        ],
        "causal_mask/future",
    )
    return add(
        "Where",
        [future, _floats(graph, "neg_inf", -np.inf), _floats(graph, "zero", 0.0)],
        "causal_mask/bias",
    )


def dead_causal_rows(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """(N|1, H|1, L, 1): True where query i sees no key among 0..i that the key bias (not floored) leaves
    above -inf."""
    hidden = add("IsInf", [bias], "hidden_key", {"detect_positive": 0})
    visible = add(
        "Cast",
        [add("Not", [hidden], "visible_key")],
        "visible_key_count",
        {"to": ir.DataType.FLOAT},
    )
    seen = add("CumSum", [visible, _ints(graph, "last_axis_scalar", -1)], "visible_so_far")
    dead = add("Less", [seen, _floats(graph, "half", 0.5)], "fully_masked/none_visible")
    return add("Transpose", [dead], "fully_masked/rows", {"perm": [0, 1, 3, 2]})


Attend = Callable[[Emit, ir.Value, ir.Value, ir.Value, ir.Value], ir.Value]


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
    """Attention (N, L, E) with any additive mask, in blocks of b = min(L, CAUSAL_BLOCK) queries, so
    that the op (on its masked path) holds (N, H, b, S) scores instead of (N, H, L, S):
    each block takes its rows of every mask term (a causal term is made anew for its rows; terms
    that broadcast over queries go in whole). Blocks all have b rows, the last one overlapping its
    predecessor, so the Loop's outputs stack; the overlap is dropped after it. ``zero_dead``: rows
    whose every key is -inf get a zero context, read from each block's bias. ``attend(op, query,
    keys, values, bias)`` runs one block (query (N, b, E), keys and values BNSH): by default
    MultiHeadAttention."""
    h, d = core.num_heads, core.head_dim
    ints = lambda name, values: _ints(graph, name, values)  # noqa: E731
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
    block = add("Min", [length, ints("causal/block", [CAUSAL_BLOCK])], "blocks/block_len")
    one = ints("one", [1])
    up = add("Sub", [add("Add", [length, block], "blocks/length_up"), one], "blocks/length_up_1")
    count = add("Div", [up, block], "blocks/count")
    last_start = add("Sub", [length, block], "blocks/last_start")
    axis1 = ints("axis1", [1])

    parts = (graph, h, d, core.scale, (q, k, v), terms, key_bias, block, last_start, keys)
    blocks = _QueryBlock(*parts, axis1, heads, zero_dead, attend)
    stacked = _loop(graph, add, count, "blocks", f"{scope}/blocks/block", blocks.step)
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
    ints = lambda name, values: _ints(graph, name, values)  # noqa: E731
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
        return _ints(self.graph, name, values)

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
                        _ints(graph, "one_i64", 1),
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
                        _ints(graph, "zero_i64", 0),
                        op("Squeeze", [keys], "keys_scalar"),
                        _ints(graph, "one_i64", 1),
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
                _floats(graph, "neg_inf", -np.inf),
                _floats(graph, "zero", 0.0),
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
                        _floats(graph, "zero", 0.0),
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
    axis = _ints(graph, f"axis{rank - 2}", [rank - 2])
    if term.shape[rank - 2] != 1:
        one = _ints(graph, "one", [1])
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


def as_4d(
    graph: ir.Graph, term: ir.Value, add: Emit, name: str, rank: int | None = None
) -> ir.Value:
    """A mask term of rank 2 or 3 with leading axes of 1, as it broadcasts against (N, H, L, S)."""
    rank = len(term.shape) if rank is None else rank
    if rank >= 4:
        return term
    return add(
        "Unsqueeze",
        [term, _ints(graph, f"leading_{4 - rank}", list(range(4 - rank)))],
        f"{name}/as_4d",
    )


def padded_rows(
    graph: ir.Graph,
    core: Core,
    inputs: tuple[ir.Value, ir.Value, ir.Value],
    raw: ir.Value,
    add: Emit,
    scope: str,
) -> ir.Value:
    """Attention (N, L, E) with a key-only mask ``raw`` (N|1, H|1, 1, S), one batch entry at a time,
    its keys cut after the last one above KEY_BIAS_FLOOR in any head (-inf, or the float minimum
    Hugging Face masks with: exp gives the cut keys 0 exactly beside any kept key, so nothing
    changes; an entry with no such key keeps them all, and so its uniform row): trailing padding,
    as batched serving pads, costs nothing. An entry whose kept
    bias is all zero runs MultiHeadAttention on its q, k, v as they are; any other takes the bias as
    one more head dimension (widen_heads). Both are the op's flash path."""
    h, d = core.num_heads, core.head_dim
    ints = lambda name, values: _ints(graph, name, values)  # noqa: E731
    q, k, v, _ = bsd_inputs(graph, core, inputs, add, None, False)
    one, axis0, axis1, last = (
        ints("one", [1]),
        ints("axis0", [0]),
        ints("axis1", [1]),
        ints("last_axis", [-1]),
    )
    ends = _kept_keys(graph, raw, add, axis0)
    axes = (one, axis0, axis1, last)
    rows = _PaddedRow(graph, h, d, core.scale, (q, k, v), raw, ends, *axes, f"{scope}/rows/row")
    batch = add("Shape", [q], "rows/batch", {"start": 0, "end": 1})
    stacked = _loop(graph, add, batch, "rows", rows.inner, rows.step)  # (N, 1, L, H*hd)
    return add("Squeeze", [stacked, axis1], "rows/context")


def _kept_keys(graph: ir.Graph, raw: ir.Value, add: Emit, axis0: ir.Value) -> ir.Value:
    """(N|1,) int64: how many keys each entry keeps, up to its last one above KEY_BIAS_FLOOR in
    any head; all of them where none is."""
    ints = lambda name, values: _ints(graph, name, values)  # noqa: E731
    keys = add("Shape", [raw], "rows/keys", {"start": 3, "end": 4})
    one = _ints(graph, "one_i64", 1)
    past_last = add("Add", [add("Squeeze", [keys, axis0], "rows/keys_scalar"), one], "rows/keys_1")
    positions = add("Range", [one, past_last, one], "rows/positions_1")
    positions = add("Cast", [positions], "rows/positions", {"to": ir.DataType.FLOAT})  # 1..S
    floor = _floats(graph, "key_bias_floor", KEY_BIAS_FLOOR)
    visible = add(
        "Cast",
        [add("Not", [add("LessOrEqual", [raw, floor], "rows/hidden")], "rows/visible")],
        "rows/visible_f",
        {"to": ir.DataType.FLOAT},
    )
    ends = add(
        "ReduceMax",
        [add("Mul", [visible, positions], "rows/visible_at"), ints("axes123", [1, 2, 3])],
        "rows/last_visible",
        {"keepdims": 0},
    )  # (N|1,); 0: no key visible
    all_keys = add("Cast", [keys], "rows/keys_f", {"to": ir.DataType.FLOAT})
    ends = add(
        "Cast",
        [
            add(
                "Where",
                [
                    add("Less", [ends, _floats(graph, "half", 0.5)], "rows/none_visible"),
                    all_keys,
                    ends,
                ],
                "rows/kept",
            )
        ],
        "rows/ends",
        {"to": ir.DataType.INT64},
    )
    return ends


@dataclass
class _PaddedRow:
    """One batch entry of padded_rows' Loop: its query, its keys and bias cut to the ones kept,
    and MultiHeadAttention over them, plain or with the bias as one more head dimension."""

    graph: ir.Graph
    h: int
    d: int
    scale: float | None
    qkv: tuple[ir.Value, ir.Value, ir.Value]
    raw: ir.Value
    ends: ir.Value
    one: ir.Value
    axis0: ir.Value
    axis1: ir.Value
    last: ir.Value
    inner: str

    def step(self, op: Emit, index: ir.Value) -> ir.Value:
        query, key, value, bias = self._row(op, index)
        graph = self.graph
        nonzero = op(
            "ReduceMax",
            [
                op(
                    "Cast",
                    [
                        op(
                            "Not",
                            [op("Equal", [bias, _floats(graph, "zero", 0.0)], "zero_bias")],
                            "nonzero_bias",
                        )
                    ],
                    "nonzero",
                    {"to": ir.DataType.FLOAT},
                )
            ],
            "any_nonzero",
            {"keepdims": 0},
        )
        plain = op("Less", [nonzero, _floats(graph, "half", 0.5)], "plain")
        branches = [self._branch(name, query, key, value, bias) for name in ("plain", "widened")]
        return op("If", [plain], "If", {"then_branch": branches[0], "else_branch": branches[1]})

    def _row(self, op: Emit, index: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
        """The entry's query, and its keys, values and bias up to its last kept key."""
        (q, k, v), raw, one, axis0, axis1 = self.qkv, self.raw, self.one, self.axis0, self.axis1
        zero1 = lambda: _ints(self.graph, "zero1", [0])  # noqa: E731
        first = op("Unsqueeze", [index, axis0], "first")
        after = op("Add", [first, one], "after")
        mask_rows = op("Shape", [raw], "mask_rows", {"start": 0, "end": 1})
        # a mask that broadcasts over the batch has one row for all
        mask_row = op("Min", [first, op("Sub", [mask_rows, one], "last_mask_row")], "mask_row")
        mask_after = op("Add", [mask_row, one], "mask_after")
        end = op("Slice", [self.ends, mask_row, mask_after, axis0], "end")
        query = op("Slice", [q, first, after, axis0], "query")
        key_row = op("Slice", [k, first, after, axis0], "key_row")
        key = op("Slice", [key_row, zero1(), end, axis1], "key")
        value_row = op("Slice", [v, first, after, axis0], "value_row")
        value = op("Slice", [value_row, zero1(), end, axis1], "value")
        bias_row = op("Slice", [raw, mask_row, mask_after, axis0], "bias_row")
        bias = op("Slice", [bias_row, zero1(), end, self.last], "bias")
        return query, key, value, bias

    def _branch(
        self, name: str, query: ir.Value, key: ir.Value, value: ir.Value, bias: ir.Value
    ) -> ir.Graph:
        """The If branch that runs the op: ``plain`` on q, k, v as they are, ``widened`` with the
        bias as one more head dimension."""
        nodes: list[ir.Node] = []
        emit = emitter(nodes, f"{self.inner}/{name}")
        qb, kb = query, key
        if name != "plain":
            floor = floored(self.graph, bias, emit)
            qb, kb = widen_heads(
                self.graph, query, key, floor, self.h, self.d, 1.0 / self.scale, emit
            )
        context = emit(
            "MultiHeadAttention",
            [qb, kb, value],
            "MultiHeadAttention",
            {"num_heads": self.h, "scale": self.scale},
            MS_DOMAIN,
        )  # (1, L, H*hd)
        context.type = ir.TensorType(ir.DataType.FLOAT)  # a branch's output is typed
        return ir.Graph([], [context], nodes=nodes, name=f"{self.inner}/{name}")


def rows_alike(graph: ir.Graph, terms: list[ir.Value], add: Emit) -> ir.Value:
    """(1,) bool: whether every query row of every term equals its first row, so that the terms are a
    key-only mask after all (a padding mask the exporter expanded to (N, 1, L, S), as Hugging Face
    models build theirs). Each key's largest and smallest entry over the rows agree: two passes over
    the terms, which the graph holds anyway, and nothing of their size made (an Equal against the
    first row would make an (L, S) bool and its float Cast: 1.25 GiB at 16384 tokens)."""
    same = None
    for i, term in enumerate(
        terms
    ):  # the terms broadcast together, and so do their (…, 1, S) flags
        axis = _ints(graph, f"axis{len(term.shape) - 2}", [len(term.shape) - 2])
        high = add("ReduceMax", [term, axis], f"rows_alike/high_{i}", {"keepdims": 1})
        low = add("ReduceMin", [term, axis], f"rows_alike/low_{i}", {"keepdims": 1})
        flags = add("Equal", [high, low], f"rows_alike/equal_{i}")
        same = flags if same is None else add("And", [same, flags], f"rows_alike/and_{i}")
    return _all(graph, same, add, "rows_alike")


def first_rows(graph: ir.Graph, terms: list[ir.Value], add: Emit) -> list[ir.Value]:
    """Each term's first query row, as a key bias (N|1, H|1, 1, S)."""
    out = []
    for i, term in enumerate(terms):
        axis = _ints(graph, f"axis{len(term.shape) - 2}", [len(term.shape) - 2])
        row = add(
            "Slice",
            [term, _ints(graph, "zero1", [0]), _ints(graph, "one", [1]), axis],
            f"first_row_{i}",
        )
        out.append(as_4d(graph, row, add, f"first_row_{i}", len(term.shape)))
    return out


def _loop(
    graph: ir.Graph,
    add: Emit,
    count: ir.Value,
    name: str,
    scope: str,
    step: Callable[[Emit, ir.Value], ir.Value],
) -> ir.Value:
    """Loop ``count`` (a (1,) int64) times over ``step(op, index) -> output``, whose nodes ``op`` names
    under ``scope``: the outputs stacked on a new first axis."""
    body: list[ir.Node] = []
    op = emitter(body, scope)
    index = ir.Value(
        name=f"{scope}/index", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
    )
    go_on = ir.Value(
        name=f"{scope}/go_on", type=ir.TensorType(ir.DataType.BOOL)
    )  # no shape: ONNX infers it from the Loop
    output = step(op, index)
    done = op("Identity", [go_on], "go_on_out")
    done.type, output.type = (
        ir.TensorType(ir.DataType.BOOL),
        ir.TensorType(ir.DataType.FLOAT),
    )  # a body's outputs are typed
    trips = add("Squeeze", [count, _ints(graph, "zero1", [0])], f"{name}/trips")
    run = add(
        "Greater", [trips, _ints(graph, "zero_scalar_i64", 0)], f"{name}/run"
    )  # the Loop's condition: true
    return add(
        "Loop",
        [trips, run],
        f"{name}/Loop",
        {"body": ir.Graph([index, go_on], [done, output], nodes=body, name=f"{scope}/body")},
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
    return _all(graph, _visible(inside, add), add, "nothing_padded")


def no_key_bias(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """(1,) bool: whether a key bias (N|1, H|1, 1, S) is 0 everywhere at run time (a padding mask
    that hides no key), so that a causal mask with it is causal alone."""
    return _all(
        graph,
        add("Equal", [bias, _floats(graph, "zero", 0.0)], "key_bias_zero"),
        add,
        "no_key_bias",
    )


def _all(graph: ir.Graph, flags: ir.Value, add: Emit, name: str) -> ir.Value:
    """(1,) bool: every entry of the small bool tensor ``flags`` is true."""
    fewest = add(
        "ReduceMin",
        [add("Cast", [flags], f"{name}/as_float", {"to": ir.DataType.FLOAT})],
        f"{name}/fewest",
        {"keepdims": 0},
    )
    return add(
        "Unsqueeze",
        [
            add("GreaterOrEqual", [fewest, _floats(graph, "half", 0.5)], f"{name}/all"),
            _ints(graph, "axis0", [0]),
        ],
        name,
    )


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
                _floats(graph, "zero", 0.0),
                _floats(graph, "neg_inf", -np.inf),
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
            _ints(graph, "axis3", [3]),
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
        return _floats(graph, "zero" if zero else "nan", 0.0 if zero else np.nan)
    if core.layout == "BSD":
        axis = _ints(graph, "axis1", [1])
        return add("ReduceMean", [v, axis], "fully_masked/mean_value", {"keepdims": 1})
    axis = _ints(graph, "axis2", [2])
    mean = add("ReduceMean", [v, axis], "fully_masked/mean_value", {"keepdims": 1})
    return add(
        "Reshape",
        [
            add("Transpose", [mean], "fully_masked/mean_bsnh", {"perm": [0, 2, 1, 3]}),
            _ints(graph, "merge_shape", [0, 0, core.num_heads * core.head_dim]),
        ],
        "fully_masked/mean_bsd",
    )
