"""The TensorRT engine of a tensorrt-target artifact: its optimization profile (checked on any
machine), why none can be built here, and the build from the engine cache, checked like the graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from attention_compiler.artifacts.artifact import checked
from attention_compiler.artifacts.files import file_records, write_file
from runtime import InputError
from runtime.profiles import Profile
from runtime.signature import input_specs

DEFAULT_MAX_BATCH, DEFAULT_MAX_LEN = 8, 512


@dataclass
class EnginePlan:
    profile: Profile
    reason: str | None  # why no engine can be built on this machine; None when one can
    inputs: list[Any]

    @classmethod
    def for_model(cls, model: onnx.ModelProto, settings: Any) -> EnginePlan:
        from runtime.profiles import parse_shapes, profile_from_limits, profile_from_shapes
        from runtime.trt_engine import tensorrt_unavailable

        inputs = input_specs(model)
        if settings.profile_shapes is not None:
            lo, opt, hi = settings.profile_shapes
            profile = profile_from_shapes(
                inputs,
                parse_shapes(lo, "--min-shapes"),
                parse_shapes(opt, "--opt-shapes"),
                parse_shapes(hi, "--max-shapes"),
            )
        else:
            profile = profile_from_limits(
                inputs,
                settings.max_batch or DEFAULT_MAX_BATCH,
                settings.max_len or DEFAULT_MAX_LEN,
            )
        return cls(profile, tensorrt_unavailable(), inputs)

    def record(self, precision: str) -> dict[str, Any]:
        """The manifest's engine entry before a build."""
        return {
            "built": False,
            "reason": self.reason,
            "precision": precision,
            "profile": self.profile.to_json(),
            "trtexec": self.profile.trtexec(),
        }

    def build(
        self,
        folder: Path,
        manifest: dict[str, Any],
        checker: Callable[[Any], Any],
        settings: Any,
        progress: Any,
    ) -> dict[str, Any]:
        """folder/model.engine, from the engine cache or built; checked too when the graph was."""
        from attention_compiler.artifacts.engine_cache import EngineCache
        from runtime.trt_engine import TensorRTSession, engine_for

        model_files = {
            n: r["sha256"] for n, r in manifest["files"].items() if n.startswith("model.onnx")
        }
        with progress.step("building the TensorRT engine (minutes for a new model)"):
            engine, info = engine_for(
                folder / "model.onnx",
                model_files,
                self.profile,
                settings.precision,
                EngineCache(settings.engine_cache),
                phase=lambda p: progress.say(f"  TensorRT: {p}"),
            )
        write_file(folder / "model.engine", engine)
        manifest["files"].update(file_records(folder, ["model.engine"]))
        record = {**manifest["engine"], "built": True, "reason": None, **info.to_json()}
        record["check"] = self._checked(
            TensorRTSession(engine, self.inputs, self.profile), checker, settings, progress
        )
        return record

    @staticmethod
    def _checked(session: Any, checker: Callable[[Any], Any], settings: Any, progress: Any) -> Any:
        try:
            return checked(checker, session, settings, progress, engine=True)
        except InputError as exc:  # the check's shapes lie outside a profile the user chose
            progress.say(f"engine not checked: {exc}")
            return {"skipped": str(exc)}

    @property
    def max_batch(self) -> int:
        """The largest batch every input's profile allows (Triton's max_batch_size may not pass it)."""
        return min(hi[0] for _, _, hi in self.profile.shapes.values())
