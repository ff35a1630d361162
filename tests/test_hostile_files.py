"""Hostile and broken input files: refused with one line naming the file and what is wrong, in a few
seconds and well under 1 GB, before their contents are read; and the weights that would make a wrong
graph (a dtype a cast would change, values past fp16's range) refused in every format alike
(docs/RELIABILITY.md)."""

import io
import json
import struct
import time
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from attention_compiler.benchmark.memory import PeakRss  # noqa: E402
from attention_compiler.cli import compile as compile_script  # noqa: E402
from graphs import AttentionSpec, AttentionWeights, WeightsError, expected_shapes  # noqa: E402
from graphs.weights import random_state  # noqa: E402

SPEC = AttentionSpec(16, 2)
STATE = {k: v.astype(np.float32) for k, v in random_state(expected_shapes(SPEC), 0).items()}
SECONDS, MEMORY = 3.0, 200 * 2**20  # "a few seconds", "well under 1 GB"


class Bounded:
    """Times and measures the resident-memory growth of the block; asserts both stay bounded."""

    def __enter__(self):
        self.start, self.peak = time.monotonic(), PeakRss().__enter__()
        return self

    def __exit__(self, *exc):
        self.peak.__exit__(*exc)
        seconds = time.monotonic() - self.start
        assert seconds < SECONDS and self.peak.growth < MEMORY, (seconds, self.peak.growth)


def refused(path, message, spec=SPEC):
    with Bounded(), pytest.raises(WeightsError) as info:
        AttentionWeights.from_file(spec, path)
    assert (
        message in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 600
    ), str(info.value)


# npz ------------------------------------------------------------------------------------------


def _npy_header(shape, descr="<f4"):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def _npz_with_a_huge_member(path, others):
    """in_proj_weight declares 2**26 float32 (256 MiB of zeros, past the memory bound), deflated to 1 MB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("in_proj_weight.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((2**26,)))
            zeros = bytes(2**22)
            for _ in range(2**26 * 4 // len(zeros)):
                f.write(zeros)
        for key, value in others.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())


def test_an_npz_declaring_gigabytes_is_refused_before_decompressing(tmp_path):
    alone = tmp_path / "alone.npz"
    _npz_with_a_huge_member(alone, {})
    refused(alone, "weights are missing keys 'in_proj_bias', 'out_proj.weight', 'out_proj.bias'")
    whole = tmp_path / "whole.npz"
    _npz_with_a_huge_member(whole, {k: v for k, v in STATE.items() if k != "in_proj_weight"})
    refused(
        whole, "member 'in_proj_weight' declares 268435584 bytes, more than a (48, 16) tensor needs"
    )


def test_an_npz_member_whose_zip_size_disagrees_with_its_header_is_refused(tmp_path):
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in STATE.items():
            data = _npy_header(value.shape) + value.tobytes()
            archive.writestr(f"{key}.npy", data + (bytes(4096) if key == "out_proj.bias" else b""))
    refused(path, "member 'out_proj.bias' declares")


# safetensors ----------------------------------------------------------------------------------


def _safetensors(path, header, data_size, sparse=False):
    body = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        if sparse:
            f.truncate(
                8 + len(body) + data_size
            )  # a hole: no disk, no memory, until someone reads it
        else:
            f.write(bytes(data_size))


def _header(state, extra=None):
    header, offset = {}, 0
    for key, value in {**state, **(extra or {})}.items():
        shape = list(value) if isinstance(value, tuple) else list(value.shape)
        size = int(np.prod(shape)) * 4
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def test_a_sparse_safetensors_declaring_an_extra_6_gb_tensor_is_refused_from_its_header(tmp_path):
    path = tmp_path / "w.safetensors"
    header, size = _header(STATE, {"extra": (3 * 2**29,)})
    _safetensors(path, header, size, sparse=True)
    assert path.stat().st_size > 6 * 2**30
    refused(path, "weights hold unexpected key 'extra'")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda h, n: (h, n - 4),
            "declares bytes",
        ),  # the last tensor runs past the end of the file
        (
            lambda h, n: ({**h, "out_proj.bias": {**h["out_proj.bias"], "shape": [17]}}, n),
            "has shape (17,), expected (16,)",
        ),
        (
            lambda h, n: ({**h, "out_proj.bias": {**h["out_proj.bias"], "dtype": "I64"}}, n),
            "has dtype i64",
        ),
        (
            lambda h, n: (
                {**h, "out_proj.bias": {**h["out_proj.bias"], "data_offsets": [0, 64]}},
                n,
            ),
            "do not cover its 4352 bytes of data exactly once",
        ),
        (lambda h, n: (h, n + 100), "do not cover"),
        (
            lambda h, n: ({**h, "out_proj.bias": {"dtype": "F32"}}, n),
            "lacks a dtype, a shape or two data_offsets",
        ),
    ],
)
def test_safetensors_declarations_are_checked_against_the_file_and_the_spec(
    tmp_path, mutate, message
):
    path = tmp_path / "w.safetensors"
    _safetensors(path, *mutate(*_header(STATE)))
    refused(path, message)


def test_a_safetensors_header_length_past_the_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    refused(path, "its header declares 4611686018427387904 bytes, more than the file's 2")


# .pt -----------------------------------------------------------------------------------------


def test_a_pt_declaring_more_data_than_the_spec_needs_is_refused_before_torch_load(
    tmp_path, monkeypatch
):
    path = tmp_path / "w.pt"
    torch.save(
        {**{k: torch.from_numpy(v) for k, v in STATE.items()}, "extra": torch.zeros(2**24)}, path
    )
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    refused(path, "declares 67")


@pytest.mark.parametrize(
    ("dtype", "suffix"),
    [
        (d, s)
        for d in ("int8", "bool", "complex64", "float8_e4m3fn")
        for s in (".pt", ".safetensors", ".npz")
        if (d, s) != ("float8_e4m3fn", ".npz")
    ],
)
def test_one_dtype_rule_for_every_format(tmp_path, dtype, suffix):
    """int8, bool, complex and float8 weights are refused alike: a cast would compute something else."""
    state = {k: torch.from_numpy(v) for k, v in STATE.items()}
    state["in_proj_bias"] = state["in_proj_bias"].to(getattr(torch, dtype))
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file as save_torch

        save_torch(state, str(path))
    else:  # NumPy has no float8 to write into an .npz
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    refused(path, "weight 'in_proj_bias' has dtype")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation of quantized tensors
@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda v: v.to_sparse(), "a sparse"),
        (lambda v: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8), "a quantized"),
        (lambda v: torch.empty(v.shape, device="meta"), "a meta (data-less)"),
    ],
)
def test_sparse_quantized_and_meta_tensors_in_a_pt_are_refused(tmp_path, make, kind):
    path = tmp_path / "w.pt"
    state = {k: torch.from_numpy(v) for k, v in STATE.items()}
    state["out_proj.weight"] = make(state["out_proj.weight"])
    torch.save(state, path)
    refused(path, f"weight 'out_proj.weight' is {kind} tensor")


# Weights past fp16's range --------------------------------------------------------------------


def test_weights_past_fp16s_range_are_refused_with_precision_fp16(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({**STATE, "out_proj.bias": np.full(16, 1e5, np.float32)}, str(path))
    common = ["--embed-dim", "16", "--num-heads", "2", "--weights", str(path), "--quiet"]
    assert (
        compile_script.main([*common, "--precision", "fp16", "--out", str(tmp_path / "half")]) == 2
    )
    err = capsys.readouterr().err
    assert (
        "weight 'out_proj.bias' holds values up to 1e+05, beyond float16's range" in err
        and err.count("\n") == 1
    )
    assert not (tmp_path / "half").exists()
    assert compile_script.main([*common, "--out", str(tmp_path / "full")]) == 0  # fp32 holds them
    model = tmp_path / "full" / "model.onnx"
    assert (
        compile_script.main(
            ["--onnx", str(model), "--precision", "fp16", "--out", str(tmp_path / "ingested")]
        )
        == 2
    )
    assert "holds values up to 1e+05, beyond float16's range" in capsys.readouterr().err


# --onnx graphs ----------------------------------------------------------------------------------

import os  # noqa: E402

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graphs.onnx_files import IngestError, load_onnx  # noqa: E402


def _external(folder, *, length=None, offset=None, location="w.bin", data=16):
    """A 4-float initializer stored in ``location`` with the declared ``offset`` and ``length``."""
    folder.mkdir(exist_ok=True)
    if data is not None and not (folder / location).exists():
        (folder / location).write_bytes(np.arange(data // 4, dtype=np.float32).tobytes())
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.float_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            tensor.external_data.add(key=key, value=str(value))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [tensor],
    )
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (
            dict(length=3 * 2**30),
            "declaring bytes 0 to 3221225472, past the end of its 16-byte file",
        ),
        (dict(length=8), "declaring 8 bytes where its dtype and dims [4] need 16"),
        (dict(offset=32, length=16), "declaring bytes 32 to 48, past the end of its 16-byte file"),
        (dict(offset=-4), "declaring bytes -4 to 16, past the end"),
        (dict(length="many"), "with an offset or length that is not a number"),
        (
            dict(location="w\0.bin", data=None),
            "which is not a file name (empty, not UTF-8, or holding a NUL byte)",
        ),
        (
            dict(data=32),
            "declaring 32 bytes where its dtype and dims [4] need 16",
        ),  # no length: the rest of the file
    ],
)
def test_external_data_declarations_are_checked_before_reading(tmp_path, declared, message):
    path = _external(tmp_path / "model", **declared)
    with Bounded(), pytest.raises(IngestError) as info:
        load_onnx(path)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_hard_linked_external_data_is_refused_and_genuine_data_loads(tmp_path):
    path = _external(tmp_path / "model")
    np.testing.assert_array_equal(
        numpy_helper.to_array(load_onnx(path).graph.initializer[0]), np.arange(4)
    )
    os.link(tmp_path / "model" / "w.bin", tmp_path / "elsewhere.bin")
    with pytest.raises(IngestError, match="a file with 2 hard links"):
        load_onnx(path)


def test_a_bad_external_data_file_is_exit_2_from_the_cli(tmp_path, capsys):
    path = _external(tmp_path / "model", length=3 * 2**30)
    assert compile_script.main(["--onnx", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "past the end of its 16-byte file" in err
        and not (tmp_path / "out").exists()
    )


def _core(
    path, *, opset=18, axis=None, scale=0.25, extra_outputs=(), extra_input=None, repeat_name=False
):
    """Heads-split attention (N, 2, L, 4) as an exporter writes it: Softmax(q @ K^T * scale) @ v."""
    shape = ["N", 2, "L", 4]
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="transpose"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node(
            "Mul", ["scores", "scale"], ["scaled"], name="scores" if repeat_name else "scale"
        ),
        helper.make_node(
            "Softmax",
            ["scaled"],
            ["probs"],
            name="softmax",
            **({} if axis is None else {"axis": axis}),
        ),
        helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
        helper.make_node("Identity", ["context"], ["out"], name="out"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)]
    for name in extra_outputs:
        outputs.append(
            helper.make_tensor_value_info(
                name, TensorProto.FLOAT, ["N", 2, "L", "L"] if name == "probs" else shape
            )
        )
    if extra_input is not None:
        inputs.append(helper.make_tensor_value_info("extra", extra_input, ["N"]))
        nodes.append(helper.make_node("Identity", ["extra"], ["extra_out"]))
        outputs.append(helper.make_tensor_value_info("extra_out", extra_input, ["N"]))
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(np.array(scale, np.float32), "scale")]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def _compile(tmp_path, capsys, source, target, *extra):
    out = tmp_path / f"out-{target}-{len(list(tmp_path.iterdir()))}"
    status = compile_script.main(
        ["--onnx", str(source), "--target", target, "--check", "--out", str(out), *extra]
    )
    captured = capsys.readouterr()
    return status, captured.out, captured.err, out


@pytest.mark.parametrize("target", ["onnx-attention", "ort-cpu"])
def test_softmax_axes_follow_each_opsets_rule(tmp_path, capsys, target):
    """Opset 12's Softmax defaults to axis 1 and flattens there: not attention over keys, so it is left
    alone (it was fused, 13.6 off); with axis 3 it is, and it fuses."""
    status, out, err, _ = _compile(
        tmp_path, capsys, _core(tmp_path / "default.onnx", opset=12), target
    )
    assert (
        status == 0
        and "not an attention core: it does not normalise over the key axis alone" in out
    ), err
    status, out, err, _ = _compile(
        tmp_path, capsys, _core(tmp_path / "last.onnx", opset=12, axis=3), target
    )
    assert status == 0 and "fused: attention at Softmax 'probs'" in out, err


def test_opset_upgrade_keeps_an_opset_12_softmax_exact():
    """onnxscript's converter carries Softmax-12 over unchanged; our pass adapts it first."""
    import onnxruntime as ort

    from compiler import compile_model

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    upgraded = compile_model(model, "onnx-attention")
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    run = [
        ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        for m in (model, upgraded)
    ]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-6)
    assert np.allclose(run[0].reshape(2, 12).sum(1), 1) and [
        o.name for o in upgraded.graph.output
    ] == ["y"]


@pytest.mark.parametrize("target", ["onnx-attention", "ort-cpu"])
def test_a_negative_scale_is_left_unfused_with_its_reason(tmp_path, capsys, target):
    status, out, err, _ = _compile(
        tmp_path, capsys, _core(tmp_path / "m.onnx", scale=-0.25), target
    )
    assert status == 0, err
    assert (
        "left alone: attention at Softmax 'probs': its scale (-0.25) is not a positive number"
        in out
    )


@pytest.mark.parametrize("outputs", [("context",), ("probs",)])
@pytest.mark.parametrize("target", ["onnx-attention", "ort-cpu"])
def test_a_core_value_that_is_a_graph_output_keeps_its_name_and_type(
    tmp_path, capsys, outputs, target
):
    status, out, err, folder = _compile(
        tmp_path, capsys, _core(tmp_path / "m.onnx", extra_outputs=outputs), target
    )
    assert status == 0 and "PASS" in out, err
    model = onnx.load(folder / "model.onnx")
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [
        ("out", TensorProto.FLOAT),
        (outputs[0], TensorProto.FLOAT),
    ]


@pytest.mark.parametrize(
    ("make", "check", "message"),
    [
        (lambda p: _core(p, repeat_name=True), False, "ONNX Runtime cannot load"),
        (
            lambda p: _core(p, extra_input=TensorProto.BFLOAT16),
            True,
            "input 'extra' is bfloat16, so --check and --latency cannot make it",
        ),
        (
            lambda p: _core(p, extra_input=TensorProto.STRING),
            True,
            "input 'extra' is string, so --check and --latency cannot make it",
        ),
    ],
)
def test_graphs_onnx_runtime_or_the_check_cannot_take_are_one_line(
    tmp_path, capsys, make, check, message
):
    source = make(tmp_path / "m.onnx")
    out = tmp_path / "out"
    status = compile_script.main(
        [
            "--onnx",
            str(source),
            "--target",
            "portable",
            *(["--check"] if check else []),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err and not out.exists(), err


def test_a_graph_without_inputs_is_one_line(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "c")],
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert (
        compile_script.main(["--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "out")])
        == 2
    )
    assert "has no inputs: it computes a constant" in capsys.readouterr().err


def test_a_compiled_graph_onnx_runtime_refuses_is_never_written(tmp_path, capsys, monkeypatch):
    """Every written model loads in ONNX Runtime first: a pass that broke one is exit 3, nothing written."""
    import attention_compiler.artifacts.pipeline as pipeline

    real = pipeline.compile_model

    def broken(*args, **kwargs):
        model = real(*args, **kwargs)
        model.graph.node.append(
            helper.make_node("NoSuchOp", ["query"], ["unused"], domain="com.example")
        )
        model.opset_import.append(helper.make_opsetid("com.example", 1))
        return model

    monkeypatch.setattr(pipeline, "compile_model", broken)
    assert (
        compile_script.main(
            ["--embed-dim", "8", "--num-heads", "2", "--out", str(tmp_path / "out")]
        )
        == 3
    )
    err = capsys.readouterr().err
    assert "the compiled model does not load in ONNX Runtime" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def _overridable_scale_core(path):
    """The core with its ``scale`` initializer also listed as a graph input, as
    ``keep_initializers_as_inputs=True`` exports every weight."""
    model = onnx.load(_core(path))
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    onnx.save(model, path)
    return model


@pytest.mark.parametrize("target", ["portable", "onnx-attention", "ort-cpu", "tensorrt"])
def test_an_initializer_that_is_also_an_input_is_never_baked_in(tmp_path, capsys, target):
    """Fused with the scale as a constant, the compiled graph still listed 'scale' as an input but
    ignored what was fed (0.28 off at scale 0.1), and --check passed: it never fed it."""
    import onnxruntime as ort

    original = _overridable_scale_core(tmp_path / "m.onnx")
    extra = ["--allow-no-engine"] if target == "tensorrt" else []
    status, out, err, folder = _compile(tmp_path, capsys, tmp_path / "m.onnx", target, *extra)
    assert status == 0, err
    assert "'scale' reads an initializer the graph also lists as an input" in out
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 2, 5, 4)).astype(np.float32) for n in "qkv"}
    feeds["scale"] = np.array(0.1, np.float32)
    compiled = ort.InferenceSession(str(folder / "model.onnx"))
    assert [i.name for i in compiled.get_overridable_initializers()] == ["scale"]
    want = ort.InferenceSession(original.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(compiled.run(None, feeds)[0], want, rtol=1e-5, atol=1e-6)


def test_the_check_feeds_initializers_that_are_also_inputs(tmp_path):
    """A graph that baked the scale in passes on the defaults alone; fed, it fails."""
    from runtime.check import check_against_graph
    from runtime.graph_inputs import overridden_initializers
    from runtime.ort import OrtSession

    original = _overridable_scale_core(tmp_path / "m.onnx")
    baked = onnx.load(_core(tmp_path / "baked.onnx"))  # scale a constant, not an input
    sessions = OrtSession(baked), OrtSession(original)
    assert check_against_graph(*sessions).passed
    report = check_against_graph(*sessions, overrides=overridden_initializers(original))
    assert not report.passed and report.worst_rel_error > 1e-2


def _chained_cores(path):
    """Two cores with nothing between them: the first's context is the second's q, k and v."""
    shape = ["N", 2, "L", 4]
    nodes = []
    for i, (q, k, v, out) in enumerate([("q", "k", "v", "c0"), ("c0", "c0", "c0", "c1")]):
        nodes += [
            helper.make_node("Transpose", [k], [f"kt{i}"], perm=[0, 1, 3, 2], name=f"t{i}"),
            helper.make_node("MatMul", [q, f"kt{i}"], [f"s{i}"], name=f"s{i}"),
            helper.make_node("Mul", [f"s{i}", "scale"], [f"sc{i}"], name=f"m{i}"),
            helper.make_node("Softmax", [f"sc{i}"], [f"p{i}"], axis=-1, name=f"sm{i}"),
            helper.make_node("MatMul", [f"p{i}", v], [out], name=f"c{i}"),
        ]
    graph = helper.make_graph(
        nodes,
        "chained",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
        [helper.make_tensor_value_info("c1", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(0.5, np.float32), "scale")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("target", ["onnx-attention", "ort-cpu"])
def test_two_cores_chained_with_nothing_between_fuse_both(tmp_path, capsys, target):
    """The second core's q, k and v were the first's old output, produced by nothing once the
    first was fused: 'Nodes in a graph must be topologically sorted', exit 3."""
    status, out, err, _ = _compile(tmp_path, capsys, _chained_cores(tmp_path / "m.onnx"), target)
    assert status == 0, err
    assert out.count("fused: attention at Softmax") == 2 and "PASS" in out


def _declared(path, dims, elem_type=TensorProto.FLOAT):
    """A Softmax over an input declared with ``dims``."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", elem_type, dims)],
        [helper.make_tensor_value_info("y", elem_type, dims)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _flagged(path):
    """An If on a scalar bool input: a Softmax on one branch, the input on the other."""
    x = helper.make_tensor_value_info
    then = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["t"], axis=-1)], "then", [], [x("t", 1, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [x("e", 1, None)]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [x("x", TensorProto.FLOAT, ["batch", 4]), x("flag", TensorProto.BOOL, [])],
        [x("y", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _sparse(path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    values = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    indices = helper.make_tensor("w_indices", TensorProto.INT64, [1], [0])
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [3]))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: _declared(p, ["batch", 2**40]),
            "input 'x' at shape (5, 1099511627776) would take more than 1 GiB",
        ),
        (lambda p: _declared(p, ["batch", -3]), "input 'x' of '"),
        (_sparse, "holds sparse initializers ('w'), which this compiler does not read"),
        (
            lambda p: _declared(p, ["batch", 4], TensorProto.FLOAT8E4M3FN),
            "is not a valid ONNX model: [ShapeInferenceError]",
        ),
    ],
)
def test_graph_declarations_the_check_cannot_take_are_one_line(tmp_path, capsys, make, message):
    """Input dims of 2^40 (MemoryError), negative dims (ValueError), a sparse initializer and an
    op given a type its opset lacks (InferenceError) were exit 3."""
    status, out, err, folder = _compile(tmp_path, capsys, make(tmp_path / "m.onnx"), "ort-cpu")
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not folder.exists()


def test_a_scalar_flag_input_is_drawn_for_the_check(tmp_path, capsys):
    """A scalar bool (an If's predicate) was a TypeError while drawing the check's inputs."""
    status, out, err, _ = _compile(tmp_path, capsys, _flagged(tmp_path / "m.onnx"), "ort-cpu")
    assert status == 0 and "PASS" in out, err


def test_npz_member_names_that_would_break_the_line_are_shown_as_literals(tmp_path, capsys):
    """A member named with a newline split the one-line error in two."""
    import zipfile

    path = tmp_path / "inputs.npz"
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 2, 1, 4), np.float32))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("q\nsecond line.npy", buffer.getvalue())
    model = _core(tmp_path / "m.onnx")
    status, out, err, _ = _compile(tmp_path, capsys, model, "ort-cpu", "--inputs", str(path))
    assert status == 2 and err.count("\n") == 1, err
    assert "holds 'q\\nsecond line'; the graph takes q, k, v (missing q, k, v)" in err
