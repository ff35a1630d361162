"""The element types the project's graphs take, in each vocabulary it meets them in: ONNX's enum,
NumPy's dtype, ONNX Runtime's type string, Triton's config name. One row per type, so the four
views cannot drift apart."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx


class ElementType(NamedTuple):
    onnx: int
    numpy: np.dtype
    ort: str
    triton: str


ELEMENT_TYPES = (
    ElementType(onnx.TensorProto.FLOAT, np.dtype(np.float32), "tensor(float)", "TYPE_FP32"),
    ElementType(onnx.TensorProto.FLOAT16, np.dtype(np.float16), "tensor(float16)", "TYPE_FP16"),
    ElementType(onnx.TensorProto.DOUBLE, np.dtype(np.float64), "tensor(double)", "TYPE_FP64"),
    ElementType(onnx.TensorProto.BOOL, np.dtype(np.bool_), "tensor(bool)", "TYPE_BOOL"),
    ElementType(onnx.TensorProto.INT32, np.dtype(np.int32), "tensor(int32)", "TYPE_INT32"),
    ElementType(onnx.TensorProto.INT64, np.dtype(np.int64), "tensor(int64)", "TYPE_INT64"),
    ElementType(onnx.TensorProto.INT8, np.dtype(np.int8), "tensor(int8)", "TYPE_INT8"),
    ElementType(onnx.TensorProto.INT16, np.dtype(np.int16), "tensor(int16)", "TYPE_INT16"),
    ElementType(onnx.TensorProto.UINT8, np.dtype(np.uint8), "tensor(uint8)", "TYPE_UINT8"),
    ElementType(onnx.TensorProto.UINT16, np.dtype(np.uint16), "tensor(uint16)", "TYPE_UINT16"),
    ElementType(onnx.TensorProto.UINT32, np.dtype(np.uint32), "tensor(uint32)", "TYPE_UINT32"),
    ElementType(onnx.TensorProto.UINT64, np.dtype(np.uint64), "tensor(uint64)", "TYPE_UINT64"),
)
BY_ONNX = {t.onnx: t for t in ELEMENT_TYPES}
BY_ORT = {t.ort: t for t in ELEMENT_TYPES}
BY_NUMPY = {t.numpy: t for t in ELEMENT_TYPES}
