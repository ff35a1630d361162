"""TensorRT optimization profiles: a min/opt/max shape for every input with a dynamic axis.

They come from the graph's declared inputs and either --max-batch/--max-len or trtexec-style
--min-shapes/--opt-shapes/--max-shapes; this module needs neither TensorRT nor a GPU, so every
rule here is tested on CPU. Symbolic axes keep one range across inputs (``tgt_len`` in the query
and its mask), and an axis named ``batch*8`` is 8 times ``batch``'s range.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from runtime.signature import MAY_BE_EMPTY, InputError, InputSpec, show_shape

Dims = tuple[int, ...]  # one tensor's sizes
KINDS = ("min", "opt", "max")


class ProfileError(ValueError):
    """Profile shapes that do not fit the graph, or that are spelled wrong."""


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) per input, in the graph's input order; fixed inputs have all three equal."""

    shapes: Mapping[str, tuple[Dims, Dims, Dims]]

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {name: dict(zip(KINDS, map(list, s))) for name, s in self.shapes.items()}

    def trtexec(self) -> dict[str, str]:
        """The same profile as trtexec's --minShapes/--optShapes/--maxShapes values."""
        return {
            kind: ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in self.shapes.items())
            for i, kind in enumerate(KINDS)
        }


def parse_shapes(text: str, flag: str) -> dict[str, Dims]:
    """``query:1x128x512,key_padding_mask:1x128`` (trtexec's spelling) as {name: shape}."""
    shapes: dict[str, Dims] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(.+):(\d+(?:x\d+)*)", item)
        if not match:
            raise ProfileError(
                f"{flag} expects NAME:DIMxDIMx... per input, comma-separated as trtexec spells it "
                f"(query:1x128x512,key_padding_mask:1x128), got {item!r}"
            )
        name = match.group(1).strip("'\"")
        if name in shapes:
            raise ProfileError(f"{flag} names input {name!r} twice")
        shapes[name] = tuple(int(d) for d in match.group(2).split("x"))
    if not shapes:
        raise ProfileError(f"{flag} is empty; expected NAME:DIMxDIMx... per input")
    return shapes


def dynamic_inputs(inputs: Sequence[InputSpec]) -> list[InputSpec]:
    return [s for s in inputs if any(not isinstance(d, int) for d in s.shape)]


def profile_from_limits(inputs: Sequence[InputSpec], max_batch: int, max_len: int) -> Profile:
    """Every batch axis from 1 to ``max_batch``, every other dynamic axis from 1 to ``max_len``;
    opt is half of max, rounded up, a middle the kernels are tuned for."""
    if max_batch < 1 or max_len < 1:
        raise ProfileError(
            f"--max-batch and --max-len must be at least 1, got {max_batch} and {max_len}"
        )
    half = -(-max_len // 2)
    ranges = {"batch": (1, -(-max_batch // 2), max_batch)}
    if any(
        "past_len" in s.shape for s in inputs
    ):  # a KV cache: past and new together stay within max_len,
        # the past may be empty (a prefill), and opt is a decoding step (one new token after half the length)
        ranges |= {
            "past_len": (0, half, max_len - 1),
            "tgt_len": (1, 1, max_len),
            "past_len+tgt_len": (1, half + 1, max_len),
        }

    def axis(dim: int | str | None) -> tuple[int, int, int]:
        if isinstance(dim, int):
            return dim, dim, dim
        symbol, op, k = _split(dim)
        lo, opt, hi = ranges.get(dim if dim in ranges else symbol, (1, half, max_len))
        return _apply(lo, op, k), _apply(opt, op, k), _apply(hi, op, k)

    shapes = {}
    for s in inputs:
        dims = [axis(d) for d in s.shape]
        shapes[s.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return Profile(shapes)


def profile_from_shapes(
    inputs: Sequence[InputSpec],
    min_shapes: Mapping[str, Dims],
    opt_shapes: Mapping[str, Dims],
    max_shapes: Mapping[str, Dims],
) -> Profile:
    """A profile given shape by shape, checked: every input with a dynamic axis named in all three,
    no unknown names, ranks and fixed sizes as declared, min <= opt <= max, and one range per symbol."""
    names = [s.name for s in inputs]
    given = {"--min-shapes": min_shapes, "--opt-shapes": opt_shapes, "--max-shapes": max_shapes}
    for flag, shapes in given.items():
        for name in shapes:
            if name not in names:
                raise ProfileError(
                    f"{flag} names {name!r}, which is not an input; the inputs are {', '.join(names)}"
                )
        for s in dynamic_inputs(inputs):
            if s.name not in shapes:
                raise ProfileError(
                    f"{flag} does not give input {s.name!r}; every input with a dynamic axis "
                    f"({', '.join(d.name for d in dynamic_inputs(inputs))}) needs a shape in all three"
                )
    profile = Profile({s.name: _triple(s, given) for s in inputs})
    _check_symbols(inputs, profile)
    return profile


def _triple(s: InputSpec, given: Mapping[str, Mapping[str, Dims]]) -> tuple[Dims, Dims, Dims]:
    """An input's min, opt and max shapes (its declared shape where it has no dynamic axis), checked
    against its rank and fixed sizes, and min <= opt <= max on every axis."""
    triple = tuple(
        tuple(shapes_[s.name]) if s.name in shapes_ else tuple(s.shape)  # type: ignore[arg-type]
        for shapes_ in given.values()
    )
    for flag, shape in zip(given, triple):
        if len(shape) != len(s.shape):
            raise ProfileError(
                f"{flag} gives {s.name!r} rank {len(shape)} ({'x'.join(map(str, shape))}); "
                f"it has rank {len(s.shape)} {show_shape(s.shape)}"
            )
        for axis, (want, got) in enumerate(zip(s.shape, shape)):
            if isinstance(want, int) and want != got:
                raise ProfileError(
                    f"{flag} gives {s.name!r} size {got} on axis {axis}, which is fixed at {want}"
                )
    for axis in range(len(s.shape)):
        lo, opt, hi = (t[axis] for t in triple)
        least = 0 if s.shape[axis] in MAY_BE_EMPTY else 1
        if not least <= lo <= opt <= hi:
            raise ProfileError(
                f"input {s.name!r} axis {axis} ({s.shape[axis]}) has min {lo}, opt {opt}, max {hi}; "
                f"expected {least} <= min <= opt <= max"
            )
    return triple  # type: ignore[return-value]


def check_in_profile(
    inputs: Sequence[InputSpec], profile: Profile, shapes: Mapping[str, Dims]
) -> None:
    """Refuse input shapes the engine was not built for, naming the input, the axis and its range."""
    for s in inputs:
        lo, _, hi = profile.shapes[s.name]
        for axis, got in enumerate(shapes[s.name]):
            if not lo[axis] <= got <= hi[axis]:
                name = f" ({s.shape[axis]})" if isinstance(s.shape[axis], str) else ""
                raise InputError(
                    f"input {s.name!r} has size {got} on axis {axis}{name}, outside the engine's profile "
                    f"range [{lo[axis]}, {hi[axis]}]; rebuild the engine with a larger --max-len/--max-batch "
                    "or --min-shapes/--max-shapes that cover it"
                )


def _check_symbols(inputs: Sequence[InputSpec], profile: Profile) -> None:
    seen: dict[str, tuple[tuple[int, int, int], str]] = {}
    for s in inputs:
        for axis, dim in enumerate(s.shape):
            if not isinstance(dim, str):
                continue
            symbol, op, k = _split(dim)
            values = tuple(profile.shapes[s.name][i][axis] for i in range(3))
            if op and any(_undo(v, op, k) is None for v in values):
                raise ProfileError(
                    f"input {s.name!r} axis {axis} is {dim}; its min/opt/max {values} must be that"
                )
            base = tuple(_undo(v, op, k) for v in values) if op else values
            if symbol in seen and seen[symbol][0] != base:
                raise ProfileError(
                    f"axis {symbol} has min/opt/max {seen[symbol][0]} in {seen[symbol][1]!r} but "
                    f"{base} in {s.name!r}; one axis needs one range"
                )
            seen.setdefault(symbol, (base, s.name))  # type: ignore[arg-type]


def _split(dim: str | None) -> tuple[str, str, int]:
    """``batch*8`` -> (batch, *, 8); ``src_len+1`` -> (src_len, +, 1); ``tgt_len`` -> (tgt_len, '', 0)."""
    match = re.fullmatch(r"(\w+)([*+])(\d+)", dim or "")
    return (match.group(1), match.group(2), int(match.group(3))) if match else (dim or "?", "", 0)


def _apply(value: int, op: str, k: int) -> int:
    return value * k if op == "*" else value + k if op == "+" else value


def _undo(value: int, op: str, k: int) -> int | None:
    if op == "*":
        return value // k if value % k == 0 else None
    return value - k if op == "+" else value
