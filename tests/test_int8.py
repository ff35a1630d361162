"""--precision int8 on ort-cpu: every constant-weight MatMul in ONNX Runtime's dynamic int8 form, the
attention core still fused, and the check held to its bound (relative error at most 5e-2 and every
output's cosine similarity at least 0.999, both against the float64 reference and torch), which
refuses to write beyond it. Real exports: tests/test_real_models.py."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import attention_compiler as ac
from compiler import compile_model
from compiler.targets import every_node
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import CheckReport, Comparison, cosine

MHA = AttentionSpec(
    64, 4, batch_first=True, self_attention=True, key_padding_mask="bool", is_causal=True
)


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in every_node(model.graph))


def test_every_constant_weight_matmul_goes_to_int8_and_the_core_stays_one_op():
    model = compile_model(build_mha(MHA, AttentionWeights.random(MHA)), "ort-cpu", "int8")
    ops = _ops(model)
    weights = {t.name for t in model.graph.initializer}
    assert ops["MatMulInteger"] == 4 and ops["DynamicQuantizeLinear"] >= 1  # q, k, v, out
    assert not [
        n for n in every_node(model.graph) if n.op_type == "MatMul" and n.input[1] in weights
    ]
    assert ops["MultiHeadAttention"] >= 1 and ops["Softmax"] == 0
    # without com.microsoft.Attention, which would keep the projections float32
    assert ops["Attention"] == 0
    int8 = [t for t in model.graph.initializer if t.data_type == 3]  # INT8
    assert int8 and all(np.prod(t.dims) > 1 or t.name.endswith("zero_point") for t in int8)


@pytest.mark.parametrize(
    "spec",
    [
        MHA,
        AttentionSpec(32, 4, attn_mask="float", key_padding_mask="float"),
        AttentionSpec(32, 4, self_attention=True, is_causal=True, kv_cache=True),
        ac.BlockSpec("encoder", 64, 4, dim_feedforward=128, key_padding_mask="bool"),
        ac.BlockSpec("decoder", 64, 4, dim_feedforward=128, is_causal=True, kv_cache=True),
    ],
    ids=["mha-causal-padding", "mha-float-masks", "mha-kv-cache", "encoder", "decoder-kv-cache"],
)
def test_int8_passes_its_bound_against_the_references(spec):
    with ac.compile(spec, seed=1, target="ort-cpu", precision="int8") as artifact:
        check = artifact.check
        assert artifact.manifest["precision"] == "int8"
    assert check["passed"] and check["tolerance"] == 5e-2 and check["min_cosine"] == 0.999
    assert {c["reference"] for c in check["comparisons"]} == {"numpy", "torch"}
    assert 0.999 <= check["worst_cosine"] <= 1
    # int8 is int8: the error is far above float32's, so the check did compare the quantized graph
    assert 1e-4 < check["worst_rel_error"] <= 5e-2


def test_a_graph_beyond_the_bound_is_refused_and_nothing_is_written(run_cli, tmp_path):
    out = tmp_path / "out"
    argv = ["--embed-dim", "32", "--num-heads", "4", "--self-attention", "--target", "ort-cpu"]
    result = run_cli("compile.py", *argv, "--precision", "int8", "--check", "--out", out)
    assert result.returncode == 0, result.stderr
    refused = tmp_path / "refused"
    result = run_cli(
        "compile.py",
        *argv,
        "--precision",
        "int8",
        "--check",
        "--tolerance",
        "1e-4",
        "--out",
        refused,
    )
    assert result.returncode == 1 and not refused.exists()
    assert "check failed: worst relative error" in result.stderr
    assert "(output 'attn_output') exceeds 1e-04; nothing was written" in result.stderr
    result = run_cli(
        "compile.py", *argv, "--precision", "int8", "--check", "--min-cosine", "1", "--out", refused
    )
    assert result.returncode == 1 and not refused.exists()
    assert "worst cosine similarity 0.99" in result.stderr and "is below 1.0" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target", "portable", "--precision", "int8"], "precision int8 runs on ort-cpu only"),
        (["--target", "ort-cpu", "--precision", "int8", "--min-cosine", "2"], "min_cosine must be"),
        (["--target", "ort-cpu", "--tolerance", "nan"], "max_rel_error must be a number above 0"),
    ],
)
def test_int8_where_it_does_not_run_and_bad_bounds_are_refused(run_cli, tmp_path, flags, message):
    result = run_cli(
        "compile.py", "--embed-dim", "16", "--num-heads", "2", *flags, "--out", tmp_path / "o"
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_cosine_is_the_angle_between_outputs_over_their_finite_entries():
    a = np.array([[1.0, 0.0], [np.nan, 2.0]])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == 0.0
    assert cosine(np.array([1.0, 2.0]), np.array([-1.0, -2.0])) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), np.ones(3)) == 0.0
    assert cosine(np.array([1.0, np.inf]), np.array([2.0, 5.0])) == pytest.approx(1.0)


def test_a_report_within_its_relative_bound_fails_on_cosine_naming_the_output():
    shape = (1, 2, 2)
    report = CheckReport(5e-2, min_cosine=0.999)
    report.comparisons = [
        Comparison("numpy", shape, "attn_output", 1e-3, 1e-3, cosine=0.9999),
        Comparison("numpy", shape, "present_key", 2e-3, 2e-3, cosine=0.99),
    ]
    assert not report.passed and report.worst_cosine == 0.99
    assert report.failure() == (
        "worst cosine similarity 0.990000 (output 'present_key') is below 0.999"
    )
    assert "cosine" in report.table() and report.to_json()["min_cosine"] == 0.999
    assert CheckReport(5e-2, report.comparisons).passed  # no cosine bound: fp32 and fp16
