"""The GPU runtime: what needs no GPU runs here (profiles, cache keys, messages, torch tensors through
a session, compile.py --target tensorrt without TensorRT); what needs one skips with the reason."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import parse_triton_config

from attention_compiler.artifacts.engine_cache import EngineCache
from attention_compiler.artifacts.triton import triton_config
from compiler import compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime import InputError
from runtime.check import check_session, random_inputs
from runtime.ort import PROVIDERS, OrtSession, tensorrt_provider_options
from runtime.profiles import (
    ProfileError,
    check_in_profile,
    parse_shapes,
    profile_from_limits,
    profile_from_shapes,
)
from runtime.session import BackendUnavailable
from runtime.signature import input_specs
from runtime.trt_engine import TensorRTSession, engine_for, engine_key, tensorrt_unavailable

SPEC = AttentionSpec(
    16, 2, batch_first=True, key_padding_mask="bool", attn_mask="float", attn_mask_3d=True
)
NO_TRT = tensorrt_unavailable()
NO_ORT_CUDA = (
    None
    if "CUDAExecutionProvider" in ort.get_available_providers()
    else ("onnxruntime has no CUDAExecutionProvider (needs onnxruntime-gpu and a GPU)")
)


def _model(spec=SPEC, target="tensorrt", precision="fp32"):
    return compile_model(build_mha(spec, AttentionWeights.random(spec, 0)), target, precision)


def _inputs(spec=SPEC):
    return input_specs(_model(spec))


def test_profile_from_limits_gives_every_dynamic_axis_its_range():
    profile = profile_from_limits(_inputs(), max_batch=8, max_len=512)
    assert profile.to_json() == {
        "query": {"min": [1, 1, 16], "opt": [4, 256, 16], "max": [8, 512, 16]},
        "key": {"min": [1, 1, 16], "opt": [4, 256, 16], "max": [8, 512, 16]},
        "value": {"min": [1, 1, 16], "opt": [4, 256, 16], "max": [8, 512, 16]},
        "key_padding_mask": {"min": [1, 1], "opt": [4, 256], "max": [8, 512]},
        "attn_mask": {
            "min": [2, 1, 1],
            "opt": [8, 256, 256],
            "max": [16, 512, 512],
        },  # batch*num_heads
    }
    odd = profile_from_limits(
        _inputs(AttentionSpec(16, 2, self_attention=True)), max_batch=3, max_len=7
    )
    assert odd.to_json() == {
        "query": {"min": [1, 1, 16], "opt": [4, 2, 16], "max": [7, 3, 16]}
    }  # (tgt_len, batch, E)


def test_trtexec_spelling_round_trips():
    profile = profile_from_limits(_inputs(), max_batch=2, max_len=64)
    spelled = profile.trtexec()
    assert spelled["max"].startswith("query:2x64x16,key:2x64x16,")
    again = profile_from_shapes(
        _inputs(), *(parse_shapes(spelled[k], f"--{k}-shapes") for k in ("min", "opt", "max"))
    )
    assert again == profile


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("query:1x8", None),
        (
            "query=1x8",
            "--max-shapes expects NAME:DIMxDIMx... per input, comma-separated as trtexec spells it",
        ),
        ("query:1x8,query:2x8", "--max-shapes names input 'query' twice"),
        ("", "--max-shapes is empty"),
    ],
)
def test_parse_shapes(text, message):
    if message is None:
        assert parse_shapes(text, "--max-shapes") == {"query": (1, 8)}
    else:
        with pytest.raises(ProfileError, match=message):
            parse_shapes(text, "--max-shapes")


def _shapes(batch, length, heads=2):
    return {
        "query": (batch, length, 16),
        "key": (batch, length, 16),
        "value": (batch, length, 16),
        "key_padding_mask": (batch, length),
        "attn_mask": (batch * heads, length, length),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda lo, opt, hi: hi.update(other=(1, 1)),
            "--max-shapes names 'other', which is not an input",
        ),
        (
            lambda lo, opt, hi: opt.pop("key_padding_mask"),
            "--opt-shapes does not give input 'key_padding_mask'",
        ),
        (
            lambda lo, opt, hi: hi.update(key_padding_mask=(4,)),
            "--max-shapes gives 'key_padding_mask' rank 1",
        ),
        (
            lambda lo, opt, hi: hi.update(query=(4, 64, 32)),
            "--max-shapes gives 'query' size 32 on axis 2, which is fixed at 16",
        ),
        (
            lambda lo, opt, hi: opt.update(query=(8, 64, 16)),
            "input 'query' axis 0 .batch. has min 1, opt 8, max 4",
        ),
        (lambda lo, opt, hi: hi.update(key=(4, 32, 16)), "axis batch|axis src_len has min/opt/max"),
        (
            lambda lo, opt, hi: hi.update(attn_mask=(7, 64, 64)),
            "input 'attn_mask' axis 0 is batch\\*2",
        ),
    ],
)
def test_profile_from_shapes_refuses_what_does_not_fit(change, message):
    lo, opt, hi = _shapes(1, 1), _shapes(2, 16), _shapes(4, 64)
    assert profile_from_shapes(_inputs(), lo, opt, hi).shapes["attn_mask"] == (
        (2, 1, 1),
        (4, 16, 16),
        (8, 64, 64),
    )
    change(lo, opt, hi)
    with pytest.raises(ProfileError, match=message):
        profile_from_shapes(_inputs(), lo, opt, hi)


def test_out_of_profile_input_names_the_axis_and_its_range():
    inputs = _inputs()
    profile = profile_from_limits(inputs, max_batch=4, max_len=128)
    check_in_profile(inputs, profile, _shapes(4, 128))
    with pytest.raises(
        InputError,
        match=r"input 'query' has size 129 on axis 1 \(tgt_len\), outside the engine's "
        r"profile range \[1, 128\]; rebuild the engine with a larger --max-len",
    ):
        check_in_profile(inputs, profile, _shapes(2, 129))
    with pytest.raises(
        InputError, match=r"input 'query' has size 5 on axis 0 \(batch\), outside .* \[1, 4\]"
    ):
        check_in_profile(inputs, profile, _shapes(5, 8))


def test_engine_key_changes_with_everything_an_engine_depends_on(tmp_path):
    profile = profile_from_limits(_inputs(), 8, 512).to_json()
    base = dict(
        model_sha256={"model.onnx": "a" * 64},
        tensorrt_version="10.14.1",
        gpu="NVIDIA H100 (sm_90)",
        profile=profile,
        settings={"precision": "fp32", "tf32": False},
    )
    key = engine_key(**base)
    assert key == engine_key(**base) and len(key) == 64
    changes = [
        {"model_sha256": {"model.onnx": "b" * 64}},
        {"model_sha256": {"model.onnx": "a" * 64, "model.onnx.data": "c" * 64}},
        {"tensorrt_version": "10.15.0"},
        {"gpu": "NVIDIA H200 (sm_90)"},
        {"profile": profile_from_limits(_inputs(), 8, 1024).to_json()},
        {"settings": {"precision": "fp16", "tf32": False}},
    ]
    assert len({key, *(engine_key(**{**base, **c}) for c in changes)}) == len(changes) + 1
    cache = EngineCache(tmp_path / "cache")
    assert cache.load(key) is None
    cache.store(cache.engine_path(key), b"engine bytes")
    assert cache.load(key) == b"engine bytes" and sorted(
        p.name for p in (tmp_path / "cache").iterdir()
    ) == [f"{key}.engine"]
    assert (
        cache.timing_cache_path("10.14.1", "NVIDIA H100 (sm_90)").name
        == "timing-10.14.1-NVIDIA_H100_sm_90_.cache"
    )


def test_onnxruntime_tensorrt_provider_gets_the_same_profile(tmp_path):
    profile = profile_from_limits(
        _inputs(AttentionSpec(16, 2, batch_first=True, self_attention=True)), 4, 64
    )
    options = tensorrt_provider_options(profile, "fp16", tmp_path)
    assert (
        options["trt_profile_min_shapes"] == "query:1x1x16"
        and options["trt_profile_max_shapes"] == "query:4x64x16"
    )
    assert (
        options["trt_profile_opt_shapes"] == "query:2x32x16" and options["trt_fp16_enable"] is True
    )
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(
        tmp_path / "onnxruntime"
    )


def test_engine_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_COMPILER_CACHE", str(tmp_path / "c"))
    assert EngineCache().root == tmp_path / "c"


def test_triton_tensorrt_plan_config_parses():
    text, summary = triton_config(
        _model(AttentionSpec(16, 2, batch_first=True, self_attention=True)),
        "mha",
        4,
        "tensorrt_plan",
    )
    config = parse_triton_config(text)
    assert (
        config.platform == "tensorrt_plan"
        and config.max_batch_size == 4
        and summary["dynamic_batching"]
    )
    with pytest.raises(ValueError, match="unknown Triton platform 'tensorflow'"):
        triton_config(_model(), "mha", 4, "tensorflow")


def test_torch_tensors_in_torch_tensors_out():
    spec = AttentionSpec(16, 2, batch_first=True, key_padding_mask="bool")
    session = OrtSession(_model(spec, "ort-cpu"))
    feeds = random_inputs(spec, (2, 5, 7), np.random.default_rng(0))
    want = session.run(feeds)
    got = session.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    np.testing.assert_array_equal(got["attn_output"].numpy(), want["attn_output"])
    with pytest.raises(
        InputError, match="every input as a numpy.ndarray or every input as a torch.Tensor"
    ):
        session.run(
            {
                "query": feeds["query"],
                "key": torch.from_numpy(feeds["key"]),
                "value": feeds["value"],
                "key_padding_mask": feeds["key_padding_mask"],
            }
        )
    with pytest.raises(InputError, match="input 'query' has dtype float64, expected float32"):
        session.run(
            {
                **{k: torch.from_numpy(v) for k, v in feeds.items()},
                "query": torch.zeros(2, 5, 16, dtype=torch.float64),
            }
        )


@pytest.mark.skipif(
    NO_ORT_CUDA is None,
    reason="onnxruntime here has CUDA; the message for its absence cannot be shown",
)
def test_missing_onnxruntime_gpu_is_one_clear_message():
    with pytest.raises(
        BackendUnavailable, match=r"has no CUDAExecutionProvider .*pip install -e '.\[gpu\]'"
    ):
        OrtSession(_model(target="ort-cpu"), providers=PROVIDERS["cuda"])
    with pytest.raises(
        BackendUnavailable, match=r"has no TensorrtExecutionProvider .*\[tensorrt\]"
    ):
        OrtSession(_model(), providers=PROVIDERS["tensorrt"])


@pytest.mark.skipif(
    NO_TRT is None, reason="TensorRT and a GPU are present; their absence cannot be shown"
)
def test_tensorrt_absence_is_one_clear_message(run_cli, tmp_path):
    assert NO_TRT.startswith(
        (
            "the tensorrt package is not installed",
            "no CUDA GPU is visible",
            "torch is not installed",
        )
    )
    with pytest.raises(BackendUnavailable, match=re.escape(NO_TRT)):
        TensorRTSession(b"", _inputs(), profile_from_limits(_inputs(), 2, 8))
    out = tmp_path / "trt"
    refused = run_cli(
        "compile.py",
        *"--embed-dim 16 --num-heads 2 --batch-first --key-padding-mask".split(),
        *"bool --target tensorrt --max-len 256 --max-batch 4 --out".split(),
        out,
    )
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert (
        f"compile.py: error: no model.engine: {NO_TRT}; wrote the ONNX and its manifest only (pass --allow-no-engine"
        in refused.stderr
    )
    manifest = json.loads(
        (out / "manifest.json").read_text()
    )  # the ONNX and the profile it would be built with
    assert sorted(manifest["files"]) == ["model.onnx"] and not (out / "model.engine").exists()
    assert manifest["engine"]["built"] is False and manifest["engine"]["reason"] == NO_TRT
    assert manifest["engine"]["profile"]["query"] == {
        "min": [1, 1, 16],
        "opt": [2, 128, 16],
        "max": [4, 256, 16],
    }
    allowed = run_cli(
        "compile.py",
        *"--embed-dim 16 --num-heads 2 --self-attention --target tensorrt".split(),
        *"--allow-no-engine --min-shapes query:1x1x16 --opt-shapes".split(),
        *"query:32x1x16 --max-shapes query:64x2x16 --check --out".split(),
        tmp_path / "allowed",
    )
    assert allowed.returncode == 0, allowed.stderr
    assert (
        f"no model.engine: {NO_TRT}" in allowed.stdout and "PASS" in allowed.stdout
    )  # the ONNX is still checked
    engine = json.loads((tmp_path / "allowed" / "manifest.json").read_text())["engine"]
    assert engine["profile"] == {
        "query": {"min": [1, 1, 16], "opt": [32, 1, 16], "max": [64, 2, 16]}
    }
    assert engine["trtexec"]["opt"] == "query:32x1x16"
    served = run_cli(
        "compile.py",
        *"--embed-dim 16 --num-heads 2 --target tensorrt --allow-no-engine".split(),
        "--out",
        tmp_path / "served",
        "--triton-repo",
        tmp_path / "repo",
    )
    assert (
        served.returncode == 1
        and f"cannot be built here: {NO_TRT}; nothing was written" in served.stderr
    )
    assert not (tmp_path / "served").exists() and not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--target", "ort-cpu", "--engine-cache", "c"],
            "--engine-cache shapes the TensorRT engine; it applies to --target tensorrt only",
        ),
        (
            ["--target", "tensorrt", "--min-shapes", "query:1x1x16"],
            "--min-shapes, --opt-shapes and --max-shapes go together",
        ),
        (
            [
                "--target",
                "tensorrt",
                "--max-len",
                8,
                "--min-shapes",
                "q:1",
                "--opt-shapes",
                "q:1",
                "--max-shapes",
                "q:1",
            ],
            "--max-batch/--max-len and --min/--opt/--max-shapes both set the profile",
        ),
        (
            [
                "--target",
                "tensorrt",
                "--self-attention",
                "--min-shapes",
                "query:1x1x16",
                "--opt-shapes",
                "query:2x1x16",
                "--max-shapes",
                "query:1x1x16",
            ],
            "input 'query' axis 0 (tgt_len) has min 1, opt 2, max 1; expected 1 <= min <= opt <= max",
        ),
        (
            ["--target", "tensorrt", "--max-len", 0],
            "--max-len must be a whole number of at least 1, got 0",
        ),
    ],
)
def test_engine_flag_errors_are_one_line_and_write_nothing(run_cli, tmp_path, args, message):
    result = run_cli(
        "compile.py", "--embed-dim", 16, "--num-heads", 2, *args, "--out", tmp_path / "x"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, (
        result.stderr
    )
    assert not (tmp_path / "x").exists()


# GPU tests: they run where the packages and a GPU are, and skip with the reason elsewhere.


@pytest.mark.skipif(NO_ORT_CUDA is not None, reason=str(NO_ORT_CUDA))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ort_cuda_matches_torch(precision):
    spec = AttentionSpec(64, 4, batch_first=True, key_padding_mask="bool", causal=True)
    weights = AttentionWeights.random(spec, 0)
    session = OrtSession(
        compile_model(build_mha(spec, weights), "ort-cuda", precision), providers=PROVIDERS["cuda"]
    )
    report = check_session(session, spec, weights, tolerance=1e-5 if precision == "fp32" else 1e-2)
    assert report.passed, report.table()
    feeds = {
        k: torch.from_numpy(v).cuda()
        for k, v in random_inputs(spec, (2, 9, 9), np.random.default_rng(1)).items()
    }
    got = session.run(feeds)[
        "attn_output"
    ]  # bound in place through IO binding, returned on the GPU
    assert got.is_cuda
    want = session.run({k: v.cpu().numpy() for k, v in feeds.items()})["attn_output"]
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.skipif(NO_TRT is not None, reason=str(NO_TRT))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_torch_across_its_profile_and_is_cached(tmp_path, precision):
    spec = AttentionSpec(64, 4, batch_first=True, self_attention=True, key_padding_mask="bool")
    weights = AttentionWeights.random(spec, 0)
    model = compile_model(build_mha(spec, weights), "tensorrt", precision)
    onnx.save(model, tmp_path / "model.onnx")
    inputs = input_specs(model)
    profile = profile_from_limits(inputs, max_batch=4, max_len=64)
    cache = EngineCache(tmp_path / "cache")
    engine, info = engine_for(
        tmp_path / "model.onnx", {"model.onnx": "x"}, profile, precision, cache
    )
    assert not info.from_cache and info.timing_cache.exists()
    again, info2 = engine_for(
        tmp_path / "model.onnx", {"model.onnx": "x"}, profile, precision, cache
    )
    assert info2.from_cache and again == engine and info2.key == info.key
    session = TensorRTSession(engine, inputs)
    assert session._profile == profile  # read back from the engine
    tolerance = 1e-5 if precision == "fp32" else 1e-2
    for shape in [(1, 1, 1), (2, 32, 32), (4, 64, 64)]:  # min, opt, max of the profile
        report = check_session(session, spec, weights, shapes=[shape], tolerance=tolerance)
        assert report.passed, report.table()
    with pytest.raises(InputError, match="outside the engine's profile range"):
        session.run(random_inputs(spec, (1, 65, 65), np.random.default_rng(0)))


@pytest.mark.skipif(NO_TRT is not None, reason=str(NO_TRT))
def test_compile_writes_a_checked_engine_and_reuses_it(run_cli, tmp_path):
    args = [
        "--embed-dim",
        64,
        "--num-heads",
        4,
        "--batch-first",
        "--self-attention",
        "--key-padding-mask",
        "bool",
        "--target",
        "tensorrt",
        "--max-batch",
        4,
        "--max-len",
        64,
        "--check",
        "--engine-cache",
        tmp_path / "cache",
    ]
    first = run_cli(
        "compile.py", *args, "--out", tmp_path / "a", "--triton-repo", tmp_path / "repo"
    )
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    engine = manifest["engine"]
    assert engine["built"] and not engine["from_cache"] and engine["check"]["passed"]
    assert (tmp_path / "repo" / "attention" / "1" / "model.plan").read_bytes() == (
        tmp_path / "a" / "model.engine"
    ).read_bytes()
    config = parse_triton_config((tmp_path / "repo" / "attention" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    second = run_cli("compile.py", *args, "--out", tmp_path / "b")
    assert second.returncode == 0, second.stderr
    again = json.loads((tmp_path / "b" / "manifest.json").read_text())["engine"]
    assert again["from_cache"] and again["cache_key"] == engine["cache_key"]
