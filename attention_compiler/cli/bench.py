"""Latency of compiled attention graphs beside what a user would run instead (torch eager
nn.MultiheadAttention, the same block on F.scaled_dot_product_attention, and the graph
torch.onnx.export(dynamo=True) makes), all measured in this run on the same inputs; each row
against the floor this device's own matmul rate and memory bandwidth set."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import onnxruntime as ort

from attention_compiler.artifacts.files import file_records
from attention_compiler.artifacts.output_folders import (
    ArtifactError,
    OutputRefused,
    check_output_file,
    write_file_atomically,
)
from attention_compiler.benchmark.sweep import (
    BASELINES,
    Compiled,
    SweepSettings,
    compile_all,
    device_rates,
    relate_masks,
    sweep,
)
from attention_compiler.benchmark.timing import cpu_name
from attention_compiler.cli.signals import Signals, Stopped, stop_as_exception
from attention_compiler.cli.spec_flags import add_spec_flags, given_spec_flags, spec_from_args
from compiler import PRECISIONS, TARGETS, TargetError
from graphs import AttentionSpec, AttentionWeights, SpecError, WeightsError

MASKS = {  # --masks: the spec's mask options for each kind (bench_inputs draws the masks themselves)
    "none": {},
    "padding": {"key_padding_mask": "bool"},
    "causal": {"is_causal": True},
    "causal+padding": {"is_causal": True, "key_padding_mask": "bool"},
    "float-2d": {"attn_mask": "float"},
}
DEVICE_TARGETS = {
    "cpu": ("portable", "onnx-attention", "ort-cpu"),
    "cuda": ("portable", "onnx-attention", "ort-cuda", "tensorrt"),
}


class BenchError(ValueError):
    """A request bench.py cannot carry out; the message says what and what would do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None, prog: str = "bench.py") -> argparse.Namespace:
    p = _Parser(
        prog=prog, description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "dir",
        nargs="?",
        default=None,
        help="a folder compile.py wrote: bench its model.onnx with its spec, weights, target and precision",
    )
    groups = add_spec_flags(p, embed_dim_help="default 512 (64 with --quick); not with DIR")
    _add_sweep_flags(p.add_argument_group("sweep"))
    _add_measurement_flags(p.add_argument_group("measurement"))
    _add_decode_flags(
        p.add_argument_group(
            "decoding (--decode: a KV-cache graph against recomputing; implies --self-attention "
            "--causal)"
        )
    )
    _add_output_flags(p.add_argument_group("output"))
    args = p.parse_args(argv)
    for flag in ("json", "plot"):  # checked now, not after a benchmark of many minutes
        if getattr(args, flag) is not None:
            try:
                check_output_file(getattr(args, flag), f"--{flag}")
            except OutputRefused as exc:
                p.error(str(exc))
    for problem in (_dir_problem(args, groups), _masks_problem(args), _decode_problem(args)):
        if problem is not None:
            p.error(problem)
    _apply_quick(p, args)
    if (problem := _range_problem(args)) is not None:
        p.error(problem)
    args.targets = args.targets or [{"cpu": "ort-cpu", "cuda": "ort-cuda"}[args.device]]
    return args


def _add_sweep_flags(sweep: argparse._ArgumentGroup) -> None:
    sweep.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=None,
        help="compile the spec for these targets (default: ort-cpu on cpu, ort-cuda on cuda); not with DIR",
    )
    sweep.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=["fp32"], help="not with DIR"
    )
    sweep.add_argument(
        "--form", default=None, help="the targets' graph form where they offer several"
    )
    sweep.add_argument("--batches", nargs="+", type=int, default=[1])
    sweep.add_argument(
        "--masks",
        nargs="+",
        choices=list(MASKS),
        default=None,
        help="one sweep per mask kind on a self-attention (padding: per-row trailing padding; float-2d: "
        "an (L, S) float attn_mask, about 20%% -inf), with each row also against the unmasked one; "
        "not with DIR or the spec's own mask flags",
    )
    sweep.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[128, 512, 2048, 4096],
        help="query length; key and value have the same length",
    )
    sweep.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="torch eager nn.MultiheadAttention, the block on F.scaled_dot_product_attention, "
        "and torch.onnx.export(dynamo=True)'s graph on the same backend",
    )


def _add_measurement_flags(run: argparse._ArgumentGroup) -> None:
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads and torch threads; 0: all cores",
    )
    run.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    run.add_argument("--runs", type=int, default=5, help="at least this many timed runs")
    run.add_argument(
        "--min-seconds", type=float, default=1.0, help="and at least this long timing each row"
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: embed_dim 64, 4 heads, batches 1 2, lengths 32 64, short timing (unless given)",
    )


def _add_decode_flags(decode: argparse._ArgumentGroup) -> None:
    decode.add_argument(
        "--decode",
        action="store_true",
        help="per-token latency of N new tokens after a P-token prompt: the KV-cache graph of each target, "
        "the plain graph recomputing causal attention over the prefix, and torch eager doing the same",
    )
    decode.add_argument("--prompt", type=int, default=2048, help="P, the prompt's length")
    decode.add_argument(
        "--new-tokens", type=int, default=32, help="N, tokens decoded one at a time"
    )


def _add_output_flags(out: argparse._ArgumentGroup) -> None:
    out.add_argument(
        "--json", default=None, help="write every figure, with the machine, to this file"
    )
    out.add_argument(
        "--plot", default=None, help="write a log-log PNG of latency against length per backend"
    )
    out.add_argument("--verbose", action="store_true", help="show the full traceback of an error")


def _dir_problem(args: argparse.Namespace, groups: list[argparse._ArgumentGroup]) -> str | None:
    """DIR fixes what the spec and target flags would set."""
    if args.dir is None:
        return None
    clashing = given_spec_flags(args, groups)
    clashing += [
        f
        for f, v in (
            ("--targets", args.targets),
            ("--precisions", args.precisions != ["fp32"]),
            ("--form", args.form),
        )
        if v
    ]
    if clashing:
        return f"DIR fixes the spec, weights, target and precision; drop {', '.join(clashing)}"
    return None


def _masks_problem(args: argparse.Namespace) -> str | None:
    """--masks sets the masks (on a self-attention) itself."""
    if args.masks is None:
        return None
    own = [
        flag
        for flag, value in (
            ("--key-padding-mask", args.key_padding_mask),
            ("--attn-mask", args.attn_mask),
            ("--causal", args.causal),
            ("--kv-cache", args.kv_cache),
            ("--decode", args.decode),
            ("DIR", args.dir),
        )
        if value
    ]
    if own:
        return f"--masks sets the masks itself; drop {', '.join(own)}"
    args.self_attention = True
    return None


def _decode_problem(args: argparse.Namespace) -> str | None:
    """--decode builds causal self-attention from the spec flags, on the CPU."""
    if not args.decode:
        return None
    if args.dir is not None or args.device != "cpu":
        return "--decode builds its graphs from the spec flags and runs on --device cpu"
    if args.prompt < 1 or args.new_tokens < 2:
        return "--prompt must be at least 1 and --new-tokens at least 2 (the first step warms up)"
    args.self_attention = args.causal = True
    return None


def _apply_quick(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--quick: small sizes and short timing, where not given explicitly; the default spec size."""
    if args.quick:
        for name, value in (
            ("batches", [1, 2]),
            ("lengths", [32, 64]),
            ("min_seconds", 0.05),
            ("warmup", 1),
        ):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if args.embed_dim is None and args.num_heads is None:
        args.embed_dim, args.num_heads = (64, 4) if args.quick else (512, 8)


def _range_problem(args: argparse.Namespace) -> str | None:
    """Sizes, timing and targets within what the sweep can run."""
    for name in ("batches", "lengths"):
        if any(v < 1 for v in getattr(args, name)):
            return f"--{name} must be positive integers, got {getattr(args, name)}"
    if args.runs < 1 or args.warmup < 0 or args.min_seconds < 0:
        return "--runs must be at least 1, --warmup and --min-seconds at least 0"
    targets = args.targets or [{"cpu": "ort-cpu", "cuda": "ort-cuda"}[args.device]]
    wrong = [t for t in targets if t not in DEVICE_TARGETS[args.device]]
    if args.dir is None and wrong:
        return (
            f"target {wrong[0]} does not run on --device {args.device}; "
            f"there: {', '.join(DEVICE_TARGETS[args.device])}"
        )
    return None


# What is benched ---------------------------------------------------------------------------------


def load_dir(folder: str, device: str) -> tuple[AttentionSpec, AttentionWeights, Compiled]:
    """The spec, weights and model of a compile.py folder, the model checked against its manifest."""
    path = Path(folder)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = [name for name in manifest["files"] if name.startswith("model.onnx")]
        found = file_records(path, files)
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(
            f"{folder!r} is not a folder compile.py wrote (no readable manifest.json and model.onnx: {exc})"
        ) from exc
    if "spec" not in manifest:
        raise BenchError(
            f"{folder!r} holds a graph compiled with --onnx; bench.py needs the spec, so compile from spec flags"
        )
    if "block" in manifest["spec"]:
        raise BenchError(
            f"{folder!r} holds a {manifest['spec']['block']} block; bench.py times bare attention (--block mha)"
        )
    for name in files:
        if found[name]["sha256"] != manifest["files"][name]["sha256"]:
            raise BenchError(
                f"{folder}/{name} does not match the sha256 in its manifest.json; recompile it"
            )
    if manifest["target"] not in DEVICE_TARGETS[device]:
        raise BenchError(
            f"{folder!r} is compiled for {manifest['target']}, which does not run on --device {device}"
        )
    spec = AttentionSpec.from_dict(manifest["spec"])
    source = manifest.get("weights", {})
    if source.get("kind") == "random":
        weights = AttentionWeights.random(spec, source["seed"])
    elif source.get("kind") == "file":
        weights = AttentionWeights.from_file(spec, source["path"])
    else:
        raise BenchError(
            f"the weights of {folder!r} came from {source.get('kind', 'an unknown source')}, which bench.py "
            "cannot load again; compile with --weights FILE"
        )
    return (
        spec,
        weights,
        Compiled(
            manifest["target"], manifest["precision"], manifest["form"], str(path / "model.onnx")
        ),
    )


# Output -----------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    masks = any("mask" in r for r in rows)
    head = (["mask"] if masks else []) + [
        "batch",
        "length",
        "backend",
        "prec",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "runs",
        "x eager",
        "x exporter",
        *(["x no mask"] if masks else []),
        "tokens/s",
        "GFLOP/s",
        "floor ms",
        "x floor",
        "mem +MiB",
        "rel err",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        mask = f"| {r['mask']} " if masks else ""
        if "skipped" in r:
            lines.append(
                f"{mask}| {r['batch']} | {r['length']} | {r['backend']} | {r['precision']} | skipped: {r['skipped']} |"
            )
            continue
        floor = f"{r['floor_s'] * 1e3:.3g} ({r['floor_bound'][0]})"
        unmasked = f"{f(r.get('ratio_to_unmasked'), '.2f')} | " if masks else ""
        lines.append(
            f"{mask}| {r['batch']} | {r['length']} | {r['backend']} | {r['precision']} | {r['p50_s'] * 1e3:.3f} | "
            f"{r['p90_s'] * 1e3:.3f} | {r['p99_s'] * 1e3:.3f} | {r['runs']} | {f(r['ratio_to_eager'], '.2f')} | "
            f"{f(r['ratio_to_exporter'], '.2f')} | {unmasked}{r['tokens_per_s']:.4g} | {r['gflops']:.1f} | {floor} | "
            f"{r['x_floor']:.1f} | {r['memory_growth_bytes'] / 2**20:.1f} | {f(r['rel_error_vs_eager_fp32'], '.1e')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "skipped" not in r]
    batches = sorted({r["batch"] for r in timed})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        series = sorted({(r["backend"], r["precision"]) for r in timed if r["batch"] == batch})
        for backend, precision in series:
            points = sorted(
                (r["length"], r["p50_s"] * 1e3)
                for r in timed
                if (r["batch"], r["backend"], r["precision"]) == (batch, backend, precision)
            )
            ax.plot(*zip(*points), marker="o", label=f"{backend} ({precision})")
        floor = sorted(
            {
                (r["length"], r["floor_s"] * 1e3)
                for r in timed
                if r["batch"] == batch and r["precision"] == "fp32"
            }
        )
        if floor:
            ax.plot(*zip(*floor), linestyle="--", color="grey", label="floor (fp32)")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length",
            ylabel="p50 latency (ms)",
            title=f"batch {batch}",
        )
        lengths = sorted({r["length"] for r in timed})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_file_atomically(Path(path), buffer.getvalue())
    plt.close(fig)


def machine(device: str, threads: int) -> dict[str, Any]:
    versions = {}
    for dist in (
        "attention-compiler",
        "onnxruntime",
        "onnxruntime-gpu",
        "torch",
        "onnx",
        "numpy",
        "tensorrt",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "onnxruntime_providers": ort.get_available_providers(),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None, prog: str = "bench.py") -> int:
    """Exit 0 on success; 2 for a bad request, 1 for an output folder refused; one line on stderr,
    led by ``prog``."""
    args = parse_args(argv, prog)
    signals = Signals()
    try:
        with stop_as_exception() as signals:
            return run(args)
    except (Stopped, KeyboardInterrupt):
        print(
            f"{prog}: {'interrupted' if signals.exit_status == 130 else 'stopped by ' + signals.name}",
            file=sys.stderr,
        )
        return signals.exit_status
    except (BenchError, SpecError, WeightsError, TargetError, ArtifactError) as exc:
        if args.verbose:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, ArtifactError) else 2


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda needs a CUDA GPU that torch can see; this machine has none")
    threads = args.threads or os.cpu_count() or 1
    if args.dir is not None:
        spec, weights, model = load_dir(args.dir, args.device)
        compiled = [model]
    else:
        spec = spec_from_args(args)
        weights = (
            AttentionWeights.from_file(spec, args.weights)
            if args.weights
            else AttentionWeights.random(spec, args.seed)
        )
        if args.decode:
            return run_decode(args, spec, weights, threads)
        compiled = (
            compile_all(spec, weights, args.targets, args.precisions, args.form)
            if args.masks is None
            else []
        )
    torch.set_num_threads(threads)
    rates = device_rates(args.device, threads, min(1.0, max(args.min_seconds, 0.2)))
    print(
        f"{args.device}: matmul {rates['matmul_fp32_flops'] / 1e9:.1f} GFLOP/s fp32"
        + (f", {rates['matmul_fp16_flops'] / 1e9:.1f} fp16" if args.device == "cuda" else "")
        + f"; bandwidth {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({threads} threads)"
    )
    rows, compiled = _rows(args, spec, weights, compiled, rates)
    print(table(rows))
    _write(args, spec, weights, compiled, rates, rows, threads)
    return 0


def _rows(
    args: argparse.Namespace,
    spec: AttentionSpec,
    weights: AttentionWeights,
    compiled: list[Compiled],
    rates: dict[str, float],
) -> tuple[list[dict[str, Any]], list[Compiled]]:
    """The sweep's rows, one sweep per --masks kind (each compiled for its mask) where asked."""
    settings = SweepSettings(
        args.device,
        args.threads,
        tuple(args.batches),
        tuple(args.lengths),
        tuple(args.baselines),
        args.warmup,
        args.runs,
        args.min_seconds,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.masks is None:
            return sweep(settings, spec, weights, compiled, rates, Path(tmp)), compiled
        rows = []
        for kind in args.masks:
            print(f"mask: {kind}", file=sys.stderr, flush=True)
            masked = dataclasses.replace(spec, **MASKS[kind])
            compiled = compile_all(masked, weights, args.targets, args.precisions, args.form)
            rows += [
                {"mask": kind, **r}
                for r in sweep(settings, masked, weights, compiled, rates, Path(tmp))
            ]
        relate_masks(rows)
        return rows, compiled


def _write(
    args: argparse.Namespace,
    spec: AttentionSpec,
    weights: AttentionWeights,
    compiled: list[Compiled],
    rates: dict[str, float],
    rows: list[dict[str, Any]],
    threads: int,
) -> None:
    """--json (every figure, with the machine) and --plot."""
    report = {
        "machine": machine(args.device, threads),
        "device": args.device,
        "rates": rates,
        "spec": spec.to_dict(),
        "weights": dict(weights.source),
        "source": args.dir,
        "compiled": [
            {"target": c.target, "precision": c.precision, "form": c.form} for c in compiled
        ],
        "settings": {
            k: getattr(args, k)
            for k in ("batches", "lengths", "masks", "baselines", "warmup", "runs", "min_seconds")
        },
        "rows": rows,
    }
    if args.json:
        write_file_atomically(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    if args.plot:
        title = (
            f"{args.device}, embed_dim {spec.embed_dim}, {spec.num_heads} heads"
            + "".join(f", {k}" for k in ("key_padding_mask", "attn_mask") if getattr(spec, k))
            + (", causal" if spec.is_causal else "")
        )
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")


def run_decode(
    args: argparse.Namespace, spec: AttentionSpec, weights: AttentionWeights, threads: int
) -> int:
    from attention_compiler.benchmark.decode import (
        decode_rows,
        decode_table,
        prefill_rows,
        prefill_table,
    )

    batch = args.batches[0]
    print(
        f"decoding {args.new_tokens} tokens after a {args.prompt}-token prompt, batch {batch}, embed_dim "
        f"{spec.embed_dim}, {spec.num_heads} heads, {args.precisions[0]}, {threads} threads; the first step warms up"
    )
    rows = decode_rows(
        spec,
        weights,
        args.targets,
        args.precisions[0],
        args.prompt,
        args.new_tokens,
        batch,
        threads,
        torch_eager="eager" in args.baselines,
    )
    print(decode_table(rows))
    prefill = prefill_rows(
        spec, weights, args.targets, args.precisions[0], args.prompt, batch, threads
    )
    print(prefill_table(prefill))
    if args.json:
        report = {
            "machine": machine("cpu", threads),
            "spec": spec.to_dict(),
            "weights": dict(weights.source),
            "settings": {
                "prompt": args.prompt,
                "new_tokens": args.new_tokens,
                "batch": batch,
                "precision": args.precisions[0],
            },
            "rows": rows,
            "prefill": prefill,
        }
        write_file_atomically(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def command() -> NoReturn:
    """The installed ``attention-bench``."""
    sys.exit(main(prog="attention-bench"))
