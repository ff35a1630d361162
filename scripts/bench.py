#!/usr/bin/env python
"""Latency of compiled attention graphs beside what a user would run instead (torch eager
nn.MultiheadAttention, the same block on F.scaled_dot_product_attention, and the graph
torch.onnx.export(dynamo=True) makes), all measured in this run on the same inputs; each row
against the floor this device's own matmul rate and memory bandwidth set."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort
from signals import Signals, Stopped, stop_as_exception
from spec_flags import add_spec_flags, given_spec_flags, spec_from_args

from artifacts.files import file_records
from artifacts.output_folders import (
    ArtifactError,
    OutputRefused,
    check_output_file,
    write_file_atomically,
)
from benchmark.cost import attention_flops, attention_min_bytes
from benchmark.memory import PeakCuda, PeakRss, available_bytes, predicted_growth
from benchmark.timing import Timing, cpu_name, measure, measure_cuda
from compiler import PRECISIONS, TARGETS, TargetError, compile_model, get_target
from graphs import AttentionSpec, AttentionWeights, SpecError, WeightsError, build_mha
from runtime.check import random_inputs

BASELINES = ("eager", "sdpa", "exporter")
MASKS = {  # --masks: the spec's mask options for each kind (bench_inputs draws the masks themselves)
    "none": {},
    "padding": {"key_padding_mask": "bool"},
    "causal": {"is_causal": True},
    "causal+padding": {"is_causal": True, "key_padding_mask": "bool"},
    "float-2d": {"attn_mask": "float"},
}
DEVICE_TARGETS = {
    "cpu": ("portable", "onnx-attention", "ort-cpu"),
    "cuda": ("portable", "onnx-attention", "ort-cuda", "tensorrt"),
}


class BenchError(ValueError):
    """A request bench.py cannot carry out; the message says what and what would do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bench.py: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "dir",
        nargs="?",
        default=None,
        help="a folder compile.py wrote: bench its model.onnx with its spec, weights, target and precision",
    )
    groups = add_spec_flags(p, embed_dim_help="default 512 (64 with --quick); not with DIR")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=None,
        help="compile the spec for these targets (default: ort-cpu on cpu, ort-cuda on cuda); not with DIR",
    )
    sweep.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=["fp32"], help="not with DIR"
    )
    sweep.add_argument(
        "--form", default=None, help="the targets' graph form where they offer several"
    )
    sweep.add_argument("--batches", nargs="+", type=int, default=[1])
    sweep.add_argument(
        "--masks",
        nargs="+",
        choices=list(MASKS),
        default=None,
        help="one sweep per mask kind on a self-attention (padding: per-row trailing padding; float-2d: "
        "an (L, S) float attn_mask, about 20%% -inf), with each row also against the unmasked one; "
        "not with DIR or the spec's own mask flags",
    )
    sweep.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[128, 512, 2048, 4096],
        help="query length; key and value have the same length",
    )
    sweep.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="torch eager nn.MultiheadAttention, the block on F.scaled_dot_product_attention, "
        "and torch.onnx.export(dynamo=True)'s graph on the same backend",
    )
    run = p.add_argument_group("measurement")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads and torch threads; 0: all cores",
    )
    run.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    run.add_argument("--runs", type=int, default=5, help="at least this many timed runs")
    run.add_argument(
        "--min-seconds", type=float, default=1.0, help="and at least this long timing each row"
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: embed_dim 64, 4 heads, batches 1 2, lengths 32 64, short timing (unless given)",
    )
    decode = p.add_argument_group(
        "decoding (--decode: a KV-cache graph against recomputing; implies --self-attention "
        "--causal)"
    )
    decode.add_argument(
        "--decode",
        action="store_true",
        help="per-token latency of N new tokens after a P-token prompt: the KV-cache graph of each target, "
        "the plain graph recomputing causal attention over the prefix, and torch eager doing the same",
    )
    decode.add_argument("--prompt", type=int, default=2048, help="P, the prompt's length")
    decode.add_argument(
        "--new-tokens", type=int, default=32, help="N, tokens decoded one at a time"
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--json", default=None, help="write every figure, with the machine, to this file"
    )
    out.add_argument(
        "--plot", default=None, help="write a log-log PNG of latency against length per backend"
    )
    out.add_argument("--verbose", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    for flag in ("json", "plot"):  # checked now, not after a benchmark of many minutes
        if getattr(args, flag) is not None:
            try:
                check_output_file(getattr(args, flag), f"--{flag}")
            except OutputRefused as exc:
                p.error(str(exc))
    if args.dir is not None:
        clashing = given_spec_flags(args, groups)
        clashing += [
            f
            for f, v in (
                ("--targets", args.targets),
                ("--precisions", args.precisions != ["fp32"]),
                ("--form", args.form),
            )
            if v
        ]
        if clashing:
            p.error(
                f"DIR fixes the spec, weights, target and precision; drop {', '.join(clashing)}"
            )
    if args.masks is not None:
        own = [
            flag
            for flag, value in (
                ("--key-padding-mask", args.key_padding_mask),
                ("--attn-mask", args.attn_mask),
                ("--causal", args.causal),
                ("--kv-cache", args.kv_cache),
                ("--decode", args.decode),
                ("DIR", args.dir),
            )
            if value
        ]
        if own:
            p.error(f"--masks sets the masks itself; drop {', '.join(own)}")
        args.self_attention = True
    if args.decode:
        if args.dir is not None or args.device != "cpu":
            p.error("--decode builds its graphs from the spec flags and runs on --device cpu")
        if args.prompt < 1 or args.new_tokens < 2:
            p.error(
                "--prompt must be at least 1 and --new-tokens at least 2 (the first step warms up)"
            )
        args.self_attention = args.causal = True
    if args.quick:  # small sizes and short timing, where not given explicitly
        for name, value in (
            ("batches", [1, 2]),
            ("lengths", [32, 64]),
            ("min_seconds", 0.05),
            ("warmup", 1),
        ):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if args.embed_dim is None and args.num_heads is None:
        args.embed_dim, args.num_heads = (64, 4) if args.quick else (512, 8)
    for name in ("batches", "lengths"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} must be positive integers, got {getattr(args, name)}")
    if args.runs < 1 or args.warmup < 0 or args.min_seconds < 0:
        p.error("--runs must be at least 1, --warmup and --min-seconds at least 0")
    targets = args.targets or [{"cpu": "ort-cpu", "cuda": "ort-cuda"}[args.device]]
    wrong = [t for t in targets if t not in DEVICE_TARGETS[args.device]]
    if args.dir is None and wrong:
        p.error(
            f"target {wrong[0]} does not run on --device {args.device}; "
            f"there: {', '.join(DEVICE_TARGETS[args.device])}"
        )
    args.targets = targets
    return args


# What is benched ---------------------------------------------------------------------------------


@dataclass
class Compiled:
    target: str
    precision: str
    form: str
    model: (
        bytes | str
    )  # serialized, or the path of a compile.py folder's model.onnx (its external data beside it)


def load_dir(folder: str, device: str) -> tuple[AttentionSpec, AttentionWeights, Compiled]:
    """The spec, weights and model of a compile.py folder, the model checked against its manifest."""
    path = Path(folder)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = [name for name in manifest["files"] if name.startswith("model.onnx")]
        found = file_records(path, files)
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(
            f"{folder!r} is not a folder compile.py wrote (no readable manifest.json and model.onnx: {exc})"
        ) from exc
    if "spec" not in manifest:
        raise BenchError(
            f"{folder!r} holds a graph compiled with --onnx; bench.py needs the spec, so compile from spec flags"
        )
    if "block" in manifest["spec"]:
        raise BenchError(
            f"{folder!r} holds a {manifest['spec']['block']} block; bench.py times bare attention (--block mha)"
        )
    for name in files:
        if found[name]["sha256"] != manifest["files"][name]["sha256"]:
            raise BenchError(
                f"{folder}/{name} does not match the sha256 in its manifest.json; recompile it"
            )
    if manifest["target"] not in DEVICE_TARGETS[device]:
        raise BenchError(
            f"{folder!r} is compiled for {manifest['target']}, which does not run on --device {device}"
        )
    spec = AttentionSpec.from_dict(manifest["spec"])
    source = manifest.get("weights", {})
    if source.get("kind") == "random":
        weights = AttentionWeights.random(spec, source["seed"])
    elif source.get("kind") == "file":
        weights = AttentionWeights.from_file(spec, source["path"])
    else:
        raise BenchError(
            f"the weights of {folder!r} came from {source.get('kind', 'an unknown source')}, which bench.py "
            "cannot load again; compile with --weights FILE"
        )
    return (
        spec,
        weights,
        Compiled(
            manifest["target"], manifest["precision"], manifest["form"], str(path / "model.onnx")
        ),
    )


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
    from benchmark import timing

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


def sweep(
    args: argparse.Namespace,
    spec: AttentionSpec,
    weights: AttentionWeights,
    compiled: list[Compiled],
    rates: Mapping[str, float],
    tmp: Path,
) -> list[dict[str, Any]]:
    import torch

    device, threads = args.device, args.threads
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    # torch baselines in each precision asked for on a GPU; on the CPU in float32, as torch users run it there
    torch_precisions = (
        sorted({c.precision for c in compiled} | {"fp32"}) if device == "cuda" else ["fp32"]
    )
    backends: list[tuple[str, str, Callable[[Mapping[str, np.ndarray]], Runner] | str]] = []
    for precision in torch_precisions:
        dtype = dtypes[precision]
        if "eager" in args.baselines:
            from benchmark.baselines import eager_attention

            eager = eager_attention(spec, weights, dtype=dtype, device=device)
            backends.append(
                (
                    "torch eager",
                    precision,
                    lambda f, fn=eager, d=dtype: torch_runner(fn, f, device, d),
                )
            )
        if "sdpa" in args.baselines:
            from benchmark.baselines import SdpaAttention

            try:
                sdpa = SdpaAttention(spec, weights, dtype=dtype, device=device)
                backends.append(
                    (
                        "torch sdpa",
                        precision,
                        lambda f, fn=sdpa, d=dtype: torch_runner(fn, f, device, d),
                    )
                )
            except ValueError as exc:
                backends.append(("torch sdpa", precision, str(exc)))
    gpu_providers = None
    if device == "cuda":
        available = ort.get_available_providers()
        gpu_providers = "CUDAExecutionProvider" in available
    if "exporter" in args.baselines:
        backends.append(
            (
                "exporter graph",
                "fp32",
                _exporter(spec, weights, tmp, device, threads, gpu_providers),
            )
        )
    for c in compiled:
        backends.append((f"{c.target} graph", c.precision, _compiled(c, device, threads)))

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for batch in args.batches:
        for length in args.lengths:
            feeds = bench_inputs(spec, batch, length, rng)
            available = available_bytes(torch if device == "cuda" else None)
            point = {"batch": batch, "length": length}
            for name, precision, make in backends:
                row = {"backend": name, "precision": precision, **point}
                if isinstance(make, str):
                    rows.append({**row, "skipped": make})
                    continue
                history = [
                    (r["length"], r["memory_growth_bytes"])
                    for r in rows
                    if (r["backend"], r["precision"], r["batch"]) == (name, precision, batch)
                    and "skipped" not in r
                ]
                predicted = predicted_growth(history, length)
                if predicted is not None and predicted > 0.9 * available:
                    rows.append(
                        {
                            **row,
                            "skipped": f"needs about {predicted / 2**30:.1f} GiB by its growth over the shorter "
                            f"lengths; {available / 2**30:.1f} GiB are available",
                        }
                    )
                    continue
                print(
                    f"  {name} ({precision}), batch {batch}, length {length}",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append({**row, **_measure(args, make, feeds)})
            _relate(rows, point, spec, rates)
    return rows


def _exporter(
    spec: AttentionSpec,
    weights: AttentionWeights,
    tmp: Path,
    device: str,
    threads: int,
    gpu: bool | None,
) -> Callable[[Mapping[str, np.ndarray]], Runner] | str:
    from benchmark.baselines import export_with_torch

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
    args: argparse.Namespace,
    make: Callable[[Mapping[str, np.ndarray]], Runner],
    feeds: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """Set up (session or tensors), run, time, inside one peak-memory window, so the peak is
    this backend's at this point: a fresh session each time, so no arena carries over."""
    if args.device == "cpu":
        peak = PeakRss()
    else:
        import torch

        peak = PeakCuda(torch)
    with peak:
        runner = make(feeds)
        output = runner.output()
        timing = runner.timing(
            runner.call, warmup=args.warmup, min_runs=args.runs, min_seconds=args.min_seconds
        )
        del runner
    return {
        **timing.to_json(),
        "memory_peak_bytes": peak.peak,
        "memory_growth_bytes": peak.growth,
        "memory": "process rss" if args.device == "cpu" else "cuda device",
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


def _relate_masks(rows: list[dict[str, Any]]) -> None:
    """Each masked row against the same backend's unmasked row at the same point."""
    key = lambda r: (r["backend"], r["precision"], r["batch"], r["length"])  # noqa: E731
    unmasked = {key(r): r for r in rows if r["mask"] == "none" and "skipped" not in r}
    for r in rows:
        if "skipped" not in r and key(r) in unmasked:
            r["ratio_to_unmasked"] = r["p50_s"] / unmasked[key(r)]["p50_s"]


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


# Output -----------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    masks = any("mask" in r for r in rows)
    head = (["mask"] if masks else []) + [
        "batch",
        "length",
        "backend",
        "prec",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "runs",
        "x eager",
        "x exporter",
        *(["x no mask"] if masks else []),
        "tokens/s",
        "GFLOP/s",
        "floor ms",
        "x floor",
        "mem +MiB",
        "rel err",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        mask = f"| {r['mask']} " if masks else ""
        if "skipped" in r:
            lines.append(
                f"{mask}| {r['batch']} | {r['length']} | {r['backend']} | {r['precision']} | skipped: {r['skipped']} |"
            )
            continue
        floor = f"{r['floor_s'] * 1e3:.3g} ({r['floor_bound'][0]})"
        unmasked = f"{f(r.get('ratio_to_unmasked'), '.2f')} | " if masks else ""
        lines.append(
            f"{mask}| {r['batch']} | {r['length']} | {r['backend']} | {r['precision']} | {r['p50_s'] * 1e3:.3f} | "
            f"{r['p90_s'] * 1e3:.3f} | {r['p99_s'] * 1e3:.3f} | {r['runs']} | {f(r['ratio_to_eager'], '.2f')} | "
            f"{f(r['ratio_to_exporter'], '.2f')} | {unmasked}{r['tokens_per_s']:.4g} | {r['gflops']:.1f} | {floor} | "
            f"{r['x_floor']:.1f} | {r['memory_growth_bytes'] / 2**20:.1f} | {f(r['rel_error_vs_eager_fp32'], '.1e')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "skipped" not in r]
    batches = sorted({r["batch"] for r in timed})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        series = sorted({(r["backend"], r["precision"]) for r in timed if r["batch"] == batch})
        for backend, precision in series:
            points = sorted(
                (r["length"], r["p50_s"] * 1e3)
                for r in timed
                if (r["batch"], r["backend"], r["precision"]) == (batch, backend, precision)
            )
            ax.plot(*zip(*points), marker="o", label=f"{backend} ({precision})")
        floor = sorted(
            {
                (r["length"], r["floor_s"] * 1e3)
                for r in timed
                if r["batch"] == batch and r["precision"] == "fp32"
            }
        )
        if floor:
            ax.plot(*zip(*floor), linestyle="--", color="grey", label="floor (fp32)")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length",
            ylabel="p50 latency (ms)",
            title=f"batch {batch}",
        )
        lengths = sorted({r["length"] for r in timed})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_file_atomically(Path(path), buffer.getvalue())
    plt.close(fig)


def machine(device: str, threads: int) -> dict[str, Any]:
    versions = {}
    for dist in (
        "attention-compiler",
        "onnxruntime",
        "onnxruntime-gpu",
        "torch",
        "onnx",
        "numpy",
        "tensorrt",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "onnxruntime_providers": ort.get_available_providers(),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signals = Signals()
    try:
        with stop_as_exception() as signals:
            return run(args)
    except (Stopped, KeyboardInterrupt):
        print(
            f"bench.py: {'interrupted' if signals.exit_status == 130 else 'stopped by ' + signals.name}",
            file=sys.stderr,
        )
        return signals.exit_status
    except (BenchError, SpecError, WeightsError, TargetError, ArtifactError) as exc:
        if args.verbose:
            raise
        print(f"bench.py: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, ArtifactError) else 2


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda needs a CUDA GPU that torch can see; this machine has none")
    if args.dir is not None:
        spec, weights, model = load_dir(args.dir, args.device)
        compiled = [model]
    else:
        spec, weights = spec_from_args(args), None
        weights = (
            AttentionWeights.from_file(spec, args.weights)
            if args.weights
            else AttentionWeights.random(spec, args.seed)
        )
        if args.decode:
            return run_decode(args, spec, weights, args.threads or os.cpu_count() or 1)
        compiled = (
            compile_all(spec, weights, args.targets, args.precisions, args.form)
            if args.masks is None
            else []
        )
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rates = device_rates(args.device, threads, min(1.0, max(args.min_seconds, 0.2)))
    print(
        f"{args.device}: matmul {rates['matmul_fp32_flops'] / 1e9:.1f} GFLOP/s fp32"
        + (f", {rates['matmul_fp16_flops'] / 1e9:.1f} fp16" if args.device == "cuda" else "")
        + f"; bandwidth {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({threads} threads)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.masks is None:
            rows = sweep(args, spec, weights, compiled, rates, Path(tmp))
        else:
            rows = []
            for kind in args.masks:
                print(f"mask: {kind}", file=sys.stderr, flush=True)
                masked = dataclasses.replace(spec, **MASKS[kind])
                compiled = compile_all(masked, weights, args.targets, args.precisions, args.form)
                rows += [
                    {"mask": kind, **r}
                    for r in sweep(args, masked, weights, compiled, rates, Path(tmp))
                ]
            _relate_masks(rows)
    print(table(rows))
    title = (
        f"{args.device}, embed_dim {spec.embed_dim}, {spec.num_heads} heads"
        + "".join(f", {k}" for k in ("key_padding_mask", "attn_mask") if getattr(spec, k))
        + (", causal" if spec.is_causal else "")
    )
    report = {
        "machine": machine(args.device, threads),
        "device": args.device,
        "rates": rates,
        "spec": spec.to_dict(),
        "weights": dict(weights.source),
        "source": args.dir,
        "compiled": [
            {"target": c.target, "precision": c.precision, "form": c.form} for c in compiled
        ],
        "settings": {
            k: getattr(args, k)
            for k in ("batches", "lengths", "masks", "baselines", "warmup", "runs", "min_seconds")
        },
        "rows": rows,
    }
    if args.json:
        write_file_atomically(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def run_decode(
    args: argparse.Namespace, spec: AttentionSpec, weights: AttentionWeights, threads: int
) -> int:
    from decode_bench import decode_rows, decode_table, prefill_rows, prefill_table

    batch = args.batches[0]
    print(
        f"decoding {args.new_tokens} tokens after a {args.prompt}-token prompt, batch {batch}, embed_dim "
        f"{spec.embed_dim}, {spec.num_heads} heads, {args.precisions[0]}, {threads} threads; the first step warms up"
    )
    rows = decode_rows(
        spec,
        weights,
        args.targets,
        args.precisions[0],
        args.prompt,
        args.new_tokens,
        batch,
        threads,
        torch_eager="eager" in args.baselines,
    )
    print(decode_table(rows))
    prefill = prefill_rows(
        spec, weights, args.targets, args.precisions[0], args.prompt, batch, threads
    )
    print(prefill_table(prefill))
    if args.json:
        report = {
            "machine": machine("cpu", threads),
            "spec": spec.to_dict(),
            "weights": dict(weights.source),
            "settings": {
                "prompt": args.prompt,
                "new_tokens": args.new_tokens,
                "batch": batch,
                "precision": args.precisions[0],
            },
            "rows": rows,
            "prefill": prefill,
        }
        write_file_atomically(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
