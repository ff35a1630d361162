"""A compiled, checked graph and its manifest, held in a working folder of its own until it is
saved: ``save`` makes the output folder (and a Triton model) appear whole, or not at all."""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from attention_compiler.artifacts.files import file_records, write_file, write_manifest
from attention_compiler.artifacts.output_folders import ArtifactError, Output, claim_outputs, staged
from runtime.check import CheckReport


class NoEngine(RuntimeError):
    """A tensorrt-target artifact whose engine cannot be built on this machine."""


class CheckFailed(RuntimeError):
    """The check measured an error above tolerance."""


def checked(
    checker: Callable[[Any], CheckReport],
    session: Any,
    settings: Any,
    progress: Any,
    engine: bool = False,
    hint: str = "",
) -> dict[str, Any] | None:
    """The check's record (None unless ``settings.check``); CheckFailed above tolerance, its message
    followed by ``hint``. ``engine``: the session runs the TensorRT engine rather than the graph."""
    if not settings.check:
        return None
    with progress.step(f"checking {'the engine ' if engine else ''}against the references"):
        report = checker(session)
    progress.say(("TensorRT engine:\n" if engine else "") + report.table())
    if not report.passed:
        raise CheckFailed(
            f"{'engine ' if engine else ''}check failed: {report.failure()}{hint}; nothing was written"
        )
    return report.to_json()


class Artifact:
    """``model`` (the compiled onnx.ModelProto), ``manifest`` (what manifest.json will hold), ``check``
    (the check's figures, or None), and the files written and checked in ``folder``."""

    def __init__(
        self,
        model: onnx.ModelProto,
        manifest: dict[str, Any],
        folder: Path,
        before: onnx.ModelProto,
        engine: Any = None,
        max_batch: int | None = None,
    ) -> None:
        self.model, self.manifest, self.folder, self.before = model, manifest, folder, before
        self._engine, self._max_batch = engine, max_batch
        self._cleanup = weakref.finalize(self, shutil.rmtree, folder, True)

    @property
    def check(self) -> dict[str, Any] | None:
        return self.manifest["check"]

    @property
    def no_engine(self) -> str | None:
        """Why a tensorrt-target artifact has no model.engine (None: it has one, or needs none)."""
        engine = self.manifest.get("engine")
        return None if engine is None or engine["built"] else engine["reason"]

    def close(self) -> None:
        """Remove the working folder (also done when the artifact is garbage-collected)."""
        self._cleanup()

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(
        self,
        out: str | os.PathLike[str],
        *,
        triton_repo: str | os.PathLike[str] | None = None,
        triton_model_name: str = "attention",
        triton_max_batch: int = 8,
        triton_backend: str = "onnxruntime",
        report: bool = False,
        force: bool = False,
        claimed: list[Output] | None = None,
    ) -> dict[str, Any]:
        """Write ``out`` (model.onnx, its data, model.engine, manifest.json, with ``report``
        report.html) and, with ``triton_repo``, the Triton model ``triton_repo/triton_model_name``
        for ``triton_backend`` (onnxruntime, or python: model.onnx run by model.py); ``force``
        replaces folders this tool wrote. ``claimed``: the outputs, already claimed
        (artifacts.output_folders.claim_outputs). Returns the manifest as written."""
        if not self._cleanup.alive:
            raise ArtifactError(
                "this artifact was closed, and its files went with it; compile it again to save it"
            )
        outputs = claimed or claim_outputs(
            out, force=force, triton_repo=triton_repo, triton_model_name=triton_model_name
        )
        manifest = {**self.manifest, "files": dict(self.manifest["files"])}
        triton = None
        if triton_repo is not None:
            triton = self._triton(triton_model_name, triton_max_batch, triton_backend)
            manifest["triton"] = {**triton[1], "repo": os.fspath(triton_repo)}
        with staged(*outputs) as stagings:
            for name in self.manifest["files"]:
                _copy(self.folder / name, stagings[0] / name)
            if report:
                self._report(stagings[0], manifest)
            write_manifest(stagings[0], manifest)
            if triton is not None:
                names, python = list(self.manifest["files"]), triton_backend == "python"
                _triton_model(stagings[1], triton[0], stagings[0], names, python)
        return manifest

    def _triton(self, name: str, max_batch: int, backend: str) -> tuple[str, dict[str, Any]]:
        from attention_compiler.artifacts.triton import BACKENDS, TritonConfigError, triton_config

        if backend not in BACKENDS:
            raise TritonConfigError(
                f"triton_backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
            )
        largest = None if self._max_batch is None else (self._max_batch, "--max-batch")
        if backend == "python":
            if self._engine is not None:
                raise NoEngine(
                    "--triton-backend python serves model.onnx through ONNX Runtime; --target "
                    "tensorrt serves model.engine: use --triton-backend onnxruntime or another target"
                )
            return triton_config(self.model, name, max_batch, "python", largest)
        if self._engine is None:
            return triton_config(self.model, name, max_batch, "onnxruntime_onnx", largest)
        if self.no_engine is not None:
            raise NoEngine(
                "--triton-repo with --target tensorrt serves model.engine, which cannot be built "
                f"here: {self.no_engine}; nothing was written"
            )
        largest = (self._engine.max_batch, "the engine's profile, --max-batch")
        return triton_config(self.model, name, max_batch, "tensorrt_plan", largest)

    def _report(self, staging: Path, manifest: dict[str, Any]) -> None:
        from attention_compiler.artifacts.report import render_report

        after = onnx.load(str(self.folder / "model.onnx"), load_external_data=False)
        write_file(staging / "report.html", render_report(manifest, self.before, after).encode())
        manifest["files"].update(file_records(staging, ["report.html"]))


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def _triton_model(folder: Path, config: str, staging: Path, names: list[str], python: bool) -> None:
    """config.pbtxt and version 1 of the Triton model, copied from the output folder's files; for
    the python backend with model.py beside model.onnx."""
    write_file(folder / "config.pbtxt", config.encode())
    (folder / "1").mkdir()
    engine = "model.engine" in names
    served = {"model.plan": "model.engine"} if engine else {n: n for n in names}
    for name, source in served.items():
        _copy(staging / source, folder / "1" / name)
    if python:
        _copy(Path(__file__).with_name("triton_python_model.py"), folder / "1" / "model.py")
