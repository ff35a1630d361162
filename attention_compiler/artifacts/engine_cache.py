"""Where built TensorRT engines and timing caches are kept, so an unchanged model is never rebuilt.

An engine is valid only for the exact ONNX, TensorRT version, GPU, profile and build settings it
was built with; the key hashes all of them, so any change is a miss rather than a wrong engine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from attention_compiler.artifacts.output_folders import write_file_atomically

ENV = "ATTENTION_COMPILER_CACHE"


def default_root() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "attention-compiler" / "tensorrt")


class EngineCache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def engine_path(self, key: str) -> Path:
        return self.root / f"{key}.engine"

    def timing_cache_path(self, tensorrt_version: str, gpu: str) -> Path:
        """One timing cache per TensorRT version and GPU: its entries are per-kernel, shared by every model."""
        return self.root / f"timing-{tensorrt_version}-{re.sub(r'[^A-Za-z0-9.]+', '_', gpu)}.cache"

    def load(self, key: str) -> bytes | None:
        try:
            return self.engine_path(key).read_bytes()
        except FileNotFoundError:
            return None

    def store(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` under the cache root whole or not at all (concurrent builds may race)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, data)
