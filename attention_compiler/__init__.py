"""Compile torch.nn.MultiheadAttention, the Transformer layers around it, or an exported ONNX graph
into a checked graph fused for a deployment target.

``compile(source, ...)`` returns a checked ``Artifact``; ``Artifact.save(dir)`` writes it. The
error types are the ones a caller catches: ``USER_ERRORS`` for what the caller gave (a bad option,
spec, weights file, graph, input or output folder), ``CheckFailed`` where the compiled graph does
not compute what the source computes, ``NoEngine`` and ``BackendUnavailable`` where the machine
lacks what the target needs.
"""

from attention_compiler.artifacts import Artifact, CheckFailed, NoEngine, Settings, compile
from attention_compiler.artifacts.output_folders import ArtifactError, OutputRefused
from attention_compiler.artifacts.pipeline import UnloadableModel
from attention_compiler.artifacts.resources import MemoryBoundError
from attention_compiler.artifacts.triton import TritonConfigError
from compiler import PRECISIONS, TARGETS, TargetError
from graphs import AttentionSpec, AttentionWeights, SpecError, WeightsError
from graphs.blocks import BlockSpec, BlockWeights
from graphs.onnx_files import IngestError
from runtime import InputError
from runtime.profiles import ProfileError
from runtime.session import BackendUnavailable
from runtime.trt_engine import EngineBuildError

USER_ERRORS = (
    SpecError,
    WeightsError,
    TargetError,
    InputError,
    IngestError,
    ProfileError,
    MemoryBoundError,
    OutputRefused,
    TritonConfigError,
)

__all__ = [
    "PRECISIONS",
    "TARGETS",
    "USER_ERRORS",
    "Artifact",
    "ArtifactError",
    "AttentionSpec",
    "AttentionWeights",
    "BackendUnavailable",
    "BlockSpec",
    "BlockWeights",
    "CheckFailed",
    "EngineBuildError",
    "IngestError",
    "InputError",
    "MemoryBoundError",
    "NoEngine",
    "OutputRefused",
    "ProfileError",
    "Settings",
    "SpecError",
    "TargetError",
    "TritonConfigError",
    "UnloadableModel",
    "WeightsError",
    "compile",
]
