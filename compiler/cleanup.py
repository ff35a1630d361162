"""Clean-up after rewrites: drop dead nodes, unused functions, repeated constants and unused opsets; restore
topological order."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common


class CleanupPass(ir.passes.InPlacePass):
    """Composes onnx-ir's own passes; shape inference is left to the writer (it adds value_info only)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        steps = ir.passes.Sequential(
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.DeduplicateInitializersPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        )
        result = steps(model)
        return ir.passes.PassResult(result.model, result.modified)
