"""Fuse the attention core into the standard ONNX Attention op (opset 23)."""

from __future__ import annotations

import onnx_ir as ir

from compiler.attention_core import (dead_rows, emitter, find_cores, full_bias, replace_core, zero_dead_context,
                                     zero_dead_weights)

ATTENTION_OPSET = 23
_AFTER_SOFTMAX = 3  # qk_matmul_output_mode: the fourth output holds the post-softmax scores


class FuseOnnxAttentionPass(ir.passes.InPlacePass):
    """The attention core (compiler/attention_core.py) -> one Attention node, 3-D form
    (q_num_heads = kv_num_heads = H), the scale explicit.

    With need_weights the op's qk_matmul_output (mode 3, after softmax) replaces the weights, so
    the core still fuses. The mask becomes attn_mask, full over query and key (ONNX Runtime
    refuses a mask that only broadcasts there). Where the graph had the fully-masked guard, the
    context and weights of rows whose whole mask row is -inf are set to 0 from the mask: the
    operator spec leaves softmax over an all -inf row to the runtime.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cores = find_cores(graph)
        if cores and model.opset_imports.get("", 1) < ATTENTION_OPSET:
            raise ir.passes.PassError(f"the Attention op needs opset {ATTENTION_OPSET}; run UpgradeOpsetPass first")
        for core in cores:
            new: list[ir.Node] = []
            add = emitter(graph, new)
            bias = full_bias(graph, core, add)
            attrs = {"q_num_heads": core.num_heads, "kv_num_heads": core.num_heads, "scale": core.scale}
            if core.weights is not None:
                attrs["qk_matmul_output_mode"] = _AFTER_SOFTMAX
            node = ir.node("Attention", [core.q, core.k, core.v, bias], attrs, name="attention/Attention",
                           num_outputs=4 if core.weights is not None else 1)
            node.outputs[0].name = "attention/Attention"
            new.append(node)
            context, weights = node.outputs[0], None
            if core.weights is not None:
                weights = node.outputs[3]
                weights.name = "attention/Attention:weights"
            if core.guarded and bias is not None:
                dead = dead_rows(graph, bias, add)
                context = zero_dead_context(graph, core, context, dead, add)
                if weights is not None:
                    weights = zero_dead_weights(graph, weights, dead, add)
            replace_core(graph, core, new, context, weights)
        return ir.passes.PassResult(model, bool(cores))
