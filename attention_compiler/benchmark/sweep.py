"""The latency sweep: compiled graphs beside torch eager, torch's SDPA block and torch.onnx.export's
graph, on the same inputs at each batch and length, each row with its peak memory, its floor (the
device's own matmul rate and bandwidth) and its error against torch eager in float32."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from attention_compiler.benchmark.cost import attention_flops, attention_min_bytes
from attention_compiler.benchmark.memory import PeakCuda, PeakRss, available_bytes, predicted_growth
from attention_compiler.benchmark.timing import Timing, measure, measure_cuda
from compiler import compile_model, get_target
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import random_inputs

BASELINES = ("eager", "sdpa", "exporter")


@dataclass
class Compiled:
    target: str
    precision: str
    form: str
    model: (
        bytes | str
    )  # serialized, or the path of a compile.py folder's model.onnx (its external data beside it)


def compile_all(
    spec: AttentionSpec,
    weights: AttentionWeights,
    targets: list[str],
    precisions: list[str],
    form: str | None,
) -> list[Compiled]:
    compiled = []
    for target in targets:
        for precision in precisions:
            _, chosen = get_target(target, precision, form)
            model = compile_model(build_mha(spec, weights), target, precision, chosen.name)
            compiled.append(Compiled(target, precision, chosen.name, model.SerializeToString()))
    return compiled


# Runners: one call with the inputs already in place, and its attn_output as NumPy ---------------------------


@dataclass
class Runner:
    call: Callable[[], Any]
    output: Callable[[], np.ndarray]
    timing: Callable[..., Timing]


def ort_runner(
    model: bytes | str,
    feeds: Mapping[str, np.ndarray],
    device: str,
    threads: int,
    providers: list[str],
) -> Runner:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=providers)
    names = [i.name for i in session.get_inputs()]
    inputs = dict(
        zip(names, feeds.values())
    )  # the exporter names its inputs its own way; the order is the spec's
    if device == "cpu":
        return Runner(
            lambda: session.run(None, inputs), lambda: session.run(None, inputs)[0], measure
        )
    import torch

    binding = session.io_binding()  # inputs copied to the GPU once; outputs left there
    values = [ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0) for x in inputs.values()]
    for name, value in zip(names, values):
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def output() -> np.ndarray:
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return Runner(
        lambda: session.run_with_iobinding(binding),
        output,
        lambda fn, **kw: measure(fn, sync=torch.cuda.synchronize, **kw),
    )


def torch_runner(
    fn: Callable[[Mapping[str, Any]], Any], feeds: Mapping[str, np.ndarray], device: str, dtype: Any
) -> Runner:
    import torch

    tensors = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    def call() -> Any:
        with torch.inference_mode():
            return fn(tensors)

    timing = measure if device == "cpu" else (lambda f, **kw: measure_cuda(f, torch, **kw))
    return Runner(call, lambda: call().float().cpu().numpy(), timing)


def bench_inputs(
    spec: AttentionSpec, batch: int, length: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs in the graph's layout. A key padding mask pads each row at its end, as batched
    serving does: at batch 1 the last 20% of keys; at batch 2 and more row 0 not at all, row 1 its
    last 30%, the others between 0 and 50% (drawn). An attn_mask blocks about 20% of keys at random.
    Key 0 is never masked, so no query row is fully masked (torch would return NaN there)."""
    feeds = random_inputs(spec, (batch, length, length), rng)
    if "key_padding_mask" in feeds:
        padded = [0.2] if batch == 1 else [0.0, 0.3] + list(rng.uniform(0.0, 0.5, batch - 2))
        keep = np.arange(length)[None, :] < np.ceil(length * (1 - np.asarray(padded)))[:, None]
        mask = feeds["key_padding_mask"]
        feeds["key_padding_mask"] = (
            ~keep if mask.dtype == np.bool_ else np.where(keep, 0.0, -np.inf).astype(mask.dtype)
        )
    for name in ("key_padding_mask", "attn_mask"):
        if name in feeds:
            feeds[name][..., 0] = False if feeds[name].dtype == np.bool_ else 0.0
    return feeds


# The sweep ----------------------------------------------------------------------------------------


def device_rates(device: str, threads: int, min_seconds: float) -> dict[str, float]:
    from attention_compiler.benchmark import timing

    if device == "cpu":
        rate = timing.cpu_matmul_rate(threads=threads, min_seconds=min_seconds)
        return {
            "matmul_fp32_flops": rate,
            "matmul_fp16_flops": rate,  # ONNX Runtime CPU computes fp16 graphs in float32
            "bandwidth_bytes_per_s": timing.cpu_bandwidth(threads=threads, min_seconds=min_seconds),
        }
    import torch

    return {
        "matmul_fp32_flops": timing.cuda_matmul_rate(torch, torch.float32, min_seconds=min_seconds),
        "matmul_fp16_flops": timing.cuda_matmul_rate(torch, torch.float16, min_seconds=min_seconds),
        "bandwidth_bytes_per_s": timing.cuda_bandwidth(torch, min_seconds=min_seconds),
    }


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep runs and how long it times each row."""

    device: str = "cpu"
    threads: int = 0
    batches: tuple[int, ...] = (1,)
    lengths: tuple[int, ...] = (128, 512, 2048, 4096)
    baselines: tuple[str, ...] = BASELINES
    warmup: int = 2
    runs: int = 5
    min_seconds: float = 1.0


def sweep(
    settings: SweepSettings,
    spec: AttentionSpec,
    weights: AttentionWeights,
    compiled: list[Compiled],
    rates: Mapping[str, float],
    tmp: Path,
) -> list[dict[str, Any]]:
    """One row per backend at every batch and length, each related to the others at its point."""
    import torch

    backends = _backends(settings, spec, weights, compiled, tmp)
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for batch in settings.batches:
        for length in settings.lengths:
            feeds = bench_inputs(spec, batch, length, rng)
            available = available_bytes(torch if settings.device == "cuda" else None)
            point = {"batch": batch, "length": length}
            for name, precision, make in backends:
                row = {"backend": name, "precision": precision, **point}
                skipped = make if isinstance(make, str) else _too_big(rows, row, available)
                if skipped is not None:
                    rows.append({**row, "skipped": skipped})
                    continue
                print(
                    f"  {name} ({precision}), batch {batch}, length {length}",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append({**row, **_measure(settings, make, feeds)})
            _relate(rows, point, spec, rates)
    return rows


Backend = tuple[str, str, "Callable[[Mapping[str, np.ndarray]], Runner] | str"]


def _backends(
    settings: SweepSettings,
    spec: AttentionSpec,
    weights: AttentionWeights,
    compiled: list[Compiled],
    tmp: Path,
) -> list[Backend]:
    """(name, precision, runner maker or why it is missing) of each backend the sweep times."""
    import torch

    device, threads = settings.device, settings.threads
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    # torch baselines in each precision asked for on a GPU; on the CPU in float32, as torch users run it there
    torch_precisions = (
        sorted({c.precision for c in compiled} | {"fp32"}) if device == "cuda" else ["fp32"]
    )
    backends: list[Backend] = []
    for precision in torch_precisions:
        backends += _torch_backends(settings, spec, weights, precision, dtypes[precision])
    gpu_providers = None
    if device == "cuda":
        gpu_providers = "CUDAExecutionProvider" in ort.get_available_providers()
    if "exporter" in settings.baselines:
        exporter = _exporter(spec, weights, tmp, device, threads, gpu_providers)
        backends.append(("exporter graph", "fp32", exporter))
    for c in compiled:
        backends.append((f"{c.target} graph", c.precision, _compiled(c, device, threads)))
    return backends


def _torch_backends(
    settings: SweepSettings,
    spec: AttentionSpec,
    weights: AttentionWeights,
    precision: str,
    dtype: Any,
) -> list[Backend]:
    device = settings.device
    backends: list[Backend] = []
    if "eager" in settings.baselines:
        from attention_compiler.benchmark.baselines import eager_attention

        eager = eager_attention(spec, weights, dtype=dtype, device=device)
        backends.append(
            ("torch eager", precision, lambda f, fn=eager: torch_runner(fn, f, device, dtype))
        )
    if "sdpa" in settings.baselines:
        from attention_compiler.benchmark.baselines import SdpaAttention

        try:
            sdpa = SdpaAttention(spec, weights, dtype=dtype, device=device)
        except ValueError as exc:
            backends.append(("torch sdpa", precision, str(exc)))
        else:
            backends.append(
                ("torch sdpa", precision, lambda f, fn=sdpa: torch_runner(fn, f, device, dtype))
            )
    return backends


def _too_big(rows: list[dict[str, Any]], row: dict[str, Any], available: float) -> str | None:
    """Why a row is skipped: its memory, predicted from the same backend's growth over the shorter
    lengths, would not fit."""
    history = [
        (r["length"], r["memory_growth_bytes"])
        for r in rows
        if (r["backend"], r["precision"], r["batch"])
        == (row["backend"], row["precision"], row["batch"])
        and "skipped" not in r
    ]
    predicted = predicted_growth(history, row["length"])
    if predicted is not None and predicted > 0.9 * available:
        return (
            f"needs about {predicted / 2**30:.1f} GiB by its growth over the shorter "
            f"lengths; {available / 2**30:.1f} GiB are available"
        )
    return None


def _exporter(
    spec: AttentionSpec,
    weights: AttentionWeights,
    tmp: Path,
    device: str,
    threads: int,
    gpu: bool | None,
) -> Callable[[Mapping[str, np.ndarray]], Runner] | str:
    from attention_compiler.benchmark.baselines import export_with_torch

    if gpu is False:
        return "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    path = tmp / "exported.onnx"
    try:
        export_with_torch(spec, weights, path)
    except (
        Exception
    ) as exc:  # torch.export's failures have many types; the row says why it is missing
        return f"torch.onnx.export failed: {str(exc).splitlines()[0][:200]}"
    providers = ["CPUExecutionProvider"] if device == "cpu" else ["CUDAExecutionProvider"]
    return lambda feeds: ort_runner(str(path), feeds, device, threads, providers)


def _compiled(
    c: Compiled, device: str, threads: int
) -> Callable[[Mapping[str, np.ndarray]], Runner] | str:
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        wanted = "TensorrtExecutionProvider" if c.target == "tensorrt" else "CUDAExecutionProvider"
        if wanted not in ort.get_available_providers():
            return f"onnxruntime has no {wanted} (pip install onnxruntime-gpu{', and TensorRT' if c.target == 'tensorrt' else ''})"
        providers = [wanted, "CUDAExecutionProvider"] if c.target == "tensorrt" else [wanted]
    return lambda feeds: ort_runner(c.model, feeds, device, threads, providers)


def _measure(
    settings: SweepSettings,
    make: Callable[[Mapping[str, np.ndarray]], Runner],
    feeds: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """Set up (session or tensors), run, time, inside one peak-memory window, so the peak is
    this backend's at this point: a fresh session each time, so no arena carries over."""
    if settings.device == "cpu":
        peak = PeakRss()
    else:
        import torch

        peak = PeakCuda(torch)
    with peak:
        runner = make(feeds)
        output = runner.output()
        timing = runner.timing(
            runner.call,
            warmup=settings.warmup,
            min_runs=settings.runs,
            min_seconds=settings.min_seconds,
        )
        del runner
    return {
        **timing.to_json(),
        "memory_peak_bytes": peak.peak,
        "memory_growth_bytes": peak.growth,
        "memory": "process rss" if settings.device == "cpu" else "cuda device",
        "_output": output,
    }


def _relate(
    rows: list[dict[str, Any]],
    point: Mapping[str, int],
    spec: AttentionSpec,
    rates: Mapping[str, float],
) -> None:
    """Figures that depend on other rows of the same point or on the device: ratios, floor, error."""
    here = [
        r
        for r in rows
        if r["batch"] == point["batch"] and r["length"] == point["length"] and "skipped" not in r
    ]
    eager = {r["precision"]: r for r in here if r["backend"] == "torch eager"}
    exporter = next((r for r in here if r["backend"] == "exporter graph"), None)
    truth = eager["fp32"]["_output"] if "fp32" in eager else None
    batch, length = point["batch"], point["length"]
    flops = attention_flops(spec, batch, length, length)
    for r in here:
        output = r.pop("_output")
        half = r["precision"] == "fp16"
        nbytes = attention_min_bytes(spec, batch, length, length, weight_bytes=2 if half else 4)
        compute = flops / rates["matmul_fp16_flops" if half else "matmul_fp32_flops"]
        memory = nbytes / rates["bandwidth_bytes_per_s"]
        base = eager.get(r["precision"], eager.get("fp32"))
        r.update(
            {
                "tokens_per_s": batch * length / r["p50_s"],
                "flops": flops,
                "gflops": flops / r["p50_s"] / 1e9,
                "min_bytes": nbytes,
                "floor_s": max(compute, memory),
                "floor_bound": "compute" if compute >= memory else "memory",
                "x_floor": r["p50_s"] / max(compute, memory),
                "ratio_to_eager": r["p50_s"] / base["p50_s"] if base else None,
                "eager_baseline": base["precision"] if base else None,
                "ratio_to_exporter": r["p50_s"] / exporter["p50_s"] if exporter else None,
                "rel_error_vs_eager_fp32": _rel_error(output, truth) if truth is not None else None,
            }
        )
    if truth is not None:
        eager["fp32"]["rel_error_vs_eager_fp32"] = 0.0


def relate_masks(rows: list[dict[str, Any]]) -> None:
    """Each masked row against the same backend's unmasked row at the same point."""
    key = lambda r: (r["backend"], r["precision"], r["batch"], r["length"])  # noqa: E731
    unmasked = {key(r): r for r in rows if r["mask"] == "none" and "skipped" not in r}
    for r in rows:
        if "skipped" not in r and key(r) in unmasked:
            r["ratio_to_unmasked"] = r["p50_s"] / unmasked[key(r)]["p50_s"]


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())
