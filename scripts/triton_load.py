#!/usr/bin/env python
"""Load test of a model Triton serves on this machine: N concurrent clients each send M requests of
mixed batch and length (or send for a fixed time), and every response is checked against ONNX
Runtime running the same model.onnx here. Reports throughput, p50/p99 latency, how many requests
the dynamic batcher merged into shared executions (the server's statistics, before and after),
and how many responses were lost or wrong. With --hostile, clients also send hostile requests
(scripts/triton_hostile.py) between the valid ones: each must be refused, every valid one still
answered exactly, and the server up at the end.

    python scripts/triton_load.py --url 127.0.0.1:8000 --model mha --onnx /tmp/mha/model.onnx \\
        --clients 8 --requests 200 [--hostile 0.5]
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
    """What the clients saw: a latency per answered request, every failure by kind, and per kind of
    hostile request how many were sent, refused and (wrongly) answered."""

    latencies: list[float] = field(default_factory=list)
    rows: int = 0
    wrong: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    hostile: dict[str, dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hostile_sent(self, kind: str, status: int | None) -> None:
        outcome = "dropped" if status is None else "answered" if status < 400 else "refused"
        with self.lock:
            counts = self.hostile.setdefault(kind, {"sent": 0, "refused": 0, "answered": 0})
            counts["sent"] += 1
            if outcome != "dropped":
                counts[outcome] += 1


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


def client_loop(
    url: str,
    model: str,
    work: list[tuple],
    deadline: float,
    tally: Tally,
    tol: float,
    hostile: tuple[Any, float, int] | None = None,
):
    """Send ``work`` in turn, checking each answer; with ``hostile`` (a triton_hostile.Hostile, the
    share of valid requests a hostile one goes before, a seed), hostile requests in between."""
    import tritonclient.http as http
    from triton_hostile import triton_type

    client = http.InferenceServerClient(url, network_timeout=60)
    rng = np.random.default_rng(hostile[2] if hostile else 0)
    for turn, (feeds, expected) in enumerate(work):
        if time.monotonic() > deadline:
            break
        if hostile is not None and rng.random() < hostile[1]:
            kinds = hostile[0].kinds()
            kind = kinds[(turn + hostile[2]) % len(kinds)]
            tally.hostile_sent(kind, _sent_anyway(hostile[0], kind, feeds))
        inputs = []
        for name, value in feeds.items():
            inputs.append(http.InferInput(name, list(value.shape), triton_type(value.dtype)))
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


def _sent_anyway(hostile: Any, kind: str, feeds: dict[str, np.ndarray]) -> int | None:
    """The status a hostile request got; 599 where the server did not answer at all."""
    import http.client

    try:
        return hostile.send(kind, feeds)
    except (OSError, http.client.HTTPException):
        return None if kind == "dropped_connection" else 599


def server_up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


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
    hostile = _hostile(args, session)
    threads = [
        threading.Thread(
            target=client_loop,
            args=(args.url, args.model, w, deadline, tally, args.tolerance),
            kwargs={"hostile": None if hostile is None else (hostile, args.hostile, seed)},
        )
        for seed, w in enumerate(work)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = statistics(args.url, args.model)
    return summary(args, tally, wall, before, after)


def _hostile(args: argparse.Namespace, session: Any) -> Any:
    if not args.hostile:
        return None
    import tritonclient.http as http
    from triton_hostile import Hostile

    config = http.InferenceServerClient(args.url).get_model_config(args.model)
    return Hostile(args.url, args.model, config, {s.name: s.shape for s in session.inputs})


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
        "hostile": tally.hostile,
        "hostile_answered": sum(c["answered"] for c in tally.hostile.values()),
        "server_up": server_up(args.url),
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
    p.add_argument(
        "--hostile",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="before this share of the valid requests, send a hostile one (wrong dtype or shape, "
        "oversize batch, an enormous or negative declared shape, a garbage body, a dropped "
        "connection); each must be refused, and the server up at the end",
    )
    p.add_argument("--json", default=None, help="also write the summary to this file")
    args = p.parse_args(argv)
    if args.url.rsplit(":", 1)[0] not in LOOPBACK:
        p.error(f"--url {args.url} is not on loopback; this load test talks to this machine only")
    if not Path(args.onnx).is_file():
        p.error(f"--onnx {args.onnx} is not a file")
    if args.json is not None:  # checked now, not after the load
        from attention_compiler.artifacts.output_folders import OutputRefused, check_output_file

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
        from attention_compiler.artifacts.output_folders import write_file_atomically

        write_file_atomically(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
    ok = result["lost"] == result["wrong"] == result["hostile_answered"] == 0
    return 0 if ok and result["server_up"] else 1


if __name__ == "__main__":
    sys.exit(main())
