"""Fuse the attention core into the standard ONNX Attention op (opset 23)."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from compiler._ir import model_graphs, new_initializer
from compiler.attention_core import (
    Core,
    as_output,
    as_the_graph_reads,
    combined_mask,
    dead_rows,
    emitter,
    followed,
    full_bias,
    keys_bnsh,
    leaves_nan_rows,
    mask_key,
    rank4,
    replace_core,
    summed,
    unfusable,
    unique_scope,
    zero_dead_context,
    zero_dead_weights,
)
from compiler.core_patterns import repeated_heads
from compiler.core_survey import find_cores
from compiler.joined_cache import shapes_before_repeat
from compiler.lowerings.query_blocks import query_blocks
from compiler.mask_ops import op_inputs
from compiler.mask_terms import mask_terms

ATTENTION_OPSET = 23
_AFTER_SOFTMAX = 3  # qk_matmul_output_mode: the fourth output holds the post-softmax scores


class FuseOnnxAttentionPass(ir.passes.InPlacePass):
    """The attention core (compiler/attention_core.py) -> one Attention node: the 3-D form
    (q_num_heads = kv_num_heads = H) for BSD cores, the 4-D form for BNSH cores, with grouped-query
    keys and values given before their repeat; the scale explicit.

    With need_weights the op's qk_matmul_output (mode 3, after softmax) replaces the weights, so
    the core still fuses. The mask becomes attn_mask, full over query and key (ONNX Runtime
    refuses a mask that only broadcasts there). Rows whose whole mask row is -inf get a zero
    context and zero weights, from the mask: the operator spec leaves softmax over an all -inf
    row to the runtime. A KV cache goes in as past_key/past_value and comes out as present_key/
    present_value; the causal mask stays in attn_mask, since the op's is_causal aligns top-left.
    """

    def __init__(self, query_blocks: bool = False) -> None:
        super().__init__()
        # masked cores in blocks of queries: memory O(block x S), not O(L x S)
        self.query_blocks = query_blocks

    @staticmethod
    def refuse(core: Core) -> str | None:
        return unfusable(core)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = False
        for graph in model_graphs(model):  # If branches and Loop bodies too
            cores = [core for core in find_cores(graph) if self.refuse(core) is None]
            if cores and model.opset_imports.get("", 1) < ATTENTION_OPSET:
                raise ir.passes.PassError(
                    f"the Attention op needs opset {ATTENTION_OPSET}; run UpgradeOpsetPass first"
                )
            self._fuse(graph, cores)
            fused = fused or bool(cores)
        return ir.passes.PassResult(model, fused)

    def _fuse(self, graph: ir.Graph, cores: list[Core]) -> None:
        replaced: dict[ir.Value, ir.Value] = {}
        biases: dict = {}  # the masks' broadcasts, by what makes two the same (_bias)
        for core in cores:
            core = followed(core, replaced)
            new: list[ir.Node] = []
            scope = unique_scope(graph)
            add = emitter(new, scope)
            if self.query_blocks and _blockable(core):
                context = _in_blocks(graph, core, add, scope)
                replace_core(graph, core, new, context, replaced_so_far=replaced)
                continue
            mask, bias = self._bias(graph, core, add, biases)
            node = _attention_node(graph, core, add, bias, scope)
            cache = core.cache
            new.append(node)
            context, weights = node.outputs[0], None
            if core.weights is not None:
                weights = node.outputs[3]
                weights.name = f"{scope}/Attention:weights"
            if core.zeroes_dead_rows:
                dead = dead_rows(graph, rank4(mask) or bias, add)
                context = zero_dead_context(graph, core, context, dead, add, core.layout)
                if weights is not None:
                    weights = zero_dead_weights(graph, weights, dead, add)
            context = as_output(graph, core, context, add)
            replace_core(
                graph,
                core,
                new,
                context,
                weights,
                tuple(node.outputs[1:3]) if cache is not None else None,
                replaced,
            )

    @staticmethod
    def _bias(graph: ir.Graph, core: Core, add, biases: dict) -> tuple:
        """(the core's masks summed, the op's attn_mask): built once for the cores that read the
        same masks at the same lengths (T5's relative position bias in every layer), not copied
        per layer."""
        shared = mask_key(core)
        key = (*shared, leaves_nan_rows(core)) if shared is not None else None
        if key in biases:
            return biases[key]
        mask = combined_mask(core, add)
        bias = full_bias(graph, core, add, mask)
        if bias is not None:
            bias = as_the_graph_reads(graph, bias, add, leaves_nan_rows(core))
        if key is not None:
            biases[key] = (mask, bias)
        return mask, bias


def _attention_node(graph: ir.Graph, core: Core, add, bias: ir.Value | None, scope: str) -> ir.Node:
    """The standard Attention op over the core: BSD q, k, v with the head counts stated, or BNSH
    (grouped-query keys and values as they were before their repeat); with the weights after the
    softmax as its fourth output, and the cache's past and present."""
    if core.layout == "BSD":
        attrs = {"q_num_heads": core.num_heads, "kv_num_heads": core.num_heads, "scale": core.scale}
        k, v = core.k, core.v
    else:
        attrs = {"scale": core.scale}
        k, v = _grouped(keys_bnsh(core, add), core.v, graph, add)
    if core.weights is not None:
        attrs["qk_matmul_output_mode"] = _AFTER_SOFTMAX
    if core.softcap:
        attrs["softcap"] = core.softcap
    cache = core.cache
    past = [cache.past_key, cache.past_value] if cache is not None else []
    node = ir.node(
        "Attention",
        [core.q, k, v, bias, *past],
        attrs,
        name=f"{scope}/Attention",
        num_outputs=4 if core.weights is not None else 3 if cache is not None else 1,
    )
    node.outputs[0].name = f"{scope}/Attention"
    return node


def _blockable(core: Core) -> bool:
    """No cache, no weights output (the weights need the whole score tensor), heads stated. Unmasked
    cores too: ONNX Runtime's CPU Attention op holds the whole score tensor even without a mask."""
    return (
        core.cache is None
        and core.weights is None
        and core.num_heads is not None
        and core.head_dim is not None
    )


def _in_blocks(graph: ir.Graph, core: Core, add, scope: str) -> ir.Value:
    """The core's output, computed by one Attention op per block of queries (compiler/lowerings/query_blocks.py),
    each with its rows of every mask term, so the op holds (N, H, block, S) scores."""
    h, d = core.num_heads, core.head_dim
    heads = new_initializer(graph, "attention/heads_shape", np.asarray([0, 0, h, d], np.int64))
    merge = new_initializer(graph, "attention/merge_shape", np.asarray([0, 0, h * d], np.int64))
    corner = new_initializer(graph, "attention/mask_corner", np.ones(2, np.int64))
    keep_rows = functools.partial(as_the_graph_reads, graph, nan_rows=leaves_nan_rows(core))
    attend = functools.partial(
        _block_attention, (heads, merge, corner), (core.scale, core.softcap), keep_rows
    )
    terms = mask_terms(core)
    key_bias = summed(terms.keys, add, "key_bias_terms") if terms.keys else None
    context = query_blocks(
        graph,
        core,
        op_inputs(graph, core, add),
        terms,
        key_bias,
        add,
        scope,
        core.zeroes_dead_rows,
        attend,
    )
    if core.layout == "BNSH":
        context = add(
            "Transpose",
            [add("Reshape", [context, heads], "context_bsnh")],
            "context_bnsh",
            {"perm": [0, 2, 1, 3]},
        )
    return as_output(graph, core, context, add)


def _block_attention(
    shapes: tuple[ir.Value, ir.Value, ir.Value],
    scaling: tuple[float | None, float],
    keep_rows,
    op,
    query: ir.Value,
    keys: ir.Value,
    values: ir.Value,
    bias: ir.Value | None,
) -> ir.Value:
    """One block of _in_blocks: the Attention op over the block's queries (N, b, E) and every key,
    with its rows of the bias; ``shapes``: the heads, merge and mask-corner shape constants;
    ``scaling``: the core's scale and soft cap;
    ``keep_rows``: as_the_graph_reads over the block's bias."""
    heads, merge, corner = shapes
    q = op(
        "Transpose",
        [op("Reshape", [query, heads], "query_heads")],
        "query_bnsh",
        {"perm": [0, 2, 1, 3]},
    )
    rows = op("Shape", [query], "block_rows", {"start": 1, "end": 2})
    width = op("Shape", [keys], "block_keys", {"start": 2, "end": 3})
    inputs = [q, keys, values]
    if bias is not None:
        # ONNX Runtime takes a mask full over queries and keys only: a key bias gets its b rows
        shape = op("Concat", [corner, rows, width], "mask_shape", {"axis": 0})
        block_mask = op("Expand", [bias, shape], "block_mask")
        inputs.append(keep_rows(block_mask, op))
    scale, softcap = scaling
    attrs = {"scale": scale, **({"softcap": softcap} if softcap else {})}
    context = op("Attention", inputs, "Attention", attrs)  # (N, H, b, hd)
    return op(
        "Reshape",
        [op("Transpose", [context], "context_bshd", {"perm": [0, 2, 1, 3]}), merge],
        "context",
    )


def _grouped(k: ir.Value, v: ir.Value, graph: ir.Graph, add) -> tuple[ir.Value, ir.Value]:
    """Grouped-query keys and values as the op takes them, before their repeat to the query heads:
    the op reads query head j's keys from head j // (q heads / kv heads) itself."""
    k_kv, v_kv = repeated_heads(k, graph), repeated_heads(v, graph)
    if k_kv is None or v_kv is None or k_kv.shape[1] != v_kv.shape[1]:
        return k, v
    for repeated in (k, v):
        shapes_before_repeat(graph, repeated, add)
    return k_kv, v_kv
