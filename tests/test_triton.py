"""compile.py --triton-repo: a Triton model repository whose config.pbtxt parses with the model_config
protobuf tritonclient ships and names the graph's inputs and outputs, dtypes and dynamic dims."""

from __future__ import annotations

import json

import pytest
from conftest import parse_triton_config


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
