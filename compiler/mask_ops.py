"""The small pieces the mask lowerings share (compiler/lowerings/): constants, the op's q, k, v,
a mask term as rank 4, the causal bias, the loop over query blocks, checks of a mask at run time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from compiler._ir import new_initializer
from compiler.attention_core import Core, Emit, emitter, keys_bnsh

MS_DOMAIN = "com.microsoft"
# masked keys' bias, finite: a block of -inf scores would make a flash block's running max NaN
KEY_BIAS_FLOOR = -1e30


def int_constant(graph: ir.Graph, name: str, values) -> ir.Value:
    return new_initializer(graph, f"attention/{name}", np.asarray(values, np.int64))


def float_constant(graph: ir.Graph, name: str, values) -> ir.Value:
    return new_initializer(graph, f"attention/{name}", np.asarray(values, np.float32))


def floored(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """A key bias (N|1, H|1, 1, S) with -inf raised to KEY_BIAS_FLOOR: exp of it is 0 all the same, and
    a fully masked row is zeroed from the mask itself where the graph asks for that."""
    return add("Max", [bias, float_constant(graph, "key_bias_floor", KEY_BIAS_FLOOR)], "key_bias")


def op_inputs(graph: ir.Graph, core: Core, add: Emit) -> tuple[ir.Value, ir.Value, ir.Value]:
    """q, k, v for MultiHeadAttention: q as (N, L, E); a BNSH core's keys and values stay BNSH, which
    the op takes without a copy. Every form reads these, built once outside any If: a value an If
    reads is one ONNX Runtime's transpose optimizer cannot cancel against the exporter's transposes."""
    if core.layout == "BSD":
        return core.q, core.k, core.v
    merge = int_constant(graph, "merge_shape", [0, 0, core.num_heads * core.head_dim])
    q = add(
        "Reshape",
        [add("Transpose", [core.q], "query_bsnh", {"perm": [0, 2, 1, 3]}), merge],
        "query_bsd",
    )
    k, v = keys_bnsh(core, add), core.v
    if core.num_heads > 1 and any(head_axis(x) == 1 for x in (k, v)):
        # multi-query keys and values, which the graph's MatMuls broadcast over the query heads:
        # MultiHeadAttention takes as many as the query has (Falcon)
        heads = int_constant(graph, "query_heads", [1, core.num_heads, 1, 1])
        k, v = (
            add("Expand", [x, heads], f"{name}_per_head") for x, name in ((k, "key"), (v, "value"))
        )
    return q, k, v


def head_axis(value: ir.Value) -> int | str | None:
    """Axis 1 of a rank-4 value as shape inference left it: a number, a symbol, or None."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dim = shape[1]
    return dim if isinstance(dim, int) else None


def as_4d(
    graph: ir.Graph, term: ir.Value, add: Emit, name: str, rank: int | None = None
) -> ir.Value:
    """A mask term of rank 2 or 3 with leading axes of 1, as it broadcasts against (N, H, L, S)."""
    rank = len(term.shape) if rank is None else rank
    if rank >= 4:
        return term
    return add(
        "Unsqueeze",
        [term, int_constant(graph, f"leading_{4 - rank}", list(range(4 - rank)))],
        f"{name}/as_4d",
    )


def causal_bias(graph: ir.Graph, q: ir.Value, add: Emit) -> ir.Value:
    """(1, 1, L, L): -inf where key j lies after query i, for BSD q (N, L, E)."""
    length = add(
        "Squeeze",
        [
            add("Shape", [q], "causal_mask/length", {"start": 1, "end": 2}),
            int_constant(graph, "axis0", [0]),
        ],
        "causal_mask/length_scalar",
    )
    rows = add(
        "Range",
        [int_constant(graph, "zero_i64", 0), length, int_constant(graph, "one_i64", 1)],
        "causal_mask/positions",
    )
    future = add(
        "Greater",
        [
            add("Unsqueeze", [rows, int_constant(graph, "axes01", [0, 1, 2])], "causal_mask/keys"),
            add(
                "Unsqueeze",
                [rows, int_constant(graph, "axes013", [0, 1, 3])],
                "causal_mask/queries",
            ),
        ],
        "causal_mask/future",
    )
    return add(
        "Where",
        [future, float_constant(graph, "neg_inf", -np.inf), float_constant(graph, "zero", 0.0)],
        "causal_mask/bias",
    )


def dead_causal_rows(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """(N|1, H|1, L, 1): True where query i sees no key among 0..i that the key bias (not floored) leaves
    above -inf."""
    hidden = add("IsInf", [bias], "hidden_key", {"detect_positive": 0})
    visible = add(
        "Cast",
        [add("Not", [hidden], "visible_key")],
        "visible_key_count",
        {"to": ir.DataType.FLOAT},
    )
    seen = add("CumSum", [visible, int_constant(graph, "last_axis_scalar", -1)], "visible_so_far")
    dead = add("Less", [seen, float_constant(graph, "half", 0.5)], "fully_masked/none_visible")
    return add("Transpose", [dead], "fully_masked/rows", {"perm": [0, 1, 3, 2]})


def rows_alike(graph: ir.Graph, terms: list[ir.Value], add: Emit) -> ir.Value:
    """(1,) bool: whether every query row of every term equals its first row, so that the terms are a
    key-only mask after all (a padding mask the exporter expanded to (N, 1, L, S), as Hugging Face
    models build theirs). Each key's largest and smallest entry over the rows agree: two passes over
    the terms, which the graph holds anyway, and nothing of their size made (an Equal against the
    first row would make an (L, S) bool and its float Cast: 1.25 GiB at 16384 tokens)."""
    same = None
    for i, term in enumerate(
        terms
    ):  # the terms broadcast together, and so do their (…, 1, S) flags
        axis = int_constant(graph, f"axis{len(term.shape) - 2}", [len(term.shape) - 2])
        high = add("ReduceMax", [term, axis], f"rows_alike/high_{i}", {"keepdims": 1})
        low = add("ReduceMin", [term, axis], f"rows_alike/low_{i}", {"keepdims": 1})
        flags = add("Equal", [high, low], f"rows_alike/equal_{i}")
        same = flags if same is None else add("And", [same, flags], f"rows_alike/and_{i}")
    return all_true(graph, same, add, "rows_alike")


def first_rows(graph: ir.Graph, terms: list[ir.Value], add: Emit) -> list[ir.Value]:
    """Each term's first query row, as a key bias (N|1, H|1, 1, S)."""
    out = []
    for i, term in enumerate(terms):
        axis = int_constant(graph, f"axis{len(term.shape) - 2}", [len(term.shape) - 2])
        row = add(
            "Slice",
            [term, int_constant(graph, "zero1", [0]), int_constant(graph, "one", [1]), axis],
            f"first_row_{i}",
        )
        out.append(as_4d(graph, row, add, f"first_row_{i}", len(term.shape)))
    return out


def loop_over(
    graph: ir.Graph,
    add: Emit,
    count: ir.Value,
    name: str,
    scope: str,
    step: Callable[[Emit, ir.Value], ir.Value],
) -> ir.Value:
    """Loop ``count`` (a (1,) int64) times over ``step(op, index) -> output``, whose nodes ``op`` names
    under ``scope``: the outputs stacked on a new first axis."""
    body: list[ir.Node] = []
    op = emitter(body, scope)
    index = ir.Value(
        name=f"{scope}/index", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
    )
    go_on = ir.Value(
        name=f"{scope}/go_on", type=ir.TensorType(ir.DataType.BOOL)
    )  # no shape: ONNX infers it from the Loop
    output = step(op, index)
    done = op("Identity", [go_on], "go_on_out")
    done.type, output.type = (
        ir.TensorType(ir.DataType.BOOL),
        ir.TensorType(ir.DataType.FLOAT),
    )  # a body's outputs are typed
    trips = add("Squeeze", [count, int_constant(graph, "zero1", [0])], f"{name}/trips")
    run = add(
        "Greater", [trips, int_constant(graph, "zero_scalar_i64", 0)], f"{name}/run"
    )  # the Loop's condition: true
    return add(
        "Loop",
        [trips, run],
        f"{name}/Loop",
        {"body": ir.Graph([index, go_on], [done, output], nodes=body, name=f"{scope}/body")},
    )


def split_blocks(
    graph: ir.Graph, q: ir.Value, k: ir.Value, v: ir.Value, most: int, add: Emit, name: str
):
    """(length, block, blocks, (q, k, v) padded to blocks x block rows) for BSD q, k, v of one length:
    as few blocks as blocks of at most ``most`` rows allow, all of one size, so that the padding adds
    fewer rows than there are blocks (blocks of exactly ``most`` would pad 1.5 x ``most`` tokens to
    2 x ``most``). A padded key lies after every real query: causal hides it."""
    one = int_constant(graph, "one", [1])

    def ceil(a: ir.Value, b: ir.Value, out: str) -> ir.Value:
        return add(
            "Div", [add("Sub", [add("Add", [a, b], f"{out}_up"), one], f"{out}_up_1"), b], out
        )

    length = add("Shape", [q], f"{name}/length", {"start": 1, "end": 2})
    blocks = ceil(length, int_constant(graph, f"{name}/most", [most]), f"{name}/blocks")
    block = ceil(length, blocks, f"{name}/block_len")
    extra = add("Sub", [add("Mul", [blocks, block], f"{name}/padded"), length], f"{name}/extra")
    pads = add(
        "Concat",
        [int_constant(graph, "zeros4", [0, 0, 0, 0]), extra, int_constant(graph, "zeros1", [0])],
        f"{name}/pads",
        {"axis": 0},
    )
    padded = tuple(
        add("Pad", [x, pads], f"{name}/{part}_padded")
        for x, part in ((q, "query"), (k, "key"), (v, "value"))
    )
    return length, block, blocks, padded


def no_key_bias(graph: ir.Graph, bias: ir.Value, add: Emit) -> ir.Value:
    """(1,) bool: whether a key bias (N|1, H|1, 1, S) is 0 everywhere at run time (a padding mask
    that hides no key), so that a causal mask with it is causal alone."""
    return all_true(
        graph,
        add("Equal", [bias, float_constant(graph, "zero", 0.0)], "key_bias_zero"),
        add,
        "no_key_bias",
    )


def all_true(graph: ir.Graph, flags: ir.Value, add: Emit, name: str) -> ir.Value:
    """(1,) bool: every entry of the small bool tensor ``flags`` is true."""
    fewest = add(
        "ReduceMin",
        [add("Cast", [flags], f"{name}/as_float", {"to": ir.DataType.FLOAT})],
        f"{name}/fewest",
        {"keepdims": 0},
    )
    return add(
        "Unsqueeze",
        [
            add("GreaterOrEqual", [fewest, float_constant(graph, "half", 0.5)], f"{name}/all"),
            int_constant(graph, "axis0", [0]),
        ],
        name,
    )


Attend = Callable[[Emit, ir.Value, ir.Value, ir.Value, ir.Value], ir.Value]
