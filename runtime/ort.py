"""ONNX Runtime backend: the CPU, CUDA and TensorRT execution providers.

On a GPU provider, torch CUDA tensors are bound in place through IO binding and the outputs are
written straight into torch CUDA tensors, so nothing crosses to the host on a call; NumPy inputs
are copied to the device and back by ONNX Runtime, as ``run`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphs.dtypes import BY_ORT
from runtime.profiles import Profile
from runtime.session import BackendUnavailable, Session
from runtime.signature import declared_maxima, dtype_of, input_specs, resolve_shape, torch_dtype

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
PROVIDERS = {  # by device, in priority order; the CPU provider runs what the others leave
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def tensorrt_provider_options(
    profile: Profile, precision: str, cache_root: str | os.PathLike[str]
) -> dict[str, Any]:
    """ONNX Runtime TensorRT provider options for the same profile, precision and caches as the native
    engine (its profile shapes take trtexec's spelling), so that provider does not rebuild per shape."""
    shapes = profile.trtexec()
    return {
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": os.path.join(os.fspath(cache_root), "onnxruntime"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": os.path.join(os.fspath(cache_root), "onnxruntime"),
        "trt_profile_min_shapes": shapes["min"],
        "trt_profile_opt_shapes": shapes["opt"],
        "trt_profile_max_shapes": shapes["max"],
    }


def check_providers(providers: Sequence[str]) -> None:
    """Raise BackendUnavailable, saying how to get it, for a provider this onnxruntime lacks."""
    available = ort.get_available_providers()
    for provider in providers:
        if provider not in available:
            hint = (
                "install onnxruntime-gpu in place of onnxruntime (pip uninstall -y onnxruntime && "
                "pip install -e '.[gpu]') on a machine with CUDA"
                if provider in GPU_PROVIDERS
                else ""
            )
            if provider == "TensorrtExecutionProvider":
                hint += ", and TensorRT's libraries (pip install -e '.[tensorrt]')"
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} has no {provider} (it has {', '.join(available)})"
                + (f"; {hint}" if hint else "")
            )


class OrtSession(Session):
    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike[str],
        providers: Sequence[str] = PROVIDERS["cpu"],
        options: ort.SessionOptions | None = None,
        provider_options: Sequence[Mapping[str, Any]] | None = None,
        *,
        maxima: bool = True,
        quiet: bool = False,
    ) -> None:
        """``maxima``: refuse inputs past the largest batch and length the model declares (compile.py
        --max-batch/--max-len); False for a check at shapes of its own. ``quiet``: a run that fails
        raises without ONNX Runtime also logging it (the caller says what failed, in one line)."""
        check_providers(providers)
        proto = (
            model
            if isinstance(model, onnx.ModelProto)
            else onnx.load(os.fspath(model), load_external_data=False)
        )
        self._inputs = input_specs(proto)
        self._optional = input_specs(proto, overridable=True)
        self._maxima = declared_maxima(proto) if maxima else {}
        source = (
            proto.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
        )
        self._session = ort.InferenceSession(
            source,
            sess_options=options,
            providers=list(providers),
            provider_options=[dict(o) for o in provider_options] if provider_options else None,
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._output_meta = {
            o.name: (o.shape, BY_ORT[o.type].numpy.type if o.type in BY_ORT else None)
            for o in self._session.get_outputs()
        }
        self.on_gpu = providers[0] in GPU_PROVIDERS
        self._run_options = None
        if quiet:
            self._run_options = ort.RunOptions()
            self._run_options.log_severity_level = 4  # fatal only

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._session.run(self._outputs, dict(feeds), self._run_options)
        return dict(zip(self._outputs, outputs))

    def io_binding(self) -> ort.IOBinding:
        """An IO binding on this session, for callers that keep outputs on a device between runs
        (runtime/generation.py feeds present back as past)."""
        return self._session.io_binding()

    def run_with_iobinding(self, binding: ort.IOBinding) -> None:
        self._session.run_with_iobinding(binding)

    def _run_torch(self, feeds: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
        device = next(iter(feeds.values())).device
        if not self.on_gpu or device.type != "cuda":
            return super()._run_torch(feeds, sizes)
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        binding = self._session.io_binding()
        kept = {
            name: value.contiguous() for name, value in feeds.items()
        }  # alive until the run ends
        for name, value in kept.items():
            binding.bind_input(
                name, "cuda", index, dtype_of(value), tuple(value.shape), value.data_ptr()
            )
        outputs: dict[str, Any] = {}
        for name in self._outputs:
            declared, dtype = self._output_meta[name]
            shape = resolve_shape(
                [d if isinstance(d, (int, str)) else None for d in declared], sizes
            )
            if (
                shape is None or dtype is None
            ):  # a shape the inputs do not fix: ONNX Runtime allocates it
                binding.bind_output(name, "cuda", index)
                continue
            outputs[name] = torch.empty(shape, dtype=torch_dtype(dtype), device=device)
            binding.bind_output(name, "cuda", index, dtype, shape, outputs[name].data_ptr())
        torch.cuda.synchronize(
            device
        )  # the inputs' producers are done before ONNX Runtime's stream reads them
        self._session.run_with_iobinding(binding)
        if len(outputs) < len(self._outputs):
            copied = dict(zip(self._outputs, binding.copy_outputs_to_cpu()))
            outputs.update(
                {
                    n: torch.from_numpy(copied[n]).to(device)
                    for n in self._outputs
                    if n not in outputs
                }
            )
        return {name: outputs[name] for name in self._outputs}
