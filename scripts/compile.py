#!/usr/bin/env python
"""Compile a torch.nn.MultiheadAttention into an ONNX graph for a deployment target (docs/ARCHITECTURE.md contract 3),
or, with --onnx, run a target's pipeline over an existing graph (torch.onnx.export's, say)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import signal
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx
from config import ConfigError, namespace_from_config
from console import Console, emit
from signals import Signals, Stopped, stop_as_exception
from spec_flags import (
    add_block_flags,
    add_spec_flags,
    block_spec_from_args,
    check_block_flags,
    given_spec_flags,
    spec_from_args,
)

from artifacts.files import (
    EXTERNAL_DATA,
    file_records,
    needs_external_data,
    save_model,
    write_file,
    write_manifest,
)
from artifacts.output_folders import (
    WRITTEN_BY,
    ArtifactError,
    Output,
    OutputRefused,
    check_apart,
    check_path_text,
    claim,
    show,
    staged,
)
from artifacts.report import graph_summary, input_shapes, render_report
from artifacts.resources import MemoryBoundError
from compiler import PRECISIONS, TARGETS, TargetError, attention_form, compile_model, get_target
from graphs import AttentionWeights, SpecError, WeightsError, build_mha
from graphs.builder import declare_maxima
from graphs.onnx_files import IngestError
from graphs.weight_files import first_line
from graphs.weights import check_precision_range
from runtime import InputError
from runtime.profiles import ProfileError
from runtime.session import BackendUnavailable
from runtime.signature import input_specs
from runtime.trt_engine import EngineBuildError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage plus a line
        self.exit(2, f"compile.py: error: {message} (see --help)\n")


def _shape(text: str) -> tuple[int, int, int] | dict[str, int]:
    """BATCH,TGT,SRC, or (for --onnx graphs) AXIS=SIZE,... naming the graph's symbolic axes."""
    try:
        if "=" in text:
            sizes = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in text.split(","))}
            if sizes and min(sizes.values()) >= 1 and all(sizes):
                return sizes
        else:
            shape = tuple(int(v) for v in text.split(","))
            if len(shape) == 3 and min(shape) >= 1:
                return shape  # type: ignore[return-value]
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"expected three positive integers BATCH,TGT,SRC such as 1,128,128 (or AXIS=SIZE,... "
        f"for --onnx), got {text!r}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = add_spec_flags(p, embed_dim_help="required unless --onnx")
    block_group = add_block_flags(p)
    p.add_argument(
        "--onnx",
        default=None,
        metavar="FILE",
        help="compile this ONNX graph instead of building one from the options above",
    )
    p.add_argument(
        "--inputs",
        default=None,
        metavar="FILE.npz",
        help="with --onnx: real inputs for --check and --latency, one array per graph input (default: "
        "random ones that fit: token ids inside the embedding table, masks with some padding)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--target", choices=TARGETS, default="portable")
    out.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp16: half-precision weights and compute, float32 inputs, outputs and softmax",
    )
    out.add_argument(
        "--form",
        default=None,
        help="the target's graph form where it offers several: tensorrt takes matmul-softmax (the default, "
        "TensorRT 8.6+) or attention-op (the standard Attention op, TensorRT 10.14+)",
    )
    out.add_argument(
        "--check",
        action="store_true",
        help="compare with torch and the float64 reference; store the figures",
    )
    out.add_argument(
        "--out", default=None, help="output folder: model.onnx and manifest.json (required)"
    )
    out.add_argument(
        "--force",
        action="store_true",
        help="replace an existing, non-empty --out (and --triton-repo) folder",
    )
    out.add_argument(
        "--triton-repo",
        default=None,
        metavar="DIR",
        help="also write a Triton Inference Server model repository: DIR/NAME/config.pbtxt, DIR/NAME/1/model.onnx",
    )
    out.add_argument(
        "--triton-model-name", default="attention", help="NAME of the model in --triton-repo"
    )
    out.add_argument(
        "--triton-max-batch",
        type=int,
        default=8,
        help="max_batch_size with dynamic batching where every input and output leads with batch; 0: off",
    )
    bounds = p.add_argument_group("maximum shape and memory (every target)")
    # None marks "not given" (it conflicts with the shape flags); "%(default).0s" prints nothing but keeps the
    # help formatter from adding "(default: None)" after the real default.
    bounds.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="the largest batch the graph will see; tensorrt: the profile's batch runs 1 to this, opt "
        "half of it (default: 8 for tensorrt, else unbounded)%(default).0s",
    )
    bounds.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="the longest sequence the graph will see; tensorrt: the profile's sequence axes run 1 to "
        "this, opt half of it (default: 512 for tensorrt, else unbounded)%(default).0s",
    )
    bounds.add_argument(
        "--memory-limit",
        type=_size,
        default=None,
        metavar="SIZE",
        help="refuse to compile when one call at the maximum shape would need more than this "
        "(16GiB, 512MB...; default: this machine's memory)%(default).0s",
    )
    trt = p.add_argument_group(
        "TensorRT engine (--target tensorrt; needs the tensorrt package and a GPU)"
    )
    for kind in ("min", "opt", "max"):
        trt.add_argument(
            f"--{kind}-shapes",
            default=None,
            metavar="NAME:DxD...,...",
            help=f"profile {kind} shape of every dynamic input, spelled as trtexec's --{kind}Shapes"
            "%(default).0s",
        )
    trt.add_argument(
        "--engine-cache",
        default=None,
        metavar="DIR",
        help="built engines and the timing cache (default: $ATTENTION_COMPILER_CACHE or "
        "~/.cache/attention-compiler/tensorrt)%(default).0s",
    )
    trt.add_argument(
        "--allow-no-engine",
        action="store_true",
        help="exit 0 when TensorRT or a GPU is missing and only model.onnx could be written",
    )
    out.add_argument(
        "--external-data",
        choices=("auto", "always"),
        default="auto",
        help="weights in DIR/model.onnx.data beside model.onnx: auto, once they pass protobuf's 2 GB limit",
    )
    out.add_argument(
        "--report",
        action="store_true",
        help="also write DIR/report.html: spec, graph before and after the passes, check and latency figures",
    )
    out.add_argument(
        "--latency",
        action="store_true",
        help="time the graph before and after the passes on ONNX Runtime CPU; figures go in the manifest",
    )
    out.add_argument(
        "--latency-shape",
        type=_shape,
        default=(1, 128, 128),
        metavar="BATCH,TGT,SRC",
        help="input sizes for --latency (SRC is ignored where keys are the query); for --onnx also AXIS=SIZE,... "
        "naming every symbolic axis",
    )
    out.add_argument("--quiet", action="store_true", help="print nothing but errors")
    out.add_argument(
        "--json",
        action="store_true",
        help="print a JSON summary (the manifest, the paths) on stdout; other lines go to stderr",
    )
    out.add_argument(
        "--verbose",
        action="store_true",
        help="with an error, also print its traceback (the detail behind the one-line message)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="JSON or YAML file of these options (embed_dim: 512, block: encoder, ...); flags override it",
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    namespace = argparse.Namespace()
    if known.config:
        try:
            namespace = namespace_from_config(p, known.config)
        except ConfigError as exc:
            p.exit(2, f"compile.py: error: {exc}\n")
    args = p.parse_args(argv, namespace=namespace)
    if args.out is None:
        p.error("the following arguments are required: --out (on the command line or in --config)")
    engine_flags = [
        f"--{k.replace('_', '-')}" for k in ENGINE_FLAGS if getattr(args, k) not in (None, False)
    ]
    if engine_flags and args.target != "tensorrt":
        p.error(
            f"{', '.join(engine_flags)} shape{'s' if len(engine_flags) == 1 else ''} the TensorRT engine; "
            "it applies to --target tensorrt only"
        )
    if (args.min_shapes, args.opt_shapes, args.max_shapes).count(None) not in (0, 3):
        p.error(
            "--min-shapes, --opt-shapes and --max-shapes go together: give all three, or none and --max-batch/--max-len"
        )
    if args.min_shapes is not None and (args.max_batch is not None or args.max_len is not None):
        p.error(
            "--max-batch/--max-len and --min/--opt/--max-shapes both set the profile; give one or the other"
        )
    for flag in ("max_batch", "max_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.memory_limit is not None and (args.onnx is not None or not _bounded(args)):
        p.error(
            "--memory-limit bounds a graph built from a spec at its maximum shape: give --max-batch and/or --max-len"
            + (" (not --onnx)" if args.onnx is not None else "")
        )
    if args.triton_max_batch < 0 or not re.fullmatch(r"[A-Za-z0-9_.-]+", args.triton_model_name):
        p.error(
            "--triton-max-batch must be at least 0 and --triton-model-name letters, digits, '_', '-' or '.'"
        )
    spec_flags = given_spec_flags(args, [*groups, block_group])
    if args.inputs is not None and args.onnx is None:
        p.error(
            "--inputs gives real inputs to an --onnx graph; a graph built from a spec is checked on its own inputs"
        )
    if args.onnx is not None and spec_flags:
        p.error(f"--onnx compiles the graph as it is; drop {', '.join(spec_flags)}")
    if args.onnx is None and (args.embed_dim is None or args.num_heads is None):
        p.error(
            "the following arguments are required: --embed-dim, --num-heads (or give --onnx FILE)"
        )
    if args.onnx is None and (problem := check_block_flags(args, block_group, groups)):
        p.error(problem)
    return args


def _size(text: str) -> int:
    from artifacts.resources import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded(args: argparse.Namespace) -> bool:
    """Whether the graph has a declared maximum shape: given, or the TensorRT profile's defaults."""
    return (
        args.max_batch is not None
        or args.max_len is not None
        or (args.target == "tensorrt" and args.min_shapes is None)
    )


def max_shape(args: argparse.Namespace) -> Any:
    from artifacts.resources import Shape

    batch = 8 if args.max_batch is None else args.max_batch
    length = 512 if args.max_len is None else args.max_len
    return Shape(batch, length, length)


def memory_bound(args: argparse.Namespace, spec: Any, parameters: int) -> dict[str, Any] | None:
    """MemoryBoundError, before anything is allocated, when the work (building, checking, timing)
    would not fit this machine's memory, or one call at the declared maximum shape would pass
    --memory-limit; the estimate at that shape, for the manifest."""
    from artifacts.resources import (
        Shape,
        attention_parts,
        block_parts,
        check_memory,
        check_work,
        machine_memory,
        work_parts,
    )

    parts_of = attention_parts if args.block == "mha" else block_parts
    latency = (
        parts_of(spec, Shape(*_spec_shape(args.latency_shape)), args.precision, "portable")
        if args.latency
        else None
    )
    if (memory := machine_memory()) is not None:
        check_work(work_parts(parameters, latency), memory, "this machine's memory")
    if not _bounded(args):
        return None
    shape = max_shape(args)
    limit, source = args.memory_limit, "--memory-limit"
    if limit is None:
        limit, source = memory, "this machine's memory; set --memory-limit"
    parts = parts_of(spec, shape, args.precision, args.target)
    record = {
        "max_shape": vars(shape),
        "limit_bytes": limit,
        "limit_source": source,
        "parts": parts,
        "estimate_bytes": sum(parts.values()),
    }
    if limit is not None:
        check_memory(parts, shape, limit, source)
    return record


ENGINE_FLAGS = ("min_shapes", "opt_shapes", "max_shapes", "engine_cache", "allow_no_engine")


class NoEngine(RuntimeError):
    """--target tensorrt wrote the ONNX but could not build model.engine here."""


class CheckFailed(RuntimeError):
    """--check measured an error above tolerance."""


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in (
        "attention-compiler",
        "numpy",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxruntime",
        "torch",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Bare attention or a block, built from the spec flags; --check compares with torch and NumPy."""
    if args.onnx is not None:
        return run_onnx(args, console)
    from runtime.check import block_inputs, check_block_session, check_session, random_inputs

    if args.block == "mha":
        spec, weights_type, build, check_fn, inputs = (
            spec_from_args(args),
            AttentionWeights,
            build_mha,
            check_session,
            random_inputs,
        )
    else:
        from graphs.blocks import BlockWeights, build_block

        spec, weights_type, build, check_fn, inputs = (
            block_spec_from_args(args),
            BlockWeights,
            build_block,
            check_block_session,
            block_inputs,
        )
    get_target(args.target, args.precision, args.form)
    memory = memory_bound(args, spec, parameters(spec))
    with console.step("building the graph"):
        weights = (
            weights_type.from_file(spec, args.weights)
            if args.weights
            else weights_type.random(spec, args.seed)
        )
        check_precision_range(weights.tensors, args.precision)
        built = build(spec, weights)
        declare_maxima(
            built, args.max_batch, args.max_len
        )  # the passes need no forms for longer inputs
    with console.step(f"running the {args.target} passes"):
        model = compile_model(built, args.target, args.precision, args.form)
    described = {
        "spec": spec.to_dict(),
        "inputs": [s.to_json() for s in spec.inputs()],
        "outputs": [s.to_json() for s in spec.outputs()],
    }
    return _emit(
        args,
        console,
        built,
        model,
        described,
        {"weights": dict(weights.source), "memory": memory},
        checker=lambda session: check_fn(session, spec, weights, tolerance=_tolerance(args)),
        feeds=lambda session: inputs(
            spec, _spec_shape(args.latency_shape), np.random.default_rng(0)
        ),
    )


def run_onnx(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """The target's pipeline over an existing graph; --check compares it with that graph on ONNX Runtime CPU."""
    from compiler.float16 import weight_beyond_float16
    from compiler.ingest import fusion_findings
    from graphs.onnx_files import load_onnx
    from runtime.check import check_against_graph
    from runtime.graph_inputs import graph_inputs, index_ranges, read_inputs

    _, form = get_target(args.target, args.precision, args.form)
    with console.step("reading the graph"):
        original = load_onnx(args.onnx)
    if args.precision == "fp16" and (beyond := weight_beyond_float16(original)) is not None:
        raise IngestError(
            f"initializer {beyond[0]!r} of {args.onnx!r} holds values up to {beyond[1]:.4g}, beyond "
            "float16's range (±65504): with --precision fp16 its outputs would be inf; use --precision fp32"
        )
    with console.step(f"running the {args.target} passes"):
        model = compile_model(original, args.target, args.precision, form.name)
    findings = fusion_findings(original, model, form, attention_form(model))
    for finding in findings:
        console.say(str(finding))
    if not any(f.attention for f in findings):
        if args.precision != "fp32":
            raise IngestError(
                f"{args.onnx!r} holds no attention, so the passes leave it as it is; --precision "
                f"{args.precision} converts attention graphs only, give fp32 to copy it unchanged"
            )
        console.say(
            f"no attention in the graph ({'no Softmax' if not findings else 'no Softmax is an attention core'}): "
            "model.onnx is the input graph, unchanged"
        )
        model = original

    ranges = index_ranges(original)
    given = None if args.inputs is None else read_inputs(args.inputs, input_specs(original))

    def checker(session: Any) -> Any:
        return check_against_graph(
            session,
            input_session(original, args.onnx),
            tolerance=_tolerance(args),
            ranges=ranges,
            inputs=given,
        )

    def feeds(session: Any) -> dict[str, np.ndarray]:
        if given is not None:
            return given
        return graph_inputs(
            session.inputs,
            onnx_axis_sizes(session.inputs, args.latency_shape),
            np.random.default_rng(0),
            ranges=ranges,
        )

    described = {
        "source": {
            "onnx": str(args.onnx),
            "sha256": hashlib.sha256(Path(args.onnx).read_bytes()).hexdigest(),
        },
        "inputs": graph_signature(model.graph.input, model.graph.initializer),
        "outputs": graph_signature(model.graph.output),
    }
    fusion = {
        "fusion": [
            {"softmax": f.softmax, "layer": f.layer, "fused": f.fused, "detail": f.detail}
            for f in findings
        ]
    }
    return _emit(args, console, original, model, described, fusion, checker=checker, feeds=feeds)


def parameters(spec: Any) -> int:
    """How many weights the spec's module holds."""
    import math

    from graphs.blocks import BlockSpec, block_shapes
    from graphs.weights import expected_shapes

    shapes = block_shapes(spec) if isinstance(spec, BlockSpec) else expected_shapes(spec)
    return sum(math.prod(shape) for shape in shapes.values())


def _spec_shape(shape: tuple[int, int, int] | dict[str, int]) -> tuple[int, int, int]:
    if isinstance(shape, dict):
        raise SpecError(
            "--latency-shape AXIS=SIZE names the axes of an --onnx graph; give BATCH,TGT,SRC for a spec"
        )
    return shape


def onnx_axis_sizes(
    inputs: list[Any], shape: tuple[int, int, int] | dict[str, int]
) -> dict[str, int]:
    """Sizes for an ingested graph's symbolic axes. From BATCH,TGT,SRC: the axes named like batch take
    BATCH, or where none is, the axes first in some input; every other axis TGT. AXIS=SIZE names them all."""
    axes = list(dict.fromkeys(d for s in inputs for d in s.shape if isinstance(d, str)))
    if isinstance(shape, dict):
        if sorted(shape) != sorted(axes):
            raise SpecError(
                f"--latency-shape names axes {', '.join(sorted(shape))}; the graph's symbolic axes are "
                f"{', '.join(axes)}"
            )
        return dict(shape)
    batch = {d for d in axes if "batch" in d.lower()} or {
        s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)
    }
    return {d: shape[0] if d in batch else shape[1] for d in axes}


def _tolerance(args: argparse.Namespace) -> float:
    from runtime.check import FP16_TOLERANCE, FP32_TOLERANCE

    return FP32_TOLERANCE if args.precision == "fp32" else FP16_TOLERANCE


def _emit(
    args: argparse.Namespace,
    console: Console,
    before: onnx.ModelProto,
    model: onnx.ModelProto,
    described: dict[str, Any],
    extra: dict[str, Any],
    *,
    checker: Callable[[Any], Any],
    feeds: Callable[[Any], dict[str, np.ndarray]],
) -> dict[str, Any]:
    """DIR/model.onnx (and model.onnx.data), manifest.json (docs/ARCHITECTURE.md contract 3) and report.html, all
    staged beside DIR: the ONNX is validated, loaded, checked and timed as written, and DIR appears only whole."""
    target, form = get_target(args.target, args.precision, args.form)
    external = args.external_data == "always" or needs_external_data(model)
    if args.onnx is None:  # an ingested graph's axes have names of its own
        declare_maxima(model, args.max_batch, args.max_len)
    manifest = {
        "written_by": WRITTEN_BY,
        **described,
        "target": target.name,
        "form": form.name,
        "target_form": form.note,
        "attention_form": attention_form(model),
        **extra,
        "precision": args.precision,
        "opset": opset(model),
        "tools": tool_versions(),
        "options": {
            k: v
            for k, v in sorted(vars(args).items())
            if k not in ("verbose", "force", "config", "quiet", "json", "outputs")
        },
        "config": {
            "path": args.config,
            "sha256": hashlib.sha256(Path(args.config).read_bytes()).hexdigest(),
        }
        if args.config
        else None,
        "graph": graph_summary(before, model),
    }
    profile = no_engine = None
    if target.name == "tensorrt":
        profile, no_engine = engine_plan(args, model)
        manifest["engine"] = {
            "built": False,
            "reason": no_engine,
            "precision": args.precision,
            "profile": profile.to_json(),
            "trtexec": profile.trtexec(),
        }
    triton_text = None
    if args.triton_repo is not None:
        from artifacts.triton import triton_config

        max_batch = (
            args.triton_max_batch
            if profile is None
            else min(args.triton_max_batch, _profile_batch(profile))
        )
        triton_text, manifest["triton"] = triton_config(
            model,
            args.triton_model_name,
            max_batch,
            "onnxruntime_onnx" if profile is None else "tensorrt_plan",
        )
        manifest["triton"]["repo"] = str(args.triton_repo)
    outputs = args.outputs
    with staged(*outputs) as stagings:
        staging = stagings[0]
        path = staging / "model.onnx"
        with console.step(
            "writing model.onnx" + (f" with its weights in {EXTERNAL_DATA}" if external else "")
        ):
            names = save_model(model, staging, external=external)
        with console.step("validating the ONNX (onnx.checker, full check)"):
            onnx.checker.check_model(str(path), full_check=True)
        with console.step("loading it in ONNX Runtime"):
            session = loaded_session(path, before if args.onnx is not None else None, args.onnx)
        manifest["files"] = file_records(staging, names)
        manifest["check"] = None
        if args.check:
            with console.step("checking against the references"):
                report = checker(session)
            console.say(report.table())
            if not report.passed:
                raise CheckFailed(
                    f"check failed: worst relative error {report.worst_rel_error:.3e} exceeds "
                    f"{report.tolerance:.0e}; nothing was written"
                )
            manifest["check"] = report.to_json()
        if profile is not None and no_engine is None:
            names.append("model.engine")
            manifest["engine"] = build_engine_file(
                args, console, staging, manifest, profile, input_specs(model), checker
            )
        manifest["latency"] = None
        if args.latency:
            with console.step("measuring latency before and after the passes"):
                manifest["latency"] = measure_latency(before, session, feeds, args.onnx)
            t = manifest["latency"]
            console.say(
                f"latency p50 with {input_shapes(t['inputs'])}: {t['before']['p50_s'] * 1e3:.3f} ms before the passes, "
                f"{t['after']['p50_s'] * 1e3:.3f} ms after ({t['ratio_p50']:.2f}x), {t['where']}"
            )
        if args.report:
            page = render_report(manifest, before, onnx.load(str(path), load_external_data=False))
            write_file(staging / "report.html", page.encode())
            manifest["files"].update(file_records(staging, ["report.html"]))
        write_manifest(staging, manifest)
        if triton_text is not None:
            write_triton_model(stagings[1], triton_text, staging, names, engine=profile is not None)
    out = Path(args.out).absolute()
    size = sum(r["bytes"] for name, r in manifest["files"].items() if name.startswith("model.onnx"))
    console.say(
        f"wrote {out / 'model.onnx'} ({size / 2**20:.2f} MiB{', weights in ' + EXTERNAL_DATA if external else ''}, "
        f"{len(model.graph.node)} nodes, target {target.name}, {args.precision})"
    )
    console.say(f"wrote {out / 'manifest.json'}")
    if args.report:
        console.say(f"wrote {out / 'report.html'}")
    if "model.engine" in names:
        console.say(
            f"wrote {out / 'model.engine'} (TensorRT {manifest['engine']['tensorrt']}, {manifest['engine']['gpu']}"
            f"{', from the engine cache' if manifest['engine']['from_cache'] else ''})"
        )
    if triton_text is not None:
        console.say(
            f"wrote {Path(args.triton_repo) / args.triton_model_name} "
            f"(Triton: {manifest['triton']['note'] or 'dynamic batching'})"
        )
    if no_engine is not None:
        message = f"no model.engine: {no_engine}; wrote the ONNX and its manifest only"
        if not args.allow_no_engine:
            raise NoEngine(f"{message} (pass --allow-no-engine to accept that)")
        console.say(message)
    return manifest


class UnloadableModel(RuntimeError):
    """The graph compile.py wrote does not load in ONNX Runtime (a fault of ours: exit 3)."""


def _ort_problem(exc: BaseException) -> str:
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))[:300]


def input_session(original: onnx.ModelProto, source: str) -> Any:
    """The input graph of --onnx in ONNX Runtime, for the check and the latency; IngestError (the
    input's fault, exit 2) where ONNX Runtime refuses it."""
    from runtime.ort import OrtSession

    try:
        return OrtSession(original)
    except (
        Exception
    ) as exc:  # onnxruntime raises Fail, InvalidGraph, InvalidArgument, RuntimeException...
        raise IngestError(
            f"ONNX Runtime cannot load {source!r} itself: {_ort_problem(exc)}"
        ) from None


def loaded_session(path: Path, original: onnx.ModelProto | None, source: str | None) -> Any:
    """The written model in an ONNX Runtime CPU session, so that no folder appears with a model
    ONNX Runtime refuses. Where the input graph is refused too, the fault is the input's."""
    from runtime.ort import OrtSession

    try:
        return OrtSession(path, maxima=False)  # the check's and the timing's shapes are their own
    except (
        Exception
    ) as exc:  # onnxruntime raises Fail, InvalidGraph, InvalidArgument, RuntimeException...
        if original is not None:
            input_session(original, source)
        raise UnloadableModel(
            f"the compiled model does not load in ONNX Runtime: {_ort_problem(exc)}; nothing was "
            "written (please report it, with the --verbose traceback)"
        ) from exc


def write_triton_model(
    folder: Path, config: str, staging: Path, names: list[str], *, engine: bool
) -> None:
    """config.pbtxt and version 1 of the Triton model, copied from the output folder's files."""
    import shutil

    write_file(folder / "config.pbtxt", config.encode())
    (folder / "1").mkdir()
    served = {"model.plan": "model.engine"} if engine else {n: n for n in names}
    for name, source in served.items():
        shutil.copyfile(staging / source, folder / "1" / name)
        with open(folder / "1" / name, "rb") as f:
            os.fsync(f.fileno())


def claim_outputs(args: argparse.Namespace) -> list[Output]:
    """--out, and the Triton model folder, checked before any work: never a file, the working folder or
    a parent of it, a repository, the other output, a folder holding an input, or (with --force) a
    folder compile.py did not write."""
    outputs = [claim(args.out, force=args.force, flag="--out")]
    if args.triton_repo is not None:
        check_path_text(args.triton_repo, "--triton-repo")
        repo = Path(os.path.realpath(args.triton_repo))
        if repo.exists() and not repo.is_dir():
            raise OutputRefused(f"--triton-repo {show(args.triton_repo)} is a file, not a folder")
        model = claim(
            os.path.join(args.triton_repo, args.triton_model_name),
            force=args.force,
            flag="--triton-repo",
            owner="triton",
        )
        check_apart(outputs[0], model, (args.triton_repo, repo))
        outputs.append(model)
    for flag in ("onnx", "weights", "config"):
        given = getattr(args, flag)
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        for output in outputs:
            if source.is_relative_to(output.path):
                raise OutputRefused(
                    f"--{flag} {show(given)} lies inside {output.flag} {show(output.given)}, which this run "
                    "would replace; copy it elsewhere first"
                )
    return outputs


def engine_plan(args: argparse.Namespace, model: onnx.ModelProto) -> tuple[Any, str | None]:
    """The engine's optimization profile (checked here, with or without TensorRT) and why no engine
    can be built on this machine (None when it can)."""
    from runtime.profiles import parse_shapes, profile_from_limits, profile_from_shapes
    from runtime.trt_engine import tensorrt_unavailable

    inputs = input_specs(model)
    if args.min_shapes is not None:
        profile = profile_from_shapes(
            inputs,
            parse_shapes(args.min_shapes, "--min-shapes"),
            parse_shapes(args.opt_shapes, "--opt-shapes"),
            parse_shapes(args.max_shapes, "--max-shapes"),
        )
    else:
        shape = max_shape(args)
        profile = profile_from_limits(inputs, shape.batch, shape.tgt_len)
    reason = tensorrt_unavailable()
    if reason is not None and args.triton_repo is not None:
        raise NoEngine(
            f"--triton-repo with --target tensorrt serves model.engine, which cannot be built here: {reason}; "
            "nothing was written"
        )
    return profile, reason


def build_engine_file(
    args: argparse.Namespace,
    console: Console,
    staging: Path,
    manifest: dict[str, Any],
    profile: Any,
    inputs: list[Any],
    checker: Callable[[Any], Any],
) -> dict[str, Any]:
    """staging/model.engine, from the engine cache or built; with --check, the engine is checked too."""
    from artifacts.engine_cache import EngineCache
    from runtime.trt_engine import TensorRTSession, engine_for

    model_files = {
        n: r["sha256"] for n, r in manifest["files"].items() if n.startswith("model.onnx")
    }
    with console.step("building the TensorRT engine (minutes for a new model)"):
        engine, info = engine_for(
            staging / "model.onnx",
            model_files,
            profile,
            args.precision,
            EngineCache(args.engine_cache),
            phase=lambda p: console.say(f"  TensorRT: {p}"),
        )
    write_file(staging / "model.engine", engine)
    manifest["files"].update(file_records(staging, ["model.engine"]))
    record = {**manifest["engine"], "built": True, "reason": None, **info.to_json(), "check": None}
    if args.check:
        try:
            with console.step("checking the engine against the references"):
                report = checker(TensorRTSession(engine, inputs, profile))
        except InputError as exc:  # the check's shapes lie outside a profile the user chose
            record["check"] = {"skipped": str(exc)}
            console.say(f"engine not checked: {exc}")
        else:
            console.say("TensorRT engine:\n" + report.table())
            if not report.passed:
                raise CheckFailed(
                    f"engine check failed: worst relative error {report.worst_rel_error:.3e} exceeds "
                    f"{report.tolerance:.0e}; nothing was written"
                )
            record["check"] = report.to_json()
    return record


def _profile_batch(profile: Any) -> int:
    """The largest batch every input's profile allows (Triton's max_batch_size may not pass it)."""
    return min(hi[0] for _, _, hi in profile.shapes.values())


def measure_latency(
    before: onnx.ModelProto,
    after: Any,
    feeds: Callable[[Any], dict[str, np.ndarray]],
    source: str | None,
) -> dict[str, Any]:
    """p50/p90/p99 of the graph before and after the passes on ONNX Runtime CPU, same inputs, same run;
    ``after`` is the written model's session, ``source`` the --onnx file ``before`` came from."""
    import onnxruntime

    from benchmark.timing import cpu_name, measure
    from runtime.ort import OrtSession

    sessions = {
        "before": input_session(before, source) if source is not None else OrtSession(before),
        "after": after,
    }
    inputs = feeds(sessions["after"])
    timings = {
        name: measure(lambda s=s: s.run(inputs), warmup=3, min_runs=10, min_seconds=1.0).to_json()
        for name, s in sessions.items()
    }
    return {
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        **timings,
        "ratio_p50": timings["after"]["p50_s"] / timings["before"]["p50_s"],
        "where": f"ONNX Runtime {onnxruntime.__version__} CPUExecutionProvider on {cpu_name()} "
        f"({os.cpu_count()} logical CPUs)",
    }


def graph_signature(values, initializers=()) -> list[dict[str, Any]]:
    skip = {t.name for t in initializers}
    return [
        {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in v.type.tensor_type.shape.dim
            ],
        }
        for v in values
        if v.name not in skip
    ]


USER_ERRORS = (
    SpecError,
    WeightsError,
    TargetError,
    InputError,
    IngestError,
    ProfileError,
    MemoryBoundError,
    OutputRefused,
)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; 2 for a bad option or input, 1 for a failed check or a missing backend, 3 for a
    fault of ours. Every failure is one line on stderr; --verbose adds the traceback."""
    args = parse_args(argv)
    console = Console(quiet=args.quiet, json_mode=args.json)
    signals = Signals()
    try:
        with stop_as_exception() as signals:
            args.outputs = claim_outputs(args)
            manifest = run(args, console)
    except BaseException as exc:
        if signals.signum is None and isinstance(
            exc, (KeyboardInterrupt, Stopped)
        ):  # outside our handler's reach
            signals.signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else exc.signum
        if signals.signum is not None:  # whatever the signal broke on its way out, it was a stop
            stopped = (
                "interrupted" if signals.signum == signal.SIGINT else f"stopped by {signals.name}"
            )
            emit(f"compile.py: {stopped}; nothing was written", sys.stderr)
            return signals.exit_status
        if not isinstance(exc, Exception):
            raise
        return _failed(args, exc)
    if args.json:
        out = Path(args.out).absolute()
        emit(
            json.dumps(
                {
                    "ok": True,
                    "out": str(out),
                    "report": str(out / "report.html") if args.report else None,
                    "triton_repo": str(Path(args.triton_repo).absolute())
                    if args.triton_repo
                    else None,
                    "manifest": manifest,
                },
                indent=2,
            ),
            sys.stdout,
        )
    return 0


def _failed(args: argparse.Namespace, exc: Exception) -> int:
    """One line on stderr (and the --json object) for a failure; its exit status."""
    known = isinstance(
        exc,
        (*USER_ERRORS, CheckFailed, ArtifactError, NoEngine, BackendUnavailable, EngineBuildError),
    )
    status = 2 if isinstance(exc, USER_ERRORS) else 1 if known else 3
    message = (
        str(exc)
        if known or isinstance(exc, UnloadableModel)
        else (
            f"internal error {type(exc).__name__}: {first_line(exc)}; nothing was written (please report it, with the "
            "--verbose traceback)"
        )
    )
    if args.verbose:
        emit("".join(traceback.format_exception(exc)).rstrip(), sys.stderr)
    emit(f"compile.py: error: {message}", sys.stderr)
    if args.json:
        emit(json.dumps({"ok": False, "error": message, "exit_status": status}), sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
