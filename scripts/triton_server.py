#!/usr/bin/env python
"""Start Triton Inference Server with the python backend on a machine without Triton's image:
the tritonserver binary PyTriton ships (pip install nvidia-pytriton), over a model repository
compile.py wrote with --triton-backend python.

PyTriton's wheel holds the server, the python backend and a stub per Python version, but no
onnxruntime backend; the stub runs model.py in this Python, which has this project and ONNX
Runtime. A tritonserver on PATH (Triton's own image) is used as it is instead.

Every request's inputs are bounded (--http-max-input-size, 64 MiB by default): a server that has
that flag (Triton 2.59 and later) gets it; an older one (PyTriton's 2.51) serves HTTP behind
scripts/triton_guard.py, which refuses what would pass the limit before the server sees it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triton_guard import DEFAULT_LIMIT, GuardServer


class NoServer(RuntimeError):
    """Neither a tritonserver on PATH nor PyTriton's bundled one is here."""


def server_command(
    repository: str | os.PathLike[str],
    ports: tuple[int, int, int],
    workdir: str | os.PathLike[str],
    *extra: str,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that serve ``repository`` on loopback at ``ports``
    (HTTP, gRPC, metrics); ``workdir`` receives the python backend's folder for PyTriton's
    binary."""
    http, grpc, metrics = ports
    flags = [
        f"--model-repository={os.fspath(repository)}",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        *extra,
    ]
    env = dict(os.environ)
    on_path = shutil.which("tritonserver")
    if on_path is not None:
        return [on_path, *flags], env
    try:
        import pytriton
    except ImportError:
        raise NoServer(
            "no tritonserver on PATH and no PyTriton (pip install nvidia-pytriton, which ships one)"
        ) from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise NoServer(f"PyTriton ships no python backend stub for Python {version}")
    backend = Path(workdir) / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in (stub, *(dist / "backends" / "python").glob("*.*")):
        if not (backend / source.name).exists():
            shutil.copy(source, backend / source.name)
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [env.get("LD_LIBRARY_PATH"), str(libs)]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command = [str(dist / "bin" / "tritonserver"), *flags, f"--backend-directory={backend.parent}"]
    return command, env


def bounds_inputs_itself(command: list[str], env: dict[str, str]) -> bool:
    """Whether this tritonserver has --http-max-input-size (Triton 2.59 and later)."""
    try:
        shown = subprocess.run(
            [command[0], "--help"], env=env, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--http-max-input-size" in shown.stdout + shown.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A started tritonserver, and the guard in front of its HTTP port where it needs one."""

    process: subprocess.Popen
    guard: GuardServer | None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.guard is not None:
            self.guard.stop()


def start(
    repository: str | os.PathLike[str],
    ports: tuple[int, int, int],
    workdir: str | os.PathLike[str],
    *extra: str,
    limit: int = DEFAULT_LIMIT,
    guard: bool = True,
    **popen: Any,
) -> Served:
    """The server over ``repository`` on loopback, every HTTP request's inputs bounded by ``limit``
    bytes: by the server itself where it can, else by a guard on the HTTP port (``guard=False``:
    unbounded on such a server)."""
    command, env = server_command(repository, ports, workdir, *extra)
    front = None
    if bounds_inputs_itself(command, env):
        command.append(f"--http-max-input-size={limit}")
    elif guard:
        inner = free_port()
        command = [f"--http-port={inner}" if c == f"--http-port={ports[0]}" else c for c in command]
        front = GuardServer(("127.0.0.1", ports[0]), ("127.0.0.1", inner), limit)
        front.start()
    return Served(subprocess.Popen(command, env=env, **popen), front)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-repository", required=True, help="a folder of --triton-repo models")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--workdir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "attention-compiler", "triton"),
        help="where the python backend's folder is set up for PyTriton's binary",
    )
    p.add_argument(
        "--http-max-input-size",
        type=_size,
        default=DEFAULT_LIMIT,
        metavar="SIZE",
        help="bytes one HTTP request's inputs may declare (64MiB, as Triton's own default)",
    )
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="on a server without --http-max-input-size, serve HTTP directly: faster on few cores "
        "(docs/BENCHMARKS.md), but one request declaring an enormous shape ends the server",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ports = (args.http_port, args.grpc_port, args.metrics_port)
    try:
        served = start(
            args.model_repository,
            ports,
            args.workdir,
            limit=args.http_max_input_size,
            guard=not args.no_guard,
        )
    except (NoServer, OSError) as exc:
        print(f"triton_server.py: error: {exc}", file=sys.stderr)
        return 1
    if served.guard is not None:
        print(
            f"triton_server.py: this tritonserver has no --http-max-input-size; HTTP on port "
            f"{args.http_port} goes through triton_guard (the server's own HTTP: port "
            f"{served.guard.upstream[1]}), which refuses requests declaring more than "
            f"{args.http_max_input_size} bytes",
            file=sys.stderr,
            flush=True,
        )

    def stop(
        signum: int, frame: object
    ) -> None:  # the server ends with this script, never after it
        served.process.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    status = served.process.wait()
    if served.guard is not None:
        served.guard.stop()
    return status


def _size(text: str) -> int:
    from attention_compiler.artifacts.resources import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
