"""Reading an ONNX file someone gives us: bounded and confined to the model's folder before any
of its contents are trusted."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from graphs.weight_files import first_line


class IngestError(ValueError):
    """An ONNX file that cannot be read or is not safe to read."""


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The model at ``path``. Its external data is read only from regular files inside the model's
    folder, reached by one name (no hard link), and only once every tensor's offset and length are
    checked against its file and its own dtype and dims: a small file cannot declare gigabytes."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"ONNX file '{path}' does not exist or is not a regular file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a corrupt file
        raise IngestError(f"'{path}' is not a readable ONNX model ({type(exc).__name__})") from exc
    folder = path.resolve().parent
    for tensor in _tensors(model.graph):
        if uses_external_data(tensor):
            _check_external(path, folder, tensor)
    _check_declarations(path, model.graph)
    try:  # from the file: in memory with its external data, a model past 2 GB is too large for the checker
        # full_check: the types each op takes, as the compiled graph is checked before it is written
        onnx.checker.check_model(str(path), full_check=True)
    except (
        Exception
    ) as exc:  # ValidationError, InferenceError, or what the checker meets while describing damage
        raise IngestError(f"'{path}' is not a valid ONNX model: {first_line(exc)[:200]}") from exc
    load_external_data_for_model(model, str(folder))
    try:  # what the passes will read it as; onnx.checker lets some damage through (names that are not UTF-8)
        ir.serde.deserialize_model(model)
    except Exception as exc:  # onnx_ir raises SerdeError around the cause
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise IngestError(
            f"'{path}' is not a readable ONNX graph: {first_line(cause)[:200]}"
        ) from exc
    initializers = {t.name for t in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in initializers]:
        raise IngestError(
            f"'{path}' has no inputs: it computes a constant, so there is nothing to compile or check"
        )
    return model


def _check_declarations(path: Path, graph: onnx.GraphProto) -> None:
    """IngestError for what the checker lets through and the passes cannot take: a negative size in
    an input's or output's declared shape, a sparse initializer (onnx_ir reads none)."""
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    raise IngestError(
                        f"{kind} {value.name[:80]!r} of '{path}' declares size {dim.dim_value} on "
                        f"axis {axis}; a size is 0 or more, or a name for a dynamic axis"
                    )
    if graph.sparse_initializer:
        names = ", ".join(repr(t.values.name[:80]) for t in graph.sparse_initializer[:3])
        raise IngestError(
            f"'{path}' holds sparse initializers ({names}), which this compiler does not read; "
            "store them dense (onnx.numpy_helper.to_array of each, as an initializer) and compile that"
        )


_SUB_BYTE_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    getattr(onnx.TensorProto, "FLOAT4E2M1", -1): 4,
}


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dtype and dims need; None for a dtype without a fixed size (strings)."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[tensor.data_type] + 7) // 8
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return (
        None if itemsize == 0 or tensor.data_type == onnx.TensorProto.STRING else count * itemsize
    )


def _dtype_name(data_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def _check_external(path: Path, folder: Path, tensor: onnx.TensorProto) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")

    def refuse(why: str) -> IngestError:
        return IngestError(
            f"initializer '{tensor.name[:80]}' of '{path}' points at external data {location[:80]!r}, "
            f"{why}"
        )

    if not isinstance(location, str) or not location or "\0" in location:
        raise refuse("which is not a file name (empty, not UTF-8, or holding a NUL byte)")
    target = (folder / location).resolve()
    if not target.is_relative_to(folder) or not target.is_file():
        raise refuse("which is not a file inside the model's folder")
    info = target.stat()
    if info.st_nlink > 1:
        raise refuse(
            f"a file with {info.st_nlink} hard links; a hard link may reach a file outside the folder, so "
            "copy the data into the folder"
        )
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else info.st_size - offset
    except ValueError:
        raise refuse("with an offset or length that is not a number") from None
    needed = _tensor_bytes(tensor)
    if needed is None:
        raise refuse(
            f"but its dtype ({_dtype_name(tensor.data_type)}) has no fixed size to store there"
        )
    if offset < 0 or length < 0 or offset + length > info.st_size:
        raise refuse(
            f"declaring bytes {offset} to {offset + length}, past the end of its {info.st_size}-byte file"
        )
    if length != needed:
        raise refuse(
            f"declaring {length} bytes where its dtype and dims {list(tensor.dims)} need {needed}"
        )


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _tensors(sub)
