"""Targets as ordered pass lists (docs/ARCHITECTURE.md, Targets)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateInitializersPass,
    InlinePass,
    NameFixPass,
    ShapeInferencePass,
)

from compiler.batched_heads import BatchedHeadsPass
from compiler.cleanup import CleanupPass
from compiler.float16 import Float16Pass
from compiler.fold_scale import FoldScalePass
from compiler.fuse_onnx_attention import ATTENTION_OPSET, FuseOnnxAttentionPass
from compiler.fuse_ort_mha import FuseOrtCpuAttentionPass, FuseOrtMultiHeadAttentionPass
from compiler.fuse_ort_norm_gelu import FuseOrtNormGeluPass, ResidualSumPass
from compiler.guard_after_context import GuardAfterContextPass
from compiler.opset import UpgradeOpsetPass
from compiler.opset_forms import MatchOpsetPass
from compiler.pack_projections import PackProjectionsPass
from compiler.quantize_int8 import DynamicInt8Pass, int8_layers, kept_layers
from compiler.quantize_static import Calibration, StaticInt8Pass

TARGETS = ("portable", "onnx-attention", "ort-cpu", "ort-cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")

PassFactory = Callable[[], ir.passes.PassBase]


class TargetError(ValueError):
    """A target, form or precision that does not exist."""


@dataclass(frozen=True)
class Form:
    name: str
    passes: tuple[PassFactory, ...]
    note: str
    # the pass that fuses the core, with its refuse(core) -> reason | None
    fusion: type | None = None


@dataclass(frozen=True)
class Target:
    name: str
    forms: tuple[Form, ...]  # the first is the default
    int8: Form | None = None  # the form --precision int8 takes, where the target has one
    # int8 as calibrated QDQ with symmetric int8 activations (TensorRT's explicit quantization, and
    # standard ops for any runtime); otherwise ONNX Runtime's CPU forms, dynamic unless calibrated
    int8_qdq: bool = False

    def form(self, name: str | None) -> Form:
        if name is None:
            return self.forms[0]
        for form in self.forms:
            if form.name == name:
                return form
        raise TargetError(
            f"target {self.name!r} has no form {name!r}; choose one of "
            f"{', '.join(f.name for f in self.forms)}"
        )


# Model-local functions inlined first: the matchers walk the main graph, and torch's legacy exporter
# with export_modules_as_functions puts whole layers in functions (ONNX Runtime inlines them anyway).
# Shape inference next: the matcher of heads-split cores needs ranks (graphs from elsewhere).
# Fold before packing: once packed, the query's slice of the weight cannot be scaled alone.
# CSE before both, so that projections of one tensor through duplicated layout ops are seen to share it.
# on ONNX Runtime's CPU, packing pays up to this many rows (docs/BENCHMARKS.md, "Packing")
PACK_ROWS_CPU = 256
_PREPARE: tuple[PassFactory, ...] = (
    InlinePass,
    ShapeInferencePass,
    CommonSubexpressionEliminationPass,
    FoldScalePass,
    PackProjectionsPass,
)
_PORTABLE = Form(
    "matmul-softmax",
    _PREPARE,
    "standard ops (opset 18), scale folded into the query projection, projections that share an input packed",
)
_ONNX_ATTENTION = Form(
    "attention-op",
    _PREPARE
    + (
        BatchedHeadsPass,
        functools.partial(UpgradeOpsetPass, ATTENTION_OPSET),
        FuseOnnxAttentionPass,
    ),
    f"opset {ATTENTION_OPSET}, the attention core fused into the standard Attention op "
    "(with need_weights its qk_matmul_output returns the weights)",
    FuseOnnxAttentionPass,
)
_ONNX_ATTENTION_BLOCKS = Form(
    "attention-op-blocks",
    _PREPARE
    + (
        BatchedHeadsPass,
        functools.partial(UpgradeOpsetPass, ATTENTION_OPSET),
        functools.partial(FuseOnnxAttentionPass, query_blocks=True),
    ),
    f"opset {ATTENTION_OPSET}, the attention core fused into the standard Attention op, one op per block of queries "
    "(each with its rows of the mask; not with need_weights or a KV cache), so that a call holds (batch, heads, block, "
    "keys) scores, not (batch, heads, queries, keys): memory linear in length",
    FuseOnnxAttentionPass,
)
_ORT_CPU = Form(
    "ms-multihead-attention",
    _PREPARE[:-1]
    + (
        functools.partial(PackProjectionsPass, max_rows=PACK_ROWS_CPU),
        FuseOrtCpuAttentionPass,
        # what the fused cores each compute from one mask, once (initializers deduplicated first: each
        # core's constants are its own until then)
        DeduplicateInitializersPass,
        CommonSubexpressionEliminationPass,
        functools.partial(FuseOrtNormGeluPass, skip_norm=False),
        ResidualSumPass,
    ),
    "portable but projections packed only where at most 256 rows (batch x length) are known, or with a KV "
    "cache, with the attention core fused into com.microsoft MultiHeadAttention (or, for short inputs "
    "of a core whose q, k, v are projections of one input, com.microsoft.Attention on that input) "
    "(left unfused with need_weights: that op cannot return the weights), padding and causal masks in "
    "forms that keep its flash kernel (query blocks for causal); an exported decoder's KV cache into "
    "GroupQueryAttention where that saves the export's repeat of grouped keys or a dead-row guard; "
    "GELU as Gelu; RMSNorms in the Div form "
    "ONNX Runtime fuses; residual sums before a LayerNorm or RMSNorm written as Sum, which ONNX Runtime's CPU session leaves apart from it "
    "(its SkipLayerNormalization is slower there)",
    FuseOrtCpuAttentionPass,
)
_ORT_CPU_INT8 = Form(
    _ORT_CPU.name,
    tuple(
        functools.partial(FuseOrtCpuAttentionPass, attention_op=False)
        if make is FuseOrtCpuAttentionPass
        else make
        for make in _ORT_CPU.passes
    ),
    "ort-cpu's form without com.microsoft.Attention (it would keep the projections float32), then every "
    "MatMul with a constant weight in int8 (per output channel) on activations quantized per call: "
    "ONNX Runtime's dynamic quantization, which its session runs as DynamicQuantizeMatMul; the attention "
    "op, normalisations and residual sums stay float32",
    FuseOrtCpuAttentionPass,
)
_ORT_CUDA = Form(
    "ms-multihead-attention",
    _PREPARE + (FuseOrtMultiHeadAttentionPass, FuseOrtNormGeluPass),
    "portable, with the attention core fused into com.microsoft MultiHeadAttention "
    "(left unfused with need_weights: that op cannot return the weights); in blocks, residual LayerNorms "
    "as SkipLayerNormalization, GELU as Gelu and RMSNorms in the Div form ONNX Runtime fuses",
    FuseOrtMultiHeadAttentionPass,
)
_TENSORRT_MATMUL = Form(
    "matmul-softmax",
    _PREPARE + (GuardAfterContextPass,),
    "portable, with the fully-masked-row guard moved after the context MatMul so that the core is "
    "the MatMul-Softmax-MatMul chain TensorRT fuses (TensorRT 8.6+)",
)

_QDQ_NOTE = (
    "; then QuantizeLinear/DequantizeLinear pairs on both inputs of every MatMul with a constant weight: "
    "weights int8 per output channel, activations int8 with zero point 0 at scales calibrated on "
    "the --calibrate inputs (or drawn ones), the form TensorRT's explicit quantization takes; the "
    "outputs, softmax, normalisations and residual sums stay float32"
)
TARGET_SPECS = {
    "portable": Target(
        "portable",
        (_PORTABLE,),
        dataclasses.replace(_PORTABLE, note=_PORTABLE.note + _QDQ_NOTE),
        int8_qdq=True,
    ),
    "onnx-attention": Target("onnx-attention", (_ONNX_ATTENTION, _ONNX_ATTENTION_BLOCKS)),
    "ort-cpu": Target("ort-cpu", (_ORT_CPU,), _ORT_CPU_INT8),
    "ort-cuda": Target("ort-cuda", (_ORT_CUDA,)),
    # the Attention op needs TensorRT 10.14+
    "tensorrt": Target(
        "tensorrt",
        (_TENSORRT_MATMUL, _ONNX_ATTENTION),
        dataclasses.replace(_TENSORRT_MATMUL, note=_TENSORRT_MATMUL.note + _QDQ_NOTE),
        int8_qdq=True,
    ),
}


def get_target(name: str, precision: str = "fp32", form: str | None = None) -> tuple[Target, Form]:
    if name not in TARGET_SPECS:
        raise TargetError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise TargetError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    target = TARGET_SPECS[name]
    if precision != "int8":
        return target, target.form(form)
    int8 = [t for t, spec in TARGET_SPECS.items() if spec.int8 is not None]
    if target.int8 is None:
        raise TargetError(
            f"precision int8 runs on {', '.join(int8)} only; target {name!r} takes fp32 or fp16"
        )
    if form is not None and form != target.int8.name:
        raise TargetError(
            f"target {name!r} has no int8 form {form!r}; its one is {target.int8.name!r}"
        )
    return target, target.int8


FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupQueryAttention")


def attention_form(model: onnx.ModelProto) -> str:
    """The form the attention core took in a compiled graph, for the manifest."""
    fused = sorted(
        {
            f"{n.domain or 'ai.onnx'}.{n.op_type}"
            for n in every_node(model.graph)
            if n.op_type in FUSED_OPS
        }
    )
    return ", ".join(fused) if fused else "unfused MatMul-Softmax-MatMul"


def every_node(graph: onnx.GraphProto):
    """Every node, those of If and Loop bodies too (a causal core runs in query blocks there)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from every_node(attr.g)


def compile_model(
    model: onnx.ModelProto,
    target: str,
    precision: str = "fp32",
    form: str | None = None,
    keep_fp32: Collection[str] = (),
    calibration: Calibration | None = None,
) -> onnx.ModelProto:
    """Run ``target``'s passes, in order, over a copy of ``model``; fp16 converts after fusion, int8
    (the target's int8 form) quantizes last, but the layers ``keep_fp32`` names (modules, as
    ``int8_layers`` gives them), with activation scales from ``calibration`` where given (static;
    portable and tensorrt need it), and every node then takes the signature of the model's opset."""
    if precision == "int8":
        return quantize(prepare_int8(model, target, form), target, keep_fp32, calibration)
    if keep_fp32:
        raise TargetError(
            f"keep_fp32 chooses layers that int8 leaves float32; precision is {precision}"
        )
    _, chosen = get_target(target, precision, form)
    passes = [make() for make in chosen.passes]
    if precision == "fp16":
        passes.append(Float16Pass())
    return _run(model, passes)


def prepare_int8(model: onnx.ModelProto, target: str, form: str | None = None) -> onnx.ModelProto:
    """The target's int8 form up to quantizing, every node named: what ``quantize`` takes, once for
    every choice of layers to keep. The quantizer infers shapes, which needs the opset's signatures."""
    _, chosen = get_target(target, "int8", form)
    return _run(model, [make() for make in chosen.passes] + [MatchOpsetPass(), NameFixPass()])


def quantize(
    prepared: onnx.ModelProto,
    target: str,
    keep_fp32: Collection[str] = (),
    calibration: Calibration | None = None,
) -> onnx.ModelProto:
    """``prepared`` (from ``prepare_int8``) in ``target``'s int8, but the layers ``keep_fp32``
    names: dynamic without ``calibration`` (ort-cpu), else calibrated QDQ."""
    qdq = get_target(target, "int8")[0].int8_qdq
    if qdq and calibration is None:
        raise TargetError(
            f"int8 on {target} is calibrated (QDQ with fixed activation scales): give calibration inputs"
        )
    ir_model = ir.serde.deserialize_model(prepared)
    layers = int8_layers(ir_model)
    for name in keep_fp32:
        if not kept_layers(layers, [name]):
            known = sorted(layers)
            raise TargetError(
                f"keep_fp32 {name!r} is no layer that int8 quantizes, nor a module above one; they "
                f"are {', '.join(known[:6])}"
                + (f" and {len(known) - 6} more" if len(known) > 6 else "")
            )
    kept = kept_layers(layers, keep_fp32)
    if calibration is None:
        return _run(prepared, [DynamicInt8Pass([n for k in kept for n in layers[k]])])
    nodes = [n for layer, names in layers.items() if layer not in kept for n in names]
    return _run(prepared, [StaticInt8Pass(calibration, nodes, symmetric=qdq)])


def _run(model: onnx.ModelProto, passes: list[ir.passes.PassBase]) -> onnx.ModelProto:
    result = ir.passes.Sequential(*passes, MatchOpsetPass(), CleanupPass())(
        ir.serde.deserialize_model(model)
    )
    return ir.serde.serialize_model(result.model)
