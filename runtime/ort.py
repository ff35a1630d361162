"""ONNX Runtime backend."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from runtime.session import Session
from runtime.signature import InputSpec, input_specs


class OrtSession(Session):
    def __init__(self, model: onnx.ModelProto | str | os.PathLike[str],
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model), load_external_data=False)
        self._inputs = input_specs(proto)
        source = proto.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
        self._session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
        self._outputs = [o.name for o in self._session.get_outputs()]

    @property
    def inputs(self) -> list[InputSpec]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, dict(feeds))))
