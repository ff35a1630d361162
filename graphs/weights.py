"""Weights of a torch.nn.MultiheadAttention, under torch's own state_dict key names.

Files are read without running code: safetensors and npz (``allow_pickle=False``) need no torch;
``.pt`` goes through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphs.spec import AttentionSpec


class WeightsError(ValueError):
    """Weights that do not fit the spec, or a file that cannot be read as weights."""


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
class AttentionWeights:
    """Checked float32 tensors, keyed as in torch's state_dict; ``source`` says where they came from."""

    tensors: Mapping[str, np.ndarray]
    source: Mapping[str, Any]

    @classmethod
    def from_state_dict(cls, spec: AttentionSpec, state: Mapping[str, Any], source: Mapping[str, Any] | None = None) -> AttentionWeights:
        tensors = checked_tensors(expected_shapes(spec), state, "torch.nn.MultiheadAttention",
                                  "check bias, add_bias_kv, kdim and vdim")
        return cls(tensors, dict(source or {"kind": "state_dict"}))

    @classmethod
    def from_file(cls, spec: AttentionSpec, path: str | os.PathLike[str]) -> AttentionWeights:
        return cls.from_state_dict(spec, read_state_dict(path), file_source(path))

    @classmethod
    def from_module(cls, spec: AttentionSpec, module: Any) -> AttentionWeights:
        """A live torch.nn.MultiheadAttention (any dtype or device)."""
        return cls.from_state_dict(spec, module_state(module), {"kind": "module", "type": type(module).__name__})

    @classmethod
    def random(cls, spec: AttentionSpec, seed: int = 0) -> AttentionWeights:
        """Seeded init in torch's scale (xavier-uniform weights); biases are non-zero, unlike torch's,
        so that a check exercises them."""
        return cls.from_state_dict(spec, random_state(expected_shapes(spec), seed), {"kind": "random", "seed": seed})

    # Views the graph builder and references use ---------------------------------------------

    def in_proj(self, spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(W_q, W_k, W_v) in torch's (out_features, in_features) layout."""
        if spec.packed_in_proj:
            w = self.tensors["in_proj_weight"]
            e = spec.embed_dim
            return w[:e], w[e : 2 * e], w[2 * e :]
        return self.tensors["q_proj_weight"], self.tensors["k_proj_weight"], self.tensors["v_proj_weight"]

    def in_bias(self, spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not spec.bias:
            return None
        b = self.tensors["in_proj_bias"]
        e = spec.embed_dim
        return b[:e], b[e : 2 * e], b[2 * e :]

    def out_bias(self, spec: AttentionSpec) -> np.ndarray:
        """out_proj.bias, or zeros where the module has none (the fully-masked-row value)."""
        return self.tensors["out_proj.bias"] if spec.bias else np.zeros(spec.embed_dim, np.float32)


def _is_float(dtype: np.dtype) -> bool:
    """NumPy floats, and the ml_dtypes floats (bfloat16, float8) that safetensors.numpy returns."""
    return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat", "float8"))


def _names(keys: list[str]) -> str:
    return ("key " if len(keys) == 1 else "keys ") + ", ".join(repr(k) for k in keys)


def checked_tensors(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], owner: str,
                    hint: str) -> dict[str, np.ndarray]:
    """``state`` as float32 arrays, refused with one sentence unless its keys and shapes are ``expected``."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"weights are missing {_names(missing)} that {owner} has for this spec"
                           f" (expected keys: {', '.join(expected)})")
    extra = sorted(k for k in state if k not in expected)
    if extra:
        raise WeightsError(f"weights hold unexpected {_names(extra)}; this spec takes exactly {', '.join(expected)} ({hint})")
    tensors = {}
    for key, shape in expected.items():
        array = _as_numpy(key, state[key])
        if not _is_float(array.dtype):
            raise WeightsError(f"weight {key!r} has dtype {array.dtype}, expected a floating-point tensor")
        if tuple(array.shape) != shape:
            raise WeightsError(f"weight {key!r} has shape {tuple(array.shape)}, expected {shape} for this spec")
        with np.errstate(over="ignore"):
            tensors[key] = np.ascontiguousarray(array, dtype=np.float32)
        bad = np.size(tensors[key]) - np.count_nonzero(np.isfinite(tensors[key]))
        if bad:
            where = " once cast to float32, which cannot hold its values" if np.isfinite(array.astype(np.float64)).all() else ""
            raise WeightsError(f"weight {key!r} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}{where}; "
                               "every output would be NaN, expected finite weights")
    return tensors


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


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A state_dict from .safetensors, .npz or .pt (torch.load with weights_only=True: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    readers = {".safetensors": _read_safetensors, ".npz": _read_npz, ".pt": _read_torch, ".pth": _read_torch}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise WeightsError(f"weights file {str(path)!r} has an unknown type; expected .safetensors, .npz or .pt")
    return readers[suffix](path)


def _as_numpy(key: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor; bf16 has no numpy dtype
        return value.detach().to("cpu").double().numpy()
    raise WeightsError(f"weight {key!r} is a {type(value).__name__}, expected a tensor")


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise WeightsError(f"weights file {str(path)!r} is not a readable safetensors file ({first_line(exc)})") from exc


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(f"weights file {str(path)!r} is not a readable .npz archive of arrays ({first_line(exc)})") from exc


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        raise WeightsError(f"reading {str(path)!r} needs torch; install the 'torch' extra or save the weights as .safetensors") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(
            f"weights file {str(path)!r} could not be loaded with torch.load(weights_only=True): {first_line(exc)}"
        ) from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"weights file {str(path)!r} holds a {type(state).__name__}, expected a state_dict of tensors")
    return dict(state)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
