"""Writing an output folder whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx

PROTOBUF_LIMIT = 2**31  # bytes: protobuf cannot serialise a message this large
GRAPH_HEADROOM = 2**24  # bytes kept for everything in the graph but its weights
EXTERNAL_DATA = "model.onnx.data"


class ArtifactError(OSError):
    """The output folder cannot be written as asked."""


def file_records(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of files already written, read back in chunks (model data may pass 2 GB)."""
    records = {}
    for name in names:
        with open(folder / name, "rb") as f:
            records[name] = {"sha256": hashlib.file_digest(f, "sha256").hexdigest(), "bytes": os.fstat(f.fileno()).st_size}
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
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA,
                    size_threshold=1024)
    names = ["model.onnx"] + ([EXTERNAL_DATA] if (folder / EXTERNAL_DATA).exists() else [])
    for name in names:
        (folder / name).chmod(0o666 & ~_umask())  # onnx creates the data file private; the artifact is not
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    return names


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed into place when the block completes and removed
    when it raises, so ``out`` is never seen half-written.

    An existing non-empty ``out`` is refused unless ``force``; with ``force`` it is replaced only
    once the new folder is complete. Without ``force`` the final rename is the check, so of two runs
    into one folder exactly one wins and the other's files are removed, never mixed in.
    """
    out = Path(out).absolute()
    check_writable(out, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the artifact is not
    except OSError as exc:
        raise ArtifactError(f"cannot create a folder beside {str(out)!r}: {exc.strerror or exc}") from exc
    try:
        yield staging
        _replace(staging, out, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_directory(out: str | os.PathLike[str], files: Mapping[str, bytes | Path], manifest: Mapping[str, Any] | None,
                    *, force: bool = False) -> Path:
    """Write ``files`` (bytes, or a file to copy) and ``manifest.json`` (unless None) into ``out``, whole or not at all."""
    with staged_directory(out, force=force) as staging:
        for name, data in files.items():  # a name may hold subfolders: "attention/1/model.onnx"
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, Path):
                shutil.copyfile(data, staging / name)
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
            else:
                write_file(staging / name, data)
        if manifest is not None:
            write_manifest(staging, manifest)
    return Path(out).absolute()


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    write_file(folder / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())


def check_writable(out: str | os.PathLike[str], *, force: bool = False) -> None:
    """Refuse an existing non-empty ``out`` unless ``force``: called before any work is written."""
    out = Path(out).absolute()
    if out.exists() and not force:
        if not out.is_dir():
            raise ArtifactError(f"output path {str(out)!r} exists and is not a folder")
        if any(out.iterdir()):
            raise ArtifactError(f"output folder {str(out)!r} already exists and is not empty; pass --force to replace it")


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(staging: Path, out: Path, *, force: bool) -> None:
    old = None
    if force and out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
    try:
        os.rename(staging, out)  # atomic; refused when out is a non-empty folder (another run's)
    except OSError as exc:
        kept = ""
        if old is not None:
            try:
                os.replace(old / out.name, out)
            except OSError:
                kept = f"; the folder it replaced is kept at {str(old / out.name)!r}"
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise ArtifactError(f"output folder {str(out)!r} was written by another run while this one worked; "
                                f"this run's files were discarded{kept}") from exc
        raise ArtifactError(f"cannot move the finished output into {str(out)!r}: {exc.strerror or exc}{kept}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
