#!/usr/bin/env python
"""Load test of a model Triton serves on this machine: N concurrent clients each send M requests of
mixed batch and length (or send for a fixed time), and every response is checked against ONNX
Runtime running the same model.onnx here. Reports throughput, p50/p99 latency, how many requests
the dynamic batcher merged into shared executions (the server's statistics, before and after),
and how many responses were lost or wrong.

    python scripts/triton_load.py --url 127.0.0.1:8000 --model mha --onnx /tmp/mha/model.onnx \\
        --clients 8 --requests 200
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


@dataclass
class Tally:
    """What the clients saw: a latency per answered request, and every failure by kind."""

    latencies: list[float] = field(default_factory=list)
    rows: int = 0
    wrong: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def requests_for(session: Any, count: int, seed: int, batches, lengths) -> list[tuple]:
    """``count`` requests of random batch and length, each with the outputs ONNX Runtime gives
    here (computed before the load starts, so the check takes no time from it)."""
    from runtime.graph_inputs import graph_inputs

    rng = np.random.default_rng(seed)
    axes = sorted(
        {d for s in session.inputs for d in s.shape if isinstance(d, str) and d.isidentifier()}
    )
    made = []
    for _ in range(count):
        batch, length = int(rng.choice(batches)), int(rng.choice(lengths))
        sizes = {a: batch if "batch" in a else length for a in axes}
        sizes = {a: (0 if a == "past_len" else size) for a, size in sizes.items()}
        feeds = graph_inputs(session.inputs, sizes, rng)
        made.append((feeds, session.run(feeds)))
    return made


def client_loop(url: str, model: str, work: list[tuple], deadline: float, tally: Tally, tol: float):
    import tritonclient.http as http

    client = http.InferenceServerClient(url, network_timeout=60)
    for feeds, expected in work:
        if time.monotonic() > deadline:
            break
        inputs = []
        for name, value in feeds.items():
            kind = "BOOL" if value.dtype == np.bool_ else "FP32"
            inputs.append(http.InferInput(name, list(value.shape), kind))
            inputs[-1].set_data_from_numpy(value)
        start = time.perf_counter()
        try:
            result = client.infer(model, inputs)
        except Exception as exc:  # noqa: BLE001 -- every failure is counted, none ends the run
            with tally.lock:
                tally.lost.append(str(exc).splitlines()[0][:200])
            continue
        elapsed = time.perf_counter() - start
        worst = max(
            float(np.abs(result.as_numpy(n) - want).max() / max(np.abs(want).max(), 1e-30))
            for n, want in expected.items()
        )
        with tally.lock:
            tally.latencies.append(elapsed)
            tally.rows += next(iter(feeds.values())).shape[0]
            if not worst <= tol:
                tally.wrong.append(f"relative error {worst:.2e}")


def statistics(url: str, model: str) -> dict[str, int]:
    import tritonclient.http as http

    stats = http.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    # success.count: requests answered; execution_count: model runs (a merged batch is one run);
    # inference_count would count every batch row
    requests = int(stats["inference_stats"]["success"]["count"])
    return {"requests": requests, "executions": int(stats["execution_count"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from runtime.ort import OrtSession

    session = OrtSession(args.onnx)
    work = [
        requests_for(session, args.requests, seed, args.batches, args.lengths)
        for seed in range(args.clients)
    ]
    before = statistics(args.url, args.model)
    tally = Tally()
    deadline = time.monotonic() + (args.seconds if args.seconds else float("inf"))
    threads = [
        threading.Thread(
            target=client_loop, args=(args.url, args.model, w, deadline, tally, args.tolerance)
        )
        for w in work
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = statistics(args.url, args.model)
    return summary(args, tally, wall, before, after)


def summary(args, tally: Tally, wall: float, before: dict, after: dict) -> dict[str, Any]:
    requests = after["requests"] - before["requests"]
    executions = after["executions"] - before["executions"]
    answered = len(tally.latencies)
    return {
        "clients": args.clients,
        "requests_sent": answered + len(tally.lost),
        "answered": answered,
        "lost": len(tally.lost),
        "wrong": len(tally.wrong),
        "failures": (tally.lost + tally.wrong)[:5],
        "seconds": wall,
        "requests_per_s": answered / wall,
        "rows_per_s": tally.rows / wall,
        "p50_ms": float(np.percentile(tally.latencies, 50) * 1e3) if answered else None,
        "p99_ms": float(np.percentile(tally.latencies, 99) * 1e3) if answered else None,
        "server_requests": requests,
        "server_executions": executions,
        "merged_requests": requests - executions,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address, on loopback")
    p.add_argument("--model", required=True, help="the model's name in the repository")
    p.add_argument(
        "--onnx", required=True, help="the model.onnx it serves, to check every response"
    )
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="per client")
    p.add_argument("--seconds", type=float, default=None, help="stop sending after this long")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest relative error accepted")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    args = p.parse_args(argv)
    if args.url.rsplit(":", 1)[0] not in LOOPBACK:
        p.error(f"--url {args.url} is not on loopback; this load test talks to this machine only")
    if not Path(args.onnx).is_file():
        p.error(f"--onnx {args.onnx} is not a file")
    if args.json is not None:  # checked now, not after the load
        from artifacts.output_folders import OutputRefused, check_output_file

        try:
            check_output_file(args.json, "--json")
        except OutputRefused as exc:
            p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        statistics(args.url, args.model)
    except Exception as exc:  # noqa: BLE001 -- refused connection, unknown model: one line either way
        print(
            f"triton_load.py: error: no model {args.model!r} answers at {args.url} "
            f"({str(exc).splitlines()[0][:200]}); start the server first (scripts/triton_server.py)",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        from artifacts.output_folders import write_file_atomically

        write_file_atomically(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
    return 0 if result["lost"] == 0 and result["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
