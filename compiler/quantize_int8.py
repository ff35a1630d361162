"""int8 on ONNX Runtime's CPU: the model's weight matrices in int8, per output channel, and the
activations quantized at run time, by ONNX Runtime's own dynamic quantizer.

Every MatMul or Gemm whose weight is a constant (the Q/K/V and output projections, the
feed-forward layers) becomes MatMulInteger on a uint8 activation quantized per call and an int8
weight quantized per column (DynamicQuantizeLinear, MatMulInteger, a Cast and the scale's Mul,
which ONNX Runtime's session fuses into DynamicQuantizeMatMul). What reads or writes the
activations between them (the fused attention op, Softmax, LayerNorm, GELU, residual sums) stays
float32, so the attention core stays one op. This is ``onnxruntime.quantization.quantize_dynamic``
on the model in memory: its quantizer (``ONNXQuantizer``), which first rewrites each Gemm as MatMul
and Add, then infers shapes for the element types it needs (in a temporary folder of its own, which
it removes: ONNX's inference of a model over 2 GiB goes through a file). It runs after
MatchOpsetPass has given every node its opset's signature: an opset-14 graph's Shape with start and
end would infer wrong.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import onnx_ir as ir

from compiler._ir import module_path

# Weights in 7 bits (-64..63): x86 CPUs without VNNI multiply uint8 by int8 in pairs summed into
# int16 (vpmaddubsw), which saturates with 8-bit weights: 19% relative error on one random 64 x 64
# MatMul where 7 bits give 1%. A graph may run on another CPU than the one that compiled it, so
# always 7 bits.
REDUCE_RANGE = True
# the ops whose weights go to int8 (a Gemm too: the quantizer makes it MatMul and Add first); the
# fused attention and normalisation ops keep float32
QUANTIZED_OPS = ("MatMul",)


def layer_name(node: ir.Node) -> str:
    """The module a MatMul belongs to, as the per-core findings print it: the exporter's record, else
    its node's name up to the op (``residual2/linear1/MatMul``: ``residual2.linear1``)."""
    name = node.name or ""
    return module_path(name, node.metadata_props) or ".".join(name.split("/")[:-1]) or name


def int8_layers(model: ir.Model) -> dict[str, list[str]]:
    """The layers int8 quantizes, each with its nodes' names: every MatMul or Gemm of the main graph
    whose weight is a constant. The nodes must be named (NameFixPass), as the quantizer excludes
    nodes by name."""
    layers: dict[str, list[str]] = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and not node.domain and len(node.inputs) > 1:
            weight = node.inputs[1]
            if weight is not None and weight.is_initializer():
                layers.setdefault(layer_name(node), []).append(node.name)
    return layers


def kept_layers(layers: Iterable[str], names: Collection[str]) -> list[str]:
    """The layers ``names`` keep in float32: a layer named, or one under a module named (``encoder.layer.0``
    keeps every projection of that layer)."""
    return [
        layer
        for layer in layers
        if any(layer == name or layer.startswith(f"{name}.") for name in names)
    ]


class DynamicInt8Pass(ir.passes.FunctionalPass):
    """Weights int8 per channel, activations uint8 per call, on every constant-weight MatMul but the
    nodes named in ``keep`` (kept float32)."""

    def __init__(self, keep: Collection[str] = ()) -> None:
        super().__init__()
        # a Gemm is quantized as the MatMul the quantizer makes of it, named after it
        self.keep = sorted({n for name in keep for n in (name, f"{name}_MatMul")})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.quantization import QuantizationMode, QuantType
        from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer

        proto = ir.serde.serialize_model(model)
        quantizer = ONNXQuantizer(
            proto,
            True,  # per_channel
            REDUCE_RANGE,
            QuantizationMode.IntegerOps,
            False,  # static
            QuantType.QInt8,
            QuantType.QUInt8,  # the dynamic activations' type ONNX Runtime takes
            None,
            [],
            self.keep,
            list(QUANTIZED_OPS),
            {"MatMulConstBOnly": True},
        )
        quantizer.quantize_model()
        quantized = ir.serde.deserialize_model(quantizer.model.model)
        quantized.metadata_props.pop("onnx.infer", None)  # the quantizer's mark of its inference
        return ir.passes.PassResult(quantized, True)
