"""Reading a state_dict file that may be hostile: every key, dtype and shape it declares is checked
against what the spec expects, and every size against the file, before any tensor data is read or
decompressed; so a small file that declares gigabytes is refused in milliseconds.

- ``.safetensors``: the JSON header is read and checked (bounded size, offsets inside the file and
  matching each tensor's dtype and shape, no bytes unaccounted for); then safetensors reads the data.
- ``.npz``: the zip directory and each member's .npy header (a few hundred bytes, decompressed
  alone) are checked, and the declared sizes against the spec, before a member is read whole;
  ``allow_pickle=False`` throughout.
- ``.pt``: the archive's declared sizes are checked against the spec before
  ``torch.load(weights_only=True)``, which runs no code; the tensors it returns must then be dense,
  on no special device, and of a float dtype.

One rule for every format: float16, bfloat16, float32 or float64 tensors. Integer, bool, complex and
float8 tensors are refused: casting them would compute something other than the trained module.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SAFETENSORS_DTYPES = {
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
}
# bytes of safetensors JSON header or .npy header; a state_dict needs a few KiB
HEADER_LIMIT = 8 * 2**20
ARCHIVE_ALLOWANCE = 2**20  # bytes a .pt may hold beyond its tensors (the pickle, version records)


class WeightsError(ValueError):
    """Weights that do not fit the spec, or a file that cannot be read as weights."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(k[:80]) for k in keys[:8]) + (
        f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    )
    return ("key " if len(keys) == 1 else "keys ") + shown


def check_keys(
    expected: Mapping[str, tuple[int, ...]], keys: list[str], owner: str, hint: str
) -> None:
    """WeightsError unless ``keys`` are exactly the expected ones."""
    missing = [k for k in expected if k not in keys]
    if missing:
        raise WeightsError(
            f"weights are missing {_names(missing)} that {owner} has for this spec"
            f" (expected keys: {', '.join(expected)})"
        )
    extra = sorted(k for k in keys if k not in expected)
    if extra:
        raise WeightsError(
            f"weights hold unexpected {_names(extra)}; this spec takes exactly {', '.join(expected)} ({hint})"
        )


def check_dtype(key: str, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise WeightsError(
            f"weight {key!r} has dtype {dtype}, expected a floating-point tensor ({', '.join(FLOAT_DTYPES)})"
        )


def check_shape(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise WeightsError(
            f"weight {key!r} has shape {tuple(shape)}, expected {tuple(expected)} for this spec"
        )


def read_state_dict(
    path: str | os.PathLike[str], expected: Mapping[str, tuple[int, ...]], owner: str, hint: str
) -> dict[str, Any]:
    """The ``expected`` tensors of a .safetensors, .npz or .pt file, every declaration checked first."""
    path = Path(path)
    readers = {
        ".safetensors": _read_safetensors,
        ".npz": _read_npz,
        ".pt": _read_torch,
        ".pth": _read_torch,
    }
    if path.suffix.lower() not in readers:
        raise WeightsError(
            f"weights file {str(path)!r} has an unknown type; expected .safetensors, .npz or .pt"
        )
    try:
        info = path.stat()
    except OSError:
        raise WeightsError(f"weights file {str(path)!r} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise WeightsError(
            f"weights file {str(path)!r} is not a regular file (a folder, a FIFO or a device)"
        )
    return readers[path.suffix.lower()](path, info.st_size, expected, owner, hint)


def _nbytes(shape: tuple[int, ...], itemsize: int) -> int:
    return math.prod(shape) * itemsize


# safetensors --------------------------------------------------------------------------------------


def _read_safetensors(
    path: Path, size: int, expected: Mapping[str, tuple[int, ...]], owner: str, hint: str
) -> dict[str, Any]:
    bad = _safetensors_error(path)
    header, length = _safetensors_header(path, size)
    check_keys(expected, list(header), owner, hint)
    data_size = size - 8 - length
    spans = sorted(
        _safetensors_span(key, header[key], shape, data_size, bad)
        for key, shape in expected.items()
    )
    if sum(e - b for b, e in spans) != data_size or any(
        b < e0 for (_, e0), (b, _) in zip(spans, spans[1:])
    ):
        raise bad(f"its tensors do not cover its {data_size} bytes of data exactly once")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: f.get_tensor(key) for key in expected}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise bad(first_line(exc)) from exc


def _safetensors_error(path: Path) -> Callable[[str], WeightsError]:
    def bad(why: str) -> WeightsError:
        return WeightsError(
            f"weights file {str(path)!r} is not a readable safetensors file ({why})"
        )

    return bad


def _safetensors_header(path: Path, size: int) -> tuple[dict[str, Any], int]:
    """The header's tensors (its metadata dropped) and its length, read within HEADER_LIMIT."""
    bad = _safetensors_error(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(HEADER_LIMIT, size - 8):
            raise bad(
                f"its header declares {length} bytes, more than the file's {size - 8} or the "
                f"{HEADER_LIMIT}-byte limit"
            )
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as exc:
            raise bad(f"its header is not JSON: {first_line(exc)[:100]}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, length


def _safetensors_span(
    key: str,
    entry: Any,
    shape: tuple[int, ...],
    data_size: int,
    bad: Callable[[str], WeightsError],
) -> tuple[int, int]:
    """The bytes one tensor's header entry declares, checked against its dtype and shape."""
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and _int_list(entry.get("shape"))
        and _int_list(entry.get("data_offsets"))
        and len(entry["data_offsets"]) == 2
    ):
        raise bad(f"tensor {key!r} lacks a dtype, a shape or two data_offsets")
    dtype = entry["dtype"]
    if dtype not in _SAFETENSORS_DTYPES:
        named = {"BOOL": "bool", "C64": "complex64", "C128": "complex128"}
        check_dtype(key, named.get(dtype, dtype.lower()))
    check_shape(key, tuple(entry["shape"]), shape)
    begin, end = entry["data_offsets"]
    needed = _nbytes(shape, _SAFETENSORS_DTYPES[dtype][1])
    if not 0 <= begin <= end <= data_size or end - begin != needed:
        raise bad(
            f"tensor {key!r} declares bytes {begin} to {end}, but its dtype and shape need "
            f"{needed} within the file's {data_size} bytes of data"
        )
    return begin, end


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


# npz ----------------------------------------------------------------------------------------------


def _read_npz(
    path: Path, size: int, expected: Mapping[str, tuple[int, ...]], owner: str, hint: str
) -> dict[str, Any]:
    def bad(why: str) -> WeightsError:
        return WeightsError(
            f"weights file {str(path)!r} is not a readable .npz archive of arrays ({why})"
        )

    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            if len(members) != len(archive.infolist()):
                raise bad("two members share a name")
            check_keys(expected, list(members), owner, hint)
            for key, shape in expected.items():
                info = members[key]
                if info.file_size > _nbytes(shape, 8) + HEADER_LIMIT:
                    raise bad(
                        f"member {key!r} declares {info.file_size} bytes, more than a {shape} tensor needs"
                    )
                with archive.open(info) as f:
                    dtype = _npy_header(f, key, shape, bad)
                    if info.file_size != f.tell() + _nbytes(shape, dtype.itemsize):
                        raise bad(
                            f"member {key!r} declares {info.file_size} bytes, but its header says "
                            f"{f.tell() + _nbytes(shape, dtype.itemsize)}"
                        )
            state = {}
            for key in expected:
                with archive.open(members[key]) as f:
                    state[key] = np.lib.format.read_array(f, allow_pickle=False)
            return state
    except _ZIP_ERRORS as exc:
        if isinstance(exc, WeightsError):
            raise
        raise bad(first_line(exc)) from exc


# What zipfile and zlib raise for a damaged archive: a bad header, a bad stream, a wrong CRC, an
# encrypted or unknown-compression member, a size field past what Python can seek.
_ZIP_ERRORS = (
    OSError,
    ValueError,
    zipfile.BadZipFile,
    EOFError,
    RuntimeError,
    NotImplementedError,
    zlib.error,
    struct.error,
    OverflowError,
)


def _npy_header(f: Any, key: str, shape: tuple[int, ...], bad: Any) -> np.dtype:
    """The dtype of a .npy stream, its declared shape and dtype checked; reads the header only."""
    version = np.lib.format.read_magic(f)
    read = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read is None:
        raise bad(f"member {key!r} has .npy version {version}")
    declared, _, dtype = read(f, max_header_size=HEADER_LIMIT)
    if dtype.hasobject:
        raise WeightsError(
            f"weight {key!r} holds Python objects (a pickle, which is never loaded); expected a "
            f"floating-point tensor ({', '.join(FLOAT_DTYPES)})"
        )
    check_dtype(key, dtype.name)
    check_shape(key, declared, shape)
    return dtype


# torch ------------------------------------------------------------------------------------------


def _read_torch(
    path: Path, size: int, expected: Mapping[str, tuple[int, ...]], owner: str, hint: str
) -> dict[str, Any]:
    limit = sum(_nbytes(s, 8) for s in expected.values()) + ARCHIVE_ALLOWANCE
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        else:
            declared = size  # torch's legacy format: one pickle stream, no larger than the file
    except _ZIP_ERRORS as exc:
        raise WeightsError(
            f"weights file {str(path)!r} could not be loaded with torch.load(weights_only=True): "
            f"{first_line(exc)}"
        ) from exc
    if declared > limit:
        raise WeightsError(
            f"weights file {str(path)!r} declares {declared} bytes, more than the {limit} that this "
            "spec's tensors need even in float64; save only this module's state_dict"
        )
    try:
        import torch
    except ImportError as exc:
        raise WeightsError(
            f"reading {str(path)!r} needs torch; install the 'torch' extra or save the weights as "
            ".safetensors"
        ) from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(
            f"weights file {str(path)!r} could not be loaded with torch.load(weights_only=True): "
            f"{first_line(exc)}"
        ) from exc
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"weights file {str(path)!r} holds a {type(state).__name__}, expected a state_dict of tensors"
        )
    check_keys(expected, [str(k) for k in state], owner, hint)
    tensors = {}
    for key, shape in expected.items():
        tensors[key] = torch_array(key, state[key], shape)
    return tensors


def torch_array(key: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A dense float torch tensor as a float64 array; WeightsError for anything else."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"weight {key!r} is a {type(value).__name__}, expected a tensor")
    kind = (
        "a sparse"
        if value.layout != torch.strided
        else "a quantized"
        if value.is_quantized
        else "a meta (data-less)"
        if value.is_meta
        else None
    )
    if kind is not None:
        raise WeightsError(
            f"weight {key!r} is {kind} tensor, expected a dense floating-point tensor"
        )
    check_dtype(key, str(value.dtype).removeprefix("torch."))
    check_shape(key, tuple(value.shape), shape)
    return value.detach().to("cpu").double().numpy()
