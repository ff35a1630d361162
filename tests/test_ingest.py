"""--onnx ingest: the attention inside torch.onnx.export(dynamo=True) graphs of torch's own modules
fuses on every fusing target, and the fused graph computes what the exported graph computed
(ONNX Runtime CPU, fp32: 1e-5 of scale) and what torch computes (float64)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

from compiler import attention_form, compile_model, get_target
from compiler.ingest import fusion_findings
from graphs.onnx_files import IngestError, load_onnx
from runtime.check import FP32_TOLERANCE, check_against_graph
from runtime.graph_inputs import graph_inputs
from runtime.ort import OrtSession
from runtime.signature import InputError

torch = pytest.importorskip("torch")

E, H = 48, 4  # head_dim 12: the exporter's sqrt(scale) on q and k is not exact, so rounding differs


class _Mha(torch.nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.attn, self.masked = torch.nn.MultiheadAttention(E, H, batch_first=True), masked

    def forward(self, query, *masks):
        kpm, am = masks if self.masked else (None, None)
        return self.attn(
            query, query, query, key_padding_mask=kpm, attn_mask=am, need_weights=False
        )[0]


class _Encoder(torch.nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.layer, self.masked = (
            torch.nn.TransformerEncoderLayer(E, H, 96, batch_first=True, dropout=0.0),
            masked,
        )

    def forward(self, src, *masks):
        return self.layer(src, src_key_padding_mask=masks[0] if masks else None)


class _Decoder(torch.nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.layer, self.masked = torch.nn.TransformerDecoderLayer(E, H, 96, dropout=0.0), masked

    def forward(self, tgt, memory, *masks):
        tgt_mask, memory_kpm = masks if masks else (None, None)
        return self.layer(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_kpm)


def _example(kind: str, masked: bool):
    torch.manual_seed(0)
    module = {"mha": _Mha, "encoder": _Encoder, "decoder": _Decoder}[kind](masked).eval()
    for p in module.parameters():  # torch zero-initialises biases, which would hide a lost bias
        torch.nn.init.normal_(p, std=0.2)
    n, l, s = 2, 6, 7
    if kind == "mha":
        args = [torch.randn(n, l, E)]
        dims = [{0: "batch", 1: "seq"}]
        if masked:
            args += [torch.rand(n, l) < 0.3, torch.randn(l, l)]
            dims += [{0: "batch", 1: "seq"}, {0: "seq", 1: "seq"}]
    elif kind == "encoder":
        args, dims = [torch.randn(n, l, E)], [{0: "batch", 1: "seq"}]
        if masked:
            args.append(torch.rand(n, l) < 0.3)
            dims.append({0: "batch", 1: "seq"})
    else:
        args = [torch.randn(l, n, E), torch.randn(s, n, E)]
        dims = [{0: "tgt_len", 1: "batch"}, {0: "src_len", 1: "batch"}]
        if masked:
            args += [
                torch.nn.Transformer.generate_square_subsequent_mask(l),
                torch.rand(n, s) < 0.3,
            ]
            dims += [{0: "tgt_len", 1: "tgt_len"}, {0: "batch", 1: "src_len"}]
    for mask in args[1:]:
        if mask.dtype == torch.bool:
            mask[..., 0] = False  # no fully padded entry: torch gives NaN there
    # forward(x, [memory,] *masks): the masks' dims nest as one tuple
    fixed = 2 if kind == "decoder" else 1
    masks = (tuple(dims[fixed:]),) if masked else ()
    return module, tuple(args), (*dims[:fixed], *masks)


CASES = [(kind, masked) for kind in ("mha", "encoder", "decoder") for masked in (False, True)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kind, masked) -> (module, example args, path of its exported graph); exporting takes seconds each."""
    folder = tmp_path_factory.mktemp("exported")
    out = {}
    for kind, masked in CASES:
        module, args, dims = _example(kind, masked)
        path = folder / f"{kind}-{masked}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=dims, verbose=False
            )
        onnx.save(program.model_proto, path)
        out[kind, masked] = (module, args, path)
    return out


@pytest.mark.parametrize("target", ["onnx-attention", "ort-cpu", "tensorrt"])
@pytest.mark.parametrize(("kind", "masked"), CASES)
def test_exported_attention_fuses_and_keeps_outputs(exported, kind, masked, target):
    module, args, path = exported[kind, masked]
    original = load_onnx(path)
    form = "attention-op" if target == "tensorrt" else None
    compiled = compile_model(original, target, form=form)
    onnx.checker.check_model(compiled, full_check=True)
    cores = 2 if kind == "decoder" else 1
    softmaxes = [n for n in original.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == cores
    # a masked core on ort-cpu runs in query blocks, inside an If (compiler/lowerings/)
    fused = [
        n for n in compiled.graph.node if n.op_type in ("Attention", "MultiHeadAttention", "If")
    ]
    assert len(fused) == cores and not any(n.op_type == "Softmax" for n in compiled.graph.node)
    findings = fusion_findings(
        original, compiled, get_target(target, form=form)[1], attention_form(compiled)
    )
    assert [f.fused for f in findings] == [True] * cores

    report = check_against_graph(OrtSession(compiled), OrtSession(original))
    assert report.passed, report.table()
    # and against torch itself, in float64, on the example inputs
    feeds = {i.name: a.numpy() for i, a in zip(OrtSession(original).inputs, args)}
    got = next(iter(OrtSession(compiled).run(feeds).values()))
    with torch.no_grad():
        want = module.double()(*(a.double() if a.is_floating_point() else a for a in args)).numpy()
    module.float()
    assert np.abs(got - want).max() <= FP32_TOLERANCE * np.abs(want).max()


class _ConstantMask(torch.nn.Module):
    """SDPA with a mask built from constants, as transformers' ViT passes an all-visible one."""

    def __init__(self, hidden: int):
        super().__init__()
        self.qkv = torch.nn.Linear(E, 3 * E)
        self.register_buffer("visible", torch.ones(6, 6, dtype=torch.bool))
        self.visible[..., 2] = not hidden

    def forward(self, x):
        n, l, _ = x.shape
        q, k, v = (t.reshape(n, l, H, E // H).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        context = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.visible)
        return context.transpose(1, 2).reshape(n, l, E)


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
@pytest.mark.parametrize("hidden", [False, True], ids=["all-visible", "one-key-hidden"])
def test_a_constant_mask_that_hides_nothing_is_dropped(tmp_path, target, hidden):
    """A mask that constants make all-visible adds 0 to every score: the fused op gets no mask (so
    ONNX Runtime's CPU MultiHeadAttention keeps its flash path) and computes the same; one hidden key
    keeps it."""
    torch.manual_seed(0)
    module = _ConstantMask(hidden).eval()
    x = torch.randn(2, 6, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(
            torch.onnx.export(module, (x,), dynamo=True, verbose=False).model_proto,
            tmp_path / "m.onnx",
        )
    original = load_onnx(tmp_path / "m.onnx")
    compiled = compile_model(original, target)
    fused = [n for n in compiled.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]
    assert len(fused) == 1
    op = fused[0]
    mask_inputs = {
        "MultiHeadAttention": (4, 5),
        "Attention": (3, 5) if op.domain == "com.microsoft" else (3,),
    }
    masks = [op.input[i] for i in mask_inputs[op.op_type] if i < len(op.input) and op.input[i]]
    assert bool(masks) == hidden, list(op.input)
    got = next(iter(OrtSession(compiled).run({"x": x.numpy()}).values()))
    with torch.no_grad():
        want = module.double()(x.double()).numpy()
    assert np.abs(got - want).max() <= FP32_TOLERANCE * np.abs(want).max()


class _Layer(torch.nn.Module):
    """Attention written out, its scale computed from the shape at run time ((E / H) ** 0.5)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E)

    def forward(self, x):
        n, l, e = x.shape
        q, k, v = (t.reshape(n, l, H, e // H).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        p = torch.softmax(q @ k.transpose(-1, -2) / (e // H) ** 0.5, dim=-1)
        return self.out((p @ v).transpose(1, 2).reshape(n, l, e))


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = _Layer(), _Layer()

    def forward(self, x):
        return self.second(self.first(x) + x)


def _exported(module: torch.nn.Module, args: tuple, folder, **options) -> onnx.ModelProto:
    """``module`` through torch.onnx.export (its warnings silenced), loaded as --onnx loads it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, folder / "m.onnx", **options)
    return load_onnx(folder / "m.onnx")


def _compiled(original: onnx.ModelProto, target: str):
    """The compiled graph and its per-Softmax findings."""
    compiled = compile_model(original, target)
    return compiled, fusion_findings(
        original, compiled, get_target(target)[1], attention_form(compiled)
    )


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
def test_attention_inside_model_local_functions_fuses(tmp_path, target):
    """torch's legacy exporter with export_modules_as_functions puts each layer in a model-local
    function; the targets inline them first, so both cores fuse, and the graph computes what torch
    does (float64 reference, 1e-5 of scale)."""
    torch.manual_seed(0)
    module = _TwoLayers().eval()
    x = torch.randn(2, 6, E)
    original = _exported(
        module,
        (x,),
        tmp_path,
        dynamo=False,
        export_modules_as_functions={_Layer},
        input_names=["x"],
        dynamic_axes={"x": {0: "batch", 1: "seq"}},
    )
    assert [f.name for f in original.functions] == ["_Layer"] and not any(
        n.op_type == "Softmax" for n in original.graph.node
    )
    compiled, findings = _compiled(original, target)
    assert [f.fused for f in findings] == [True, True] and not compiled.functions
    got = next(iter(OrtSession(compiled).run({"x": x.numpy()}).values()))
    with torch.no_grad():
        want = module.double()(x.double()).numpy()
    assert np.abs(got - want).max() <= FP32_TOLERANCE * np.abs(want).max()


class _EitherLayer(torch.nn.Module):
    """Two attention layers behind torch.cond: the dynamo exporter writes an If with one in each branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = (torch.nn.MultiheadAttention(E, 4, batch_first=True) for _ in range(2))

    def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return torch.cond(
            flag.sum() > 0,
            lambda x: self.a(x, x, x, need_weights=False)[0],
            lambda x: self.b(x, x, x, need_weights=False)[0],
            (x,),
        )


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
def test_attention_inside_if_branches_fuses(tmp_path, target):
    """torch.cond exports as an If whose branches hold the layers: both cores fuse where they are,
    the report finds them, and each branch computes what torch does (float64, 1e-5 of scale)."""
    from compiler.targets import every_node

    torch.manual_seed(0)
    module = _EitherLayer().eval()
    x = torch.randn(2, 6, E)
    original = _exported(
        module,
        (x, torch.ones(1)),
        tmp_path,
        dynamo=True,
        dynamic_shapes=({0: "batch", 1: "seq"}, None),
    )
    assert [n.op_type for n in original.graph.node if n.op_type == "If"] == ["If"]
    assert not any(n.op_type == "Softmax" for n in original.graph.node)
    compiled, findings = _compiled(original, target)
    assert [f.fused for f in findings] == [True, True], [str(f) for f in findings]
    assert not any(n.op_type == "Softmax" for n in every_node(compiled.graph))
    # the branches read the constants the fusion put in the main graph
    onnx.checker.check_model(compiled)
    session = OrtSession(compiled)
    for flag, layer in ((1.0, module.a), (-1.0, module.b)):
        got = next(
            iter(
                session.run(
                    {
                        name: value
                        for name, value in zip(
                            [i.name for i in compiled.graph.input],
                            (x.numpy(), np.array([flag], np.float32)),
                        )
                    }
                ).values()
            )
        )
        with torch.no_grad():
            want = layer.double()(*(x.double(),) * 3, need_weights=False)[0].numpy()
        assert np.abs(got - want).max() <= FP32_TOLERANCE * np.abs(want).max(), flag


def test_portable_leaves_exported_attention_alone_and_says_so(exported):
    _, _, path = exported["decoder", True]
    original = load_onnx(path)
    compiled = compile_model(original, "portable")
    findings = fusion_findings(
        original, compiled, get_target("portable")[1], attention_form(compiled)
    )
    assert len(findings) == 2 and not any(f.fused for f in findings)
    assert all("keeps MatMul-Softmax-MatMul" in str(f) for f in findings)


def test_cli_ingests_prints_what_it_fused_and_checks(exported, run_cli, tmp_path):
    _, _, path = exported["encoder", True]
    result = run_cli(
        "compile.py", "--onnx", path, "--target", "ort-cpu", "--check", "--out", tmp_path / "o"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "fused: attention at Softmax" in result.stdout
        and "com.microsoft.MultiHeadAttention" in result.stdout
    )
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["fusion"][0]["fused"] and manifest["check"]["passed"]
    assert [i["name"] for i in manifest["inputs"]] == [i.name for i in OrtSession(str(path)).inputs]


def test_cli_refuses_spec_flags_with_onnx(exported, run_cli, tmp_path):
    _, _, path = exported["mha", False]
    result = run_cli("compile.py", "--onnx", path, "--embed-dim", 8, "--out", tmp_path / "o")
    assert (
        result.returncode == 2
        and "--onnx compiles the graph as it is; drop --embed-dim" in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.float_data[:]
    tensor.external_data.add(key="location", value="../../etc/passwd")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [tensor],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(IngestError, match="not a file inside the model's folder"):
        load_onnx(path)


def test_a_corrupt_file_is_one_clear_error(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x00not a model")
    with pytest.raises(IngestError, match="is not"):
        load_onnx(path)


def test_graph_inputs_draw_rows_with_no_key_left():
    """Entry 0 keeps its first key; entry 1 is left-padded (a causal mask then leaves its first rows
    no key); entry 2 hides every key: a check meets the rows where fused kernels differ."""
    session = OrtSession(_tiny_masked_graph())
    feeds = graph_inputs(session.inputs, {"n": 50}, np.random.default_rng(0), mask_rate=0.9)
    mask = feeds["mask"]
    assert mask.shape == (50, 50) and not mask[0, 0] and mask[0].mean() > 0.8
    assert mask[1, :16].all() and not mask[1, 16:].any()
    assert mask[2].all() and not mask[3:, 0].any()


def test_the_check_finds_an_axis_the_graph_computes_from_two_others():
    """A decoder with its cache takes a mask as long as the cache and the new tokens together, an
    axis its declaration does not tie to the other two: drawn at sizes of their own, the input graph
    refuses them; the check then draws that axis at the sum of two others, and passes."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Concat", ["past", "new"], ["joined"], axis=0),
            helper.make_node("Add", ["joined", "mask"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("past", TensorProto.FLOAT, ["past_len"]),
            helper.make_tensor_value_info("new", TensorProto.FLOAT, ["seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["total"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["total"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    report = check_against_graph(OrtSession(model, quiet=True), OrtSession(model, quiet=True))
    assert report.passed and [c.shape for c in report.comparisons] == [(5,), (11,)]  # past's


def _tiny_masked_graph() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Not", ["mask"], ["y"])],
        "g",
        [helper.make_tensor_value_info("mask", TensorProto.BOOL, ["n", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, ["n", "n"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _token_model(path):
    """ids -> Cast -> Gather(table of 50 rows); + a 0/1 attention_mask as a float bias: a text model's inputs."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "table"
    )
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["table", "ids32"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["keep"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["keep", "axis"], ["keep3"]),
        helper.make_node("Mul", ["embedded", "keep3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
        [table, numpy_helper.from_array(np.array([-1], np.int64), "axis")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_token_ids_are_drawn_inside_the_embedding_table_and_masks_pad_keys(tmp_path):
    from runtime.graph_inputs import index_ranges

    model = onnx.load(_token_model(tmp_path / "m.onnx"))
    ranges = index_ranges(model)
    assert ranges == {"input_ids": 50}  # found through the Cast; the mask reaches no table
    feeds = graph_inputs(
        OrtSession(model).inputs, {"batch": 40, "seq": 30}, np.random.default_rng(0), ranges=ranges
    )
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() == 49
    assert (
        mask.dtype == np.int64
        and set(np.unique(mask)) == {0, 1}
        and (np.delete(mask, [1, 2], axis=0)[:, 0] == 1).all()  # entries 1, 2: left, whole
        and 0.1 < 1 - np.delete(mask, [1, 2], axis=0).mean() < 0.3
    )
    with pytest.raises(
        InputError,
        match="input 'input_ids' is int64 and reaches no embedding table, so --check and "
        "--latency cannot make it; give real inputs with --inputs FILE.npz",
    ):
        graph_inputs(OrtSession(model).inputs, {}, np.random.default_rng(0))


def test_a_text_graph_is_checked_and_timed_on_token_inputs_or_the_given_ones(tmp_path, capsys):

    import compile as compile_script

    source = _token_model(tmp_path / "m.onnx")
    out = tmp_path / "out"
    assert (
        compile_script.main(
            [
                "--onnx",
                str(source),
                *"--check --latency --latency-shape 2,7,7 --quiet --out".split(),
                str(out),
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] and manifest["latency"]["inputs"] == {
        "input_ids": [2, 7],
        "attention_mask": [2, 7],
    }
    given = {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.array([[1, 1, 0]])}
    np.savez(tmp_path / "inputs.npz", **given)
    assert (
        compile_script.main(
            [
                "--onnx",
                str(source),
                *"--check --latency --inputs".split(),
                str(tmp_path / "inputs.npz"),
                "--quiet",
                "--out",
                str(tmp_path / "given"),
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "given" / "manifest.json").read_text())
    assert [c["shape"] for c in manifest["check"]["comparisons"]] == [[1, 3]]
    assert manifest["latency"]["inputs"] == {"input_ids": [1, 3], "attention_mask": [1, 3]}
    np.savez(tmp_path / "wrong.npz", input_ids=given["input_ids"])
    assert (
        compile_script.main(
            [
                "--onnx",
                str(source),
                "--check",
                "--inputs",
                str(tmp_path / "wrong.npz"),
                "--out",
                str(tmp_path / "wrong"),
            ]
        )
        == 2
    )
    assert (
        "holds input_ids; the graph takes input_ids, attention_mask (missing attention_mask)"
        in capsys.readouterr().err
    )
