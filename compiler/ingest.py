"""Say what a target's pipeline fused in an existing ONNX graph (torch.onnx.export's, say) and
what it left alone, and why."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, ShapeInferencePass

from compiler._ir import module_path, nested_graphs
from compiler.attention_core import Core
from compiler.core_survey import survey
from compiler.targets import Form, every_node


@dataclass(frozen=True)
class Finding:
    softmax: str  # the Softmax's output name in the input graph
    fused: bool
    detail: str
    attention: bool = True  # False: this Softmax is no attention core
    # the module it came from, where the exporter said: "encoder.layer.0.attention.self"
    layer: str = ""

    def __str__(self) -> str:
        where = f" ({self.layer})" if self.layer else ""
        return f"{'fused' if self.fused else 'left alone'}: attention at Softmax '{self.softmax}'{where}: {self.detail}"


def layer_of(node: ir.Node) -> str:
    return module_path(node.name or "", node.metadata_props)


def fusion_findings(
    before: onnx.ModelProto, after: onnx.ModelProto, form: Form, fused_form: str
) -> list[Finding]:
    """One finding per Softmax of ``before``: fused into what, or why it was left alone. A Softmax
    counts as fused when ``after`` no longer computes its output."""
    model = ir.serde.deserialize_model(before)
    InlinePass()(model)  # as the targets' passes do: their cores may sit in model-local functions
    ShapeInferencePass()(model)
    remaining = {
        out for node in every_node(after.graph) if node.op_type == "Softmax" for out in node.output
    }
    findings = []
    for node, found in (pair for graph in nested_graphs(model.graph) for pair in survey(graph)):
        name, layer = node.outputs[0].name, layer_of(node)
        if name not in remaining:
            findings.append(Finding(name, True, f"into {fused_form}", layer=layer))
        elif not isinstance(found, Core):
            findings.append(
                Finding(
                    name, False, f"not an attention core: {found}", attention=False, layer=layer
                )
            )
        elif form.fusion is None:
            findings.append(
                Finding(
                    name, False, f"the {form.name} form keeps MatMul-Softmax-MatMul", layer=layer
                )
            )
        else:
            findings.append(
                Finding(
                    name,
                    False,
                    form.fusion.refuse(found) or "the fusion did not apply",
                    layer=layer,
                )
            )
    return findings
