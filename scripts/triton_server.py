#!/usr/bin/env python
"""Start Triton Inference Server with the python backend on a machine without Triton's image:
the tritonserver binary PyTriton ships (pip install nvidia-pytriton), over a model repository
compile.py wrote with --triton-backend python.

PyTriton's wheel holds the server, the python backend and a stub per Python version, but no
onnxruntime backend; the stub runs model.py in this Python, which has this project and ONNX
Runtime. A tritonserver on PATH (Triton's own image) is used as it is instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    ports = (args.http_port, args.grpc_port, args.metrics_port)
    try:
        command, env = server_command(args.model_repository, ports, args.workdir)
    except NoServer as exc:
        print(f"triton_server.py: error: {exc}", file=sys.stderr)
        return 1
    server = subprocess.Popen(command, env=env)

    def stop(
        signum: int, frame: object
    ) -> None:  # the server ends with this script, never after it
        server.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    return server.wait()


if __name__ == "__main__":
    sys.exit(main())
