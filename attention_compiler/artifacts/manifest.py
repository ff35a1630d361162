"""What manifest.json says about a compiled graph (docs/ARCHITECTURE.md contract 3): what it came
from, the target and form, the tools that made it; the files, check and timing are added as they
are made."""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import onnx

from attention_compiler.artifacts.output_folders import WRITTEN_BY
from attention_compiler.artifacts.report import graph_summary
from compiler import attention_form, get_target

TOOLS = ("attention-compiler", "numpy", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "torch")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def describe_graph(
    values: Iterable[onnx.ValueInfoProto], initializers: Iterable[onnx.TensorProto] = ()
) -> list[dict[str, Any]]:
    """Name, dtype and shape (a size, an axis name, or None) of a graph's inputs or outputs."""
    skip = {t.name for t in initializers}
    return [
        {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in v.type.tensor_type.shape.dim
            ],
        }
        for v in values
        if v.name not in skip
    ]


def manifest_head(plan: Any, settings: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the manifest holds before the graph is written: what was compiled (``plan``), how
    (``settings``), ``record``'s entries (the command line's options), and the op counts."""
    target, form = get_target(settings.target, settings.precision, settings.form)
    return {
        "written_by": WRITTEN_BY,
        **plan.described,
        "target": target.name,
        "form": form.name,
        "target_form": form.note,
        "attention_form": attention_form(plan.model),
        **plan.extra,
        "precision": settings.precision,
        "opset": opset(plan.model),
        "tools": tool_versions(),
        **record,
        "graph": graph_summary(plan.before, plan.model),
    }
