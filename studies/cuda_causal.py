#!/usr/bin/env python
"""ONNX Runtime's CUDA MultiHeadAttention on causal self-attention, the core alone (E=512, 8 heads,
batch 1, float32): unmasked (its flash path), the ``unidirectional`` flag (what --target ort-cuda
writes for a causal mask alone), and the causal mask as ``attention_bias`` (what any other mask
takes there). Outputs are compared between the two causal forms; times are p50 over rounds in
which each form runs once, inputs and outputs bound on the GPU.

    python studies/cuda_causal.py --write DIR      # the three graphs (needs onnx)
    python studies/cuda_causal.py --time DIR       # on the GPU (onnxruntime-gpu, torch with CUDA)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

E, HEADS = 512, 8
FORMS = {"flash, no mask": "flash", "unidirectional": "unidirectional", "causal bias": "bias"}


def write(folder: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    os.makedirs(folder, exist_ok=True)
    for form in FORMS.values():
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "L", E]) for n in "qkv"]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "L", E])
        attrs = {"num_heads": HEADS, "scale": (E // HEADS) ** -0.5}
        nodes, inputs = [], ["q", "k", "v"]
        if form == "unidirectional":
            attrs["unidirectional"] = 1
        if form == "bias":
            nodes, bias = _causal_bias(helper, TensorProto)
            inputs += ["", "", bias]
        nodes.append(
            helper.make_node("MultiHeadAttention", inputs, ["y"], domain="com.microsoft", **attrs)
        )
        model = helper.make_model(
            helper.make_graph(nodes, form, io, [out]),
            opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
        )
        model.ir_version = 10  # what ONNX Runtime 1.31 reads
        onnx.save(model, os.path.join(folder, f"{form}.onnx"))


def _causal_bias(helper, T):
    """(1, 1, L, L): -inf where the key comes after the query, built from the query's length."""
    const = lambda name, kind, dims, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, kind, dims, values)
    )
    nodes = [
        helper.make_node("Shape", ["q"], ["len"], start=1, end=2),
        helper.make_node("Squeeze", ["len"], ["n"]),
        const("zero", T.INT64, [], [0]),
        const("one", T.INT64, [], [1]),
        helper.make_node("Range", ["zero", "n", "one"], ["pos"]),
        const("rows_axes", T.INT64, [3], [0, 1, 3]),
        const("cols_axes", T.INT64, [3], [0, 1, 2]),
        helper.make_node("Unsqueeze", ["pos", "rows_axes"], ["rows"]),
        helper.make_node("Unsqueeze", ["pos", "cols_axes"], ["cols"]),
        helper.make_node("Greater", ["cols", "rows"], ["future"]),
        const("ninf", T.FLOAT, [], [float("-inf")]),
        const("zerof", T.FLOAT, [], [0.0]),
        helper.make_node("Where", ["future", "ninf", "zerof"], ["bias"]),
    ]
    return nodes, "bias"


def time_forms(folder: str, lengths: list[int], rounds: int) -> None:
    import onnxruntime as ort
    import torch

    ort.preload_dlls()
    sessions = {
        name: ort.InferenceSession(
            os.path.join(folder, f"{form}.onnx"), providers=["CUDAExecutionProvider"]
        )
        for name, form in FORMS.items()
    }
    print(f"onnxruntime {ort.__version__} on {torch.cuda.get_device_name(0)}")
    for length in lengths:
        rng = np.random.default_rng(0)
        x = {n: rng.standard_normal((1, length, E), dtype=np.float32) for n in "qkv"}
        device = {n: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for n, v in x.items()}
        bindings = {}
        for name, session in sessions.items():
            bindings[name] = session.io_binding()
            for n, v in device.items():
                bindings[name].bind_ortvalue_input(n, v)
            bindings[name].bind_output("y", "cuda")
            for _ in range(3):
                session.run_with_iobinding(bindings[name])
        outs = {name: b.copy_outputs_to_cpu()[0] for name, b in bindings.items()}
        uni, bias = outs["unidirectional"], outs["causal bias"]
        error = float(np.abs(uni - bias).max() / np.abs(bias).max())
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, session in sessions.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                session.run_with_iobinding(bindings[name])
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        base = np.median(times["flash, no mask"])
        cells = " | ".join(
            f"{np.median(t) * 1e3:.3f} ms ({np.median(t) / base:.2f}x)" for t in times.values()
        )
        print(f"| {length} | {cells} | {error:.1e} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--write", metavar="DIR", help="write the three graphs here")
    p.add_argument("--time", metavar="DIR", help="time the graphs in DIR on the GPU")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)
    if args.write:
        write(args.write)
    if args.time:
        time_forms(args.time, args.lengths, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
