"""A Triton Inference Server model repository for a compiled graph: config.pbtxt in the text
format of Triton's model_config.proto, and the model under version 1."""

from __future__ import annotations

from typing import Any

import onnx

from artifacts.output_folders import TRITON_MARKER
from graphs.dtypes import BY_ONNX

# version 1 holds model.onnx, model.plan, or model.onnx beside model.py (python: Triton's python
# backend runs artifacts/triton_python_model.py, which runs model.onnx on ONNX Runtime)
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan", "python")
BACKENDS = ("onnxruntime", "python")  # compile.py --triton-backend


def _tensors(values: Any, skip: set[str]) -> list[tuple[str, str, list[int | str]]]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim
        ]
        out.append((v.name, BY_ONNX[t.elem_type].triton, dims))
    return out


def triton_config(
    model: onnx.ModelProto, name: str, max_batch_size: int, platform: str = "onnxruntime_onnx"
) -> tuple[str, dict[str, Any]]:
    """config.pbtxt and what it chose. Dynamic batching needs batch as the first axis of every input
    and output (Triton stacks requests along it); otherwise max_batch_size is 0 and every dim is
    listed, -1 where dynamic, and the summary says which tensor prevented batching."""
    if platform not in PLATFORMS:
        raise ValueError(
            f"unknown Triton platform {platform!r}; expected one of {', '.join(PLATFORMS)}"
        )
    initializers = {t.name for t in model.graph.initializer}
    inputs, outputs = _tensors(model.graph.input, initializers), _tensors(model.graph.output, set())
    unbatched = [n for n, _, dims in inputs + outputs if not dims or dims[0] != "batch"]
    batching = max_batch_size > 0 and not unbatched

    def entry(tensor: tuple[str, str, list[int | str]]) -> str:
        tname, dtype, dims = tensor
        listed = dims[1:] if batching else dims
        shown = ", ".join(str(d) if isinstance(d, int) else "-1" for d in listed)
        return f'  {{\n    name: "{tname}"\n    data_type: {dtype}\n    dims: [ {shown} ]\n  }}'

    lines = [
        TRITON_MARKER,
        f'name: "{name}"',
        f'backend: "{platform}"' if platform == "python" else f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size if batching else 0}",
        "input [\n" + ",\n".join(entry(t) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(entry(t) for t in outputs) + "\n]",
    ]
    if batching:
        lines.append("dynamic_batching { }")
    summary = {
        "model_name": name,
        "platform": platform,
        "max_batch_size": max_batch_size if batching else 0,
        "dynamic_batching": batching,
        "note": None
        if batching
        else (
            f"no dynamic batching: {', '.join(unbatched)} "
            f"{'has' if len(unbatched) == 1 else 'have'} no leading batch axis"
            if unbatched
            else "no dynamic batching: --triton-max-batch 0"
        ),
    }
    return "\n".join(lines) + "\n", summary
