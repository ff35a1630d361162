"""Move the fully-masked-row guard out of the softmax, so the core is the bare
MatMul-Softmax-MatMul chain that TensorRT recognises and fuses."""

from __future__ import annotations

import onnx_ir as ir

from compiler._ir import model_graphs
from compiler.attention_core import dead_rows, emitter, unique_scope, zero_dead_weights
from compiler.core_survey import find_cores


class GuardAfterContextPass(ir.passes.InPlacePass):
    """Where(IsInf(ReduceMax(scores)), 0, Softmax(scores)) @ V  ->  Where(dead, 0, Softmax(scores) @ V),
    with ``dead`` read from the mask alone ((N|1, H|1, L, 1), so it costs one pass over the mask,
    not over the scores). For finite inputs a score row is all -inf exactly when its mask row is,
    so the outputs are unchanged; with need_weights the weights get the same Where.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        moved = [
            self._move(graph) for graph in model_graphs(model)
        ]  # If branches and Loop bodies too
        return ir.passes.PassResult(model, any(moved))

    @staticmethod
    def _move(graph: ir.Graph) -> bool:
        cores = [
            core
            for core in find_cores(graph)
            if core.guarded and core.mask is not None and not core.softcap
        ]
        for core in cores:
            softmax, context_mm, where = core.softmax, core.context_matmul, core.guard[0]
            new: list[ir.Node] = []
            scope = unique_scope(graph)
            add = emitter(new, scope)
            dead = dead_rows(graph, core.mask, add)
            kept = add(
                "Where", [dead, where.inputs[1], context_mm.outputs[0]], "fully_masked/context"
            )
            graph.insert_after(context_mm, new)
            context_mm.outputs[0].replace_all_uses_with(kept)
            new[-1].replace_input_with(2, context_mm.outputs[0])
            probs = where.outputs[0]
            if core.weights is not None:
                weights_nodes: list[ir.Node] = []
                weights = zero_dead_weights(
                    graph, softmax.outputs[0], dead, emitter(weights_nodes, scope)
                )
                graph.insert_after(softmax, weights_nodes)
                probs.replace_all_uses_with(weights)
            context_mm.replace_input_with(0, softmax.outputs[0])
            graph.remove(core.guard, safe=True)
        return bool(cores)
