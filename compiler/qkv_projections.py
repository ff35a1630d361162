"""The Q/K/V projections that feed a self-attention core, as one weight and bias over one input.

ONNX Runtime's com.microsoft.Attention takes the layer's input and the packed projection weights
and runs the projections inside the op, in the layout its kernel wants: no Split copy, no head
split or merge. On its CPU that op is faster than MultiHeadAttention fed with projected q, k, v for
short sequences (docs/BENCHMARKS.md, "Attention op on CPU"), so the ort-cpu fusion reads the
projections back through the exporter's head split to use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, named
from compiler.attention_core import Core, perm_of, producer_of, same_dim


@dataclass
class Projections:
    """q, k, v = x @ weight[:, slices] + bias[slices], with the three widths in ``sizes``. ``axes``:
    each value between a projection and the core, with what each of its axes is: "N" or "L" (x's
    batch or length axis) or a fixed size."""

    x: ir.Value  # (N, L, E_in)
    weight: np.ndarray  # (E_in, Eq + Ek + Ev)
    bias: np.ndarray  # (Eq + Ek + Ev,)
    sizes: tuple[int, int, int]
    axes: dict[ir.Value, tuple] = field(default_factory=dict)


def match_projections(core: Core) -> Projections | None:
    """The projections of one tensor that the core's q, k and v are, each through nothing but its
    head split (BNSH) or as they are (BSD); None where any of them is something else (rotary
    embeddings, grouped-query heads repeated, a cache, a scale the core did not take)."""
    if core.cache is not None or core.num_heads is None or core.head_dim is None:
        return None
    if core.layout == "BSD":
        flat = [core.q, core.k, core.v]
    else:
        flat = [
            _merged(core.q, [0, 2, 1, 3], core),
            _merged(core.k, [0, 2, 3, 1] if core.k_transposed else [0, 2, 1, 3], core),
            _merged(core.v, [0, 2, 1, 3], core),
        ]
    found = [_projection(p) if p is not None else None for p in flat]
    if any(f is None for f in found) or len({id(f[0]) for f in found}) != 1:
        return None
    weights, biases = [f[1] for f in found], [f[2] for f in found]
    if len({w.shape[0] for w in weights}) != 1 or any(w.dtype != np.float32 for w in weights):
        return None
    width = core.num_heads * core.head_dim
    if any(w.shape[1] != width for w in weights):
        return None
    x = found[0][0]
    if x.shape is None or len(x.shape) != 3:
        return None
    axes: dict[ir.Value, tuple] = {}
    h, d = core.num_heads, core.head_dim
    for value, p, perm in zip(
        [core.q, core.k, core.v],
        flat,
        [[0, 2, 1, 3], [0, 2, 3, 1] if core.k_transposed else [0, 2, 1, 3], [0, 2, 1, 3]],
    ):
        axes[p] = ("N", "L", width)
        if value is not p:
            heads = ("N", "L", h, d)
            axes[value.producer().inputs[0]] = heads
            axes[value] = tuple(heads[i] for i in perm)
    return Projections(
        x,
        np.concatenate(weights, axis=1),
        np.concatenate(biases).astype(np.float32),
        (width,) * 3,
        axes,
    )


def reroute_shapes(graph: ir.Graph, projections: Projections) -> None:
    """Shape reads of the projections and their head splits (exporters read a length or the head
    size there) taken from x and constants instead: else they keep alive a projection that ONNX
    Runtime would run only for its shape, once com.microsoft.Attention projects x itself."""
    for value, axes in projections.axes.items():
        for node in [use.node for use in value.uses()]:
            if node.op_type != "Shape" or node.domain:
                continue
            start, end = (
                node.attributes.get_int(k, default)
                for k, default in (("start", 0), ("end", len(axes)))
            )
            start, end = (
                max(0, a + len(axes)) if a < 0 else min(a, len(axes)) for a in (start, end)
            )
            if start >= end:
                continue
            new: list[ir.Node] = []
            prefix = node.outputs[
                0
            ].name  # value names are unique in a graph; node names need not be set
            for axis in axes[start:end]:
                if isinstance(axis, str):
                    new.append(
                        named(
                            ir.node(
                                "Shape",
                                [projections.x],
                                {"start": "NL".index(axis), "end": "NL".index(axis) + 1},
                                name=f"{prefix}/from_x_{len(new)}",
                            )
                        )
                    )
                else:
                    new.append(
                        named(
                            ir.node(
                                "Constant",
                                [],
                                {"value_ints": [axis]},
                                name=f"{prefix}/size_{len(new)}",
                            )
                        )
                    )
            parts = [n.outputs[0] for n in new]
            if len(parts) > 1:
                new.append(named(ir.node("Concat", parts, {"axis": 0}, name=f"{prefix}/from_x")))
            graph.insert_before(node, new)
            node.outputs[0].replace_all_uses_with(new[-1].outputs[0])


def _merged(value: ir.Value, perm: list[int], core: Core) -> ir.Value | None:
    """p (N, L, H*hd) where value = Transpose(Reshape(p, (N, L, H, hd)), perm)."""
    transpose = producer_of(value, "Transpose")
    if transpose is None or perm_of(transpose) != perm:
        return None
    reshape = producer_of(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    p, heads = reshape.inputs[0], reshape.outputs[0]
    if p.shape is None or heads.shape is None or len(p.shape) != 3 or len(heads.shape) != 4:
        return None
    # with the first two axes kept and the last one hd, the third is H (whatever shape inference knew)
    if (
        p.shape[2] != core.num_heads * core.head_dim
        or heads.shape[3] != core.head_dim
        or not same_dim(p.shape[0], heads.shape[0])
        or not same_dim(p.shape[1], heads.shape[1])
    ):
        return None
    return p


def _projection(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray] | None:
    """(x, W, b) where value = x @ W + b (or x @ W: b = 0), W and b constants, or one output of a Split
    on the last axis of such a packed projection (its columns of W and b), or such a projection
    times a constant scalar (folded into W and b)."""
    split = producer_of(value, "Split")
    if split is not None:
        packed = _projection(split.inputs[0])
        axis = split.attributes.get_int("axis", 0)
        if packed is None or axis not in (-1, 2):
            return None
        if len(split.inputs) > 1 and split.inputs[1] is not None:
            sizes = constant(split.inputs[1])
        else:  # opset 18's num_outputs, or an even split
            sizes = np.full(len(split.outputs), packed[1].shape[1] // len(split.outputs))
        if sizes is None or int(np.sum(sizes)) != packed[1].shape[1]:
            return None
        index = list(split.outputs).index(value)
        start, stop = int(np.sum(sizes[:index])), int(np.sum(sizes[: index + 1]))
        x, w, b = packed
        return x, w[:, start:stop], b[start:stop]
    if (rows := _gemm_rows(value)) is not None:
        return rows
    scaled = producer_of(value, "Mul")
    if scaled is not None:  # OPT's q_proj(x) * scaling: the factor goes into the weights
        for i in (0, 1):
            factor = _constant(scaled.inputs[1 - i])
            inner = (
                _projection(scaled.inputs[i]) if factor is not None and factor.size == 1 else None
            )
            if inner is not None:
                x, w, b = inner
                c = factor.reshape(()).astype(w.dtype)
                return x, w * c, b * c
        return None
    bias = None
    add = producer_of(value, "Add")
    if add is not None:
        for i in (0, 1):
            b = _constant(add.inputs[1 - i])
            if b is not None and b.ndim == 1 and producer_of(add.inputs[i], "MatMul") is not None:
                value, bias = add.inputs[i], b
                break
        else:
            return None
    matmul = producer_of(value, "MatMul")
    w = _constant(matmul.inputs[1]) if matmul is not None else None
    if w is None or w.ndim != 2 or (bias is not None and bias.shape != (w.shape[1],)):
        return None
    return matmul.inputs[0], w, bias if bias is not None else np.zeros(w.shape[1], w.dtype)


def _gemm_rows(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray] | None:
    """(x, W, b) where value = Reshape(Gemm(Reshape(x, (N*L, E_in)), W, b), (N, L, E')), as GPT-2's
    Conv1D exports (addmm over the rows; b = 0 where the Gemm has none)."""
    outer = producer_of(value, "Reshape")
    gemm = producer_of(outer.inputs[0], "Gemm") if outer is not None else None
    inner = producer_of(gemm.inputs[0], "Reshape") if gemm is not None else None
    if inner is None:
        return None
    x = inner.inputs[0]
    if (
        x.shape is None
        or value.shape is None
        or len(x.shape) != 3
        or len(value.shape) != 3
        or not same_dim(x.shape[0], value.shape[0])
        or not same_dim(x.shape[1], value.shape[1])
    ):
        return None
    attrs = gemm.attributes
    if (
        attrs.get_float("alpha", 1.0) != 1.0
        or attrs.get_float("beta", 1.0) != 1.0
        or attrs.get_int("transA", 0)
    ):
        return None
    w = _constant(gemm.inputs[1])
    if w is None or w.ndim != 2:
        return None
    w = w.T if attrs.get_int("transB", 0) else w
    b = (
        _constant(gemm.inputs[2])
        if len(gemm.inputs) > 2 and gemm.inputs[2] is not None
        else np.zeros(w.shape[1], w.dtype)
    )
    if b is None:
        return None
    if w.shape[0] != x.shape[2] or b.shape != (w.shape[1],):
        return None
    return x, w, b


def _constant(value: ir.Value) -> np.ndarray | None:
    """A constant, also through the Identity legacy exports put before a weight, or the Transpose
    the dynamo exporter keeps on a weight that several layers share (ALBERT's)."""
    identity = producer_of(value, "Identity")
    if identity is not None:
        return constant(identity.inputs[0])
    turned = producer_of(value, "Transpose")
    if turned is not None:
        inner = constant(turned.inputs[0])
        perm = perm_of(turned) or None
        return None if inner is None else np.transpose(inner, perm)
    return constant(value)
