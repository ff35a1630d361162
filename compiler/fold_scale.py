"""Fold the 1/sqrt(head_dim) score scale into the query projection's weight and bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, new_initializer, only_use

_SHAPE_OPS = ("Reshape", "Transpose")


class FoldScalePass(ir.passes.InPlacePass):
    """Mul(MatMul(q, k), c) with q = reshape/transpose of x @ W (+ b) becomes MatMul(q', k), q' from x @ cW (+ cb).

    Scaling commutes with the head split, so the scores are unchanged up to rounding and the
    graph loses one elementwise op over the (N, H, L, S) scores.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for mul in list(graph):
            if mul.op_type != "Mul" or mul.domain:
                continue
            for scores, factor in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
                scale = constant(factor)
                matmul = scores.producer() if scores is not None else None
                if scale is None or scale.size != 1 or matmul is None or matmul.op_type != "MatMul":
                    continue
                if only_use(scores) is not mul:
                    continue
                projection = _query_projection(matmul.inputs[0])
                if projection is None:
                    continue
                for node, index in projection:
                    array = constant(node.inputs[index])
                    node.replace_input_with(
                        index,
                        new_initializer(
                            graph,
                            f"{node.inputs[index].name}_scaled",
                            (array * scale.reshape(())).astype(array.dtype),
                        ),
                    )
                mul.outputs[0].replace_all_uses_with(scores, replace_graph_outputs=True)
                graph.remove(mul, safe=True)
                modified = True
                break
        return ir.passes.PassResult(model, modified)


def _query_projection(q: ir.Value) -> list[tuple[ir.Node, int]] | None:
    """The (node, input index) of the constant weight and bias that produce ``q``, through shape-only ops."""
    value = q
    while (node := value.producer()) is not None and node.op_type in _SHAPE_OPS and not node.domain:
        if only_use(value) is None:
            return None
        value = node.inputs[0]
    if node is None or only_use(value) is None:
        return None
    found = []
    if node.op_type == "Add":
        bias_index = next((i for i in (0, 1) if constant(node.inputs[i]) is not None), None)
        if bias_index is None:
            return None
        found.append((node, bias_index))
        value = node.inputs[1 - bias_index]
        node = value.producer()
        if node is None or only_use(value) is None:
            return None
    if node.op_type != "MatMul" or node.domain:
        return None
    weight = constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        return None
    found.append((node, 1))
    return found
