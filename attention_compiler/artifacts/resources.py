"""How much memory one call of a compiled graph needs at its declared maximum shape, so that
compile.py can refuse a spec that would exhaust memory at run time instead of crashing there.

The figure is an estimate from the spec, not a measurement: the weights, the inputs and outputs,
and every activation the graph holds at its widest point, counted once. The attention scores
(batch x heads x tgt_len x keys, float32) count once: the unfused forms and ONNX Runtime's
kernels hold them whole (softmax works in place), except where its CPU MultiHeadAttention takes a
flash path or a form runs blocks of queries (ort-cpu's mask forms, onnx-attention's
attention-op-blocks), so there the figure is high. TensorRT's fused kernels stream them, so for
``tensorrt`` they count only where ``need_weights`` returns them. docs/RELIABILITY.md compares the
estimate with peaks measured by attention_compiler/benchmark/memory.py.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from graphs.spec import AttentionSpec
from runtime.check import Shape

FLOAT32 = 4


class MemoryBoundError(ValueError):
    """A spec needs more memory at its declared maximum shape than the stated limit."""


def attention_parts(
    spec: AttentionSpec, shape: Shape, precision: str, target: str
) -> dict[str, int]:
    """Bytes of each tensor one call of this attention holds, by a name a user can act on."""
    elt = 2 if precision == "fp16" else FLOAT32
    n, h, e = shape.batch, spec.num_heads, spec.embed_dim
    tgt = shape.tgt_len
    src = tgt if spec.self_attention else shape.src_len
    keys = src + spec.extra_keys
    parts = {
        "weights": elt * (2 * e * e + e * (spec.k_dim + spec.v_dim) + _bias_params(spec)),
        "inputs and outputs": FLOAT32
        * n
        * (2 * tgt * e + (0 if spec.self_attention else src * (spec.k_dim + spec.v_dim))),
        "projected queries, keys and values": elt * n * e * (tgt + 2 * keys),
        "attention context": elt * n * tgt * e,
    }
    if target != "tensorrt" or spec.need_weights:
        parts["attention scores (batch x heads x tgt_len x keys, float32)"] = (
            FLOAT32 * n * h * tgt * keys
        )
    if spec.key_padding_mask is not None or spec.attn_mask is not None or spec.is_causal:
        parts["combined mask"] = FLOAT32 * n * h * tgt * keys
    if spec.kv_cache:  # past in, present out, for keys and values
        parts["KV cache (past and present)"] = FLOAT32 * 4 * n * keys * e
    if spec.need_weights:
        heads = 1 if spec.average_attn_weights else h
        parts["attn_output_weights"] = FLOAT32 * n * heads * tgt * keys
    return parts


def _bias_params(spec: AttentionSpec) -> int:
    return (4 * spec.embed_dim if spec.bias else 0) + (
        2 * spec.embed_dim if spec.add_bias_kv else 0
    )


def block_parts(spec: Any, shape: Shape, precision: str, target: str) -> dict[str, int]:
    """An encoder or decoder block: its attentions (the larger one's working set, the other's
    weights), the feed-forward hidden layer and the residual stream."""
    elt = 2 if precision == "fp16" else FLOAT32
    attentions = [
        attention_parts(
            spec.self_attention_spec(),
            Shape(shape.batch, shape.tgt_len, shape.tgt_len),
            precision,
            target,
        )
    ]
    if spec.block == "decoder":
        attentions.append(attention_parts(spec.cross_attention_spec(), shape, precision, target))
    widest = max(attentions, key=lambda p: sum(p.values()) - p["weights"])
    parts = dict(widest)
    parts["weights"] = (
        sum(p["weights"] for p in attentions) + elt * 2 * spec.embed_dim * spec.dim_feedforward
    )
    parts["feed-forward hidden layer"] = elt * shape.batch * shape.tgt_len * spec.dim_feedforward
    parts["residual stream"] = FLOAT32 * shape.batch * shape.tgt_len * spec.embed_dim * 2
    return parts


def check_memory(parts: dict[str, int], shape: Shape, limit: int, limit_source: str) -> int:
    """The total of ``parts``; MemoryBoundError naming the largest part when it passes ``limit``."""
    return _check(
        parts,
        f"at its declared maximum shape ({shape}) this graph needs",
        "per call",
        limit,
        limit_source,
        "lower --max-batch or --max-len, or raise --memory-limit",
    )


def _check(
    parts: dict[str, int], what: str, per: str, limit: int, limit_source: str, advice: str
) -> int:
    total = sum(parts.values())
    if total > limit:
        name, size = max(parts.items(), key=lambda item: item[1])
        raise MemoryBoundError(
            f"{what} about {show_bytes(total)}{' ' + per if per else ''}, mostly the {name} ({show_bytes(size)}), more "
            f"than the memory limit of {show_bytes(limit)} ({limit_source}); {advice}"
        )
    return total


# What compile.py holds while it builds, packs, serialises, loads and checks a graph: per weight,
# the float64 initialisation, float32 weights, the ONNX and IR copies, ONNX Runtime's session and,
# with --check, torch's float64 module; and what torch and ONNX Runtime take whatever the size.
# Measured 29 bytes per weight above about 190 MB (docs/RELIABILITY.md, "The memory bound").
WORK_BYTES_PER_PARAMETER = 32
WORK_FIXED_BYTES = 256 * 2**20


def work_parts(parameters: int, latency: dict[str, int] | None = None) -> dict[str, int]:
    """What compiling (and checking, and timing one call at the latency shape) holds at its peak."""
    parts = {
        f"weights as they are built, written and checked ({parameters:,} parameters)": WORK_BYTES_PER_PARAMETER
        * parameters,
        "sessions and references, whatever the size": WORK_FIXED_BYTES,
    }
    for name, size in (latency or {}).items():
        if name != "weights":
            # before and after the passes
            parts[f"{name} of one call at the --latency-shape"] = 2 * size
    return parts


def check_work(parts: dict[str, int], limit: int, limit_source: str) -> int:
    return _check(
        parts,
        "compiling this graph needs",
        "",
        limit,
        limit_source,
        "lower --embed-dim, --dim-feedforward or --latency-shape, or compile on a machine with more memory",
    )


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``16GiB``, ``512MB``, ``2e9``: a positive, finite number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match and match.group(2) in _UNITS:
        try:
            size = int(float(match.group(1)) * _UNITS[match.group(2)])
        except (ValueError, OverflowError):  # '1.2.3'; '1e400' is infinite
            size = 0
        if size > 0:
            return size
    raise ValueError(f"expected a size such as 16GiB, 512MB or 2e9 (bytes), got {text!r}")


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def show_bytes(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024:
            break
    return f"{size:.1f} {unit}"


def parameters(spec: Any) -> int:
    """How many weights the spec's module holds."""
    from graphs.blocks import BlockSpec, block_shapes
    from graphs.weights import expected_shapes

    shapes = block_shapes(spec) if isinstance(spec, BlockSpec) else expected_shapes(spec)
    return sum(math.prod(shape) for shape in shapes.values())


def memory_record(spec: Any, settings: Any) -> dict[str, Any] | None:
    """MemoryBoundError, before anything is allocated, when the work (building, checking, timing)
    would not fit this machine's memory, or one call at the declared maximum shape would pass
    ``settings.memory_limit``; the estimate at that shape, for the manifest."""
    parts_of = attention_parts if isinstance(spec, AttentionSpec) else block_parts
    latency = None
    if settings.latency:
        shape = Shape(*settings.latency_shape)
        latency = parts_of(spec, shape, settings.precision, "portable")
    if (memory := machine_memory()) is not None:
        check_work(work_parts(parameters(spec), latency), memory, "this machine's memory")
    if not settings.bounded:
        return None
    shape = Shape(settings.max_batch or 8, settings.max_len or 512, settings.max_len or 512)
    limit, source = settings.memory_limit, "--memory-limit"
    if limit is None:
        limit, source = memory, "this machine's memory; set --memory-limit"
    parts = parts_of(spec, shape, settings.precision, settings.target)
    if limit is not None:
        check_memory(parts, shape, limit, source)
    return {
        "max_shape": shape._asdict(),
        "limit_bytes": limit,
        "limit_source": source,
        "parts": parts,
        "estimate_bytes": sum(parts.values()),
    }
