"""compile.py --triton-repo: a Triton model repository whose config.pbtxt parses with the model_config
protobuf tritonclient ships and names the graph's inputs and outputs, dtypes and dynamic dims."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import parse_triton_config

from runtime.ort import OrtSession


def _parse(path):
    """config.pbtxt through tritonclient's protobuf; the test skips where tritonclient is missing."""
    return parse_triton_config(path.read_text())


def _tensors(entries):
    from tritonclient.grpc import model_config_pb2

    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in entries]


def _repository(run_cli, tmp_path, *flags):
    """compile.py with ``flags`` into tmp_path/out and the repository tmp_path/repo: its result, and
    the config of the model named by --triton-model-name (default attention)."""
    result = run_cli(
        "compile.py", *flags, "--out", tmp_path / "out", "--triton-repo", tmp_path / "repo"
    )
    assert result.returncode == 0, result.stderr
    name = (
        flags[flags.index("--triton-model-name") + 1]
        if "--triton-model-name" in flags
        else "attention"
    )
    return result, _parse(tmp_path / "repo" / name / "config.pbtxt")


def test_batch_first_attention_gets_dynamic_batching(run_cli, tmp_path):
    out, repo = tmp_path / "out", tmp_path / "repo"
    _, config = _repository(
        run_cli,
        tmp_path,
        *"--embed-dim 32 --num-heads 4 --batch-first --self-attention".split(),
        *"--key-padding-mask bool --target ort-cpu".split(),
        *"--triton-model-name mha --triton-max-batch 16".split(),
    )
    assert (config.name, config.platform, config.max_batch_size) == ("mha", "onnxruntime_onnx", 16)
    assert config.HasField("dynamic_batching")
    assert _tensors(config.input) == [
        ("query", "TYPE_FP32", [-1, 32]),
        ("key_padding_mask", "TYPE_BOOL", [-1]),
    ]
    assert _tensors(config.output) == [("attn_output", "TYPE_FP32", [-1, 32])]
    assert (repo / "mha" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["triton"]["dynamic_batching"] and manifest["triton"]["repo"] == str(repo)


def test_unbatched_inputs_list_every_dim_without_batching(run_cli, tmp_path):
    flags = "--embed-dim 16 --num-heads 2 --attn-mask float --need-weights".split()
    result, config = _repository(run_cli, tmp_path, *flags)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert _tensors(config.input) == [
        ("query", "TYPE_FP32", [-1, -1, 16]),
        ("key", "TYPE_FP32", [-1, -1, 16]),
        ("value", "TYPE_FP32", [-1, -1, 16]),
        ("attn_mask", "TYPE_FP32", [-1, -1]),
    ]
    assert _tensors(config.output) == [
        ("attn_output", "TYPE_FP32", [-1, -1, 16]),
        ("attn_output_weights", "TYPE_FP32", [-1, -1, -1]),
    ]
    assert "query, key, value, attn_mask, attn_output have no leading batch axis" in result.stdout


def test_encoder_block_repository(run_cli, tmp_path):
    _, config = _repository(
        run_cli,
        tmp_path,
        *"--block encoder --embed-dim 16 --num-heads 2 --dim-feedforward".split(),
        *"32 --batch-first --key-padding-mask bool --precision fp16".split(),
        *"--target ort-cuda".split(),
    )
    assert _tensors(config.input) == [
        ("src", "TYPE_FP32", [-1, 16]),
        ("src_key_padding_mask", "TYPE_BOOL", [-1]),
    ]
    assert _tensors(config.output) == [
        ("output", "TYPE_FP32", [-1, 16])
    ]  # fp16 inside, float32 at the edges


def test_a_repository_keeps_its_other_models_and_force_replaces_only_ours(tmp_path, capsys):
    """Only REPO/NAME is this run's; another model beside it stays, and a NAME folder that compile.py
    did not write is refused even with --force, before any work."""

    import compile as compile_script

    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    args = ["--embed-dim", "8", "--num-heads", "2", "--quiet", "--triton-repo", str(repo)]
    assert compile_script.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["attention", "other"]
    assert _parse(repo / "attention" / "config.pbtxt").name == "attention"
    assert compile_script.main([*args, "--out", str(tmp_path / "b"), "--seed", "1"]) == 2
    assert "--triton-repo folder" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert compile_script.main([*args, "--out", str(tmp_path / "b"), "--seed", "1", "--force"]) == 0
    assert (repo / "attention" / "1" / "model.onnx").read_bytes() == (
        tmp_path / "b" / "model.onnx"
    ).read_bytes()
    assert (
        compile_script.main(
            [*args, "--triton-model-name", "other", "--out", str(tmp_path / "c"), "--force"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "--triton-repo folder" in err
        and "was not written by compile.py (its config.pbtxt was not written" in err
    )
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n' and not (
        tmp_path / "c"
    ).exists()


def test_the_python_backend_repository_has_the_same_signature_and_model_py(run_cli, tmp_path):
    flags = "--embed-dim 16 --num-heads 2 --batch-first --self-attention".split()
    flags += "--key-padding-mask bool --triton-backend python".split()
    _, config = _repository(run_cli, tmp_path, *flags)
    assert (config.backend, config.platform, config.max_batch_size) == ("python", "", 8)
    assert config.HasField("dynamic_batching")
    assert _tensors(config.input) == [
        ("query", "TYPE_FP32", [-1, 16]),
        ("key_padding_mask", "TYPE_BOOL", [-1]),
    ]
    version = tmp_path / "repo" / "attention" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py"]
    assert (version / "model.onnx").read_bytes() == (tmp_path / "out" / "model.onnx").read_bytes()
    assert "class TritonPythonModel" in (version / "model.py").read_text()
    again = run_cli(
        "compile.py",
        *flags,
        "--out",
        tmp_path / "out",
        "--triton-repo",
        tmp_path / "repo",
        "--force",
    )
    assert again.returncode == 0, again.stderr  # --force knows the folder, model.py and all


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--triton-backend python", "--triton-backend chooses the backend of the --triton-repo"),
        (
            "--triton-backend python --triton-repo R --target tensorrt",
            "--triton-backend python serves model.onnx through ONNX Runtime",
        ),
    ],
)
def test_triton_backend_flags_that_cannot_apply_are_refused(run_cli, tmp_path, flags, message):
    result = run_cli(
        "compile.py",
        *"--embed-dim 16 --num-heads 2".split(),
        *flags.split(),
        "--out",
        tmp_path / "o",
    )
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_load_test_refuses_in_one_line_without_a_server_or_with_a_folder_for_json(
    tmp_path, capsys
):
    import socket

    import triton_load

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")  # only its presence is checked before the server is asked
    with pytest.raises(SystemExit) as exit_:
        triton_load.main(["--model", "m", "--onnx", str(onnx_path), "--json", str(tmp_path)])
    assert (
        exit_.value.code == 2 and "is a folder or a device, not a file" in capsys.readouterr().err
    )
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status = triton_load.main(
        ["--url", f"127.0.0.1:{port}", "--model", "m", "--onnx", str(onnx_path)]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "no model 'm' answers at" in err


class _FakeBackendUtils:
    """The names model.py takes from triton_python_backend_utils, recording what it answers."""

    class TritonError:
        def __init__(self, message: str) -> None:
            self.message = message

    class Tensor:
        def __init__(self, name, value) -> None:
            self.name, self.value = name, value

        def as_numpy(self):
            return self.value

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None) -> None:
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return _FakeBackendUtils.Tensor(name, request[name]) if name in request else None


def _python_model(monkeypatch, tmp_path, max_batch_size, fail=False):
    """model.py over a graph compiled with --max-batch 2, under a config that says
    ``max_batch_size``; ``fail``: every ONNX Runtime call raises. Returns the model and the batch
    of every call it made."""
    import importlib
    import json
    import sys

    from attention_compiler import artifacts
    from graphs import AttentionSpec

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeBackendUtils)
    module = importlib.reload(
        importlib.import_module("attention_compiler.artifacts.triton_python_model")
    )
    spec = AttentionSpec(8, 2, batch_first=True, self_attention=True)
    with artifacts.compile(spec, target="ort-cpu", check=False, max_batch=2) as artifact:
        artifact.save(tmp_path / "out")
    version = tmp_path / "out"
    config = {"max_batch_size": max_batch_size, "output": [{"name": "attn_output"}]}
    model = module.TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": str(version), "model_version": ""}
    )
    calls, run = [], model.session.run

    def recorded(feeds):
        calls.append(feeds["query"].shape[0])
        if fail:
            raise RuntimeError("out of memory\nsecond line")
        return run(feeds)

    model.session.run = recorded
    return model, calls


def test_the_python_model_splits_joined_requests_at_the_graphs_largest_batch(monkeypatch, tmp_path):
    """The dynamic batcher hands over more rows than the graph takes (a config that says 8 for a
    graph compiled with --max-batch 2): every request is answered with its own rows, in calls of
    at most 2 rows, none refused."""
    model, calls = _python_model(monkeypatch, tmp_path, max_batch_size=8)
    rng = np.random.default_rng(0)
    requests = [{"query": rng.standard_normal((1, 5, 8)).astype(np.float32)} for _ in range(5)]
    responses = model.execute(requests)
    assert calls == [2, 2, 1]
    for request, response in zip(requests, responses):
        assert response.error is None
        want = OrtSession(tmp_path / "out" / "model.onnx").run(request)["attn_output"]
        np.testing.assert_allclose(response.output_tensors[0].value, want, rtol=0, atol=1e-6)


def test_each_failed_response_carries_an_error_of_its_own(monkeypatch, tmp_path):
    """One TritonError shared by the responses of a failed call crashed the server; each response
    gets its own, with the first line of ONNX Runtime's message."""
    model, _ = _python_model(monkeypatch, tmp_path, max_batch_size=2, fail=True)
    requests = [{"query": np.zeros((1, 3, 8), np.float32)} for _ in range(4)]
    responses = model.execute(requests)
    errors = [r.error for r in responses]
    assert len({id(e) for e in errors}) == 4
    assert all(e.message == "ONNX Runtime failed: out of memory" for e in errors)


def test_max_batch_size_never_passes_the_graphs_max_batch_and_says_so(run_cli, tmp_path):
    flags = "--embed-dim 16 --num-heads 2 --batch-first --self-attention --max-batch 2".split()
    result, config = _repository(run_cli, tmp_path, *flags, "--triton-backend", "python")
    assert config.max_batch_size == 2 and config.HasField("dynamic_batching")
    assert "max_batch_size capped from --triton-max-batch 8 to the graph's largest batch" in (
        result.stdout
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["triton"]["max_batch_size"] == 2 and "capped" in manifest["triton"]["note"]


def _identity_graph(names, elem_type=None, out_names=None):
    """An ONNX graph of Identity nodes from inputs ``names`` (batch, 3) to ``out_names``."""
    import onnx
    from onnx import TensorProto, helper

    elem_type = elem_type or TensorProto.FLOAT
    out_names = out_names or [f"{n}_out" for n in names]
    graph = helper.make_graph(
        [helper.make_node("Identity", [i], [o]) for i, o in zip(names, out_names)],
        "identity",
        [helper.make_tensor_value_info(n, elem_type, ["batch", 3]) for n in names],
        [helper.make_tensor_value_info(n, elem_type, ["batch", 3]) for n in out_names],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])  # float8: 19
    onnx.checker.check_model(model)
    return model


INJECTING = (
    'q"\n}\nparameters: { key: "EXECUTION_ENV_PATH" value: { string_value: "/tmp/evil" } }\n'
    'input [{ name: "z'
)


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_tensor_names_are_escaped_into_config_pbtxt(tmp_path, backend):
    """An --onnx graph's names with quotes, newlines, braces, backslashes and non-ASCII are read
    back as exactly those names, and inject nothing (they were written raw: a name could add the
    python backend's EXECUTION_ENV_PATH)."""
    from attention_compiler import artifacts

    names, outputs = [INJECTING, "plain"], ["é{}..\\", "tab\there\r"]
    with artifacts.compile(_identity_graph(names, out_names=outputs), check=False) as artifact:
        artifact.save(tmp_path / "out", triton_repo=tmp_path / "repo", triton_backend=backend)
    config = _parse(tmp_path / "repo" / "attention" / "config.pbtxt")
    assert [t.name for t in config.input] == names
    assert [t.name for t in config.output] == outputs
    assert not config.parameters and config.name == "attention"


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "", "x" * 201, 'a"\nb', "é"])
def test_a_model_name_is_one_folder_name_triton_serves(run_cli, tmp_path, name):
    """'--triton-model-name ..' wrote config.pbtxt and 1/ into the repository's parent, and the
    library took absolute paths and names that climb out: one rule for both, before any work."""
    repo = tmp_path / "W" / "p" / "models"
    flags = ["--embed-dim", "8", "--num-heads", "2", "--out", tmp_path / "out"]
    result = run_cli("compile.py", *flags, "--triton-repo", repo, "--triton-model-name", name)
    assert result.returncode == 2, result.stderr
    assert "is not a model name Triton serves" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "W").exists()


@pytest.mark.parametrize("name", ["..", "../../x", "/tmp/elsewhere", 'a"\nb', "a/b", 7])
def test_the_library_applies_the_same_model_name_rule(tmp_path, name):
    from attention_compiler import artifacts
    from attention_compiler.artifacts.output_folders import OutputRefused
    from graphs import AttentionSpec

    with artifacts.compile(AttentionSpec(8, 2), target="portable", check=False) as artifact:
        with pytest.raises(OutputRefused, match="is not a model name Triton serves"):
            artifact.save(tmp_path / "out", triton_repo=tmp_path / "repo", triton_model_name=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_type_triton_has_is_mapped_and_the_rest_refused_in_one_line(run_cli, tmp_path):
    """int8, uint16, uint64, string and bfloat16 inputs were a KeyError (exit 3)."""
    import onnx
    from onnx import TensorProto

    expected = {
        TensorProto.INT8: "TYPE_INT8",
        TensorProto.INT16: "TYPE_INT16",
        TensorProto.UINT8: "TYPE_UINT8",
        TensorProto.UINT16: "TYPE_UINT16",
        TensorProto.UINT32: "TYPE_UINT32",
        TensorProto.UINT64: "TYPE_UINT64",
        TensorProto.STRING: "TYPE_STRING",
        TensorProto.BFLOAT16: "TYPE_BF16",
    }
    for elem_type, triton in expected.items():
        path = tmp_path / f"{elem_type}.onnx"
        onnx.save(_identity_graph(["x"], elem_type), path)
        out, repo = tmp_path / f"o{elem_type}", tmp_path / f"r{elem_type}"
        result = run_cli("compile.py", "--onnx", path, "--out", out, "--triton-repo", repo)
        assert result.returncode == 0, result.stderr
        config = _parse(repo / "attention" / "config.pbtxt")
        assert _tensors(config.input) == [("x", triton, [3])]
    onnx.save(_identity_graph(["x"], TensorProto.FLOAT8E4M3FN), tmp_path / "f8.onnx")
    onnx.save(_identity_graph(["x"], TensorProto.BFLOAT16), tmp_path / "bf16.onnx")
    for path, backend, message in (
        ("f8.onnx", "onnxruntime", "tensor 'x' is float8e4m3fn, a type Triton's model"),
        ("bf16.onnx", "python", "tensor 'x' is bfloat16, which the python backend's model.py"),
    ):
        flags = [
            "--onnx",
            tmp_path / path,
            "--out",
            tmp_path / "f",
            "--triton-repo",
            tmp_path / "r",
        ]
        result = run_cli("compile.py", *flags, "--triton-backend", backend)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
        assert not (tmp_path / "f").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            "--triton-max-batch 100000000000000000000",
            "--triton-max-batch must be a whole number from 0 to 2147483647",
        ),
        ("--triton-max-batch -1", "--triton-max-batch must be a whole number from 0 to 2147483647"),
        ("--memory-limit 1e400 --max-len 8", "--memory-limit"),
    ],
)
def test_out_of_range_numbers_are_one_line(run_cli, tmp_path, flags, message):
    """A max_batch_size past int32 was written into a config Triton refuses (exit 0);
    --memory-limit 1e400 was a traceback."""
    result = run_cli(
        "compile.py",
        *"--embed-dim 8 --num-heads 2".split(),
        *flags.split(),
        "--out",
        tmp_path / "o",
        "--triton-repo",
        tmp_path / "r",
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_force_takes_the_bytecode_triton_leaves_beside_model_py_and_nothing_else(run_cli, tmp_path):
    """Triton's python stub imports model.py and leaves 1/__pycache__: --force could never replace
    a served python-backend model. Bytecode of model.py is ours; anything else there is not."""
    flags = ["--embed-dim", "8", "--num-heads", "2", "--triton-backend", "python"]
    run = lambda *extra: run_cli(  # noqa: E731
        "compile.py", *flags, "--out", tmp_path / "o", "--triton-repo", tmp_path / "r", *extra
    )
    assert run().returncode == 0
    cache = tmp_path / "r" / "attention" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"\0")
    assert run("--force").returncode == 0 and not cache.exists()
    cache.mkdir()
    (cache / "notes.txt").write_text("mine")
    refused = run("--force")
    assert refused.returncode == 2 and "1/__pycache__" in refused.stderr
    assert (cache / "notes.txt").read_text() == "mine"
