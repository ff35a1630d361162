"""The model.py of a Triton model repository for Triton's python backend (compile.py
--triton-backend python): it runs model.onnx, beside it in the version folder, with ONNX Runtime
through this project's own session, so a request gets the same input checks as every session here.

Triton checks each request's dtypes and fixed dims against config.pbtxt first; this model checks
what the config cannot say (symbolic axes that must agree, such as a mask's length and the
query's; empty axes; the declared largest batch and length) and answers a request that fails
with Triton's error response carrying the one-line message, while the other requests of the
same execution are answered as usual. Requests the dynamic batcher hands over together run as one
call where their shapes past the batch axis agree, in calls of at most the graph's largest batch
(the config's max_batch_size, and the batch the graph declares). Every response is an object of
its own: the stub answers each through shared memory, and one error object shared by several
responses crashed the server. The Python that Triton's stub runs needs this project installed
(PyTriton's server uses the environment it is started from).
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.ort import OrtSession
from runtime.signature import InputError, check_inputs


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.session = OrtSession(os.path.join(folder, "model.onnx"))
        self.batched = config.get("max_batch_size", 0) > 0
        limits = [config.get("max_batch_size", 0), self.session.maxima.get("batch", 0)]
        self.largest_batch = min(n for n in limits if n > 0) if self.batched else 0
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict = {}
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except InputError as exc:
                responses[i] = _error(str(exc))
                continue
            key = tuple((n, v.dtype.str, v.shape[1:]) for n, v in feeds.items())
            groups.setdefault(key if self.batched else i, []).append((i, feeds))
        for members in groups.values():
            for call in self._calls(members):
                try:
                    results = self._run(call)
                except Exception as exc:  # ONNX Runtime's failure answers these; the stub lives
                    message = f"ONNX Runtime failed: {str(exc).splitlines()[0][:300]}"
                    results = [(i, message) for i, _ in call]
                for i, outputs in results:
                    responses[i] = self._response(outputs)
        return responses

    def _calls(self, members: list) -> list[list]:
        """Requests of one shape split into calls whose batches add up to at most the largest."""
        calls: list[list] = []
        total = 0
        for member in members:
            batch = next(iter(member[1].values())).shape[0] if member[1] else 1
            if not calls or not self.batched or total + batch > self.largest_batch:
                calls.append([])
                total = 0
            calls[-1].append(member)
            total += batch
        return calls

    def _response(self, outputs) -> object:
        if isinstance(outputs, str):
            return _error(outputs)
        tensors = [pb_utils.Tensor(n, np.ascontiguousarray(outputs[n])) for n in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _feeds(self, request) -> dict:
        """The request's inputs, checked as this project's sessions check them."""
        feeds = {}
        for spec in self.session.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                feeds[spec.name] = tensor.as_numpy()
        check_inputs(self.session.inputs, feeds, self.session.maxima)
        return feeds

    def _run(self, members: list) -> list:
        """One call over requests whose shapes past the batch axis agree, split back by request."""
        if len(members) == 1:
            ((i, feeds),) = members
            return [(i, self.session.run(feeds))]
        names = list(members[0][1])
        joined = {n: np.concatenate([feeds[n] for _, feeds in members]) for n in names}
        outputs = self.session.run(joined)
        sizes = np.cumsum([feeds[names[0]].shape[0] for _, feeds in members])[:-1]
        parts = {n: np.split(outputs[n], sizes) for n in self.outputs}
        return [(i, {n: parts[n][j] for n in self.outputs}) for j, (i, _) in enumerate(members)]


def _error(message: str) -> object:
    """A response carrying a TritonError of its own (never shared between responses)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
