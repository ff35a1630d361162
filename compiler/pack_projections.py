"""Pack projections that read the same tensor (Q/K/V in self-attention, K/V when key is value) into one MatMul."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from compiler._ir import constant, named, new_initializer, only_use
from compiler.core_survey import find_cores
from compiler.joined_cache import joined_cache
from graphs.spec import MAX_BATCH_KEY, MAX_LEN_KEY


class PackProjectionsPass(ir.passes.InPlacePass):
    """x @ W_i (+ b_i) for i = 1..k over one x becomes Split(x @ [W_1 .. W_k] (+ [b_1 .. b_k]), axis=-1).

    One wide GEMM replaces k narrow ones: the input is read once and the matmul kernel runs at
    a better shape. A projection without bias gets zeros in the packed bias.

    The Split copies its input, and on ONNX Runtime's CPU that copy outweighs the wider GEMM once
    x has a few hundred rows (docs/BENCHMARKS.md, "Packing"). With ``max_rows``, a group is packed
    only where x is known to have at most that many rows (batch x length): its shape fixes them, or
    the model declares both largest sizes (compile.py --max-batch, --max-len), or the graph decodes
    with a KV cache, whose steps take a token or a few.
    """

    def __init__(self, max_rows: int | None = None) -> None:
        super().__init__()
        self.max_rows = max_rows

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[ir.Value, list[ir.Node]] = defaultdict(list)
        for node in graph:
            if node.op_type == "MatMul" and not node.domain and _weight(node) is not None:
                groups[node.inputs[0]].append(node)
        groups = {x: matmuls for x, matmuls in groups.items() if len(matmuls) >= 2}
        if self.max_rows is not None and groups and not _decodes(graph):
            declared = _declared_rows(model)
            groups = {x: m for x, m in groups.items() if min(_rows(x), declared) <= self.max_rows}
        modified = False
        for x, matmuls in groups.items():
            if _pack(graph, x, matmuls):
                modified = True
        return ir.passes.PassResult(model, modified)


def _rows(x: ir.Value) -> float:
    """The rows of x (every axis but the last) where its shape fixes them, else infinity."""
    if x.shape is None or len(x.shape) < 2 or not all(isinstance(d, int) for d in x.shape[:-1]):
        return math.inf
    return float(math.prod(x.shape[:-1]))


def _declared_rows(model: ir.Model) -> float:
    """max batch x max length where the model declares both (graphs/builder.declare_maxima), else infinity."""
    sizes = [model.metadata_props.get(key) for key in (MAX_BATCH_KEY, MAX_LEN_KEY)]
    if not all(size is not None and size.isdigit() for size in sizes):
        return math.inf
    return float(int(sizes[0]) * int(sizes[1]))


def _decodes(graph: ir.Graph) -> bool:
    return any(
        core.cache is not None or joined_cache(core, graph) is not None
        for core in find_cores(graph)
    )


def _weight(matmul: ir.Node) -> np.ndarray | None:
    w = constant(matmul.inputs[1])
    return w if w is not None and w.ndim == 2 and np.issubdtype(w.dtype, np.floating) else None


def _bias(matmul: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    add = only_use(matmul.outputs[0])
    if add is None or add.op_type != "Add" or add.domain:
        return None
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    b = constant(other)
    width = _weight(matmul).shape[1]
    return (add, b) if b is not None and b.shape == (width,) else None


def _pack(graph: ir.Graph, x: ir.Value, matmuls: list[ir.Node]) -> bool:
    weights = [_weight(m) for m in matmuls]
    if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
        return False
    biases = [_bias(m) for m in matmuls]
    finals = [b[0].outputs[0] if b else m.outputs[0] for m, b in zip(matmuls, biases)]
    if any(v.is_graph_output() for v in finals):
        return False
    prefix = _scope(graph, matmuls)
    widths = [w.shape[1] for w in weights]

    packed_w = new_initializer(graph, f"{prefix}/weight_t", np.concatenate(weights, axis=1))
    nodes = [named(ir.node("MatMul", [x, packed_w], name=f"{prefix}/MatMul"))]
    y = nodes[-1].outputs[0]
    if any(biases):
        dtype = weights[0].dtype
        packed_b = np.concatenate(
            [b[1] if b else np.zeros(w, dtype) for b, w in zip(biases, widths)]
        ).astype(dtype)
        nodes.append(
            named(
                ir.node(
                    "Add",
                    [y, new_initializer(graph, f"{prefix}/bias", packed_b)],
                    name=f"{prefix}/Add",
                )
            )
        )
        y = nodes[-1].outputs[0]
    split = new_initializer(graph, f"{prefix}/split", np.asarray(widths, np.int64))
    nodes.append(
        named(
            ir.node(
                "Split", [y, split], {"axis": -1}, num_outputs=len(matmuls), name=f"{prefix}/Split"
            )
        )
    )
    graph.insert_before(matmuls[0], nodes)
    for final, out in zip(finals, nodes[-1].outputs):
        out.type, out.shape = (
            final.type,
            final.shape,
        )  # what the later passes read (a head split's width, say)
        final.replace_all_uses_with(out)
    graph.remove(
        [n for m, b in zip(matmuls, biases) for n in ((m, b[0]) if b else (m,))], safe=True
    )
    return True


def _scope(graph: ir.Graph, matmuls: list[ir.Node]) -> str:
    """``q_proj``, ``k_proj``, ``v_proj`` (inside a block's ``self_attn/``, say) pack into ``qkv_proj``
    under the same parent; any other group into ``packed_proj``; made unique in the graph."""
    paths = [(m.name or "").split("/") for m in matmuls]
    scopes = [p[-2] if len(p) >= 2 else "" for p in paths]
    base = (
        "".join(s[0] for s in scopes) + "_proj"
        if all(s.endswith("_proj") for s in scopes)
        else "packed_proj"
    )
    parent = paths[0][:-2] if all(p[:-2] == paths[0][:-2] for p in paths) else []
    prefix = "/".join([*parent, base])
    taken = {node.name for node in graph if node.name}
    candidate, i = prefix, 1
    while f"{candidate}/MatMul" in taken:
        i += 1
        candidate = f"{prefix}_{i}"
    return candidate
