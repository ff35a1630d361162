"""Raise the default-domain opset, for targets whose fused op only exists in newer opsets."""

from __future__ import annotations

import onnx.helper
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """onnxscript's version converter (it adapts every node whose semantics changed), plus the IR
    version the new opset needs, which the converter leaves alone."""

    def __init__(self, opset: int) -> None:
        super().__init__()
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 1) >= self.opset:
            return ir.passes.PassResult(model, False)
        ConvertVersionPass(self.opset, fallback=False)(model)
        if model.opset_imports.get("") != self.opset:
            raise ir.passes.PassError(f"could not convert the graph to opset {self.opset}")
        needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", self.opset)])
        model.ir_version = max(model.ir_version, needed)
        return ir.passes.PassResult(model, True)
