"""Where a fused core's q, k, v come from: the values before the core, or the projections' input
that com.microsoft.Attention reads whole; and the one-op form on either."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler._ir import new_initializer
from compiler.attention_core import Core
from compiler.mask_ops import MS_DOMAIN, op_inputs
from compiler.qkv_projections import Projections, reroute_shapes


@dataclass
class OpSource:
    """Where a core's q, k, v come from, for the forms to read. Without Projections: built once
    outside any If (op_inputs says why), and the one-op form is MultiHeadAttention on them. With
    Projections (compiler/qkv_projections.py): the layer's input, read whole by
    com.microsoft.Attention in the one-op form (faster on the CPU for short inputs:
    docs/BENCHMARKS.md, "Attention op on CPU"), and projected inside the branches that need q, k, v,
    so a short input never projects twice; ``core`` is then a BSD view of it."""

    core: Core
    length: ir.Value  # (N, L, ...): the query length on axis 1
    values: tuple[ir.Value, ir.Value, ir.Value] | None = None
    weight: ir.Value | None = None
    bias: ir.Value | None = None
    columns: list[tuple[ir.Value, ir.Value]] = dataclasses.field(
        default_factory=list
    )  # q's, k's, v's [start, end)
    last_axis: ir.Value | None = None

    @classmethod
    def of(cls, graph: ir.Graph, core: Core, projections: Projections | None, add) -> OpSource:
        if projections is None:
            values = op_inputs(graph, core, add)
            return cls(core, values[0], values)
        x = projections.x
        reroute_shapes(graph, projections)
        view = dataclasses.replace(
            core, layout="BSD", q=x, k=x, v=x
        )  # self-attention: L = S, both on axis 1
        weight = new_initializer(graph, "attention/qkv_weight", projections.weight)
        bias = new_initializer(graph, "attention/qkv_bias", projections.bias)
        bounds = np.cumsum([0, *projections.sizes])
        columns = [
            (
                new_initializer(graph, "attention/qkv_from", np.asarray([bounds[i]], np.int64)),
                new_initializer(graph, "attention/qkv_to", np.asarray([bounds[i + 1]], np.int64)),
            )
            for i in range(3)
        ]
        last = new_initializer(graph, "attention/last_axis", np.asarray([-1], np.int64))
        return cls(view, x, None, weight, bias, columns, last)

    def inputs(self, emit) -> tuple[ir.Value, ir.Value, ir.Value]:
        """q, k, v projected apart, each by its columns of the packed weight (slices of constants,
        which ONNX Runtime folds once): a Split of one packed projection would copy (N, L, 3E) per call."""
        if self.values is not None:
            return self.values
        last, out = self.last_axis, []
        for name, (start, end) in zip("qkv", self.columns):
            w = emit("Slice", [self.weight, start, end, last], f"{name}_proj/weight")
            b = emit("Slice", [self.bias, start, end, last], f"{name}_proj/bias")
            out.append(
                emit(
                    "Add",
                    [emit("MatMul", [self.length, w], f"{name}_proj/MatMul"), b],
                    f"{name}_proj/Add",
                )
            )
        return tuple(out)

    def one_op(self, emit, bias: ir.Value | None) -> ir.Value:
        if self.values is not None:
            return emit_mha(emit, *self.values, bias, self.core)
        return emit(
            "Attention",
            [self.length, self.weight, self.bias]
            + ([None, None, bias] if bias is not None else []),
            "Attention",
            {"num_heads": self.core.num_heads, "scale": self.core.scale},
            MS_DOMAIN,
        )


def emit_mha(
    emit, q: ir.Value, k: ir.Value, v: ir.Value, bias: ir.Value | None, core: Core
) -> ir.Value:
    """MultiHeadAttention(q, k, v, attention_bias=bias) with the core's heads and scale: its output."""
    return emit(
        "MultiHeadAttention",
        [q, k, v, None, None, bias] if bias is not None else [q, k, v],
        "MultiHeadAttention",
        {"num_heads": core.num_heads, "scale": core.scale},
        MS_DOMAIN,
    )
