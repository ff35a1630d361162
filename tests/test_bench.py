"""attention-bench (scripts/bench.py) end to end in quick mode (schema, finite positive figures, ratios against the
same run's torch eager, the floor from the same run's rates), from spec flags and from a compiled
folder, and its errors; the cost model and memory measurement it rests on."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from attention_compiler.benchmark.cost import attended_pairs, attention_flops, attention_min_bytes
from attention_compiler.benchmark.memory import PeakRss, predicted_growth
from attention_compiler.benchmark.sweep import bench_inputs
from attention_compiler.benchmark.timing import measure
from graphs import AttentionSpec

torch = pytest.importorskip("torch")

POSITIVE = (
    "p50_s",
    "p90_s",
    "p99_s",
    "best_s",
    "tokens_per_s",
    "flops",
    "gflops",
    "min_bytes",
    "floor_s",
    "x_floor",
    "ratio_to_eager",
    "ratio_to_exporter",
    "memory_peak_bytes",
)


def _check_rows(report, backends, points):
    rows = report["rows"]
    assert not [r for r in rows if "skipped" in r]
    assert {(r["batch"], r["length"]) for r in rows} == points
    rates = report["rates"]
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    for point in points:
        here = {r["backend"]: r for r in rows if (r["batch"], r["length"]) == point}
        assert set(here) == backends
        eager, exporter = here["torch eager"], here.get("exporter graph")
        assert eager["ratio_to_eager"] == 1.0
        assert exporter is None or exporter["ratio_to_exporter"] == 1.0
        for r in here.values():
            for key in POSITIVE if exporter is not None else set(POSITIVE) - {"ratio_to_exporter"}:
                assert math.isfinite(r[key]) and r[key] > 0, (key, r)
            assert r["memory_growth_bytes"] >= 0 and r["runs"] >= 5
            assert r["p50_s"] <= r["p90_s"] <= r["p99_s"]
            assert r["ratio_to_eager"] == pytest.approx(r["p50_s"] / eager["p50_s"])
            if exporter is None:  # not asked for: no ratio to it
                assert r["ratio_to_exporter"] is None
            else:
                assert r["ratio_to_exporter"] == pytest.approx(r["p50_s"] / exporter["p50_s"])
            assert r["tokens_per_s"] == pytest.approx(point[0] * point[1] / r["p50_s"])
            floor = max(
                r["flops"] / rates["matmul_fp32_flops"],
                r["min_bytes"] / rates["bandwidth_bytes_per_s"],
            )
            assert r["floor_s"] == pytest.approx(floor) and r["x_floor"] == pytest.approx(
                r["p50_s"] / floor
            )
            assert (
                0 <= r["rel_error_vs_eager_fp32"] <= 1e-5
            )  # every backend computes the same function in float32


def _in_process(script: str):
    """A command's module imported into this process (its torch import is paid once for the suite)."""
    import importlib

    return importlib.import_module(f"attention_compiler.cli.{script}")


def test_quick_bench_from_spec_flags_writes_table_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert (
        _in_process("bench").main(
            [
                "--quick",
                "--self-attention",
                "--batch-first",
                "--key-padding-mask",
                "bool",
                "--causal",
                "--json",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "| batch | length | backend |" in stdout and "ort-cpu graph" in stdout
    report = json.loads(out.read_text())
    _check_rows(
        report,
        {"torch eager", "torch sdpa", "exporter graph", "ort-cpu graph"},
        {(b, n) for b in (1, 2) for n in (32, 64)},
    )
    spec = AttentionSpec.from_dict(report["spec"])
    assert spec.is_causal and spec.key_padding_mask == "bool" and spec.embed_dim == 64
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["onnxruntime"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_masks_sweep_one_spec_per_kind_each_row_against_its_unmasked_row(tmp_path, capsys):
    out = tmp_path / "masks.json"
    assert (
        _in_process("bench").main(
            [
                "--quick",
                "--masks",
                "none",
                "causal",
                "float-2d",
                "--lengths",
                "16",
                "--batches",
                "2",
                "--baselines",
                "sdpa",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "| mask | batch | length |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mask"], r["backend"]) for r in rows] == [
        (m, b) for m in ("none", "causal", "float-2d") for b in ("torch sdpa", "ort-cpu graph")
    ]
    unmasked = {r["backend"]: r["p50_s"] for r in rows if r["mask"] == "none"}
    for r in rows:
        assert r["ratio_to_unmasked"] == pytest.approx(r["p50_s"] / unmasked[r["backend"]])


def test_bench_padding_is_trailing_and_differs_per_row():
    """Batched serving pads each sequence at its end: row 0 not at all, row 1 its last 30%."""
    spec = AttentionSpec(16, 2, batch_first=True, self_attention=True, key_padding_mask="bool")
    mask = bench_inputs(spec, 4, 10, np.random.default_rng(0))["key_padding_mask"]
    assert not mask[0].any() and mask[1].tolist() == [False] * 7 + [True] * 3
    for row in mask:  # padding, if any, is one run at the end
        assert row.tolist() == sorted(row.tolist())
    single = bench_inputs(spec, 1, 10, np.random.default_rng(0))["key_padding_mask"]
    assert single.tolist() == [[False] * 8 + [True] * 2]


def test_quick_bench_of_a_compiled_folder_uses_its_target_and_weights(tmp_path):
    folder = tmp_path / "compiled"
    assert (
        _in_process("compile").main(
            [
                "--embed-dim",
                "32",
                "--num-heads",
                "4",
                "--attn-mask",
                "float",
                "--seed",
                "7",
                "--target",
                "onnx-attention",
                "--external-data",
                "always",
                "--quiet",
                "--out",
                str(folder),
            ]
        )
        == 0
    )
    assert (folder / "model.onnx.data").exists()  # bench.py loads the model with its external data
    out = tmp_path / "bench.json"
    # the exporter's graph is the spec test's to time (its export is most of a quick run)
    argv = [str(folder), "--quick", "--baselines", "eager", "sdpa", "--json", str(out)]
    assert _in_process("bench").main(argv) == 0
    report = json.loads(out.read_text())
    assert report["compiled"] == [
        {"target": "onnx-attention", "precision": "fp32", "form": "attention-op"}
    ]
    assert report["weights"] == {"kind": "random", "seed": 7}
    # the rebuilt torch modules hold the folder's weights: outputs agree to float32 rounding
    _check_rows(
        report,
        {"torch eager", "torch sdpa", "onnx-attention graph"},
        {(b, n) for b in (1, 2) for n in (32, 64)},
    )


def test_bench_errors_are_one_clear_line(tmp_path, capsys):
    bench_script, compile_script = _in_process("bench"), _in_process("compile")

    def bench(*argv):  # in this process: a refusal while parsing is argparse's SystemExit
        try:
            status = bench_script.main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
        return status, capsys.readouterr().err

    folder = tmp_path / "compiled"
    assert (
        compile_script.main([*"--embed-dim 8 --num-heads 2 --quiet --out".split(), str(folder)])
        == 0
    )
    status, err = bench(folder, "--causal", "--targets", "portable")
    assert status == 2 and "DIR fixes the spec" in err and "--causal, --targets" in err
    status, err = bench("--targets", "ort-cuda")
    assert status == 2 and "target ort-cuda does not run on --device cpu" in err
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    status, err = bench(folder, "--quick")
    assert status == 2 and "does not match the sha256" in err and "Traceback" not in err
    external = tmp_path / "external"
    assert (
        compile_script.main(
            [
                *"--embed-dim 32 --num-heads 2 --external-data always --quiet".split(),
                "--out",
                str(external),
            ]
        )
        == 0
    )
    data = external / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")
    status, err = bench(external, "--quick")
    assert status == 2 and "model.onnx.data does not match the sha256" in err
    if not torch.cuda.is_available():
        status, err = bench("--quick", "--device", "cuda")
        assert status == 2 and "needs a CUDA GPU" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
def test_quick_bench_on_gpu_times_torch_and_says_why_ort_rows_are_missing(run_cli, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "bench.json"
    result = run_cli(
        "bench.py",
        *"--quick --device cuda --self-attention --precisions fp32 fp16".split(),
        "--json",
        out,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["gpu"] and report["rates"]["matmul_fp16_flops"] > 0
    rows = report["rows"]
    assert {r["backend"] for r in rows if "skipped" not in r} >= {"torch eager", "torch sdpa"}
    for r in rows:
        if (
            r["backend"].endswith("graph")
            and "CUDAExecutionProvider" not in ort.get_available_providers()
        ):
            assert "onnxruntime has no CUDAExecutionProvider" in r["skipped"]
        elif "skipped" not in r:
            assert r["memory"] == "cuda device" and r["p50_s"] > 0


# The cost model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tgt,src,extra", [(5, 5, 0), (3, 7, 0), (7, 3, 0), (4, 4, 2), (6, 2, 1)])
def test_causal_pairs_count_the_allowed_entries_of_the_mask(tgt, src, extra):
    spec = AttentionSpec(8, 2, is_causal=True, add_bias_kv=extra >= 1, add_zero_attn=extra == 2)
    allowed = ~np.triu(
        np.ones((tgt, src), bool), 1
    )  # query i sees keys 0..i, as torch's causal attn_mask
    assert attended_pairs(spec, tgt, src) == allowed.sum() + tgt * extra
    assert attended_pairs(AttentionSpec(8, 2), tgt, src) == tgt * src


def test_flops_count_projections_and_both_attention_matmuls():
    # cross-attention, E=4 (2 heads), kdim 3, vdim 5, L=2, S=6: projections 2*4*4 + 6*3*4 + 6*5*4 + 2*4*4 MACs;
    # scores and context: 2*6 pairs x head_dim 2 x 2 heads each
    spec = AttentionSpec(4, 2, kdim=3, vdim=5)
    macs = 32 + 72 + 120 + 32 + 2 * (12 * 4)
    assert attention_flops(spec, 1, 2, 6) == 2 * macs
    assert attention_flops(spec, 3, 2, 6) == 3 * attention_flops(spec, 1, 2, 6)
    causal = AttentionSpec(4, 2, self_attention=True, is_causal=True)
    full = AttentionSpec(4, 2, self_attention=True)
    # causal removes the hidden half of the L x L scores and context: 2 x (L^2 - L(L+1)/2) x E MACs
    assert attention_flops(full, 1, 8) - attention_flops(causal, 1, 8) == 2 * 2 * (64 - 36) * 4


def test_min_bytes_are_inputs_parameters_and_outputs_once():
    spec = AttentionSpec(4, 2, key_padding_mask="bool", attn_mask="float", need_weights=True)
    # query 2x3x4, key and value 2x5x4, output 2x3x4, weights 2x3x5 floats; masks 2x5 bool, 3x5 float;
    # parameters 3*4*4 + 3*4 + 4*4 + 4
    floats = 24 + 40 + 40 + 24 + 30
    params = 48 + 12 + 16 + 4
    assert attention_min_bytes(spec, 2, 3, 5) == 4 * floats + 10 + 4 * 15 + 4 * params
    assert (
        attention_min_bytes(spec, 2, 3, 5, weight_bytes=2) == 4 * floats + 10 + 4 * 15 + 2 * params
    )


# Measurement --------------------------------------------------------------------------------------


def test_peak_rss_sees_a_transient_allocation_released_before_the_block_ends():
    with PeakRss() as peak:
        block = np.ones(2**25)  # 256 MiB, touched
        del block
    assert peak.growth >= 250 * 2**20 and peak.peak >= peak.growth


def test_memory_prediction_follows_the_measured_growth():
    assert predicted_growth([(1000, 10), (2000, 20)], 4000) == pytest.approx(40)  # linear
    assert predicted_growth([(1000, 10), (2000, 40)], 4000) == pytest.approx(160)  # quadratic
    assert predicted_growth([(1000, 10)], 3000) == pytest.approx(90)  # one point: assume quadratic
    assert predicted_growth([], 3000) is None


def test_measure_runs_at_least_the_minimum_and_orders_percentiles():
    calls = []
    timing = measure(lambda: calls.append(1), warmup=3, min_runs=7, min_seconds=0.0)
    assert timing.runs == 7 and len(calls) == 10 and 0 <= timing.p50 <= timing.p90 <= timing.p99


def test_decode_bench_times_every_way_to_the_same_last_token(run_cli, tmp_path):
    out = tmp_path / "decode.json"
    result = run_cli(
        "bench.py",
        *"--decode --embed-dim 32 --num-heads 4 --prompt 48 --new-tokens 4".split(),
        *"--batches 2 --targets ort-cpu onnx-attention --json".split(),
        out,
    )
    assert result.returncode == 0, result.stderr
    assert "decoding 4 tokens after a 48-token prompt, batch 2" in result.stdout
    report = json.loads(out.read_text())
    assert report["settings"] == {"prompt": 48, "new_tokens": 4, "batch": 2, "precision": "fp32"}
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {
        "ort-cpu KV cache",
        "ort-cpu recompute",
        "onnx-attention KV cache",
        "onnx-attention recompute",
        "torch eager recompute",
    }
    for r in rows.values():
        assert r["steps_timed"] == 3 and 0 < r["p50_s"] and r["tokens_per_s"] > 0
        assert (
            r["last_token_max_abs_diff"] <= 1e-5
        )  # every way computes the same token (outputs near 1 in size)
    assert (
        rows["ort-cpu KV cache"]["prefill_s"] > 0 and rows["ort-cpu recompute"]["prefill_s"] is None
    )
    prefill = {r["backend"]: r for r in report["prefill"]}
    assert set(prefill) == {
        f"{t} {way}"
        for t in ("ort-cpu", "onnx-attention")
        for way in ("no mask", "causal", "KV-cache prefill", "KV-cache prefill, --max-len 48")
    }
    assert (
        all(r["p50_s"] > 0 for r in prefill.values())
        and prefill["ort-cpu no mask"]["vs_no_mask"] == 1.0
    )
    assert "ort-cpu KV-cache prefill" in result.stdout
    refused = run_cli("bench.py", "--decode", "--new-tokens", 1)
    assert refused.returncode == 2 and "--new-tokens at least 2" in refused.stderr
