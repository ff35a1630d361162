"""Ingest an existing ONNX graph (torch.onnx.export's, say): load it safely, and say what a
target's pipeline fused in it and what it left alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from onnx_ir.passes.common import ShapeInferencePass

from compiler.attention_core import Core, survey
from compiler.targets import Form


class IngestError(ValueError):
    """An ONNX file that cannot be read or is not safe to read."""


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The model at ``path``, its external data read only from inside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"ONNX file '{path}' does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a corrupt file
        raise IngestError(f"'{path}' is not a readable ONNX model ({type(exc).__name__})") from exc
    folder = path.resolve().parent
    for tensor in _tensors(model.graph):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = (folder / location).resolve()
            if not target.is_relative_to(folder) or not target.is_file():
                raise IngestError(f"initializer '{tensor.name}' of '{path}' points at external data '{location}', "
                                  "which is not a file inside the model's folder")
    load_external_data_for_model(model, str(folder))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise IngestError(f"'{path}' is not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
    return model


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _tensors(sub)


@dataclass(frozen=True)
class Finding:
    softmax: str  # the Softmax's output name in the input graph
    fused: bool
    detail: str
    attention: bool = True  # False: this Softmax is no attention core

    def __str__(self) -> str:
        return f"{'fused' if self.fused else 'left alone'}: attention at Softmax '{self.softmax}': {self.detail}"


def fusion_findings(before: onnx.ModelProto, after: onnx.ModelProto, form: Form, fused_form: str) -> list[Finding]:
    """One finding per Softmax of ``before``: fused into what, or why it was left alone. A Softmax
    counts as fused when ``after`` no longer computes its output."""
    model = ir.serde.deserialize_model(before)
    ShapeInferencePass()(model)
    remaining = {out for node in after.graph.node if node.op_type == "Softmax" for out in node.output}
    findings = []
    for node, found in survey(model.graph):
        name = node.outputs[0].name
        if name not in remaining:
            findings.append(Finding(name, True, f"into {fused_form}"))
        elif not isinstance(found, Core):
            findings.append(Finding(name, False, f"not an attention core: {found}", attention=False))
        elif form.fusion is None:
            findings.append(Finding(name, False, f"the {form.name} form keeps MatMul-Softmax-MatMul"))
        else:
            findings.append(Finding(name, False, form.fusion.refuse(found) or "the fusion did not apply"))
    return findings
