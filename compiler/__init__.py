"""Passes over the canonical graph and the per-target pipelines that order them."""

from compiler.quantize_static import CALIBRATORS, Calibration
from compiler.targets import (
    PRECISIONS,
    TARGETS,
    TargetError,
    attention_form,
    compile_model,
    get_target,
)

__all__ = [
    "CALIBRATORS",
    "Calibration",
    "PRECISIONS",
    "attention_form",
    "TARGETS",
    "TargetError",
    "compile_model",
    "get_target",
]
