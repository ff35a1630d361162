"""Weights of a torch.nn.MultiheadAttention, under torch's own state_dict key names.

Files are read by graphs/weight_files.py, which runs no code from them and checks what they declare
against the spec before reading their data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphs.spec import AttentionSpec
from graphs.weight_files import (
    WeightsError,
    check_dtype,
    check_keys,
    check_shape,
    read_state_dict,
    torch_array,
)

OWNER = "torch.nn.MultiheadAttention"
HINT = "check bias, add_bias_kv, kdim and vdim"


def expected_shapes(spec: AttentionSpec) -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes torch.nn.MultiheadAttention has for this spec."""
    e = spec.embed_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if spec.packed_in_proj:
        shapes["in_proj_weight"] = (3 * e, e)
    else:
        shapes["q_proj_weight"] = (e, e)
        shapes["k_proj_weight"] = (e, spec.k_dim)
        shapes["v_proj_weight"] = (e, spec.v_dim)
    if spec.bias:
        shapes["in_proj_bias"] = (3 * e,)
    if spec.add_bias_kv:
        shapes["bias_k"] = (1, 1, e)
        shapes["bias_v"] = (1, 1, e)
    shapes["out_proj.weight"] = (e, e)
    if spec.bias:
        shapes["out_proj.bias"] = (e,)
    return shapes


@dataclass(frozen=True)
class Weights:
    """Checked float32 tensors, keyed as in a torch module's state_dict; ``source`` says where they
    came from. A subclass says which keys and shapes its spec takes (``layout``)."""

    tensors: Mapping[str, np.ndarray]
    source: Mapping[str, Any]

    @classmethod
    def layout(cls, spec: Any) -> tuple[dict[str, tuple[int, ...]], str, str]:
        """The spec's keys and shapes, the module they belong to, and a hint for a wrong file."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(
        cls, spec: Any, state: Mapping[str, Any], source: Mapping[str, Any] | None = None
    ) -> Any:
        shapes, owner, hint = cls.layout(spec)
        tensors = checked_tensors(shapes, state, owner, hint)
        return cls(tensors, dict(source or {"kind": "state_dict"}))

    @classmethod
    def from_file(cls, spec: Any, path: str | os.PathLike[str]) -> Any:
        state = read_state_dict(path, *cls.layout(spec))
        return cls.from_state_dict(spec, state, file_source(path))

    @classmethod
    def from_module(cls, spec: Any, module: Any) -> Any:
        """A live torch module (any dtype or device)."""
        source = {"kind": "module", "type": type(module).__name__}
        return cls.from_state_dict(spec, module_state(module), source)

    @classmethod
    def random(cls, spec: Any, seed: int = 0) -> Any:
        """Seeded init in torch's scale (xavier-uniform weights); biases are non-zero, unlike torch's,
        so that a check exercises them."""
        shapes = cls.layout(spec)[0]
        return cls.from_state_dict(
            spec, random_state(shapes, seed), {"kind": "random", "seed": seed}
        )


@dataclass(frozen=True)
class AttentionWeights(Weights):
    """The weights of a torch.nn.MultiheadAttention."""

    @classmethod
    def layout(cls, spec: AttentionSpec) -> tuple[dict[str, tuple[int, ...]], str, str]:
        return expected_shapes(spec), OWNER, HINT

    # Views the graph builder and references use ---------------------------------------------

    def in_proj(self, spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(W_q, W_k, W_v) in torch's (out_features, in_features) layout."""
        if spec.packed_in_proj:
            w = self.tensors["in_proj_weight"]
            e = spec.embed_dim
            return w[:e], w[e : 2 * e], w[2 * e :]
        return (
            self.tensors["q_proj_weight"],
            self.tensors["k_proj_weight"],
            self.tensors["v_proj_weight"],
        )

    def in_bias(self, spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not spec.bias:
            return None
        b = self.tensors["in_proj_bias"]
        e = spec.embed_dim
        return b[:e], b[e : 2 * e], b[2 * e :]

    def out_bias(self, spec: AttentionSpec) -> np.ndarray:
        """out_proj.bias, or zeros where the module has none (the fully-masked-row value)."""
        return self.tensors["out_proj.bias"] if spec.bias else np.zeros(spec.embed_dim, np.float32)


def checked_tensors(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], owner: str, hint: str
) -> dict[str, np.ndarray]:
    """``state`` as float32 arrays, refused with one sentence unless its keys are ``expected`` and its
    tensors are finite floats of the expected shapes."""
    check_keys(expected, list(state), owner, hint)
    tensors = {}
    for key, shape in expected.items():
        array = _as_numpy(key, state[key], shape)
        with np.errstate(over="ignore"):
            tensors[key] = np.ascontiguousarray(array, dtype=np.float32)
        bad = np.size(tensors[key]) - np.count_nonzero(np.isfinite(tensors[key]))
        if bad:
            where = (
                " once cast to float32, which cannot hold its values"
                if np.isfinite(array.astype(np.float64)).all()
                else ""
            )
            raise WeightsError(
                f"weight {key!r} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}{where}; "
                "every output would be NaN, expected finite weights"
            )
    return tensors


FLOAT16_MAX = 65504.0


def check_precision_range(tensors: Mapping[str, np.ndarray], precision: str) -> None:
    """WeightsError naming the first tensor whose values float16 cannot hold, for ``--precision fp16``."""
    if precision != "fp16":
        return
    for key, value in tensors.items():
        peak = float(np.max(np.abs(value))) if value.size else 0.0
        if peak > FLOAT16_MAX:
            raise WeightsError(
                f"weight {key!r} holds values up to {peak:.4g}, beyond float16's range (±{FLOAT16_MAX:g}): "
                "with --precision fp16 every output would be inf; use --precision fp32"
            )


def random_state(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Seeded tensors in torch's scale: xavier-uniform matrices; biases non-zero (torch zeroes
    them) and LayerNorm scales near, not at, one, so that a check exercises every parameter."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 2:
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            state[key] = rng.uniform(-limit, limit, size=shape)
        elif key.startswith("norm") and key.endswith("weight"):
            state[key] = rng.normal(1.0, 0.1, size=shape)
        else:
            state[key] = rng.normal(0.0, 0.1 if key.endswith("bias") else 0.5, size=shape)
    return state


def module_state(module: Any) -> dict[str, np.ndarray]:
    """A live torch module's state_dict as float64 arrays (any dtype or device)."""
    return {k: v.detach().to("cpu").double().numpy() for k, v in module.state_dict().items()}


def file_source(path: str | os.PathLike[str]) -> dict[str, str]:
    return {"kind": "file", "path": str(path), "format": Path(path).suffix.lower().lstrip(".")}


def _as_numpy(key: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(value, np.ndarray):
        check_dtype(
            key, value.dtype.name
        )  # ml_dtypes' bfloat16 is named so; its float8s are refused
        check_shape(key, value.shape, shape)
        return value
    if hasattr(value, "detach") and hasattr(
        value, "numpy"
    ):  # a torch tensor; bf16 has no numpy dtype
        return torch_array(key, value, shape)
    raise WeightsError(f"weight {key!r} is a {type(value).__name__}, expected a tensor")
