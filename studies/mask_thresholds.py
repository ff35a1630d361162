#!/usr/bin/env python
"""Where the ort-cpu mask forms start to pay (compiler/lowerings/): for one mask kind, the ort-cpu
graph with each length threshold forced off ("short": one MultiHeadAttention with the whole mask as
attention_bias) and on ("long": the flash or query-block form), timed in turns against the graph
without any mask form ("one op", as before the forms), at each batch x length. Each figure is the
median over rounds of that graph's time over the one-op graph's in the same round; idle sessions do
not spin. The thresholds in compiler/lowerings/ come from this table.

    python studies/mask_thresholds.py --mask padding --points 1x128 8x512 1x1024 1x2048
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import onnxruntime as ort

import compiler.fuse_ort_mha as fusion
from attention_compiler.benchmark.timing import cpu_name
from compiler import compile_model
from compiler.lowerings import causal_blocks, causal_chunks, padded_rows, query_blocks
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import random_inputs

MASKS = {
    "padding": {"key_padding_mask": "bool"},
    "causal": {"is_causal": True},
    "float-2d": {"attn_mask": "float"},
}
# where each lowering starts (compiler/lowerings/)
THRESHOLDS = (
    (padded_rows, "ROWS_FROM"),
    (causal_blocks, "CAUSAL_FROM"),
    (causal_chunks, "CHUNKS_FROM"),
    (query_blocks, "BLOCKS_FROM"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mask", choices=list(MASKS), required=True)
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument(
        "--points",
        nargs="+",
        default=["1x128", "8x128", "1x512", "8x512", "1x1024", "1x2048"],
        help="BATCHxLENGTH, self-attention",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="timing per point")
    args = p.parse_args(argv)
    try:
        args.points = [tuple(int(x) for x in point.split("x")) for point in args.points]
    except ValueError:
        p.error(f"--points are BATCHxLENGTH, like 8x512; got {' '.join(args.points)}")
    if any(len(point) != 2 or min(point) < 1 for point in args.points):
        p.error("--points are BATCHxLENGTH with both at least 1")
    return args


@contextlib.contextmanager
def _forms(mode: str):
    """The fusion with its mask forms as before them ("one op"), never ("short") or always ("long")."""
    saved = {place: getattr(*place) for place in THRESHOLDS}, fusion.mask_terms
    if mode == "one op":
        fusion.mask_terms = lambda core: None
    for module, name in THRESHOLDS:
        value = {"short": 2**62, "long": 1}.get(mode, saved[0][module, name])
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in saved[0].items():
            setattr(module, name, value)
        fusion.mask_terms = saved[1]


def _feeds(spec: AttentionSpec, batch: int, length: int) -> dict[str, np.ndarray]:
    """Padding: the last 20% of keys and about 5% more at random; float-2d: about 20% -inf, never key 0."""
    feeds = random_inputs(spec, (batch, length, length), np.random.default_rng(0))
    rng = np.random.default_rng(1)
    if "key_padding_mask" in feeds:
        mask = np.zeros((batch, length), bool)
        mask[:, int(length * 0.8) :] = True
        mask[:, 1:] |= rng.random((batch, length - 1)) < 0.05
        feeds["key_padding_mask"] = mask
    if "attn_mask" in feeds:
        mask = np.where(rng.random((length, length)) < 0.2, -np.inf, 0.0).astype(np.float32)
        mask[:, 0] = 0.0
        feeds["attn_mask"] = mask
    return feeds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = AttentionSpec(
        args.embed_dim, args.num_heads, batch_first=True, self_attention=True, **MASKS[args.mask]
    )
    canonical = build_mha(spec, AttentionWeights.random(spec))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {}
    for mode in ("one op", "short", "long"):
        with _forms(mode):
            sessions[mode] = ort.InferenceSession(
                compile_model(canonical, "ort-cpu").SerializeToString(),
                options,
                providers=["CPUExecutionProvider"],
            )
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}; {args.mask}, embed_dim {args.embed_dim}, "
        f"{args.num_heads} heads; thresholds now: "
        + ", ".join(f"{n} {getattr(module, n)}" for module, n in THRESHOLDS)
    )
    print("| batch | length | one op ms | short | long |\n|---|---|---|---|---|")
    for batch, length in args.points:
        feeds = _feeds(spec, batch, length)
        ratios: dict[str, list[float]] = {mode: [] for mode in sessions}
        times: list[float] = []
        for session in sessions.values():
            session.run(None, feeds)
        deadline = time.perf_counter() + args.seconds
        while time.perf_counter() < deadline or len(times) < 5:
            round_times = {}
            for mode, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds)
                round_times[mode] = time.perf_counter() - start
            times.append(round_times["one op"])
            for mode in sessions:
                ratios[mode].append(round_times[mode] / round_times["one op"])
        print(
            f"| {batch} | {length} | {np.median(times) * 1e3:.2f} | {np.median(ratios['short']):.2f}x | "
            f"{np.median(ratios['long']):.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
