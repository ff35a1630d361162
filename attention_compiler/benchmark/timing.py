"""Latency measurement (percentiles over repeated runs) and the device's own rates: the matmul
FLOP/s and memory bandwidth that bound what any graph can reach on it."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def cpu_name() -> str:
    """The CPU's model name, for figures that are only meaningful with the machine named."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_int8_instructions() -> str:
    """The CPU's int8 dot-product instructions, which decide what int8 saves: AMX, VNNI (AVX512 or
    AVX), or none (an AVX2 CPU multiplies uint8 by int8 through int16 pairs)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return "unknown"
    for flag, name in (
        ("amx_int8", "AMX"),
        ("avx512_vnni", "AVX512-VNNI"),
        ("avx_vnni", "AVX-VNNI"),
    ):
        if flag in flags:
            return name
    return "none (AVX2)" if "avx2" in flags else "none"


@dataclass(frozen=True)
class Timing:
    p50: float  # seconds
    p90: float
    p99: float
    best: float
    runs: int

    @classmethod
    def of(cls, times: list[float]) -> Timing:
        p50, p90, p99 = np.percentile(times, (50, 90, 99))
        return cls(float(p50), float(p90), float(p99), float(min(times)), len(times))

    def to_json(self) -> dict[str, float]:
        return {
            "p50_s": self.p50,
            "p90_s": self.p90,
            "p99_s": self.p99,
            "best_s": self.best,
            "runs": self.runs,
        }


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_runs: int = 5,
    min_seconds: float = 1.0,
    max_runs: int = 200,
    sync: Callable[[], object] | None = None,
) -> Timing:
    """Wall-clock time of ``fn`` (perf_counter): ``warmup`` untimed calls, then at least ``min_runs``
    and at least ``min_seconds`` of timed calls. ``sync`` (a device synchronisation) runs inside
    each timed interval, after ``fn``, so asynchronous work is counted."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (
        time.perf_counter() - start < min_seconds and len(times) < max_runs
    ):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return Timing.of(times)


def measure_cuda(
    fn: Callable[[], object],
    torch: Any,
    *,
    warmup: int = 2,
    min_runs: int = 5,
    min_seconds: float = 1.0,
    max_runs: int = 200,
) -> Timing:
    """GPU time of ``fn`` between CUDA events on the current stream, one event pair per run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (
        time.perf_counter() - start < min_seconds and len(times) < max_runs
    ):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return Timing.of(times)


def _ort_cpu_rate(
    nodes: list[Any], inputs: dict[str, np.ndarray], threads: int, min_seconds: float
) -> float:
    """Best seconds per run of a one-op float32 ONNX Runtime CPU graph: a floor is what the device
    can do, so the fastest run counts, not the median."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = nodes[-1].output[0]
    graph = helper.make_graph(
        nodes,
        "rate",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, next(iter(inputs.values())).shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return measure(lambda: session.run(None, inputs), min_runs=5, min_seconds=min_seconds).best


def cpu_matmul_rate(
    sizes: tuple[int, ...] = (1024, 2048), threads: int = 0, min_seconds: float = 1.0
) -> float:
    """FLOP/s of the fastest float32 (n, n) @ (n, n) MatMul on ONNX Runtime CPU over ``sizes``:
    the rate the graphs' own MatMuls can reach on this machine."""
    from onnx import helper

    rng = np.random.default_rng(0)
    rates = []
    for n in sizes:
        feeds = {x: rng.standard_normal((n, n)).astype(np.float32) for x in "ab"}
        rates.append(
            2
            * n**3
            / _ort_cpu_rate(
                [helper.make_node("MatMul", ["a", "b"], ["c"])], feeds, threads, min_seconds
            )
        )
    return max(rates)


def cpu_bandwidth(n: int = 2**25, threads: int = 0, min_seconds: float = 1.0) -> float:
    """Bytes/s of a float32 Add of two n-vectors on ONNX Runtime CPU (two reads, one write): the
    memory bandwidth the graphs' own elementwise ops see."""
    from onnx import helper

    feeds = {x: np.full(n, 1.0, np.float32) for x in "ab"}
    return (
        3
        * 4
        * n
        / _ort_cpu_rate([helper.make_node("Add", ["a", "b"], ["c"])], feeds, threads, min_seconds)
    )


def cuda_matmul_rate(torch: Any, dtype: Any, n: int = 8192, min_seconds: float = 1.0) -> float:
    """FLOP/s of the fastest (n, n) @ (n, n) torch.matmul in ``dtype`` on the current GPU (cuBLAS)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / measure_cuda(lambda: torch.matmul(a, b), torch, min_seconds=min_seconds).best


def cuda_bandwidth(torch: Any, n: int = 2**28, min_seconds: float = 1.0) -> float:
    """Bytes/s of a device-to-device copy of n float32 (one read, one write) on the current GPU."""
    src = torch.ones(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * 4 * n / measure_cuda(lambda: dst.copy_(src), torch, min_seconds=min_seconds).best


def before_and_after(before: Any, after: Any, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """p50/p90/p99 of a graph before and after the passes on ONNX Runtime CPU, same inputs, same run."""
    import os

    import onnxruntime

    timings = {
        name: measure(lambda s=s: s.run(inputs), warmup=3, min_runs=10, min_seconds=1.0).to_json()
        for name, s in (("before", before), ("after", after))
    }
    return {
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        **timings,
        "ratio_p50": timings["after"]["p50_s"] / timings["before"]["p50_s"],
        "where": f"ONNX Runtime {onnxruntime.__version__} CPUExecutionProvider on {cpu_name()} "
        f"({os.cpu_count()} logical CPUs)",
    }
