"""Find the attention core (scores, scale, mask, softmax, context) in a graph, and the pieces every
fused form needs around it: a mask the fused op accepts and the fully-masked-row rule.

Cores are matched by structure, not by name, in two forms:
- BSD, the canonical graph's (graphs/mha.py): Reshape(x, [0, 0, H, hd]) + Transpose head splits,
  MatMul, [Mul by a scalar], [Add mask], Softmax, [the fully-masked guard Where(IsInf(ReduceMax))],
  MatMul, Transpose + Reshape head merge; q, k, v are (N, L, E).
- BNSH, any graph whose heads are already split, as torch.onnx.export(dynamo=True) writes
  scaled_dot_product_attention: [Mul/Div q by a scalar] MatMul [Mul/Div K^T by a scalar],
  [Mul/Div], [Add mask], Softmax, MatMul, on rank-4 (N, H, L, hd) tensors; k holds K^T.
Fusion passes rewrite what this module finds; ``survey`` says why a Softmax was not matched.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, named, new_initializer, only_use
from compiler.shape_values import entries, scalar


@dataclass
class Cache:
    """The KV cache around a BSD core: present = Concat(past, this step's heads) on the length axis,
    (N, H, past_len + L, hd); the core's k and v are this step's (N, L, E)."""

    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    nodes: list[ir.Node]  # the two Concats and the K^T Transpose, removed by a fusion that takes the cache


@dataclass
class Core:
    """A matched core: q, k, v (BSD: (N, L, E); BNSH: (N, H, L, hd), with k as K^T (N, H, hd, S)),
    its scale, additive mask and bounding nodes. ``output`` has q's layout.

    ``weights`` is the post-softmax (N, H, L, S) tensor when something outside the core reads it
    (need_weights), else None. ``nodes`` are the nodes a fusion removes.
    """

    layout: str  # "BSD" or "BNSH"
    q: ir.Value
    k: ir.Value
    v: ir.Value
    num_heads: int | None  # None: a BNSH core whose head count the graph does not state
    head_dim: int | None
    scale: float
    mask: ir.Value | None
    output: ir.Value
    weights: ir.Value | None
    softmax: ir.Node
    context_matmul: ir.Node
    guard: list[ir.Node]  # Where, IsInf, ReduceMax of the fully-masked guard; empty without one
    nodes: list[ir.Node]
    cache: Cache | None = None
    extra_masks: tuple[ir.Value, ...] = ()  # further additive biases (relative position, causal...): summed with mask
    k_transposed: bool = True  # a BNSH core's k is K^T (N, H, hd, S); False: K (N, H, S, hd)
    nan_guarded: bool = False  # torch's Where(IsNaN(p), 0, p) followed the softmax: fully masked rows give 0
    output_rows: bool = False  # a BSD core's output is (N*L, E), as GPT-2's exports merge the heads for a Gemm

    @property
    def guarded(self) -> bool:
        return bool(self.guard)

    @property
    def zeroes_dead_rows(self) -> bool:
        """Whether the fused form must zero fully masked rows: where the graph did, with our guard or
        torch's NaN guard. Elsewhere such a row is what the graph makes it (NaN for an all -inf row,
        uniform for an all-lowest one), and the fused ops, adding the same bias, make it the same."""
        return self.mask is not None and (self.guarded or self.nan_guarded)

    @property
    def name(self) -> str:
        return self.softmax.name or self.softmax.outputs[0].name or "Softmax"


def unfusable(core: Core) -> str | None:
    """Why no fused op can take ``core``, whatever the target: their ``scale`` must be positive (the
    standard Attention op refuses anything else, and MultiHeadAttention reads 0 as 1/sqrt(head_dim))."""
    if not (np.isfinite(core.scale) and core.scale > 0):
        return f"its scale ({core.scale:g}) is not a positive number, and the fused ops take only a positive scale"
    return None


def survey(graph: ir.Graph) -> list[tuple[ir.Node, Core | str]]:
    """Every Softmax of the graph with its core, or the reason it is not one."""
    return [(node, _match(node, graph) or _match_bnsh(node, graph)) for node in list(graph)
            if node.op_type == "Softmax" and not node.domain]


def over_keys(softmax: ir.Node, graph: ir.Graph, rank: int = 4) -> bool:
    """Whether a Softmax of a rank-``rank`` tensor normalises over its last axis alone, by its opset's
    rule: before opset 13 the axis defaults to 1 and the input is flattened to 2-D at it, from 13 on
    it defaults to -1 and is one axis. Either way only the last axis is attention over keys."""
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 13))
    axis = softmax.attributes.get_int("axis", 1 if opset < 13 else -1)
    return axis % rank == rank - 1 if -rank <= axis < rank else False


def find_cores(graph: ir.Graph) -> list[Core]:
    return [found for _, found in survey(graph) if isinstance(found, Core)]


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and not node.domain else None


def _perm(node: ir.Node | None) -> list[int] | None:
    return None if node is None else list(node.attributes.get_ints("perm", []))


def _heads(value: ir.Value, perm: list[int]) -> tuple[ir.Value, int, int] | None:
    """value = Transpose(Reshape(x, [0, 0, H, hd]), perm): (x, H, hd)."""
    transpose = _producer(value, "Transpose")
    if _perm(transpose) != perm:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    shape = constant(reshape.inputs[1]) if reshape is not None else None
    if shape is None or shape.tolist()[:2] != [0, 0] or len(shape) != 4 or min(shape[2:]) <= 0:
        return None
    return reshape.inputs[0], int(shape[2]), int(shape[3])


def _context_matmul(probs: ir.Value) -> tuple[ir.Node | None, bool]:
    """(the one MatMul reading ``probs`` as its left operand, whether anything else reads probs)."""
    matmuls = [node for node, i in probs.uses() if node.op_type == "MatMul" and not node.domain and i == 0]
    if len(matmuls) != 1:
        return None, False
    return matmuls[0], probs.is_graph_output() or len(probs.uses()) > 1


def _match(softmax: ir.Node, graph: ir.Graph) -> Core | None:
    if not over_keys(softmax, graph):
        return None
    nodes = [softmax]
    probs = softmax.outputs[0]
    guard: list[ir.Node] = []
    where = only_use(probs, graph)
    if where is not None and where.op_type == "Where" and where.inputs[2] is probs:
        guard.append(where)
        probs = where.outputs[0]
    context_mm, weights_used = _context_matmul(probs)
    if context_mm is None:
        return None
    merge_t = only_use(context_mm.outputs[0], graph)
    merge_r = only_use(merge_t.outputs[0], graph) if merge_t is not None else None
    if _perm(merge_t) != [0, 2, 1, 3] or merge_r is None or merge_r.op_type != "Reshape":
        return None
    v = _heads(context_mm.inputs[1], [0, 2, 1, 3])

    scores = final_scores = softmax.inputs[0]
    inner: list[ir.Value] = []  # score tensors between the scores MatMul and the mask Add
    mask = None
    add = _producer(scores, "Add")
    if add is not None:
        mm_side = next((i for i in (0, 1) if _producer(add.inputs[i], "MatMul") or _producer(add.inputs[i], "Mul")), None)
        if mm_side is None:
            return None
        mask, scores = add.inputs[1 - mm_side], add.inputs[mm_side]
        inner.append(scores)
        nodes.append(add)
    scale = 1.0
    mul = _producer(scores, "Mul")
    if mul is not None:
        factor = next((constant(x) for x in mul.inputs if constant(x) is not None), None)
        if factor is None or factor.size != 1:
            return None
        scale = float(factor.reshape(()))
        scores = next(x for x in mul.inputs if constant(x) is None)
        inner.append(scores)
        nodes.append(mul)
    scores_mm = _producer(scores, "MatMul")
    if scores_mm is None:
        return None
    if any(only_use(x, graph) is None for x in inner):
        return None  # an intermediate score tensor is used outside the core
    q = _heads(scores_mm.inputs[0], [0, 2, 1, 3])
    k = _heads(scores_mm.inputs[1], [0, 2, 3, 1])
    cache = None
    if k is None and v is None and (cached := _cached(scores_mm.inputs[1], context_mm.inputs[1])) is not None:
        k, v, cache = cached
    if q is None or k is None or v is None or len({q[1:], k[1:], v[1:]}) != 1:
        return None
    if guard:  # the guard's ReduceMax/IsInf read the scores; they go with the core
        dead = _producer(where.inputs[0], "IsInf")
        row_max = _producer(dead.inputs[0], "ReduceMax") if dead is not None else None
        if row_max is None or row_max.inputs[0] is not final_scores or len(final_scores.uses()) != 2:
            return None
        guard += [dead, row_max]
    elif len(final_scores.uses()) != 1 or final_scores.is_graph_output():
        return None
    nodes += guard + [scores_mm, context_mm, merge_t, merge_r]
    return Core("BSD", q[0], k[0], v[0], q[1], q[2], scale, mask, merge_r.outputs[0], probs if weights_used else None,
                softmax, context_mm, guard, nodes, cache)


def _cached(keys_t: ir.Value, values: ir.Value) -> tuple[tuple, tuple, Cache] | None:
    """K^T = Transpose(Concat(past_key, heads(k)), [0, 1, 3, 2]) and V = Concat(past_value, heads(v)),
    the Concats on axis 2 (graphs/mha.py with kv_cache): the heads of k and v, and the cache."""
    transpose = _producer(keys_t, "Transpose")
    if _perm(transpose) != [0, 1, 3, 2]:
        return None
    concat_k, concat_v = _producer(transpose.inputs[0], "Concat"), _producer(values, "Concat")
    if concat_k is None or concat_v is None or any(len(c.inputs) != 2 or c.attributes.get_int("axis", 0) != 2
                                                   for c in (concat_k, concat_v)):
        return None
    k, v = _heads(concat_k.inputs[1], [0, 2, 1, 3]), _heads(concat_v.inputs[1], [0, 2, 1, 3])
    if k is None or v is None:
        return None
    return k, v, Cache(concat_k.inputs[0], concat_v.inputs[0], concat_k.outputs[0], concat_v.outputs[0],
                       [transpose, concat_k, concat_v])


def _scaled(value: ir.Value, graph: ir.Graph) -> tuple[ir.Value, float, ir.Node | None]:
    """value = Mul(x, c) or Div(x, c) with a scalar constant c, used once: (x, factor, node); else (value, 1, None)."""
    node = value.producer()
    if node is None or node.domain or node.op_type not in ("Mul", "Div") or only_use(value, graph) is None:
        return value, 1.0, None
    sides = (1,) if node.op_type == "Div" else (1, 0)
    for side in sides:
        c = constant(node.inputs[side])
        if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.floating):
            factor = float(c.reshape(()))
        elif c is None and _is_float_value(node.inputs[side]) and (computed := scalar(node.inputs[side])) is not None:
            factor = computed  # a scale legacy exporters compute from the head size: Sqrt(1 / Sqrt(hd))
        else:
            continue
        if factor != 0:
            return node.inputs[1 - side], (1.0 / factor if node.op_type == "Div" else factor), node
    return value, 1.0, None


def _is_float_value(value: ir.Value) -> bool:
    return value.type is not None and value.type.dtype in _FLOATS


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _same_float_cast(node: ir.Node | None) -> bool:
    """A Cast between two float types of the same width (a no-op an exporter leaves: float to float)."""
    if node is None or node.op_type != "Cast" or node.domain:
        return False
    x, y = node.inputs[0], node.outputs[0]
    return x.type is not None and y.type is not None and x.type.dtype == y.type.dtype and x.type.dtype in _FLOATS


def _nan_guard(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """value -> Where(IsNaN(value), 0, value), torch's guard after SDPA's softmax: (its output, its nodes)."""
    uses = [node for node, _ in value.uses()]
    if len(uses) != 2 or value.is_graph_output():
        return None
    isnan = next((n for n in uses if n.op_type == "IsNaN" and not n.domain), None)
    where = next((n for n in uses if n.op_type == "Where" and not n.domain), None)
    if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not value:
        return None
    zero = constant(where.inputs[1])
    if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0 or len(isnan.outputs[0].uses()) != 1:
        return None
    return where.outputs[0], [isnan, where]


def _after_softmax(probs: ir.Value, graph: ir.Graph) -> tuple[ir.Value, list[ir.Node]]:
    """Follow the probabilities through no-op Casts and torch's NaN guard: (the value the context
    MatMul reads, the nodes passed). The guard zeroes rows whose every score is -inf; a masked
    BNSH core's fusion zeroes the same rows from its mask (``zeroes_dead_rows``)."""
    nodes: list[ir.Node] = []
    while True:
        use = only_use(probs, graph)
        if _same_float_cast(use):
            nodes.append(use)
            probs = use.outputs[0]
        elif (guard := _nan_guard(probs)) is not None:
            probs, passed = guard
            nodes += passed
        else:
            return probs, nodes


def _reaches_scores(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` is the query-key product, through scalings, casts and added biases."""
    node = value.producer()
    if node is None or node.domain or depth == 0:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type in ("Mul", "Div", "Cast"):
        return any(constant(x) is None and _reaches_scores(x, depth - 1) for x in node.inputs[:1 if node.op_type == "Div" else 2])
    if node.op_type == "Add":
        return any(_reaches_scores(x, depth - 1) for x in node.inputs)
    return False


def _biases(scores: ir.Value, graph: ir.Graph) -> tuple[ir.Value, list[ir.Value], list[ir.Node]] | str:
    """Peel the additive biases off the scores (a padding mask, a causal mask, a relative position
    bias; any number, in any order): (the scaled product, the biases, the Add nodes)."""
    biases: list[ir.Value] = []
    nodes: list[ir.Node] = []
    while (add := _producer(scores, "Add")) is not None:
        sides = [i for i in (0, 1) if _reaches_scores(add.inputs[i])]
        if len(sides) != 1:
            return "its scores are not a MatMul plus masks"
        if only_use(add.inputs[sides[0]], graph) is None:
            return "an intermediate score tensor is used outside the attention"
        biases.append(add.inputs[1 - sides[0]])
        nodes.append(add)
        scores = add.inputs[sides[0]]
        while _same_float_cast(scores.producer()) and only_use(scores, graph) is not None:
            nodes.append(scores.producer())
            scores = scores.producer().inputs[0]
    return scores, biases[::-1], nodes


def _reshape_dims(node: ir.Node) -> list[int | None] | None:
    """The target shape of a Reshape, entry by entry: an int where the graph fixes it, computed or
    constant (compiler/shape_values.py), None where it is a dynamic axis."""
    found = entries(node.inputs[1])
    if found is None or any(d is not None and not float(d).is_integer() for d in found[0]):
        return None
    return [None if d is None else int(d) for d in found[0]]


def _split_heads(value: ir.Value, axes: tuple[int, int], depth: int = 6) -> tuple[int, int] | None:
    """(heads, head size) of a rank-4 value, from its shape or, failing that, from the Reshape that
    made it (through one Transpose): ``axes`` are where heads and head size sit in ``value``."""
    if value.shape is not None and len(value.shape) == 4:
        heads, size = value.shape[axes[0]], value.shape[axes[1]]
        if isinstance(heads, int) and isinstance(size, int):
            return heads, size
    node = _unscaled(value).producer()
    if node is not None and not node.domain and node.op_type in _SHAPE_KEEPING and depth > 0:
        # through rotary embeddings (q * cos + rotate_half(q) * sin) and the like: the operands that tell agree.
        # One head says nothing here: an operand broadcast over the heads (cos, sin) has one.
        told = {h for x in node.inputs[1 if node.op_type == "Where" else 0:] if x is not None
                and (h := _split_heads(x, axes, depth - 1)) is not None and h[0] > 1}
        return told.pop() if len(told) == 1 else None
    perm = list(range(4))
    if node is not None and node.op_type == "Transpose" and not node.domain:
        perm = list(node.attributes.get_ints("perm", [3, 2, 1, 0]))
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Reshape" or node.domain:
        return None
    dims = _reshape_dims(node)
    if dims is None or len(dims) != 4:
        return None
    source = node.inputs[0].shape
    if source is not None and len(source) == 3 and isinstance(source[2], int) and dims[2:].count(-1) == 1:
        known = dims[3] if dims[2] == -1 else dims[2]  # (B, L, -1, hd) or (B, L, H, -1) from (B, L, E)
        if known and known > 0 and source[2] % known == 0:
            dims[2 if dims[2] == -1 else 3] = source[2] // known
    heads, size = dims[perm[axes[0]]], dims[perm[axes[1]]]
    return (heads, size) if heads is not None and size is not None and heads > 0 and size > 0 else None


_SHAPE_KEEPING = ("Add", "Sub", "Mul", "Neg", "Cast", "Where")  # elementwise: a head split before is one after


def _unscaled(value: ir.Value) -> ir.Value:
    """``value`` before a Mul or Div by a scalar, which changes no shape."""
    node = value.producer()
    while node is not None and node.op_type in ("Mul", "Div") and not node.domain and scalar(node.inputs[1]) is not None:
        value = node.inputs[0]
        node = value.producer()
    return value


def _keys(value: ir.Value, graph: ir.Graph) -> tuple[ir.Value, bool, list[ir.Node]]:
    """The keys the scores MatMul reads: (K^T, True) as it is, or (K, False) where K^T is
    Transpose(K, [0, 1, 3, 2]) or torch's 3-D detour Reshape(Transpose(Reshape(K, 3-D), [0, 2, 1]), 4-D);
    with the nodes passed."""
    transpose = _producer(value, "Transpose")
    if transpose is not None and _perm(transpose) == [0, 1, 3, 2] and only_use(value, graph) is not None:
        return transpose.inputs[0], False, [transpose]
    outer = _producer(value, "Reshape")
    middle = _producer(outer.inputs[0], "Transpose") if outer is not None else None
    inner = _producer(middle.inputs[0], "Reshape") if middle is not None else None
    if inner is not None and _perm(middle) == [0, 2, 1] and _rank(inner.inputs[0]) == 4 and all(
            only_use(v, graph) is not None for v in (value, outer.inputs[0], middle.inputs[0])):
        return inner.inputs[0], False, [outer, middle, inner]
    return value, True, []


def _match_bnsh(softmax: ir.Node, graph: ir.Graph) -> Core | str:
    """The heads-split form of scaled dot-product attention, as exporters write it; a reason string
    where it is not that. Between the scores MatMul and the softmax: scalings and any number of
    added biases; after the softmax: no-op Casts and torch's NaN guard; the keys as K^T, or as K
    through a Transpose or torch's 3-D detour."""
    probs = softmax.outputs[0]
    if _rank(probs) != 4:
        return "its rank is not known to be 4 (batch, heads, query, key)"
    if not over_keys(softmax, graph):
        return "it does not normalise over the key axis alone (its axis, by its opset's rule, is not the last)"
    read, after = _after_softmax(probs, graph)
    nan_guarded = any(node.op_type == "IsNaN" for node in after)
    context_mm, weights_used = _context_matmul(read)
    if context_mm is None:
        return "no single MatMul multiplies it with the values"
    if weights_used and after:
        return "its weights are used outside the attention past a Cast or NaN guard"
    nodes = [softmax, *after]
    scores = softmax.inputs[0]
    if only_use(scores, graph) is None:
        return "its scores are used outside the attention"
    while _same_float_cast(scores.producer()) and only_use(scores, graph) is not None:
        nodes.append(scores.producer())
        scores = scores.producer().inputs[0]
    peeled = _biases(scores, graph)
    if isinstance(peeled, str):
        return peeled
    scores, biases, adds = peeled
    nodes += adds
    post = 1.0
    while True:
        scores, factor, mul = _scaled(scores, graph)
        if mul is None:
            break
        post *= factor
        nodes.append(mul)
    scores_mm = _producer(scores, "MatMul")
    if scores_mm is None or only_use(scores, graph) is None:
        return "its scores are not a MatMul of queries and keys used only here"
    q, q_scale, q_mul = _scaled(scores_mm.inputs[0], graph)
    k, k_scale, k_mul = _scaled(scores_mm.inputs[1], graph)
    k, k_transposed, key_nodes = _keys(k, graph)
    v = context_mm.inputs[1]
    if {_rank(q), _rank(k), _rank(v)} != {4}:
        return "its queries, keys and values are not rank-4 (batch, heads, length, head_dim) tensors"
    nodes += [n for n in (q_mul, k_mul) if n is not None] + key_nodes + [scores_mm, context_mm]
    heads = _split_heads(q, (1, 3)) or _split_heads(k, (1, 2) if k_transposed else (1, 3)) or _split_heads(v, (1, 3))
    mask, extra = (biases[0], tuple(biases[1:])) if biases else (None, ())
    core = Core("BNSH", q, k, v, heads[0] if heads else None, heads[1] if heads else None, post * q_scale * k_scale, mask,
                context_mm.outputs[0], probs if weights_used else None, softmax, context_mm, [], nodes,
                extra_masks=extra, k_transposed=k_transposed, nan_guarded=nan_guarded)
    return _as_bsd(core, graph) or core


def _same_dim(a: object, b: object) -> bool:
    return a == b and (isinstance(a, int) or getattr(a, "value", None) is not None)


def _keeps(reshape: ir.Node, axis: int, source: ir.Value, source_axis: int) -> bool:
    """Whether a Reshape's ``axis`` keeps ``source``'s ``source_axis``: the target says 0 (copy), or
    gives the same size, or reads it from Shape(source) (as legacy exporters compute it), or shape
    inference found the two dims the same."""
    dims = _reshape_dims(reshape)
    if dims is None or axis >= len(dims):
        return False
    size = source.shape[source_axis] if source.shape is not None and len(source.shape) > source_axis else None
    if dims[axis] == 0 or (dims[axis] is not None and dims[axis] > 0 and dims[axis] == size):
        return True
    if dims[axis] is None and _shape_entry(reshape.inputs[1], axis) == (source, source_axis):
        return True
    out = reshape.outputs[0].shape
    return out is not None and len(out) > axis and size is not None and _same_dim(out[axis], size)


def _shape_entry(shape: ir.Value, position: int) -> tuple[ir.Value, int] | None:
    """(t, i) where entry ``position`` of a Concat'ed shape is Shape(t)[i]: Unsqueeze(Gather(Shape(t), i))
    or Slice(Shape(t), i, i + 1)."""
    concat = _producer(shape, "Concat")
    if concat is None:
        return None
    offset = 0
    for piece in concat.inputs:
        length = piece.shape[0] if piece.shape is not None and len(piece.shape) == 1 else None
        if not isinstance(length, int):
            return None
        if offset <= position < offset + length:
            break
        offset += length
    else:
        return None
    node = piece.producer()
    if node is not None and node.op_type == "Unsqueeze" and not node.domain:
        node = node.inputs[0].producer()
    if node is None or node.domain or node.op_type not in ("Gather", "Slice") or length != 1:
        return None
    shape_node = _producer(node.inputs[0], "Shape")
    index = constant(node.inputs[1])
    if shape_node is None or index is None or index.size != 1 or shape_node.attributes.get_int("start", 0) != 0:
        return None
    return shape_node.inputs[0], int(index.reshape(-1)[0])


def _merged_heads(value: ir.Value, perm: list[int], heads: int, size: int) -> ir.Value | None:
    """x where ``value`` = Transpose(Reshape(x, (B, L, heads, size)), perm) and x is (B, L, heads*size):
    the exporter's head split, undone."""
    transpose = _producer(value, "Transpose")
    reshape = _producer(transpose.inputs[0], "Reshape") if transpose is not None and _perm(transpose) == perm else None
    if reshape is None:
        return None
    x, dims = reshape.inputs[0], _reshape_dims(reshape)
    if x.shape is None or len(x.shape) != 3 or dims is None or len(dims) != 4:
        return None
    if not (_keeps(reshape, 0, x, 0) and _keeps(reshape, 1, x, 1)):  # the batch and length stay where they are
        return None
    if dims[2] not in (heads, -1) or dims[3] not in (size, -1) or dims[2:].count(-1) > 1:
        return None
    if not (isinstance(x.shape[2], int) and x.shape[2] == heads * size):
        return None
    return x


def _as_bsd(core: Core, graph: ir.Graph) -> Core | None:
    """The same core with the exporter's head split and merge looked through: q, k, v as the (N, L, E)
    projections and the output as the (N, L, E) merge, as our own graphs hold them, so the fused op
    reads and writes them directly instead of a Transpose/Reshape round trip on each side."""
    if core.num_heads is None or core.head_dim is None or core.weights is not None or core.cache is not None:
        return None
    h, d = core.num_heads, core.head_dim
    q = _merged_heads(core.q, [0, 2, 1, 3], h, d)
    k = _merged_heads(core.k, [0, 2, 3, 1] if core.k_transposed else [0, 2, 1, 3], h, d)
    v = _merged_heads(core.v, [0, 2, 1, 3], h, d)
    merge_t = only_use(core.output, graph)
    merge_r = only_use(merge_t.outputs[0], graph) if merge_t is not None and _perm(merge_t) == [0, 2, 1, 3] else None
    if q is None or k is None or v is None or merge_r is None or merge_r.op_type != "Reshape" or merge_r.domain:
        return None
    dims = _reshape_dims(merge_r)
    if dims is not None and len(dims) == 2 and dims[0] == -1 and dims[1] == h * d:  # (N*L, E), rows for a Gemm
        return dataclasses.replace(core, layout="BSD", q=q, k=k, v=v, output=merge_r.outputs[0],
                                   nodes=[*core.nodes, merge_t, merge_r], k_transposed=True, output_rows=True)
    if dims is None or len(dims) != 3 or dims[2] not in (h * d, -1):
        return None
    for axis in (0, 1):  # the context's batch and length are the query's
        entry = _shape_entry(merge_r.inputs[1], axis)
        if not (_keeps(merge_r, axis, merge_t.outputs[0], axis) or _keeps(merge_r, axis, q, axis) or (
                entry is not None and entry[1] == axis and entry[0].shape is not None and len(entry[0].shape) > axis
                and q.shape is not None and _same_dim(entry[0].shape[axis], q.shape[axis]))):
            return None
    return dataclasses.replace(core, layout="BSD", q=q, k=k, v=v, output=merge_r.outputs[0],
                               nodes=[*core.nodes, merge_t, merge_r], k_transposed=True)


Emit = Callable[..., ir.Value]


def unique_scope(graph: ir.Graph) -> str:
    """'attention', or 'attention_2', ... where a graph already holds a fused core (decoders have two)."""
    taken = {node.name.split("/")[0] for node in graph if node.name}
    scope, i = "attention", 1
    while scope in taken:
        i += 1
        scope = f"attention_{i}"
    return scope


def emitter(graph: ir.Graph, new: list[ir.Node], scope: str) -> Emit:
    """add(op, inputs, name, attrs, domain) -> the new node's first output, named ``scope/name``;
    nodes collect in ``new``."""

    def add(op: str, inputs: list, name: str, attrs: dict | None = None, domain: str = "") -> ir.Value:
        new.append(named(ir.node(op, inputs, attrs or {}, domain=domain, name=f"{scope}/{name}")))
        return new[-1].outputs[0]

    return add


def combined_mask(core: Core, add: Emit) -> ir.Value | None:
    """The core's additive masks summed, as the graph broadcast them: None without a mask."""
    if core.mask is None:
        return None
    mask = core.mask
    for i, extra in enumerate(core.extra_masks):
        mask = add("Add", [mask, extra], f"biases_{i + 1}")
    return mask


def full_bias(graph: ir.Graph, core: Core, add: Emit, mask: ir.Value | None) -> ir.Value | None:
    """``mask`` (combined_mask's) broadcast to (N|1, H|1, L, S'): ONNX Runtime's fused ops want the
    query and key axes in full, and keeping -inf as -inf keeps partially masked rows exact. A mask
    whose shape already states both axes (an exporter's full 4-D mask) goes in as it is."""
    if mask is None:
        return None
    q_axis, k_axis = (1, 1) if core.layout == "BSD" else (2, 3 if core.k_transposed else 2)
    if core.cache is None and _states(mask, 2, core.q, q_axis) and _states(mask, 3, core.k, k_axis):
        return mask
    src = add("Shape", [core.k], "src_len", {"start": k_axis, "end": k_axis + 1})
    if core.cache is not None:  # the keys are the past's, then this step's
        src = add("Add", [add("Shape", [core.cache.past_key], "past_len", {"start": 2, "end": 3}), src], "total_len")
    lengths = add("Concat", [new_initializer(graph, "attention/ones2", np.ones(2, np.int64)),
                             add("Shape", [core.q], "tgt_len", {"start": q_axis, "end": q_axis + 1}), src],
                  "bias_shape", {"axis": 0})
    return add("Expand", [mask, lengths], "attention_bias")


def _states(mask: ir.Value, axis: int, other: ir.Value, other_axis: int) -> bool:
    """Whether a rank-4 ``mask``'s ``axis`` is known to be ``other``'s ``other_axis`` (the same size
    or the same symbolic dim), so that nothing broadcasts there."""
    if mask.shape is None or len(mask.shape) != 4 or other.shape is None or len(other.shape) <= other_axis:
        return False
    a, b = mask.shape[axis], other.shape[other_axis]
    return a == b and (isinstance(a, int) or (a is not None and getattr(a, "value", None) is not None))


def keys_bnsh(core: Core, add: Emit) -> ir.Value:
    """K as (N, H, S, hd) from a BNSH core's keys."""
    return add("Transpose", [core.k], "keys", {"perm": [0, 1, 3, 2]}) if core.k_transposed else core.k


def rank4(mask: ir.Value) -> ir.Value | None:
    """The mask itself where it is known to be rank 4, so the dead rows are read before the broadcast."""
    return mask if mask.shape is not None and len(mask.shape) == 4 else None


def dead_rows(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """(N|1, H|1, L|1, 1): True where the rank-4 mask leaves a query no key (the whole row is -inf).
    Read from the mask before it is broadcast, this costs one pass over the mask, not over (N, H, L, S)."""
    axis = new_initializer(graph, "attention/last_axis", np.asarray([-1], np.int64))
    return add("IsInf", [add("ReduceMax", [bias, axis], "fully_masked/ReduceMax", {"keepdims": 1})],
               "fully_masked/IsInf", {"detect_positive": 0})


def zero_dead_context(graph: ir.Graph, core: Core, context: ir.Value, dead: ir.Value, add: Emit,
                      layout: str = "BSD") -> ir.Value:
    """A zero context on fully masked rows (DESIGN.md), whatever the fused op returned there.
    ``context`` is (N, L, H*hd) for layout BSD, (N, H, L, hd) for BNSH."""
    if layout == "BNSH":
        return add("Where", [dead, zero_scalar(graph), context], "fully_masked/Where")
    dead = add("Transpose", [dead], "fully_masked/Transpose", {"perm": [0, 2, 1, 3]})  # (N|1, L, H|1, 1)
    split = new_initializer(graph, "attention/heads_shape", np.asarray([0, 0, core.num_heads, core.head_dim], np.int64))
    heads = add("Reshape", [context, split], "fully_masked/split_heads")
    kept = add("Where", [dead, zero_scalar(graph), heads], "fully_masked/Where")
    merge = new_initializer(graph, "attention/merge_shape", np.asarray([0, 0, core.num_heads * core.head_dim], np.int64))
    return add("Reshape", [kept, merge], "fully_masked/merge_heads")


def zero_dead_weights(graph: ir.Graph, weights: ir.Value, dead: ir.Value, add: Emit) -> ir.Value:
    return add("Where", [dead, zero_scalar(graph), weights], "fully_masked/weights")


def zero_scalar(graph: ir.Graph) -> ir.Value:
    return new_initializer(graph, "attention/zero", np.zeros((), np.float32))


def as_output(graph: ir.Graph, core: Core, context: ir.Value, add: Emit) -> ir.Value:
    """A BSD context (N, L, E) in the shape the core's output had: the same, or its rows (N*L, E)."""
    if not core.output_rows:
        return context
    rows = new_initializer(graph, "attention/rows_shape", np.asarray([-1, core.num_heads * core.head_dim], np.int64))
    return add("Reshape", [context, rows], "context_rows")


def replace_core(graph: ir.Graph, core: Core, new: list[ir.Node], context: ir.Value,
                 weights: ir.Value | None = None, present: tuple[ir.Value, ir.Value] | None = None) -> None:
    """Put ``new`` where the core was: its output becomes ``context``, its weights ``weights``, and
    a cache's present_key/present_value the fused op's ``present``. Where one of those was a graph
    output, the new value takes its name, type and shape, so the graph's signature stays the same."""
    graph.insert_before(core.nodes[-1], new)
    replaced = [(core.output, context)]
    if core.weights is not None:
        assert weights is not None, "a fusion that drops the weights must leave need_weights cores alone"
        replaced.append((core.weights, weights))
    if core.cache is not None:
        assert present is not None, "a fusion that drops the cache must leave cached cores alone"
        replaced += list(zip((core.cache.present_key, core.cache.present_value), present))
    outputs = [old for old, _ in replaced if old.is_graph_output()]
    for old, fused in replaced:
        old.replace_all_uses_with(fused, replace_graph_outputs=True)
    graph.remove(core.nodes + (core.cache.nodes if core.cache is not None else []), safe=True)
    for old, fused in replaced:
        if old in outputs or (core.cache is not None and fused in present):
            fused.name, fused.type, fused.shape = old.name, old.type, old.shape
