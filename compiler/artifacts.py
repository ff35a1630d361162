"""Writing an output folder whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ArtifactError(OSError):
    """The output folder cannot be written as asked."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_records(files: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()}


def write_directory(out: str | os.PathLike[str], files: Mapping[str, bytes], manifest: Mapping[str, Any] | None,
                    *, force: bool = False) -> Path:
    """Write ``files`` (and ``manifest.json`` unless None) into a temporary folder beside ``out``, then rename it into place.

    An existing non-empty ``out`` is refused unless ``force``; with ``force`` it is replaced only
    once the new folder is complete.
    """
    out = Path(out).absolute()
    check_writable(out, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is not
    except OSError as exc:
        raise ArtifactError(f"cannot create a folder beside {str(out)!r}: {exc.strerror or exc}") from exc
    try:
        for name, data in files.items():  # a name may hold subfolders: "attention/1/model.onnx"
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            _write(staging / name, data)
        if manifest is not None:
            _write(staging / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_writable(out: str | os.PathLike[str], *, force: bool = False) -> None:
    """Refuse an existing non-empty ``out`` unless ``force``: called before any work is written."""
    out = Path(out).absolute()
    if out.exists() and not force:
        if not out.is_dir():
            raise ArtifactError(f"output path {str(out)!r} exists and is not a folder")
        if any(out.iterdir()):
            raise ArtifactError(f"output folder {str(out)!r} already exists and is not empty; pass --force to replace it")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(staging: Path, out: Path) -> None:
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
    try:
        os.rename(staging, out)
    except OSError as exc:
        if old is not None:
            os.replace(old / out.name, out)
        raise ArtifactError(f"cannot move the finished output into {str(out)!r}: {exc.strerror or exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
