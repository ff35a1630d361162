"""attention-compile (scripts/compile.py) end to end: its command line in this process (conftest.run_script), and the
README's command in a fresh interpreter, exactly as a user runs it."""

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import run_fresh
from safetensors.torch import save_file

from graphs import AttentionSpec, AttentionWeights
from runtime.check import random_inputs
from runtime.ort import OrtSession
from runtime.torch_reference import torch_forward


def test_the_readme_command_writes_a_checked_model(tmp_path):
    out = tmp_path / "mha"
    result = run_fresh(
        "compile.py",
        *"--embed-dim 512 --num-heads 8 --batch-first --self-attention".split(),
        *"--key-padding-mask bool --check --out".split(),
        out,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "PASS: worst relative error" in result.stdout
        and f"wrote {out / 'model.onnx'}" in result.stdout
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    data = (out / "model.onnx").read_bytes()
    assert manifest["files"]["model.onnx"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["target"] == "portable" and manifest["precision"] == "fp32"
    assert manifest["inputs"] == [
        {"name": "query", "dtype": "float32", "shape": ["batch", "tgt_len", 512]},
        {"name": "key_padding_mask", "dtype": "bool", "shape": ["batch", "tgt_len"]},
    ]
    assert manifest["check"]["passed"] and manifest["check"]["worst_rel_error"] <= 1e-5
    assert {c["reference"] for c in manifest["check"]["comparisons"]} == {"numpy", "torch"}
    assert {"onnx", "onnxruntime", "numpy", "python"} <= set(manifest["tools"])
    onnx.checker.check_model(onnx.load(out / "model.onnx"), full_check=True)


def test_trained_weights_from_safetensors_match_the_module(run_cli, tmp_path):
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(24, 3, kdim=10, vdim=14, add_bias_kv=True).eval()
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    save_file(
        {k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    out = tmp_path / "out"
    result = run_cli(
        "compile.py",
        *"--embed-dim 24 --num-heads 3 --kdim 10 --vdim 14 --add-bias-kv".split(),
        *"--attn-mask bool --need-weights --weights".split(),
        tmp_path / "w.safetensors",
        "--check",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    spec = AttentionSpec(
        24, 3, kdim=10, vdim=14, add_bias_kv=True, attn_mask="bool", need_weights=True
    )
    feeds = random_inputs(spec, (2, 6, 9), np.random.default_rng(3))
    got = OrtSession(str(out / "model.onnx")).run(feeds)
    want = torch_forward(spec, module.double(), feeds)
    keep = ~np.isnan(want["attn_output"]).any(axis=-1)
    np.testing.assert_allclose(
        got["attn_output"][keep],
        want["attn_output"][keep],
        rtol=0,
        atol=1e-5 * np.abs(want["attn_output"][keep]).max(),
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--embed-dim", 10, "--num-heads", 4],
            "compile.py: error: embed_dim (10) must be divisible by num_heads (4)",
        ),
        (
            ["--embed-dim", 8, "--num-heads", 2, "--target", "tensorrt", "--form", "flash"],
            "target 'tensorrt' has no form 'flash'; choose one of matmul-softmax, attention-op",
        ),
        (
            ["--embed-dim", 8, "--num-heads", 2, "--precision", "fp8"],
            "argument --precision: invalid choice: 'fp8'",
        ),
        (
            ["--embed-dim", 8, "--num-heads", 2, "--attn-mask", "int"],
            "argument --attn-mask: invalid choice: 'int'",
        ),
        (
            ["--embed-dim", 8, "--num-heads", 2, "--weights", "missing.safetensors"],
            "weights file 'missing.safetensors' does not exist",
        ),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(run_cli, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("compile.py", *args, "--out", out)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_wrong_weights_leave_no_folder(run_cli, tmp_path):
    np.savez(
        tmp_path / "w.npz",
        **{k: v for k, v in AttentionWeights.random(AttentionSpec(8, 2)).tensors.items()},
    )
    result = run_cli(
        "compile.py",
        *"--embed-dim 8 --num-heads 2 --kdim 4 --weights".split(),
        tmp_path / "w.npz",
        "--out",
        tmp_path / "out",
    )
    assert result.returncode == 2
    assert (
        "weights are missing keys 'q_proj_weight', 'k_proj_weight', 'v_proj_weight'"
        in result.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


def test_existing_output_is_refused_then_replaced_with_force(run_cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    result = run_cli("compile.py", "--embed-dim", 8, "--num-heads", 2, "--out", out)
    assert (
        result.returncode == 2 and "already exists and is not empty; pass --force" in result.stderr
    )
    assert (out / "old.txt").read_text() == "keep me"
    result = run_cli("compile.py", *"--embed-dim 8 --num-heads 2 --out".split(), out, "--force")
    assert (
        result.returncode == 2
        and "was not written by compile.py (it has no readable manifest.json)" in result.stderr
    )
    assert (out / "old.txt").read_text() == "keep me"
    (out / "old.txt").unlink()
    assert run_cli("compile.py", "--embed-dim", 8, "--num-heads", 2, "--out", out).returncode == 0
    result = run_cli(
        "compile.py", *"--embed-dim 8 --num-heads 2 --seed 3 --out".split(), out, "--force"
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert json.loads((out / "manifest.json").read_text())["weights"] == {
        "kind": "random",
        "seed": 3,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folders left
