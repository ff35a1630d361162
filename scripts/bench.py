#!/usr/bin/env python
"""Latency of a compiled self-attention graph beside torch eager and torch.onnx.export's graph,
all measured in this run on the same inputs, with achieved GFLOP/s against this machine's
float32 matmul rate (an ONNX Runtime MatMul timed by this script)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from compiler import TARGETS, compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.ort import OrtSession
from runtime.timing import measure, ort_matmul_rate, self_attention_flops


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096])
    p.add_argument("--masks", nargs="+", choices=("none", "bool"), default=["none", "bool"],
                   help="run without a mask, and with a bool key_padding_mask")
    p.add_argument("--target", choices=TARGETS, default="ort-cpu")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads and torch threads; 0: all cores")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each point for at least this long")
    p.add_argument("--quick", action="store_true", help="a small sweep (embed_dim 64, lengths 32 and 64) for a smoke test")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.embed_dim, args.num_heads, args.lengths, args.min_seconds = 64, 4, [32, 64], 0.1
    return args


def export_torch(module: Any, spec: AttentionSpec, length: int, folder: Path) -> Path:
    """torch.onnx.export(dynamo=True) of the same module and call, dynamic batch and length."""
    import torch

    class Call(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = module

        def forward(self, query, *kpm):
            mask = kpm[0] if kpm else None
            return self.attn(query, query, query, key_padding_mask=mask, need_weights=False)[0]

    x = torch.randn(1, length, spec.embed_dim)
    args, dims = (x,), ({0: "batch", 1: "seq"},)
    if spec.key_padding_mask:
        args, dims = (x, torch.zeros(1, length, dtype=torch.bool)), (dims[0], ({0: "batch", 1: "seq"},))
    path = folder / f"exported-{spec.key_padding_mask}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Call().eval(), args, dynamo=True, dynamic_shapes=dims, verbose=False)
    program.save(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rate = ort_matmul_rate(threads=threads)
    print(f"float32 matmul rate (ONNX Runtime MatMul 2048^3, {threads} threads): {rate / 1e9:.1f} GFLOP/s")
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for mask in args.masks:
            spec = AttentionSpec(args.embed_dim, args.num_heads, batch_first=True, self_attention=True,
                                 key_padding_mask=None if mask == "none" else "bool")
            weights = AttentionWeights.random(spec, seed=0)
            compiled = OrtSession(compile_model(build_mha(spec, weights), args.target), options=options)
            module = torch.nn.MultiheadAttention(spec.embed_dim, spec.num_heads, batch_first=True).eval()
            module.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.tensors.items()})
            exported = OrtSession(str(export_torch(module, spec, args.lengths[0], Path(tmp))), options=options)
            for length in args.lengths:
                query = rng.standard_normal((args.batch, length, spec.embed_dim)).astype(np.float32)
                feeds = {"query": query}
                if mask != "none":
                    pad = rng.random((args.batch, length)) < 0.2
                    pad[:, 0] = False
                    feeds["key_padding_mask"] = pad
                tq = torch.from_numpy(query)
                tk = torch.from_numpy(feeds["key_padding_mask"]) if mask != "none" else None

                def eager() -> Any:
                    with torch.no_grad():
                        return module(tq, tq, tq, key_padding_mask=tk, need_weights=False)[0]

                exported_feeds = dict(zip((i.name for i in exported.inputs), feeds.values()))
                want = eager().numpy()
                for name, fn, out in (
                    ("torch eager", eager, lambda: want),
                    (f"{args.target} graph", lambda: compiled.run(feeds), lambda: compiled.run(feeds)["attn_output"]),
                    ("exporter graph", lambda: exported.run(exported_feeds), lambda: next(iter(exported.run(exported_feeds).values()))),
                ):
                    got = out()
                    error = float(np.abs(got - want).max() / np.abs(want).max())
                    timing = measure(fn, min_seconds=args.min_seconds)
                    flops = self_attention_flops(args.batch, length, spec.embed_dim)
                    rows.append({"backend": name, "mask": mask, "batch": args.batch, "length": length,
                                 **timing.to_json(), "gflops": flops / timing.p50 / 1e9,
                                 "matmul_rate_fraction": flops / timing.p50 / rate, "rel_error_vs_eager": error})
                eager_p50 = next(r["p50_s"] for r in rows[-3:] if r["backend"] == "torch eager")
                for r in rows[-3:]:
                    r["ratio_to_eager"] = r["p50_s"] / eager_p50
                exporter_p50 = rows[-1]["p50_s"]
                for r in rows[-3:]:
                    r["ratio_to_exporter"] = r["p50_s"] / exporter_p50
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(threads), "matmul_rate_gflops": rate / 1e9,
                                               "embed_dim": args.embed_dim, "num_heads": args.num_heads,
                                               "target": args.target, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mask | length | backend | p50 ms | p90 ms | runs | x torch eager | x exporter | GFLOP/s | % matmul rate | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['length']} | {r['backend']} | {r['p50_s'] * 1e3:.2f} | {r['p90_s'] * 1e3:.2f} | "
                     f"{r['runs']} | {r['ratio_to_eager']:.2f} | {r['ratio_to_exporter']:.2f} | {r['gflops']:.1f} | "
                     f"{100 * r['matmul_rate_fraction']:.0f}% | {r['rel_error_vs_eager']:.1e} |")
    return "\n".join(lines)


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {d: metadata.version(d) for d in ("onnxruntime", "torch", "onnx", "numpy")}
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(), **versions}


if __name__ == "__main__":
    sys.exit(main())
