"""Attention as exporters write it: heads split into (N, H, L, hd) tensors, with what torch's two
exporters put around the core. Between the scores MatMul and the Softmax: scalings (constant, or
computed from the head size at run time) and any number of added biases; after it: no-op Casts and
torch SDPA's NaN guard; the keys as K^T, as K under a Transpose, or through torch's 3-D detour. Where
the heads are an exporter's split of (N, L, E) projections and the context goes through its merge,
the core is given in BSD form, as compiler/attention_core.py finds our own graphs' cores, so that
a fused op reads the projections and writes the merge directly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from compiler._ir import constant, only_use, overridable, uniform
from compiler.attention_core import Core, over_keys, perm_of, producer_of, same_dim
from compiler.core_patterns import CONTEXT_END, QUERY_KEY_END, same_float_cast, scaling_factor
from compiler.shape_values import entries, scalar


def _scaled(value: ir.Value) -> tuple[ir.Value, float, ir.Node | None]:
    """value = Mul(x, c), Mul(c, x) or Div(x, c) with c a scalar the graph fixes (constant, or computed:
    legacy exporters write Sqrt(1 / Sqrt(hd))), used once: (x, factor, node); else (value, 1, None)."""
    node = value.producer()
    if node is None or node.domain or node.op_type not in ("Mul", "Div") or only_use(value) is None:
        return value, 1.0, None
    for side in (1,) if node.op_type == "Div" else (1, 0):
        if factor := scaling_factor(node.inputs[side]):
            return node.inputs[1 - side], (1.0 / factor if node.op_type == "Div" else factor), node
    return value, 1.0, None


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def reaches_scores(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` is the query-key product, through scalings, casts and added biases."""
    node = value.producer()
    if node is None or node.domain or depth == 0:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type in ("Mul", "Div", "Cast", "Tanh"):  # Tanh: soft-capped scores
        return any(
            constant(x) is None and reaches_scores(x, depth - 1)
            for x in node.inputs[: 1 if node.op_type == "Div" else 2]
        )
    if node.op_type == "Add":
        return any(reaches_scores(x, depth - 1) for x in node.inputs)
    return False


def _biases(scores: ir.Value) -> tuple[ir.Value, list[ir.Value], list[ir.Node]] | str:
    """Peel the additive biases off the scores (a padding mask, a causal mask, a relative position
    bias; any number, in any order): (the scaled product, the biases, the Add nodes)."""
    biases: list[ir.Value] = []
    nodes: list[ir.Node] = []
    while (add := producer_of(scores, "Add")) is not None:
        sides = [i for i in (0, 1) if reaches_scores(add.inputs[i])]
        if len(sides) != 1:
            return "its scores are not a MatMul plus masks"
        if only_use(add.inputs[sides[0]]) is None:
            return "an intermediate score tensor is used outside the attention"
        if not _adds_nothing(add.inputs[1 - sides[0]], add.inputs[sides[0]]):
            biases.append(add.inputs[1 - sides[0]])
        nodes.append(add)
        scores = add.inputs[sides[0]]
        while same_float_cast(scores.producer()) and only_use(scores) is not None:
            nodes.append(scores.producer())
            scores = scores.producer().inputs[0]
    return scores, biases[::-1], nodes


def _adds_nothing(bias: ir.Value, scores: ir.Value) -> bool:
    """A bias that is zero everywhere and broadcasts into the scores' shape: an all-visible mask a
    graph builds from constants (transformers' ViT under SDPA: ``Where(Expand(all True), 0, min)``),
    which would otherwise cost the fused op its mask-free path."""
    if uniform(bias) != 0:
        return False
    if bias.shape is None or scores.shape is None or len(bias.shape) > len(scores.shape):
        return False
    return all(
        b == 1 or b == s for b, s in zip(reversed(bias.shape.dims), reversed(scores.shape.dims))
    )


def _soft_capped(scores: ir.Value) -> tuple[ir.Value, float, list[ir.Node]]:
    """scores = c * tanh(x / c) (Gemma 2's attn_logit_softcapping, before the mask is added):
    (x, c, the three nodes); else (scores, 0, [])."""
    outer, c, mul = _scaled(scores)
    tanh = outer.producer() if mul is not None else None
    if tanh is None or tanh.op_type != "Tanh" or tanh.domain or only_use(outer) is None:
        return scores, 0.0, []
    inner, inverse, div = _scaled(tanh.inputs[0])
    if div is None or c <= 0 or not np.isclose(c * inverse, 1.0, rtol=1e-6):
        return scores, 0.0, []
    return inner, c, [mul, tanh, div]


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
        told = {
            h
            for x in node.inputs[1 if node.op_type == "Where" else 0 :]
            if x is not None and (h := _split_heads(x, axes, depth - 1)) is not None and h[0] > 1
        }
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
    if (
        source is not None
        and len(source) == 3
        and isinstance(source[2], int)
        and dims[2:].count(-1) == 1
    ):
        # (B, L, -1, hd) or (B, L, H, -1) from (B, L, E)
        known = dims[3] if dims[2] == -1 else dims[2]
        if known and known > 0 and source[2] % known == 0:
            dims[2 if dims[2] == -1 else 3] = source[2] // known
    heads, size = dims[perm[axes[0]]], dims[perm[axes[1]]]
    return (
        (heads, size) if heads is not None and size is not None and heads > 0 and size > 0 else None
    )


_SHAPE_KEEPING = (
    "Add",
    "Sub",
    "Mul",
    "Neg",
    "Cast",
    "Where",
)  # elementwise: a head split before is one after


def _unscaled(value: ir.Value) -> ir.Value:
    """``value`` before a Mul or Div by a scalar, which changes no shape."""
    node = value.producer()
    while (
        node is not None
        and node.op_type in ("Mul", "Div")
        and not node.domain
        and scalar(node.inputs[1]) is not None
    ):
        value = node.inputs[0]
        node = value.producer()
    return value


def _context_end(softmax: ir.Node, graph: ir.Graph) -> pattern.MatchResult | str:
    """The ContextEnd match whose softmax is ``softmax`` (tried at the MatMuls up to four nodes on: its
    longest chain), or why there is none."""
    probs, reached, frontier = softmax.outputs[0], [], [softmax.outputs[0]]
    for _ in range(4):
        frontier = [
            out
            for value in frontier
            for node, _ in value.uses()
            for out in node.outputs
            if not reached.append(node)
        ]
    found = [
        m
        for node in dict.fromkeys(reached)
        if node.op_type == "MatMul"
        and not node.domain
        and (m := CONTEXT_END.found(graph, node)) is not None
        and m.bindings["probs"] is probs
    ]
    if len(found) != 1:
        return "no single MatMul multiplies it with the values"
    return found[0] if found[0] else found[0].reason


def _operand(
    value: ir.Value, scale: ir.Value | None, how: str | None, matmul_input: ir.Value
) -> tuple[ir.Value, float]:
    """A MatMul operand as QueryKeyEnd bound it, with its scalar factor; where the Mul is by a tensor,
    not a scalar, it belongs to the operand (Llama 4 scales queries per position)."""
    factor = scaling_factor(scale) if scale is not None else 1.0
    if factor is None:
        return matmul_input, 1.0
    return value, 1.0 / factor if how == "Div" else factor


def _between(top: ir.Value, bottom: ir.Value, matched: list[ir.Node]) -> list[ir.Node]:
    """The matched nodes from ``bottom`` up to ``top`` (a scaling, a key transpose)."""
    nodes = []
    while top is not bottom:
        nodes.append(top.producer())
        top = next(x for x in nodes[-1].inputs if x is bottom or x.producer() in matched)
    return nodes


_NOT_FOUR_D = {
    3: "its scores are 3-D (batch*heads, query, key); onnx-attention reads nn.MultiheadAttention's "
    "as 4-D, the ort targets keep them (fused, they measured slower on ONNX Runtime's CPU)",
    None: "its rank is not known to be 4 (batch, heads, query, key)",
}


def match_exported(softmax: ir.Node, graph: ir.Graph) -> Core | str:
    """The heads-split form of scaled dot-product attention, as exporters write it; a reason string
    where it is not that. Its two ends are the patterns ContextEnd and QueryKeyEnd
    (compiler/core_patterns.py); between them the scalings and the added biases are walked here."""
    if _rank(softmax.outputs[0]) != 4:
        return _NOT_FOUR_D.get(_rank(softmax.outputs[0]), _NOT_FOUR_D[None])
    if not over_keys(softmax, graph):
        return "it does not normalise over the key axis alone (its axis, by its opset's rule, is not the last)"
    end = _context_end(softmax, graph)
    if isinstance(end, str):
        return end
    read, context_mm = end.bindings["read"], end.bindings["attended"].producer()
    after = [node for node in end.nodes if node not in (softmax, context_mm)]
    weights = read if read.is_graph_output() or len(read.uses()) > 1 else None
    peeled = _peeled_scores(softmax)
    if isinstance(peeled, str):
        return peeled
    scores, biases, peeled_nodes, post, softcap = peeled
    qk = _query_key(graph, scores)
    if isinstance(qk, str):
        return qk
    scores_mm, q, k, (q_scale, k_scale), k_transposed, qk_nodes = qk
    v = context_mm.inputs[1]
    if {_rank(q), _rank(k), _rank(v)} != {4}:
        return "its queries, keys and values are not rank-4 (batch, heads, length, head_dim)"
    nodes = [softmax, *after, *peeled_nodes, scores_mm, *qk_nodes, context_mm]
    heads = _heads_of(q, k, v, k_transposed, context_mm.outputs[0]) or (None, None)
    mask, extra = (biases[0], tuple(biases[1:])) if biases else (None, ())
    core = Core(
        "BNSH",
        q,
        k,
        v,
        *heads,
        post * q_scale * k_scale,
        mask,
        context_mm.outputs[0],
        weights,
        softmax,
        context_mm,
        [],
        nodes,
        extra_masks=extra,
        k_transposed=k_transposed,
        nan_guarded=any(n.op_type == "IsNaN" for n in after),
        softcap=softcap,
    )
    return _as_bsd(core) or core


def _heads_of(
    q: ir.Value, k: ir.Value, v: ir.Value, k_transposed: bool, context: ir.Value
) -> tuple[int, int] | None:
    """The (num_heads, head_dim) some head split of q, k or v shows, or the merged width tells;
    else None."""
    return (
        _split_heads(q, (1, 3))
        or _split_heads(k, (1, 2) if k_transposed else (1, 3))
        or _split_heads(v, (1, 3))
        or _heads_by_width(q, k, v, k_transposed, context)
    )


def _heads_by_width(
    q: ir.Value, k: ir.Value, v: ir.Value, k_transposed: bool, context: ir.Value
) -> tuple[int, int] | None:
    """Where no head split states both: the width E the context's head merge gives, over a head
    size the values or queries state, or a head count some split states (a packed (B, L, H, 3*hd)
    split sliced per q, k, v, as GPT-NeoX's legacy export writes it)."""
    width = _merged_width(context)
    if width is None:
        return None
    sizes = {x.shape[3] for x in (q, v) if x.shape is not None and len(x.shape) == 4}
    sizes = {d for d in sizes if isinstance(d, int) and d > 0 and width % d == 0}
    if len(sizes) == 1:
        size = sizes.pop()
        return width // size, size
    counts = {
        h
        for x, axes in ((q, (1, 3)), (v, (1, 3)), (k, (1, 2) if k_transposed else (1, 3)))
        if (h := _head_count(x, axes)) is not None and width % h == 0
    }
    if len(counts) == 1:
        heads = counts.pop()
        return heads, width // heads
    return None


def _head_count(value: ir.Value, axes: tuple[int, int]) -> int | None:
    """The head count of a split whose head axis a Slice then cut (the packed q, k, v of one
    Reshape), else None."""
    node = value.producer()
    if node is None or node.domain or node.op_type != "Slice" or len(node.inputs) < 4:
        return None
    cut = constant(node.inputs[3])
    if cut is None or [int(a) % 4 for a in cut.reshape(-1)] != [axes[1]]:
        return None
    split = _split_heads(node.inputs[0], axes)
    return split[0] if split is not None and split[0] > 1 else None


def _merged_width(context: ir.Value) -> int | None:
    """E of the (N, L, E) the context's heads are merged into, through the Transposes and Reshapes
    of the merge (reading the context's Shape beside them, as legacy SDPA exports do): from the
    merged shape, or from the rows of the constant weight a MatMul multiplies it by."""
    value, turned = context, False  # turned: the heads moved beside the head size
    for _ in range(4):
        users = [u.node for u in value.uses() if u.node.op_type != "Shape" or u.node.domain]
        if len(users) != 1 or value.is_graph_output() or users[0].domain:
            return None
        node = users[0]
        if node.op_type == "MatMul" and node.inputs[0] is value and turned:
            weight = constant(node.inputs[1])
            return weight.shape[0] if weight is not None and weight.ndim == 2 else None
        if node.op_type not in ("Transpose", "Reshape"):
            return None
        turned = turned or perm_of(node) == [0, 2, 1, 3]
        value = node.outputs[0]
        shape = value.shape
        if turned and shape is not None and len(shape) == 3 and isinstance(shape[2], int):
            return shape[2]
    return None


def _peeled_scores(
    softmax: ir.Node,
) -> tuple[ir.Value, list[ir.Value], list[ir.Node], float, float] | str:
    """The scores under the Softmax's no-op Casts, added biases, soft cap and scalings: the scores,
    the biases, the nodes peeled, the product of the scalings, and the cap (0: none)."""
    scores = softmax.inputs[0]
    if only_use(scores) is None:
        return "its scores are used outside the attention"
    nodes = []
    while same_float_cast(scores.producer()) and only_use(scores) is not None:
        nodes.append(scores.producer())
        scores = scores.producer().inputs[0]
    peeled = _biases(scores)
    if isinstance(peeled, str):
        return peeled
    scores, biases, adds = peeled
    nodes += adds
    scores, softcap, capping = _soft_capped(scores)
    nodes += capping
    post = 1.0
    while True:
        scores, factor, mul = _scaled(scores)
        if mul is None:
            break
        post *= factor
        nodes.append(mul)
    if (node := scores.producer()) is not None and (
        held := [x.name for x in node.inputs if overridable(x)]
    ):
        return (
            f"its {node.op_type} by {held[0]!r} reads an initializer the graph also lists as an "
            "input (keep_initializers_as_inputs), which a caller may override, so it is no constant "
            "to fuse; export without keep_initializers_as_inputs to fuse this core"
        )
    return scores, biases, nodes, post, softcap


def _query_key(
    graph: ir.Graph, scores: ir.Value
) -> tuple[ir.Node, ir.Value, ir.Value, tuple[float, float], bool, list[ir.Node]] | str:
    """The query-key MatMul under the scores (the QueryKeyEnd pattern): it, q, k, their scalings,
    whether k comes transposed, and the nodes between the MatMul and q and k."""
    scores_mm = producer_of(scores, "MatMul")
    qk = (
        QUERY_KEY_END.found(graph, scores_mm)
        if scores_mm is not None and only_use(scores) is not None
        else None
    )
    if qk is None:
        return "its scores are not a MatMul of queries and keys used only here"
    if not qk:
        return qk.reason
    b = qk.bindings
    q, q_scale = _operand(b["q"], b["q_scale"], b["q_scaling"], scores_mm.inputs[0])
    k, k_scale = _operand(b["k"], b["k_scale"], b["k_scaling"], scores_mm.inputs[1])
    k_transposed = k is scores_mm.inputs[1] or b["key_form"] == "K^T"
    between = [
        *_between(scores_mm.inputs[0], q, qk.nodes),
        *_between(scores_mm.inputs[1], k, qk.nodes),
    ]
    return scores_mm, q, k, (q_scale, k_scale), k_transposed, between


def _keeps(reshape: ir.Node, axis: int, source: ir.Value, source_axis: int) -> bool:
    """Whether a Reshape's ``axis`` keeps ``source``'s ``source_axis``: the target says 0 (copy), or
    gives the same size, or reads it from Shape(source) (as legacy exporters compute it), or shape
    inference found the two dims the same."""
    dims = _reshape_dims(reshape)
    if dims is None or axis >= len(dims):
        return False
    size = (
        source.shape[source_axis]
        if source.shape is not None and len(source.shape) > source_axis
        else None
    )
    if dims[axis] == 0 or (dims[axis] is not None and dims[axis] > 0 and dims[axis] == size):
        return True
    if dims[axis] is None and _shape_entry(reshape.inputs[1], axis) == (source, source_axis):
        return True
    out = reshape.outputs[0].shape
    return out is not None and len(out) > axis and size is not None and same_dim(out[axis], size)


def _shape_entry(shape: ir.Value, position: int) -> tuple[ir.Value, int] | None:
    """(t, i) where entry ``position`` of a Concat'ed shape is Shape(t)[i]: Unsqueeze(Gather(Shape(t), i))
    or Slice(Shape(t), i, i + 1)."""
    concat = producer_of(shape, "Concat")
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
    shape_node = producer_of(node.inputs[0], "Shape")
    index = constant(node.inputs[1])
    if (
        shape_node is None
        or index is None
        or index.size != 1
        or shape_node.attributes.get_int("start", 0) != 0
    ):
        return None
    return shape_node.inputs[0], int(index.reshape(-1)[0])


def _merged_heads(value: ir.Value, perm: list[int], heads: int, size: int) -> ir.Value | None:
    """x where ``value`` = Transpose(Reshape(x, (B, L, heads, size)), perm) and x is (B, L, heads*size):
    the exporter's head split, undone."""
    transpose = producer_of(value, "Transpose")
    reshape = (
        producer_of(transpose.inputs[0], "Reshape")
        if transpose is not None and perm_of(transpose) == perm
        else None
    )
    if reshape is None:
        return None
    x, dims = reshape.inputs[0], _reshape_dims(reshape)
    if x.shape is None or len(x.shape) != 3 or dims is None or len(dims) != 4:
        return None
    if not (
        _keeps(reshape, 0, x, 0) and _keeps(reshape, 1, x, 1)
    ):  # the batch and length stay where they are
        return None
    if dims[2] not in (heads, -1) or dims[3] not in (size, -1) or dims[2:].count(-1) > 1:
        return None
    if not (isinstance(x.shape[2], int) and x.shape[2] == heads * size):
        return None
    return x


def _as_bsd(core: Core) -> Core | None:
    """The same core with the exporter's head split and merge looked through: q, k, v as the (N, L, E)
    projections and the output as the (N, L, E) merge, as our own graphs hold them, so the fused op
    reads and writes them directly instead of a Transpose/Reshape round trip on each side."""
    if (
        core.num_heads is None
        or core.head_dim is None
        or core.weights is not None
        or core.cache is not None
    ):
        return None
    h, d = core.num_heads, core.head_dim
    q = _merged_heads(core.q, [0, 2, 1, 3], h, d)
    k = _merged_heads(core.k, [0, 2, 3, 1] if core.k_transposed else [0, 2, 1, 3], h, d)
    v = _merged_heads(core.v, [0, 2, 1, 3], h, d)
    merge_t = only_use(core.output)
    merge_r = (
        only_use(merge_t.outputs[0])
        if merge_t is not None and perm_of(merge_t) == [0, 2, 1, 3]
        else None
    )
    if (
        q is None
        or k is None
        or v is None
        or merge_r is None
        or merge_r.op_type != "Reshape"
        or merge_r.domain
    ):
        return None
    dims = _reshape_dims(merge_r)
    bsd = dataclasses.replace(
        core,
        layout="BSD",
        q=q,
        k=k,
        v=v,
        output=merge_r.outputs[0],
        nodes=[*core.nodes, merge_t, merge_r],
        k_transposed=True,
    )
    if dims is not None and len(dims) == 2 and dims[0] == -1 and dims[1] == h * d:
        return dataclasses.replace(bsd, output_rows=True)  # (N*L, E), rows for a Gemm
    if dims is None or len(dims) != 3 or dims[2] not in (h * d, -1):
        return None
    return bsd if all(_query_axis(merge_r, merge_t, q, axis) for axis in (0, 1)) else None


def _query_axis(merge_r: ir.Node, merge_t: ir.Node, q: ir.Value, axis: int) -> bool:
    """Whether the head merge's Reshape keeps the query's ``axis`` (batch 0, length 1) as it is."""
    entry = _shape_entry(merge_r.inputs[1], axis)
    return (
        _keeps(merge_r, axis, merge_t.outputs[0], axis)
        or _keeps(merge_r, axis, q, axis)
        or (
            entry is not None
            and entry[1] == axis
            and entry[0].shape is not None
            and len(entry[0].shape) > axis
            and q.shape is not None
            and same_dim(entry[0].shape[axis], q.shape[axis])
        )
    )
