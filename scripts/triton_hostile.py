"""Hostile requests for scripts/triton_load.py --hostile: what a broken or malicious client sends a
served model, each made from a valid request so that it is wrong in one way only. Every kind but a
dropped connection must be refused (a 4xx or 5xx answer), never answered; the valid requests around
them must all be answered exactly, and the server must be up at the end.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

KINDS = (
    "wrong_dtype",
    "wrong_shape",
    "oversize_batch",
    "enormous_shape",
    "negative_shape",
    "garbage_body",
    "dropped_connection",
)


def triton_type(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def body_of(
    feeds: Mapping[str, np.ndarray], shapes: Mapping[str, list[int]] | None = None
) -> tuple[bytes, dict[str, str]]:
    """An inference request with binary inputs (``shapes`` may declare others than the data's)."""
    inputs, data = [], b""
    for name, value in feeds.items():
        raw = np.ascontiguousarray(value).tobytes()
        shape = list((shapes or {}).get(name, value.shape))
        inputs.append(
            {
                "name": name,
                "datatype": triton_type(value.dtype),
                "shape": shape,
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        data += raw
    header = json.dumps({"inputs": inputs}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


class Hostile:
    """Makes and sends hostile requests to ``model`` at ``url``; ``config`` is the model's
    configuration as the server reports it (max_batch_size), ``symbols`` each input's declared
    shape."""

    def __init__(
        self, url: str, model: str, config: Mapping[str, Any], shapes: Mapping[str, tuple]
    ):
        self.host, port = url.rsplit(":", 1)
        self.port, self.model = int(port), model
        self.max_batch = int(config.get("max_batch_size", 0))
        self.shapes = shapes

    def kinds(self) -> list[str]:
        """The kinds this model can be sent: an oversize batch needs a batched model, a wrong shape
        a fixed size or an axis two inputs share."""
        return [k for k in KINDS if k != "oversize_batch" or self.max_batch > 0]

    def send(self, kind: str, feeds: dict[str, np.ndarray]) -> int | None:
        """The HTTP status the server answered with, or None for a dropped connection."""
        made: dict[str, Callable[[dict[str, np.ndarray]], tuple[bytes, dict[str, str]] | None]] = {
            "wrong_dtype": self._wrong_dtype,
            "wrong_shape": self._wrong_shape,
            "oversize_batch": self._oversize_batch,
            "enormous_shape": lambda f: self._declared(f, 10**9),
            "negative_shape": lambda f: self._declared(f, -1),
            "garbage_body": lambda f: (
                bytes(np.random.default_rng(0).integers(0, 256, 512, np.uint8)),
                {},
            ),
        }
        if kind == "dropped_connection":
            self._dropped()
            return None
        request = made[kind](feeds)
        if request is None:  # this model cannot be sent this kind: a valid request instead
            request = body_of(feeds)
        return self._post(*request)

    def _post(self, body: bytes, headers: dict[str, str]) -> int:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request("POST", f"/v2/models/{self.model}/infer", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def _dropped(self) -> None:
        """Headers promising a large body, a little of it, then the connection closed."""
        with socket.create_connection((self.host, self.port), timeout=30) as s:
            s.sendall(
                f"POST /v2/models/{self.model}/infer HTTP/1.1\r\nHost: {self.host}\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n".encode()
                + b'{"inputs": [{"na'
            )

    def _wrong_dtype(self, feeds: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        name = next(iter(feeds))
        other = np.float64 if feeds[name].dtype != np.float64 else np.float32
        return body_of({**feeds, name: feeds[name].astype(other)})

    def _wrong_shape(self, feeds: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]] | None:
        """A fixed size one larger, or an axis two inputs share made to disagree."""
        for name, declared in self.shapes.items():
            for axis, dim in enumerate(declared):
                if isinstance(dim, int) and name in feeds:
                    return body_of({**feeds, name: _grown(feeds[name], axis)})
        seen: dict[str, str] = {}
        for name, declared in self.shapes.items():
            for axis, dim in enumerate(declared):
                if isinstance(dim, str) and dim in seen and axis > 0 and name in feeds:
                    return body_of({**feeds, name: _grown(feeds[name], axis)})
                if isinstance(dim, str):
                    seen.setdefault(dim, name)
        return None

    def _oversize_batch(self, feeds: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        rows = self.max_batch + 1
        return body_of({n: np.repeat(v[:1], rows, axis=0) for n, v in feeds.items()})

    def _declared(self, feeds: dict[str, np.ndarray], size: int) -> tuple[bytes, dict[str, str]]:
        """JSON data that declares ``size`` on the first input's second axis."""
        inputs = []
        for i, (name, value) in enumerate(feeds.items()):
            shape = list(value.shape)
            if i == 0:
                shape[min(1, len(shape) - 1)] = size
            inputs.append(
                {
                    "name": name,
                    "datatype": triton_type(value.dtype),
                    "shape": shape,
                    "data": value.ravel()[:160].tolist(),
                }
            )
        return json.dumps({"inputs": inputs}).encode(), {"Content-Type": "application/json"}


def _grown(value: np.ndarray, axis: int) -> np.ndarray:
    return np.concatenate([value, np.take(value, [0], axis=axis)], axis=axis)
