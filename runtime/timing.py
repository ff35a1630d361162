"""Latency measurement: medians over repeated runs, FLOP counts, and the machine's matmul rate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    p50: float  # seconds
    p90: float
    runs: int

    def to_json(self) -> dict[str, float]:
        return {"p50_s": self.p50, "p90_s": self.p90, "runs": self.runs}


def measure(fn: Callable[[], object], *, warmup: int = 2, min_runs: int = 5, min_seconds: float = 1.0,
            max_runs: int = 200) -> Timing:
    """Wall-clock time of ``fn`` (perf_counter): ``warmup`` untimed calls, then at least ``min_runs``
    and at least ``min_seconds`` of timed calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(float(np.median(times)), float(np.percentile(times, 90)), len(times))


def self_attention_flops(batch: int, length: int, embed_dim: int) -> int:
    """Multiply-adds x 2 of self-attention: Q/K/V and output projections (4 x L x E x E) and
    scores and context (2 x L x L x E), per batch entry; masks remove no work."""
    return 2 * batch * (4 * length * embed_dim * embed_dim + 2 * length * length * embed_dim)


def ort_matmul_rate(n: int = 2048, threads: int = 0) -> float:
    """FLOP/s of one float32 (n, n) @ (n, n) MatMul on ONNX Runtime CPU: the rate the graphs' own
    MatMuls can reach on this machine."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((n, n)).astype(np.float32) for x in "ab"}
    timing = measure(lambda: session.run(None, feeds), min_runs=5, min_seconds=1.0)
    return 2 * n**3 / timing.p50
