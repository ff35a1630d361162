"""--precision int8 on ort-cpu: every constant-weight MatMul in ONNX Runtime's dynamic int8 form, the
attention core still fused, and the check held to its bound (relative error at most 5e-2 and every
output's cosine similarity at least 0.999, both against the float64 reference and torch), which
refuses to write beyond it. Real exports: tests/test_real_models.py."""

from __future__ import annotations

import collections
import json

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
    # the fallback tried each layer alone: every one misses a bound of 1e-4, so none is kept
    assert (
        "(output 'attn_output') exceeds 1e-04 and every layer alone misses the bound; nothing was "
        "written" in result.stderr
    )
    result = run_cli(
        "compile.py",
        *argv,
        *("--precision", "int8", "--check", "--min-cosine", "1", "--no-fallback"),
        *("--out", refused),
    )
    assert result.returncode == 1 and not refused.exists()
    assert "worst cosine similarity 0.99" in result.stderr and "is below 1.0" in result.stderr


BLOCK = ac.BlockSpec("encoder", 64, 4, dim_feedforward=128)


def _float_matmuls(model) -> int:
    weights = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in weights for n in every_node(model.graph))


def test_keep_fp32_keeps_the_layers_under_a_module_named():
    """``residual2`` is the feed-forward module of a block: its two MatMuls stay float32, the four
    attention projections go to int8, and the manifest names the two layers and why."""
    with ac.compile(
        BLOCK, seed=1, target="ort-cpu", precision="int8", keep_fp32=["residual2"]
    ) as a:
        assert _float_matmuls(a.model) == 2 and _ops(a.model)["MatMulInteger"] == 4
        assert a.manifest["int8"] == {
            "activations": "quantized per call",
            "layers": 6,
            "quantized": 4,
            "kept_fp32": [
                {"layer": "residual2.linear1", "why": "--keep-fp32"},
                {"layer": "residual2.linear2", "why": "--keep-fp32"},
            ],
        }
        assert a.check["passed"]


def _outlier_weights() -> ac.BlockWeights:
    """The block with one hidden unit of its feed-forward 1000x larger and read back 1000x smaller:
    the same function, but linear2's input holds one channel that a per-tensor uint8 activation
    cannot hold beside the others (LLM.int8's outlier features)."""
    import dataclasses

    tensors = {k: v.copy() for k, v in ac.BlockWeights.random(BLOCK, 1).tensors.items()}
    tensors["linear1.weight"][0] *= 1000
    tensors["linear1.bias"][0] = 1000 * abs(tensors["linear1.bias"][0]) + 50
    tensors["linear2.weight"][:, 0] /= 1000
    return dataclasses.replace(ac.BlockWeights.random(BLOCK, 1), tensors=tensors)


def test_a_layer_that_alone_misses_the_bound_is_kept_fp32_and_reported():
    weights = _outlier_weights()
    with pytest.raises(ac.CheckFailed, match="exceeds 5e-02; nothing was written"):
        ac.compile(BLOCK, weights, target="ort-cpu", precision="int8", fallback=False)
    with ac.compile(BLOCK, weights, target="ort-cpu", precision="int8") as artifact:
        kept = artifact.manifest["int8"]["kept_fp32"]
        assert [k["layer"] for k in kept] == ["residual2.linear2"]
        assert kept[0]["why"] == "alone beyond the check's bound" and kept[0]["rel_error"] > 5e-2
        assert _float_matmuls(artifact.model) == 1 and _ops(artifact.model)["MatMulInteger"] == 5
        assert artifact.check["passed"] and artifact.check["worst_rel_error"] <= 5e-2


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--target", "ort-cpu", "--precision", "int8", "--keep-fp32", "linear1"],
            "keep_fp32 'linear1' is no layer that int8 quantizes, nor a module above one; they are "
            "k_proj, out_proj, q_proj, v_proj",
        ),
        (["--target", "ort-cpu", "--keep-fp32", "q_proj"], "precision is fp32"),
        (
            ["--target", "ort-cuda", "--precision", "int8"],
            "precision int8 runs on portable, ort-cpu, tensorrt only",
        ),
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


def test_a_config_file_keeps_layers_as_the_flags_do(run_cli, tmp_path):
    config = tmp_path / "int8.yaml"
    config.write_text(
        "embed_dim: 32\nnum_heads: 4\ntarget: ort-cpu\nprecision: int8\n"
        "keep_fp32: [q_proj, k_proj]\nfallback: false\n"
    )
    result = run_cli("compile.py", "--config", config, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [k["layer"] for k in manifest["int8"]["kept_fp32"]] == ["q_proj", "k_proj"]
    assert manifest["int8"]["quantized"] == 2 and manifest["options"]["fallback"] is False
    config.write_text("keep_fp32: [1]\n")
    result = run_cli("compile.py", "--config", config, "--out", tmp_path / "bad")
    assert result.returncode == 2 and "keep_fp32 must be a list of names" in result.stderr


# Static int8: calibrated QDQ ------------------------------------------------------------------


def _qdq(model) -> tuple[list, dict]:
    """The QuantizeLinear nodes on activations, and each DequantizeLinear output's readers."""
    readers: dict = collections.defaultdict(list)
    for node in every_node(model.graph):
        for name in node.input:
            readers[name].append(node.op_type)
    weights = {t.name for t in model.graph.initializer}
    quantize = [
        n
        for n in every_node(model.graph)
        if n.op_type == "QuantizeLinear" and n.input[0] not in weights
    ]
    dq = {
        n.output[0]: readers[n.output[0]]
        for n in every_node(model.graph)
        if n.op_type == "DequantizeLinear"
    }
    return quantize, dq


def _zero_points(model, quantize) -> list[np.ndarray]:
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[2]] for n in quantize]


@pytest.mark.parametrize("target", ["portable", "tensorrt"])
def test_portable_and_tensorrt_take_int8_as_calibrated_qdq_with_symmetric_activations(target):
    """Q/DQ pairs of standard ops on the inputs of each projection and feed-forward MatMul, with
    int8 activations at zero point 0 (TensorRT takes no other); the score and context MatMuls of
    the unfused core stay float32 (one int8 scale cannot hold a softmax), and so does every other
    reader of a quantized activation (the residual sums)."""
    with ac.compile(
        BLOCK,
        seed=1,
        target=target,
        precision="int8",
        **({"check": False} if target == "tensorrt" else {}),
    ) as artifact:
        model = artifact.model
        quantize, dq = _qdq(model)
        assert quantize and all(
            z.dtype == np.int8 and not z.any() for z in _zero_points(model, quantize)
        )
        assert all(readers and set(readers) <= {"MatMul"} for readers in dq.values())
        assert _float_matmuls(model) == 0  # every constant weight goes through a DequantizeLinear
        record = artifact.manifest["int8"]
        # the layers (Q/K/V packed into one), the score and context MatMuls
        assert _ops(model)["MatMul"] == record["layers"] + 2 == 4 + 2
        assert all(not n.domain for n in every_node(model.graph))
        assert record["activations"] == "calibrated" and record["quantized"] == record["layers"]
        assert record["calibration"] == {"method": "minmax", "inputs": "8 drawn sets"}
        if target == "portable":
            assert artifact.check["passed"] and 1e-4 < artifact.check["worst_rel_error"] <= 5e-2


def test_calibrate_makes_ort_cpu_int8_static_from_the_files_given(run_cli, tmp_path):
    """--calibrate: fixed activation scales (uint8, ONNX Runtime's CPU form) from the inputs given,
    no DynamicQuantizeLinear; each calibrator gives its own scales, and each graph checks."""
    from runtime.check import block_inputs

    files = []
    for seed, length in enumerate((32, 8)):
        files.append(tmp_path / f"calib{seed}.npz")
        np.savez(files[-1], **block_inputs(BLOCK, (2, length, length), np.random.default_rng(seed)))
    flags = [
        "--block",
        "encoder",
        "--embed-dim",
        "64",
        "--num-heads",
        "4",
        "--dim-feedforward",
        "128",
    ]
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        out = tmp_path / method
        result = run_cli(
            "compile.py", *flags, "--target", "ort-cpu", "--precision", "int8", "--check",
            "--calibrate", *files, "--calibration-method", method, "--out", out,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        import onnx

        model = onnx.load(out / "model.onnx")
        quantize, dq = _qdq(model)
        assert _ops(model)["DynamicQuantizeLinear"] == 0 and quantize
        assert all(z.dtype == np.uint8 for z in _zero_points(model, quantize))
        assert all(set(readers) <= {"MatMul"} for readers in dq.values())
        record = json.loads((out / "manifest.json").read_text())["int8"]
        assert record["calibration"] == {"method": method, "inputs": ", ".join(map(str, files))}
        from onnx import numpy_helper

        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        scales[method] = tuple(float(inits[n.input[1]]) for n in quantize)
    # the percentile calibrator clips the tails the min-max one keeps; entropy's thresholds never
    # reach past the range seen
    assert scales["percentile"] != scales["minmax"]
    assert all(e <= m for e, m in zip(scales["entropy"], scales["minmax"]))
    assert "Collecting tensor data" not in result.stdout  # the calibrators' prints kept off


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--calibrate", "x.npz"],
            "calibrate sets an int8 graph's activation scales; precision is fp32",
        ),
        (["--precision", "int8", "--calibrate", "missing.npz"], "missing.npz"),
    ],
)
def test_calibration_where_it_cannot_apply_is_refused(run_cli, tmp_path, flags, message):
    result = run_cli(
        "compile.py", "--embed-dim", "16", "--num-heads", "2", "--target", "ort-cpu", *flags,
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o").exists()
