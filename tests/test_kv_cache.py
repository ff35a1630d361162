"""KV-cache graphs: a prefill and single-token steps equal one causal pass of torch over the whole
sequence, on every target ONNX Runtime CPU runs; the fused forms take the cache as the ops' past
and present; the loop helper and the input checks.

Tolerance: 1e-5 of the output's scale against torch in float64 (float32 rounding through two
projections and a softmax stays near 1e-7 of scale here).
"""

import json

import numpy as np
import pytest

from compiler import compile_model
from graphs import AttentionSpec, AttentionWeights, SpecError, build_mha
from runtime import InputError
from runtime.check import FP32_TOLERANCE, random_inputs
from runtime.generation import KvCacheLoop, cache_of
from runtime.ort import OrtSession
from runtime.torch_reference import torch_forward, torch_module

CPU_TARGETS = ("portable", "onnx-attention", "ort-cpu", "tensorrt")


def _spec(**options) -> AttentionSpec:
    return AttentionSpec(16, 4, self_attention=True, is_causal=True, kv_cache=True, **options)


def _take(spec, x, start, stop):
    return x[:, start:stop] if spec.batch_first else x[start:stop]


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize(
    ("prompt", "steps", "batch", "padding", "batch_first"),
    [
        (1, 1, 1, None, False),
        (6, 3, 2, "bool", True),
        (4, 5, 3, "float", False),
        (9, 2, 2, None, True),
    ],
    ids=["P1-k1-N1", "P6-k3-N2-bool-left-padding", "P4-k5-N3-float-padding", "P9-k2-N2"],
)
def test_prefill_then_steps_equal_one_causal_torch_pass(
    target, prompt, steps, batch, padding, batch_first
):
    spec = _spec(key_padding_mask=padding, batch_first=batch_first)
    full = AttentionSpec(
        16,
        4,
        self_attention=True,
        is_causal=True,
        key_padding_mask=padding,
        batch_first=batch_first,
    )
    weights = AttentionWeights.random(spec, seed=prompt)
    rng = np.random.default_rng(steps)
    total = prompt + steps
    tokens = rng.standard_normal((batch, total, 16) if batch_first else (total, batch, 16)).astype(
        np.float32
    )
    feeds, kpm = {"query": tokens}, None
    if (
        padding is not None
    ):  # prompts of different lengths, padded on the left; the new tokens are real
        blocked = np.zeros((batch, total), bool)
        for n in range(batch):
            blocked[n, :n] = True
        kpm = blocked if padding == "bool" else np.where(blocked, -np.inf, 0.0).astype(np.float32)
        feeds["key_padding_mask"] = kpm
    want = torch_forward(full, torch_module(full, weights), feeds)["attn_output"]

    loop = KvCacheLoop(OrtSession(compile_model(build_mha(spec, weights), target, "fp32")), spec)
    outputs = [
        loop.prefill(_take(spec, tokens, 0, prompt), None if kpm is None else kpm[:, :prompt])
    ]
    outputs += [loop.step(_take(spec, tokens, i, i + 1)) for i in range(prompt, total)]
    got = np.concatenate(outputs, axis=1 if batch_first else 0)
    assert loop.past_len == total

    live = ~np.array(
        [
            [kpm is not None and (np.asarray(kpm[n, : i + 1]) != 0).all() for i in range(total)]
            for n in range(batch)
        ]
    )  # torch gives NaN where a query sees only padding
    got_rows, want_rows = (
        (got, want) if batch_first else (got.transpose(1, 0, 2), want.transpose(1, 0, 2))
    )
    scale = np.abs(want_rows[live]).max()
    assert np.abs(got_rows[live] - want_rows[live]).max() <= FP32_TOLERANCE * scale
    assert np.isfinite(got).all()  # rows that see only padding take the zero context, never NaN


@pytest.mark.parametrize("target", ["onnx-attention", "ort-cpu"])
def test_the_fused_op_takes_the_cache_as_past_and_gives_present(target):
    spec = _spec(key_padding_mask="bool")
    model = compile_model(build_mha(spec, AttentionWeights.random(spec)), target, "fp32")
    graph, presents = model.graph, ["present_key", "present_value"]
    fused = [n for n in graph.node if n.op_type in ("Attention", "MultiHeadAttention")]
    assert len(fused) == 1 and not any(n.op_type == "Softmax" for n in graph.node)
    node = fused[0]
    past = node.input[6:8] if target == "ort-cpu" else node.input[4:6]
    assert list(past) == ["past_key", "past_value"] and list(node.output[1:3]) == presents
    cache_concats = [
        n
        for n in model.graph.node
        if n.op_type == "Concat" and set(n.input) & {"past_key", "past_value"}
    ]
    assert cache_concats == []


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_an_empty_past_is_a_prefill_and_present_is_the_cache(target):
    spec = _spec()
    weights = AttentionWeights.random(spec)
    session = OrtSession(compile_model(build_mha(spec, weights), target, "fp32"))
    feeds = random_inputs(spec, (2, 5, 0), np.random.default_rng(0))
    assert feeds["past_key"].shape == (2, 4, 0, 4)
    out = session.run(feeds)
    want_key, want_value = cache_of(spec, weights, feeds["query"])
    np.testing.assert_allclose(
        out["present_key"], want_key, rtol=0, atol=1e-5 * np.abs(want_key).max()
    )
    np.testing.assert_allclose(
        out["present_value"], want_value, rtol=0, atol=1e-5 * np.abs(want_value).max()
    )
    with pytest.raises(InputError, match="input 'query' has tgt_len=0"):
        session.run(random_inputs(spec, (2, 0, 3), np.random.default_rng(0)))
    wrong = random_inputs(spec, (2, 3, 4), np.random.default_rng(0))
    wrong["past_value"] = wrong["past_value"][:, :, :2]
    with pytest.raises(
        InputError,
        match="input 'past_value' has past_len=2 on axis 2, but 'past_key' gave past_len=4",
    ):
        session.run(wrong)


def test_a_key_padding_mask_must_cover_past_and_new_keys():
    spec = _spec(key_padding_mask="bool")
    session = OrtSession(build_mha(spec, AttentionWeights.random(spec)))
    feeds = random_inputs(spec, (2, 3, 4), np.random.default_rng(0))
    feeds["key_padding_mask"] = feeds["key_padding_mask"][:, :4]
    with pytest.raises(
        InputError,
        match=r"input 'key_padding_mask' has size 4 on axis 1, expected past_len\+tgt_len = 7 "
        r"\(past_len=4 from 'past_key', tgt_len=3 from 'query'\)",
    ):
        session.run(feeds)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(is_causal=False), "kv_cache needs self_attention=True and is_causal=True"),
        (dict(self_attention=False), "kv_cache needs self_attention=True and is_causal=True"),
        (dict(add_bias_kv=True), "kv_cache does not combine with add_bias_kv"),
        (dict(add_zero_attn=True), "kv_cache does not combine with add_zero_attn"),
        (dict(attn_mask="bool"), "kv_cache does not combine with attn_mask"),
        (dict(need_weights=True), "kv_cache does not combine with need_weights"),
    ],
)
def test_spec_rules(options, message):
    with pytest.raises(SpecError, match=message):
        AttentionSpec(
            16, 4, **{"self_attention": True, "is_causal": True, "kv_cache": True, **options}
        )


def test_the_loop_refuses_what_does_not_fit():
    spec = _spec()
    loop = KvCacheLoop(OrtSession(build_mha(spec, AttentionWeights.random(spec))), spec)
    loop.prefill(np.zeros((3, 2, 16), np.float32))
    with pytest.raises(
        InputError, match="input 'query' has batch=1, but the cache holds batch=2; call prefill"
    ):
        loop.step(np.zeros((1, 1, 16), np.float32))
    with pytest.raises(InputError, match="this graph takes no key_padding_mask"):
        loop.step(np.zeros((1, 2, 16), np.float32), np.zeros((2, 1), bool))
    plain = AttentionSpec(16, 4, self_attention=True, is_causal=True)
    with pytest.raises(InputError, match="KvCacheLoop needs a graph compiled with kv_cache=True"):
        KvCacheLoop(OrtSession(build_mha(plain, AttentionWeights.random(plain))), plain)


def test_the_loop_names_bad_inputs_as_session_run_does():
    """Wrong inputs to the loop get OrtSession.run's InputError lines, not ONNX Runtime's or Python's."""
    import torch

    spec = _spec(key_padding_mask="bool", batch_first=True)
    weights = AttentionWeights.random(spec)
    loop = KvCacheLoop(OrtSession(build_mha(spec, weights)), spec)
    prompt = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    cases = [
        (
            lambda: loop.prefill(prompt, np.zeros((2, 5), bool)),
            r"key_padding_mask for the new keys has shape \(2, 5\) and dtype bool; expected \(2, 3\) of bool",
        ),
        (
            lambda: loop.prefill(prompt, np.zeros((2, 3), np.float32)),
            "has shape \\(2, 3\\) and dtype float32; expected",
        ),
        (
            lambda: loop.prefill(prompt[0, 0]),
            r"input 'query' has rank 1 \(shape \(16,\)\), expected rank 3",
        ),
        (
            lambda: loop.prefill(prompt.tolist()),
            "input 'query' is a list, expected a numpy.ndarray or torch.Tensor of float32",
        ),
        (
            lambda: loop.prefill(prompt.astype(np.float64)),
            "input 'query' has dtype float64, expected float32",
        ),
        (lambda: loop.prefill(prompt, memory=prompt), "unexpected input 'memory'"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()
    graded = torch.from_numpy(prompt).requires_grad_()
    np.testing.assert_array_equal(
        loop.prefill(graded), KvCacheLoop(loop.session, spec).prefill(prompt)
    )
    for other, message in (
        (_spec(batch_first=True), "it takes a key_padding_mask that the spec does not"),
        (
            AttentionSpec(
                16,
                2,
                self_attention=True,
                is_causal=True,
                kv_cache=True,
                batch_first=True,
                key_padding_mask="bool",
            ),
            r"its past_key has shape \('batch', 4, 'past_len', 4\)",
        ),
    ):
        with pytest.raises(
            InputError,
            match=f"the session's graph does not match the spec given to KvCacheLoop: {message}",
        ):
            KvCacheLoop(loop.session, other)


def test_a_loop_used_from_a_second_thread_refuses_it():
    import threading

    from runtime.generation import LoopInUse

    spec = _spec()
    loop = KvCacheLoop(OrtSession(build_mha(spec, AttentionWeights.random(spec))), spec)
    inside, release = threading.Event(), threading.Event()

    class Slow:  # the first call waits inside ONNX Runtime until the second has been refused
        def __init__(self, session):
            self.session = session

        def io_binding(self):
            return self.session.io_binding()

        def run_with_iobinding(self, binding):
            inside.set()
            release.wait(10)
            return self.session.run_with_iobinding(binding)

    loop.session._session = Slow(loop.session._session)
    token = np.zeros((1, 1, 16), np.float32)
    first = threading.Thread(target=loop.prefill, args=(token,))
    first.start()
    assert inside.wait(10)
    with pytest.raises(
        LoopInUse, match="running a call from another thread; .* give each thread its own loop"
    ):
        loop.step(token)
    release.set()
    first.join()
    assert loop.past_len == 1  # the first call finished; the refused one changed nothing
    loop.step(token)
    assert loop.past_len == 2


def test_compile_kv_cache_checks_against_torch(run_cli, tmp_path):
    out = tmp_path / "kv"
    result = run_cli(
        "compile.py",
        *"--embed-dim 32 --num-heads 4 --self-attention --causal".split(),
        *"--kv-cache --key-padding-mask bool --batch-first --target".split(),
        *"ort-cpu --check --out".split(),
        out,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["attention_form"] == "com.microsoft.MultiHeadAttention"
        and manifest["check"]["passed"]
    )
    assert {c["output"] for c in manifest["check"]["comparisons"] if c["reference"] == "torch"} == {
        "attn_output",
        "present_key",
        "present_value",
    }
    assert [i["shape"] for i in manifest["inputs"]] == [
        ["batch", "tgt_len", 32],
        ["batch", 4, "past_len", 8],
        ["batch", 4, "past_len", 8],
        ["batch", "past_len+tgt_len"],
    ]
    refused = run_cli(
        "compile.py", *"--embed-dim 32 --num-heads 4 --kv-cache --out".split(), tmp_path / "no"
    )
    assert (
        refused.returncode == 2
        and "kv_cache needs self_attention=True and is_causal=True" in refused.stderr
    )
    encoder = run_cli(
        "compile.py",
        *"--embed-dim 32 --num-heads 4 --block encoder --causal --kv-cache".split(),
        "--out",
        tmp_path / "no",
    )
    assert encoder.returncode == 2 and "kv_cache belongs to the decoder block" in encoder.stderr


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_a_decoder_block_decodes_as_one_torch_pass(target, norm_first):
    """A TransformerDecoderLayer step by step with its self-attention cache, memory fixed, against
    the layer's one causal pass over the whole target sequence."""
    from graphs.blocks import BlockSpec, BlockWeights, build_block
    from runtime.block_reference import torch_block, torch_block_forward

    spec = BlockSpec(
        "decoder",
        16,
        4,
        dim_feedforward=32,
        is_causal=True,
        kv_cache=True,
        norm_first=norm_first,
        key_padding_mask="bool",
        memory_key_padding_mask="bool",
    )
    full = BlockSpec(
        "decoder",
        16,
        4,
        dim_feedforward=32,
        is_causal=True,
        norm_first=norm_first,
        key_padding_mask="bool",
        memory_key_padding_mask="bool",
    )
    weights = BlockWeights.random(spec, seed=3)
    rng = np.random.default_rng(4)
    prompt, steps, batch, memory_len = 5, 3, 2, 6
    total = prompt + steps
    tgt = rng.standard_normal((total, batch, 16)).astype(np.float32)
    memory = rng.standard_normal((memory_len, batch, 16)).astype(np.float32)
    padding = np.zeros((batch, total), bool)
    padding[1, :2] = True  # the second prompt is two tokens shorter, padded on the left
    memory_padding = np.zeros((batch, memory_len), bool)
    memory_padding[0, -1] = True
    want = torch_block_forward(
        full,
        torch_block(full, weights),
        {
            "tgt": tgt,
            "memory": memory,
            "tgt_key_padding_mask": padding,
            "memory_key_padding_mask": memory_padding,
        },
    )["output"]
    loop = KvCacheLoop(OrtSession(compile_model(build_block(spec, weights), target, "fp32")), spec)
    fixed = {"memory": memory, "memory_key_padding_mask": memory_padding}
    outputs = [loop.prefill(tgt[:prompt], padding[:, :prompt], **fixed)]
    outputs += [loop.step(tgt[i : i + 1], **fixed) for i in range(prompt, total)]
    got = np.concatenate(outputs, axis=0)
    live = np.ones((total, batch), bool)
    live[:2, 1] = False  # queries that see only padding: NaN in torch, the zero context here
    scale = np.abs(want[live]).max()
    assert np.abs(got[live] - want[live]).max() <= FP32_TOLERANCE * scale
    with pytest.raises(
        InputError,
        match="missing input 'memory'; give it to prefill and step as a keyword argument",
    ):
        loop.step(tgt[:1])


def test_compile_a_cached_decoder_block_checks_against_torch(run_cli, tmp_path):
    out = tmp_path / "decoder"
    result = run_cli(
        "compile.py",
        *"--block decoder --embed-dim 32 --num-heads 4 --dim-feedforward".split(),
        *"64 --causal --kv-cache --key-padding-mask bool --target ort-cpu".split(),
        *"--check --out".split(),
        out,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] and [o["name"] for o in manifest["outputs"]] == [
        "output",
        "present_key",
        "present_value",
    ]
    assert {c["output"] for c in manifest["check"]["comparisons"] if c["reference"] == "torch"} == {
        "output",
        "present_key",
        "present_value",
    }


def test_tensorrt_profile_of_a_cached_graph_lets_the_past_be_empty():
    """Computed on CPU: past and new keys together stay within --max-len, the past runs from 0 (a
    prefill), and opt is a decoding step, one token after half the length."""
    from runtime.profiles import check_in_profile, profile_from_limits
    from runtime.signature import input_specs

    spec = _spec(key_padding_mask="bool")
    inputs = input_specs(build_mha(spec, AttentionWeights.random(spec)))
    profile = profile_from_limits(inputs, max_batch=4, max_len=256)
    assert profile.trtexec() == {
        "min": "query:1x1x16,past_key:1x4x0x4,past_value:1x4x0x4,key_padding_mask:1x1",
        "opt": "query:1x2x16,past_key:2x4x128x4,past_value:2x4x128x4,key_padding_mask:2x129",
        "max": "query:256x4x16,past_key:4x4x255x4,past_value:4x4x255x4,key_padding_mask:4x256",
    }
    check_in_profile(
        inputs,
        profile,
        {
            "query": (7, 2, 16),
            "past_key": (2, 4, 0, 4),
            "past_value": (2, 4, 0, 4),
            "key_padding_mask": (2, 7),
        },
    )
    with pytest.raises(InputError, match="past_key"):
        check_in_profile(
            inputs,
            profile,
            {
                "query": (1, 2, 16),
                "past_key": (2, 4, 256, 4),
                "past_value": (2, 4, 256, 4),
                "key_padding_mask": (2, 257),
            },
        )
