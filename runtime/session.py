"""One small interface over every backend, in the manner of Polygraphy's runners.

``run`` takes NumPy arrays or torch tensors (CPU or CUDA) and returns the same kind: a backend
that computes on NumPy gets torch inputs as arrays and returns tensors on the inputs' device; a
backend that works on the device (``_run_torch``) takes and gives device tensors without a copy.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.signature import InputError, InputSpec, check_inputs, is_torch


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (a package, a provider or a GPU is missing); the message says which and how to get it."""


class Session(abc.ABC):
    """Runs a compiled graph; inputs are checked against its declared inputs before the backend sees them.
    A backend sets ``_inputs`` (the graph's declared inputs) and ``_outputs`` (its output names)."""

    _inputs: list[InputSpec]
    _optional: list[
        InputSpec
    ] = []  # initializers a feed may override (keep_initializers_as_inputs)
    _outputs: list[str]
    _maxima: dict[
        str, int
    ] = {}  # the declared largest batch / length (graphs/spec.py MAX_*_KEY); empty: none

    @property
    def inputs(self) -> list[InputSpec]:
        return self._inputs

    @property
    def overridable(self) -> list[InputSpec]:
        """Inputs a feed may give beside ``inputs``: initializers the graph also lists as inputs."""
        return list(self._optional)

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    @property
    def maxima(self) -> dict[str, int]:
        return dict(self._maxima)

    @abc.abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _run_torch(self, feeds: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
        """Torch tensors in and out; by default through NumPy, outputs on the first input's device."""
        device = next(iter(feeds.values())).device
        import torch

        arrays = {name: value.detach().cpu().numpy() for name, value in feeds.items()}
        return {name: torch.from_numpy(out).to(device) for name, out in self._run(arrays).items()}

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        sizes = check_inputs(self.inputs, feeds, self._maxima, self._optional)
        kinds = {is_torch(v) for v in feeds.values()}
        if kinds == {True}:
            if len({str(v.device) for v in feeds.values()}) > 1:
                raise InputError(
                    "inputs are on different devices ("
                    f"{', '.join(f'{k}: {v.device}' for k, v in feeds.items())}); put them on one"
                )
            return self._run_torch(feeds, sizes)
        if len(kinds) > 1:
            raise InputError(
                "give every input as a numpy.ndarray or every input as a torch.Tensor, not a mix"
            )
        return self._run(feeds)
