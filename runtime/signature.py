"""Input checks every backend runs before its run call, read from the model's declared inputs.

Symbolic axes bind on first sight and must agree afterwards; an axis named ``batch*8`` is the
product of ``batch`` and 8 (the 3-D attn_mask's leading axis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx


class InputError(ValueError):
    """An input does not fit the graph; the message names it, what was expected and what came."""


_DTYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.FLOAT16: np.dtype(np.float16),
           onnx.TensorProto.BOOL: np.dtype(np.bool_), onnx.TensorProto.INT64: np.dtype(np.int64),
           onnx.TensorProto.INT32: np.dtype(np.int32), onnx.TensorProto.DOUBLE: np.dtype(np.float64)}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tensor = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(InputSpec(vi.name, _DTYPES.get(tensor.elem_type, np.dtype(object)), dims))
    return specs


def check_inputs(specs: Sequence[InputSpec], feeds: Mapping[str, object]) -> None:
    names = [s.name for s in specs]
    for name in feeds:
        if name not in names:
            raise InputError(f"unexpected input {name!r}; this graph takes {', '.join(names)}")
    bound: dict[str, tuple[int, str]] = {}
    deferred: list[tuple[InputSpec, int, str, int]] = []
    for spec in specs:
        if spec.name not in feeds:
            raise InputError(f"missing input {spec.name!r}; this graph takes {', '.join(names)}")
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise InputError(f"input {spec.name!r} is a {type(value).__name__}, expected a numpy.ndarray of {spec.dtype}")
        if value.dtype != spec.dtype:
            raise InputError(f"input {spec.name!r} has dtype {value.dtype}, expected {spec.dtype}")
        if value.ndim != len(spec.shape):
            raise InputError(f"input {spec.name!r} has rank {value.ndim} (shape {value.shape}), expected rank {len(spec.shape)} {_show(spec.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if isinstance(want, int):
                if want != got:
                    raise InputError(f"input {spec.name!r} has size {got} on axis {axis}, expected {want} {_show(spec.shape)}")
            elif isinstance(want, str) and "*" in want:
                deferred.append((spec, axis, want, got))
            elif isinstance(want, str):
                if want in bound and bound[want][0] != got:
                    first_size, first_name = bound[want]
                    raise InputError(
                        f"input {spec.name!r} has {want}={got} on axis {axis}, but {first_name!r} gave {want}={first_size}"
                    )
                bound.setdefault(want, (got, spec.name))
    for spec, axis, want, got in deferred:
        symbol, factor = want.split("*")
        expected = bound[symbol][0] * int(factor) if symbol in bound else None
        if expected is not None and expected != got:
            raise InputError(
                f"input {spec.name!r} has size {got} on axis {axis}, expected {want} = {expected} (from {bound[symbol][1]!r})"
            )


def _show(shape: tuple[int | str | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
