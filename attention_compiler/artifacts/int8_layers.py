"""Which layers an int8 graph keeps in float32: those the user names, and, where the whole graph
misses the check's bound, each layer whose quantization alone misses it (as Model Optimizer and
Olive fall back per layer). One quantization per layer, from the same prepared graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir as ir

from compiler.quantize_int8 import int8_layers, kept_layers
from compiler.targets import quantize
from runtime.check import CheckReport


@dataclass
class Int8Layers:
    """An int8 graph before quantizing (``prepare_int8``'s), its layers, and those kept float32."""

    prepared: onnx.ModelProto
    given: tuple[str, ...] = ()  # --keep-fp32's names, modules or layers
    found: dict[str, dict[str, Any]] = field(default_factory=dict)  # the fallback's, with figures

    def __post_init__(self) -> None:
        self.layers = list(int8_layers(ir.serde.deserialize_model(self.prepared)))

    def model(self) -> onnx.ModelProto:
        return quantize(self.prepared, [*self.given, *self.found])

    def kept(self) -> list[str]:
        return kept_layers(self.layers, [*self.given, *self.found])

    def record(self) -> dict[str, Any]:
        """The manifest's account: what was quantized, what was kept float32 and why."""
        given = kept_layers(self.layers, self.given)
        return {
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
            report = checker(OrtSession(quantize(self.prepared, alone), maxima=False, quiet=True))
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
