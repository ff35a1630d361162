"""The library call: artifacts.compile from what a user has (a live torch module, a spec, an ONNX
graph) to a checked Artifact, and Artifact.save. Tolerances: fp32 graphs against float64
references, 1e-5 relative (runtime.check.FP32_TOLERANCE)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import artifacts
from graphs import AttentionSpec, SpecError
from graphs.blocks import BlockSpec, block_spec_from_module
from runtime.ort import OrtSession


def test_a_live_module_compiles_checks_and_saves(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    artifact = artifacts.compile(
        module, target="ort-cpu", self_attention=True, key_padding_mask="bool"
    )
    assert artifact.check["passed"] and artifact.check["worst_rel_error"] < 1e-5
    assert artifact.manifest["attention_form"].startswith("com.microsoft.")
    written = artifact.save(tmp_path / "mha", report=True)
    artifact.close()
    assert not artifact.folder.exists()
    on_disk = json.loads((tmp_path / "mha" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(written))
    assert sorted(p.name for p in (tmp_path / "mha").iterdir()) == [
        "manifest.json",
        "model.onnx",
        "report.html",
    ]
    # the saved graph computes what the module computes, with the module's own weights
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    want = module(x, x, x, key_padding_mask=pad, need_weights=False)[0].detach().numpy()
    got = OrtSession(tmp_path / "mha" / "model.onnx").run(
        {"query": x.numpy(), "key_padding_mask": pad.numpy()}
    )["attn_output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_encoder_layer_compiles_with_its_own_options():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        32, 4, dim_feedforward=64, activation="gelu", batch_first=True, norm_first=True
    ).eval()
    spec = block_spec_from_module(layer, key_padding_mask="bool")
    assert (spec.block, spec.dim_feedforward, spec.activation, spec.norm_first) == (
        "encoder",
        64,
        "gelu",
        True,
    )
    with artifacts.compile(layer, target="ort-cpu", key_padding_mask="bool") as artifact:
        assert artifact.check["passed"]
        assert artifact.manifest["spec"] == spec.to_dict()


def test_a_layer_with_an_activation_the_blocks_lack_is_refused():
    layer = torch.nn.TransformerEncoderLayer(
        16, 2, activation=torch.nn.GELU(approximate="tanh"), batch_first=True
    )
    with pytest.raises(SpecError, match="blocks take relu or gelu"):
        artifacts.compile(layer)


def test_a_spec_with_a_weights_file_or_random_weights(tmp_path):
    spec = BlockSpec("decoder", 16, 2, dim_feedforward=32, batch_first=True, is_causal=True)
    with artifacts.compile(spec, seed=3, target="onnx-attention") as artifact:
        assert artifact.check["passed"]
        assert artifact.manifest["weights"] == {"kind": "random", "seed": 3}
        assert artifact.manifest["options"]["target"] == "onnx-attention"
    with pytest.raises(SpecError, match="a spec holds its options"):
        artifacts.compile(AttentionSpec(16, 2), self_attention=True)


def test_an_onnx_graph_compiles_as_it_is(tmp_path):
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    path = tmp_path / "encoder.onnx"
    x = torch.randn(2, 8, 32)
    torch.onnx.export(
        layer,
        (x,),
        path,
        dynamo=True,
        dynamic_shapes=({0: "batch", 1: "seq"},),
    )
    with artifacts.compile(path, target="ort-cpu", latency=True) as artifact:
        assert artifact.check["passed"]
        assert [f["fused"] for f in artifact.manifest["fusion"]] == [True]
        assert artifact.manifest["latency"]["after"]["p50_s"] > 0
        out = tmp_path / "out"
        artifact.save(out)
    with pytest.raises(SpecError, match="compiled as it is"):
        artifacts.compile(onnx.load(path), weights=str(path))


def test_a_failed_check_raises_and_leaves_no_working_folder(tmp_path, monkeypatch):
    import artifacts.pipeline

    monkeypatch.setattr(artifacts.pipeline, "FP32_TOLERANCE", 0.0)  # any rounding fails
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    with pytest.raises(artifacts.CheckFailed, match="check failed"):
        artifacts.compile(AttentionSpec(16, 2, self_attention=True), seed=1)
    assert not list(tmp_path.glob("attention-compiler-*"))


def test_save_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    from artifacts.output_folders import OutputRefused

    with artifacts.compile(AttentionSpec(16, 2), check=False, engine_cache=tmp_path) as artifact:
        with pytest.raises(OutputRefused, match="not written by compile.py"):
            artifact.save(tmp_path / "mine", force=True)
        written = artifact.save(tmp_path / "ours")  # a path among the options: JSON all the same
    assert written["options"]["engine_cache"] == str(tmp_path)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
