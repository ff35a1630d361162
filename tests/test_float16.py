"""Float16Pass alone and in every target: fp16 inside, float32 at the edges and in the softmax.

Tolerance: 1e-2 of the output's scale against the fp32 graph (fp16 epsilon is 9.8e-4; measured
errors over the option matrix stay near 1e-3, docs/BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from compiler import TARGETS, compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import FP16_TOLERANCE, errors, random_inputs
from runtime.ort import OrtSession

SPECS = [
    AttentionSpec(
        16, 4, key_padding_mask="bool", attn_mask="float", is_causal=True, need_weights=True
    ),
    AttentionSpec(32, 4, self_attention=True, batch_first=True, key_padding_mask="float"),
    AttentionSpec(
        16,
        2,
        kdim=6,
        vdim=10,
        add_bias_kv=True,
        add_zero_attn=True,
        attn_mask="bool",
        attn_mask_3d=True,
    ),
]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


@pytest.mark.parametrize("spec", SPECS)
def test_fp16_graph_has_half_weights_float_edges_and_float_softmax(spec):
    fp16 = compile_model(build_mha(spec, AttentionWeights.random(spec)), "portable", "fp16")
    onnx.checker.check_model(fp16, full_check=True)
    floats = [
        t for t in fp16.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    assert floats and all(t.data_type == TensorProto.FLOAT16 for t in floats)
    fp32 = build_mha(spec, AttentionWeights.random(spec))
    assert (
        fp16.graph.input == fp32.graph.input and fp16.graph.output == fp32.graph.output
    )  # callers see no change
    producers = _producers(fp16)
    for softmax in (n for n in fp16.graph.node if n.op_type == "Softmax"):
        cast = producers[softmax.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
        readers = [n for n in fp16.graph.node if softmax.output[0] in n.input]
        assert [(n.op_type, n.attribute[0].i) for n in readers] == [("Cast", TensorProto.FLOAT16)]


@pytest.mark.parametrize(
    "target", [t for t in TARGETS if t != "ort-cuda"]
)  # ort-cuda's graph is ort-cpu's
@pytest.mark.parametrize("spec", SPECS)
def test_fp16_graph_matches_the_fp32_graph_and_keeps_the_masked_row_rule(spec, target):
    weights = AttentionWeights.random(spec, seed=6)
    fp32 = compile_model(build_mha(spec, weights), target)
    fp16 = compile_model(build_mha(spec, weights), target, "fp16")
    feeds = random_inputs(spec, (3, 5, 7), np.random.default_rng(2))
    if "key_padding_mask" in feeds:  # batch entry 1 sees no key
        feeds["key_padding_mask"][1] = True if spec.key_padding_mask == "bool" else -np.inf
    want, got = OrtSession(fp32).run(feeds), OrtSession(fp16).run(feeds)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == np.float32 and np.isfinite(got[name]).all(), name
        assert errors(got[name], want[name])[1] <= FP16_TOLERANCE, name


def test_sequence_first_inputs_are_cast_after_their_layout_transpose():
    """Cast -> Transpose -> MatMul with an fp16 weight crashes ONNX Runtime 1.32's CPU session
    (NchwcTransformer); casting after the Transpose avoids it, and creating the session proves it."""
    spec = AttentionSpec(16, 4)
    fp16 = compile_model(build_mha(spec, AttentionWeights.random(spec)), "portable", "fp16")
    producers = _producers(fp16)
    for name in ("query", "key", "value"):
        cast = next(
            n
            for n in fp16.graph.node
            if n.op_type == "Cast"
            and producers.get(n.input[0]) is not None
            and producers[n.input[0]].input[0] == name
        )
        assert producers[cast.input[0]].op_type == "Transpose"
    OrtSession(fp16).run(random_inputs(spec, (2, 3, 4), np.random.default_rng(0)))
