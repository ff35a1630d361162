"""An HTTP guard in front of a Triton server that cannot bound a request's inputs itself.

Triton before 2.59 (PyTriton's bundled 2.51, the 24.10 image) has no ``--http-max-input-size``:
for a JSON request it allocates what each input's declared shape needs before it reads the data,
so one request declaring ``[1, 1000000000, 32]`` with 160 values ends the server and every model
it serves (``std::bad_alloc``). Triton 2.59 and later refuse such a request, by that flag (64 MiB
by default). The guard gives an older server the same rule: on the HTTP port it takes the
requests, refuses those whose body or declared inputs pass the limit (and chunked or compressed
bodies, whose size it cannot see first) with Triton's own error response, and forwards the rest
unchanged to the server on a loopback port of its own. gRPC needs no guard: Triton checks a gRPC
request's bytes against its shape before it allocates anything.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_LIMIT = 64 * 2**20  # Triton's own --http-max-input-size default
HEADER_ROOM = 2**20  # a request's JSON header beside its binary data
ELEMENT_BYTES = {
    **dict.fromkeys(("BOOL", "UINT8", "INT8"), 1),
    **dict.fromkeys(("UINT16", "INT16", "FP16", "BF16"), 2),
    **dict.fromkeys(("UINT32", "INT32", "FP32"), 4),
    **dict.fromkeys(("UINT64", "INT64", "FP64"), 8),
    "BYTES": 4,  # at least its 4-byte length
}
INFERENCE = re.compile(r"/v2/models/[^/?]+(?:/versions/[^/?]+)?/infer(?:\?.*)?")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


def declared_problem(header: Any, limit: int) -> str | None:
    """Why an inference request's JSON header declares more than ``limit`` bytes of inputs (or
    declares them in a form Triton would have to guess at), or None."""
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list):
        return "the request's JSON has no 'inputs' list"
    total = 0
    for item in inputs:
        name = item.get("name") if isinstance(item, dict) else None
        shape = item.get("shape") if isinstance(item, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            return f"input {str(name)[:80]!r} declares shape {str(shape)[:80]}, expected a list of sizes of 0 or more"
        size = math.prod(shape) * ELEMENT_BYTES.get(str(item.get("datatype")), 1)
        total += size
        if total > limit:
            return (
                f"input {str(name)[:80]!r} declares shape {shape} ({size} bytes), which takes the "
                f"request to {total} bytes, more than the {limit}-byte limit (--http-max-input-size)"
            )
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient expects
    timeout = 120  # seconds a client may stall mid-request before its connection is dropped
    server: GuardServer

    def setup(self) -> None:
        super().setup()
        # headers and body leave in two writes: without this, Nagle's algorithm holds the second
        # until the client's delayed ACK, up to 40 ms a response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base's name
        pass

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        self._forward(None)

    def do_POST(self) -> None:  # noqa: N802 -- http.server's name
        body = self._body()
        if body is None:
            return
        if INFERENCE.fullmatch(self.path) and (problem := self._problem(body)):
            self._refuse(400, problem)
            return
        self._forward(body)

    def _body(self) -> bytes | None:
        """The request's body, read only once its size is known and within the limit."""
        limit = self.server.limit
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._refuse(411, "send the request with a Content-Length, not chunked")
        if self.headers.get("Content-Encoding", "identity").lower() != "identity":
            return self._refuse(
                415, "compressed requests are refused here: their size is known only once inflated"
            )
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return self._refuse(400, "the Content-Length is not a number")
        if not 0 <= length <= limit + HEADER_ROOM:
            return self._refuse(
                413,
                f"the request's {length} bytes pass the {limit}-byte limit (--http-max-input-size)",
            )
        return self.rfile.read(length)

    def _problem(self, body: bytes) -> str | None:
        size = self.headers.get("Inference-Header-Content-Length")
        try:
            header = json.loads(body[: int(size)] if size is not None else body)
        except (ValueError, RecursionError):
            return None  # Triton's own parser says what is wrong, and allocates nothing for it
        return declared_problem(header, self.server.limit)

    def _refuse(self, status: int, message: str) -> None:
        data = json.dumps({"error": f"refused by triton_guard: {message}"}).encode()
        self.close_connection = status != 400  # an unread body cannot be skipped
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _forward(self, body: bytes | None) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in (0, 1):  # once more on a fresh connection where a kept one went stale
            reused = self.upstream is not None
            try:
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*self.server.upstream, timeout=300)
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                response = self.upstream.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                if self.upstream is not None:
                    self.upstream.close()
                self.upstream = None
                if attempt or not reused:
                    return self._refuse(
                        502, f"the Triton server behind the guard did not answer ({exc})"
                    )
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class GuardServer(ThreadingHTTPServer):
    """Listens on ``address``, forwards to the server at ``upstream``; ``limit``: bytes a request's
    inputs may declare."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int], limit: int) -> None:
        super().__init__(address, _Handler)
        self.upstream, self.limit = upstream, limit
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="triton_guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
