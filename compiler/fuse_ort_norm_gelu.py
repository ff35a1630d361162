"""ONNX Runtime's fused block ops for the ort targets: the exact erf GELU becomes com.microsoft.Gelu,
and for ort-cuda LayerNormalization over a residual Add becomes com.microsoft.SkipLayerNormalization.

Written as onnxscript rewrite rules (pattern / check / rewrite). In a pre-norm block the residual
sum is also the next sub-layer's input, so that rule keeps it as SkipLayerNormalization's
fourth output (input_skip_bias_sum).

ort-cpu keeps Add and LayerNormalization apart instead: ONNX Runtime 1.32's CPU
SkipLayerNormalization takes 3 to 7 times as long as the pair (docs/BENCHMARKS.md, "LayerNorm on
CPU"), and its session would fuse the pair itself wherever the shapes are known, in our graphs and in
exported ones alike. ResidualSumPass writes that Add as Sum, the same sum, which its fusion leaves alone.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from compiler._ir import constant

MS = "com.microsoft"


def _gelu_erf(op, x):  # noqa: ANN001, ANN202: pattern functions take the rewriter's op builder
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Div(x, math.sqrt(2.0))), 1.0))


def _gelu_erf_half_outside(op, x):  # noqa: ANN001, ANN202: x * (0.5 * (erf(x / sqrt 2) + 1)), as torch's exporter writes it
    return op.Mul(x, op.Mul(0.5, op.Add(op.Erf(op.Div(x, math.sqrt(2.0))), 1.0)))


def _gelu(op, x):  # noqa: ANN001, ANN202
    return op.Gelu(x, _domain=MS)


def _residual_norm_BSD(op, x, skip, gamma, beta, epsilon):  # noqa: ANN001, ANN202
    return op.LayerNormalization(op.Add(x, skip), gamma, beta, axis=-1, epsilon=epsilon)


def _residual_norm_no_bias_BSD(op, x, skip, gamma, epsilon):  # noqa: ANN001, ANN202
    return op.LayerNormalization(op.Add(x, skip), gamma, axis=-1, epsilon=epsilon)


def _residual_norm_kept_sum_BSD(op, x, skip, gamma, beta, epsilon):  # noqa: ANN001, ANN202
    total = op.Add(x, skip)
    return op.LayerNormalization(total, gamma, beta, axis=-1, epsilon=epsilon), total


def _residual_norm_no_bias_kept_sum_BSD(op, x, skip, gamma, epsilon):  # noqa: ANN001, ANN202
    total = op.Add(x, skip)
    return op.LayerNormalization(total, gamma, axis=-1, epsilon=epsilon), total


def _skip_norm(op, x, skip, gamma, beta, epsilon):  # noqa: ANN001, ANN202
    return op.SkipLayerNormalization(x, skip, gamma, beta, epsilon=epsilon.value, _domain=MS)


def _skip_norm_no_bias(op, x, skip, gamma, epsilon):  # noqa: ANN001, ANN202
    return op.SkipLayerNormalization(x, skip, gamma, epsilon=epsilon.value, _domain=MS)


def _skip_norm_kept_sum(op, x, skip, gamma, beta, epsilon):  # noqa: ANN001, ANN202
    out, _, _, total = op.SkipLayerNormalization(x, skip, gamma, beta, epsilon=epsilon.value, _domain=MS, _outputs=4)
    return out, total


def _skip_norm_no_bias_kept_sum(op, x, skip, gamma, epsilon):  # noqa: ANN001, ANN202
    out, _, _, total = op.SkipLayerNormalization(x, skip, gamma, epsilon=epsilon.value, _domain=MS, _outputs=4)
    return out, total


def _same_shape_3d(context, x, skip, gamma, **_) -> bool:  # noqa: ANN001
    """SkipLayerNormalization wants (batch, seq, hidden) input and skip and a 1-D gamma over hidden."""
    g = constant(gamma)
    return (g is not None and g.ndim == 1 and x.shape is not None and skip.shape is not None
            and len(x.shape) == 3 and len(skip.shape) == 3 and x.shape[-1] == skip.shape[-1] == g.shape[0])


_GELU = [pattern.RewriteRule(_gelu_erf, _gelu, name="GeluErf"),
         pattern.RewriteRule(_gelu_erf_half_outside, _gelu, name="GeluErfHalfOutside")]
_SKIP_NORM = [
    pattern.RewriteRule(_residual_norm_BSD, _skip_norm, _same_shape_3d, name="SkipLayerNorm"),
    pattern.RewriteRule(_residual_norm_no_bias_BSD, _skip_norm_no_bias, _same_shape_3d, name="SkipLayerNormNoBias"),
    pattern.RewriteRule(_residual_norm_kept_sum_BSD, _skip_norm_kept_sum, _same_shape_3d, name="SkipLayerNormSum"),
    pattern.RewriteRule(_residual_norm_no_bias_kept_sum_BSD, _skip_norm_no_bias_kept_sum, _same_shape_3d,
                        name="SkipLayerNormNoBiasSum"),
]


class FuseOrtNormGeluPass(ir.passes.InPlacePass):
    """The block ops ONNX Runtime has fused kernels for; bare attention graphs have none of them.
    Needs shapes (SkipLayerNormalization takes 3-D input only): run after shape inference.
    ``skip_norm=False`` (ort-cpu) fuses GELU only."""

    def __init__(self, skip_norm: bool = True) -> None:
        super().__init__()
        self.rules = pattern.RewriteRuleSet([*_GELU, *(_SKIP_NORM if skip_norm else [])], commute=True)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = self.rules.apply_to_model(model)
        if count:
            model.opset_imports.setdefault(MS, 1)
        return ir.passes.PassResult(model, bool(count))


class ResidualSumPass(ir.passes.InPlacePass):
    """Add -> LayerNormalization becomes Sum -> LayerNormalization: the same sum, which ONNX Runtime's
    SkipLayerNormFusion (it looks for Add) does not turn into its slower CPU kernel."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in list(model.graph):
            if node.op_type != "LayerNormalization" or node.domain:
                continue
            add = node.inputs[0].producer()
            if add is None or add.op_type != "Add" or add.domain:
                continue
            total = ir.node("Sum", list(add.inputs), name=add.name)
            model.graph.insert_before(add, total)
            add.outputs[0].replace_all_uses_with(total.outputs[0], replace_graph_outputs=True)
            total.outputs[0].name, total.outputs[0].type, total.outputs[0].shape = (
                add.outputs[0].name, add.outputs[0].type, add.outputs[0].shape)
            model.graph.remove(add, safe=True)
            count += 1
        return ir.passes.PassResult(model, bool(count))


__all__ = ["FuseOrtNormGeluPass", "ResidualSumPass"]
