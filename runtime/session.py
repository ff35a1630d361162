"""One small interface over every backend, in the manner of Polygraphy's runners."""

from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np

from runtime.signature import InputSpec, check_inputs


class Session(abc.ABC):
    """Runs a compiled graph; inputs are checked against its declared inputs before the backend sees them."""

    @property
    @abc.abstractmethod
    def inputs(self) -> list[InputSpec]: ...

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    @abc.abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(self.inputs, feeds)
        return self._run(feeds)
