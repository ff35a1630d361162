"""A Triton Inference Server model repository for a compiled graph: config.pbtxt in the text
format of Triton's model_config.proto, and the model under version 1.

Every string written into config.pbtxt is escaped as protobuf's text format escapes it (quotes,
backslashes, newlines and every byte past ASCII as octal), so a tensor name from an ``--onnx``
graph is read back as that name and never as more configuration."""

from __future__ import annotations

from typing import Any

import onnx
from google.protobuf import text_encoding

from attention_compiler.artifacts.options import whole_number_problem
from attention_compiler.artifacts.output_folders import TRITON_MARKER, ArtifactError
from graphs.dtypes import BY_ONNX

# version 1 holds model.onnx, model.plan, or model.onnx beside model.py (python: Triton's python
# backend runs attention_compiler/artifacts/triton_python_model.py, which runs model.onnx on ONNX Runtime)
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan", "python")
BACKENDS = ("onnxruntime", "python")  # compile.py --triton-backend
INT32_MAX = 2**31 - 1  # model_config.proto's max_batch_size is an int32
# ONNX element types Triton has a config name for beyond those this project's sessions feed
# (graphs/dtypes.py); the python backend's model.py cannot check them, so it refuses them
ONNXRUNTIME_ONLY = {
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.STRING: "TYPE_STRING",
}


class TritonConfigError(ArtifactError):
    """The graph cannot be described to Triton as asked (a tensor type it lacks, a bad option)."""


def _type_name(elem_type: int) -> str:
    return (
        onnx.TensorProto.DataType.Name(elem_type).lower()
        if elem_type in onnx.TensorProto.DataType.values()
        else f"an unknown element type ({elem_type})"
    )


def _triton_type(name: str, elem_type: int, platform: str) -> str:
    if elem_type in BY_ONNX:
        return BY_ONNX[elem_type].triton
    if elem_type in ONNXRUNTIME_ONLY and platform != "python":
        return ONNXRUNTIME_ONLY[elem_type]
    if elem_type in ONNXRUNTIME_ONLY:
        raise TritonConfigError(
            f"tensor {name!r} is {_type_name(elem_type)}, which the python backend's model.py "
            "cannot pass to ONNX Runtime; use --triton-backend onnxruntime"
        )
    raise TritonConfigError(
        f"tensor {name!r} is {_type_name(elem_type)}, a type Triton's model configuration has no "
        "name for; Triton serves bool, (u)int8-64, float16, bfloat16, float32, float64 and string"
    )


def _tensors(values: Any, skip: set[str], platform: str) -> list[tuple[str, str, list[int | str]]]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim
        ]
        out.append((v.name, _triton_type(v.name, t.elem_type, platform), dims))
    return out


def quoted(text: str) -> str:
    """``text`` as a protobuf text-format string literal: it parses back to exactly ``text``."""
    return '"' + text_encoding.CEscape(text.encode("utf-8", "surrogatepass"), as_utf8=False) + '"'


def triton_config(
    model: onnx.ModelProto,
    name: str,
    max_batch_size: int,
    platform: str = "onnxruntime_onnx",
    largest_batch: tuple[int, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """config.pbtxt and what it chose. Dynamic batching needs batch as the first axis of every input
    and output (Triton stacks requests along it); otherwise max_batch_size is 0 and every dim is
    listed, -1 where dynamic, and the summary says which tensor prevented batching.
    ``largest_batch``: the largest batch the graph takes and the flag that set it; the batcher
    never joins more (max_batch_size is capped to it, and the summary says so)."""
    if platform not in PLATFORMS:
        raise ValueError(
            f"unknown Triton platform {platform!r}; expected one of {', '.join(PLATFORMS)}"
        )
    if problem := whole_number_problem("triton_max_batch", max_batch_size, 0, INT32_MAX):
        raise TritonConfigError(f"{problem} (Triton's max_batch_size is an int32)")
    initializers = {t.name for t in model.graph.initializer}
    inputs = _tensors(model.graph.input, initializers, platform)
    outputs = _tensors(model.graph.output, set(), platform)
    unbatched = [n for n, _, dims in inputs + outputs if not dims or dims[0] != "batch"]
    batching = max_batch_size > 0 and not unbatched
    capped = batching and largest_batch is not None and largest_batch[0] < max_batch_size
    size = (largest_batch[0] if capped else max_batch_size) if batching else 0

    text = _render(name, platform, size, inputs, outputs, batching)
    summary = {
        "model_name": name,
        "platform": platform,
        "max_batch_size": size,
        "dynamic_batching": batching,
        "note": _note(batching, unbatched, capped and largest_batch, max_batch_size),
    }
    return text, summary


def _render(
    name: str,
    platform: str,
    size: int,
    inputs: list[tuple[str, str, list[int | str]]],
    outputs: list[tuple[str, str, list[int | str]]],
    batching: bool,
) -> str:
    def entry(tensor: tuple[str, str, list[int | str]]) -> str:
        tname, dtype, dims = tensor
        listed = dims[1:] if batching else dims
        shown = ", ".join(str(d) if isinstance(d, int) else "-1" for d in listed)
        return (
            f"  {{\n    name: {quoted(tname)}\n    data_type: {dtype}\n    dims: [ {shown} ]\n  }}"
        )

    lines = [
        TRITON_MARKER,
        f"name: {quoted(name)}",
        f"backend: {quoted(platform)}" if platform == "python" else f"platform: {quoted(platform)}",
        f"max_batch_size: {size}",
        "input [\n" + ",\n".join(entry(t) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(entry(t) for t in outputs) + "\n]",
    ]
    if batching:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _note(
    batching: bool, unbatched: list[str], capped: tuple[int, str] | bool, asked: int
) -> str | None:
    if capped:
        limit, flag = capped  # type: ignore[misc]
        return (
            f"dynamic batching of at most {limit} rows: max_batch_size capped from "
            f"--triton-max-batch {asked} to the graph's largest batch ({flag} {limit})"
        )
    if batching:
        return None
    if unbatched:
        verb = "has" if len(unbatched) == 1 else "have"
        names = ", ".join(n if n.isprintable() else repr(n) for n in unbatched)
        return f"no dynamic batching: {names} {verb} no leading batch axis"
    return "no dynamic batching: --triton-max-batch 0"
