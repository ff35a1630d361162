"""Fuse the attention core into ONNX Runtime's com.microsoft MultiHeadAttention."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, model_graphs, new_initializer
from compiler.attention_core import (
    Core,
    as_bnsh,
    as_output,
    choose,
    combined_mask,
    dead_rows,
    emitter,
    followed,
    full_bias,
    heads_merge,
    mask_key,
    rank4,
    replace_core,
    summed,
    unfusable,
    unique_scope,
    zero_dead_context,
    zero_scalar,
)
from compiler.core_survey import find_cores
from compiler.joined_cache import grouped_attention, joined_cache
from compiler.lowerings import Lowering, Masked
from compiler.lowerings.causal_blocks import CausalBlocks, CausalInsideBlocks, causal, causal_from
from compiler.lowerings.padded_rows import PaddedRows
from compiler.lowerings.query_blocks import QueryBlocks
from compiler.mask_ops import MS_DOMAIN, as_4d, causal_bias, dead_causal_rows, op_inputs
from compiler.mask_terms import MaskTerms, mask_terms
from compiler.op_source import OpSource, emit_mha
from compiler.qkv_projections import match_projections
from graphs.spec import MAX_LEN_KEY

# below it, com.microsoft.Attention outruns the flash MultiHeadAttention without a mask
ATTENTION_UNTIL = 384
# The lowerings of a masked core (compiler/lowerings/), the first that applies taking it; a mask of
# the key alone takes PADDED_ROWS.
LOWERINGS: tuple[Lowering, ...] = (CausalBlocks(), CausalInsideBlocks(), QueryBlocks())
PADDED_ROWS = PaddedRows()

_LOWEST = float(
    np.finfo(np.float32).min
)  # mask_filter_value: finite, so masked scores never meet exp(-inf)


class FuseOrtMultiHeadAttentionPass(ir.passes.InPlacePass):
    """The attention core (compiler/attention_core.py) -> one MultiHeadAttention node, or, for a causal
    mask on the CPU, query blocks of them.

    ONNX Runtime's CPU kernel runs flash attention only without any mask input, so with
    ``flash_forms`` the masks it can take another way go that way (compiler/lowerings/): a mask
    that depends on the key alone (padding) becomes one more head dimension; a causal self-attention
    mask, with or without padding, becomes query blocks whose visible past is flash attention. Any
    other mask becomes ``attention_bias`` (broadcast over batch and heads, full over query and key),
    so -inf stays -inf: partially masked rows match torch exactly. Rows with every key masked get a
    zero context (docs/ARCHITECTURE.md), from the mask alone, where the graph zeroed them. A BNSH core's query
    is merged to (N, L, E) for the op. A KV cache goes in as the op's past_key and past_value (a bool
    key padding mask as its key_padding_mask), and its present outputs become the graph's.
    """

    def __init__(self, flash_forms: bool = False, attention_op: bool | None = None) -> None:
        super().__init__()
        # ONNX Runtime's CPU kernel; its CUDA kernels take the masks as they are
        self.flash_forms = flash_forms
        # com.microsoft.Attention on the projections' input for short inputs (qkv_projections.py): on the CPU
        self.attention_op = flash_forms if attention_op is None else attention_op

    @staticmethod
    def refuse(core: Core) -> str | None:
        if core.weights is not None:
            return "its weights are used outside the attention, and MultiHeadAttention cannot return them"
        if core.num_heads is None or core.head_dim is None:
            return "the graph does not state its head count and head size, which MultiHeadAttention needs"
        if core.softcap:
            return (
                "its scores are soft-capped (c * tanh(s / c)), which MultiHeadAttention cannot do"
            )
        return unfusable(core)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        declared = model.metadata_props.get(MAX_LEN_KEY)
        self.max_len = int(declared) if declared is not None and declared.isdigit() else None
        fused = [
            self._fuse(graph) for graph in model_graphs(model)
        ]  # If branches and Loop bodies too
        if any(fused):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, any(fused))

    def _fuse(self, graph: ir.Graph) -> bool:
        cores = [core for core in find_cores(graph) if self.refuse(core) is None]
        replaced: dict[ir.Value, ir.Value] = {}
        shared: dict = {}  # what the cores of an exported decoder with its cache share
        keys = [_bias_key(core) for core in cores] if self.flash_forms else []
        self._biases: dict = {key: None for key in keys if key is not None and keys.count(key) > 1}
        for core in cores:
            core = followed(core, replaced)
            new: list[ir.Node] = []
            scope = unique_scope(graph)
            add = emitter(new, scope)
            # on the CPU an exported decoder's cache goes to GroupQueryAttention, with no If for
            # long prompts: decode steps are what such a graph mostly runs (docs/BENCHMARKS.md,
            # "Decoders with their cache")
            joined = joined_cache(core, graph) if self.flash_forms else None
            dead = None
            if joined is not None:
                context, dead, present = grouped_attention(graph, core, joined, add, scope, shared)
                core = dataclasses.replace(core, cache=joined.as_cache())
            else:
                context, present = self._context(graph, core, add, scope)
            bsd = context  # (N, L, E)
            merge = heads_merge(core) if dead is None else None
            if core.layout == "BNSH":
                context = as_bnsh(graph, core, context, add)
                if dead is not None:
                    context = zero_dead_context(graph, core, context, dead, add, "BNSH")
            context = as_output(graph, core, context, add)
            present = present if core.cache is not None else None
            replace_core(graph, core, new, context, present=present, replaced_so_far=replaced)
            if merge is not None:  # the graph's merge of the heads reads the op's (N, L, E)
                merge.replace_input_with(0, bsd)
        return bool(cores)

    def _context(
        self, graph: ir.Graph, core: Core, add, scope: str
    ) -> tuple[ir.Value, tuple[ir.Value, ir.Value] | None]:
        """The core's context (and present keys and values) in the form its masks and this
        target take."""
        cache = core.cache
        terms = mask_terms(core) if self.flash_forms else None
        projections = match_projections(core) if self.flash_forms and self.attention_op else None
        if not self.flash_forms and _causal_alone(core):
            # CUDA: the op's own causal flag, which its flash kernel takes
            q, k, v = op_inputs(graph, core, add)
            attrs = {"num_heads": core.num_heads, "scale": core.scale, "unidirectional": 1}
            return add(
                "MultiHeadAttention", [q, k, v], "MultiHeadAttention", attrs, MS_DOMAIN
            ), None
        source = lambda: OpSource.of(graph, core, projections, add)  # noqa: E731
        if cache is None and terms is not None and (terms.causal or terms.other):
            if _blockable(terms):  # query blocks
                return self._blocked(graph, core, terms, source(), add, scope), None
        if cache is None and terms is not None and terms.key_only:
            # flash, each entry's keys cut after the last visible
            raw = summed(terms.keys, add, "key_bias_terms")
            context = _padding(graph, source(), terms, raw, add, scope, self.max_len)
            if core.zeroes_dead_rows:
                context = zero_dead_context(graph, core, context, dead_rows(graph, raw, add), add)
            return context, None
        if cache is None and core.mask is None and projections is not None:
            return self._attention_or_flash(graph, source(), add, scope), None
        if terms is not None and terms.past is not None and not terms.causal and not terms.other:
            return _prefill_or_step(graph, core, terms, add, scope, self.max_len)
        return _one_op(graph, core, add)

    def _blocked(
        self, graph: ir.Graph, core: Core, terms: MaskTerms, source: OpSource, add, scope: str
    ) -> ir.Value:
        raw = summed(terms.keys, add, "key_bias_terms") if terms.keys else None
        key = _bias_key(core, terms)
        if key in self._biases and self._biases[key] is None:  # the first core that reads it
            self._biases[key] = _whole_bias(graph, source, terms, raw, add)
        whole = self._biases.get(key)
        context = _by_length(graph, source, terms, raw, add, scope, self.max_len, whole)
        if core.zeroes_dead_rows and raw is not None and not terms.other:
            dead = dead_causal_rows(graph, raw, add)
            context = zero_dead_context(graph, core, context, dead, add)
        return context if raw is None else _nan_entries(graph, context, raw, add)

    def _attention_or_flash(self, graph: ir.Graph, source: OpSource, add, scope: str) -> ir.Value:
        """com.microsoft.Attention where short, flash where long."""
        return _switch(
            graph,
            source,
            add,
            scope,
            ATTENTION_UNTIL,
            lambda emit, name: emit_mha(emit, *source.inputs(emit), None, source.core),
            lambda emit, name: source.one_op(emit, None),
            self.max_len,
        )


class FuseOrtCpuAttentionPass(FuseOrtMultiHeadAttentionPass):
    """The fusion on ONNX Runtime's CPU: the masks in the forms that keep its flash kernel, and an
    exported decoder's cache step fused where GroupQueryAttention saves the export's repeat of
    grouped keys and values, or takes as many key heads as query heads and needs no dead-row guard.
    A decode step is a handful of small nodes, and elsewhere the export's own run faster
    (docs/BENCHMARKS.md, "Decoders with their cache")."""

    def __init__(self, attention_op: bool | None = None) -> None:
        super().__init__(flash_forms=True, attention_op=attention_op)

    @staticmethod
    def refuse(core: Core) -> str | None:
        reason = FuseOrtMultiHeadAttentionPass.refuse(core)
        if reason is not None:
            return reason
        cache = joined_cache(core, core.softmax.graph)
        if cache is None or cache.repeated:
            return None
        if core.zeroes_dead_rows or cache.kv_heads < core.num_heads:
            return (
                "it steps an exported decoder's KV cache that the export does not repeat (under a "
                "mask whose rows with no key left it zeroes, or with keys broadcast over the query "
                "heads): such a step runs faster unfused on ONNX Runtime's CPU than through "
                "GroupQueryAttention"
            )
        return None


def _nan_entries(graph: ir.Graph, context: ir.Value, raw: ir.Value, add) -> ir.Value:
    """A NaN anywhere in an entry's key bias reaches every query row of it in torch (a key the
    causal mask hides adds -inf to NaN: NaN), but the causal forms never read the keys they hide
    and call a row with no visible key dead: the entry's rows take the NaN back from the bias."""
    total = add(
        "ReduceSum",
        [raw, new_initializer(graph, "attention/axes123", np.asarray([1, 2, 3], np.int64))],
        "nan_entries/total",
        {"keepdims": 0},
    )  # (N|1,): NaN where the entry's bias holds one
    total = add(
        "Reshape",
        [total, new_initializer(graph, "attention/entry_shape", np.asarray([-1, 1, 1], np.int64))],
        "nan_entries/per_entry",
    )
    return add("Where", [add("IsNaN", [total], "nan_entries/IsNaN"), total, context], "nan_entries")


def _blockable(terms: MaskTerms) -> bool:
    """Whether every term's query axis is known (its rank is): a block takes its rows of each."""
    return all(t.shape is not None and len(t.shape) >= 2 for t in terms.other)


def _by_length(
    graph: ir.Graph,
    source: OpSource,
    terms: MaskTerms,
    raw: ir.Value | None,
    add,
    scope: str,
    max_len: int | None,
    whole: tuple[ir.Value, ir.Value] | None = None,
) -> ir.Value:
    """Masked attention (N, L, E), with the key bias ``raw`` if any: the first of LOWERINGS that
    takes the terms, from the query length it pays from; below it one MultiHeadAttention with the
    whole bias, which is as fast or faster there (docs/BENCHMARKS.md, "Masks"). That bias is built
    inside its branch, so a long input never builds it, unless ``whole`` (_whole_bias) holds it,
    built once for the cores that read the same terms at the same lengths. Fully masked rows are
    zeroed inside the branches where the mask has such terms."""
    masked = Masked(graph, source.core, terms, raw, source.inputs)
    lowering = next(form for form in LOWERINGS if form.applies(masked))

    def one_op(emit, name: str) -> ir.Value:
        summed_bias, bias = whole or _whole_bias(graph, source, terms, raw, emit)
        context = source.one_op(emit, bias)
        if not masked.zero_dead:
            return context
        # dead rows read from the bias before its broadcast: one pass over the mask, not over (N, H, L, S)
        dead = dead_rows(graph, summed_bias, emit)
        return zero_dead_context(graph, source.core, context, dead, emit)

    long = partial(lowering.emit, masked)
    return _switch(graph, source, add, scope, lowering.start(masked), long, one_op, max_len)


def _bias_key(core: Core, terms: MaskTerms | None = None) -> tuple | None:
    """What makes two cores' whole biases one (mask_key): not a causal mask, built per core."""
    key = mask_key(core)
    terms = terms or (mask_terms(core) if key is not None else None)
    if terms is None or not terms.other or terms.causal or terms.past is not None:
        return None
    return key


def _whole_bias(
    graph: ir.Graph, source: OpSource, terms: MaskTerms, raw: ir.Value | None, add
) -> tuple[ir.Value, ir.Value]:
    """(the mask terms summed, broadcast to (N|1, H|1, L, S)): a core's one-op bias, built inside
    its branch, or outside any If once for every core that reads the same terms at the same
    lengths (_bias_key), where each core's own Expand would copy the whole
    bias per layer (T5's relative position bias: about 5% of its encoder at 512 tokens). A mask
    term of other kinds varies along the queries, so the broadcast copies what the graph holds."""
    parts = [as_4d(graph, term, add, f"term_{i}") for i, term in enumerate(terms.other)]
    parts += [causal_bias(graph, source.length, add)] if terms.causal else []
    whole = summed(parts + ([raw] if raw is not None else []), add, "bias")
    if not terms.other:  # a causal bias and key terms broadcast as they are
        return whole, whole
    return whole, full_bias(graph, source.core, add, whole, source.length)


def _padding(
    graph: ir.Graph,
    source: OpSource,
    terms: MaskTerms,
    raw: ir.Value,
    add,
    scope: str,
    max_len: int | None,
) -> ir.Value:
    """Attention (N, L, E) with a mask that depends on the key alone (padding): PaddedRows from the
    length it pays from, on the op's flash path; below it one op with the mask as its
    attention_bias, which is as fast there (docs/BENCHMARKS.md, "Masks")."""
    core = source.core
    masked = Masked(graph, core, terms, raw, source.inputs)

    def one_op(emit, name: str) -> ir.Value:
        return source.one_op(emit, full_bias(graph, core, emit, raw, source.length))

    long = partial(PADDED_ROWS.emit, masked)
    return _switch(graph, source, add, scope, PADDED_ROWS.start(masked), long, one_op, max_len)


def _switch(
    graph: ir.Graph,
    source: OpSource,
    add,
    scope: str,
    threshold: int,
    long,
    short,
    max_len: int | None,
) -> ir.Value:
    """If(query length >= threshold, long, short), each built by ``fn(emit, scope)`` -> context (N, L, E);
    where the graph fixes the length, or declares a largest one (--max-len) below the threshold, the
    one that applies, with no If (it costs ONNX Runtime a few percent: docs/BENCHMARKS.md, "Masks").
    Keys the graph fixes below the threshold (torch's legacy export of its modules fixes them at the
    traced length) take the short form at any query length: it holds (N, H, L, S) scores, linear in L."""
    shape = source.length.shape
    fixed = shape[1] if shape is not None and len(shape) > 1 else None
    if isinstance(fixed, int):
        return (long if fixed >= threshold else short)(add, scope)
    core = source.core
    values = core.v.shape
    keys = (
        values[1 if core.layout == "BSD" else 2] if values is not None and len(values) > 2 else None
    )
    if (max_len is not None and max_len < threshold) or (
        isinstance(keys, int) and keys < threshold
    ):
        return short(add, scope)
    length = add("Shape", [source.length], "query_length", {"start": 1, "end": 2})
    long_input = add(
        "GreaterOrEqual",
        [length, new_initializer(graph, "attention/long_from", np.asarray([threshold], np.int64))],
        "long_input",
    )
    return choose(long_input, scope, add, long, short)


def _causal_alone(core: Core) -> bool:
    """A self-attention core whose only mask is the causal one (L = S, no cache): MultiHeadAttention's
    ``unidirectional`` means exactly that, and ONNX Runtime's CUDA kernel runs flash attention with it
    where an attention_bias would keep it off flash."""
    if core.cache is not None or core.layout != "BSD" or core.mask is None:
        return False
    terms = mask_terms(core)
    return terms.causal and not terms.keys and not terms.other and terms.past is None


def _one_op(graph: ir.Graph, core: Core, add) -> tuple[ir.Value, tuple[ir.Value, ...] | None]:
    """One MultiHeadAttention with the whole mask (a bool key padding mask of a KV-cache graph as its
    key_padding_mask, any other as attention_bias): (context, present or None)."""
    cache = core.cache
    padding = _bool_key_padding(core) if cache is not None else None
    mask = combined_mask(core, add) if padding is None else None
    q, k, v = op_inputs(graph, core, add)
    bias = full_bias(graph, core, add, mask, q)
    keep = None
    if padding is not None:
        keep = add(
            "Cast", [add("Not", [padding], "keep")], "key_padding_mask", {"to": ir.DataType.INT32}
        )
    attrs = {
        "num_heads": core.num_heads,
        "scale": core.scale,
        **({"mask_filter_value": _LOWEST} if keep is not None else {}),
    }
    inputs = [q, k, v, None, keep, bias] + (
        [cache.past_key, cache.past_value] if cache is not None else []
    )
    outputs = add(
        "MultiHeadAttention",
        inputs,
        "MultiHeadAttention",
        attrs,
        MS_DOMAIN,
        3 if cache is not None else 1,
    )
    context, present = (outputs[0], outputs[1:]) if cache is not None else (outputs, None)
    if core.zeroes_dead_rows and keep is not None:
        context = _zero_fully_padded(graph, context, keep, add)
    elif core.zeroes_dead_rows:
        context = zero_dead_context(
            graph, core, context, dead_rows(graph, rank4(mask) or bias or mask, add), add
        )
    return context, present


def _prefill_or_step(
    graph: ir.Graph, core: Core, terms: MaskTerms, add, scope: str, max_len: int | None
) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    """A KV-cache core whose mask is the cache's causal mask (and any key padding): where the cache is
    empty and the prompt has at least CAUSAL_FROM tokens (CHUNKS_FROM where GroupQueryAttention's
    chunks take it) (a prefill), causal_blocks over this step's
    keys, which are all the keys there, with present = this step's heads; else (a decode step, or a
    short prompt) one op with the past (_one_op). (context, (present_key, present_value)).

    The If that chooses costs every decode step a little (docs/BENCHMARKS.md, "Decoding with a KV
    cache", has the figure), and decode steps are what a KV-cache graph mostly runs, so it is there
    only where the model declares prompts that long (compile.py --max-len)."""
    start = causal_from(core, bool(terms.keys))
    if max_len is None or max_len < start:
        return _one_op(graph, core, add)
    q, k, v = inputs = op_inputs(graph, core, add)
    raw = summed(terms.keys, add, "key_bias_terms") if terms.keys else None
    heads = new_initializer(
        graph, "attention/heads_shape", np.asarray([0, 0, core.num_heads, core.head_dim], np.int64)
    )

    def prefill(emit, name: str) -> tuple[ir.Value, ...]:
        context = causal(graph, core, lambda _: inputs, raw, emit, name)
        if core.zeroes_dead_rows and raw is not None:
            context = zero_dead_context(
                graph, core, context, dead_causal_rows(graph, raw, emit), emit
            )
        present = tuple(
            emit(
                "Transpose",
                [emit("Reshape", [x, heads], f"present_{n}_heads")],
                f"present_{n}",
                {"perm": [0, 2, 1, 3]},
            )
            for x, n in ((k, "key"), (v, "value"))
        )
        return (context, *present)

    def step(emit, name: str) -> tuple[ir.Value, ...]:
        context, present = _one_op(graph, core, emit)
        return (context, *present)

    prefilling = _is_prefill(graph, add, terms.past, q, start)
    context, *present = choose(prefilling, scope, add, prefill, step, outputs=3)
    return context, tuple(present)


def _is_prefill(graph: ir.Graph, add, past: ir.Value, q: ir.Value, start: int) -> ir.Value:
    """(1,) bool: the cache is empty and the prompt has at least ``start`` tokens."""
    zero = new_initializer(graph, "attention/zero_i64", np.zeros((), np.int64))
    empty = add(
        "Equal", [add("Cast", [past], "past_i64", {"to": ir.DataType.INT64}), zero], "cache_empty"
    )
    length = add("Shape", [q], "query_length", {"start": 1, "end": 2})
    prefill_from = new_initializer(graph, "attention/prefill_from", np.asarray([start], np.int64))
    long_input = add("GreaterOrEqual", [length, prefill_from], "long_input")
    axis0 = new_initializer(graph, "attention/axis0", np.asarray([0], np.int64))
    empty = add("Unsqueeze", [empty, axis0], "cache_empty_1")
    return add("And", [empty, long_input], "prefill")


def _bool_key_padding(core: Core) -> ir.Value | None:
    """The bool (N, S) graph input when the core's mask is exactly Unsqueeze(Where(it, -inf, 0), [1, 2])."""
    if core.layout != "BSD" or core.mask is None:
        return None
    unsqueeze = core.mask.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.domain:
        return None
    axes = constant(unsqueeze.inputs[1])
    where = unsqueeze.inputs[0].producer()
    if (
        axes is None
        or axes.tolist() != [1, 2]
        or where is None
        or where.op_type != "Where"
        or where.domain
    ):
        return None
    fill, zero = constant(where.inputs[1]), constant(where.inputs[2])
    padding = where.inputs[0]
    if (
        fill is None
        or zero is None
        or fill.size != 1
        or zero.size != 1
        or not (np.isneginf(fill).all() and (zero == 0).all())
    ):
        return None
    if (
        not padding.is_graph_input()
        or padding.type is None
        or padding.type.dtype != ir.DataType.BOOL
    ):
        return None
    return padding


def _zero_fully_padded(graph: ir.Graph, context: ir.Value, keep: ir.Value, add) -> ir.Value:
    """Zero context (N, L, E) for batch entries whose every key is padding."""
    axis = new_initializer(graph, "attention/last_axis", np.asarray([-1], np.int64))
    none_kept = add(
        "Equal",
        [
            add("ReduceMax", [keep, axis], "fully_masked/ReduceMax", {"keepdims": 1}),
            new_initializer(graph, "attention/zero_i32", np.zeros((), np.int32)),
        ],
        "fully_masked/Equal",
    )
    dead = add(
        "Unsqueeze",
        [none_kept, new_initializer(graph, "attention/axis2", np.asarray([2], np.int64))],
        "fully_masked/Unsqueeze",
    )  # (N, 1, 1)
    return add("Where", [dead, zero_scalar(graph), context], "fully_masked/Where")
