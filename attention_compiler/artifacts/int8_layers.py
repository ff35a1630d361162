"""Which layers an int8 graph keeps in float32: those the user names, and, where the whole graph
misses the check's bound, each layer whose quantization alone misses it (as Model Optimizer and
Olive fall back per layer). One quantization per layer, from the same prepared graph."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from compiler.quantize_int8 import int8_layers, kept_layers
from compiler.quantize_static import Calibration
from compiler.targets import quantize
from runtime.check import CheckReport


@dataclass
class Int8Layers:
    """An int8 graph before quantizing (``prepare_int8``'s), how it is quantized, its layers, and
    those kept float32."""

    prepared: onnx.ModelProto
    target: str
    calibration: Calibration | None = None  # None: dynamic (ort-cpu)
    calibrated_on: str = ""  # what the calibration inputs were, for the manifest
    given: tuple[str, ...] = ()  # --keep-fp32's names, modules or layers
    found: dict[str, dict[str, Any]] = field(default_factory=dict)  # the fallback's, with figures

    def __post_init__(self) -> None:
        self.layers = list(int8_layers(ir.serde.deserialize_model(self.prepared)))

    def model(self) -> onnx.ModelProto:
        return self.quantized([*self.given, *self.found])

    def quantized(self, keep: list[str]) -> onnx.ModelProto:
        return quantize(self.prepared, self.target, keep, self.calibration)

    def kept(self) -> list[str]:
        return kept_layers(self.layers, [*self.given, *self.found])

    def record(self) -> dict[str, Any]:
        """The manifest's account: what was quantized, what was kept float32 and why."""
        given = kept_layers(self.layers, self.given)
        calibration = self.calibration
        return {
            "activations": "calibrated" if calibration else "quantized per call",
            **(
                {"calibration": {"method": calibration.method, "inputs": self.calibrated_on}}
                if calibration
                else {}
            ),
            "layers": len(self.layers),
            "quantized": len(self.layers) - len(self.kept()),
            "kept_fp32": [{"layer": layer, "why": "--keep-fp32"} for layer in given]
            + [
                {"layer": layer, "why": "alone beyond the check's bound", **figures}
                for layer, figures in self.found.items()
                if layer not in given
            ],
        }

    def fall_back(self, checker: Callable[[Any], CheckReport], say: Callable[[str], None]) -> bool:
        """Keep float32 each layer whose quantization alone misses the bound; False where that would
        leave no layer in int8 (the graph would be float32 under an int8 name)."""
        from runtime.ort import OrtSession

        candidates = [layer for layer in self.layers if layer not in self.kept()]
        for layer in candidates:
            alone = [other for other in self.layers if other != layer]
            report = checker(OrtSession(self.quantized(alone), maxima=False, quiet=True))
            if not report.passed:
                self.found[layer] = {
                    "rel_error": report.worst_rel_error,
                    "cosine": report.worst_cosine,
                }
                say(
                    f"int8: layer {layer} alone gives relative error {report.worst_rel_error:.3g}, "
                    f"cosine {report.worst_cosine:.6f}: kept float32"
                )
        return len(self.kept()) < len(self.layers)


# drawn calibration, where no --calibrate is given: this many sets of inputs, the latency shape's
# lengths halved from one set to the next (128, 64, ..., 1): an attention context's range grows as
# the keys it averages fall, so scales drawn at one length clip the outputs of shorter inputs
CALIBRATION_DRAWS = 8


def calibration_shapes(shape: Any) -> list[Any]:
    """The shapes of the drawn sets: BATCH,TGT,SRC with the lengths halved each time; axis sizes
    given by name (an ingested graph's AXIS=SIZE) as they are."""
    if isinstance(shape, Mapping):
        return [shape] * CALIBRATION_DRAWS
    batch, tgt, src = shape
    return [(batch, max(1, tgt >> k), max(1, src >> k)) for k in range(CALIBRATION_DRAWS)]


def calibration_for(
    settings: Any, model: onnx.ModelProto, draw: Callable[[np.random.Generator, Any], dict]
) -> tuple[Calibration | None, str]:
    """The calibration an int8 graph takes (None: dynamic), and what its inputs were: the
    ``--calibrate`` files, read against the graph's inputs, or ``draw``'s random sets for a target
    whose int8 is calibrated."""
    from compiler import get_target
    from runtime.graph_inputs import InputError, read_inputs
    from runtime.signature import input_specs

    if settings.precision != "int8":
        return None, ""
    if settings.calibrate:
        specs = input_specs(model)
        feeds = [read_inputs(path, specs, "--calibrate") for path in settings.calibrate]
        return Calibration(feeds, settings.calibration_method), ", ".join(
            os.fspath(p) for p in settings.calibrate
        )
    if not get_target(settings.target, "int8")[0].int8_qdq:
        return None, ""
    feeds, refused = [], None
    for seed, shape in enumerate(calibration_shapes(settings.latency_shape)):
        try:
            feeds.append(draw(np.random.default_rng(seed), shape))
        except InputError as exc:  # a length past the graph's (its position table, say)
            refused = refused or exc
    if not feeds:
        raise InputError(
            f"no drawn calibration inputs run through the graph ({refused}); give real ones with "
            "--calibrate FILE.npz"
        )
    return Calibration(feeds, settings.calibration_method), f"{len(feeds)} drawn sets"
