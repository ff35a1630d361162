"""The library call: ac.compile from what a user has (a live torch module, a spec, an ONNX
graph) to a checked Artifact, and Artifact.save. Tolerances: fp32 graphs against float64
references, 1e-5 relative (runtime.check.FP32_TOLERANCE)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import attention_compiler as ac
from graphs import AttentionSpec, AttentionWeights, SpecError, spec_from_module
from graphs.blocks import BlockSpec, block_spec_from_module
from runtime.ort import OrtSession


def test_a_live_module_compiles_checks_and_saves(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    artifact = ac.compile(module, target="ort-cpu", self_attention=True, key_padding_mask="bool")
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
    with ac.compile(layer, target="ort-cpu", key_padding_mask="bool") as artifact:
        assert artifact.check["passed"]
        assert artifact.manifest["spec"] == spec.to_dict()


def test_a_layer_with_an_activation_the_blocks_lack_is_refused():
    layer = torch.nn.TransformerEncoderLayer(
        16, 2, activation=torch.nn.GELU(approximate="tanh"), batch_first=True
    )
    with pytest.raises(SpecError, match="blocks take relu or gelu"):
        ac.compile(layer)


def test_a_spec_with_a_weights_file_or_random_weights(tmp_path):
    spec = BlockSpec("decoder", 16, 2, dim_feedforward=32, batch_first=True, is_causal=True)
    with ac.compile(spec, seed=3, target="onnx-attention") as artifact:
        assert artifact.check["passed"]
        assert artifact.manifest["weights"] == {"kind": "random", "seed": 3}
        assert artifact.manifest["options"]["target"] == "onnx-attention"
    with pytest.raises(SpecError, match="a spec holds its options"):
        ac.compile(AttentionSpec(16, 2), self_attention=True)


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
    with ac.compile(path, target="ort-cpu", latency=True) as artifact:
        assert artifact.check["passed"]
        assert [f["fused"] for f in artifact.manifest["fusion"]] == [True]
        assert artifact.manifest["latency"]["after"]["p50_s"] > 0
        out = tmp_path / "out"
        artifact.save(out)
    with pytest.raises(SpecError, match="compiled as it is"):
        ac.compile(onnx.load(path), weights=str(path))


def test_a_failed_check_raises_and_leaves_no_working_folder(tmp_path, monkeypatch):
    from attention_compiler.artifacts import pipeline

    monkeypatch.setattr(pipeline, "FP32_TOLERANCE", 0.0)  # any rounding fails
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    with pytest.raises(ac.CheckFailed, match="check failed"):
        ac.compile(AttentionSpec(16, 2, self_attention=True), seed=1)
    assert not list(tmp_path.glob("attention-compiler-*"))


def test_save_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    from attention_compiler.artifacts.output_folders import OutputRefused

    with ac.compile(AttentionSpec(16, 2), check=False, engine_cache=tmp_path) as artifact:
        with pytest.raises(OutputRefused, match="not written by compile.py"):
            artifact.save(tmp_path / "mine", force=True)
        written = artifact.save(tmp_path / "ours")  # a path among the options: JSON all the same
    assert written["options"]["engine_cache"] == str(tmp_path)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


class _DoubledAttention(torch.nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return out * 2, weights


class _PlainSubclass(torch.nn.MultiheadAttention):
    """A subclass that adds nothing to what torch computes: taken."""


def _encoder(**changes):
    return _layer(torch.nn.TransformerEncoderLayer, changes)


def _decoder(**changes):
    return _layer(torch.nn.TransformerDecoderLayer, changes)


def _layer(kind, changes):
    torch.manual_seed(0)
    layer = kind(16, 2, 32, batch_first=True).eval()
    for name, part in changes.items():
        setattr(layer, name, part)
    return layer


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            lambda: _encoder(norm2=torch.nn.LayerNorm(16, eps=0.5)),
            "the layer's norm2.eps (0.5) differs from norm1.eps (1e-05)",
        ),
        (
            lambda: _encoder(self_attn=_DoubledAttention(16, 2, batch_first=True)),
            "the layer's self_attn is _DoubledAttention, a subclass of torch.nn.MultiheadAttention "
            "with a forward of its own",
        ),
        (
            lambda: _encoder(linear1=torch.nn.Linear(16, 32, bias=False)),
            "the layer's self_attn has projection bias but linear1 has no bias",
        ),
        (lambda: _encoder(norm1=torch.nn.Identity()), "the layer's norm1 is Identity, expected"),
        (
            lambda: _encoder(norm1=torch.nn.LayerNorm(16, elementwise_affine=False)),
            "the layer's norm1 has no weight (elementwise_affine=False)",
        ),
        (
            lambda: _decoder(multihead_attn=torch.nn.MultiheadAttention(16, 2)),
            "the layer's multihead_attn.batch_first (False) differs from self_attn.batch_first",
        ),
        (
            lambda: _decoder(multihead_attn=torch.nn.MultiheadAttention(16, 4, batch_first=True)),
            "the layer's multihead_attn.num_heads (4) differs from self_attn.num_heads (2)",
        ),
        (
            lambda: _encoder(
                self_attn=torch.nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
            ),
            "the layer's self_attn has add_bias_kv=True",
        ),
    ],
)
def test_a_live_layer_whose_parts_the_spec_cannot_express_is_refused_naming_the_part(
    layer, message
):
    """A norm2 with an eps of its own compiled with norm1's (0.5 off), and a self_attn with its own
    forward compiled as torch's (0.36 off); a linear1 without bias was reported as unexpected
    linear2.bias and norm1.bias; norm1=Identity was an AttributeError."""
    with pytest.raises(SpecError) as error:
        ac.compile(layer(), target="ort-cpu")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_subclass_of_multihead_attention_is_refused_saying_why_or_taken_when_it_adds_nothing():
    with pytest.raises(SpecError, match="a subclass of torch.nn.MultiheadAttention with a forward"):
        ac.compile(_DoubledAttention(16, 2), self_attention=True)
    torch.manual_seed(0)
    with ac.compile(_PlainSubclass(16, 2), self_attention=True) as artifact:
        assert artifact.check["passed"]
    with torch.device("meta"):
        on_meta = torch.nn.MultiheadAttention(16, 2)
    with pytest.raises(SpecError, match="holds its weights on the meta device"):
        ac.compile(on_meta)
    with torch.device("meta"):
        layer_on_meta = torch.nn.TransformerEncoderLayer(16, 2, 32)
    with pytest.raises(SpecError, match="the layer holds its weights on the meta device"):
        ac.compile(layer_on_meta)


def test_the_check_of_a_live_module_runs_that_module():
    """torch's side of the check runs the user's own module: another module with other weights
    fails it."""
    from runtime.check import check_session

    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(16, 2).eval()
    other = torch.nn.MultiheadAttention(16, 2).eval()
    with ac.compile(module, check=False) as artifact:
        session = OrtSession(artifact.model)
    spec = spec_from_module(module)
    weights = AttentionWeights.from_module(spec, module)
    assert check_session(session, spec, weights, module=module).passed
    report = check_session(session, spec, weights, module=other)
    assert not report.passed
    assert {c.reference for c in report.comparisons if c.max_rel_error > 1e-3} == {"torch"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_len": "big"}, "max_len must be a whole number of at least 1, got 'big'"),
        ({"max_len": 0}, "max_len must be a whole number of at least 1, got 0"),
        ({"max_len": -5}, "max_len must be a whole number of at least 1, got -5"),
        ({"max_len": 2.5}, "max_len must be a whole number of at least 1, got 2.5"),
        ({"max_batch": True}, "max_batch must be a whole number of at least 1, got True"),
        ({"memory_limit": "abc"}, "memory_limit: expected a size such as 16GiB"),
        ({"latency_shape": (1, -1, 4)}, "latency_shape: expected three positive integers"),
        ({"check": "yes"}, "check must be True or False, got 'yes'"),
        ({"seed": -1}, "seed must be a whole number from 0 to 2**64-1, got -1"),
        ({"self_attentoin": True}, "compile() has no option 'self_attentoin'"),
        ({"embed_dim": 16}, "embed_dim is read from the module itself"),
    ],
)
def test_every_library_option_is_checked_as_its_flag_is(options, message):
    """These were TypeError, ValueError or accepted (max_len=0 wrote a model every Session
    refuses, after a 'passed' check)."""
    with pytest.raises(SpecError) as error:
        ac.compile(torch.nn.MultiheadAttention(16, 2), **options)
    assert message in str(error.value)


def test_a_library_option_given_in_its_natural_type_is_taken():
    spec = AttentionSpec(16, 2, self_attention=True)
    with ac.compile(spec, memory_limit="1GiB", max_len=8, latency_shape=[1, 4, 4]) as a:
        assert a.manifest["memory"]["limit_bytes"] == 2**30


def test_save_after_close_says_so(tmp_path):
    from attention_compiler.artifacts.output_folders import ArtifactError

    artifact = ac.compile(AttentionSpec(16, 2), check=False)
    artifact.close()
    with pytest.raises(ArtifactError, match="this artifact was closed"):
        artifact.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()
