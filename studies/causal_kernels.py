#!/usr/bin/env python
"""What ONNX Runtime's CPU kernels make of causal attention, on the core alone (q, k, v given, batch
1), timed in turns against MultiHeadAttention without a mask (its flash kernel): the evidence behind
the causal form compiler/lowerings/ takes (docs/BENCHMARKS.md, "Causal kernels").

- "flash, no mask": the time causal attention should halve;
- "MHA unidirectional", "Attention-23 is_causal": one op with its own causal flag;
- "GQA one call", "GQA chunks": GroupQueryAttention as one prompt, and as the chunked prefill
  compiler/lowerings/ builds (here unrolled: one call per chunk, the keys before it as its past);
- "flash halving": flash calls only, no GQA: the second half of each segment attends the first half
  unmasked, one call per level with the segments as its batch, the diagonal blocks in the graph,
  merged by softmax denominators (an extra key whose score is the accumulated log-denominator and an
  extra value column that returns its weight). Its value heads are one wider, which the flash
  kernel pays for (its kernels run head sizes in steps of 16; docs/BENCHMARKS.md, "Causal kernels").

With ``--decode P``: one decode step (one query, a cache of P keys given as past) instead, batch
``--batch``: MultiHeadAttention with past and its causal bias (what ort-cpu's KV-cache graph runs)
against GroupQueryAttention with the same past.

    python studies/causal_kernels.py --length 4096
    python studies/causal_kernels.py --decode 2048 --batch 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from attention_compiler.benchmark.timing import cpu_matmul_rate, cpu_name

MS = "com.microsoft"


class _Graph:
    def __init__(self) -> None:
        self.nodes, self.constants = [], []

    def const(self, array) -> str:
        name = f"c{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], domain: str = "", outputs: int = 1, **attrs
    ) -> str:
        names = [f"n{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain, **attrs))
        return names[0]

    def model(self, out: str, length: int, width: int, opset: int = 18):
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        inputs = [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, length, width]) for n in "qkv"
        ]
        graph = helper.make_graph(
            self.nodes,
            "causal",
            inputs,
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            self.constants,
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
        )


def one_op(kind: str, length: int, heads: int, head: int):
    g = _Graph()
    if kind == "flash":
        out = g.op("MultiHeadAttention", ["q", "k", "v"], MS, num_heads=heads)
    elif kind == "unidirectional":
        out = g.op("MultiHeadAttention", ["q", "k", "v"], MS, num_heads=heads, unidirectional=1)
    elif kind == "attention23":
        out = g.op("Attention", ["q", "k", "v"], is_causal=1, q_num_heads=heads, kv_num_heads=heads)
    else:
        seen, total = g.const(np.array([length - 1], np.int32)), g.const(np.array(length, np.int32))
        out = g.op(
            "GroupQueryAttention",
            ["q", "k", "v", "", "", seen, total],
            MS,
            3,
            num_heads=heads,
            kv_num_heads=heads,
        )
    return g.model(out, length, heads * head, 23 if kind == "attention23" else 18)


def gqa_chunks(length: int, heads: int, head: int, chunk: int):
    g = _Graph()
    split = g.const(np.array([1, length, heads, head]))
    past = {x: g.op("Transpose", [g.op("Reshape", [x, split])], perm=[0, 2, 1, 3]) for x in "kv"}
    ax1, ax2 = g.const(np.array([1])), g.const(np.array([2]))
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        s, e, z = g.const(np.array([start])), g.const(np.array([end])), g.const(np.array([0]))
        rows = [g.op("Slice", [x, s, e, ax1]) for x in "qkv"]
        pasts = [g.op("Slice", [past[x], z, s, ax2]) for x in "kv"] if start else ["", ""]
        seen, total = g.const(np.array([end - 1], np.int32)), g.const(np.array(end, np.int32))
        outs.append(
            g.op(
                "GroupQueryAttention",
                [*rows, *pasts, seen, total],
                MS,
                3,
                num_heads=heads,
                kv_num_heads=heads,
            )
        )
    return g.model(g.op("Concat", outs, axis=1), length, heads * head)


def flash_halving(length: int, heads: int, head: int, block: int):
    """See the module docstring; ``length`` / ``block`` must be a power of two."""
    g, d = _Graph(), head
    levels = int(np.log2(length // block))
    assert block << levels == length, "--length over --block must be a power of two"
    q = g.op("Mul", ["q", g.const(np.float32(d**-0.5))])
    out, lse = _diagonal_blocks(g, q, length, heads, d, block)
    heads_shape = g.const(np.array([1, length, heads, d]))
    qkv = tuple(g.op("Reshape", [x, heads_shape]) for x in (q, "k", "v"))
    for level in range(levels):
        out, lse = _halving_level(g, qkv, out, lse, length, heads, d, block << level)
    return g.model(
        g.op("Reshape", [out, g.const(np.array([1, length, heads * d]))]), length, heads * d
    )


def _diagonal_blocks(g: _Graph, q: str, length: int, heads: int, d: int, block: int):
    """Causal attention inside each diagonal block: its output and log-sum-exp per query."""
    nb = length // block
    blocked = [
        g.op(
            "Transpose",
            [g.op("Reshape", [x, g.const(np.array([1, nb, block, heads, d]))])],
            perm=[0, 1, 3, 2, 4],
        )
        for x in (q, "k", "v")
    ]
    scores = g.op(
        "Add",
        [
            g.op("MatMul", [blocked[0], g.op("Transpose", [blocked[1]], perm=[0, 1, 2, 4, 3])]),
            g.const(np.triu(np.full((block, block), -np.inf, np.float32), 1)),
        ],
    )
    last = g.const(np.array([-1]))
    top = g.op("ReduceMax", [scores, last], keepdims=1)
    p = g.op("Exp", [g.op("Sub", [scores, top])])
    z = g.op("ReduceSum", [p, last], keepdims=1)
    out = g.op("Div", [g.op("MatMul", [p, blocked[2]]), z])
    lse = g.op("Add", [top, g.op("Log", [z])])
    out = g.op(
        "Reshape",
        [g.op("Transpose", [out], perm=[0, 1, 3, 2, 4]), g.const(np.array([1, length, heads, d]))],
    )
    lse = g.op(
        "Reshape",
        [g.op("Transpose", [lse], perm=[0, 1, 3, 2, 4]), g.const(np.array([1, length, heads, 1]))],
    )
    return out, lse


def _halving_level(g: _Graph, qkv, out: str, lse: str, length: int, heads: int, d: int, size: int):
    """One level: the second half of each segment of 2*size queries also attends, through the flash
    kernel and kappa, to its first half; the two merge exactly."""
    qh, kh, vh = qkv
    segments = length // (2 * size)
    shape = lambda w: g.const(np.array([segments, 2, size, heads, w]))  # noqa: E731
    kappa = np.zeros((1, 1, heads, d + 1), np.float32)
    kappa[..., -1] = 1
    zero, widen = g.const(np.float32(0)), g.const(np.array([0] * 7 + [1]))
    q2, l2, o2 = (_half(g, x, shape(w), 1) for x, w in ((qh, d), (lse, 1), (out, d)))
    kap = g.const(np.broadcast_to(kappa, (segments, 1, heads, d + 1)).copy())
    merged = g.const(np.array([segments, size + 1, heads * (d + 1)]))
    keys, values = (
        g.op(
            "Reshape",
            [
                g.op("Concat", [kap, g.op("Pad", [_half(g, x, shape(d), 0), widen, zero])], axis=1),
                merged,
            ],
        )
        for x in (kh, vh)
    )
    query = g.op(
        "Reshape",
        [g.op("Concat", [q2, l2], axis=-1), g.const(np.array([segments, size, heads * (d + 1)]))],
    )
    y = g.op(
        "Reshape",
        [
            g.op("MultiHeadAttention", [query, keys, values], MS, num_heads=heads, scale=1.0),
            g.const(np.array([segments, size, heads, d + 1])),
        ],
    )
    last = g.const(np.array([-1]))
    r = g.op("Slice", [y, g.const(np.array([0])), g.const(np.array([d])), last])
    x = g.op("Slice", [y, g.const(np.array([d])), g.const(np.array([d + 1])), last])
    tiny = g.const(np.float32(np.finfo(np.float32).tiny))
    out = _back(g, out, g.op("Add", [r, g.op("Mul", [x, o2])]), shape(d), length, heads, d)
    second = g.op("Sub", [l2, g.op("Log", [g.op("Max", [x, tiny])])])
    return out, _back(g, lse, second, shape(1), length, heads, 1)


def _half(g: _Graph, x: str, shape: str, index: int) -> str:
    """Half ``index`` (0 first, 1 second) of every segment of ``x`` reshaped to ``shape``."""
    one = g.const(np.array([1]))
    piece = g.op(
        "Slice",
        [
            g.op("Reshape", [x, shape]),
            g.const(np.array([index])),
            g.const(np.array([index + 1])),
            one,
        ],
    )
    return g.op("Squeeze", [piece, g.const(np.array([1]))])


def _back(
    g: _Graph, whole: str, second: str, shape: str, length: int, heads: int, width: int
) -> str:
    """``whole`` with every segment's second half replaced by ``second``."""
    first = g.op(
        "Slice",
        [
            g.op("Reshape", [whole, shape]),
            g.const(np.array([0])),
            g.const(np.array([1])),
            g.const(np.array([1])),
        ],
    )
    both = g.op("Concat", [first, g.op("Unsqueeze", [second, g.const(np.array([1]))])], axis=1)
    return g.op("Reshape", [both, g.const(np.array([1, length, heads, width]))])


def decode_step(kind: str, batch: int, past: int, heads: int, head: int):
    """One query over ``past`` cached keys and its own: MultiHeadAttention (past, present, a zero bias
    over the past and the new key, as the KV-cache graph passes it) or GroupQueryAttention."""
    vi, width = helper.make_tensor_value_info, heads * head
    inputs = [vi(n, TensorProto.FLOAT, [batch, 1, width]) for n in "qkv"]
    inputs += [
        vi(n, TensorProto.FLOAT, [batch, heads, past, head]) for n in ("past_key", "past_value")
    ]
    outputs = [vi(n, TensorProto.FLOAT, None) for n in ("y", "present_key", "present_value")]
    g = _Graph()
    if kind == "mha":
        bias = g.const(np.zeros((batch, 1, 1, past + 1), np.float32))
        node = helper.make_node(
            "MultiHeadAttention",
            ["q", "k", "v", "", "", bias, "past_key", "past_value"],
            ["y", "present_key", "present_value"],
            domain=MS,
            num_heads=heads,
        )
    else:
        seen, total = g.const(np.full(batch, past, np.int32)), g.const(np.array(past + 1, np.int32))
        node = helper.make_node(
            "GroupQueryAttention",
            ["q", "k", "v", "past_key", "past_value", seen, total],
            ["y", "present_key", "present_value"],
            domain=MS,
            num_heads=heads,
            kv_num_heads=heads,
        )
    graph = helper.make_graph([node], "decode", inputs, outputs, g.constants)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=1024, help="queries per GroupQueryAttention call")
    p.add_argument("--block", type=int, default=256, help="the halving's diagonal block")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--decode",
        type=int,
        metavar="P",
        help="time one decode step over a cache of P keys instead",
    )
    p.add_argument("--batch", type=int, default=1, help="batch of the decode step")
    args = p.parse_args(argv)
    length, heads, head = args.length, args.heads, args.head_size
    if args.decode is not None:
        return _decode(args)
    models = {
        "flash, no mask": one_op("flash", length, heads, head),
        "MHA unidirectional": one_op("unidirectional", length, heads, head),
        "Attention-23 is_causal": one_op("attention23", length, heads, head),
        "GQA one call": one_op("gqa", length, heads, head),
        f"GQA chunks of {args.chunk}": gqa_chunks(length, heads, head, args.chunk),
        f"flash halving, blocks of {args.block}": flash_halving(length, heads, head, args.block),
    }
    options = _options()
    options.log_severity_level = 3  # one chunk leaves the past's initializers unused: ORT warns
    sessions = {
        name: ort.InferenceSession(
            m.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        for name, m in models.items()
    }
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((1, length, heads * head), dtype=np.float32) for x in "qkv"}
    reference = sessions["MHA unidirectional"].run(["y"], feeds)[0]
    errors = {
        name: float(np.abs(s.run(["y"], feeds)[0] - reference).max() / np.abs(reference).max())
        for name, s in sessions.items()
        if name != "flash, no mask"
    }
    times = _timed(sessions, feeds, args.rounds, ["y"])
    _print_table(times, errors, length, heads, head)
    return 0


def _print_table(
    times: dict[str, list[float]], errors: dict[str, float], length: int, heads: int, head: int
) -> None:
    """The machine, then one row per kernel against unmasked flash."""
    base = np.median(times["flash, no mask"])
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, MatMul rate "
        f"{cpu_matmul_rate() / 1e9:.0f} GFLOP/s; length {length}, {heads} heads of {head}, batch 1"
    )
    print(
        "| kernel | p50 ms | x flash, no mask | rel. error vs unidirectional |\n|---|---|---|---|"
    )
    for name, t in times.items():
        print(
            f"| {name} | {np.median(t) * 1e3:.1f} | {np.median(t) / base:.2f}x | "
            f"{'-' if name not in errors else f'{errors[name]:.1e}'} |"
        )


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _timed(
    sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int, outputs: list | None
) -> dict[str, list[float]]:
    """Each session's times over ``rounds`` rounds, the sessions taking turns within a round."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(outputs, feeds)
            times[name].append(time.perf_counter() - start)
    return times


def _decode(args: argparse.Namespace) -> int:
    heads, head, batch, past = args.heads, args.head_size, args.batch, args.decode
    options = _options()
    sessions = {
        name: ort.InferenceSession(
            decode_step(kind, batch, past, heads, head).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        for name, kind in (
            ("MultiHeadAttention, past and bias", "mha"),
            ("GroupQueryAttention, past", "gqa"),
        )
    }
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((batch, 1, heads * head), dtype=np.float32) for x in "qkv"}
    feeds |= {
        x: rng.standard_normal((batch, heads, past, head), dtype=np.float32)
        for x in ("past_key", "past_value")
    }
    outs = [s.run(["y"], feeds)[0] for s in sessions.values()]
    error = float(np.abs(outs[1] - outs[0]).max() / np.abs(outs[0]).max())
    times = _timed(sessions, feeds, max(args.rounds, 100), None)
    base = np.median(next(iter(times.values())))
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}; one decode step, batch {batch}, "
        f"past {past}, {heads} heads of {head}; rel. error between the two {error:.1e}"
    )
    print("| kernel | p50 ms | x MultiHeadAttention |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {np.median(t) * 1e3:.3f} | {np.median(t) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
