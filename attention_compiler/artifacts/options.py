"""The rules for compile()'s and save()'s options, shared with compile.py's flags so that both say
the same sentence for the same mistake (``name`` is the flag on the command line, the keyword in
the library). A value is taken only in the type it means: ``True`` is no batch size, ``2.5`` no
length."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from compiler import CALIBRATORS
from graphs.spec import SpecError

LATENCY_SHAPE_RULE = (
    "expected three positive integers BATCH,TGT,SRC such as 1,128,128 (or AXIS=SIZE,... for --onnx)"
)


def is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def whole_number_problem(
    name: str, value: object, least: int = 1, most: int | None = None
) -> str | None:
    """Why ``value`` is not a whole number from ``least`` (to ``most``), or None."""
    if is_whole(value) and value >= least and (most is None or value <= most):  # type: ignore[operator]
        return None
    shown = (
        f"2**{most.bit_length()}-1" if most and most > 2**32 and most & (most + 1) == 0 else most
    )
    span = f"from {least} to {shown}" if most is not None else f"of at least {least}"
    return f"{name} must be a whole number {span}, got {value!r}"[:200]


def latency_shape_problem(value: object) -> str | None:
    """Why ``value`` is not a latency shape (BATCH, TGT, SRC) or {axis: size}, or None."""
    if isinstance(value, Mapping):
        good = bool(value) and all(
            isinstance(k, str) and k and is_whole(v) and v >= 1 for k, v in value.items()
        )
    else:
        good = (
            isinstance(value, (tuple, list))
            and len(value) == 3
            and all(is_whole(v) and v >= 1 for v in value)
        )
    return None if good else f"latency_shape: {LATENCY_SHAPE_RULE}, got {value!r}"[:200]


def checked_settings(values: dict[str, Any]) -> dict[str, Any]:
    """compile()'s Settings values, checked (SpecError, one sentence naming the option) and in
    their own types: memory_limit may be given as text ('16GiB'), latency_shape as a list."""
    from attention_compiler.artifacts.resources import parse_size

    for name in ("target", "precision", "form"):
        value = values.get(name)
        if not isinstance(value, str) and not (name == "form" and value is None):
            raise SpecError(f"{name} must be a name (see compile.py --help), got {value!r}"[:200])
    shapes = values.get("profile_shapes")
    if shapes is not None and not (
        isinstance(shapes, (tuple, list))
        and len(shapes) == 3
        and all(isinstance(x, str) for x in shapes)
    ):
        problem = (
            f"profile_shapes must be three trtexec shape strings (min, opt, max), got {shapes!r}"
        )
        raise SpecError(problem[:200])
    for name in ("max_batch", "max_len"):
        if values.get(name) is not None and (problem := whole_number_problem(name, values[name])):
            raise SpecError(problem)
    limit = values.get("memory_limit")
    if isinstance(limit, str):
        try:
            values["memory_limit"] = parse_size(limit)
        except ValueError as exc:
            raise SpecError(f"memory_limit: {exc}") from None
    elif limit is not None and (problem := whole_number_problem("memory_limit", limit)):
        raise SpecError(problem)
    if (problem := latency_shape_problem(values.get("latency_shape"))) is not None:
        raise SpecError(problem)
    if not isinstance(values["latency_shape"], Mapping):
        values["latency_shape"] = tuple(values["latency_shape"])
    for name in ("check", "latency"):
        if not isinstance(values.get(name), bool):
            raise SpecError(f"{name} must be True or False, got {values.get(name)!r}"[:200])
    _check_bounds(values)
    _check_int8_layers(values)
    if values.get("external_data") not in ("auto", "always"):
        raise SpecError(
            f"external_data must be 'auto' or 'always', got {values.get('external_data')!r}"
        )
    cache = values.get("engine_cache")
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise SpecError(f"engine_cache must be a folder path, got {type(cache).__name__}")
    return values


def _check_bounds(values: dict[str, Any]) -> None:
    """The check's bound, where given: a relative error above 0, a cosine similarity in (-1, 1]."""
    for name, low, high in (("max_rel_error", 0.0, math.inf), ("min_cosine", -1.0, 1.0)):
        bound = values.get(name)
        if bound is not None and not (
            isinstance(bound, (int, float))
            and not isinstance(bound, bool)
            and low < bound <= high
            and math.isfinite(bound)
        ):
            raise SpecError(
                f"{name} must be a number above {low:g} and at most {high:g}, got {bound!r}"[:200]
            )


def _check_int8_layers(values: dict[str, Any]) -> None:
    """keep_fp32: layer or module names, and calibrate: .npz paths, for int8 only; fallback: True or
    False; calibration_method: a calibrator's name."""
    keep = values.get("keep_fp32", ())
    if isinstance(keep, str) or not (
        isinstance(keep, (tuple, list)) and all(isinstance(k, str) and k for k in keep)
    ):
        raise SpecError(f"keep_fp32 must be a list of layer or module names, got {keep!r}"[:200])
    if keep and values.get("precision") != "int8":
        raise SpecError(
            f"keep_fp32 keeps layers of an int8 graph in float32; precision is {values.get('precision')}"
        )
    values["keep_fp32"] = tuple(keep)
    calibrate = values.get("calibrate") or ()
    if isinstance(calibrate, (str, os.PathLike)):
        calibrate = (calibrate,)
    if not (
        isinstance(calibrate, (tuple, list))
        and all(isinstance(c, (str, os.PathLike)) for c in calibrate)
    ):
        raise SpecError(f"calibrate must be .npz paths, got {calibrate!r}"[:200])
    if calibrate and values.get("precision") != "int8":
        raise SpecError(
            f"calibrate sets an int8 graph's activation scales; precision is {values.get('precision')}"
        )
    values["calibrate"] = tuple(calibrate)
    method = values.get("calibration_method", "minmax")
    if method not in CALIBRATORS:
        raise SpecError(
            f"calibration_method must be one of {', '.join(CALIBRATORS)}, got {method!r}"[:200]
        )
    if not isinstance(values.get("fallback", True), bool):
        raise SpecError(f"fallback must be True or False, got {values.get('fallback')!r}"[:200])
