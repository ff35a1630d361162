"""One call from what a user has (a torch module, a spec, an exported .onnx) to a checked artifact.

The compiled graph is written once, into a working folder of the artifact's own, and everything
after that (onnx.checker, the ONNX Runtime load, the check, the engine build, the timing) reads
those bytes: what is checked is what ``Artifact.save`` copies out.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from attention_compiler.artifacts.artifact import Artifact, CheckFailed, NoEngine, checked
from attention_compiler.artifacts.files import (
    EXTERNAL_DATA,
    file_records,
    needs_external_data,
    save_model,
)
from attention_compiler.artifacts.int8_layers import Int8Layers, calibration_for
from attention_compiler.artifacts.manifest import describe_graph, manifest_head
from attention_compiler.artifacts.options import checked_settings, whole_number_problem
from attention_compiler.artifacts.resources import memory_record
from compiler import attention_form, compile_model, get_target
from compiler.targets import prepare_int8
from graphs import AttentionSpec, AttentionWeights, build_mha, spec_from_module
from graphs.blocks import BlockSpec, BlockWeights, block_spec_from_module, build_block
from graphs.builder import declare_maxima
from graphs.onnx_files import IngestError, load_onnx
from graphs.spec import SpecError
from graphs.weight_files import first_line
from graphs.weights import check_precision_range
from runtime.check import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    INT8_MIN_COSINE,
    INT8_TOLERANCE,
    CheckReport,
)
from runtime.session import Session


class Progress(Protocol):
    """Where the pipeline names its slow steps and prints its tables (attention_compiler/cli/console.py's Console)."""

    def say(self, text: str) -> None: ...
    def step(self, label: str) -> contextlib.AbstractContextManager[None]: ...


class Silent:
    """The library's default: no output."""

    def say(self, text: str) -> None:
        pass

    def step(self, label: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class UnloadableModel(RuntimeError):
    """The compiled graph does not load in ONNX Runtime (a fault of ours)."""


@dataclass(frozen=True)
class Settings:
    """How to compile: every option but the source, as compile() takes them."""

    target: str = "portable"
    precision: str = "fp32"
    form: str | None = None
    check: bool = True
    latency: bool = False
    latency_shape: tuple[int, int, int] | Mapping[str, int] = (1, 128, 128)
    max_batch: int | None = None
    max_len: int | None = None
    memory_limit: int | None = None
    external_data: str = "auto"
    profile_shapes: tuple[str, str, str] | None = None
    engine_cache: str | os.PathLike[str] | None = None
    # the check's bound where given: relative error, and cosine similarity (default: the precision's)
    max_rel_error: float | None = None
    min_cosine: float | None = None
    # int8: the layers (modules) kept float32, and whether the check may keep more (those that miss
    # its bound alone) rather than refuse
    keep_fp32: tuple[str, ...] = ()
    fallback: bool = True
    # int8: .npz files of real inputs to calibrate activation scales on (static int8; portable and
    # tensorrt draw inputs without them), and the calibrator
    calibrate: tuple[str | os.PathLike[str], ...] = ()
    calibration_method: str = "minmax"

    @property
    def tolerance(self) -> float:
        if self.max_rel_error is not None:
            return self.max_rel_error
        return {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}.get(self.precision, INT8_TOLERANCE)

    @property
    def cosine_bound(self) -> float | None:
        if self.min_cosine is not None:
            return self.min_cosine
        return INT8_MIN_COSINE if self.precision == "int8" else None

    @property
    def bounded(self) -> bool:
        """Whether the graph has a declared maximum shape: given, or the TensorRT profile's defaults."""
        return (
            self.max_batch is not None
            or self.max_len is not None
            or (self.target == "tensorrt" and self.profile_shapes is None)
        )


@dataclass
class Plan:
    """A graph before and after the passes, and how to check and time it."""

    before: onnx.ModelProto
    model: onnx.ModelProto
    described: dict[str, Any]  # the manifest's entries on what was compiled
    checker: Callable[[Session], CheckReport]
    feeds: Callable[[Session], dict[str, np.ndarray]]
    source: str | None = None  # the .onnx an ingested graph came from, for ONNX Runtime's errors
    extra: dict[str, Any] = field(default_factory=dict)
    int8: Int8Layers | None = None  # an int8 graph's layers, to quantize again with more kept


def _compiled(
    model: onnx.ModelProto,
    settings: Settings,
    form: str | None,
    draw: Callable[[np.random.Generator, Any], dict[str, np.ndarray]],
) -> tuple[onnx.ModelProto, Int8Layers | None]:
    """The target's passes over ``model``; for int8, also its layers, to quantize again, with the
    calibration (``draw`` makes inputs where the target needs some and none are given)."""
    if settings.precision != "int8":
        return compile_model(model, settings.target, settings.precision, form), None
    calibration, calibrated_on = calibration_for(settings, model, draw)
    prepared = prepare_int8(model, settings.target, form)
    layers = Int8Layers(prepared, settings.target, calibration, calibrated_on, settings.keep_fp32)
    return layers.model(), layers


def compile(  # noqa: A001  (the library's one verb; the builtin is not used here)
    source: Any,
    weights: Any = None,
    *,
    seed: int = 0,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
    record: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    workdir: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> Artifact:
    """Compile ``source`` for a target and check it: a torch.nn.MultiheadAttention (with its call's
    options, ``self_attention=True, key_padding_mask="bool"``...), a TransformerEncoderLayer or
    DecoderLayer (with its masks), an AttentionSpec or BlockSpec with ``weights`` (the weights, a
    state_dict file, or None for seeded random ones), or an ONNX model or .onnx path (``inputs``: real
    inputs for its check and timing). The other keywords are ``Settings``' fields (target,
    precision, form, check, latency, ...). ``record`` adds entries to the manifest (the command
    line's options); ``workdir`` holds the artifact's working folder (default: the system's)."""
    fields = set(Settings.__dataclass_fields__)
    given = {k: v for k, v in options.items() if k in fields}
    settings = Settings(**checked_settings({**vars(settings or Settings()), **given}))
    call_options = {k: v for k, v in options.items() if k not in fields}
    if (problem := whole_number_problem("seed", seed, least=0, most=2**64 - 1)) is not None:
        raise SpecError(problem)
    progress = progress or Silent()
    get_target(settings.target, settings.precision, settings.form)
    if isinstance(source, (onnx.ModelProto, str, os.PathLike)):
        if weights is not None or call_options:
            raise SpecError(
                "an ONNX graph is compiled as it is; it takes no weights or spec options, "
                f"got {', '.join(['weights'] * (weights is not None) + sorted(call_options))}"
            )
        plan = _ingested(source, inputs, settings, progress)
    else:
        if inputs is not None:
            raise SpecError(
                "inputs gives real inputs to an ONNX graph; a graph built from a spec is checked on "
                "its own inputs"
            )
        spec, load = _spec_and_weights(source, weights, seed, call_options)
        live = None if isinstance(source, (AttentionSpec, BlockSpec)) else source
        plan = _built(spec, load, settings, progress, live)
    return _finish(
        plan, settings, dict(record or {"options": _options(settings, options)}), progress, workdir
    )


def _options(settings: Settings, given: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of a library call: its settings and the options it passed (paths as
    text, so that the manifest is JSON)."""
    options = {**vars(settings), **given, "latency_shape": settings.latency_shape}
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}


def _spec_and_weights(
    source: Any, weights: Any, seed: int, call_options: dict[str, Any]
) -> tuple[AttentionSpec | BlockSpec, Callable[[], AttentionWeights | BlockWeights]]:
    """The spec, and how to get its weights: called once the memory they need has been checked."""
    if isinstance(source, (AttentionSpec, BlockSpec)):
        if call_options:
            raise SpecError(
                f"a spec holds its options; got {', '.join(sorted(call_options))} beside it"
            )
        kind = AttentionWeights if isinstance(source, AttentionSpec) else BlockWeights
        if weights is None:
            return source, lambda: kind.random(source, seed)
        if isinstance(weights, kind):
            return source, lambda: weights
        if isinstance(weights, (str, os.PathLike)):
            return source, lambda: kind.from_file(source, weights)
        raise SpecError(
            f"weights must be {kind.__name__}, a state_dict file or None, got {type(weights).__name__}"
        )
    torch = sys.modules.get("torch")  # a live module means torch is imported already
    name = type(source).__name__
    if torch is not None and isinstance(source, torch.nn.MultiheadAttention):
        _known_call_options(call_options, AttentionSpec, MODULE_OPTIONS)
        spec = spec_from_module(source, **call_options)
        return spec, lambda: AttentionWeights.from_module(spec, source)
    layers = (
        ()
        if torch is None
        else (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
    )
    if isinstance(source, layers):
        _known_call_options(call_options, BlockSpec, LAYER_OPTIONS)
        spec = block_spec_from_module(source, **call_options)
        return spec, lambda: BlockWeights.from_module(spec, source)
    raise SpecError(
        "compile() takes a torch.nn.MultiheadAttention, TransformerEncoderLayer or "
        "TransformerDecoderLayer, an AttentionSpec or BlockSpec, or an ONNX model or .onnx path; "
        f"got {name}"
    )


# what a live module's own attributes give; the rest of its spec's fields are call options
MODULE_OPTIONS = {
    "embed_dim", "num_heads", "dropout", "bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim",
    "batch_first",
}  # fmt: skip
LAYER_OPTIONS = {
    "block", "embed_dim", "num_heads", "dim_feedforward", "dropout", "activation",
    "layer_norm_eps", "batch_first", "norm_first", "bias",
}  # fmt: skip


def _known_call_options(given: dict[str, Any], kind: type, from_module: set[str]) -> None:
    """SpecError for a keyword that is neither a Settings field nor a call option of the module."""
    calls = [f for f in kind.__dataclass_fields__ if f not in from_module | {"KIND", "OPTIONS"}]
    for name in given:
        if name in from_module:
            raise SpecError(
                f"{name} is read from the module itself; compile() takes only its call options "
                f"beside it ({', '.join(calls)}) and the Settings options"
            )
        if name not in calls:
            raise SpecError(
                f"compile() has no option {name!r}; beside the module it takes its call options "
                f"({', '.join(calls)}) and the Settings options ({', '.join(Settings.__dataclass_fields__)})"
            )


def _built(
    spec: AttentionSpec | BlockSpec,
    load: Callable[[], AttentionWeights | BlockWeights],
    settings: Settings,
    progress: Progress,
    live: Any = None,
) -> Plan:
    """``live``: the torch module the spec was read from; torch's side of the check runs it."""
    from runtime import check

    shape = _spec_shape(settings.latency_shape) if settings.latency else None
    mha = isinstance(spec, AttentionSpec)
    inputs = check.random_inputs if mha else check.block_inputs
    memory = memory_record(spec, settings)
    with progress.step("building the graph"):
        weights = load()
        check_precision_range(weights.tensors, settings.precision)
        built = (build_mha if mha else build_block)(spec, weights)
        declare_maxima(built, settings.max_batch, settings.max_len)  # no forms for longer inputs
    with progress.step(f"running the {settings.target} passes"):
        model, int8 = _compiled(
            built, settings, settings.form, lambda rng, shape: inputs(spec, _spec_shape(shape), rng)
        )
    declare_maxima(model, settings.max_batch, settings.max_len)
    return Plan(
        built,
        model,
        {
            "spec": spec.to_dict(),
            "inputs": [s.to_json() for s in spec.inputs()],
            "outputs": [s.to_json() for s in spec.outputs()],
        },
        checker=lambda session: check.check_session(
            session,
            spec,
            weights,
            tolerance=settings.tolerance,
            min_cosine=settings.cosine_bound,
            module=live,
        ),
        feeds=lambda session: inputs(spec, shape, np.random.default_rng(0)),
        extra={"weights": dict(weights.source), "memory": memory},
        int8=int8,
    )


def _spec_shape(shape: tuple[int, int, int] | Mapping[str, int]) -> tuple[int, int, int]:
    if isinstance(shape, Mapping):
        raise SpecError(
            "latency_shape AXIS=SIZE names the axes of an ONNX graph; give BATCH,TGT,SRC for a spec"
        )
    return tuple(shape)  # type: ignore[return-value]


def _ingested(
    source: onnx.ModelProto | str | os.PathLike[str],
    given: Mapping[str, np.ndarray] | str | os.PathLike[str] | None,
    settings: Settings,
    progress: Progress,
) -> Plan:
    from runtime.graph_inputs import graph_inputs, index_ranges, onnx_axis_sizes, read_inputs
    from runtime.signature import input_specs

    name, original, digest = _read_onnx(source, progress)
    ranges = index_ranges(original)
    draw = _graph_draw(original, name, ranges)
    model, findings, int8 = _passes_over(original, name, settings, progress, draw)
    if isinstance(given, (str, os.PathLike)):
        given = read_inputs(given, input_specs(original))
    sizes = None if given is not None else settings.latency_shape

    def feeds(session: Session) -> dict[str, np.ndarray]:
        if given is not None:
            return dict(given)
        axes = onnx_axis_sizes(session.inputs, sizes)
        return graph_inputs(session.inputs, axes, np.random.default_rng(0), ranges=ranges)

    return Plan(
        original,
        model,
        {
            "source": {"onnx": name, "sha256": digest},
            "inputs": describe_graph(model.graph.input, model.graph.initializer),
            "outputs": describe_graph(model.graph.output),
        },
        checker=_graph_checker(original, name, settings, ranges, given),
        feeds=feeds,
        source=name,
        extra={
            "fusion": [
                {"softmax": f.softmax, "layer": f.layer, "fused": f.fused, "detail": f.detail}
                for f in findings
            ]
        },
        int8=int8,
    )


def _graph_draw(
    original: onnx.ModelProto, name: str, ranges: Mapping[str, int]
) -> Callable[[np.random.Generator, Any], dict[str, np.ndarray]]:
    """Random inputs at a shape's length that the graph takes, found as the check finds its own
    (a decoder's total length as the sum of its cache's and the new tokens'): calibration's."""
    from runtime.check import drawn_case
    from runtime.graph_inputs import graph_inputs, onnx_axis_sizes, overridden_initializers
    from runtime.signature import input_specs

    specs = input_specs(original)
    before = functools.cache(lambda: input_session(original, name))

    def draw(rng: np.random.Generator, shape: Any) -> dict[str, np.ndarray]:
        if isinstance(shape, Mapping):
            return graph_inputs(specs, onnx_axis_sizes(specs, shape), rng, ranges=ranges)
        return drawn_case(before(), shape[1], rng, ranges, overridden_initializers(original))[0]

    return draw


def _graph_checker(
    original: onnx.ModelProto,
    name: str,
    settings: Settings,
    ranges: Mapping[str, int],
    given: Mapping[str, np.ndarray] | None,
) -> Callable[[Session], CheckReport]:
    """The check of a compiled graph against the graph it came from, with the initializers it also
    lists as inputs fed values of their own."""
    from runtime.check import check_against_graph
    from runtime.graph_inputs import overridden_initializers

    return lambda session: check_against_graph(
        session,
        input_session(original, name),
        tolerance=settings.tolerance,
        min_cosine=settings.cosine_bound,
        ranges=ranges,
        inputs=given,
        overrides=overridden_initializers(original),
    )


def _passes_over(
    original: onnx.ModelProto,
    name: str,
    settings: Settings,
    progress: Progress,
    draw: Callable[[np.random.Generator, Any], dict[str, np.ndarray]],
) -> tuple[onnx.ModelProto, list[Any], Int8Layers | None]:
    """The target's passes over an ingested graph, and what they fused and left alone; a graph
    without attention comes back unchanged."""
    from compiler.float16 import weight_beyond_float16
    from compiler.ingest import fusion_findings

    if settings.precision == "fp16" and (beyond := weight_beyond_float16(original)) is not None:
        raise IngestError(
            f"initializer {beyond[0]!r} of {name!r} holds values up to {beyond[1]:.4g}, beyond "
            "float16's range (±65504): with --precision fp16 its outputs would be inf; use --precision fp32"
        )
    _, form = get_target(settings.target, settings.precision, settings.form)
    with progress.step(f"running the {settings.target} passes"):
        model, int8 = _compiled(original, settings, form.name, draw)
    findings = fusion_findings(original, model, form, attention_form(model))
    for finding in findings:
        progress.say(str(finding))
    if not any(f.attention for f in findings):
        model = _unchanged(original, name, settings, findings, progress)
    return model, findings, int8


def _read_onnx(
    source: onnx.ModelProto | str | os.PathLike[str], progress: Progress
) -> tuple[str, onnx.ModelProto, str]:
    """The graph's name for messages, the graph, and the sha256 of its file (or its bytes)."""
    if isinstance(source, onnx.ModelProto):
        return (
            "<the ONNX model given>",
            source,
            hashlib.sha256(source.SerializeToString()).hexdigest(),
        )
    with progress.step("reading the graph"):
        model = load_onnx(source)
    with open(source, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return os.fspath(source), model, digest


def _unchanged(
    original: onnx.ModelProto, name: str, settings: Settings, findings: list, progress: Progress
) -> onnx.ModelProto:
    """An ingested graph without attention is written as it came, in fp32 only."""
    if settings.precision != "fp32":
        raise IngestError(
            f"{name!r} holds no attention, so the passes leave it as it is; --precision "
            f"{settings.precision} converts attention graphs only, give fp32 to copy it unchanged"
        )
    why = "no Softmax" if not findings else "no Softmax is an attention core"
    progress.say(f"no attention in the graph ({why}): model.onnx is the input graph, unchanged")
    return original


def _ort_problem(exc: BaseException) -> str:
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))[:300]


def input_session(original: onnx.ModelProto, name: str) -> Session:
    """The input graph in ONNX Runtime, for the check and the timing; IngestError (the input's
    fault) where ONNX Runtime refuses it. Quiet: a run it fails is one line of ours, not a log."""
    from runtime.ort import OrtSession

    try:
        return OrtSession(original, quiet=True)
    except (
        Exception
    ) as exc:  # onnxruntime raises Fail, InvalidGraph, InvalidArgument, RuntimeException...
        raise IngestError(
            f"ONNX Runtime cannot load {name!r} itself: {_ort_problem(exc)}"
        ) from None


def _loaded(path: Path, plan: Plan) -> Session:
    """The written graph in an ONNX Runtime CPU session. Where the input graph is refused too, the
    fault is the input's."""
    from runtime.ort import OrtSession

    try:
        return OrtSession(path, maxima=False)  # the check's and the timing's shapes are their own
    except (
        Exception
    ) as exc:  # onnxruntime raises Fail, InvalidGraph, InvalidArgument, RuntimeException...
        if plan.source is not None:
            input_session(plan.before, plan.source)
        raise UnloadableModel(
            f"the compiled model does not load in ONNX Runtime: {_ort_problem(exc)}; nothing was "
            "written (please report it, with the --verbose traceback)"
        ) from exc


@contextlib.contextmanager
def _working_folder(workdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """A private folder for the artifact's files, removed if compiling fails or is stopped."""
    folder = Path(tempfile.mkdtemp(prefix="attention-compiler-", dir=workdir or None))
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _finish(
    plan: Plan,
    settings: Settings,
    record: dict[str, Any],
    progress: Progress,
    workdir: str | os.PathLike[str] | None,
) -> Artifact:
    """Write the graph into the artifact's folder, validate, load, check, build the engine, time."""
    manifest = manifest_head(plan, settings, record)
    engine = _engine_plan(plan.model, settings, manifest)
    with _working_folder(workdir) as folder:
        names, session = _written(plan, settings, folder, progress)
        checker, hint = plan.checker, ""
        if plan.int8 is not None and settings.check:
            names, session, checker, hint = _int8_fallback(
                plan, settings, folder, names, session, progress
            )
        if plan.int8 is not None:
            manifest["int8"] = plan.int8.record()
        manifest["files"] = file_records(folder, names)
        manifest["check"] = checked(checker, session, settings, progress, hint=hint)
        if engine is not None and engine.reason is None:
            manifest["engine"] = engine.build(folder, manifest, plan.checker, settings, progress)
        manifest["latency"] = None
        if settings.latency:
            manifest["latency"] = _timed(plan, session, progress)
        return Artifact(plan.model, manifest, folder, plan.before, engine, settings.max_batch)


def _written(
    plan: Plan, settings: Settings, folder: Path, progress: Progress
) -> tuple[list[str], Session]:
    """``plan.model`` written into ``folder`` (its files' names), validated and loaded."""
    external = settings.external_data == "always" or needs_external_data(plan.model)
    with progress.step(
        "writing model.onnx" + (f" with its weights in {EXTERNAL_DATA}" if external else "")
    ):
        names = save_model(plan.model, folder, external=external)
    with progress.step("validating the ONNX (onnx.checker, full check)"):
        onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    with progress.step("loading it in ONNX Runtime"):
        return names, _loaded(folder / "model.onnx", plan)


def _int8_fallback(
    plan: Plan,
    settings: Settings,
    folder: Path,
    names: list[str],
    session: Session,
    progress: Progress,
) -> tuple[list[str], Session, Callable[[Session], CheckReport], str]:
    """An int8 graph beyond the check's bound, written again with each layer that is beyond it
    alone kept float32 (unless ``settings.fallback`` is off); the files, the session, the check
    (the report already made, where nothing changed) and what a refusal should add."""
    assert plan.int8 is not None
    with progress.step("checking against the references"):
        report = plan.checker(session)
    if report.passed or not settings.fallback:
        return names, session, lambda _: report, ""
    with progress.step(f"checking each of {len(plan.int8.layers)} layers in int8 alone"):
        some_int8 = plan.int8.fall_back(plan.checker, progress.say)
    if not some_int8:
        return names, session, lambda _: report, " and every layer alone misses the bound"
    plan.model = plan.int8.model()
    for name in names:  # the first graph's files, ours: onnx appends to an existing data file
        (folder / name).unlink()
    names, session = _written(plan, settings, folder, progress)
    return names, session, plan.checker, f" with {', '.join(plan.int8.kept())} kept float32"


def _timed(plan: Plan, session: Session, progress: Progress) -> dict[str, Any]:
    from attention_compiler.artifacts.report import input_shapes
    from attention_compiler.benchmark.timing import before_and_after
    from runtime.ort import OrtSession

    with progress.step("measuring latency before and after the passes"):
        before = input_session(plan.before, plan.source) if plan.source else OrtSession(plan.before)
        t = before_and_after(before, session, plan.feeds(session))
    progress.say(
        f"latency p50 with {input_shapes(t['inputs'])}: {t['before']['p50_s'] * 1e3:.3f} ms before the "
        f"passes, {t['after']['p50_s'] * 1e3:.3f} ms after ({t['ratio_p50']:.2f}x), {t['where']}"
    )
    return t


def _engine_plan(model: onnx.ModelProto, settings: Settings, manifest: dict[str, Any]) -> Any:
    from attention_compiler.artifacts.engine import EnginePlan

    if settings.target != "tensorrt":
        return None
    engine = EnginePlan.for_model(model, settings)
    manifest["engine"] = engine.record(settings.precision)
    return engine


__all__ = [
    "Artifact",
    "CheckFailed",
    "NoEngine",
    "Progress",
    "Settings",
    "Silent",
    "UnloadableModel",
    "compile",
    "input_session",
]
