"""Passes over the canonical graph and the per-target pipelines that order them."""

from compiler.targets import PRECISIONS, TARGETS, TargetError, compile_model, get_target

__all__ = ["PRECISIONS", "TARGETS", "TargetError", "compile_model", "get_target"]
