"""Compile a torch.nn.MultiheadAttention into an ONNX graph for a deployment target (docs/ARCHITECTURE.md contract 3),
or, with --onnx, run a target's pipeline over an existing graph (torch.onnx.export's, say)."""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import onnx

from attention_compiler import USER_ERRORS
from attention_compiler.artifacts.files import EXTERNAL_DATA
from attention_compiler.artifacts.options import whole_number_problem
from attention_compiler.artifacts.output_folders import ArtifactError, Output
from attention_compiler.artifacts.output_folders import claim_outputs as claim_output_folders
from attention_compiler.artifacts.pipeline import CheckFailed, NoEngine, Settings, UnloadableModel
from attention_compiler.artifacts.pipeline import compile as compile_artifact
from attention_compiler.artifacts.triton import BACKENDS, INT32_MAX
from attention_compiler.cli.config import ConfigError, namespace_from_config
from attention_compiler.cli.console import Console, emit
from attention_compiler.cli.signals import Signals, Stopped, stop_as_exception
from attention_compiler.cli.spec_flags import (
    add_block_flags,
    add_spec_flags,
    block_spec_from_args,
    check_block_flags,
    from_args,
    given_spec_flags,
    spec_from_args,
)
from compiler import CALIBRATORS, PRECISIONS, TARGETS
from graphs.weight_files import first_line
from runtime.session import BackendUnavailable
from runtime.trt_engine import EngineBuildError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage plus a line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def parse_args(argv: list[str] | None, prog: str = "compile.py") -> argparse.Namespace:
    p = _Parser(
        prog=prog, description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    groups = [*add_spec_flags(p, embed_dim_help="required unless --onnx"), add_block_flags(p)]
    _add_source_flags(p)
    out = p.add_argument_group("output")
    _add_output_flags(out)
    _add_bound_flags(p.add_argument_group("maximum shape and memory (every target)"))
    _add_engine_flags(
        p.add_argument_group(
            "TensorRT engine (--target tensorrt; needs the tensorrt package and a GPU)"
        )
    )
    _add_reporting_flags(out)
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="JSON or YAML file of these options (embed_dim: 512, block: encoder, ...); flags override it",
    )
    args = p.parse_args(argv, namespace=_config_namespace(p, argv))
    args.prog = p.prog
    if args.out is None:
        p.error("the following arguments are required: --out (on the command line or in --config)")
    for problem in (_engine_problem(args), _bound_problem(args), _source_problem(args, groups)):
        if problem is not None:
            p.error(problem)
    return args


def _add_source_flags(p: argparse.ArgumentParser) -> None:
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


def _add_precision_flags(out: argparse._ArgumentGroup) -> None:
    out.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp16: half-precision weights and compute, float32 inputs, outputs and softmax; int8 "
        "(ort-cpu): int8 weights and activations quantized per call in every projection and "
        "feed-forward MatMul, checked against a bound (--tolerance, --min-cosine)",
    )
    out.add_argument(
        "--tolerance",
        "--max-rel-error",
        dest="max_rel_error",
        type=float,
        default=None,
        help="--check's bound on the relative error (max abs error over the reference's largest "
        "magnitude); default 1e-5 for fp32, 1e-2 for fp16, 5e-2 for int8",
    )
    out.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        help="--check's bound on each output's cosine similarity to the reference; default 0.999 for "
        "int8, none otherwise",
    )


def _add_int8_flags(out: argparse._ArgumentGroup) -> None:
    out.add_argument(
        "--keep-fp32",
        nargs="+",
        default=[],
        metavar="NAME",
        help="int8: keep these layers in float32, by module name as the findings print it "
        "(encoder.layer.0 keeps every layer under it)",
    )
    out.add_argument(
        "--no-fallback",
        dest="fallback",
        action="store_false",
        help="int8 with --check: refuse a graph beyond the bound rather than keep float32 each layer "
        "that alone puts it there",
    )
    out.add_argument(
        "--calibrate",
        nargs="+",
        default=[],
        metavar="FILE.npz",
        help="int8: real inputs (one array per graph input, each file one call) to calibrate "
        "activation scales on: static int8 (default on ort-cpu: dynamic; portable and tensorrt "
        "draw inputs without it)",
    )
    out.add_argument(
        "--calibration-method",
        choices=CALIBRATORS,
        default="minmax",
        help="int8 static: the calibrator that chooses each activation's range from the inputs",
    )


def _add_output_flags(out: argparse._ArgumentGroup) -> None:
    out.add_argument("--target", choices=TARGETS, default="portable")
    _add_precision_flags(out)
    _add_int8_flags(out)
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
    _add_triton_flags(out)


def _add_triton_flags(out: argparse._ArgumentGroup) -> None:
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
        "--triton-backend",
        choices=BACKENDS,
        default="onnxruntime",
        help="onnxruntime: Triton's onnxruntime backend runs model.onnx (platform onnxruntime_onnx); "
        "python: its python backend runs model.py, which runs model.onnx with ONNX Runtime and "
        "this project's input checks (for a server without the onnxruntime backend, such as "
        "PyTriton's)",
    )
    out.add_argument(
        "--triton-max-batch",
        type=int,
        default=8,
        help="max_batch_size with dynamic batching where every input and output leads with batch; 0: off",
    )


def _add_bound_flags(bounds: argparse._ArgumentGroup) -> None:
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


def _add_engine_flags(trt: argparse._ArgumentGroup) -> None:
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


def _add_reporting_flags(out: argparse._ArgumentGroup) -> None:
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


def _config_namespace(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The --config file's options, which the flags then override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    namespace = argparse.Namespace()
    if known.config:
        try:
            namespace = namespace_from_config(p, known.config)
        except ConfigError as exc:
            p.exit(2, f"{p.prog}: error: {exc}\n")
    return namespace


def _engine_problem(args: argparse.Namespace) -> str | None:
    """Why the TensorRT profile flags do not fit together, or None."""
    engine_flags = [
        f"--{k.replace('_', '-')}" for k in ENGINE_FLAGS if getattr(args, k) not in (None, False)
    ]
    if engine_flags and args.target != "tensorrt":
        return (
            f"{', '.join(engine_flags)} shape{'s' if len(engine_flags) == 1 else ''} the TensorRT engine; "
            "it applies to --target tensorrt only"
        )
    if (args.min_shapes, args.opt_shapes, args.max_shapes).count(None) not in (0, 3):
        return "--min-shapes, --opt-shapes and --max-shapes go together: give all three, or none and --max-batch/--max-len"
    if args.min_shapes is not None and (args.max_batch is not None or args.max_len is not None):
        return "--max-batch/--max-len and --min/--opt/--max-shapes both set the profile; give one or the other"
    return None


def _bound_problem(args: argparse.Namespace) -> str | None:
    """Why the maximum shape, memory limit or Triton flags are out of range, or None."""
    for flag in ("max_batch", "max_len"):
        value = getattr(args, flag)
        if value is not None and (
            problem := whole_number_problem(f"--{flag.replace('_', '-')}", value)
        ):
            return problem
    if args.memory_limit is not None and (args.onnx is not None or not _bounded(args)):
        return (
            "--memory-limit bounds a graph built from a spec at its maximum shape: give --max-batch and/or --max-len"
            + (" (not --onnx)" if args.onnx is not None else "")
        )
    if args.triton_backend != "onnxruntime" and args.triton_repo is None:
        return "--triton-backend chooses the backend of the --triton-repo model; give --triton-repo"
    if args.triton_backend == "python" and args.target == "tensorrt":
        return (
            "--triton-backend python serves model.onnx through ONNX Runtime, and --target tensorrt "
            "serves model.engine; use --triton-backend onnxruntime or another target"
        )
    return whole_number_problem("--triton-max-batch", args.triton_max_batch, 0, INT32_MAX)


def _source_problem(args: argparse.Namespace, groups: list[argparse._ArgumentGroup]) -> str | None:
    """Why the spec flags, --onnx and --inputs do not fit together, or None."""
    spec_flags = given_spec_flags(args, groups)
    if args.inputs is not None and args.onnx is None:
        return "--inputs gives real inputs to an --onnx graph; a graph built from a spec is checked on its own inputs"
    if args.onnx is not None and spec_flags:
        return f"--onnx compiles the graph as it is; drop {', '.join(spec_flags)}"
    if args.onnx is None and (args.embed_dim is None or args.num_heads is None):
        return (
            "the following arguments are required: --embed-dim, --num-heads (or give --onnx FILE)"
        )
    if args.onnx is None:
        return check_block_flags(args, groups[-1], groups[:-1])
    return None


def _size(text: str) -> int:
    from attention_compiler.artifacts.resources import parse_size

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


ENGINE_FLAGS = ("min_shapes", "opt_shapes", "max_shapes", "engine_cache", "allow_no_engine")
UNRECORDED = ("verbose", "force", "config", "quiet", "json", "outputs")


def settings(args: argparse.Namespace) -> Settings:
    shapes = (args.min_shapes, args.opt_shapes, args.max_shapes)
    args = argparse.Namespace(**vars(args), profile_shapes=None if shapes[0] is None else shapes)
    return from_args(Settings, args)


def record(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest's record of the command line: the resolved options and the --config file."""
    config = None
    if args.config:
        digest = hashlib.sha256(Path(args.config).read_bytes()).hexdigest()
        config = {"path": args.config, "sha256": digest}
    options = {k: v for k, v in sorted(vars(args).items()) if k not in UNRECORDED}
    return {"options": options, "config": config}


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Compile what the flags describe (a spec, a block or an --onnx graph) and write it out."""
    if args.onnx is not None:
        source, weights = args.onnx, None
    else:
        spec = spec_from_args(args) if args.block == "mha" else block_spec_from_args(args)
        source, weights = spec, args.weights
    artifact = compile_artifact(
        source,
        weights,
        seed=args.seed,
        inputs=args.inputs,
        record=record(args),
        progress=console,
        settings=settings(args),
    )
    with artifact:
        manifest = artifact.save(
            args.out,
            triton_repo=args.triton_repo,
            triton_model_name=args.triton_model_name,
            triton_max_batch=args.triton_max_batch,
            triton_backend=args.triton_backend,
            report=args.report,
            claimed=args.outputs,
        )
    said(args, console, artifact.model, manifest)
    if (reason := artifact.no_engine) is not None:
        message = f"no model.engine: {reason}; wrote the ONNX and its manifest only"
        if not args.allow_no_engine:
            raise NoEngine(f"{message} (pass --allow-no-engine to accept that)")
        console.say(message)
    return manifest


def said(
    args: argparse.Namespace, console: Console, model: onnx.ModelProto, manifest: dict[str, Any]
) -> None:
    """What was written, one line per file or folder."""
    out, files = Path(args.out).absolute(), manifest["files"]
    size = sum(r["bytes"] for name, r in files.items() if name.startswith("model.onnx"))
    data = f", weights in {EXTERNAL_DATA}" if EXTERNAL_DATA in files else ""
    console.say(
        f"wrote {out / 'model.onnx'} ({size / 2**20:.2f} MiB{data}, {len(model.graph.node)} nodes, "
        f"target {manifest['target']}, {manifest['precision']})"
    )
    console.say(f"wrote {out / 'manifest.json'}")
    if args.report:
        console.say(f"wrote {out / 'report.html'}")
    if "model.engine" in files:
        engine = manifest["engine"]
        cached = ", from the engine cache" if engine["from_cache"] else ""
        console.say(
            f"wrote {out / 'model.engine'} (TensorRT {engine['tensorrt']}, {engine['gpu']}{cached})"
        )
    if args.triton_repo is not None:
        console.say(
            f"wrote {Path(args.triton_repo) / args.triton_model_name} "
            f"(Triton: {manifest['triton']['note'] or 'dynamic batching'})"
        )


def claim_outputs(args: argparse.Namespace) -> list[Output]:
    """--out and the Triton model folder, checked before any work starts."""
    return claim_output_folders(
        args.out,
        force=args.force,
        triton_repo=args.triton_repo,
        triton_model_name=args.triton_model_name,
        inputs={f"--{flag}": getattr(args, flag) for flag in ("onnx", "weights", "config")},
    )


def main(argv: list[str] | None = None, prog: str = "compile.py") -> int:
    """Exit 0 on success; 2 for a bad option or input, 1 for a failed check or a missing backend, 3 for a
    fault of ours. Every failure is one line on stderr, led by ``prog``; --verbose adds the traceback."""
    args = parse_args(argv, prog)
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
            emit(f"{args.prog}: {stopped}; nothing was written", sys.stderr)
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
    emit(f"{args.prog}: error: {message}", sys.stderr)
    if args.json:
        emit(json.dumps({"ok": False, "error": message, "exit_status": status}), sys.stdout)
    return status


def command() -> NoReturn:
    """The installed ``attention-compile``."""
    sys.exit(main(prog="attention-compile"))
