"""ONNX Runtime's fused block ops for the ort targets: the exact erf GELU becomes com.microsoft.Gelu
(with onnxscript's own rules for the forms exporters write),
and for ort-cuda LayerNormalization over a residual Add becomes com.microsoft.SkipLayerNormalization.

An RMSNorm written with Reciprocal (Llama's, as torch's dynamo exporter writes it) is rewritten with
Div, the form ONNX Runtime's session fuses into its SimplifiedLayerNormalization kernel
(docs/BENCHMARKS.md has what that saves on Llama). The fused op itself would fail onnx.checker,
as ONNX Runtime registers it in the ONNX domain, where ONNX has no such op.

Written as onnxscript rewrite rules (pattern / check / rewrite). In a pre-norm block the residual
sum is also the next sub-layer's input, so that rule keeps it as SkipLayerNormalization's
fourth output (input_skip_bias_sum).

ort-cpu keeps Add and LayerNormalization apart instead: ONNX Runtime's CPU
SkipLayerNormalization is slower than the pair (docs/BENCHMARKS.md, "LayerNorm on CPU", has the
figures), and its session would fuse the pair itself wherever the shapes are known, in our graphs and in
exported ones alike. ResidualSumPass writes that Add as Sum, the same sum, which its fusion leaves alone;
the same for an RMSNorm's residual Add (its SkipSimplifiedLayerNormalization is slower there too).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import erfgelu

from compiler._ir import constant

MS = "com.microsoft"


def _gelu_erf(op, x):  # noqa: ANN001, ANN202 -- pattern functions take the rewriter's op builder
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Div(x, math.sqrt(2.0))), 1.0))


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
    out, _, _, total = op.SkipLayerNormalization(
        x, skip, gamma, beta, epsilon=epsilon.value, _domain=MS, _outputs=4
    )
    return out, total


def _skip_norm_no_bias_kept_sum(op, x, skip, gamma, epsilon):  # noqa: ANN001, ANN202
    out, _, _, total = op.SkipLayerNormalization(
        x, skip, gamma, epsilon=epsilon.value, _domain=MS, _outputs=4
    )
    return out, total


def _rms_norm_reciprocal(op, x, two, axes, epsilon, scale):  # noqa: ANN001, ANN202
    rms = op.Sqrt(
        op.Add(op.ReduceMean(op.Pow(x, two), axes, keepdims=1, noop_with_empty_axes=0), epsilon)
    )
    return op.Mul(op.Mul(x, op.Reciprocal(rms)), scale)


def _rms_norm_div(op, x, two, axes, epsilon, scale):  # noqa: ANN001, ANN202
    rms = op.Sqrt(
        op.Add(op.ReduceMean(op.Pow(x, two), axes, keepdims=1, noop_with_empty_axes=0), epsilon)
    )
    return op.Mul(op.Div(x, rms), scale)


def _over_last_axis(context, two, axes, epsilon, **_) -> bool:  # noqa: ANN001
    """A mean square over the last axis plus a scalar epsilon: what SimplifiedLayerNormalization computes."""
    square, over, eps = constant(two), constant(axes), constant(epsilon)
    return (
        square is not None
        and square.size == 1
        and float(square.reshape(())) == 2.0
        and over is not None
        and over.reshape(-1).tolist() == [-1]
        and eps is not None
        and eps.size == 1
    )


def _same_shape_3d(context, x, skip, gamma, **_) -> bool:  # noqa: ANN001
    """SkipLayerNormalization wants (batch, seq, hidden) input and skip and a 1-D gamma over hidden."""
    g = constant(gamma)
    return (
        g is not None
        and g.ndim == 1
        and x.shape is not None
        and skip.shape is not None
        and len(x.shape) == 3
        and len(skip.shape) == 3
        and x.shape[-1] == skip.shape[-1] == g.shape[0]
    )


# ours for graphs/blocks.py's (x * 0.5) * (erf + 1); onnxscript's own for 0.5 * (x * (erf + 1)) and
# x * (0.5 * (erf + 1)), the form torch's exporter writes
_GELU = [pattern.RewriteRule(_gelu_erf, _gelu, name="GeluErf"), erfgelu.rule1, erfgelu.rule2]
_RMS_NORM = [
    pattern.RewriteRule(_rms_norm_reciprocal, _rms_norm_div, _over_last_axis, name="RmsNormAsDiv")
]
_SKIP_NORM = [
    pattern.RewriteRule(_residual_norm_BSD, _skip_norm, _same_shape_3d, name="SkipLayerNorm"),
    pattern.RewriteRule(
        _residual_norm_no_bias_BSD, _skip_norm_no_bias, _same_shape_3d, name="SkipLayerNormNoBias"
    ),
    pattern.RewriteRule(
        _residual_norm_kept_sum_BSD, _skip_norm_kept_sum, _same_shape_3d, name="SkipLayerNormSum"
    ),
    pattern.RewriteRule(
        _residual_norm_no_bias_kept_sum_BSD,
        _skip_norm_no_bias_kept_sum,
        _same_shape_3d,
        name="SkipLayerNormNoBiasSum",
    ),
]


class FuseOrtNormGeluPass(ir.passes.InPlacePass):
    """The block ops ONNX Runtime has fused kernels for; bare attention graphs have none of them.
    Needs shapes (SkipLayerNormalization takes 3-D input only): run after shape inference.
    ``skip_norm=False`` (ort-cpu) leaves residual LayerNorms apart."""

    def __init__(self, skip_norm: bool = True) -> None:
        super().__init__()
        self.rules = pattern.RewriteRuleSet(
            [*_GELU, *_RMS_NORM, *(_SKIP_NORM if skip_norm else [])], commute=True
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = self.rules.apply_to_model(model)
        if count:
            model.opset_imports.setdefault(MS, 1)
        return ir.passes.PassResult(model, bool(count))


def _normalized(node: ir.Node) -> ir.Value | None:
    """What a LayerNormalization, or an RMSNorm in the Div form that ONNX Runtime fuses, normalizes."""
    if node.domain:
        return None
    if node.op_type == "LayerNormalization":
        return node.inputs[0]
    if node.op_type != "Div":
        return None
    chain = node.inputs[1]
    for op_type in ("Sqrt", "Add", "ReduceMean", "Pow"):
        producer = chain.producer() if chain is not None else None
        if producer is None or producer.op_type != op_type or producer.domain:
            return None
        chain = producer.inputs[0]
    return node.inputs[0] if producer.inputs[0] is node.inputs[0] else None


class ResidualSumPass(ir.passes.InPlacePass):
    """Add -> LayerNormalization (or RMSNorm) becomes Sum -> it: the same sum, which ONNX Runtime's
    SkipLayerNormFusion (it looks for Add) does not turn into its slower CPU kernel."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in list(model.graph):
            normalized = _normalized(node)
            if normalized is None:
                continue
            add = normalized.producer()
            if add is None or add.op_type != "Add" or add.domain:
                continue
            total = ir.node("Sum", list(add.inputs), name=add.name)
            model.graph.insert_before(add, total)
            add.outputs[0].replace_all_uses_with(total.outputs[0], replace_graph_outputs=True)
            total.outputs[0].name, total.outputs[0].type, total.outputs[0].shape = (
                add.outputs[0].name,
                add.outputs[0].type,
                add.outputs[0].shape,
            )
            model.graph.remove(add, safe=True)
            count += 1
        return ir.passes.PassResult(model, bool(count))


__all__ = ["FuseOrtNormGeluPass", "ResidualSumPass"]
