"""Input checks every backend runs before its run call, read from the model's declared inputs.

Symbolic axes bind on first sight and must agree afterwards; an axis named ``batch*8`` is the
product of ``batch`` and 8 (the 3-D attn_mask's leading axis), ``past_len+tgt_len`` a sum. No
dynamic axis but a KV cache's ``past_len`` may be 0: some backends compute an empty batch or
sequence and some refuse it, so every backend refuses it here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graphs.dtypes import BY_ONNX
from graphs.spec import BATCH, LENGTH_AXES, MAX_BATCH_KEY, MAX_LEN_KEY

MAY_BE_EMPTY = frozenset({"past_len"})  # a KV cache before the first step


class InputError(ValueError):
    """An input does not fit the graph; the message names it, what was expected and what came."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: (
        np.dtype
    )  # object where NumPy has no such type (bfloat16, string...): ``onnx_type`` names it
    shape: tuple[int | str | None, ...]
    onnx_type: str = ""


def input_specs(model: onnx.ModelProto, overridable: bool = False) -> list[InputSpec]:
    """The graph's inputs a caller must give; with ``overridable``, instead those it may give: the
    initializers also listed as inputs (``keep_initializers_as_inputs``), defaults a feed replaces."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if (vi.name in initializers) != overridable:
            continue
        tensor = vi.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        specs.append(
            InputSpec(
                vi.name,
                BY_ONNX[tensor.elem_type].numpy
                if tensor.elem_type in BY_ONNX
                else np.dtype(object),
                dims,
                onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
                if tensor.elem_type in onnx.TensorProto.DataType.values()
                else "unknown",
            )
        )
    return specs


def is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "data_ptr")


def dtype_of(value: object) -> np.dtype | None:
    """The NumPy dtype of a numpy array or torch tensor; None for anything else."""
    if isinstance(value, np.ndarray):
        return value.dtype
    if is_torch(value):
        try:
            return np.dtype(str(value.dtype).removeprefix("torch."))  # type: ignore[attr-defined]
        except TypeError:  # bfloat16 and other dtypes NumPy lacks
            return np.dtype(object)
    return None


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a NumPy dtype (float32, float16, bool, int64...)."""
    import torch

    return getattr(torch, np.dtype(dtype).name)


def declared_maxima(model: onnx.ModelProto) -> dict[str, int]:
    """The largest batch and length the model was compiled for (its metadata), by axis kind."""
    props = {p.key: p.value for p in model.metadata_props}
    maxima = {}
    for kind, key in (("batch", MAX_BATCH_KEY), ("length", MAX_LEN_KEY)):
        if props.get(key, "").isdigit():
            maxima[kind] = int(props[key])
    return maxima


def check_inputs(
    specs: Sequence[InputSpec],
    feeds: Mapping[str, object],
    maxima: Mapping[str, int] | None = None,
    optional: Sequence[InputSpec] = (),
) -> dict[str, int]:
    """Raise InputError for the first input that does not fit (with ``maxima``, also one past the
    declared largest batch or length; ``optional``: inputs that may be given, overriding an
    initializer); return the size of every symbolic axis."""
    names = [s.name for s in specs]
    overridable = {s.name for s in optional}
    for name in feeds:
        if name not in names and name not in overridable:
            raise InputError(f"unexpected input {name!r}; this graph takes {', '.join(names)}")
    for spec in optional:
        if spec.name in feeds:
            for axis, (want, got) in enumerate(
                zip(spec.shape, _checked_type(spec, feeds[spec.name]))
            ):
                _checked_axis(spec, axis, want, got)
    bound: dict[str, tuple[int, str]] = {}  # axis name: its size, and the input that first gave it
    deferred: list[tuple[InputSpec, int, str, int]] = []  # computed axes: past_len+tgt_len
    for spec in specs:
        if spec.name not in feeds:
            raise InputError(f"missing input {spec.name!r}; this graph takes {', '.join(names)}")
        shape = _checked_type(spec, feeds[spec.name])
        for axis, (want, got) in enumerate(zip(spec.shape, shape)):
            if _checked_axis(spec, axis, want, got):
                deferred.append((spec, axis, want, got))
            elif isinstance(want, str):
                if want in bound and bound[want][0] != got:
                    first_size, first_name = bound[want]
                    raise InputError(
                        f"input {spec.name!r} has {want}={got} on axis {axis}, but {first_name!r} gave {want}={first_size}"
                    )
                bound.setdefault(want, (got, spec.name))
    sizes = {symbol: size for symbol, (size, _) in bound.items()}
    for spec, axis, want, got in deferred:
        expected = evaluate(want, sizes)
        if expected is not None and expected != got:
            sources = ", ".join(
                f"{s}={sizes[s]} from {bound[s][1]!r}" for s in re.findall(r"[A-Za-z_]\w*", want)
            )
            raise InputError(
                f"input {spec.name!r} has size {got} on axis {axis}, expected {want} = {expected} ({sources})"
            )
    if maxima:
        _check_maxima(sizes, {s: n for s, (_, n) in bound.items()}, maxima)
    return sizes


def _checked_type(spec: InputSpec, value: object) -> tuple[int, ...]:
    """The value's shape, once its type, dtype and rank are the input's."""
    dtype = dtype_of(value)
    if dtype is None:
        raise InputError(
            f"input {spec.name!r} is a {type(value).__name__}, expected a numpy.ndarray or torch.Tensor "
            f"of {spec.dtype}"
        )
    if dtype != spec.dtype:
        raise InputError(
            f"input {spec.name!r} has dtype {dtype}, expected {spec.onnx_type or spec.dtype}"
            if spec.dtype == np.dtype(object)
            else f"input {spec.name!r} has dtype {dtype}, expected {spec.dtype}"
        )
    shape = tuple(value.shape)  # type: ignore[attr-defined]
    if len(shape) != len(spec.shape):
        raise InputError(
            f"input {spec.name!r} has rank {len(shape)} (shape {shape}), expected rank {len(spec.shape)} {show_shape(spec.shape)}"
        )
    return shape


def _checked_axis(spec: InputSpec, axis: int, want: int | str | None, got: int) -> bool:
    """InputError where a fixed size differs or a dynamic axis is empty; True for an axis whose
    size is computed from others (checked once they are all known)."""
    if isinstance(want, int):
        if want != got:
            raise InputError(
                f"input {spec.name!r} has size {got} on axis {axis}, expected {want} {show_shape(spec.shape)}"
            )
        return False
    if got == 0 and want not in MAY_BE_EMPTY:
        raise InputError(
            f"input {spec.name!r} has {want or 'a dynamic axis'}=0 on axis {axis}; every dynamic axis "
            "needs at least 1 (ONNX Runtime's Attention kernels and TensorRT profiles refuse empty "
            "batches and sequences: skip the call instead)"
        )
    return isinstance(want, str) and ("*" in want or "+" in want)


def _check_maxima(
    sizes: Mapping[str, int], sources: Mapping[str, str], maxima: Mapping[str, int]
) -> None:
    axes = dict(sizes)
    if (total := evaluate(LENGTH_AXES[-1], sizes)) is not None:
        axes[LENGTH_AXES[-1]] = total
        sources = {**sources, LENGTH_AXES[-1]: sources[LENGTH_AXES[0]]}
    for symbol, size in axes.items():
        kind = "batch" if symbol == BATCH else "length" if symbol in LENGTH_AXES else None
        limit = maxima.get(kind) if kind else None
        if limit is not None and size > limit:
            flag = f"--max-{'batch' if kind == 'batch' else 'len'}"
            raise InputError(
                f"input {sources[symbol]!r} has {symbol}={size}, more than the {limit} this graph was compiled "
                f"for ({flag} {limit}); recompile with a larger {flag}, or split the call"
            )


def evaluate(dim: str, sizes: Mapping[str, int]) -> int | None:
    """A symbolic dim (``batch``, ``batch*8``, ``src_len+1``, ``past_len+tgt_len``) at the given sizes; None if unknown."""
    match = re.fullmatch(r"(\w+)(?:([*+])(\w+))?", dim or "")
    if not match:
        return None
    terms = [
        sizes.get(t) if not t.isdigit() else int(t) for t in (match.group(1), match.group(3) or "0")
    ]
    if None in terms:
        return None
    a, b = terms
    return a * b if match.group(2) == "*" else a + b


def resolve_shape(
    shape: Sequence[int | str | None], sizes: Mapping[str, int]
) -> tuple[int, ...] | None:
    """A declared shape at the given axis sizes; None if some axis is unknown."""
    dims = [dim if isinstance(dim, int) else evaluate(dim or "", sizes) for dim in shape]
    return None if None in dims else tuple(dims)  # type: ignore[return-value]


def show_shape(shape: tuple[int | str | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
