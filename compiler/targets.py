"""Targets as ordered pass lists (DESIGN.md, Targets)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from compiler.cleanup import CleanupPass
from compiler.fold_scale import FoldScalePass
from compiler.fuse_ort_mha import FuseOrtMultiHeadAttentionPass
from compiler.pack_projections import PackProjectionsPass

TARGETS = ("portable", "onnx-attention", "ort-cpu", "ort-cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16")


class TargetError(ValueError):
    """A target or precision that does not exist, or is not available yet."""


@dataclass(frozen=True)
class Target:
    name: str
    passes: tuple[Callable[[], ir.passes.PassBase], ...]
    precisions: tuple[str, ...]
    note: str


_AVAILABLE = {
    # Fold before packing: once packed, the query's slice of the weight cannot be scaled alone.
    # CSE first, so that projections of one tensor through duplicated layout ops are seen to share it.
    "portable": Target("portable", (CommonSubexpressionEliminationPass, FoldScalePass, PackProjectionsPass, CleanupPass),
                       ("fp32",),
                       "standard ops (opset 18), scale folded into the query projection, projections that share an input packed"),
    "ort-cpu": Target("ort-cpu", (CommonSubexpressionEliminationPass, FoldScalePass, PackProjectionsPass,
                                  FuseOrtMultiHeadAttentionPass, CleanupPass), ("fp32",),
                      "portable, with the attention core fused into com.microsoft MultiHeadAttention "
                      "(left unfused with need_weights: that op cannot return the weights)"),
}


def get_target(name: str, precision: str = "fp32") -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise TargetError(f"unknown precision {precision!r}; choose fp32 or fp16")
    if name not in _AVAILABLE:
        raise TargetError(f"target {name!r} is not available yet (it arrives with the compiler-passes issue); use --target portable")
    target = _AVAILABLE[name]
    if precision not in target.precisions:
        raise TargetError(f"precision {precision} is not available yet for target {name!r}; use --precision fp32")
    return target


FUSED_OPS = ("MultiHeadAttention", "Attention")


def attention_form(model: onnx.ModelProto) -> str:
    """The form the attention core took in a compiled graph, for the manifest."""
    fused = sorted({f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in model.graph.node if n.op_type in FUSED_OPS})
    return ", ".join(fused) if fused else "unfused MatMul-Softmax-MatMul"


def compile_model(model: onnx.ModelProto, target: str, precision: str = "fp32") -> onnx.ModelProto:
    """Run ``target``'s passes, in order, over a copy of ``model``."""
    spec = get_target(target, precision)
    ir_model = ir.serde.deserialize_model(model)
    ir.passes.Sequential(*(make() for make in spec.passes))(ir_model)
    return ir.serde.serialize_model(ir_model)
