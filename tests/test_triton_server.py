"""A real Triton Inference Server (a tritonserver on PATH, or the one PyTriton ships) on loopback,
serving repositories compile.py writes with --triton-backend python, talked to over HTTP and gRPC
with tritonclient. Outputs are compared with ONNX Runtime on the same model.onnx in this process:
the server runs the same ONNX Runtime on the same bytes, so they agree to 1e-6 (float32 rounding
of a different thread split at most)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from attention_compiler import artifacts
from graphs import AttentionSpec
from graphs.blocks import BlockSpec
from runtime.ort import OrtSession

TOLERANCE = 1e-6
SPECS = {
    "mha": AttentionSpec(32, 4, batch_first=True, self_attention=True, key_padding_mask="bool"),
    "encoder": BlockSpec(
        "encoder", 32, 4, dim_feedforward=64, batch_first=True, key_padding_mask="bool"
    ),
    "decoder_kv": AttentionSpec(
        32, 4, batch_first=True, self_attention=True, is_causal=True, kv_cache=True
    ),
}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Server:
    """A tritonserver process on free loopback ports; stop() ends it, whatever state it is in."""

    def __init__(self, repository, workdir, *extra: str) -> None:
        from triton_server import NoServer, start

        self.ports = _free_ports(3)
        self.log = workdir / "server.log"
        try:
            with open(self.log, "wb") as log:
                self.served = start(
                    repository,
                    tuple(self.ports),
                    workdir,
                    *extra,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        except NoServer as exc:
            pytest.skip(str(exc))
        self.process = self.served.process
        self.http, self.grpc = f"127.0.0.1:{self.ports[0]}", f"127.0.0.1:{self.ports[1]}"

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tritonserver exited ({self.process.returncode}): {self.log_tail()}")
            try:
                url = f"http://{self.http}/v2/health/ready"
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"tritonserver was not ready after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-6:])

    def stop(self) -> None:
        self.served.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The three python-backend models in one repository under one server, and their local
    sessions."""
    pytest.importorskip("tritonclient.http", reason="needs tritonclient (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("triton")
    local = {}
    for name, spec in {**SPECS, "mha_b2": SPECS["mha"]}.items():
        max_batch = 2 if name == "mha_b2" else None
        with artifacts.compile(
            spec, seed=1, target="ort-cpu", check=False, max_batch=max_batch
        ) as artifact:
            artifact.save(
                root / name,
                triton_repo=root / "models",
                triton_model_name=name,
                triton_backend="python",
            )
        local[name] = OrtSession(root / name / "model.onnx")
    # mha_b2's config as a repository written before the cap (or edited by hand) has it: the
    # batcher may join 8 rows for a graph that takes 2, and model.py must split them
    config = root / "models" / "mha_b2" / "config.pbtxt"
    text = config.read_text()
    assert "max_batch_size: 2\n" in text
    config.write_text(text.replace("max_batch_size: 2\n", "max_batch_size: 8\n"))
    server = Server(root / "models", root)
    try:
        server.wait_ready()
        yield server, local
    finally:
        server.stop()


def _clients(server):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    return {
        "http": (http, http.InferenceServerClient(server.http, network_timeout=30)),
        "grpc": (grpc, grpc.InferenceServerClient(server.grpc)),
    }


def _infer(server, protocol, model, feeds, outputs):
    """The served model's outputs for ``feeds``; a server that stopped answering fails the test
    with what its log says, within the client's timeout."""
    module, client = _clients(server)[protocol]
    inputs = []
    for name, value in feeds.items():
        kind = "BOOL" if value.dtype == np.bool_ else "FP32"
        inputs.append(module.InferInput(name, list(value.shape), kind))
        inputs[-1].set_data_from_numpy(value)
    try:
        timeout = {"client_timeout": 30} if protocol == "grpc" else {}
        result = client.infer(model, inputs, **timeout)
    except Exception as exc:
        if server.process.poll() is not None or "connect" in str(exc).lower():
            pytest.fail(
                f"the Triton server stopped answering ({exc}); its log ends: {server.log_tail()}"
            )
        raise
    return {name: result.as_numpy(name) for name in outputs}


def _padded(batch, length):
    mask = np.zeros((batch, length), bool)
    mask[1:, length - 3 :] = True  # trailing padding but in the first sequence
    return mask


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["mha", "encoder"])
def test_served_attention_and_blocks_equal_local_onnx_runtime(served, protocol, model):
    server, local = served
    rng = np.random.default_rng(0)
    first = "query" if model == "mha" else "src"
    mask = "key_padding_mask" if model == "mha" else "src_key_padding_mask"
    output = "attn_output" if model == "mha" else "output"
    for batch, length in ((1, 5), (3, 11)):
        feeds = {
            first: rng.standard_normal((batch, length, 32)).astype(np.float32),
            mask: _padded(batch, length),
        }
        got = _infer(server, protocol, model, feeds, [output])[output]
        want = local[model].run(feeds)[output]
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_kv_cache_graph_served_one_step_per_request(served, protocol):
    """The client carries the cache: each request sends past_key/past_value and gets present_*."""
    server, local = served
    rng = np.random.default_rng(1)
    past = np.zeros((2, 4, 0, 8), np.float32)
    cache = {"past_key": past, "past_value": past}
    local_cache = dict(cache)
    names = ["attn_output", "present_key", "present_value"]
    for length in (6, 1, 1, 1):  # a prompt, then a token a step
        query = rng.standard_normal((2, length, 32)).astype(np.float32)
        got = _infer(server, protocol, "decoder_kv", {"query": query, **cache}, names)
        want = local["decoder_kv"].run({"query": query, **local_cache})
        for name in names:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE * 10)
        cache = {"past_key": got["present_key"], "past_value": got["present_value"]}
        local_cache = {"past_key": want["present_key"], "past_value": want["present_value"]}
    assert cache["past_key"].shape == (2, 4, 9, 8)


def test_a_request_that_does_not_fit_gets_our_message_and_the_model_keeps_serving(served):
    server, local = served
    import tritonclient.http as http

    query = np.zeros((2, 7, 32), np.float32)
    with pytest.raises(Exception) as error:
        _infer(
            server, "http", "mha", {"query": query, "key_padding_mask": np.zeros((2, 6), bool)}, []
        )
    assert "input 'key_padding_mask' has tgt_len=6 on axis 1, but 'query' gave tgt_len=7" in str(
        error.value
    )
    assert isinstance(error.value, http.InferenceServerException)
    feeds = {"query": query, "key_padding_mask": np.zeros((2, 7), bool)}
    got = _infer(server, "http", "mha", feeds, ["attn_output"])["attn_output"]
    np.testing.assert_allclose(got, local["mha"].run(feeds)["attn_output"], atol=TOLERANCE)


def test_the_onnxruntime_backend_repository_loads_as_far_as_this_server_can(tmp_path):
    """PyTriton's server has no onnxruntime backend: the model's config must be accepted and only
    the backend found missing, so that a config error cannot hide behind it."""
    pytest.importorskip("tritonclient.http", reason="needs tritonclient (pip install -e '.[test]')")
    with artifacts.compile(SPECS["mha"], target="ort-cpu", check=False) as artifact:
        artifact.save(tmp_path / "mha", triton_repo=tmp_path / "models", triton_model_name="mha")
    server = Server(tmp_path / "models", tmp_path, "--exit-on-error=false")
    try:
        deadline = time.monotonic() + 60
        log = ""
        while time.monotonic() < deadline and "backend" not in log:
            time.sleep(0.5)
            log = server.log.read_text(errors="replace")
            if "unable to find backend library" in log or server.process.poll() is not None:
                break
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    if "unable to find backend library for backend 'onnxruntime'" not in log:
        assert "onnxruntime" in log, server.log_tail()  # a server with the backend: it loaded
        assert "successfully loaded 'mha'" in log, server.log_tail()
    # a config Triton refuses says so in an "Invalid argument" or "failed to parse" line of its own
    refusals = [
        line
        for line in log.splitlines()
        if ("Invalid argument" in line or "failed to parse" in line)
        and "unable to find backend library" not in line
    ]
    assert not refusals, refusals


def test_a_server_killed_mid_test_fails_the_test_with_its_log(served, tmp_path):
    """A second server, killed; the next request fails the test at once, naming the stop."""
    server, _ = served
    models = server.log.parent / "models"
    other = Server(models, tmp_path)
    try:
        other.wait_ready()
        other.process.kill()
        other.process.wait()
        feeds = {
            "query": np.zeros((1, 3, 32), np.float32),
            "key_padding_mask": np.zeros((1, 3), bool),
        }
        started = time.monotonic()
        with pytest.raises(pytest.fail.Exception, match="the Triton server stopped answering"):
            _infer(other, "http", "mha", feeds, ["attn_output"])
        assert time.monotonic() - started < 30
    finally:
        other.stop()


def test_the_load_test_checks_every_response(served, tmp_path, capsys):
    """scripts/triton_load.py against the served model: every request answered and right, and the
    server's statistics read before and after."""
    import triton_load

    server, _ = served
    onnx_path = server.log.parent / "mha" / "model.onnx"
    out = tmp_path / "load.json"
    argv = ["--url", server.http, "--model", "mha", "--onnx", onnx_path, "--json", out]
    status = triton_load.main([str(a) for a in argv + ["--clients", "3", "--requests", "6"]])
    result = json.loads(out.read_text())
    assert status == 0 and result["answered"] == 18 and result["lost"] == result["wrong"] == 0, (
        result
    )
    assert result["server_requests"] == 18 and result["server_executions"] <= 18, result
    assert result["p99_ms"] >= result["p50_ms"] > 0


def _load(server, tmp_path, model: str, flags: str) -> tuple[int, dict]:
    """scripts/triton_load.py against ``model``, with ``flags``: its exit status and summary."""
    import triton_load

    onnx_path = server.log.parent / model / "model.onnx"
    out = tmp_path / "load.json"
    argv = ["--url", server.http, "--model", model, "--onnx", onnx_path, "--json", out]
    status = triton_load.main([str(a) for a in argv + ["--lengths", "8", "16", *flags.split()]])
    return status, json.loads(out.read_text())


def test_a_graph_for_two_rows_answers_64_concurrent_clients_and_the_server_stays_up(
    served, tmp_path
):
    """Compiled with --max-batch 2, served under a config whose batcher joins up to 8 rows: 64
    clients x 5 batch-1 requests are all answered exactly (the server crashed on a shared error
    object, then refused 316 of 320 as 'batch=8, more than the 2'), and the server is up after."""
    server, _ = served
    status, result = _load(server, tmp_path, "mha_b2", "--clients 64 --requests 5 --batches 1")
    assert (status, result["answered"], result["lost"], result["wrong"]) == (0, 320, 0, 0), result
    assert result["merged_requests"] > 0  # the batcher did join requests
    assert server.process.poll() is None
    assert urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=5).status == 200


def _post(server, model, body: bytes, headers=None):
    request = urllib.request.Request(
        f"http://{server.http}/v2/models/{model}/infer", data=body, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_request_declaring_an_enormous_shape_is_refused_and_the_server_stays_up(served):
    """One JSON request declaring query [1, 1000000000, 32] with 160 values took PyTriton's
    tritonserver 2.51 down (std::bad_alloc) with every model; over HTTP it is refused by the
    server's --http-max-input-size or, where the server lacks it, by triton_guard, and over gRPC by
    Triton's own byte check. Valid JSON requests are answered as before."""
    import tritonclient.grpc as grpc

    server, local = served
    huge = {
        "inputs": [
            {"name": "query", "datatype": "FP32", "shape": [1, 10**9, 32], "data": [0.0] * 160},
            {"name": "key_padding_mask", "datatype": "BOOL", "shape": [1, 5], "data": [False] * 5},
        ]
    }
    status, answer = _post(server, "mha", json.dumps(huge).encode())
    assert status == 400 and "128000000000 bytes" in answer["error"], answer
    for shape in ([1, 10**9, 32], [-1, 5, 32]):
        inputs = [
            grpc.InferInput("query", shape, "FP32"),
            grpc.InferInput("key_padding_mask", [1, 5], "BOOL"),
        ]
        inputs[0]._raw_content = np.zeros(160, np.float32).tobytes()
        inputs[1].set_data_from_numpy(np.zeros((1, 5), bool))
        with pytest.raises(Exception, match="(?i)byte size|shape|negative|invalid"):
            grpc.InferenceServerClient(server.grpc).infer("mha", inputs, client_timeout=30)
    rng = np.random.default_rng(3)
    query = rng.standard_normal((1, 5, 32)).astype(np.float32)
    valid = {
        "inputs": [
            {
                "name": "query",
                "datatype": "FP32",
                "shape": [1, 5, 32],
                "data": query.ravel().tolist(),
            },
            {"name": "key_padding_mask", "datatype": "BOOL", "shape": [1, 5], "data": [False] * 5},
        ]
    }
    status, answer = _post(server, "mha", json.dumps(valid).encode())
    assert status == 200, answer
    got = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(1, 5, 32)
    want = local["mha"].run({"query": query, "key_padding_mask": np.zeros((1, 5), bool)})
    np.testing.assert_allclose(got, want["attn_output"], rtol=0, atol=1e-5)
    assert server.process.poll() is None
    assert urllib.request.urlopen(f"http://{server.http}/v2/health/ready", timeout=5).status == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [({"Transfer-Encoding": "chunked"}, 411), ({"Content-Encoding": "gzip"}, 415)],
)
def test_the_guard_refuses_bodies_whose_size_it_cannot_see(served, headers, status):
    from triton_guard import GuardServer

    server, _ = served
    if server.served.guard is None:
        pytest.skip("this tritonserver bounds its inputs itself (--http-max-input-size)")
    assert isinstance(server.served.guard, GuardServer)
    connection = http.client.HTTPConnection(server.http, timeout=30)
    connection.putrequest("POST", "/v2/models/mha/infer")
    for key, value in headers.items():
        connection.putheader(key, value)
    connection.putheader("Content-Length", "2")
    connection.endheaders(b"{}")
    response = connection.getresponse()
    assert response.status == status and "refused by triton_guard" in response.read().decode()


def test_the_hostile_load_mode_leaves_the_server_up_and_every_valid_request_answered(
    served, tmp_path
):
    """scripts/triton_load.py --hostile: a hostile request (wrong dtype or shape, oversize batch,
    an enormous or negative declared shape, a garbage body, a dropped connection) before each
    valid one, from 16 clients: every hostile one refused, every valid one answered exactly, the
    server up at the end."""
    server, _ = served
    flags = "--clients 16 --requests 4 --batches 1 2 --hostile 1"
    status, result = _load(server, tmp_path, "mha_b2", flags)
    assert (status, result["answered"], result["lost"], result["wrong"]) == (0, 64, 0, 0), result
    assert result["server_up"] and result["hostile_answered"] == 0
    from triton_hostile import KINDS

    assert set(result["hostile"]) == set(KINDS)
    refusable = [k for k in KINDS if k != "dropped_connection"]
    assert all(result["hostile"][k]["refused"] == result["hostile"][k]["sent"] for k in refusable)
    assert server.process.poll() is None
