"""What users bring to compile.py --onnx: Hugging Face BertModel, GPT2Model (with an attention mask),
ViTModel and LlamaModel (grouped-query attention), each with attn_implementation "sdpa" and "eager",
and torch's nn.TransformerEncoder (2 layers, a padding mask) and nn.Transformer, exported by both
torch exporters (studies/model_zoo.py, small random configs). On ort-cpu and onnx-attention every attention core fuses, and the compiled
graph equals the exported one within 1e-5 of scale on token, mask and pixel inputs compile.py draws
itself (float32 rounding through the fused kernels stays near 1e-7).
"""

from __future__ import annotations

import dataclasses
import json

import model_zoo
import numpy as np
import pytest

from attention_compiler.cli import compile as compile_script
from compiler.targets import every_node

SIZE = model_zoo.Size(hidden=64, heads=4, layers=1, image=32)
ENCODER = model_zoo.Size(
    hidden=64, heads=4, layers=2
)  # nn.TransformerEncoder with 2 layers, as users stack them; ModernBERT's second layer is local
FIRST = ("bert", "gpt2", "vit", "llama", "torch-encoder", "torch-transformer")
# the first six families, every implementation and exporter, one layer each (the layers repeat) but the
# encoder; Llama (grouped-query attention, rotary embeddings) in two of its four forms, for the suite's time
ENTRIES = [
    model_zoo.Entry(e.family, e.implementation, e.exporter, ENCODER)
    if e.family == "torch-encoder"
    else e
    for e in model_zoo.entries(SIZE, FIRST)
    if e.family != "llama" or e.name in ("llama-sdpa-dynamo", "llama-eager-legacy")
]
# every other family once, by one exporter, and the legacy exporter at opsets 14 and 17 (each of
# which changed signatures the passes write: ReduceMax's axes, Shape's start)
ENTRIES += [
    model_zoo.Entry(
        family, implementation, exporter, ENCODER if family == "modernbert" else SIZE, opset
    )
    for family, implementation, exporter, opset in [
        ("bert", "sdpa", "legacy", 17),
        ("gpt2", "eager", "legacy", 14),
        ("llama", "sdpa", "legacy", 17),
        ("roberta", "sdpa", "legacy", 14),
        ("electra", "eager", "dynamo", 18),
        ("albert", "sdpa", "legacy", 17),
        ("distilbert", "sdpa", "dynamo", 18),
        ("modernbert", "sdpa", "dynamo", 18),  # a local window inside the padding
        ("clip-text", "sdpa", "legacy", 14),
        ("t5-encoder", "sdpa", "dynamo", 18),  # relative position bias
        ("bart", "sdpa", "legacy", 17),  # self-, causal and cross-attention
        ("qwen2", "sdpa", "dynamo", 18),  # left padding under a causal mask
        ("mistral", "eager", "legacy", 17),  # a sliding window
        ("phi3", "sdpa", "dynamo", 18),
        ("phi3", "sdpa", "legacy", 17),  # head count and size from the merged width
        ("opt", "sdpa", "legacy", 14),
        ("gpt-neox", "sdpa", "dynamo", 18),  # partial rotary, parallel attention
        ("gpt-neox", "sdpa", "legacy", 14),  # q, k, v sliced from one packed head split
        ("falcon", "sdpa", "legacy", 17),  # multi-query: one key/value head
        ("falcon", "eager", "dynamo", 18),
        ("whisper", "eager", "dynamo", 18),  # an audio encoder
        ("swin", "sdpa", "legacy", 17),  # shifted windows, their mask through a 5-D view
    ]
]
CORES = {
    "torch-encoder": 2,
    "torch-transformer": 3,  # the decoder layer has self- and cross-attention; else one
    "modernbert": 2,
    "bart": 3,
    "swin": 4,  # two stages of two blocks
}
# cores left unfused, each named with its reason in the report (README, "--onnx"), on these targets
UNFUSED = {
    "deberta": ("no single MatMul multiplies it with the values", ("ort-cpu", "onnx-attention")),
    "bloom": ("no single MatMul multiplies it with the values", ("ort-cpu", "onnx-attention")),
    # Gemma 2 soft-caps its scores: the Attention op's softcap takes them, MultiHeadAttention cannot
    "gemma2": ("soft-capped", ("ort-cpu",)),
    # need_weights=True: 3-D (batch*heads) MatMuls, read as 4-D on onnx-attention only
    "detr": ("its scores are 3-D", ("ort-cpu",)),
}
# decoders exported with their KV cache as inputs and outputs (Optimum's text-generation-with-past form)
WITH_PAST = [
    model_zoo.Entry("llama", "sdpa", "dynamo", SIZE, past=True),  # grouped-query
    model_zoo.Entry("gpt2", "sdpa", "legacy", SIZE, 17, past=True),
    model_zoo.Entry("qwen2", "eager", "legacy", SIZE, 14, past=True),
]
LEFT_ALONE = [
    model_zoo.Entry("deberta", "eager", "legacy", SIZE, 17),
    model_zoo.Entry("bloom", "eager", "dynamo", SIZE),
    model_zoo.Entry("gemma2", "eager", "legacy", SIZE, 17),
    model_zoo.Entry("detr", None, "dynamo", SIZE),
    model_zoo.Entry("detr", None, "legacy", SIZE, 14),
]


@pytest.fixture(scope="module")
def zoo(request, tmp_path_factory):
    """Exports kept between runs in pytest's cache folder (.pytest_cache), each under a key of the
    entry, its size, the versions of torch, transformers, onnx and onnxscript, and model_zoo.py's
    own hash (model_zoo.export): a change to any of them exports afresh."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    return cache.mkdir("model-zoo") if cache is not None else tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def exported(zoo):
    pytest.importorskip(
        "transformers",
        reason="the real-model tests export transformers models (pip install -e '.[test]')",
    )
    return {entry.name: model_zoo.export(entry, zoo) for entry in ENTRIES + LEFT_ALONE + WITH_PAST}


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_every_core_fuses_and_the_graph_computes_what_the_export_does(
    exported, tmp_path, entry, target
):
    source = exported[entry.name]
    argv = [
        "--onnx",
        str(source),
        "--target",
        target,
        "--check",
        "--quiet",
        "--out",
        str(tmp_path / "out"),
    ]
    if entry.fixed_shapes:
        # torch's legacy exporter fixes these modules' lengths at the traced ones: check at those
        np.savez(tmp_path / "inputs.npz", **model_zoo.example_inputs(entry))
        argv += ["--inputs", str(tmp_path / "inputs.npz")]
    assert compile_script.main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    cores = [
        f for f in manifest["fusion"] if f["fused"] or "not an attention core" not in f["detail"]
    ]
    assert len(cores) == CORES.get(entry.family, 1)
    assert all(f["fused"] for f in cores), [f["detail"] for f in cores if not f["fused"]]
    layers = [
        f["layer"] for f in cores
    ]  # each core named by the module it came from, one module each
    assert all(layers) and len(set(layers)) == len(layers), layers
    import onnx

    from compiler._ir import module_path

    fused = [
        n
        for n in onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph.node
        if n.op_type in ("MultiHeadAttention", "Attention", "If")
    ]  # the fused op (or the If of a masked one's
    # query blocks, compiler/lowerings/) says so too (report.html's drawing)
    assert sorted(
        module_path(n.name, {p.key: p.value for p in n.metadata_props}) for n in fused
    ) == sorted(layers)
    assert manifest["check"]["passed"] and manifest["check"]["worst_rel_error"] <= 1e-5


# both exporters, opsets 14 to 18, a decoder with its cache (grouped-query), a relative position bias
INT8_NAMES = ("bert-sdpa-dynamo", "bert-sdpa-legacy-opset17", "gpt2-eager-legacy-opset14")
INT8 = [e for e in ENTRIES if e.name in INT8_NAMES or e.family == "t5-encoder"] + [WITH_PAST[0]]


@pytest.mark.parametrize("entry", INT8, ids=lambda e: e.name)
def test_int8_keeps_every_core_fused_and_its_bound_on_real_exports(exported, tmp_path, entry):
    """--precision int8 on ort-cpu: the cores fused as in fp32 (all, but a cache step that runs
    faster left to the export), with every constant-weight MatMul (projections, feed-forward, the
    LM head) in int8, within the int8 bound against the export (relative error 5e-2, cosine
    0.999)."""
    import onnx

    from compiler.targets import every_node

    out = tmp_path / "out"
    argv = ["--onnx", str(exported[entry.name]), "--target", "ort-cpu", "--check", "--quiet"]
    assert compile_script.main([*argv, "--precision", "int8", "--out", str(out)]) == 0
    assert compile_script.main([*argv, "--out", str(tmp_path / "fp32")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    fp32 = json.loads((tmp_path / "fp32" / "manifest.json").read_text())
    assert any(f["fused"] for f in manifest["fusion"])
    assert [f["fused"] for f in manifest["fusion"]] == [f["fused"] for f in fp32["fusion"]]
    check = manifest["check"]
    assert check["passed"] and check["tolerance"] == 5e-2 and check["min_cosine"] == 0.999
    assert 1e-4 < check["worst_rel_error"] <= 5e-2  # quantized, and within the bound
    model = onnx.load(out / "model.onnx", load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    ops = [n.op_type for n in every_node(model.graph)]
    assert "MatMulInteger" in ops
    assert not [
        n for n in every_node(model.graph) if n.op_type == "MatMul" and n.input[1] in weights
    ]


@pytest.mark.parametrize("entry", INT8[:2], ids=lambda e: e.name)
def test_keep_fp32_names_a_module_of_either_exporter(exported, tmp_path, entry):
    """The module path the exporter recorded (dynamo: its name scopes; legacy: its node names)
    chooses the layers: the attention module of BERT's encoder layer keeps its four projections
    float32, the two feed-forward MatMuls go to int8."""
    import onnx

    out = tmp_path / "out"
    argv = ["--onnx", str(exported[entry.name]), "--target", "ort-cpu", "--precision", "int8"]
    keep = "inner.encoder.layer.0.attention"
    assert (
        compile_script.main([*argv, "--keep-fp32", keep, "--check", "--quiet", "--out", str(out)])
        == 0
    )
    record = json.loads((out / "manifest.json").read_text())["int8"]
    assert record["layers"] == 6 and record["quantized"] == 2
    assert sorted(k["layer"] for k in record["kept_fp32"]) == [
        f"{keep}.output.dense",
        f"{keep}.self.key",
        f"{keep}.self.query",
        f"{keep}.self.value",
    ]
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert [n.op_type for n in every_node(model.graph)].count("MatMulInteger") == 2


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
@pytest.mark.parametrize("entry", INT8, ids=lambda e: e.name)
def test_static_int8_on_real_exports_checks_within_the_bound(exported, tmp_path, entry, target):
    """Calibrated int8: portable draws its calibration inputs and writes symmetric QDQ of standard
    ops; ort-cpu calibrates on the export's own example inputs (--calibrate) in its uint8 form. The
    cores fuse as in fp32 and the check holds the int8 bound against the export."""
    import onnx

    out = tmp_path / "out"
    argv = ["--onnx", str(exported[entry.name]), "--target", target, "--precision", "int8"]
    if target == "ort-cpu":
        np.savez(tmp_path / "calib.npz", **model_zoo.example_inputs(entry))
        argv += ["--calibrate", str(tmp_path / "calib.npz")]
    assert compile_script.main([*argv, "--check", "--quiet", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["int8"]
    assert record["activations"] == "calibrated"
    # most layers in int8; any other kept by the fallback, which names it (T5's feed-forward output
    # on ort-cpu, calibrated on one batch)
    assert record["quantized"] + len(record["kept_fp32"]) == record["layers"]
    assert record["quantized"] > len(record["kept_fp32"])
    assert manifest["check"]["passed"] and 1e-4 < manifest["check"]["worst_rel_error"] <= 5e-2
    model = onnx.load(out / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in every_node(model.graph)]
    assert "DynamicQuantizeLinear" not in ops and "QuantizeLinear" in ops
    if target == "portable":
        assert all(not n.domain for n in every_node(model.graph))
    else:
        assert any(f["fused"] for f in manifest["fusion"])


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
@pytest.mark.parametrize("entry", LEFT_ALONE, ids=lambda e: e.name)
def test_attention_left_unfused_is_named_with_its_reason_and_the_graph_still_checks(
    exported, tmp_path, entry, target
):
    """DeBERTa and BLOOM, and Gemma 2 and a DETR-style head on ort-cpu: each Softmax is listed with
    the reason its core is left alone (on onnx-attention Gemma 2's soft cap fuses into the
    Attention op's softcap, and the DETR head's 3-D cores into it as 4-D), and the graph still
    computes what the export does."""
    out = tmp_path / "out"
    argv = ["--onnx", str(exported[entry.name]), "--target", target, "--check", "--quiet"]
    if entry.fixed_shapes:
        np.savez(tmp_path / "inputs.npz", **model_zoo.example_inputs(entry))
        argv += ["--inputs", str(tmp_path / "inputs.npz")]
    assert compile_script.main([*argv, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reason, targets = UNFUSED[entry.family]
    if target in targets:
        reasons = [f["detail"] for f in manifest["fusion"] if reason in f["detail"]]
        assert reasons and not any(f["fused"] for f in manifest["fusion"]), manifest["fusion"]
    else:
        cores = [
            f
            for f in manifest["fusion"]
            if f["fused"] or "not an attention core" not in f["detail"]
        ]
        assert cores and all(f["fused"] for f in cores), manifest["fusion"]
    assert manifest["check"]["passed"]


@pytest.mark.parametrize("entry", WITH_PAST, ids=lambda e: e.name)
def test_decoders_with_their_cache_fuse_and_decode_the_exports_tokens(exported, entry):
    """32 greedy tokens, a left-padded prompt, the cache fed back each step: every core fused on
    onnx-attention, and on ort-cpu where the export repeats grouped keys and values or its mask
    needs no dead-row guard (GroupQueryAttention on the cache, whose present outputs are the
    graph's; elsewhere left unfused with the reason); each compiled graph decodes exactly the
    export's tokens."""
    import onnxruntime as ort

    from compiler import compile_model
    from compiler.ingest import fusion_findings
    from compiler.targets import FUSED_OPS, every_node, get_target
    from graphs.onnx_files import load_onnx

    original = load_onnx(exported[entry.name])
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 1000, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0

    def tokens(model):
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return model_zoo.greedy_tokens(lambda feeds: session.run(None, feeds), entry, prompt, mask)

    expected = tokens(original)
    grouped = {heads for heads, _ in model_zoo.cache_heads(entry).values()} != {entry.size.heads}
    fused_on_cpu = grouped or entry.exporter == "dynamo"  # the legacy one's -inf masks need a guard
    for target in ("ort-cpu", "onnx-attention"):
        compiled = compile_model(original, target)
        ops = [n.op_type for n in every_node(compiled.graph)]
        if target == "ort-cpu" and not fused_on_cpu:  # left to the export: nothing to save
            _, form = get_target(target)
            findings = fusion_findings(original, compiled, form, "")
            assert ops.count("Softmax") == entry.size.layers and not set(FUSED_OPS) & set(ops)
            assert all("does not repeat" in f.detail for f in findings), findings
        else:
            assert "Softmax" not in ops and set(FUSED_OPS) & set(ops), target
        if target == "ort-cpu" and fused_on_cpu:  # the cache as GroupQueryAttention takes it
            assert ops.count("GroupQueryAttention") == entry.size.layers
        np.testing.assert_array_equal(tokens(compiled), expected)


@pytest.mark.parametrize("entry", WITH_PAST, ids=lambda e: e.name)
def test_the_cache_step_computes_what_the_export_does_at_every_shape_of_step(exported, entry):
    """ort-cpu's GroupQueryAttention on the cache, against the export (fp32, 1e-5 relative to its
    largest output): a batch of three new tokens after a past, which the op's CPU kernel refuses
    and MultiHeadAttention takes; one entry's three tokens after a past; and one token per entry
    where an entry's every key is padding."""
    import onnxruntime as ort

    from compiler import compile_model
    from graphs.onnx_files import load_onnx

    original = load_onnx(exported[entry.name])
    sessions = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (original, compile_model(original, "ort-cpu"))
    ]
    batched = model_zoo.example_inputs(entry)  # 2 entries, 3 tokens after 5, one left-padded
    alone = {k: v[:1] for k, v in batched.items()}
    step = {k: v[:, -1:] if k == "input_ids" else v for k, v in batched.items()}
    step["attention_mask"] = step["attention_mask"].copy()
    step["attention_mask"][1] = 0  # no key left for entry 1
    for feeds in (batched, alone, step):
        expected, got = (s.run(None, feeds) for s in sessions)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * max(1.0, np.abs(e).max()))


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
def test_layers_that_read_one_bias_share_its_broadcast(zoo, target):
    """T5's encoder adds one relative position bias, built in its first layer, in every layer: the
    bias the fused op takes, broadcast to (N|1, H|1, L, S) (and on onnx-attention read as the op
    must, float32's lowest halved), is built once, outside the layers' Ifs, not copied per layer.
    Its entries are gathered from a finite table and filled with the lowest float, so no row can
    be all -inf and no NaN-row guard is built. The graph still computes what the export does."""
    import onnxruntime as ort

    from compiler import compile_model
    from compiler.targets import every_node
    from graphs.onnx_files import load_onnx

    size = dataclasses.replace(SIZE, layers=3)
    entry = model_zoo.Entry("t5-encoder", "sdpa", "legacy", size, 17)  # shapes it cannot name
    original = load_onnx(model_zoo.export(entry, zoo))
    compiled = compile_model(original, target)
    nodes = list(every_node(compiled.graph))
    expands = [n for n in nodes if n.name.endswith("/attention_bias")]
    assert len(expands) == 1 and expands[0] in compiled.graph.node, [n.name for n in expands]
    halved = [n.name for n in nodes if n.name.endswith("graph_rows/half_lowest")]
    assert len(halved) == (1 if target == "onnx-attention" else 0), halved
    assert not [n.name for n in nodes if n.op_type in ("IsInf", "IsNaN")]
    feeds = model_zoo.example_inputs(entry)
    expected, got = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, feeds
        )[0]
        for m in (original, compiled)
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("target", ["ort-cpu", "onnx-attention"])
def test_a_mask_that_cannot_hide_every_key_gets_no_dead_row_guard(exported, target):
    """BERT's sdpa export fills its mask with the lowest float (a Where between finite constants):
    no row is ever all -inf, so torch's NaN guard never fires and the fused graph computes no dead
    rows (the test above checks its outputs, fully padded entries included)."""
    from compiler import compile_model
    from compiler.targets import every_node
    from graphs.onnx_files import load_onnx

    compiled = compile_model(load_onnx(exported["bert-sdpa-dynamo"]), target)
    guards = [n.name for n in every_node(compiled.graph) if n.op_type in ("IsInf", "IsNaN")]
    assert not guards, guards


def test_a_decoder_with_its_cache_is_checked_on_inputs_it_draws(exported, tmp_path):
    """Its mask spans the cache and the new tokens: --check finds that length and passes."""
    entry = WITH_PAST[0]
    argv = ["--onnx", str(exported[entry.name]), "--target", "ort-cpu", "--check", "--quiet"]
    assert compile_script.main([*argv, "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["check"]["passed"] and manifest["check"]["worst_rel_error"] <= 1e-5


@pytest.mark.parametrize("name", ["bert-sdpa-dynamo", "gpt2-eager-legacy", "llama-sdpa-dynamo"])
def test_exported_masks_run_in_query_blocks_on_the_attention_op_form_that_asks_for_it(
    exported, tmp_path, name
):
    """onnx-attention's attention-op-blocks form: each masked core of an export (BERT's padding, GPT-2's
    and Llama's causal-and-padding masks) runs one Attention op per block of queries inside a Loop,
    and the graph still computes what the export does (fp32, 1e-5 of scale)."""
    import onnx

    from compiler.targets import every_node

    out = tmp_path / "out"
    assert (
        compile_script.main(
            [
                "--onnx",
                str(exported[name]),
                *"--target onnx-attention --form attention-op-blocks --check".split(),
                *"--quiet --out".split(),
                str(out),
            ]
        )
        == 0
    )
    model = onnx.load(out / "model.onnx", load_external_data=False)
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == SIZE.layers and not any(n.op_type == "Attention" for n in model.graph.node)
    assert sum(n.op_type == "Attention" for n in every_node(model.graph)) == SIZE.layers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] and manifest["check"]["worst_rel_error"] <= 1e-5


def test_the_corpus_benchmark_writes_its_table_and_figures(exported, zoo, tmp_path):
    """studies/corpus.py end to end on one small model (exported above): every column filled from one run."""
    import corpus

    out = tmp_path / "corpus.json"
    model = [
        "--families",
        "torch-encoder",
        "--exporters",
        "dynamo",
        "--hidden",
        str(ENCODER.hidden),
    ]
    model += ["--heads", str(ENCODER.heads), "--layers", str(ENCODER.layers), "--seq", "16"]
    model += ["--cache", str(zoo), "--min-seconds", "0"]
    written = ["--json", str(out), "--markdown", str(tmp_path / "corpus.md")]
    assert corpus.main([*model, "--rounds", "3", *written]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert (
        row["ort-cpu"]["cores"]
        == row["ort-cpu"]["fused"]
        == row["onnx-attention"]["fused"]
        == ENCODER.layers
    )
    assert row["ort-cpu"]["worst_rel_error"] <= 1e-5
    assert row["inputs"] == {"src": [1, 16, ENCODER.hidden], "src_key_padding_mask": [1, 16]}
    for name in ("input", "ort-cpu", "onnx-attention"):
        assert row[name]["runs"] >= 3 and row[name]["p50_s"] > 0 and row[name]["ratio_to_input"] > 0
    assert row["input"]["ratio_to_input"] == 1.0
    assert report["machine"]["matmul_fp32_flops"] > 0
    table = (tmp_path / "corpus.md").read_text()
    assert (
        f"| torch-encoder | dynamo | {ENCODER.layers} | {ENCODER.layers} / {ENCODER.layers} |"
        in table
    )

    def options(rounds: int):
        return corpus.parse_args([*model, "--rounds", str(rounds)])

    packing = corpus.packing_table(
        options(2),
        ENCODER,
        threads=1,
    ).splitlines()
    assert [line.split(" | ")[:3] for line in packing[2:]] == [
        ["| torch-encoder-dynamo", "the model's", "16"]
    ] + [["| graphs/mha.py self-attention, E=512", "none", str(n)] for n in (1, 16, 64, 256, 1024)]
    assert all(line.endswith("x |") or line.endswith("- |") for line in packing[2:])
    # torch's encoder unflattens one packed projection: no core of it takes the Attention op, so only the sweep
    attention_op = corpus.attention_op_table(
        options(1),
        ENCODER,
        threads=1,
    ).splitlines()
    assert [line.split(" | ")[1:3] for line in attention_op[2:]] == [
        [mask, str(n)] for mask in ("none", "padding") for n in (16, 128, 256, 383, 384, 512, 1024)
    ]
    lines = corpus.layernorm_table(threads=1, rounds=2, min_seconds=0).splitlines()
    assert len(lines) == 2 + 6 and all(line.count("ms") == 3 for line in lines[2:])


@pytest.mark.parametrize("name", ["gpt2-eager-legacy", "llama-eager-legacy"])
def test_the_mask_forms_if_leaves_onnx_runtime_no_more_transposes(exported, tmp_path, name):
    """Where a graph does not state its lengths, the mask forms choose theirs by an If on the query
    length. ONNX Runtime's transpose optimizer stops at a subgraph, so an exporter's transpose whose
    output an If reads stays in the optimized graph (it made legacy exports of Llama and of torch's
    nn.TransformerEncoder 3-5% slower than their input): the graph with the If keeps no more
    Transposes than the same graph compiled with --max-len below the forms' lengths, which has none."""
    import onnx
    import onnxruntime as ort

    from compiler import compile_model
    from graphs.builder import declare_maxima
    from graphs.onnx_files import load_onnx

    source = load_onnx(exported[name])
    bare = onnx.ModelProto()
    bare.CopyFrom(source)
    declare_maxima(bare, None, 64)
    counts = {}
    for label, model in (
        ("if", compile_model(source, "ort-cpu")),
        ("no_if", compile_model(bare, "ort-cpu")),
    ):
        has_if = any(n.op_type == "If" for n in model.graph.node)
        assert has_if == (label == "if"), label
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{label}.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / f"{label}.onnx"))
        counts[label] = sum(n.op_type == "Transpose" for n in optimized.graph.node)
    assert counts["if"] <= counts["no_if"], counts


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_cores_fed_by_projections_of_one_input_take_the_attention_op_on_ort_cpu(exported, entry):
    """compiler/qkv_projections.py reads q, k, v back to one input and its weights through each
    exporter's head split: BERT and ViT (MatMul + Add) and GPT-2 (Gemm over the rows, a Split of the
    packed output) do, so their short forms run com.microsoft.Attention, as do the encoders of the
    wider corpus (T5's and BART's self-attention, Swin's windows); Llama and the other rotary
    decoders (rotary embeddings between) and torch's modules (an unflattened packed projection)
    keep MultiHeadAttention."""
    from compiler import compile_model
    from compiler.targets import every_node
    from graphs.onnx_files import load_onnx

    model = compile_model(load_onnx(exported[entry.name]), "ort-cpu")
    takes = any(
        n.op_type == "Attention" and n.domain == "com.microsoft" for n in every_node(model.graph)
    )
    # the wider corpus: encoders with MatMul + Add projections take it too, rotary ones do not
    reads_one_input = ("bert", "vit", "gpt2", "roberta", "electra", "albert", "distilbert")
    reads_one_input += ("clip-text", "t5-encoder", "bart", "swin", "whisper")
    assert takes == (entry.family in reads_one_input), entry.name


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
def test_llamas_rmsnorm_reaches_onnx_runtimes_fused_kernel(exported, tmp_path, target):
    """torch's dynamo exporter writes Llama's RMSNorm with Reciprocal, which ONNX Runtime's session
    does not fuse; the ort targets write it with Div, which it fuses into SimplifiedLayerNormalization.
    On ort-cpu the residual sum before it stays apart (the skip form is slower there), on ort-cuda
    ONNX Runtime may take it in. Counted in ONNX Runtime's own optimized graph (CPU provider)."""
    import onnx
    import onnxruntime as ort

    from compiler import compile_model
    from graphs.onnx_files import load_onnx

    source = load_onnx(exported["llama-sdpa-dynamo"])
    norms = sum(
        n.op_type == "Reciprocal" for n in source.graph.node
    )  # one per RMSNorm: 2 per layer and the final one
    assert norms == 2 * SIZE.layers + 1
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(
        compile_model(source, target).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    fused = optimized.count("SimplifiedLayerNormalization") + optimized.count(
        "SkipSimplifiedLayerNormalization"
    )
    assert fused == norms and "Reciprocal" not in optimized
    if target == "ort-cpu":
        assert "SkipSimplifiedLayerNormalization" not in optimized


def test_grouped_query_attention_reaches_the_attention_op_unrepeated(exported):
    """Llama has 2 key/value heads for 4 query heads; the export repeats them (repeat_kv: Unsqueeze,
    Expand, Reshape). onnx-attention gives the standard Attention op the 2 heads, which maps query
    head j to key/value head j // 2 itself, and the repeat goes; the outputs are those of the export
    (test_every_core_fuses_and_the_graph_computes_what_the_export_does). The dynamo export states
    the head counts; the legacy one computes them at run time (through a Where), so it keeps the repeat."""
    name = "llama-sdpa-dynamo"
    import onnx

    from compiler import compile_model
    from graphs.onnx_files import load_onnx

    source = load_onnx(exported[name])
    assert (
        sum(n.op_type == "Expand" for n in source.graph.node) >= 2 * SIZE.layers
    )  # the repeat of keys and values
    model = onnx.shape_inference.infer_shapes(compile_model(source, "onnx-attention"))
    producers = {out: n for n in model.graph.node for out in n.output}
    heads = {
        v.name: v.type.tensor_type.shape.dim[1].dim_value
        for v in model.graph.value_info
        if len(v.type.tensor_type.shape.dim) == 4
    }
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == SIZE.layers
    for node in attention:
        for kv in node.input[1:3]:
            assert (
                producers[kv].op_type != "Reshape"
                or producers[producers[kv].input[0]].op_type != "Expand"
            )
            assert heads[kv] == SIZE.heads // 2


@pytest.mark.parametrize("name", ["torch-encoder-legacy", "torch-transformer-legacy"])
def test_keys_the_graph_fixes_below_the_forms_lengths_take_no_if(exported, name):
    """torch's legacy exporter fixes its modules' key length at the traced one (their Reshapes say
    16) while the inputs' axes stay symbolic: the mask forms' long branches could never pay there,
    so the graph gets the short form and no If (which costs ONNX Runtime a few percent on a graph
    this small)."""
    from compiler import compile_model
    from compiler.targets import every_node
    from graphs.onnx_files import load_onnx

    source = load_onnx(exported[name])
    assert any(
        d.dim_param for i in source.graph.input for d in i.type.tensor_type.shape.dim
    )  # symbolic axes
    ops = [n.op_type for n in every_node(compile_model(source, "ort-cpu").graph)]
    assert "If" not in ops and "Loop" not in ops and "MultiHeadAttention" in ops


@pytest.mark.parametrize("name", ["llama-sdpa-dynamo", "llama-eager-legacy", "llama-sdpa-legacy"])
def test_hugging_faces_causal_mask_takes_the_causal_blocks_and_keeps_every_row(exported, zoo, name):
    """transformers builds a decoder's mask as Where(causal AND padding, 0, lowest) in the graph;
    ort-cpu reads the causal comparison and the padding out of it (compiler/mask_terms.py, causal_inside), so
    from CAUSAL_FROM tokens on the core runs the causal query blocks with the padding as a key bias
    (Llama at 4096 tokens: 0.49x the export, against 0.94x as query blocks over the whole mask;
    docs/BENCHMARKS.md). Every row stays what the export makes it, at 1e-5 of scale: with trailing
    padding, with holes, and with leading padding, whose first queries see no key at all (uniform
    over every key under a finite lowest, zero or NaN under -inf, as the graph has it). Where no key
    is padded at run time, the mask is causal alone and takes GroupQueryAttention's chunks."""
    import onnxruntime as ort

    from compiler import compile_model
    from compiler.lowerings.causal_blocks import CAUSAL_FROM
    from compiler.targets import every_node
    from graphs.onnx_files import load_onnx

    if (
        name not in exported
    ):  # the legacy SDPA export, whose mask is -inf rather than lowest: this test only
        exported[name] = model_zoo.export(
            next(e for e in model_zoo.entries(SIZE) if e.name == name), zoo
        )
    source = load_onnx(exported[name])
    compiled = compile_model(source, "ort-cpu")
    ops = [n.op_type for n in every_node(compiled.graph)]
    assert "CumSum" in ops  # the causal form's dead-row count
    assert "GroupQueryAttention" in ops  # its chunks where nothing is padded (head size 16)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for m in (source, compiled)
    ]
    length = CAUSAL_FROM + 52  # not a multiple of the block
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (2, length))
    for case in ("none", "trailing", "holes", "leading"):
        mask = np.ones((2, length), np.int64)
        if case == "trailing":
            mask[1, -length // 3 :] = 0
        elif case == "holes":
            mask[:, 1:] = rng.random((2, length - 1)) > 0.3
            mask[0, 0] = 0  # row 0's first query sees nothing
        else:
            mask[1, : length // 3] = 0
        want, got = (s.run(None, {"input_ids": ids, "attention_mask": mask})[0] for s in sessions)
        assert np.array_equal(np.isnan(want), np.isnan(got)), case
        scale = np.nanmax(np.abs(want))
        assert np.nanmax(np.abs(want - got)) <= 1e-5 * scale, case
