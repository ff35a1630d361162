#!/usr/bin/env python
"""Compile a torch.nn.MultiheadAttention into an ONNX graph for a deployment target (DESIGN.md contract 3),
or, with --onnx, run a target's pipeline over an existing graph (torch.onnx.export's, say)."""

from __future__ import annotations

import argparse
import hashlib
import re
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import onnx

from compiler import PRECISIONS, TARGETS, TargetError, attention_form, compile_model, get_target
from compiler.artifacts import ArtifactError, check_writable, file_records, write_directory
from compiler.ingest import IngestError
from graphs import AttentionWeights, SpecError, WeightsError, build_mha
from runtime import InputError
from config import ConfigError, namespace_from_config
from spec_flags import add_block_flags, add_spec_flags, block_spec_from_args, check_block_flags, given_spec_flags, spec_from_args


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage plus a line
        self.exit(2, f"compile.py: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = add_spec_flags(p, embed_dim_help="required unless --onnx")
    block_group = add_block_flags(p)
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help="compile this ONNX graph instead of building one from the options above")
    out = p.add_argument_group("output")
    out.add_argument("--target", choices=TARGETS, default="portable")
    out.add_argument("--precision", choices=PRECISIONS, default="fp32",
                     help="fp16: half-precision weights and compute, float32 inputs, outputs and softmax")
    out.add_argument("--form", default=None,
                     help="the target's graph form where it offers several: tensorrt takes matmul-softmax (the default, "
                          "TensorRT 8.6+) or attention-op (the standard Attention op, TensorRT 10.14+)")
    out.add_argument("--check", action="store_true", help="compare with torch and the float64 reference; store the figures")
    out.add_argument("--out", default=None, help="output folder: model.onnx and manifest.json (required)")
    out.add_argument("--force", action="store_true", help="replace an existing, non-empty --out (and --triton-repo) folder")
    out.add_argument("--triton-repo", default=None, metavar="DIR",
                     help="also write a Triton Inference Server model repository: DIR/NAME/config.pbtxt, DIR/NAME/1/model.onnx")
    out.add_argument("--triton-model-name", default="attention", help="NAME of the model in --triton-repo")
    out.add_argument("--triton-max-batch", type=int, default=8,
                     help="max_batch_size with dynamic batching where every input and output leads with batch; 0: off")
    out.add_argument("--verbose", action="store_true", help="show the full traceback of an error")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON or YAML file of these options (embed_dim: 512, block: encoder, ...); flags override it")
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
    if args.triton_repo is not None and args.target == "tensorrt":
        p.error("--triton-repo serves the ONNX on Triton's onnxruntime backend; a tensorrt_plan needs model.engine, "
                "which compile.py does not build yet: use --target ort-cuda or onnx-attention")
    if args.triton_max_batch < 0 or not re.fullmatch(r"[A-Za-z0-9_.-]+", args.triton_model_name):
        p.error("--triton-max-batch must be at least 0 and --triton-model-name letters, digits, '_', '-' or '.'")
    spec_flags = given_spec_flags(args, [*groups, block_group])
    if args.onnx is not None and spec_flags:
        p.error(f"--onnx compiles the graph as it is; drop {', '.join(spec_flags)}")
    if args.onnx is None and (args.embed_dim is None or args.num_heads is None):
        p.error("the following arguments are required: --embed-dim, --num-heads (or give --onnx FILE)")
    if args.onnx is None and (problem := check_block_flags(args, block_group, groups)):
        p.error(problem)
    return args


class CheckFailed(RuntimeError):
    """--check measured an error above tolerance."""


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("attention-compiler", "numpy", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Bare attention or a block, built from the spec flags; --check compares with torch and NumPy."""
    if args.onnx is not None:
        return run_onnx(args)
    from runtime.check import check_block_session, check_session

    if args.block == "mha":
        spec, weights_type, build, check_fn = spec_from_args(args), AttentionWeights, build_mha, check_session
    else:
        from graphs.blocks import BlockWeights, build_block

        spec, weights_type, build, check_fn = block_spec_from_args(args), BlockWeights, build_block, check_block_session
    target, form = get_target(args.target, args.precision, args.form)
    weights = weights_type.from_file(spec, args.weights) if args.weights else weights_type.random(spec, args.seed)
    model = compile_model(build(spec, weights), target.name, args.precision, form.name)
    onnx.checker.check_model(model, full_check=True)
    check = None
    if args.check:
        from runtime.ort import OrtSession

        check = _checked(check_fn(OrtSession(model), spec, weights, tolerance=_tolerance(args)))
    described = {"spec": spec.to_dict(), "inputs": [s.to_json() for s in spec.inputs()],
                 "outputs": [s.to_json() for s in spec.outputs()]}
    return _write(args, model, described, {"weights": dict(weights.source)}, check)


def run_onnx(args: argparse.Namespace) -> dict[str, Any]:
    """The target's pipeline over an existing graph; --check compares it with that graph on ONNX Runtime CPU."""
    from compiler.ingest import fusion_findings, load_onnx

    target, form = get_target(args.target, args.precision, args.form)
    original = load_onnx(args.onnx)
    model = compile_model(original, target.name, args.precision, form.name)
    onnx.checker.check_model(model, full_check=True)
    findings = fusion_findings(original, model, form, attention_form(model))
    for finding in findings:
        print(finding)
    if not findings:
        print("no Softmax in the graph: nothing to fuse")
    check = None
    if args.check:
        from runtime.check import check_against_graph
        from runtime.ort import OrtSession

        check = _checked(check_against_graph(OrtSession(model), OrtSession(original), tolerance=_tolerance(args)))
    described = {"source": {"onnx": str(args.onnx), "sha256": hashlib.sha256(Path(args.onnx).read_bytes()).hexdigest()},
                 "inputs": graph_signature(model.graph.input, model.graph.initializer),
                 "outputs": graph_signature(model.graph.output)}
    fusion = {"fusion": [{"softmax": f.softmax, "fused": f.fused, "detail": f.detail} for f in findings]}
    return _write(args, model, described, fusion, check)


def _tolerance(args: argparse.Namespace) -> float:
    from runtime.check import FP16_TOLERANCE, FP32_TOLERANCE

    return FP32_TOLERANCE if args.precision == "fp32" else FP16_TOLERANCE


def _checked(report: Any) -> dict[str, Any]:
    print(report.table())
    if not report.passed:
        raise CheckFailed(f"check failed: worst relative error {report.worst_rel_error:.3e} exceeds "
                          f"{report.tolerance:.0e}; nothing was written")
    return report.to_json()


def _write(args: argparse.Namespace, model: onnx.ModelProto, described: dict[str, Any], extra: dict[str, Any],
           check: dict[str, Any] | None) -> dict[str, Any]:
    """DIR/model.onnx and DIR/manifest.json, atomically; the manifest of DESIGN.md contract 3."""
    data = model.SerializeToString()
    files = {"model.onnx": data}
    target, form = get_target(args.target, args.precision, args.form)
    manifest = {
        **described,
        "target": target.name,
        "form": form.name,
        "target_form": form.note,
        "attention_form": attention_form(model),
        **extra,
        "precision": args.precision,
        "opset": opset(model),
        "tools": tool_versions(),
        "options": {k: v for k, v in sorted(vars(args).items()) if k not in ("verbose", "force", "config")},
        "config": {"path": args.config, "sha256": hashlib.sha256(Path(args.config).read_bytes()).hexdigest()}
        if args.config else None,
        "files": file_records(files),
        "check": check,
    }
    repo = None
    if args.triton_repo is not None:
        from compiler.triton import triton_config

        check_writable(args.triton_repo, force=args.force)  # before anything is written
        config, manifest["triton"] = triton_config(model, args.triton_model_name, args.triton_max_batch)
        manifest["triton"]["repo"] = str(args.triton_repo)
        repo = {f"{args.triton_model_name}/config.pbtxt": config.encode(), f"{args.triton_model_name}/1/model.onnx": data}
    out = write_directory(args.out, files, manifest, force=args.force)
    print(f"wrote {out / 'model.onnx'} ({len(data) / 2**20:.2f} MiB, {len(model.graph.node)} nodes, target {target.name}, {args.precision})")
    print(f"wrote {out / 'manifest.json'}")
    if repo is not None:
        write_directory(args.triton_repo, repo, None, force=args.force)
        print(f"wrote {Path(args.triton_repo) / args.triton_model_name} (Triton: {manifest['triton']['note'] or 'dynamic batching'})")
    return manifest


def graph_signature(values, initializers=()) -> list[dict[str, Any]]:
    skip = {t.name for t in initializers}
    return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]}
            for v in values if v.name not in skip]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (SpecError, WeightsError, TargetError, InputError, IngestError) as exc:
        if args.verbose:
            raise
        print(f"compile.py: error: {exc}", file=sys.stderr)
        return 2
    except (CheckFailed, ArtifactError) as exc:
        if args.verbose:
            raise
        print(f"compile.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
