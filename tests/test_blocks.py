"""Encoder and decoder blocks: every target ONNX Runtime CPU runs matches torch.nn.TransformerEncoderLayer /
TransformerDecoderLayer (eval, float64, non-zero random biases and LayerNorm parameters) and the NumPy
composition within 1e-5 at two shapes, with key padding and causal masks, post- and pre-norm, relu and
gelu; the attention inside is fused; weights come from the layers' own state_dicts."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from compiler import compile_model
from graphs import SpecError, WeightsError
from graphs.blocks import BlockSpec, BlockWeights, build_block
from runtime.check import FP32_TOLERANCE, check_session
from runtime.ort import OrtSession

torch = pytest.importorskip("torch")

TARGETS = [
    ("portable", None),
    ("onnx-attention", None),
    ("ort-cpu", None),
    ("ort-cuda", None),
    ("tensorrt", None),
    ("tensorrt", "attention-op"),
]
FUSED = {
    "onnx-attention": "Attention",
    "ort-cpu": "MultiHeadAttention",
    "ort-cuda": "MultiHeadAttention",
    "attention-op": "Attention",
}


@pytest.mark.parametrize("target,form", TARGETS, ids=lambda x: str(x))
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("block", ["encoder", "decoder"])
def test_block_matches_torch_layer(block, norm_first, activation, target, form):
    spec = BlockSpec(
        block,
        16,
        4,
        dim_feedforward=40,
        activation=activation,
        norm_first=norm_first,
        batch_first=norm_first,
        key_padding_mask="bool",
        is_causal=True,
        memory_key_padding_mask="bool" if block == "decoder" else None,
    )
    weights = BlockWeights.random(spec, seed=3)
    model = compile_model(build_block(spec, weights), target, "fp32", form)
    report = check_session(OrtSession(model), spec, weights)
    assert report.passed and not report.skipped, report.table()
    assert {c.reference for c in report.comparisons} == {"numpy", "torch"}
    ops = collections.Counter(n.op_type for n in model.graph.node)
    attentions = 1 if block == "encoder" else 2
    fused = FUSED.get(form or target)
    if fused:
        # a causal core in query blocks (compiler/lowerings/)
        lowered = ops["If"] if target == "ort-cpu" else 0
        assert ops[fused] + lowered == attentions and ops["Softmax"] == 0, ops
    else:
        assert ops["Softmax"] == attentions
    norms = attentions + 1
    residual = norms - (
        1 if norm_first else 0
    )  # pre-norm's first LayerNorm has no residual sum before it
    if target == "ort-cuda":  # residual LayerNorms -> SkipLayerNormalization
        assert (ops["SkipLayerNormalization"], ops["LayerNormalization"]) == (
            residual,
            norms - residual,
        ), ops
    elif (
        target == "ort-cpu"
    ):  # the residual sums as Sum, which ONNX Runtime's CPU session leaves unfused
        assert (ops["SkipLayerNormalization"], ops["LayerNormalization"], ops["Sum"]) == (
            0,
            norms,
            residual,
        ), ops
    else:
        assert ops["LayerNormalization"] == norms and ops["SkipLayerNormalization"] == 0
    if target.startswith("ort-"):
        assert (ops["Gelu"], ops["Erf"]) == ((1, 0) if activation == "gelu" else (0, 0)), ops


@pytest.mark.parametrize("target", ["onnx-attention", "ort-cpu"])
def test_decoder_with_every_mask_of_both_kinds(target):
    spec = BlockSpec(
        "decoder",
        16,
        4,
        dim_feedforward=24,
        key_padding_mask="float",
        attn_mask="bool",
        memory_key_padding_mask="bool",
        memory_mask="float",
        is_causal=True,
        bias=False,
    )
    weights = BlockWeights.random(spec, seed=5)
    assert [s.name for s in spec.inputs()] == [
        "tgt",
        "memory",
        "tgt_mask",
        "memory_mask",
        "tgt_key_padding_mask",
        "memory_key_padding_mask",
    ]
    report = check_session(
        OrtSession(compile_model(build_block(spec, weights), target)), spec, weights
    )
    assert report.passed, report.table()


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_fp16_blocks_stay_within_fp16_tolerance(target, norm_first):
    from runtime.check import FP16_TOLERANCE

    spec = BlockSpec(
        "decoder",
        16,
        4,
        dim_feedforward=40,
        activation="gelu",
        norm_first=norm_first,
        key_padding_mask="bool",
        is_causal=True,
    )
    weights = BlockWeights.random(spec, seed=4)
    model = compile_model(build_block(spec, weights), target, "fp16")
    report = check_session(OrtSession(model), spec, weights, tolerance=FP16_TOLERANCE)
    assert report.passed, report.table()


def test_block_weights_from_a_trained_layer_file_through_the_cli(run_cli, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        32, 4, dim_feedforward=64, activation="gelu", batch_first=True
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # torch zero-initialises biases; make them count
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    out = tmp_path / "out"
    result = run_cli(
        "compile.py",
        *"--block encoder --embed-dim 32 --num-heads 4 --dim-feedforward".split(),
        *"64 --activation gelu --batch-first --key-padding-mask bool".split(),
        "--weights",
        path,
        *"--target ort-cpu --check --out".split(),
        out,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["block"] == "encoder" and manifest["check"]["passed"]
    assert manifest["check"]["worst_rel_error"] <= FP32_TOLERANCE
    assert [i["name"] for i in manifest["inputs"]] == ["src", "src_key_padding_mask"]
    assert [o["name"] for o in manifest["outputs"]] == ["output"]
    # the file holds exactly what torch's layer computes
    session = OrtSession(out / "model.onnx")
    x = np.random.default_rng(0).standard_normal((2, 6, 32)).astype(np.float32)
    kpm = np.zeros((2, 6), bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        want = (
            layer.double()
            .eval()(torch.from_numpy(x).double(), src_key_padding_mask=torch.from_numpy(kpm))
            .numpy()
        )
    got = session.run({"src": x, "src_key_padding_mask": kpm})["output"]
    assert np.abs(got - want).max() / np.abs(want).max() <= FP32_TOLERANCE


def test_block_weights_with_wrong_keys_or_shapes_are_refused():
    spec = BlockSpec("encoder", 8, 2, dim_feedforward=16)
    state = dict(BlockWeights.random(spec).tensors)
    with pytest.raises(WeightsError, match="missing key 'norm2.bias'"):
        BlockWeights.from_state_dict(spec, {k: v for k, v in state.items() if k != "norm2.bias"})
    with pytest.raises(
        WeightsError, match=r"'linear1.weight' has shape \(16, 4\), expected \(16, 8\)"
    ):
        BlockWeights.from_state_dict(spec, {**state, "linear1.weight": np.zeros((16, 4))})
    decoder = BlockSpec("decoder", 8, 2, dim_feedforward=16)
    with pytest.raises(WeightsError, match="TransformerDecoderLayer"):
        BlockWeights.from_state_dict(decoder, state)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(block="encoder", memory_mask="bool"), "memory_mask belongs to the decoder block"),
        (dict(block="encoder", activation="tanh"), "activation must be one of relu, gelu"),
        (dict(block="decoder", dim_feedforward=0), "dim_feedforward must be a positive integer"),
        (dict(block="encoder", layer_norm_eps=-1.0), "layer_norm_eps must be a positive number"),
        (dict(block="encoder", num_heads=3), "divisible"),
    ],
)
def test_block_spec_errors_name_the_option(options, message):
    with pytest.raises(SpecError, match=message):
        BlockSpec(**{"embed_dim": 8, "num_heads": 2, **options})


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--block", "decoder", "--attn-mask-3d", "--attn-mask", "bool"],
            "--attn-mask-3d applies to bare attention only",
        ),
        (["--norm-first", "--activation", "gelu"], "--activation, --norm-first describe a block"),
    ],
)
def test_cli_refuses_flags_of_the_other_kind(run_cli, tmp_path, args, message):
    result = run_cli(
        "compile.py", "--embed-dim", "8", "--num-heads", "2", *args, "--out", tmp_path / "x"
    )
    assert result.returncode == 2 and message in result.stderr and not (tmp_path / "x").exists()


def test_norm_gelu_pass_alone_keeps_the_outputs_and_fuses():
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass

    from compiler.fuse_ort_norm_gelu import FuseOrtNormGeluPass
    from runtime.check import block_inputs, errors

    spec = BlockSpec(
        "encoder", 16, 4, dim_feedforward=24, activation="gelu", norm_first=True, batch_first=True
    )
    weights = BlockWeights.random(spec, seed=6)
    before = build_block(spec, weights)
    model = ir.serde.deserialize_model(before)
    ShapeInferencePass()(model)  # the pass checks ranks, as in every target's pipeline
    assert FuseOrtNormGeluPass()(model).modified
    after = ir.serde.serialize_model(model)
    ops = collections.Counter(n.op_type for n in after.graph.node)
    assert ops["Gelu"] == 1 and ops["SkipLayerNormalization"] == 1 and ops["Erf"] == 0
    feeds = block_inputs(spec, (2, 7, 7), np.random.default_rng(0))
    want, got = OrtSession(before).run(feeds)["output"], OrtSession(after).run(feeds)["output"]
    assert errors(got, want)[1] <= 1e-6  # the same float32 arithmetic, regrouped


@pytest.mark.parametrize("form", ["half_outside", "half_first"])
def test_the_gelu_forms_exporters_write_fuse_into_one_gelu(form):
    """torch's exporter writes x * (0.5 * (erf(x / sqrt 2) + 1)); others 0.5 * (x * (erf + 1)): onnxscript's
    own rules take both."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from compiler.fuse_ort_norm_gelu import FuseOrtNormGeluPass

    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf_1"]),
    ]
    if form == "half_outside":
        nodes += [
            helper.make_node("Mul", ["half", "erf_1"], ["half_erf"]),
            helper.make_node("Mul", ["x", "half_erf"], ["y"]),
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["x", "erf_1"], ["x_erf"]),
            helper.make_node("Mul", ["half", "x_erf"], ["y"]),
        ]
    constants = [
        numpy_helper.from_array(np.array(v, np.float32), n)
        for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        constants,
    )
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(before)
    assert FuseOrtNormGeluPass(skip_norm=False)(model).modified
    after = ir.serde.serialize_model(model)
    assert [n.op_type for n in after.graph.node] == ["Gelu"]
    x = {"x": np.linspace(-4, 4, 10, dtype=np.float32).reshape(2, 5)}
    # fp32: ONNX Runtime's Gelu kernel against the unfused erf chain, rounding only
    np.testing.assert_allclose(
        OrtSession(after).run(x)["y"], OrtSession(before).run(x)["y"], rtol=1e-5, atol=1e-6
    )


def test_block_options_from_a_dict_name_what_is_wrong():
    """The spec base's from_dict, for blocks as for bare attention: one sentence, never a TypeError."""
    with pytest.raises(SpecError, match="num_heads is required"):
        BlockSpec.from_dict({"block": "encoder", "embed_dim": 8})
    with pytest.raises(SpecError, match="unknown block option 'nheads'"):
        BlockSpec.from_dict({"block": "encoder", "embed_dim": 8, "num_heads": 2, "nheads": 2})
    spec = BlockSpec("decoder", 8, 2, kv_cache=True, is_causal=True)
    assert BlockSpec.from_dict(spec.to_dict()) == spec
