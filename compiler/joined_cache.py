"""The KV cache an exported decoder joins in its own graph, and the one op that takes it as it is.

Exporters write a decoder's cache as each layer's present = Concat(past, this step's heads) on the
length axis, a graph output, which the core reads (repeated to the query heads where the keys and
values have fewer). ONNX Runtime's GroupQueryAttention takes the past, this step's heads and the
mask, and returns the present itself: no repeat is copied, and at one query per step (a decode
step) it is what makes the fused step faster than the export's (docs/BENCHMARKS.md, "Decoders with
their cache")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler._ir import new_initializer
from compiler.attention_core import (
    Cache,
    Core,
    Emit,
    as_the_graph_reads,
    choose,
    combined_mask,
    dead_rows,
    full_bias,
    leaves_nan_rows,
    perm_of,
    producer_of,
    rank4,
)
from compiler.core_patterns import repeated_heads
from compiler.mask_ops import MS_DOMAIN


@dataclass(frozen=True)
class JoinedCache:
    past_key: ir.Value  # (N, kv, P, hd)
    past_value: ir.Value
    new_key: ir.Value  # (N, kv, L, hd): this step's heads
    new_value: ir.Value
    present_key: ir.Value  # Concat(past, new) on the length axis: a graph output
    present_value: ir.Value
    kv_heads: int
    repeated: bool  # the export repeats them to the query heads (grouped-query attention)

    def as_cache(self) -> Cache:
        """The Concats as the cache replace_core swaps for the op's present outputs."""
        concats = [self.present_key.producer(), self.present_value.producer()]
        return Cache(self.past_key, self.past_value, self.present_key, self.present_value, concats)


def joined_cache(core: Core, graph: ir.Graph) -> JoinedCache | None:
    """The cache a BNSH core's keys and values come from, else None."""
    if core.layout != "BNSH" or core.cache is not None or None in (core.num_heads, core.head_dim):
        return None
    keys = _keys(core)
    key = _joined(keys, graph) if keys is not None else None
    value = _joined(core.v, graph)
    if key is None or value is None:
        return None
    parts = (key[0], key[2], value[0], value[2])  # a Concat's other axes match: the new heads too
    heads = {x.shape[1] for x in parts}
    sizes = {x.shape[3] for x in parts}
    kv = heads.pop() if len(heads) == 1 else None
    if not isinstance(kv, int) or core.num_heads % kv or sizes != {core.head_dim}:
        return None
    repeated = all(repeated_heads(x, graph) is not None for x in (keys, core.v))
    return JoinedCache(key[0], value[0], key[1], value[1], key[2], value[2], kv, repeated)


def _keys(core: Core) -> ir.Value | None:
    """K (N, H, S, hd) as the graph holds it: where the core reads K^T, what the exporter
    transposed (a transpose of scaled keys is left alone)."""
    if not core.k_transposed:
        return core.k
    turn = producer_of(core.k, "Transpose")
    return turn.inputs[0] if perm_of(turn) == [0, 1, 3, 2] else None


def _joined(value: ir.Value, graph: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(past, new, present) where ``value`` is, or repeats, a graph output Concat(past, new) on
    axis 2; all of rank 4."""
    present = repeated_heads(value, graph) or value
    concat = producer_of(present, "Concat")
    if concat is None or len(concat.inputs) != 2 or not present.is_graph_output():
        return None
    if concat.attributes.get_int("axis", 0) not in (2, -2):
        return None
    past, new = concat.inputs
    if any(x is None or x.shape is None or len(x.shape) != 4 for x in (past, new, present)):
        return None
    return past, new, present


@dataclass(frozen=True)
class _StepInputs:
    """What the op reads beside q, k, v and the cache, built once for the cores that read one mask."""

    seqlens: ir.Value  # (N,) int32
    total: ir.Value  # () int32
    bias: ir.Value | None  # (N|1, H|1, L, P + L), as the graph reads it
    dead: ir.Value | None  # dead_rows of the mask, where the core zeroes them
    batched_prompt: ir.Value  # (1,) bool: more than one entry and one query each after a past


def grouped_attention(
    graph: ir.Graph, core: Core, cache: JoinedCache, add: Emit, scope: str, shared: dict
) -> tuple[ir.Value, ir.Value | None, tuple[ir.Value, ir.Value]]:
    """GroupQueryAttention over the core, not causal (the mask says what each query sees): (context
    (N, L, E), the dead rows to zero in it or None, (present_key, present_value)); the op zeroes a
    row of -inf at one query, but not in a prompt, so the caller does. Every entry's keys are all the past and this step's
    (seqlens_k = total - 1), and the mask goes in whole as its attention_bias, read as the graph
    reads it (as_the_graph_reads: the op counts float32's lowest as -inf); rows with no key left
    get what the graph gives them. ``shared`` holds the _StepInputs of the cores fused so far:
    layers whose pasts have one length and that read one mask share them, so a decode step does
    not pay for them per layer."""
    h, kv, d = core.num_heads, cache.kv_heads, core.head_dim
    q, k, v = (
        _bsd(graph, x, heads * d, add, name)
        for x, heads, name in (
            (core.q, h, "query"),
            (cache.new_key, kv, "key"),
            (cache.new_value, kv, "value"),
        )
    )
    for repeated in (_keys(core), core.v):
        shapes_before_repeat(graph, repeated, add)
    key = _sharing(core, cache)
    step = shared.get(key) if key is not None else None
    if step is None:
        step = _step_inputs(graph, core, cache, q, k, add)
        if key is not None:
            shared[key] = step
    ops = _Operands(graph, core, cache, (q, k, v), step)
    context, *present = choose(step.batched_prompt, scope, add, ops.joined, ops.grouped, outputs=3)
    return context, step.dead, tuple(present)


@dataclass(frozen=True)
class _Operands:
    """What the two branches of grouped_attention read; each builds (context (N, L, E), present
    key, present value)."""

    graph: ir.Graph
    core: Core
    cache: JoinedCache
    qkv: tuple[ir.Value, ir.Value, ir.Value]  # BSD, k and v this step's
    step: _StepInputs

    def grouped(self, emit, name: str) -> tuple[ir.Value, ...]:
        core, cache, step = self.core, self.cache, self.step
        attrs = {"num_heads": core.num_heads, "kv_num_heads": cache.kv_heads, "scale": core.scale}
        inputs = [*self.qkv, cache.past_key, cache.past_value, step.seqlens, step.total]
        bias = [None, None, None, step.bias] if step.bias is not None else []
        return emit(
            "GroupQueryAttention",
            inputs + bias,
            "GroupQueryAttention",
            {**attrs, "causal": 0},
            MS_DOMAIN,
            3,
        )

    def joined(self, emit, name: str) -> tuple[ir.Value, ...]:
        """A batch of prompts after a past, which ONNX Runtime's CPU kernel refuses: the cache
        joined, repeated to the query heads, into MultiHeadAttention."""
        core, cache, step = self.core, self.cache, self.step
        present = [
            emit("Concat", [past, new], f"present_{n}", {"axis": 2})
            for past, new, n in (
                (cache.past_key, cache.new_key, "key"),
                (cache.past_value, cache.new_value, "value"),
            )
        ]
        heads = (core.num_heads, cache.kv_heads, core.head_dim)
        per_head = [
            _repeated(self.graph, x, heads, emit, f"{n}_per_head") for x, n in zip(present, "kv")
        ]
        bias = [None, None, step.bias] if step.bias is not None else []
        attrs = {"num_heads": core.num_heads, "scale": core.scale}
        context = emit(
            "MultiHeadAttention",
            [self.qkv[0], *per_head, *bias],
            "MultiHeadAttention",
            attrs,
            MS_DOMAIN,
        )
        return context, *present


def _repeated(graph: ir.Graph, x: ir.Value, heads: tuple, add: Emit, name: str) -> ir.Value:
    """(N, kv, S, hd) keys or values repeated to (N, h, S, hd), head j from j // (h / kv);
    ``heads``: (h, kv, hd)."""
    h, kv, d = heads
    if h == kv:
        return x
    axis = new_initializer(graph, "attention/axis2", np.asarray([2], np.int64))
    times = new_initializer(graph, "attention/repeat", np.asarray([1, 1, h // kv, 1, 1], np.int64))
    merged = new_initializer(graph, "attention/heads_merged", np.asarray([0, h, -1, d], np.int64))
    grown = add(
        "Expand", [add("Unsqueeze", [x, axis], f"{name}/Unsqueeze"), times], f"{name}/Expand"
    )
    return add("Reshape", [grown, merged], name)


def _sharing(core: Core, cache: JoinedCache) -> tuple | None:
    """The key under which cores share their _StepInputs: the masks they read and their past's
    length (a named or fixed dim), and what the core does with rows left with no key."""
    past = cache.past_key.shape[2]
    if core.mask is None or not (isinstance(past, int) or getattr(past, "value", None)):
        return None
    return (core.mask, *core.extra_masks, past, core.zeroes_dead_rows, leaves_nan_rows(core))


def _step_inputs(
    graph: ir.Graph, core: Core, cache: JoinedCache, q: ir.Value, k: ir.Value, add: Emit
) -> _StepInputs:
    view = dataclasses.replace(core, v=cache.new_value, cache=cache.as_cache())  # keys: past + new
    mask = combined_mask(core, add)
    bias = full_bias(graph, view, add, mask, q)
    seqlens, total = _lengths(graph, cache, q, k, bias, add)
    dead = dead_rows(graph, rank4(mask) or bias, add) if core.zeroes_dead_rows else None
    if bias is not None:
        bias = as_the_graph_reads(graph, bias, add, leaves_nan_rows(core))
    return _StepInputs(seqlens, total, bias, dead, _batched_prompt(graph, cache, q, add))


def _batched_prompt(graph: ir.Graph, cache: JoinedCache, q: ir.Value, add: Emit) -> ir.Value:
    """(1,) bool: a batch of more than one entry with more than one query after a past, which the
    CPU kernel of GroupQueryAttention refuses ("batch_size must be 1 when sequence_length > 1 and
    past context is given")."""
    one = new_initializer(graph, "attention/one_i64", np.ones(1, np.int64))
    zero = new_initializer(graph, "attention/zero_1_i64", np.zeros(1, np.int64))
    sizes = [
        add("Shape", [q], "entries", {"start": 0, "end": 1}),
        add("Shape", [q], "queries", {"start": 1, "end": 2}),
    ]
    past = add("Shape", [cache.past_key], "cache_len", {"start": 2, "end": 3})
    many = add("And", [add("Greater", [x, one], f"many_{i}") for i, x in enumerate(sizes)], "many")
    return add("And", [many, add("Greater", [past, zero], "after_past")], "batched_prompt")


def _lengths(
    graph: ir.Graph, cache: JoinedCache, q: ir.Value, k: ir.Value, bias: ir.Value | None, add: Emit
) -> tuple[ir.Value, ir.Value]:
    """seqlens_k (N,) and total_sequence_length (), int32: every entry's keys are all the past and
    this step's."""
    if bias is not None:
        total = add("Shape", [bias], "all_keys", {"start": 3, "end": 4})
    else:
        past = add("Shape", [cache.past_key], "past_keys", {"start": 2, "end": 3})
        total = add(
            "Add", [past, add("Shape", [k], "new_keys", {"start": 1, "end": 2})], "all_keys"
        )
    total = add("Cast", [total], "all_keys_i32", {"to": ir.DataType.INT32})
    one = new_initializer(graph, "attention/one_i32", np.ones(1, np.int32))
    batch = add("Shape", [q], "batch", {"start": 0, "end": 1})
    seqlens = add("Expand", [add("Sub", [total, one], "last_key"), batch], "seqlens_k")
    scalar = new_initializer(graph, "attention/scalar_shape", np.zeros(0, np.int64))
    return seqlens, add("Reshape", [total, scalar], "total_sequence_length")


def _bsd(graph: ir.Graph, x: ir.Value, width: int, add: Emit, name: str) -> ir.Value:
    """(N, heads, L, hd) as (N, L, heads*hd)."""
    merge = new_initializer(graph, f"attention/{name}_merge", np.asarray([0, 0, width], np.int64))
    turned = add("Transpose", [x], f"{name}_bsnh", {"perm": [0, 2, 1, 3]})
    return add("Reshape", [turned, merge], f"{name}_bsd")


def shapes_before_repeat(graph: ir.Graph, repeated: ir.Value, add: Emit) -> None:
    """Shapes read off keys or values repeated to the query heads (the legacy exporter's merge of the
    heads reads the head size there) read the grouped ones instead, with the query heads' count: the
    fused op takes the grouped ones, and the repeat is then not computed for its shape alone."""
    grouped = repeated_heads(repeated, graph)
    heads = repeated.shape[1] if repeated.shape is not None else None
    if grouped is None or not isinstance(heads, int):
        return
    for use in list(repeated.uses()):
        node = use.node
        if node.op_type != "Shape" or node.domain or node.attributes:
            continue
        count = new_initializer(graph, "attention/query_heads", np.asarray([heads], np.int64))
        shape = add(
            "Concat",
            [
                add("Shape", [grouped], "repeat_batch", {"end": 1}),
                count,
                add("Shape", [grouped], "repeat_rest", {"start": 2}),
            ],
            "repeat_shape",
            {"axis": 0},
        )
        node.outputs[0].replace_all_uses_with(shape)
