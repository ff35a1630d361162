"""Structure of the canonical graph, its dynamic axes, and the fully-masked-row rule."""

import numpy as np
import onnx
import pytest

from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import check_session, random_inputs
from runtime.ort import OrtSession
from runtime.reference import mha_reference

FULL = AttentionSpec(
    16,
    4,
    kdim=6,
    vdim=10,
    add_bias_kv=True,
    add_zero_attn=True,
    key_padding_mask="bool",
    attn_mask="float",
    attn_mask_3d=True,
    is_causal=True,
    need_weights=True,
)


def test_graph_passes_full_check_and_declares_the_contract_signature():
    model = build_mha(FULL, AttentionWeights.random(FULL))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 18
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert {vi.name: dims(vi) for vi in inferred.graph.input} == {
        "query": ["tgt_len", "batch", 16],
        "key": ["src_len", "batch", 6],
        "value": ["src_len", "batch", 10],
        "key_padding_mask": ["batch", "src_len"],
        "attn_mask": ["batch*4", "tgt_len", "src_len"],
    }
    assert [o.name for o in model.graph.output] == ["attn_output", "attn_output_weights"]


def test_node_names_say_which_part_of_attention_they_compute():
    model = build_mha(FULL, AttentionWeights.random(FULL))
    scopes = {n.name.split("/")[0] for n in model.graph.node}
    assert scopes == {
        "query",
        "key",
        "value",
        "q_proj",
        "k_proj",
        "v_proj",
        "extra_keys",
        "bias_kv",
        "zero_attn",
        "heads",
        "scores",
        "mask",
        "softmax",
        "context",
        "out_proj",
        "weights",
    }
    by_op = {}
    for n in model.graph.node:
        by_op.setdefault(n.op_type, []).append(n.name)
    assert by_op["Softmax"] == ["softmax/Softmax"]
    assert sorted(by_op["MatMul"]) == [
        "context/MatMul",
        "k_proj/MatMul",
        "out_proj/MatMul",
        "q_proj/MatMul",
        "scores/MatMul",
        "v_proj/MatMul",
    ]


def test_no_length_is_baked_into_the_graph():
    """torch's legacy exporter bakes traced lengths into Reshape; ours has only 0/-1 and head sizes."""
    spec = AttentionSpec(16, 4, batch_first=True, key_padding_mask="bool", is_causal=True)
    weights = AttentionWeights.random(spec)
    model = build_mha(spec, weights)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            assert set(inits[node.input[1]].tolist()) <= {0, -1, 4, 16}, node.name
    # One graph, lengths 1 to 128, tgt != src, batch 1 to 3.
    report = check_session(
        OrtSession(model), spec, weights, shapes=((1, 1, 1), (3, 77, 77), (2, 128, 128))
    )
    assert report.passed, report.table()


def _feeds_with_dead_rows(spec, rng):
    feeds = random_inputs(spec, (3, 4, 6), rng)
    feeds["key_padding_mask"][1, :] = True  # batch entry 1 sees no key at all
    if spec.attn_mask == "float":
        feeds["attn_mask"][2, :] = -np.inf  # query row 2 of every batch entry sees no key
    return feeds


@pytest.mark.parametrize("attn_mask", [None, "float"])
def test_fully_masked_rows_give_out_proj_bias_and_zero_weights(attn_mask):
    spec = AttentionSpec(
        16,
        4,
        batch_first=True,
        key_padding_mask="bool",
        attn_mask=attn_mask,
        need_weights=True,
        average_attn_weights=False,
    )
    weights = AttentionWeights.random(spec, seed=5)
    feeds = _feeds_with_dead_rows(spec, np.random.default_rng(0))
    out = OrtSession(build_mha(spec, weights)).run(feeds)
    assert np.isfinite(out["attn_output"]).all() and np.isfinite(out["attn_output_weights"]).all()
    bias = weights.tensors["out_proj.bias"]
    np.testing.assert_allclose(
        out["attn_output"][1], np.broadcast_to(bias, (4, 16)), rtol=0, atol=1e-6
    )
    assert np.all(out["attn_output_weights"][1] == 0)
    if attn_mask:
        np.testing.assert_allclose(
            out["attn_output"][:, 2], np.broadcast_to(bias, (3, 16)), rtol=0, atol=1e-6
        )
        assert np.all(out["attn_output_weights"][:, :, 2] == 0)
    # Rows that still see a key are ordinary softmax rows.
    live = out["attn_output_weights"][0, :, [0, 1, 3]]
    np.testing.assert_allclose(live.sum(-1), 1.0, rtol=1e-6)
    ref = mha_reference(spec, weights, feeds)
    np.testing.assert_allclose(out["attn_output"], ref["attn_output"], rtol=0, atol=1e-5)


def test_fully_masked_rows_without_bias_are_zero():
    spec = AttentionSpec(16, 4, bias=False, key_padding_mask="float")
    weights = AttentionWeights.random(spec)
    feeds = random_inputs(spec, (2, 3, 5), np.random.default_rng(1))
    feeds["key_padding_mask"][0, :] = -np.inf
    out = OrtSession(build_mha(spec, weights)).run(feeds)["attn_output"]
    assert np.all(out[:, 0] == 0) and np.isfinite(out).all()


def test_nan_in_an_input_propagates_to_its_rows_only():
    spec = AttentionSpec(16, 4, batch_first=True, key_padding_mask="bool")
    weights = AttentionWeights.random(spec)
    feeds = random_inputs(spec, (2, 3, 5), np.random.default_rng(2))
    feeds["key_padding_mask"][:] = False
    feeds["query"][0, 1, 3] = np.nan
    out = OrtSession(build_mha(spec, weights)).run(feeds)["attn_output"]
    assert np.isnan(out[0, 1]).all()
    assert np.isfinite(np.delete(out.reshape(6, 16), 1, axis=0)).all()


@pytest.mark.parametrize("target", ["portable", "onnx-attention", "ort-cpu", "tensorrt"])
@pytest.mark.parametrize("at", [0, 1, 2])
def test_nan_in_a_float_padding_mask_whose_other_keys_are_hidden_propagates(target, at):
    """The fully-masked-row guard read ReduceMax over the row, which passes over a NaN unless it
    comes first: the row was called dead and got out_proj.bias, where torch gives NaN."""
    import torch

    from compiler import compile_model
    from runtime.torch_reference import torch_forward, torch_module

    spec = AttentionSpec(16, 4, batch_first=True, self_attention=True, key_padding_mask="float")
    weights = AttentionWeights.random(spec)
    feeds = random_inputs(spec, (2, 3, 5), np.random.default_rng(2))
    feeds["key_padding_mask"][:] = 0.0
    feeds["key_padding_mask"][0] = -np.inf
    feeds["key_padding_mask"][0, at] = np.nan
    out = OrtSession(compile_model(build_mha(spec, weights), target)).run(feeds)["attn_output"]
    with torch.no_grad():
        want = torch_forward(spec, torch_module(spec, weights), feeds)["attn_output"]
    assert np.isnan(want[0]).all() and np.isnan(out[0]).all()
    assert np.isfinite(out[1]).all()


def test_numpy_reference_agrees_with_torch():
    """The two references are independent; on rows torch defines they agree to float64 rounding."""
    import torch

    from runtime.reference import fully_masked_rows
    from runtime.torch_reference import torch_forward, torch_module

    rng = np.random.default_rng(4)
    for spec in (
        FULL,
        AttentionSpec(
            16,
            2,
            batch_first=True,
            self_attention=True,
            key_padding_mask="float",
            attn_mask="bool",
            need_weights=True,
            average_attn_weights=False,
        ),
    ):
        weights = AttentionWeights.random(spec, seed=2)
        module = torch_module(spec, weights)
        for shape in ((2, 5, 7), (3, 6, 3)):
            feeds = random_inputs(spec, shape, rng)
            ours, theirs = mha_reference(spec, weights, feeds), torch_forward(spec, module, feeds)
            keep = ~fully_masked_rows(spec, feeds).any(axis=1)
            out_ours = (
                ours["attn_output"] if spec.batch_first else ours["attn_output"].transpose(1, 0, 2)
            )
            out_theirs = (
                theirs["attn_output"]
                if spec.batch_first
                else theirs["attn_output"].transpose(1, 0, 2)
            )
            assert keep.sum() > keep.size // 2
            np.testing.assert_allclose(out_ours[keep], out_theirs[keep], rtol=1e-12, atol=1e-12)
            w_ours, w_theirs = ours["attn_output_weights"], theirs["attn_output_weights"]
            if w_ours.ndim == 4:
                w_ours, w_theirs = w_ours.transpose(0, 2, 1, 3), w_theirs.transpose(0, 2, 1, 3)
            np.testing.assert_allclose(w_ours[keep], w_theirs[keep], rtol=1e-12, atol=1e-12)
            assert torch.is_tensor(module.in_proj_bias) == spec.bias


def test_each_element_type_row_names_one_type_in_every_vocabulary():
    """graphs/dtypes.py: ONNX's enum, NumPy's dtype and ONNX Runtime's type string of each row agree, as
    ONNX's own mapping and a live session report them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from graphs.dtypes import ELEMENT_TYPES

    for row in ELEMENT_TYPES:
        assert helper.tensor_dtype_to_np_dtype(row.onnx) == row.numpy
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", row.onnx, [2])],
            [helper.make_tensor_value_info("y", row.onnx, [2])],
        )
        session = ort.InferenceSession(
            helper.make_model(
                graph, opset_imports=[helper.make_opsetid("", 18)]
            ).SerializeToString(),
            providers=["CPUExecutionProvider"],
        )
        assert session.get_inputs()[0].type == row.ort
        assert row.triton == "TYPE_" + {
            TensorProto.FLOAT: "FP32",
            TensorProto.FLOAT16: "FP16",
            TensorProto.DOUBLE: "FP64",
        }.get(row.onnx, TensorProto.DataType.Name(row.onnx))
