#!/usr/bin/env python
"""The corpus benchmark: compile.py --onnx over what users bring (studies/model_zoo.py: 27 families of
Hugging Face models and torch's own modules, sdpa and eager, from both exporters), in one run:
- cores found and fused on ort-cpu and onnx-attention, and the worst error against the input graph;
- latency on ONNX Runtime CPU of the input graph, our ort-cpu and onnx-attention graphs, onnxscript's
  optimize_for_ort and ONNX Runtime's transformers optimizer, all timed in turns (each round runs every
  session once; idle sessions do not spin) at one batch and sequence length; each graph's ratio to the
  input graph is the median over rounds of the ratio within a round, so the machine's drift cancels;
- each input graph against the floor its MatMuls set at ONNX Runtime's own MatMul rate on this machine.

    python studies/corpus.py [--seq 512] [--batch 1] [--families bert gpt2 ...] [--markdown FILE] [--json FILE]
    python studies/corpus.py --layernorm    # why ort-cpu keeps Add and LayerNormalization apart
    python studies/corpus.py --packing      # why ort-cpu packs projections only for few rows
    python studies/corpus.py --attention-op # com.microsoft.Attention against MultiHeadAttention on ort-cpu


Needs the transformers extra: pip install -e '.[transformers]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import model_zoo
import numpy as np
import onnx
import onnxruntime as ort

from attention_compiler.artifacts.output_folders import check_output_file, write_file_atomically
from attention_compiler.benchmark.timing import Timing, cpu_matmul_rate, cpu_name
from compiler import attention_form, compile_model, get_target
from compiler.fuse_ort_mha import FuseOrtCpuAttentionPass
from compiler.ingest import fusion_findings
from compiler.pack_projections import PackProjectionsPass
from compiler.targets import every_node
from graphs.onnx_files import load_onnx
from runtime.check import check_against_graph
from runtime.graph_inputs import graph_inputs, index_ranges
from runtime.ort import OrtSession
from runtime.signature import input_specs

TARGETS = ("ort-cpu", "onnx-attention")
MODEL_TYPES = {  # the model_type ONNX Runtime's transformers optimizer reads each family as
    **dict.fromkeys(("bert", "roberta", "electra", "albert", "distilbert", "modernbert"), "bert"),
    **dict.fromkeys(("deberta", "torch-encoder", "torch-transformer", "detr"), "bert"),
    **dict.fromkeys(("gpt2", "llama", "qwen2", "mistral", "phi3", "gemma2", "opt"), "gpt2"),
    **dict.fromkeys(("falcon", "bloom"), "gpt2"),
    "gpt-neox": "gpt_neox",
    "clip-text": "clip",
    "t5-encoder": "t5",
    **dict.fromkeys(("bart", "whisper"), "bart"),
    "vit": "vit",
    "swin": "swin",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_model_flags(p)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--seq",
        type=int,
        default=512,
        help="sequence length of the timed inputs (ViT: the image gives ~this)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30, help="at least this many timed rounds")
    p.add_argument(
        "--min-seconds", type=float, default=3.0, help="and at least this long per model"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads; 0: all cores"
    )
    p.add_argument(
        "--cache",
        default=os.path.join(os.path.expanduser("~"), ".cache", "attention-compiler", "zoo"),
        help="exported models are kept here between runs",
    )
    _add_output_flags(p)
    args = p.parse_args(argv)
    for flag in ("markdown", "json"):
        if getattr(args, flag) is not None:
            check_output_file(getattr(args, flag), f"--{flag}")
    return args


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """Which exports of the zoo: families, exporters, implementations, the legacy exporter's opsets."""
    p.add_argument(
        "--families", nargs="+", choices=model_zoo.FAMILIES, default=list(model_zoo.FAMILIES)
    )
    p.add_argument(
        "--exporters", nargs="+", choices=model_zoo.EXPORTERS, default=list(model_zoo.EXPORTERS)
    )
    p.add_argument(
        "--implementations",
        nargs="+",
        choices=model_zoo.IMPLEMENTATIONS,
        default=list(model_zoo.IMPLEMENTATIONS),
        help="transformers' attn_implementation; a family that has neither listed runs its own",
    )
    p.add_argument(
        "--legacy-opsets",
        nargs="+",
        type=int,
        default=[18],
        choices=range(14, 19),
        help="opsets the legacy exporter writes (the dynamo exporter writes 18 and up)",
    )


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument(
        "--json", default=None, help="write every figure, with the machine, to this file"
    )
    p.add_argument(
        "--layernorm",
        action="store_true",
        help="only time a residual LayerNorm three ways: Add + LayerNormalization, Sum + LayerNormalization, "
        "com.microsoft.SkipLayerNormalization",
    )
    p.add_argument(
        "--packing",
        action="store_true",
        help="only time the ort-cpu graphs with their projections packed against unpacked, for the corpus "
        "and over lengths",
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="only the decoders exported with their KV cache: 32 greedy tokens through each graph "
        "against the export's, and one decode step (one token after --seq cached) timed",
    )
    p.add_argument(
        "--attention-op",
        action="store_true",
        help="only time the ort-cpu graphs with com.microsoft.Attention on the projections' input against "
        "MultiHeadAttention on the projected q, k, v, for the corpus and over lengths",
    )


def cpu_session(model: onnx.ModelProto | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "0"
    )  # sessions take turns on the cores
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def optimize_for_ort_file(path: Path, folder: Path) -> Path:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(path))
    optimize_for_ort(model)
    out = folder / "optimize_for_ort.onnx"
    ir.save(model, str(out), external_data="optimize_for_ort.onnx.data")
    return out


def _ort_transformers(path: Path, folder: Path, family: str, size: model_zoo.Size) -> Path:
    from onnxruntime.transformers import optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimizer.optimize_model(
            str(path),
            model_type=MODEL_TYPES[family],
            num_heads=size.heads,
            hidden_size=size.hidden,
            opt_level=0,
        )
    out = folder / "ort_transformers.onnx"
    optimized.save_model_to_file(str(out), use_external_data_format=True)
    return out


def matmul_flops(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float | None:
    """FLOPs of the graph's MatMuls and Gemms at these inputs, from ONNX shape inference with the
    input shapes fixed; None where a MatMul's shapes stay unknown."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # noqa: BLE001 -- shape inference fails on some exports; the floor is then unknown
        return None
    shapes = {
        v.name: [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    shapes.update({t.name: list(t.dims) for t in inferred.graph.initializer})
    total = 0.0
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not a or not b or None in a or None in b:
            return None
        if node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
            n = b[0] if next((x.i for x in node.attribute if x.name == "transB"), 0) else b[1]
            total += 2.0 * m * k * n
        else:
            batch = (
                math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
                if len(a) > 2 or len(b) > 2
                else 1
            )
            total += 2.0 * batch * (a[-2] if len(a) > 1 else 1) * a[-1] * b[-1]
    return total


def time_in_turns(
    sessions: dict[str, ort.InferenceSession],
    feeds: dict[str, np.ndarray],
    rounds: int,
    min_seconds: float,
) -> dict[str, list[float]]:
    """Each round runs every session once, in a rotating order, so that the machine's drifts touch
    them all alike: the times of each session, round by round."""
    names = list(sessions)
    for name in names:
        for _ in range(3):
            sessions[name].run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in names}
    start, r = time.perf_counter(), 0
    while r < rounds or time.perf_counter() - start < min_seconds:
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - t0)
        r += 1
    return times


def timed_inputs(model: onnx.ModelProto, batch: int, seq: int) -> dict[str, np.ndarray]:
    sizes = {"batch": batch, "sequence": seq, "target": seq}
    return graph_inputs(
        input_specs(model), sizes, np.random.default_rng(0), ranges=index_ranges(model)
    )


def run_entry(
    entry: model_zoo.Entry, args: argparse.Namespace, folder: Path, rate: float
) -> dict[str, Any]:
    path = model_zoo.export(entry, args.cache)
    original = load_onnx(path)
    row: dict[str, Any] = {
        "model": entry.name,
        "family": entry.family,
        "implementation": entry.implementation,
        "exporter": entry.exporter,
        "opset": entry.opset,
    }
    # the legacy exporter fixed the shapes of torch's own modules
    fixed_shapes = entry.fixed_shapes
    given = model_zoo.example_inputs(entry) if fixed_shapes else None
    compiled = _compiled_rows(original, given, row)
    sessions = {"input": cpu_session(str(path), args.threads)}
    sessions.update(
        {target: cpu_session(model, args.threads) for target, model in compiled.items()}
    )
    for name, make in (
        ("optimize_for_ort", lambda: optimize_for_ort_file(path, folder)),
        ("ort_transformers", lambda: _ort_transformers(path, folder, entry.family, entry.size)),
    ):
        try:
            sessions[name] = cpu_session(str(make()), args.threads)
        except Exception as exc:  # noqa: BLE001 -- a baseline that fails is a finding, not the end of the run
            row[name] = {"failed": f"{type(exc).__name__}: {_first_line(exc)}"}
    feeds = given if fixed_shapes else timed_inputs(original, args.batch, args.seq)
    row["inputs"] = {name: list(value.shape) for name, value in feeds.items()}
    for name in [n for n in sessions if n != "input"]:
        try:  # a baseline that fails on the inputs is left out of the timing
            sessions[name].run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            row[name] = {"failed": f"{type(exc).__name__} at run: {_first_line(exc)}"}
            del sessions[name]
    times = time_in_turns(sessions, feeds, args.rounds, args.min_seconds)
    base = np.asarray(times["input"])
    for name, series in times.items():
        # the ratio within each round, then its median: drift cancels round by round
        ratio = float(np.median(np.asarray(series) / base))
        row.setdefault(name, {}).update({**Timing.of(series).to_json(), "ratio_to_input": ratio})
    flops = matmul_flops(onnx.load(str(path), load_external_data=False), feeds)
    row["matmul_flops"] = flops
    row["floor_s"] = flops / rate if flops else None
    return row


def _implemented(entry: model_zoo.Entry, args: argparse.Namespace) -> bool:
    """Whether the entry's implementation was asked for, or is the only one its family has."""
    if entry.implementation is None or entry.implementation in args.implementations:
        return True
    own = model_zoo.HF_FAMILIES[entry.family].implementations
    return not set(own) & set(args.implementations)


def _failed_row(entry: model_zoo.Entry, exc: BaseException) -> dict[str, Any]:
    where = "export" if isinstance(exc, model_zoo.ExportError) else "compile, check or timing"
    return {
        "model": entry.name,
        "family": entry.family,
        "implementation": entry.implementation,
        "exporter": entry.exporter,
        "opset": entry.opset,
        "failed": f"{where}: {type(exc).__name__}: {_first_line(exc)}",
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else ""


def _compiled_rows(
    original: onnx.ModelProto, given: dict[str, np.ndarray] | None, row: dict[str, Any]
) -> dict[str, onnx.ModelProto]:
    """Every target's graph, with its cores, how many fused and its worst error in ``row``."""
    compiled = {}
    for target in TARGETS:
        _, form = get_target(target)
        model = compile_model(original, target)
        findings = [
            f for f in fusion_findings(original, model, form, attention_form(model)) if f.attention
        ]
        report = check_against_graph(
            OrtSession(model), OrtSession(original), ranges=index_ranges(original), inputs=given
        )
        row[target] = {
            "cores": len(findings),
            "fused": sum(f.fused for f in findings),
            "worst_rel_error": report.worst_rel_error,
        }
        compiled[target] = model
    return compiled


def _cell(row: dict[str, Any], name: str) -> str:
    entry = row.get(name, {})
    if "failed" in entry:
        return "failed"
    return f"{entry['ratio_to_input']:.2f}x" if "ratio_to_input" in entry else "-"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | exporter | cores | fused ort-cpu / onnx-attention | worst rel. error | input p50 (ms) | x floor | "
        "ort-cpu | onnx-attention | optimize_for_ort | ORT transformers optimizer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "-".join(p for p in (r["family"], r["implementation"]) if p)
        exporter = r["exporter"] + (f", opset {r['opset']}" if r.get("opset", 18) != 18 else "")
        if "failed" in r:
            lines.append(f"| {name} | {exporter} | failed: {r['failed']} |")
            continue
        error = max(r[t]["worst_rel_error"] for t in TARGETS)
        floor = f"{r['input']['p50_s'] / r['floor_s']:.1f}" if r.get("floor_s") else "-"
        lines.append(
            f"| {name} | {exporter} | {r['ort-cpu']['cores']} | {r['ort-cpu']['fused']} / "
            f"{r['onnx-attention']['fused']} | {error:.1e} | {r['input']['p50_s'] * 1e3:.2f} | {floor} | "
            f"{_cell(r, 'ort-cpu')} | {_cell(r, 'onnx-attention')} | {_cell(r, 'optimize_for_ort')} | "
            f"{_cell(r, 'ort_transformers')} |"
        )
    return "\n".join(lines)


def layernorm_table(threads: int, rounds: int, min_seconds: float = 0.5) -> str:
    """A residual LayerNorm at (1, L, E) three ways, in turns: what ONNX Runtime runs for each form."""
    forms = ("Add + LayerNormalization", "Sum + LayerNormalization", "SkipLayerNormalization")
    lines = [
        "| E | L | " + " | ".join(forms) + " | SkipLayerNormalization / Add + LN |",
        "|---|---|---|---|---|---|",
    ]
    for width in (256, 768):
        for length in (128, 512, 2048):
            sessions = {}
            for form in forms:
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                if form.startswith("Add"):  # ORT would fuse the pair into SkipLayerNormalization
                    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                sessions[form] = ort.InferenceSession(
                    _layernorm_model(form, width).SerializeToString(),
                    options,
                    providers=["CPUExecutionProvider"],
                )
            x = np.random.default_rng(0).standard_normal((1, length, width)).astype(np.float32)
            times = time_in_turns(sessions, {"x": x, "r": x}, rounds, min_seconds)
            p50 = {form: float(np.median(t)) for form, t in times.items()}
            lines.append(
                f"| {width} | {length} | "
                + " | ".join(f"{p50[f] * 1e3:.3f} ms" for f in forms)
                + f" | {float(np.median(np.asarray(times[forms[2]]) / np.asarray(times[forms[0]]))):.2f}x |"
            )
    return "\n".join(lines)


def _layernorm_model(form: str, width: int) -> onnx.ModelProto:
    """A residual LayerNorm over (1, L, width): SkipLayerNormalization, or Add or Sum then
    LayerNormalization."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.ones(width, np.float32), "g"),
        numpy_helper.from_array(np.zeros(width, np.float32), "b"),
    ]
    if form == "SkipLayerNormalization":
        nodes = [
            helper.make_node(
                form, ["x", "r", "g", "b"], ["y"], domain="com.microsoft", epsilon=1e-5
            )
        ]
    else:
        nodes = [
            helper.make_node(form.split(" ")[0], ["x", "r"], ["s"]),
            helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-5),
        ]
    io = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "L", width])
        for n in ("x", "r", "y")
    ]
    return helper.make_model(
        helper.make_graph(nodes, "g", io[:2], io[2:], inits),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )


def _compiled_with(model: onnx.ModelProto, options: dict[type, dict[str, Any]]) -> onnx.ModelProto:
    """The ort-cpu graph with some of its passes given other options (the rest as the target has them)."""
    import functools

    import onnx_ir as ir

    from compiler.cleanup import CleanupPass

    _, form = get_target("ort-cpu")
    passes = [
        functools.partial(
            getattr(p, "func", p),
            **{**getattr(p, "keywords", {}), **options[getattr(p, "func", p)]},
        )
        if getattr(p, "func", p) in options
        else p
        for p in form.passes
    ]
    ir_model = ir.serde.deserialize_model(model)
    ir.passes.Sequential(*(make() for make in passes), CleanupPass())(ir_model)
    return ir.serde.serialize_model(ir_model)


def _packing(max_rows: int | None) -> dict[type, dict[str, Any]]:
    """Packing at every size (None) or never (0), with MultiHeadAttention on the projected q, k, v, so
    that the Split is what differs (com.microsoft.Attention takes x whole, packed or not)."""
    return {
        PackProjectionsPass: {"max_rows": max_rows},
        FuseOrtCpuAttentionPass: {"attention_op": False},
    }


def attention_op_table(args: argparse.Namespace, size: model_zoo.Size, threads: int) -> str:
    """The ort-cpu graph as compiled, where self-attention cores whose q, k, v are projections of one
    input run com.microsoft.Attention on it for short inputs, against the same graph with
    MultiHeadAttention on the projected q, k, v there, timed in turns: the corpus models where a core
    takes the Attention op, at their timed inputs, and graphs/mha.py's self-attention over lengths."""
    return _paired_table(
        args,
        size,
        threads,
        ("Attention", "MultiHeadAttention"),
        lambda model: compile_model(model, "ort-cpu"),
        lambda model: _compiled_with(model, {FuseOrtCpuAttentionPass: {"attention_op": False}}),
        lambda compiled: any(n.op_type == "Attention" for n in every_node(compiled.graph)),
        (None, "bool"),
        (16, 128, 256, 383, 384, 512, 1024),
    )


def decode_table(args: argparse.Namespace, size: model_zoo.Size, threads: int) -> str:
    """Each decoder of the zoo exported with its cache (model_zoo.CAUSAL_LMS, sdpa where it has it):
    whether 32 greedy tokens through ort-cpu's and onnx-attention's graphs are the export's, and one
    decode step (one token after ``--seq`` cached, batch ``--batch``) of each, timed in turns."""
    lines = [
        "| model | exporter | same 32 tokens (ort-cpu / onnx-attention) | export step p50 (ms) | "
        "ort-cpu | onnx-attention |",
        "|---|---|---|---|---|---|",
    ]
    for family in [f for f in args.families if f in model_zoo.CAUSAL_LMS]:
        own = model_zoo.HF_FAMILIES[family].implementations
        entry = model_zoo.Entry(
            family, "sdpa" if "sdpa" in own else own[0], "dynamo", size, past=True
        )
        for exporter in args.exporters:
            entry = dataclasses.replace(entry, exporter=exporter)
            try:
                lines.append(_decode_row(entry, args, threads))
            except Exception as exc:  # noqa: BLE001 -- an export that fails is a row of the table
                lines.append(f"| {entry.family} | {exporter} | failed: {_first_line(exc)} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def _decode_row(entry: model_zoo.Entry, args: argparse.Namespace, threads: int) -> str:
    original = load_onnx(model_zoo.export(entry, args.cache))
    sessions = {"input": cpu_session(original, threads)}
    sessions.update({t: cpu_session(compile_model(original, t), threads) for t in TARGETS})
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 1000, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0  # left padding
    tokens = {
        name: model_zoo.greedy_tokens(functools.partial(s.run, None), entry, prompt, mask)
        for name, s in sessions.items()
    }
    same = " / ".join(
        "yes" if np.array_equal(tokens[t], tokens["input"]) else "no" for t in TARGETS
    )
    feeds = _decode_step_feeds(entry, args.batch, args.seq)
    times = time_in_turns(sessions, feeds, args.rounds, args.min_seconds)
    base = np.asarray(times["input"])
    ratios = [f"{float(np.median(np.asarray(times[t]) / base)):.2f}x" for t in TARGETS]
    name = f"{entry.family}-{entry.implementation}"
    return (
        f"| {name} | {entry.exporter} | {same} | {float(np.median(base)) * 1e3:.2f} | "
        + " | ".join(ratios)
        + " |"
    )


def _decode_step_feeds(entry: model_zoo.Entry, batch: int, cached: int) -> dict[str, np.ndarray]:
    """One new token per sequence after ``cached`` random cache entries."""
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": rng.integers(1, 1000, (batch, 1)).astype(np.int64),
        "attention_mask": np.ones((batch, cached + 1), np.int64),
    }
    for name, (heads, size) in model_zoo.cache_heads(entry).items():
        feeds[name] = rng.standard_normal((batch, heads, cached, size)).astype(np.float32)
    return feeds


def _rows(first: np.ndarray) -> int:
    """Batch x tokens of a model's first input: token ids (N, L), embeddings (N, L, E) or (L, N, E), or
    an image (N, 3, H, W) in patches of 16 plus the class token."""
    if first.ndim == 4:
        return first.shape[0] * ((first.shape[2] // 16) * (first.shape[3] // 16) + 1)
    return first.shape[0] * first.shape[1]


def packing_table(args: argparse.Namespace, size: model_zoo.Size, threads: int) -> str:
    """The ort-cpu graph with Q/K/V (and any other projections of one tensor) packed into one MatMul
    and a Split, against the same graph unpacked, timed in turns: for every model of the corpus at
    its timed inputs, and for graphs/mha.py's self-attention (E=512, 8 heads) over lengths."""
    return _paired_table(
        args,
        size,
        threads,
        ("packed", "unpacked"),
        lambda model: _compiled_with(model, _packing(None)),
        lambda model: _compiled_with(model, _packing(0)),
        lambda compiled: True,
        (None,),
        (1, 16, 64, 256, 1024),
    )


def _paired_table(
    args: argparse.Namespace,
    size: model_zoo.Size,
    threads: int,
    names: tuple[str, str],
    ours,
    theirs,
    keep,
    masks: tuple,
    lengths: tuple[int, ...],
) -> str:
    """One graph form (``ours(model)``) against another (``theirs(model)``), timed in turns: the corpus
    models whose compiled graph ``keep`` accepts, at their timed inputs, then graphs/mha.py's
    self-attention block (E=512, 8 heads) with each of ``masks`` at batch 1 and each of ``lengths``."""
    a, b = names
    lines = [
        f"| graph | mask | rows (batch x tokens) | {a} p50 (ms) | {b} / {a} | {a} / input |",
        "|---|---|---|---|---|---|",
    ]

    row = functools.partial(_paired_row, args, names, lines)
    for entry in model_zoo.entries(size, tuple(args.families)):
        if entry.exporter not in args.exporters:
            continue
        path = model_zoo.export(entry, args.cache)
        original = load_onnx(path)
        compiled = ours(original)
        if not keep(compiled):
            continue
        fixed_shapes = entry.fixed_shapes
        given = model_zoo.example_inputs(entry) if fixed_shapes else None
        feeds = given or timed_inputs(original, args.batch, args.seq)
        sessions = {
            "input": cpu_session(str(path), threads),
            a: cpu_session(compiled, threads),
            b: cpu_session(theirs(original), threads),
        }
        row(entry.name, "the model's", _rows(next(iter(feeds.values()))), sessions, feeds)
    _block_pairs(row, names, threads, ours, theirs, masks, lengths)
    return "\n".join(lines)


def _block_pairs(row, names, threads, ours, theirs, masks, lengths) -> None:
    """graphs/mha.py's self-attention block (E=512, 8 heads), each mask at batch 1 and each length."""
    from graphs import AttentionSpec, AttentionWeights, build_mha
    from runtime.check import random_inputs

    a, b = names
    for mask in masks:
        spec = AttentionSpec(512, 8, batch_first=True, self_attention=True, key_padding_mask=mask)
        model = build_mha(spec, AttentionWeights.random(spec))
        sessions = {a: cpu_session(ours(model), threads), b: cpu_session(theirs(model), threads)}
        for length in lengths:
            row(
                "graphs/mha.py self-attention, E=512",
                "padding" if mask else "none",
                length,
                sessions,
                random_inputs(spec, (1, length, length), np.random.default_rng(0)),
            )


def _paired_row(
    args: argparse.Namespace,
    names: tuple[str, str],
    lines: list[str],
    name: str,
    mask: str,
    rows: int,
    sessions: dict[str, ort.InferenceSession],
    feeds: dict[str, np.ndarray],
) -> None:
    """One row of _paired_table, timed in turns, added to ``lines`` and printed."""
    a, b = names
    times = {
        k: np.asarray(v)
        for k, v in time_in_turns(sessions, feeds, args.rounds, args.min_seconds).items()
    }
    vs_input = f"{float(np.median(times[a] / times['input'])):.2f}x" if "input" in times else "-"
    lines.append(
        f"| {name} | {mask} | {rows} | {float(np.median(times[a])) * 1e3:.2f} | "
        f"{float(np.median(times[b] / times[a])):.2f}x | {vs_input} |"
    )
    print(lines[-1], flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    if args.layernorm:
        print(
            f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads; ONNX Runtime {ort.__version__}"
        )
        print(layernorm_table(threads, max(args.rounds, 100)))
        return 0
    size = model_zoo.Size(
        args.hidden, args.heads, args.layers, image=16 * max(1, round(math.sqrt(args.seq)))
    )
    if args.packing or args.attention_op or args.decode:
        print(
            f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads; ONNX Runtime {ort.__version__}"
        )
        table_of = (
            packing_table if args.packing else decode_table if args.decode else attention_op_table
        )
        print(table_of(args, size, threads))
        return 0
    rate = cpu_matmul_rate(threads=threads, min_seconds=min(1.0, max(0.1, args.min_seconds / 3)))
    print(
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads; ONNX Runtime {ort.__version__} MatMul "
        f"{rate / 1e9:.1f} GFLOP/s; batch {args.batch}, sequence {args.seq}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in model_zoo.entries(size, tuple(args.families), tuple(args.legacy_opsets)):
            if entry.exporter not in args.exporters or not _implemented(entry, args):
                continue
            folder = Path(tmp) / entry.name
            folder.mkdir()
            try:
                rows.append(run_entry(entry, args, folder, rate))
            except Exception as exc:  # noqa: BLE001 -- an export or compile that fails is a row of the table
                rows.append(_failed_row(entry, exc))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.markdown:
        write_file_atomically(Path(args.markdown), (text + "\n").encode())
    if args.json:
        report = {"machine": _machine(threads, rate), "settings": _settings(args), "rows": rows}
        write_file_atomically(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
    return 0


def _machine(threads: int, rate: float) -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "onnxruntime": ort.__version__,
        "matmul_fp32_flops": rate,
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    names = ("hidden", "heads", "layers", "seq", "batch", "rounds", "min_seconds")
    return {k: getattr(args, k) for k in names}


if __name__ == "__main__":
    sys.exit(main())
