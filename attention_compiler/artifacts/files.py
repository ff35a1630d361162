"""The files of an output folder: model.onnx (with its external data past 2 GB), manifest.json, and
their records; output_folders.py makes the folder appear whole."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx

from attention_compiler.artifacts.output_folders import WRITTEN_BY, umask

PROTOBUF_LIMIT = 2**31  # bytes: protobuf cannot serialise a message this large
GRAPH_HEADROOM = 2**24  # bytes kept for everything in the graph but its weights
EXTERNAL_DATA = "model.onnx.data"


def file_records(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of files already written, read back in chunks (model data may pass 2 GB)."""
    records = {}
    for name in names:
        with open(folder / name, "rb") as f:
            records[name] = {
                "sha256": hashlib.file_digest(f, "sha256").hexdigest(),
                "bytes": os.fstat(f.fileno()).st_size,
            }
    return records


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers as they would be stored."""
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for d in t.dims:
                size *= d
            total += size
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True once the weights no longer fit in one protobuf message beside the graph."""
    return weight_bytes(model) > PROTOBUF_LIMIT - GRAPH_HEADROOM


def save_model(model: onnx.ModelProto, folder: Path, *, external: bool) -> list[str]:
    """Write ``folder/model.onnx``, with every tensor of 1 KiB or more in ``model.onnx.data`` when
    ``external``; returns the names written. ``model`` loses its in-memory weights when external."""
    path = folder / "model.onnx"
    if not external:
        write_file(path, model.SerializeToString())
        return ["model.onnx"]
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA,
        size_threshold=1024,
    )
    names = ["model.onnx"] + ([EXTERNAL_DATA] if (folder / EXTERNAL_DATA).exists() else [])
    for name in names:
        (folder / name).chmod(
            0o666 & ~umask()
        )  # onnx creates the data file private; the artifact is not
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    return names


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """manifest.json, marked as this tool's so that a later --force recognises the folder."""
    marked = {"written_by": WRITTEN_BY, **manifest}
    write_file(
        folder / "manifest.json", (json.dumps(marked, indent=2, sort_keys=False) + "\n").encode()
    )


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
