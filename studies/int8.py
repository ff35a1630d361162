#!/usr/bin/env python
"""int8 on ONNX Runtime's CPU against what a user would run instead, all timed in turns on the same
inputs (docs/BENCHMARKS.md, "int8 on the CPU"): the fp32 export, our fp32 ort-cpu graph,
``quantize_dynamic`` of the export (per channel, int8 weights), ``optimize_for_ort`` then
``quantize_dynamic``, and our ``--precision int8``; each int8 graph with its error against the fp32
export (relative to its largest output, and cosine similarity). The CPU's int8 instructions head the
table: what int8 saves depends on them.

    python studies/int8.py --families bert gpt2 --points 1x128 1x512 8x128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import model_zoo
import numpy as np
import onnx
import onnxruntime as ort
from corpus import cpu_session, optimize_for_ort_file, time_in_turns, timed_inputs

from attention_compiler.benchmark.timing import cpu_int8_instructions, cpu_matmul_rate, cpu_name
from compiler import compile_model
from graphs.onnx_files import load_onnx
from runtime.check import cosine, errors

GRAPHS = ("export fp32", "ort-cpu fp32", "quantize_dynamic", "optimize_for_ort + quantize_dynamic")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--families", nargs="+", choices=model_zoo.FAMILIES, default=["bert", "gpt2"])
    p.add_argument("--exporters", nargs="+", choices=model_zoo.EXPORTERS, default=["dynamo"])
    p.add_argument("--points", nargs="+", default=["1x128", "1x512", "8x128"], help="BATCHxSEQ")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="0: every core")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "attention-compiler" / "zoo"))
    args = p.parse_args(argv)
    args.points = [tuple(int(x) for x in point.split("x")) for point in args.points]
    return args


def quantized(path: Path, folder: Path) -> Path:
    """``quantize_dynamic`` as its documentation shows it: per channel, int8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder / f"{path.stem}.int8.onnx"
    quantize_dynamic(path, out, per_channel=True, weight_type=QuantType.QInt8)
    return out


def graphs(entry: model_zoo.Entry, cache: str, folder: Path) -> dict[str, str | onnx.ModelProto]:
    path = model_zoo.export(entry, cache)
    original = load_onnx(path)
    return {
        "export fp32": str(path),
        "ort-cpu fp32": compile_model(original, "ort-cpu"),
        "quantize_dynamic": str(quantized(path, folder)),
        "optimize_for_ort + quantize_dynamic": str(
            quantized(optimize_for_ort_file(path, folder), folder)
        ),
        "ort-cpu int8": compile_model(original, "ort-cpu", "int8"),
    }


def rows(entry: model_zoo.Entry, args: argparse.Namespace, threads: int) -> list[str]:
    out = []
    original = load_onnx(model_zoo.export(entry, args.cache))
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {
            name: cpu_session(model, threads)
            for name, model in graphs(entry, args.cache, Path(tmp)).items()
        }
        for batch, seq in args.points:
            feeds = timed_inputs(original, batch, seq)
            times = time_in_turns(sessions, feeds, args.rounds, args.min_seconds)
            base = np.asarray(times["export fp32"])
            want = sessions["export fp32"].run(None, feeds)[0]
            cells = []
            for name, session in sessions.items():
                ratio = float(np.median(np.asarray(times[name]) / base))
                got = session.run(None, feeds)[0]
                error = (
                    ""
                    if "int8" not in name and "quantize" not in name
                    else (f" ({errors(got, want)[1]:.1e}, {cosine(got, want):.5f})")
                )
                cells.append(f"{ratio:.2f}x{error}")
            p50 = float(np.median(base)) * 1e3
            out.append(
                f"| {entry.name} | {batch}x{seq} | {p50:.2f} | " + " | ".join(cells[1:]) + " |"
            )
            print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    size = model_zoo.Size(args.hidden, args.heads, args.layers)
    rate = cpu_matmul_rate(threads=threads)
    print(
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads, int8 instructions: "
        f"{cpu_int8_instructions()}; ONNX Runtime {ort.__version__} float32 MatMul "
        f"{rate / 1e9:.1f} GFLOP/s"
    )
    head = [
        "| model | batch x seq | export fp32 p50 (ms) | "
        + " | ".join(GRAPHS[1:])
        + " | ort-cpu int8 |",
        "|---|---|---|" + "---|" * len(GRAPHS),
    ]
    lines = list(head)
    for entry in model_zoo.entries(size, tuple(args.families), (18,)):
        if entry.exporter in args.exporters and entry.implementation in (None, "sdpa"):
            lines += rows(entry, args, threads)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
