"""A core's mask read as the additive terms it sums, sorted by what each depends on (the key alone,
the causal comparison, the cache's past, anything else), so that a lowering can say whether it
takes them: compiler/lowerings/."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, uniform
from compiler.attention_core import Core, producer_of


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
