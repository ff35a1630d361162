"""The mask forms of the ort-cpu target (compiler/lowerings/): masks kept off MultiHeadAttention's
inputs, so that ONNX Runtime's CPU kernel runs flash attention, and results equal to the float64
reference (fp32 1e-5, fp16 1e-2) on every row: padded per row, fully masked, lengths that are not
a multiple of the block."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import compiler.fuse_ort_mha
import compiler.mask_terms
from compiler import compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import FP16_TOLERANCE, FP32_TOLERANCE, errors, random_inputs
from runtime.ort import OrtSession
from runtime.reference import mha_reference


def _subgraphs(graph: onnx.GraphProto) -> dict[str, onnx.GraphProto]:
    return {
        attr.name: attr.g
        for node in graph.node
        for attr in node.attribute
        if attr.type == onnx.AttributeProto.GRAPH
    }


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in _subgraphs_of(node):
            yield from _all_nodes(sub)


def _subgraphs_of(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]


def test_causal_attention_runs_in_query_blocks_with_no_mask_on_the_op():
    """The long form holds no (L, S) tensor: no Range builds positions outside the short form, and its
    MultiHeadAttention takes query, key and value only (the flash path)."""
    spec = AttentionSpec(
        16, 4, batch_first=True, self_attention=True, is_causal=True, key_padding_mask="bool"
    )
    model = compile_model(build_mha(spec, AttentionWeights.random(spec)), "ort-cpu")
    onnx.checker.check_model(model, full_check=True)
    branch = next(n for n in model.graph.node if n.op_type == "If")
    blocks = next(a.g for a in branch.attribute if a.name == "then_branch")
    short = next(a.g for a in branch.attribute if a.name == "else_branch")
    long_form = [n for n in model.graph.node] + list(_all_nodes(blocks))
    assert not any(n.op_type in ("Range", "Softmax") for n in long_form)
    loop_ops = [n for n in _all_nodes(blocks) if n.op_type == "MultiHeadAttention"]
    assert len(loop_ops) == 1 and len([i for i in loop_ops[0].input if i]) == 3
    assert [n.op_type for n in _all_nodes(short) if n.domain == "com.microsoft"] == [
        "Attention"
    ]  # on x and the weights


@pytest.mark.parametrize("heads", [4, 2], ids=["head4", "head8"])
def test_a_causal_mask_alone_runs_groupqueryattention_chunks_where_the_head_size_allows(heads):
    """Causal with no padding, a head size that is a multiple of 8: ONNX Runtime's GroupQueryAttention
    as a chunked prefill, which computes only the keys each query sees; other head sizes keep the
    flash merge (its MultiHeadAttention takes no mask either)."""
    spec = AttentionSpec(16, heads, batch_first=True, self_attention=True, is_causal=True)
    model = compile_model(build_mha(spec, AttentionWeights.random(spec)), "ort-cpu")
    branch = next(n for n in model.graph.node if n.op_type == "If")
    long_form = [
        n.op_type
        for n in _all_nodes(next(a.g for a in branch.attribute if a.name == "then_branch"))
    ]
    assert ("GroupQueryAttention" in long_form) == (heads == 2)
    assert ("MultiHeadAttention" in long_form) == (heads == 4)


def _padded(feeds: dict, kind: str | None, length: int) -> dict:
    """Batch 0: every key masked; 1: the first half masked (its first rows see nothing); 2: the last key."""
    if kind is not None:
        mask = feeds["key_padding_mask"]
        fill, keep = (True, False) if kind == "bool" else (-np.inf, 0.0)
        mask[...] = keep
        mask[0] = fill
        mask[1, : length // 2] = fill
        mask[2, length - 1 :] = fill
    return feeds


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("padding", [None, "bool", "float"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("heads", [4, 2], ids=["head4", "head8"])
def test_causal_blocks_equal_the_reference_on_every_row(
    small_blocks, precision, padding, batch_first, heads
):
    """Lengths below, at and past the block and the switch to blocks (1, 4, 8, 11, 16), per-row padding;
    rows with no visible key are zero before out_proj (docs/ARCHITECTURE.md), so they equal out_proj.bias.
    Head size 8 without padding takes GroupQueryAttention's chunks, the others the flash merge."""
    spec = AttentionSpec(
        16,
        heads,
        batch_first=batch_first,
        self_attention=True,
        is_causal=True,
        key_padding_mask=padding,
    )
    weights = AttentionWeights.random(spec, seed=3)
    session = OrtSession(compile_model(build_mha(spec, weights), "ort-cpu", precision))
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    for length in (1, 4, 8, 11, 16):
        feeds = _padded(
            random_inputs(spec, (3, length, length), np.random.default_rng(length)), padding, length
        )
        got = session.run(feeds)["attn_output"]
        want = mha_reference(spec, weights, feeds)["attn_output"]
        assert np.isfinite(got).all()
        assert errors(got, want)[1] <= tolerance, (length, errors(got, want))


@pytest.mark.parametrize("padding", ["bool", "float"])
def test_a_padding_mask_that_hides_nothing_runs_the_causal_mask_alone(small_blocks, padding):
    """Causal with a padding input that hides no key at run time (a batch of prompts of one length)
    takes GroupQueryAttention's chunks, chosen by an If on the mask; a float mask of finite non-zero
    biases is no such mask and keeps the flash merge. Both equal the float64 reference."""
    spec = AttentionSpec(
        16, 2, batch_first=True, self_attention=True, is_causal=True, key_padding_mask=padding
    )
    weights = AttentionWeights.random(spec, seed=4)
    model = compile_model(build_mha(spec, weights), "ort-cpu")
    assert "GroupQueryAttention" in [n.op_type for n in _all_nodes(model.graph)]
    session = OrtSession(model)
    for length in (8, 11):
        feeds = random_inputs(spec, (2, length, length), np.random.default_rng(length))
        feeds["key_padding_mask"][...] = False if padding == "bool" else 0.0
        cases = (
            [feeds]
            if padding == "bool"
            else [feeds, {**feeds, "key_padding_mask": np.full((2, length), -1.5, np.float32)}]
        )
        for case in cases:
            got = session.run(case)["attn_output"]
            want = mha_reference(spec, weights, case)["attn_output"]
            assert errors(got, want)[1] <= FP32_TOLERANCE, (length, errors(got, want))


@pytest.mark.parametrize("heads", [2, 1], ids=["head4", "head8"])
def test_a_past_far_above_the_diagonal_block_is_still_exact(small_blocks, heads):
    """The merge never divides by the extra key's weight: a row whose earlier key scores 100 above its
    diagonal block (exp underflows there) still equals the reference; so do GroupQueryAttention's chunks."""
    spec = AttentionSpec(
        8, heads, batch_first=True, self_attention=True, is_causal=True, bias=False
    )
    identity = np.eye(8, dtype=np.float32)
    weights = AttentionWeights.from_state_dict(
        spec, {"in_proj_weight": np.vstack([identity] * 3), "out_proj.weight": identity}
    )  # q = k = v = x
    x = np.zeros((1, 12, 8), np.float32)
    x[0, :, 0] = 1.0
    # key 0 scores 300 * 300 / sqrt(head size) against every later query, the others about 1
    x[0, 0, 0] = 300.0
    x[0, 1:, 1] = np.linspace(-1, 1, 11)
    session = OrtSession(compile_model(build_mha(spec, weights), "ort-cpu"))
    got = session.run({"query": x})["attn_output"]
    want = mha_reference(spec, weights, {"query": x})["attn_output"]
    assert np.isfinite(got).all() and errors(got, want)[1] <= FP32_TOLERANCE


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize(
    "options",
    [
        {"attn_mask": "float"},
        {"attn_mask": "bool", "attn_mask_3d": True},
        {"attn_mask": "float", "key_padding_mask": "bool"},
        {"attn_mask": "bool", "is_causal": True, "key_padding_mask": "float"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_any_mask_goes_in_query_blocks_equal_to_the_reference(small_blocks, precision, options):
    """Each block takes its rows of every term (a causal term made anew for them): lengths 1 to 11,
    a row whose every key is masked, keys longer than queries (cross-attention)."""
    self_attention = options.get("is_causal", False)
    spec = AttentionSpec(16, 4, batch_first=True, self_attention=self_attention, **options)
    weights = AttentionWeights.random(spec, seed=2)
    model = compile_model(build_mha(spec, weights), "ort-cpu", precision)
    branch = next(n for n in model.graph.node if n.op_type == "If")
    blocks = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert "Loop" in [n.op_type for n in _all_nodes(blocks)] and not any(
        n.op_type == "Expand" for n in _all_nodes(blocks)
    )
    session = OrtSession(model)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    for length, keys in ((1, 1), (5, 5), (8, 8), (11, 11), (9, 13)):
        if self_attention and length != keys:
            continue
        feeds = random_inputs(spec, (3, length, keys), np.random.default_rng(length))
        feeds["attn_mask"][..., min(2, length - 1), :] = (
            True if spec.attn_mask == "bool" else -np.inf
        )
        got = session.run(feeds)["attn_output"]
        want = mha_reference(spec, weights, feeds)["attn_output"]
        assert np.isfinite(got).all()
        assert errors(got, want)[1] <= tolerance, (length, keys, errors(got, want))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("padding", ["bool", "float"])
def test_padding_is_cut_per_entry_and_equal_to_the_reference(small_blocks, precision, padding):
    """From ROWS_FROM on, each batch entry runs alone with its keys cut after its last visible one:
    trailing padding (entries 1, 2), none (3), all (0), and a hole inside (4); a float mask with
    finite biases as well (5) takes the widened form. Short inputs take one op with the bias."""
    spec = AttentionSpec(16, 4, batch_first=True, self_attention=True, key_padding_mask=padding)
    weights = AttentionWeights.random(spec, seed=5)
    model = compile_model(build_mha(spec, weights), "ort-cpu", precision)
    branch = next(n for n in model.graph.node if n.op_type == "If")
    rows = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert "Loop" in [n.op_type for n in rows.node]
    assert all(
        len([i for i in n.input if i]) == 3
        for n in _all_nodes(rows)
        if n.op_type == "MultiHeadAttention"
    )
    session = OrtSession(model)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    for length in (3, 8, 13):
        feeds = random_inputs(spec, (6, length, length), np.random.default_rng(length))
        fill, keep = (True, False) if padding == "bool" else (-np.inf, 0.0)
        mask = feeds["key_padding_mask"]
        mask[...] = keep
        mask[0] = fill
        mask[1, length // 2 :] = fill
        mask[2, length - 1 :] = fill
        mask[4, 1] = fill
        if padding == "float":
            mask[5] = np.linspace(-3.0, 0.5, length)
        got = session.run(feeds)["attn_output"]
        want = mha_reference(spec, weights, feeds)["attn_output"]
        assert np.isfinite(got).all()
        assert errors(got, want)[1] <= tolerance, (length, errors(got, want))


def test_the_long_forms_read_a_full_mask_only_through_row_reductions_and_blocks():
    """The long branch must not make anything the size of an (L, S) mask: outside its Loops it reads
    the mask (through views) only by reductions over the rows (whether they all match) and Slices of
    a row or a block. An Equal against the first row and its float Cast once made 1.25 GiB of
    temporaries at 16384 tokens (docs/BENCHMARKS.md, "Memory")."""
    spec = AttentionSpec(16, 4, batch_first=True, self_attention=True, attn_mask="float")
    model = compile_model(build_mha(spec, AttentionWeights.random(spec)), "ort-cpu")
    branch = next(n for n in model.graph.node if n.op_type == "If")
    long_form = next(a.g for a in branch.attribute if a.name == "then_branch")
    nodes = [n for n in _all_nodes(long_form)]
    inside_loops = {
        id(m) for n in nodes if n.op_type == "Loop" for m in _all_nodes(_subgraphs_of(n)[0])
    }
    views, readers = {"attn_mask"}, []
    for node in nodes:
        if id(node) in inside_loops or not views & set(node.input):
            continue
        if node.op_type in ("Unsqueeze", "Reshape", "Identity"):
            views.update(node.output)
        else:
            readers.append(node.op_type)
    assert readers and set(readers) <= {"ReduceMax", "ReduceMin", "Slice", "Loop", "If"}, readers


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_mask_whose_rows_all_match_runs_as_padding(small_blocks, precision):
    """An (L, S) mask with every row alike (a padding mask an exporter expanded over the queries, as
    Hugging Face models build theirs) is found so at run time and cut like padding; rows that differ
    go to query blocks. Both equal the reference, with the float minimum as the masked value too."""
    spec = AttentionSpec(16, 4, batch_first=True, attn_mask="float")
    weights = AttentionWeights.random(spec, seed=6)
    session = OrtSession(compile_model(build_mha(spec, weights), "ort-cpu", precision))
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    lowest = float(np.finfo(np.float32).min)
    for length, masked in ((9, -np.inf), (12, lowest), (12, None)):
        feeds = random_inputs(spec, (2, length, length + 2), np.random.default_rng(length))
        if masked is not None:
            row = np.zeros(length + 2, np.float32)
            row[length - 3 :] = masked  # trailing padding
            row[1] = -0.5
            feeds["attn_mask"] = np.broadcast_to(row, (length, length + 2)).copy()
        got = session.run(feeds)["attn_output"]
        want = mha_reference(spec, weights, feeds)["attn_output"]
        assert np.isfinite(got).all()
        assert errors(got, want)[1] <= tolerance, (length, masked, errors(got, want))


def test_the_threshold_script_times_each_form_and_restores_the_thresholds(capsys):
    """studies/mask_thresholds.py: one row per point, each form against one op in the same rounds."""
    import importlib

    script = importlib.import_module("mask_thresholds")
    before = {place: getattr(*place) for place in script.THRESHOLDS}
    assert (
        script.main(
            [
                "--mask",
                "causal",
                "--embed-dim",
                "16",
                "--num-heads",
                "2",
                "--points",
                "1x8",
                "2x5",
                "--seconds",
                "0.05",
            ]
        )
        == 0
    )
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and line[2].isdigit()
    ]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "8"], ["| 2", "5"]]
    for row in rows:
        ratios = [float(cell.strip(" |x")) for cell in row.split(" | ")[3:]]
        assert all(0 < r < 100 for r in ratios)
    assert {place: getattr(*place) for place in script.THRESHOLDS} == before
    assert compiler.fuse_ort_mha.mask_terms is compiler.mask_terms.mask_terms


def test_a_declared_largest_length_below_the_forms_leaves_out_the_if(run_cli, tmp_path):
    """compile.py --max-len 64 declares that no input is longer, so a causal and padded core gets one op
    and no If (which costs ONNX Runtime a few percent on short inputs); without it the If is there.
    The declaration is in the metadata once, where every session also enforces it."""
    common = [
        "--embed-dim",
        "16",
        "--num-heads",
        "4",
        "--self-attention",
        "--batch-first",
        "--causal",
        "--key-padding-mask",
        "bool",
        "--target",
        "ort-cpu",
        "--quiet",
    ]
    assert (
        run_cli("compile.py", *common, "--max-len", "64", "--out", tmp_path / "short").returncode
        == 0
    )
    assert run_cli("compile.py", *common, "--out", tmp_path / "any").returncode == 0
    short, any_length = (onnx.load(tmp_path / name / "model.onnx") for name in ("short", "any"))
    assert not any(n.op_type in ("If", "Loop") for n in short.graph.node)
    assert [n.op_type for n in short.graph.node].count(
        "Attention"
    ) == 1  # on the input and packed weights
    assert any(n.op_type == "If" for n in any_length.graph.node)
    assert [p.value for p in short.metadata_props if p.key == "attention_compiler.max_len"] == [
        "64"
    ]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize(
    ("padding", "hides"),
    [(None, False), ("bool", True), ("float", True), ("bool", False), ("float", False)],
    ids=["none", "bool", "float", "bool-hides-nothing", "float-hides-nothing"],
)
@pytest.mark.parametrize("heads", [4, 2], ids=["head4", "head8"])
def test_a_kv_cache_prefill_runs_in_query_blocks_and_its_steps_continue_it(
    small_blocks, precision, padding, heads, hides
):
    """With --max-len declaring prompts that long, a prompt of at least CAUSAL_FROM tokens into an
    empty cache takes the causal blocks, with present = its own keys and values; shorter prompts and
    decode steps take the op with the past (the only form without that declaration: the If costs
    decode steps).
    Prompts of 5 (one op) and 8 and 11 (blocks; 11 ends in a ragged block), then 3 steps, against
    one causal pass of the float64 reference over the whole sequence; left padding leaves a row
    with no visible key, which is zero (out_proj.bias)."""
    from graphs.builder import declare_maxima
    from runtime.generation import KvCacheLoop

    spec = AttentionSpec(
        16,
        heads,
        batch_first=True,
        self_attention=True,
        is_causal=True,
        kv_cache=True,
        key_padding_mask=padding,
    )
    full = AttentionSpec(
        16, heads, batch_first=True, self_attention=True, is_causal=True, key_padding_mask=padding
    )
    weights = AttentionWeights.random(spec, seed=5)
    source = build_mha(spec, weights)
    assert not any(
        n.op_type == "If" for n in compile_model(source, "ort-cpu", precision).graph.node
    )
    declare_maxima(source, None, 64)
    model = compile_model(source, "ort-cpu", precision)
    prefill = next(
        a.g
        for n in model.graph.node
        if n.op_type == "If"
        for a in n.attribute
        if a.name == "then_branch"
    )
    assert any(
        n.op_type == "Loop" for n in _all_nodes(prefill)
    )  # the prefill's blocks (under an If on the padding)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    for prompt in (5, 8, 11):
        total = prompt + 3
        rng = np.random.default_rng(prompt)
        tokens = rng.standard_normal((2, total, 16)).astype(np.float32)
        feeds, kpm = {"query": tokens}, None
        if padding is not None:  # entry 1's prompt starts after 3 padding keys
            blocked = np.zeros((2, total), bool)
            # unpadded: a padding input that hides nothing (the chunks, with head size 8)
            blocked[1, :3] = hides
            kpm = (
                blocked if padding == "bool" else np.where(blocked, -np.inf, 0.0).astype(np.float32)
            )
            feeds["key_padding_mask"] = kpm
        want = mha_reference(full, weights, feeds)["attn_output"]
        loop = KvCacheLoop(OrtSession(model), spec)
        outputs = [loop.prefill(tokens[:, :prompt], None if kpm is None else kpm[:, :prompt])]
        outputs += [loop.step(tokens[:, i : i + 1]) for i in range(prompt, total)]
        got = np.concatenate(outputs, axis=1)
        assert np.isfinite(got).all()
        assert errors(got, want)[1] <= tolerance, (prompt, errors(got, want))


def test_the_causal_kernel_script_checks_every_form_against_the_causal_op(capsys):
    """studies/causal_kernels.py: each causal form (GroupQueryAttention whole and in chunks, the flash
    halving with its denominator merge) agrees with MultiHeadAttention's own causal flag."""
    import importlib

    script = importlib.import_module("causal_kernels")
    assert (
        script.main(
            [
                "--length",
                "64",
                "--heads",
                "2",
                "--head-size",
                "8",
                "--chunk",
                "24",
                "--block",
                "8",
                "--rounds",
                "1",
            ]
        )
        == 0
    )
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "ms" not in line
    ]
    errors = {
        row[0].strip("| "): row[3].strip(" |") for row in rows if not row[0].startswith("|---")
    }
    assert len(errors) == 6 and errors["flash, no mask"] == "-"
    # fp32 kernels against fp32 kernels: rounding only (the merge divides nothing that can vanish)
    assert all(float(e) < 1e-5 for name, e in errors.items() if name != "flash, no mask"), errors


def test_the_causal_kernel_script_times_a_decode_step_on_both_ops(capsys):
    """studies/causal_kernels.py --decode: MultiHeadAttention with past and GroupQueryAttention agree."""
    import importlib
    import re

    script = importlib.import_module("causal_kernels")
    assert (
        script.main(
            ["--decode", "5", "--batch", "2", "--heads", "2", "--head-size", "8", "--rounds", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    error = float(re.search(r"rel. error between the two (\S+)", out).group(1))
    assert error < 1e-5  # fp32 kernels against each other: rounding only
    assert (
        len(
            [
                line
                for line in out.splitlines()
                if line.startswith("| ") and "ms" not in line and "---" not in line
            ]
        )
        == 2
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"key_padding_mask": "bool"},
        {"attn_mask": "float"},
        {"attn_mask": "bool", "attn_mask_3d": True, "key_padding_mask": "float"},
        {"is_causal": True, "self_attention": True, "key_padding_mask": "float"},
        {"is_causal": True, "self_attention": True},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_the_attention_op_in_query_blocks_equals_the_reference(small_blocks, precision, options):
    """onnx-attention's attention-op-blocks form: one standard Attention op per block of queries inside
    a Loop, each with its rows of every mask term, the causal term made per block (no Range outside
    the Loop), an unmasked core too (ONNX Runtime's CPU op holds all its scores): lengths 1 to 11 and
    keys longer than queries, a batch entry whose every key is masked (zero context, so its rows
    equal out_proj.bias)."""
    spec = AttentionSpec(16, 4, batch_first=True, **options)
    weights = AttentionWeights.random(spec, seed=5)
    model = compile_model(
        build_mha(spec, weights), "onnx-attention", precision, form="attention-op-blocks"
    )
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node if n.op_type in ("Loop", "Attention", "Range")] == [
        "Loop"
    ]
    assert [n.op_type for n in _all_nodes(model.graph)].count("Attention") == 1
    session = OrtSession(model)
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    for length, keys in ((1, 1), (5, 5), (11, 11), (9, 13)):
        if spec.self_attention and length != keys:
            continue
        feeds = random_inputs(spec, (3, length, keys), np.random.default_rng(length))
        if "key_padding_mask" in feeds:
            feeds["key_padding_mask"][0] = True if spec.key_padding_mask == "bool" else -np.inf
        got = session.run(feeds)["attn_output"]
        want = mha_reference(spec, weights, feeds)["attn_output"]
        assert np.isfinite(got).all()
        assert errors(got, want)[1] <= tolerance, (length, keys, errors(got, want))


def test_the_attention_op_keeps_one_op_where_blocks_cannot_serve():
    """need_weights needs the whole score tensor: such a core keeps the one Attention op in the blocks form."""
    spec = AttentionSpec(16, 4, batch_first=True, key_padding_mask="bool", need_weights=True)
    model = compile_model(
        build_mha(spec, AttentionWeights.random(spec)), "onnx-attention", form="attention-op-blocks"
    )
    assert [n.op_type for n in model.graph.node if n.op_type in ("Loop", "Attention")] == [
        "Attention"
    ]


def test_the_cuda_causal_script_writes_graphs_whose_causal_forms_agree(tmp_path):
    """studies/cuda_causal.py times its graphs on a GPU only; what it writes is checked here, on ONNX
    Runtime CPU: the unidirectional flag and the causal bias give the same output, and unmasked
    attention does not (so the comparison it prints can fail)."""
    import cuda_causal

    cuda_causal.write(str(tmp_path))
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, 37, cuda_causal.E), dtype=np.float32) for n in "qkv"}
    out = {
        form: OrtSession(tmp_path / f"{form}.onnx").run(feeds)["y"]
        for form in cuda_causal.FORMS.values()
    }
    np.testing.assert_allclose(out["unidirectional"], out["bias"], rtol=1e-6, atol=1e-6)
    assert np.abs(out["flash"] - out["bias"]).max() > 1e-2
