"""scripts/bench.py --quick: runs end to end; every figure in its JSON is finite and positive, every
point has the three backends, and the ratios are computed against the same run's torch eager."""

from __future__ import annotations

import json
import math

import pytest

from runtime.timing import measure, self_attention_flops

pytest.importorskip("torch")


def test_quick_bench_writes_a_complete_json(run_cli, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench.py", "--quick", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "| mask | length | backend |" in result.stdout
    report = json.loads(out.read_text())
    assert report["matmul_rate_gflops"] > 0 and report["machine"]["cores"] >= 1
    rows = report["rows"]
    points = {(r["mask"], r["length"]) for r in rows}
    assert points == {(m, n) for m in ("none", "bool") for n in (32, 64)}
    for point in points:
        backends = {r["backend"]: r for r in rows if (r["mask"], r["length"]) == point}
        assert set(backends) == {"torch eager", "ort-cpu graph", "exporter graph"}
        assert backends["torch eager"]["ratio_to_eager"] == 1.0
        for r in backends.values():
            assert r["ratio_to_eager"] == pytest.approx(r["p50_s"] / backends["torch eager"]["p50_s"])
            assert r["rel_error_vs_eager"] <= 1e-5  # the same function, in float32
    for r in rows:
        for key in ("p50_s", "p90_s", "gflops", "matmul_rate_fraction", "ratio_to_eager", "ratio_to_exporter"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p90_s"] >= r["p50_s"] and r["runs"] >= 5


def test_flops_count_projections_and_both_attention_matmuls():
    # L=2, E=3, batch 1: 4 projections of 2x3x3 MACs, scores and context 2x2x3 MACs each
    assert self_attention_flops(1, 2, 3) == 2 * (4 * 18 + 2 * 12)
    assert self_attention_flops(2, 2, 3) == 2 * self_attention_flops(1, 2, 3)


def test_measure_runs_at_least_the_minimum_and_orders_percentiles():
    calls = []
    timing = measure(lambda: calls.append(1), warmup=3, min_runs=7, min_seconds=0.0)
    assert timing.runs == 7 and len(calls) == 10 and 0 <= timing.p50 <= timing.p90
