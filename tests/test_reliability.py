"""The failures a user can cause and what they get (docs/RELIABILITY.md names a test for each row),
plus concurrency, determinism and the memory bound."""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from conftest import ROOT

from attention_compiler.artifacts import output_folders
from attention_compiler.artifacts.files import write_manifest
from attention_compiler.artifacts.resources import (
    MemoryBoundError,
    attention_parts,
    check_memory,
    parse_size,
)
from attention_compiler.benchmark.memory import PeakRss
from attention_compiler.cli import compile as compile_script  # noqa: E402  (in this process, so it can be patched)
from compiler import compile_model
from graphs import AttentionSpec, AttentionWeights, WeightsError, build_mha
from graphs.weights import expected_shapes, random_state
from runtime import InputError
from runtime.check import Shape, random_inputs
from runtime.ort import OrtSession

CPU_TARGETS = ("portable", "onnx-attention", "ort-cpu", "tensorrt")
SPEC = AttentionSpec(8, 2)


def _one_line_error(result: subprocess.CompletedProcess, status: int, message: str) -> None:
    assert result.returncode == status, result.stderr
    assert (
        result.stderr.count("\n") == 1
        and message in result.stderr
        and "Traceback" not in result.stderr
    ), result.stderr


# Weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "weight 'in_proj_bias' holds 1 NaN or infinite value; every output would be NaN"),
        (np.inf, "weight 'in_proj_bias' holds 1 NaN or infinite value; every output would be NaN"),
        (
            1e300,
            "weight 'in_proj_bias' holds 1 NaN or infinite value once cast to float32, which cannot hold its values",
        ),
    ],
)
def test_non_finite_weights_are_refused(value, message):
    state = random_state(expected_shapes(SPEC), 0)
    state["in_proj_bias"][5] = value
    with pytest.raises(WeightsError) as info:
        AttentionWeights.from_state_dict(SPEC, state)
    assert message in str(info.value)


def test_a_corrupt_weights_file_is_one_line_from_the_cli(run_cli, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    result = run_cli(
        "compile.py",
        *"--embed-dim 8 --num-heads 2 --weights".split(),
        tmp_path / "w.safetensors",
        "--out",
        tmp_path / "out",
    )
    _one_line_error(result, 2, "is not a readable safetensors file")
    assert not (tmp_path / "out").exists()


# ONNX ingest ----------------------------------------------------------------------------------


def _external_model(folder, location):
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.float_data[:]
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value="16")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [tensor],
    )
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    return path


def test_external_data_through_a_symlink_out_of_the_folder_is_refused_and_not_read(
    tmp_path, monkeypatch
):
    import graphs.onnx_files as ingest

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").symlink_to(secret)
    reads = []
    monkeypatch.setattr(ingest, "load_external_data_for_model", lambda *a: reads.append(a))
    for location in ("weights.bin", "../secret.bin", str(secret)):
        with pytest.raises(
            ingest.IngestError,
            match=f"points at external data '{re.escape(location)}', which is not a file "
            "inside the model's folder",
        ):
            ingest.load_onnx(_external_model(model_dir, location))
    assert reads == []  # refused before anything was read


def _no_attention_model(path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("target", ["portable", "onnx-attention", "ort-cpu"])
def test_a_graph_without_attention_is_reported_and_written_unchanged(run_cli, tmp_path, target):
    source = _no_attention_model(tmp_path / "plain.onnx")
    result = run_cli(
        "compile.py", "--onnx", source, "--target", target, "--check", "--out", tmp_path / "out"
    )
    assert result.returncode == 0, result.stderr
    assert "left alone: attention at Softmax 'y': not an attention core" in result.stdout
    assert (
        "no attention in the graph (no Softmax is an attention core): model.onnx is the input graph, unchanged"
        in result.stdout
    )
    assert (tmp_path / "out" / "model.onnx").read_bytes() == source.read_bytes()
    fp16 = run_cli(
        "compile.py", "--onnx", source, "--precision", "fp16", "--out", tmp_path / "half"
    )
    _one_line_error(
        fp16,
        2,
        "holds no attention, so the passes leave it as it is; --precision fp16 converts attention "
        "graphs only",
    )
    assert not (tmp_path / "half").exists()


# Runtime inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_zero_length_axes_are_one_clear_error_on_every_target(target):
    spec = AttentionSpec(8, 2, key_padding_mask="bool")
    session = OrtSession(
        compile_model(build_mha(spec, AttentionWeights.random(spec)), target, "fp32")
    )
    for shape, symbol, name in (
        ((2, 0, 3), "tgt_len", "query"),
        ((2, 3, 0), "src_len", "key"),
        ((0, 3, 3), "batch", "query"),
    ):
        feeds = random_inputs(spec, shape, np.random.default_rng(0))
        with pytest.raises(
            InputError,
            match=f"input '{name}' has {symbol}=0 on axis .; every dynamic axis needs at least 1",
        ):
            session.run(feeds)


# compile.py: one line, --verbose for the detail -------------------------------------------------


def test_verbose_adds_the_traceback_behind_the_one_line(run_cli, tmp_path):
    args = [
        "--embed-dim",
        8,
        "--num-heads",
        2,
        "--weights",
        tmp_path / "none.npz",
        "--out",
        tmp_path / "out",
    ]
    _one_line_error(run_cli("compile.py", *args), 2, "weights file")
    verbose = run_cli("compile.py", *args, "--verbose")
    assert verbose.returncode == 2
    assert (
        "Traceback (most recent call last)" in verbose.stderr
        and "graphs/weights.py" in verbose.stderr
    )
    assert verbose.stderr.strip().splitlines()[-1].startswith("compile.py: error: weights file")


def test_a_fault_of_ours_is_one_line_with_exit_3(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise ZeroDivisionError("division by zero\nsecond line")

    from attention_compiler import artifacts

    monkeypatch.setattr(artifacts.pipeline, "build_mha", broken)
    assert (
        compile_script.main(
            ["--embed-dim", "8", "--num-heads", "2", "--out", str(tmp_path / "out")]
        )
        == 3
    )
    err = capsys.readouterr().err
    assert err == (
        "compile.py: error: internal error ZeroDivisionError: division by zero; nothing was written "
        "(please report it, with the --verbose traceback)\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_reader_that_goes_away_does_not_stop_the_work(tmp_path):
    out = tmp_path / "out"
    command = f"{sys.executable} {ROOT / 'scripts' / 'compile.py'} --embed-dim 8 --num-heads 2 --check --out {out} | head -c 0"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    # stderr may name a slow step (progress); it holds no error and no traceback
    assert all(
        re.fullmatch(r"[a-z ]+(\.\.\.|: done in [0-9.]+ s)", line)
        for line in result.stderr.splitlines()
    ), result.stderr
    assert json.loads((out / "manifest.json").read_text())["check"]["passed"]


# Concurrency ----------------------------------------------------------------------------------


def test_one_session_from_eight_threads_gives_each_caller_its_own_result():
    spec = AttentionSpec(16, 4, key_padding_mask="bool", need_weights=True)
    session = OrtSession(
        compile_model(build_mha(spec, AttentionWeights.random(spec)), "ort-cpu", "fp32")
    )
    feeds = [
        random_inputs(spec, (1 + i % 3, 3 + i, 40 - i), np.random.default_rng(i)) for i in range(32)
    ]
    alone = [session.run(f) for f in feeds]
    barrier = threading.Barrier(8)

    def call(i):
        if i < 8:
            barrier.wait()  # the first eight calls start together
        return session.run(feeds[i])

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(call, range(32)))
    for want, got in zip(alone, together):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def _compile_async(out, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "compile.py"),
            "--embed-dim",
            "16",
            "--num-heads",
            "4",
            "--check",
            "--quiet",
            "--out",
            str(out),
            *map(str, extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _consistent(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    for name, record in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == record["sha256"]
    return manifest


def test_two_runs_into_different_folders_both_succeed(tmp_path):
    runs = [_compile_async(tmp_path / f"out{i}", "--seed", i) for i in range(2)]
    for i, run in enumerate(runs):
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert _consistent(tmp_path / f"out{i}")["weights"]["seed"] == i


def test_two_runs_into_one_folder_one_wins_and_nothing_mixes(tmp_path):
    out = tmp_path / "out"
    runs = [_compile_async(out, "--seed", i) for i in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    winners = [i for i, (status, _) in enumerate(results) if status == 0]
    assert len(winners) == 1, results
    status, err = results[1 - winners[0]]
    assert (
        status == 1
        and err.count("\n") == 1
        and re.search("was written by another run|already exists and is not empty", err)
    )
    assert _consistent(out)["weights"]["seed"] == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


@pytest.mark.parametrize("force", [False, True], ids=["new-folder", "force-over-ours"])
def test_a_race_past_the_first_check_is_caught_by_the_rename(tmp_path, force):
    """Both runs find the folder free (or, with force, a folder of ours), both finish staging; the
    locked swap lets exactly one in."""
    out, barrier, outcomes = tmp_path / "out", threading.Barrier(2), {}
    if force:
        with output_folders.staged_directory(out) as staging:
            write_manifest(staging, {"files": {}})

    def run(name):
        try:
            with output_folders.staged_directory(out, force=force) as staging:
                write_manifest(staging, {"files": {"model.onnx": {}, f"{name}.only": {}}})
                (staging / "model.onnx").write_text(name)
                (staging / f"{name}.only").write_text(name)
                barrier.wait()
            outcomes[name] = "won"
        except output_folders.ArtifactError as exc:
            outcomes[name] = str(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = next(n for n, o in outcomes.items() if o == "won")
    loser = "b" if winner == "a" else "a"
    assert (
        "was written by another run while this one worked; this run's files were discarded"
        in outcomes[loser]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "model.onnx", f"{winner}.only"]
    )
    assert (out / "model.onnx").read_text() == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# Determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [
            "--embed-dim",
            16,
            "--num-heads",
            4,
            "--key-padding-mask",
            "bool",
            "--causal",
            "--need-weights",
            "--target",
            "ort-cpu",
        ],
        [
            "--embed-dim",
            16,
            "--num-heads",
            4,
            "--kdim",
            8,
            "--add-bias-kv",
            "--target",
            "onnx-attention",
            "--precision",
            "fp16",
        ],
        [
            "--block",
            "decoder",
            "--embed-dim",
            16,
            "--num-heads",
            2,
            "--dim-feedforward",
            32,
            "--target",
            "tensorrt",
            "--allow-no-engine",
        ],
    ],
    ids=["mha-ort-cpu", "mha-onnx-attention-fp16", "decoder-tensorrt"],
)
def test_the_same_inputs_give_a_byte_identical_model(tmp_path, args):
    """Two fresh interpreters with different hash seeds, into differently named folders."""
    outs = [tmp_path / "first", tmp_path / "second" / "nested"]
    for i, out in enumerate(outs):
        env = {**os.environ, "PYTHONHASHSEED": str(i + 1)}
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "compile.py"),
                *map(str, args),
                "--quiet",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr
    first, second = (_consistent(out) for out in outs)
    assert first["files"]["model.onnx"] == second["files"]["model.onnx"]
    data = (outs[0] / "model.onnx").read_bytes()
    assert data == (outs[1] / "model.onnx").read_bytes()
    assert str(tmp_path).encode() not in data and os.uname().nodename.encode() not in data


# Resource bounds ------------------------------------------------------------------------------


def test_a_graph_past_the_memory_limit_at_its_maximum_shape_is_refused(run_cli, tmp_path):
    args = [
        "--embed-dim",
        64,
        "--num-heads",
        8,
        "--need-weights",
        "--no-average-attn-weights",
        "--out",
        tmp_path / "out",
    ]
    huge = run_cli("compile.py", *args, "--max-len", 200_000)
    _one_line_error(
        huge,
        2,
        "at its declared maximum shape (batch 8, tgt_len 200000, src_len 200000) this graph needs "
        "about 18.6 TiB per call, mostly the attention scores",
    )
    assert (
        "more than the memory limit of" in huge.stderr
        and "(this machine's memory; set --memory-limit)" in huge.stderr
    )
    small = run_cli("compile.py", *args, *"--max-batch 2 --max-len 512 --memory-limit 8MiB".split())
    _one_line_error(
        small,
        2,
        "more than the memory limit of 8.0 MiB (--memory-limit); lower --max-batch or --max-len",
    )
    assert not (tmp_path / "out").exists()
    fits = run_cli("compile.py", *args, *"--max-batch 2 --max-len 512 --memory-limit 64MiB".split())
    assert fits.returncode == 0, fits.stderr
    memory = json.loads((tmp_path / "out" / "manifest.json").read_text())["memory"]
    assert (
        memory["max_shape"] == {"batch": 2, "tgt_len": 512, "src_len": 512}
        and memory["limit_bytes"] == 64 * 2**20
    )
    assert memory["estimate_bytes"] == sum(memory["parts"].values()) < 64 * 2**20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--embed-dim", "1000000"],
            "compiling this graph needs about 116.4 TiB, mostly the weights as they are built",
        ),
        # 2 x 16 x 1e11 + 1e11 + 16 feed-forward weights, 1088 attention, 64 LayerNorm
        (
            ["--block", "encoder", "--dim-feedforward", "100000000000"],
            "(3,300,000,001,168 parameters)",
        ),
        (
            ["--latency", "--latency-shape", "1,100000,100000"],
            "mostly the attention scores (batch x heads x tgt_len x keys, "
            "float32) of one call at the --latency-shape",
        ),
    ],
)
def test_the_work_is_estimated_and_refused_before_it_starts(tmp_path, capsys, args, message):
    """No MemoryError half-way: what building, checking and timing would hold is estimated first."""
    with PeakRss() as peak:
        status = compile_script.main(
            ["--embed-dim", "16", "--num-heads", "2", *args, "--out", str(tmp_path / "out")]
        )
    err = capsys.readouterr().err
    assert (
        status == 2
        and err.count("\n") == 1
        and message in err
        and "more than the memory limit of" in err
    ), err
    assert peak.growth < 100 * 2**20 and not (tmp_path / "out").exists()


def test_the_work_estimate_is_above_the_measured_peak(tmp_path):
    from attention_compiler.artifacts.resources import parameters, work_parts

    compile_script.main(
        [*"--embed-dim 16 --num-heads 2 --check --quiet --out".split(), str(tmp_path / "warm")]
    )
    with PeakRss() as peak:
        assert (
            compile_script.main(
                [
                    *"--embed-dim 1536 --num-heads 8 --check --quiet --out".split(),
                    str(tmp_path / "out"),
                ]
            )
            == 0
        )
    estimate = sum(work_parts(parameters(AttentionSpec(1536, 8))).values())
    assert 0.5 * estimate < peak.growth < estimate, (peak.growth, estimate)


def test_memory_limit_needs_a_maximum_shape(run_cli, tmp_path):
    result = run_cli(
        "compile.py",
        *"--embed-dim 8 --num-heads 2 --memory-limit 1GiB --out".split(),
        tmp_path / "out",
    )
    _one_line_error(
        result,
        2,
        "--memory-limit bounds a graph built from a spec at its maximum shape: give --max-batch",
    )


def test_the_work_is_bounded_by_this_machines_memory(tmp_path, capsys, monkeypatch):
    from attention_compiler.artifacts import resources

    args = ["--embed-dim", "256", "--num-heads", "2", "--out", str(tmp_path / "out")]
    weights = 4 * 256 * 256 + 4 * 256  # in_proj, out_proj and their biases
    estimate = resources.WORK_BYTES_PER_PARAMETER * weights + resources.WORK_FIXED_BYTES
    monkeypatch.setattr(resources, "machine_memory", lambda: estimate - 1)
    assert compile_script.main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"compiling this graph needs about {resources.show_bytes(estimate)}" in err
        and "(this machine's memory)" in err
    )
    monkeypatch.setattr(resources, "machine_memory", lambda: estimate)
    assert compile_script.main([*args, "--quiet"]) == 0


def test_a_session_refuses_inputs_past_the_declared_maxima(tmp_path):
    """--max-batch 1 --max-len 16 used to run at (2, 32768) and try to take gigabytes."""
    out = tmp_path / "out"
    assert (
        compile_script.main(
            [
                *"--embed-dim 16 --num-heads 2 --self-attention --max-batch 1".split(),
                *"--max-len 16 --check --quiet --out".split(),
                str(out),
            ]
        )
        == 0
    )
    session = OrtSession(out / "model.onnx")
    assert session.maxima == {"batch": 1, "length": 16}
    assert session.run({"query": np.zeros((16, 1, 16), np.float32)})["attn_output"].shape == (
        16,
        1,
        16,
    )
    with pytest.raises(
        InputError,
        match=r"input 'query' has tgt_len=32768, more than the 16 this graph was compiled for "
        r"\(--max-len 16\)",
    ):
        session.run({"query": np.zeros((32768, 1, 16), np.float32)})
    with pytest.raises(InputError, match="has batch=2, more than the 1 .* --max-batch"):
        session.run({"query": np.zeros((4, 2, 16), np.float32)})


def test_a_kv_cache_loop_stops_at_the_declared_maximum_length(tmp_path):
    from runtime.generation import KvCacheLoop

    out = tmp_path / "out"
    args = [
        "--embed-dim",
        "16",
        "--num-heads",
        "2",
        "--self-attention",
        "--causal",
        "--kv-cache",
        "--max-len",
        "4",
    ]
    assert compile_script.main([*args, "--quiet", "--out", str(out)]) == 0
    spec = AttentionSpec(16, 2, self_attention=True, is_causal=True, kv_cache=True)
    loop = KvCacheLoop(OrtSession(out / "model.onnx"), spec)
    loop.prefill(np.zeros((3, 1, 16), np.float32))
    loop.step(np.zeros((1, 1, 16), np.float32))
    with pytest.raises(
        InputError, match=r"has past_len\+tgt_len=5, more than the 4 .*\(--max-len 4\)"
    ):
        loop.step(np.zeros((1, 1, 16), np.float32))


def test_the_estimate_counts_what_the_shape_needs():
    spec = AttentionSpec(64, 8, self_attention=True, need_weights=True, average_attn_weights=False)
    parts = attention_parts(spec, Shape(2, 100, 100), "fp32", "portable")
    assert (
        parts["attention scores (batch x heads x tgt_len x keys, float32)"] == 4 * 2 * 8 * 100 * 100
    )
    assert parts["attn_output_weights"] == 4 * 2 * 8 * 100 * 100
    assert parts["weights"] == 4 * (4 * 64 * 64 + 4 * 64)
    streamed = attention_parts(
        AttentionSpec(64, 8, self_attention=True), Shape(2, 100, 100), "fp32", "tensorrt"
    )
    assert not any(
        name.startswith("attention scores") for name in streamed
    )  # TensorRT's fused kernels stream them
    with pytest.raises(MemoryBoundError, match="mostly the attention scores"):
        check_memory(parts, Shape(2, 100, 100), 10**6, "--memory-limit")
    assert (
        parse_size("16GiB") == 16 * 2**30
        and parse_size("512MB") == 512 * 10**6
        and parse_size("2e9") == 2 * 10**9
    )
    for bad in ("", "-1GiB", "12 parsecs", "0"):
        with pytest.raises(ValueError, match="expected a size such as 16GiB"):
            parse_size(bad)


@pytest.mark.parametrize("target", ["portable", "onnx-attention"])
def test_the_estimate_is_near_the_measured_peak(target):
    """One call at (4, 1024, 1024): the scores and weights (128 MiB each) dominate. Measured by the
    kernel's high-water mark (attention_compiler/benchmark/memory.py), in a fresh session so no arena is reused."""
    spec = AttentionSpec(
        64,
        8,
        self_attention=True,
        need_weights=True,
        average_attn_weights=False,
        key_padding_mask="bool",
    )
    session = OrtSession(
        compile_model(build_mha(spec, AttentionWeights.random(spec)), target, "fp32")
    )
    feeds = random_inputs(spec, (4, 1024, 1024), np.random.default_rng(0))
    with PeakRss() as peak:
        session.run(feeds)
    estimate = sum(attention_parts(spec, Shape(4, 1024, 1024), "fp32", target).values())
    assert 0.8 <= peak.growth / estimate <= 1.25, (peak.growth, estimate)


# Checks that used to stop with an internal error -----------------------------------------------


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_a_cached_decoder_with_a_memory_mask_checks_against_torch(tmp_path, mask):
    """The check runs torch over past and new tokens; the memory mask must cover the past rows too."""
    out = tmp_path / "decoder"
    assert (
        compile_script.main(
            [
                *"--block decoder --embed-dim 16 --num-heads 2 --dim-feedforward".split(),
                *"32 --causal --kv-cache --memory-mask".split(),
                mask,
                *"--memory-key-padding-mask bool --check --quiet --out".split(),
                str(out),
            ]
        )
        == 0
    )
    check = json.loads((out / "manifest.json").read_text())["check"]
    assert check["passed"] and {c["reference"] for c in check["comparisons"]} == {"numpy", "torch"}


def test_zero_weights_pass_the_check_and_the_manifest_is_json(tmp_path):
    from safetensors.numpy import save_file

    state = {
        k: v.astype(np.float32)
        for k, v in random_state(expected_shapes(AttentionSpec(16, 2)), 0).items()
    }
    state["out_proj.weight"][:] = 0
    state["out_proj.bias"][:] = (
        0  # as torch initialises it: every output is 0, a check against zeros
    )
    save_file(state, str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    assert (
        compile_script.main(
            [
                *"--embed-dim 16 --num-heads 2 --weights".split(),
                str(tmp_path / "w.safetensors"),
                *"--check --quiet --out".split(),
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["check"]["passed"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "argument --seed: expected a whole number from 0 to 2**64-1, got '-1'"),
        (["--seed", "1e3"], "argument --seed: expected a whole number"),
        (["--max-len", "0"], "--max-len must be a whole number of at least 1, got 0"),
    ],
)
def test_bad_numbers_on_the_command_line_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        compile_script.main(
            ["--embed-dim", "8", "--num-heads", "2", *argv, "--out", str(tmp_path / "out")]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
