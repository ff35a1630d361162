"""Padding cut per batch entry: each entry's keys end after its last visible one, and the op runs
on its flash path over what is left."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from compiler.attention_core import Core, Emit, emitter
from compiler.lowerings import Masked
from compiler.lowerings.head_padding import bsd_inputs, widen_heads
from compiler.mask_ops import (
    KEY_BIAS_FLOOR,
    MS_DOMAIN,
    float_constant,
    floored,
    int_constant,
    loop_over,
)

ROWS_FROM = 1024  # the shortest query length whose padding is cut per batch entry


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
    ints = lambda name, values: int_constant(graph, name, values)  # noqa: E731
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
    stacked = loop_over(graph, add, batch, "rows", rows.inner, rows.step)  # (N, 1, L, H*hd)
    return add("Squeeze", [stacked, axis1], "rows/context")


def _kept_keys(graph: ir.Graph, raw: ir.Value, add: Emit, axis0: ir.Value) -> ir.Value:
    """(N|1,) int64: how many keys each entry keeps, up to its last one above KEY_BIAS_FLOOR in
    any head; all of them where none is."""
    ints = lambda name, values: int_constant(graph, name, values)  # noqa: E731
    keys = add("Shape", [raw], "rows/keys", {"start": 3, "end": 4})
    one = int_constant(graph, "one_i64", 1)
    past_last = add("Add", [add("Squeeze", [keys, axis0], "rows/keys_scalar"), one], "rows/keys_1")
    positions = add("Range", [one, past_last, one], "rows/positions_1")
    positions = add("Cast", [positions], "rows/positions", {"to": ir.DataType.FLOAT})  # 1..S
    floor = float_constant(graph, "key_bias_floor", KEY_BIAS_FLOOR)
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
                    add("Less", [ends, float_constant(graph, "half", 0.5)], "rows/none_visible"),
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
                            [op("Equal", [bias, float_constant(graph, "zero", 0.0)], "zero_bias")],
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
        plain = op("Less", [nonzero, float_constant(graph, "half", 0.5)], "plain")
        branches = [self._branch(name, query, key, value, bias) for name in ("plain", "widened")]
        return op("If", [plain], "If", {"then_branch": branches[0], "else_branch": branches[1]})

    def _row(self, op: Emit, index: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
        """The entry's query, and its keys, values and bias up to its last kept key."""
        (q, k, v), raw, one, axis0, axis1 = self.qkv, self.raw, self.one, self.axis0, self.axis1
        zero1 = lambda: int_constant(self.graph, "zero1", [0])  # noqa: E731
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


class PaddedRows:
    """A mask of the key alone (padding): each entry's keys cut after its last visible one."""

    def applies(self, masked: Masked) -> bool:
        return masked.terms.key_only

    def start(self, masked: Masked) -> int:
        return ROWS_FROM

    def emit(self, masked: Masked, emit: Emit, name: str) -> ir.Value:
        inputs = masked.inputs(emit)
        return padded_rows(masked.graph, masked.core, inputs, masked.raw, emit, name)
