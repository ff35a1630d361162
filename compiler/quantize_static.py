"""int8 with calibrated activation scales: QuantizeLinear/DequantizeLinear (QDQ) around each
constant-weight MatMul's inputs, the form TensorRT's explicit quantization consumes and ONNX
Runtime fuses into integer MatMuls.

``onnxruntime.quantization.quantize_static`` places the Q/DQ pairs and its calibrators (MinMax,
Percentile, Entropy) choose the activation scales from the calibration inputs, run through the
float graph once (their ranges are cached, so that quantizing again with other layers kept float32
costs no second calibration). Only the MatMul inputs are quantized; their outputs stay float32,
as do the fused attention op, normalisations and residual sums. Two things are fixed after it:
- the quantizer hands every reader of a quantized activation the dequantized copy, so a residual
  sum that reads a LayerNorm's output beside the next projection would carry the quantization error
  on (relative error 9e-2 against 3e-3 on a two-layer BERT); those readers get the float tensor back;
- it writes the model through a file (calibration runs it in ONNX Runtime), in a temporary folder
  of its own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from compiler.quantize_int8 import REDUCE_RANGE

CALIBRATORS = ("minmax", "percentile", "entropy")
# the ops whose inputs get Q/DQ pairs (a Gemm as it is: the static quantizer does not make it MatMul)
STATIC_OPS = ("MatMul", "Gemm")


@dataclass
class Calibration:
    """Inputs of the graph to calibrate on (one feed each), the calibrator, and the ranges it found
    once it ran (kept in a folder of its own for as long as this object lives)."""

    feeds: Sequence[Mapping[str, np.ndarray]]
    method: str = "minmax"
    _folder: tempfile.TemporaryDirectory = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="attention-compiler-calib-"),
        repr=False,
    )

    def __post_init__(self) -> None:
        if self.method not in CALIBRATORS:
            raise ValueError(
                f"unknown calibration method {self.method!r}; choose one of {', '.join(CALIBRATORS)}"
            )
        if not self.feeds:
            raise ValueError("calibration needs at least one set of inputs")

    @property
    def cache(self) -> Path:
        return Path(self._folder.name) / "ranges.json"


class _Reader:
    """The calibration feeds as ``CalibrationDataReader`` hands them out, one range at a time: the
    histogram calibrators (percentile, entropy) stack what one collection sees into one array, so
    feeds of different lengths are collected one by one (the quantizer's ``CalibStridedMinMax``
    stride, which every calibrator takes)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], names: Collection[str]) -> None:
        self._feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
        self._next = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self._feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)


class StaticInt8Pass(ir.passes.FunctionalPass):
    """Calibrated QDQ int8 on the constant-weight MatMuls and Gemms named in ``nodes`` (the
    quantizer's MatMulConstBOnly holds only in its dynamic mode: an unfused core's score and
    context MatMuls, whose softmax one int8 scale cannot hold, would be quantized too).
    ``symmetric``: int8 activations with zero point 0 and weights in the full 8 bits, as TensorRT
    takes them; otherwise uint8 activations and 7-bit weights, ONNX Runtime's CPU form."""

    def __init__(
        self, calibration: Calibration, nodes: Collection[str], symmetric: bool = False
    ) -> None:
        super().__init__()
        self.calibration, self.symmetric = calibration, symmetric
        self.nodes = sorted(nodes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        methods = dict(zip(CALIBRATORS, ("MinMax", "Percentile", "Entropy")))
        proto = ir.serde.serialize_model(model)
        names = {i.name for i in proto.graph.input}
        with (
            tempfile.TemporaryDirectory(prefix="attention-compiler-qdq-") as folder,
            _without_advice(),
            contextlib.redirect_stdout(io.StringIO()),  # the calibrators print their progress
        ):
            out = Path(folder) / "model.onnx"
            quantize_static(
                proto,
                out,
                _Reader(self.calibration.feeds, names),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(STATIC_OPS),
                per_channel=True,
                reduce_range=REDUCE_RANGE and not self.symmetric,
                activation_type=QuantType.QInt8 if self.symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=self.nodes,
                calibrate_method=getattr(CalibrationMethod, methods[self.calibration.method]),
                extra_options={
                    "MatMulConstBOnly": True,
                    "ActivationSymmetric": self.symmetric,
                    "WeightSymmetric": True,
                    "OpTypesToExcludeOutputQuantization": list(STATIC_OPS),
                    "CalibStridedMinMax": 1,
                },
                calibration_cache_path=self.calibration.cache,
            )
            quantized = ir.serde.deserialize_model(onnx.load(out))
        quantized.metadata_props.pop("onnx.infer", None)
        _float_to_float_readers(quantized.graph)
        return ir.passes.PassResult(quantized, True)


@contextlib.contextmanager
def _without_advice() -> Iterator[None]:
    """The quantizer's root-logger advice to run its pre-processing (shape inference and
    optimisation the target's passes have done) kept off the user's console."""
    root = logging.getLogger()
    advice = logging.Filter()
    advice.filter = lambda record: "pre-process" not in record.getMessage()  # type: ignore[method-assign]
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _float_to_float_readers(graph: ir.Graph) -> None:
    """Every reader of a dequantized activation that is not a quantized op reads the float tensor."""
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or dq.inputs[0].producer() is None:
            continue
        q = dq.inputs[0].producer()
        if q.op_type != "QuantizeLinear":
            continue
        source = q.inputs[0]
        for user, index in list(dq.outputs[0].uses()):
            if user.op_type not in STATIC_OPS:
                user.replace_input_with(index, source)
