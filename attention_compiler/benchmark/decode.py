"""bench.py --decode: per-token latency of autoregressive decoding with a KV-cache graph, against
recomputing full causal attention over the whole prefix at every step (the plain compiled graph,
and torch eager nn.MultiheadAttention), all in one run on the same tokens; and the prompt's prefill
through the KV-cache graph against the plain graphs with and without the causal mask."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnxruntime as ort

from compiler import compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from graphs.builder import declare_maxima
from runtime.generation import KvCacheLoop
from runtime.ort import OrtSession


def decode_rows(
    spec: AttentionSpec,
    weights: AttentionWeights,
    targets: list[str],
    precision: str,
    prompt: int,
    new_tokens: int,
    batch: int,
    threads: int,
    torch_eager: bool = True,
) -> list[dict[str, Any]]:
    """One row per way of producing the new tokens' attention outputs: its per-token p50, mean and
    tokens per second, and how far its last output lies from the KV-cache graph's."""
    cached_spec = dataclasses.replace(spec, kv_cache=True)
    rng = np.random.default_rng(0)
    total = prompt + new_tokens
    tokens = rng.standard_normal(
        (batch, total, spec.embed_dim) if spec.batch_first else (total, batch, spec.embed_dim)
    )
    tokens = tokens.astype(np.float32)
    axis = 1 if spec.batch_first else 0
    take = lambda start, stop: np.take(tokens, np.arange(start, stop), axis=axis)  # noqa: E731
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rows, reference = [], None
    for target in targets:
        model = compile_model(build_mha(cached_spec, weights), target, precision)
        loop = KvCacheLoop(OrtSession(model, options=options), cached_spec)
        start = time.perf_counter()
        loop.prefill(take(0, prompt))
        prefill_s = time.perf_counter() - start
        times, last = _timed([lambda i=i: loop.step(take(i, i + 1)) for i in range(prompt, total)])
        reference = last if reference is None else reference
        rows.append(
            _row(f"{target} KV cache", target, batch, times, last, reference, prefill_s=prefill_s)
        )
        model = compile_model(build_mha(spec, weights), target, precision)
        plain = OrtSession(model, options=options)
        recompute = [
            lambda i=i: plain.run({"query": take(0, i + 1)})["attn_output"]
            for i in range(prompt, total)
        ]
        times, out = _timed(recompute)
        last = np.take(out, [-1], axis=axis)
        rows.append(_row(f"{target} recompute", target, batch, times, last, reference))
    if torch_eager:
        rows.append(_torch_row(spec, weights, take, prompt, total, axis, batch, threads, reference))
    return rows


def prefill_rows(
    spec: AttentionSpec,
    weights: AttentionWeights,
    targets: list[str],
    precision: str,
    prompt: int,
    batch: int,
    threads: int,
    rounds: int = 15,
) -> list[dict[str, Any]]:
    """The prompt through each target's KV-cache graph with an empty cache (the prefill), its plain
    causal graph and its plain graph without a mask, timed in turns (each round runs each once, after
    one untimed run): p50 and the median ratio within a round to the graph without a mask."""
    cached_spec = dataclasses.replace(spec, kv_cache=True)
    unmasked = dataclasses.replace(spec, is_causal=False)
    dims = (batch, prompt, spec.embed_dim) if spec.batch_first else (prompt, batch, spec.embed_dim)
    tokens = np.random.default_rng(1).standard_normal(dims).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # sessions take turns
    empty = np.zeros((batch, spec.num_heads, 0, spec.head_dim), np.float32)
    rows = []
    for target in targets:
        runs = {}
        cached = {"query": tokens, "past_key": empty, "past_value": empty}
        for name, s, feeds, max_len in (
            ("no mask", unmasked, {"query": tokens}, None),
            ("causal", spec, {"query": tokens}, None),
            ("KV-cache prefill", cached_spec, cached, None),
            (f"KV-cache prefill, --max-len {prompt}", cached_spec, cached, prompt),
        ):
            model = build_mha(s, weights)
            declare_maxima(model, None, max_len)  # a declared prompt length: ort-cpu's prefill form
            session = OrtSession(compile_model(model, target, precision), options=options)
            runs[name] = lambda session=session, feeds=feeds: session.run(feeds)
        times = _in_turns(runs, rounds)
        base = np.asarray(times["no mask"])
        rows += [
            {
                "backend": f"{target} {name}",
                "target": target,
                "p50_s": float(np.median(t)),
                "vs_no_mask": float(np.median(np.asarray(t) / base)),
            }
            for name, t in times.items()
        ]
    return rows


def _in_turns(runs: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Each run's times over ``rounds`` rounds in which each runs once, after one untimed run."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def prefill_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'prompt through':<52} {'p50 ms':>10} {'vs no mask':>11}"]
    lines += [
        f"{r['backend']:<52} {r['p50_s'] * 1e3:>10.2f} {r['vs_no_mask']:>10.2f}x" for r in rows
    ]
    return "\n".join(lines)


def _torch_row(
    spec: AttentionSpec,
    weights: AttentionWeights,
    take,
    prompt: int,
    total: int,
    axis: int,
    batch: int,
    threads: int,
    reference: np.ndarray,
) -> dict[str, Any]:
    import torch

    from runtime.torch_reference import call_arguments, torch_module

    torch.set_num_threads(threads)
    module = torch_module(spec, weights, dtype=torch.float32)

    def step(i: int) -> np.ndarray:
        args, kwargs = call_arguments(spec, {"query": torch.from_numpy(take(0, i + 1))})
        with torch.no_grad():
            return module(*args, **kwargs)[0].numpy()

    times, out = _timed([lambda i=i: step(i) for i in range(prompt, total)])
    return _row(
        "torch eager recompute", "torch", batch, times, np.take(out, [-1], axis=axis), reference
    )


def _timed(calls: list) -> tuple[list[float], np.ndarray]:
    calls[0]()  # the first step warms up, untimed; the rest follow it in order (the cache grows)
    times, out = [], None
    for call in calls[1:] if len(calls) > 1 else calls:
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return times, out


def _row(
    backend: str,
    target: str,
    batch: int,
    times: list[float],
    last: np.ndarray,
    reference: np.ndarray,
    prefill_s: float | None = None,
) -> dict[str, Any]:
    """``tokens_per_s`` counts one token per sequence of the batch per step."""
    return {
        "backend": backend,
        "target": target,
        "steps_timed": len(times),
        "p50_s": float(np.median(times)),
        "mean_s": float(np.mean(times)),
        "tokens_per_s": batch * len(times) / float(np.sum(times)),
        "prefill_s": prefill_s,
        "last_token_max_abs_diff": float(np.abs(np.asarray(last, np.float64) - reference).max()),
    }


def decode_table(rows: list[dict[str, Any]]) -> str:
    base = {r["target"]: r["p50_s"] for r in rows if r["backend"].endswith("KV cache")}
    first = next(iter(base.values()))
    lines = [
        f"{'backend':<28} {'p50 ms/token':>13} {'tokens/s':>10} {'vs KV cache':>12} {'last-token diff':>16}"
    ]
    for r in rows:
        ratio = r["p50_s"] / base.get(r["target"], first)
        lines.append(
            f"{r['backend']:<28} {r['p50_s'] * 1e3:>13.3f} {r['tokens_per_s']:>10.1f} "
            f"{ratio:>11.1f}x {r['last_token_max_abs_diff']:>16.2e}"
        )
    return "\n".join(lines)
