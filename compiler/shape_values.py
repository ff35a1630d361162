"""What a small shape computation evaluates to, where the graph fixes it.

Exporters (torch.onnx.export with dynamo=False above all) compute reshape targets and scales at run
time from Shape: ``Concat(Unsqueeze(Gather(Shape(x), 0)), [4], Unsqueeze(Div(Gather(Shape(x), 2), 4)))``
is (batch, 4, 64) when x is (batch, seq, 256). The head count, the head size and the scale the
fusions need are there, but no constant says so; onnx_ir's shape inference leaves them symbolic.
This evaluates such a computation entry by entry: an entry is an int (or float) where the graph
fixes it and None where it depends on a dynamic axis.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from compiler._ir import constant

# list[int | float | None]: a 1-D value, or a scalar as one entry with ``scalar`` set
Entries = list


def _pow(a: int | float, b: int | float) -> int | float | None:
    """ONNX Pow where it is real: integers stay integers (a non-negative exponent), floats need a
    positive base or a whole exponent (a scale written as head_size ** 0.5 by legacy exports)."""
    if isinstance(a, int) and isinstance(b, int):
        return a**b if b >= 0 else None
    return float(a) ** float(b) if a > 0 or float(b).is_integer() and a != 0 else None


_BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: (
        a / b if isinstance(a, float) or isinstance(b, float) else (a // b if b else None)
    ),
    "Pow": _pow,
}
_INTEGER_TYPES = {
    ir.DataType.INT64,
    ir.DataType.INT32,
    ir.DataType.INT16,
    ir.DataType.INT8,
    ir.DataType.UINT8,
}


def entries(value: ir.Value | None, depth: int = 16) -> tuple[Entries, bool] | None:
    """(the entries of a 0-D or 1-D value, whether it is 0-D), or None where its structure is unknown."""
    if value is None or depth == 0:
        return None
    array = constant(value)
    if array is not None:
        if array.ndim > 1 or array.size > 64:
            return None
        flat = [x.item() for x in array.reshape(-1)]
        return flat, array.ndim == 0
    node = value.producer()
    if node is None or node.domain:
        return None
    if node.op_type == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        dims = [d if isinstance(d, int) else None for d in shape]
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        return dims[start:end], False
    inputs = [entries(x, depth - 1) for x in node.inputs]
    if node.op_type in _BINARY or node.op_type in ("Sqrt", "Reciprocal"):
        return _arithmetic(node.op_type, inputs)
    return _rearranged(node, inputs)


def _rearranged(node: ir.Node, inputs: list[tuple[Entries, bool] | None]) -> Any:
    """The entries of a node that moves, casts, picks or joins its input's entries."""
    op = node.op_type
    if op in ("Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        if not inputs or inputs[0] is None:
            return None
        values, _ = inputs[0]
        if op == "Squeeze" or (
            op == "Reshape"
            and len(values) == 1
            and constant(node.inputs[1]) is not None
            and constant(node.inputs[1]).size == 0
        ):
            return (values, True) if len(values) == 1 else None
        return values, False if op != "Identity" else inputs[0][1]
    if op == "Cast" and inputs[0] is not None:
        to = ir.DataType(node.attributes.get_int("to", 1))
        values, scalar = inputs[0]
        cast = int if to in _INTEGER_TYPES else float
        return [None if x is None else cast(x) for x in values], scalar
    if op == "Gather" and None not in inputs[:2] and node.attributes.get_int("axis", 0) == 0:
        values, _ = inputs[0]
        picked, scalar = inputs[1]
        if None in picked or any(not -len(values) <= int(i) < len(values) for i in picked):
            return None
        return [values[int(i)] for i in picked], scalar
    if op == "Concat" and all(x is not None for x in inputs):
        return [e for values, _ in inputs for e in values], False
    if (
        op == "Slice"
        and inputs[0] is not None
        and all(x is not None and None not in x[0] for x in inputs[1:3])
    ):
        values, _ = inputs[0]
        start, end = int(inputs[1][0][0]), int(inputs[2][0][0])
        return values[slice(start, end)], False
    return None


def _arithmetic(op: str, inputs: list[tuple[Entries, bool] | None]) -> Any:
    """Entry-wise arithmetic (broadcasting a single entry), None where an entry is unknown."""
    if op in _BINARY and len(inputs) == 2 and all(x is not None for x in inputs):
        (a, a_scalar), (b, b_scalar) = inputs
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            return None
        n = max(len(a), len(b))
        a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
        return [
            None if x is None or y is None else _BINARY[op](x, y) for x, y in zip(a, b)
        ], a_scalar and b_scalar
    if op in ("Sqrt", "Reciprocal") and inputs[0] is not None:
        values, scalar = inputs[0]
        f = math.sqrt if op == "Sqrt" else (lambda x: 1.0 / x)
        return [
            None if x is None or x < 0 or (op == "Reciprocal" and x == 0) else f(float(x))
            for x in values
        ], scalar
    return None


def scalar(value: ir.Value | None) -> float | None:
    """A single number the graph fixes, computed or constant; None where it is not one."""
    found = entries(value)
    if found is None or len(found[0]) != 1 or found[0][0] is None:
        return None
    return float(found[0][0])
