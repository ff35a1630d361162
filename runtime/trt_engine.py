"""Native TensorRT: build an engine from the tensorrt target's ONNX (cached), and run it.

Written against TensorRT 10's Python API (named tensors, ``execute_async_v3``, ``IProgressMonitor``).
Device buffers and the stream come from torch, which every GPU user of this project has.
fp32 engines are built with TF32 off: TensorRT enables it by default, and its 10-bit mantissa
would break the float32 contract the check holds the engine to.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.profiles import Profile, check_in_profile
from runtime.session import BackendUnavailable, Session
from runtime.signature import InputSpec, torch_dtype


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build an engine from it; the message carries its errors."""


def tensorrt_unavailable() -> str | None:
    """Why no engine can be built or run here, or None when TensorRT and a CUDA GPU are both present."""
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return "the tensorrt package is not installed (pip install -e '.[tensorrt]', on a machine with an NVIDIA GPU)"
    try:
        import torch
    except ImportError:
        return "torch is not installed; the TensorRT runner takes its CUDA buffers and stream from torch (pip install torch)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def gpu_name() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


@dataclass(frozen=True)
class EngineInfo:
    key: str
    path: Path
    from_cache: bool
    tensorrt: str
    gpu: str
    timing_cache: Path
    build_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "cache_key": self.key,
            "cached_engine": str(self.path),
            "from_cache": self.from_cache,
            "tensorrt": self.tensorrt,
            "gpu": self.gpu,
            "timing_cache": str(self.timing_cache),
            "build_seconds": self.build_seconds,
        }


def engine_key(
    model_sha256: Mapping[str, str],
    tensorrt_version: str,
    gpu: str,
    profile: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> str:
    """sha256 over everything an engine depends on: the model files' hashes, TensorRT's version, the
    GPU's name (with its compute capability), the profile and the build settings (precision, flags)."""
    described = {
        "model": dict(sorted(model_sha256.items())),
        "tensorrt": tensorrt_version,
        "gpu": gpu,
        "profile": profile,
        "settings": dict(settings),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class EngineCache(Protocol):
    """Where engine_for keeps built engines and timing caches (artifacts.engine_cache.EngineCache)."""

    def engine_path(self, key: str) -> Path: ...
    def timing_cache_path(self, tensorrt_version: str, gpu: str) -> Path: ...
    def load(self, key: str) -> bytes | None: ...
    def store(self, path: Path, data: bytes) -> None: ...


def engine_for(
    onnx_path: Path,
    model_sha256: Mapping[str, str],
    profile: Profile,
    precision: str,
    cache: EngineCache,
    *,
    phase: Callable[[str], None] | None = None,
) -> tuple[bytes, EngineInfo]:
    """The engine for this ONNX, profile and precision on this GPU: from the cache when an identical
    build exists, else built (timing cache read and updated) and stored in the cache."""
    reason = tensorrt_unavailable()
    if reason:
        raise BackendUnavailable(reason)
    import time

    import tensorrt as trt

    gpu = gpu_name()
    settings = {"precision": precision, "tf32": False}
    key = engine_key(model_sha256, trt.__version__, gpu, profile.to_json(), settings)
    timing = cache.timing_cache_path(trt.__version__, gpu)
    cached = cache.load(key)
    if cached is not None:
        return cached, EngineInfo(
            key, cache.engine_path(key), True, trt.__version__, gpu, timing, 0.0
        )
    start = time.perf_counter()
    engine = build_engine(
        onnx_path, profile, precision, timing_cache=timing, cache=cache, phase=phase
    )
    cache.store(cache.engine_path(key), engine)
    return engine, EngineInfo(
        key,
        cache.engine_path(key),
        False,
        trt.__version__,
        gpu,
        timing,
        time.perf_counter() - start,
    )


def build_engine(
    onnx_path: Path,
    profile: Profile,
    precision: str,
    *,
    timing_cache: Path,
    cache: EngineCache,
    phase: Callable[[str], None] | None = None,
) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # explicit batch is the only mode in TensorRT 10; an int8 graph's Q/DQ pairs are explicit
    # quantization, which TensorRT's documentation builds as a strongly typed network: each tensor
    # takes the graph's own type (int8 between Q and DQ, float32 elsewhere), no precision flags
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed if precision == "int8" else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(
        os.fspath(onnx_path)
    ):  # from the file, so external data beside it is found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}"
        )
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    config.clear_flag(trt.BuilderFlag.TF32)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    known = timing_cache.read_bytes() if timing_cache.exists() else b""
    config.set_timing_cache(
        config.create_timing_cache(known), False
    )  # False: a cache made on another device is not used
    if phase is not None:
        monitor = _monitor(trt, phase)
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} "
            "(its log above says why)"
        )
    cache.store(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _monitor(trt: Any, phase: Callable[[str], None]) -> Any:
    class Monitor(trt.IProgressMonitor):
        """Reports the build's top-level phases; never cancels."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                phase(f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


class TensorRTSession(Session):
    """Runs a serialized engine. NumPy in, NumPy out (copied through the GPU); torch CUDA tensors in,
    torch CUDA tensors out, bound in place. Shapes outside the engine's profile are refused first."""

    def __init__(
        self, engine: bytes, inputs: list[InputSpec], profile: Profile | None = None
    ) -> None:
        reason = tensorrt_unavailable()
        if reason:
            raise BackendUnavailable(reason)
        import tensorrt as trt

        self._trt = trt
        self._inputs = inputs
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        if self._engine is None:
            raise EngineBuildError(
                "TensorRT could not load this engine (built by another TensorRT version or GPU?)"
            )
        self._context = self._engine.create_execution_context()
        # one execution context: its shapes and addresses are per call
        self._lock = threading.Lock()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]
        self._profile = profile or self._built_profile()

    def _built_profile(self) -> Profile:
        """The engine's own profile 0, so a session needs no more than the engine and the graph's inputs."""
        shapes = {}
        for s in self._inputs:
            if all(isinstance(d, int) for d in s.shape):
                shapes[s.name] = (tuple(s.shape),) * 3
            else:
                shapes[s.name] = tuple(
                    tuple(x) for x in self._engine.get_tensor_profile_shape(s.name, 0)
                )
        return Profile(shapes)  # type: ignore[arg-type]

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        check_in_profile(self._inputs, self._profile, {k: tuple(v.shape) for k, v in feeds.items()})
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in feeds.items()}
        return {k: v.cpu().numpy() for k, v in self._execute(tensors).items()}

    def _run_torch(self, feeds: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
        check_in_profile(self._inputs, self._profile, {k: tuple(v.shape) for k, v in feeds.items()})
        if next(iter(feeds.values())).device.type != "cuda":
            return super()._run_torch(feeds, sizes)
        return self._execute(feeds)

    def _execute(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One call at a time: threads sharing the session wait for each other."""
        with self._lock:
            return self._execute_alone(feeds)

    def _execute_alone(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        trt = self._trt
        kept = {name: value.contiguous() for name, value in feeds.items()}
        for name, value in kept.items():
            self._context.set_input_shape(name, tuple(value.shape))
            self._context.set_tensor_address(name, value.data_ptr())
        device = next(iter(kept.values())).device
        outputs = {}
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = torch_dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            outputs[name] = torch.empty(shape, dtype=dtype, device=device)
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("TensorRT's execute_async_v3 failed (its log above says why)")
        stream.synchronize()
        return outputs
