"""The attention core (scores, scale, mask, softmax, context) of a graph, and the pieces every
fused form needs around it: a mask the fused op accepts and the fully-masked-row rule.

Cores are matched by structure, not by name, in two forms:
- BSD, the canonical graph's (graphs/mha.py), the pattern OwnCore of compiler/core_patterns.py:
  Reshape(x, [0, 0, H, hd]) + Transpose head splits, MatMul, [Mul by a scalar], [Add mask], Softmax,
  [the fully-masked guard Where(IsInf(ReduceMax))], MatMul, Transpose + Reshape head merge; q, k, v
  are (N, L, E).
- BNSH, any graph whose heads are already split, as torch's exporters write attention: rank-4
  (N, H, L, hd) tensors; compiler/exported_cores.py matches those (and gives the BSD form back where
  the exporter's head split can be looked through).
compiler/core_survey.py finds both; the fusion passes rewrite what it finds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from compiler._ir import (
    constant,
    finite,
    module_path,
    named,
    nested_graphs,
    new_initializer,
    only_use,
    root,
)
from compiler.core_patterns import same_dim
from compiler.shape_values import entries


@dataclass
class Cache:
    """The KV cache around a BSD core: present = Concat(past, this step's heads) on the length axis,
    (N, H, past_len + L, hd); the core's k and v are this step's (N, L, E)."""

    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    nodes: list[
        ir.Node
    ]  # the two Concats and the K^T Transpose, removed by a fusion that takes the cache


@dataclass
class Core:
    """A matched core: q, k, v (BSD: (N, L, E); BNSH: (N, H, L, hd), with k as K^T (N, H, hd, S)),
    its scale, additive mask and bounding nodes. ``output`` has q's layout.

    ``weights`` is the post-softmax (N, H, L, S) tensor when something outside the core reads it
    (need_weights), else None. ``nodes`` are the nodes a fusion removes.
    """

    layout: str  # "BSD" or "BNSH"
    q: ir.Value
    k: ir.Value
    v: ir.Value
    num_heads: int | None  # None: a BNSH core whose head count the graph does not state
    head_dim: int | None
    scale: float
    mask: ir.Value | None
    output: ir.Value
    weights: ir.Value | None
    softmax: ir.Node
    context_matmul: ir.Node
    guard: list[ir.Node]  # the fully-masked guard's Where and what it reads; empty without one
    nodes: list[ir.Node]
    cache: Cache | None = None
    extra_masks: tuple[
        ir.Value, ...
    ] = ()  # further additive biases (relative position, causal...): summed with mask
    k_transposed: bool = True  # a BNSH core's k is K^T (N, H, hd, S); False: K (N, H, S, hd)
    # torch's Where(IsNaN(p), 0, p) followed the softmax: fully masked rows give 0
    nan_guarded: bool = False
    # a BSD core's output is (N*L, E), as GPT-2's exports merge the heads for a Gemm
    output_rows: bool = False
    softcap: float = 0.0  # scores = c * tanh(scale * q.k / c) before the masks (Gemma 2); 0: none

    @property
    def guarded(self) -> bool:
        return bool(self.guard)

    @property
    def may_hide_every_key(self) -> bool:
        """Whether a row of the masks can be all -inf: not where one mask, a finite constant or a
        Where between finite constants, is all there is (Hugging Face's masks fill with the lowest
        float; two such added may overflow to -inf)."""
        if self.mask is None:
            return False
        return bool(self.extra_masks) or not finite(self.mask)

    @property
    def zeroes_dead_rows(self) -> bool:
        """Whether the fused form must zero fully masked rows: where the graph did, with our guard or
        torch's NaN guard, and a row can be all -inf. Elsewhere such a row is what the graph makes it
        (NaN for an all -inf row, uniform for an all-lowest one), and the fused ops, adding the same
        bias, make it the same."""
        return (self.guarded or self.nan_guarded) and self.may_hide_every_key

    @property
    def name(self) -> str:
        return self.softmax.name or self.softmax.outputs[0].name or "Softmax"


def unfusable(core: Core) -> str | None:
    """Why no fused op can take ``core``, whatever the target: their ``scale`` must be positive (the
    standard Attention op refuses anything else, and MultiHeadAttention reads 0 as 1/sqrt(head_dim))."""
    if not (np.isfinite(core.scale) and core.scale > 0):
        return f"its scale ({core.scale:g}) is not a positive number, and the fused ops take only a positive scale"
    return None


def over_keys(softmax: ir.Node, graph: ir.Graph, rank: int = 4) -> bool:
    """Whether a Softmax of a rank-``rank`` tensor normalises over its last axis alone, by its opset's
    rule: before opset 13 the axis defaults to 1 and the input is flattened to 2-D at it, from 13 on
    it defaults to -1 and is one axis. Either way only the last axis is attention over keys."""
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 13))
    axis = softmax.attributes.get_int("axis", 1 if opset < 13 else -1)
    return axis % rank == rank - 1 if -rank <= axis < rank else False


def producer_of(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and not node.domain else None


def perm_of(node: ir.Node | None) -> list[int] | None:
    return None if node is None else list(node.attributes.get_ints("perm", []))


Emit = Callable[..., ir.Value]


def unique_scope(graph: ir.Graph, prefix: str = "attention") -> str:
    """'attention', or 'attention_2', ... where the model already holds a fused core (decoders have two),
    in any of its graphs; another ``prefix`` likewise."""
    taken = {node.name.split("/")[0] for g in nested_graphs(root(graph)) for node in g if node.name}
    scope, i = prefix, 1
    while scope in taken:
        i += 1
        scope = f"{prefix}_{i}"
    return scope


def emitter(new: list[ir.Node], scope: str) -> Emit:
    """add(op, inputs, name, attrs, domain) -> the new node's first output, named ``scope/name``
    (with ``outputs`` > 1: that many outputs); nodes collect in ``new``."""

    def add(
        op: str,
        inputs: list,
        name: str,
        attrs: dict | None = None,
        domain: str = "",
        outputs: int = 1,
    ):
        new.append(
            named(
                ir.node(
                    op,
                    inputs,
                    attrs or {},
                    domain=domain,
                    name=f"{scope}/{name}",
                    num_outputs=outputs,
                )
            )
        )
        return new[-1].outputs[0] if outputs == 1 else tuple(new[-1].outputs)

    return add


def combined_mask(core: Core, add: Emit) -> ir.Value | None:
    """The core's additive masks summed, as the graph broadcast them: None without a mask."""
    return summed([core.mask, *core.extra_masks], add, "biases") if core.mask is not None else None


def summed(terms: list[ir.Value], add: Emit, name: str) -> ir.Value:
    """The terms added up in order, each Add named ``name_i``."""
    total = terms[0]
    for i, term in enumerate(terms[1:]):
        total = add("Add", [total, term], f"{name}_{i + 1}")
    return total


def full_bias(
    graph: ir.Graph, core: Core, add: Emit, mask: ir.Value | None, query: ir.Value | None = None
) -> ir.Value | None:
    """``mask`` (combined_mask's) broadcast to (N|1, H|1, L, S'): ONNX Runtime's fused ops want the
    query and key axes in full, and keeping -inf as -inf keeps partially masked rows exact. A mask
    whose shape already states both axes (an exporter's full 4-D mask) goes in as it is. ``query``:
    the BSD query the op reads, to take L from (else the core's)."""
    if mask is None:
        return None
    # the length axis of q and v (the values' length is the keys')
    axis = 1 if core.layout == "BSD" else 2
    if core.cache is None and _states(mask, 2, core.q, axis) and _states(mask, 3, core.v, axis):
        return mask
    # the keys' length read from the values, so that no exporter node on the keys is kept for a Shape
    src = add("Shape", [core.v], "src_len", {"start": axis, "end": axis + 1})
    if core.cache is not None:  # the keys are the past's, then this step's
        src = add(
            "Add",
            [add("Shape", [core.cache.past_key], "past_len", {"start": 2, "end": 3}), src],
            "total_len",
        )
    lengths = add(
        "Concat",
        [
            new_initializer(graph, "attention/ones2", np.ones(2, np.int64)),
            add("Shape", [core.q], "tgt_len", {"start": axis, "end": axis + 1})
            if query is None
            else add("Shape", [query], "tgt_len", {"start": 1, "end": 2}),
            src,
        ],
        "bias_shape",
        {"axis": 0},
    )
    return add("Expand", [mask, lengths], "attention_bias")


def _states(mask: ir.Value, axis: int, other: ir.Value, other_axis: int) -> bool:
    """Whether a rank-4 ``mask``'s ``axis`` is known to be ``other``'s ``other_axis`` (the same size
    or the same symbolic dim), so that nothing broadcasts there."""
    if (
        mask.shape is None
        or len(mask.shape) != 4
        or other.shape is None
        or len(other.shape) <= other_axis
    ):
        return False
    return same_dim(mask.shape[axis], other.shape[other_axis])


def keys_bnsh(core: Core, add: Emit) -> ir.Value:
    """K as (N, H, S, hd) from a BNSH core's keys. Where the exporter transposed K itself, scaled or not,
    the keys before that transpose: no transpose pair is left for ONNX Runtime to cancel, which it
    cannot where one of the two feeds a subgraph (the mask forms' If)."""
    if not core.k_transposed:
        return core.k
    swap = [0, 1, 3, 2]
    if perm_of(transpose := producer_of(core.k, "Transpose")) == swap:
        return transpose.inputs[0]
    if (mul := producer_of(core.k, "Mul")) is not None:
        for i in (0, 1):
            if perm_of(turned := producer_of(mul.inputs[i], "Transpose")) == swap and _one_number(
                mul.inputs[1 - i]
            ):
                return add("Mul", [turned.inputs[0], mul.inputs[1 - i]], "keys_scaled")
    return add("Transpose", [core.k], "keys", {"perm": swap})


def _one_number(value: ir.Value) -> bool:
    """Whether ``value`` holds one number (a scalar, or every axis 1), so that it commutes with a transpose."""
    known = constant(value)
    if known is not None:
        return known.size == 1
    return value.shape is not None and all(dim == 1 for dim in value.shape)


def rank4(mask: ir.Value) -> ir.Value | None:
    """The mask itself where it is known to be rank 4, so the dead rows are read before the broadcast."""
    return mask if mask.shape is not None and len(mask.shape) == 4 else None


def dead_rows(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """(N|1, H|1, L|1, 1): True where the rank-4 mask leaves a query no key (the whole row is -inf).
    Read from the mask before it is broadcast, this costs one pass over the mask, not over (N, H, L, S)."""
    return no_key_left(graph, bias, add, "fully_masked")


def no_key_left(graph: ir.Graph, bias: ir.Value, add: Emit, scope: str) -> ir.Value:
    """``bias``'s last axis reduced to True where every entry is -inf. A NaN keeps its row alive
    (ReduceMax may pass over a NaN, so a ReduceSum looks for one): NaN in an input reaches the
    output, as in torch (docs/ARCHITECTURE.md)."""
    axis = new_initializer(graph, "attention/last_axis", np.asarray([-1], np.int64))
    top = add("ReduceMax", [bias, axis], f"{scope}/ReduceMax", {"keepdims": 1})
    total = add("ReduceSum", [bias, axis], f"{scope}/ReduceSum", {"keepdims": 1})
    hidden = add("IsInf", [top], f"{scope}/IsInf", {"detect_positive": 0})
    no_nan = add("Not", [add("IsNaN", [total], f"{scope}/IsNaN")], f"{scope}/Not")
    dead = add("And", [hidden, no_nan], f"{scope}/And")
    if bias.shape is not None and len(bias.shape) == 4:
        dead.shape = ir.Shape([*bias.shape[:3], 1])  # what zero_dead_context reads
        dead.type = ir.TensorType(ir.DataType.BOOL)
    return dead


def leaves_nan_rows(core: Core) -> bool:
    """Whether a row can be all -inf where the graph leaves it so (NaN), not zeroed."""
    return core.may_hide_every_key and not core.zeroes_dead_rows


def as_the_graph_reads(graph: ir.Graph, bias: ir.Value, add, nan_rows: bool) -> ir.Value:
    """``bias`` as the op must read it for a row with no key left to get what the graph gives it.
    ONNX Runtime's CPU Attention op gives such a row a zero context, counting float32's lowest as
    -inf, where an unguarded graph gives the mean of the values (every score the same lowest, as
    Hugging Face's masks make them) or NaN (all -inf). So lowest becomes lowest / 2, which weighs a
    key the same (nothing beside any finite score, the same share in a row of them); with
    ``nan_rows`` (the graph guards no row), a row left all -inf gets a NaN, which the op carries to
    the context. A guarded graph zeroes only -inf rows, as the op does."""
    lowest = float(np.finfo(np.float32).min)
    low, half, nan = (
        new_initializer(graph, f"attention/{name}", np.asarray(value, np.float32))
        for name, value in (("lowest", lowest), ("half_lowest", lowest / 2), ("nan", np.nan))
    )
    found = add("Equal", [bias, low], "graph_rows/is_lowest")
    bias = add("Where", [found, half, bias], "graph_rows/half_lowest")
    if not nan_rows:
        return bias
    dead = no_key_left(graph, bias, add, "graph_rows")
    return add("Where", [dead, nan, bias], "graph_rows/nan_rows")


def guard_nodes(dead: ir.Node) -> list[ir.Node]:
    """The nodes under the guard's And(IsInf(ReduceMax(s)), Not(IsNaN(ReduceSum(s))))."""
    hidden, no_nan = (x.producer() for x in dead.inputs)
    nan = no_nan.inputs[0].producer()
    return [dead, hidden, hidden.inputs[0].producer(), no_nan, nan, nan.inputs[0].producer()]


def zero_dead_context(
    graph: ir.Graph, core: Core, context: ir.Value, dead: ir.Value, add: Emit, layout: str = "BSD"
) -> ir.Value:
    """A zero context on fully masked rows (docs/ARCHITECTURE.md), whatever the fused op returned there.
    ``context`` is (N, L, H*hd) for layout BSD, (N, H, L, hd) for BNSH."""
    if layout == "BNSH":
        return add("Where", [dead, zero_scalar(graph), context], "fully_masked/Where")
    if dead.shape is not None and dead.shape[1] == 1:  # one mask for every head: (N|1, L|1, 1)
        axis = new_initializer(graph, "attention/axis1", np.asarray([1], np.int64))
        rows = add("Squeeze", [dead, axis], "fully_masked/rows")
        return add("Where", [rows, zero_scalar(graph), context], "fully_masked/Where")
    dead = add(
        "Transpose", [dead], "fully_masked/Transpose", {"perm": [0, 2, 1, 3]}
    )  # (N|1, L, H|1, 1)
    split = new_initializer(
        graph, "attention/heads_shape", np.asarray([0, 0, core.num_heads, core.head_dim], np.int64)
    )
    heads = add("Reshape", [context, split], "fully_masked/split_heads")
    kept = add("Where", [dead, zero_scalar(graph), heads], "fully_masked/Where")
    merge = new_initializer(
        graph, "attention/merge_shape", np.asarray([0, 0, core.num_heads * core.head_dim], np.int64)
    )
    return add("Reshape", [kept, merge], "fully_masked/merge_heads")


def zero_dead_weights(graph: ir.Graph, weights: ir.Value, dead: ir.Value, add: Emit) -> ir.Value:
    return add("Where", [dead, zero_scalar(graph), weights], "fully_masked/weights")


def zero_scalar(graph: ir.Graph) -> ir.Value:
    return new_initializer(graph, "attention/zero", np.zeros((), np.float32))


def choose(condition: ir.Value, scope: str, add, then, otherwise, outputs: int = 1):
    """If(condition, then, otherwise), each built by ``fn(emit, scope)`` -> context (N, L, E) (or a
    tuple of ``outputs`` values) inside its branch, so that only the branch taken runs: the forms
    a fusion chooses between at run time."""
    branches = []
    for name, build in (("then", then), ("else", otherwise)):
        nodes: list[ir.Node] = []
        results = build(emitter(nodes, f"{scope}/{name}"), f"{scope}/{name}")
        results = list(results) if outputs > 1 else [results]
        for i, value in enumerate(results):
            if (
                value.producer() is None or value.producer() not in nodes
            ):  # a branch's output is a value it makes
                results[i] = value = emitter(nodes, f"{scope}/{name}")(
                    "Identity", [value], f"output_{i}"
                )
            value.type = ir.TensorType(ir.DataType.FLOAT)  # a branch's output is typed
        branches.append(ir.Graph([], results, nodes=nodes, name=f"{scope}/{name}"))
    return add(
        "If",
        [condition],
        "If",
        {"then_branch": branches[0], "else_branch": branches[1]},
        outputs=outputs,
    )


def as_bnsh(graph: ir.Graph, core: Core, context: ir.Value, add: Emit) -> ir.Value:
    """A fused op's (N, L, H*hd) context as (N, H, L, hd), a BNSH core's layout."""
    split = new_initializer(
        graph, "attention/heads_shape", np.asarray([0, 0, core.num_heads, core.head_dim], np.int64)
    )
    heads = add("Reshape", [context, split], "context_bsnh")
    return add("Transpose", [heads], "context_bnsh", {"perm": [0, 2, 1, 3]})


def mask_key(core: Core) -> tuple | None:
    """The masks a core reads and its query and key lengths, as dims of q and v that name them (a
    fixed size or a named symbol), else None: cores with one key read one mask at the same
    lengths, and may share what is built from it."""
    axis = 1 if core.layout == "BSD" else 2
    dims = [
        x.shape[axis] if x.shape is not None and len(x.shape) > axis else None
        for x in (core.q, core.v)
    ]
    if core.mask is None or not all(isinstance(d, int) or getattr(d, "value", None) for d in dims):
        return None
    return (core.mask, *core.extra_masks, *dims)


def heads_merge(core: Core) -> ir.Node | None:
    """The Reshape by which the graph merges a BNSH core's heads, Transpose(0, 2, 1, 3) then
    Reshape, where that is all that reads the core's output: it may read a fused op's (N, L, H*hd)
    context in its place (the same numbers in the same order), so that no transpose is copied
    twice. Not where its target copies an axis past the second (a 0 there): that axis differs."""
    turn = only_use(core.output) if core.layout == "BNSH" else None
    if turn is None or perm_of(producer_of(turn.outputs[0], "Transpose")) != [0, 2, 1, 3]:
        return None
    reshape = only_use(turn.outputs[0])
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain:
        return None
    found = entries(reshape.inputs[1])
    if found is None or any(entry == 0 for entry in found[0][2:]):
        return None
    return reshape


def as_output(graph: ir.Graph, core: Core, context: ir.Value, add: Emit) -> ir.Value:
    """A BSD context (N, L, E) in the shape the core's output had: the same, or its rows (N*L, E)."""
    if not core.output_rows:
        return context
    rows = new_initializer(
        graph, "attention/rows_shape", np.asarray([-1, core.num_heads * core.head_dim], np.int64)
    )
    return add("Reshape", [context, rows], "context_rows")


def followed(core: Core, replaced: Mapping[ir.Value, ir.Value]) -> Core:
    """``core`` as found before the fusions of earlier cores: where one of its values was such a
    core's output (two cores chained, the first's context the second's q, k and v), the value that
    took its place; else the stale value would feed the new op, produced by nothing."""

    def swap(x: Any) -> Any:
        if isinstance(x, ir.Value):
            return replaced.get(x, x)
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], ir.Value):
            return type(x)(swap(v) for v in x)
        return x

    if not replaced:
        return core
    return dataclasses.replace(
        core, **{f.name: swap(getattr(core, f.name)) for f in dataclasses.fields(core)}
    )


def replace_core(
    graph: ir.Graph,
    core: Core,
    new: list[ir.Node],
    context: ir.Value,
    weights: ir.Value | None = None,
    present: tuple[ir.Value, ir.Value] | None = None,
    replaced_so_far: dict[ir.Value, ir.Value] | None = None,
) -> None:
    """Put ``new`` where the core was: its output becomes ``context``, its weights ``weights``, and
    a cache's present_key/present_value the fused op's ``present``. Where one of those was a graph
    output, the new value takes its name, type and shape, so the graph's signature stays the same.
    ``replaced_so_far`` gains each old value and its replacement, for ``followed``."""
    graph.insert_before(core.nodes[-1], new)
    for (
        node
    ) in new:  # the module the core came from, as the exporter recorded it (report.html shows it)
        node.metadata_props.update(
            {k: v for k, v in core.softmax.metadata_props.items() if k.startswith("pkg.torch")}
        )
        if not node.metadata_props and (layer := module_path(core.softmax.name or "", {})):
            node.metadata_props["pkg.torch.onnx.name_scopes"] = repr(["", layer, node.op_type])
    replaced = [(core.output, context)]
    if core.weights is not None:
        assert weights is not None, (
            "a fusion that drops the weights must leave need_weights cores alone"
        )
        replaced.append((core.weights, weights))
    if core.cache is not None:
        assert present is not None, "a fusion that drops the cache must leave cached cores alone"
        replaced += list(zip((core.cache.present_key, core.cache.present_value), present))
    if replaced_so_far is not None:
        replaced_so_far.update(replaced)
    outputs = [old for old, _ in replaced if old.is_graph_output()]
    for old, fused in replaced:
        old.replace_all_uses_with(fused, replace_graph_outputs=True)
    graph.remove(core.nodes + (core.cache.nodes if core.cache is not None else []), safe=True)
    for old, fused in replaced:
        if old in outputs or (core.cache is not None and fused in present):
            fused.name, fused.type, fused.shape = old.name, old.type, old.shape
