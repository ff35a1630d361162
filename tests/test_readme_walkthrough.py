"""The README's walk-through, run exactly as written: its bash blocks, in order, from a folder
laid out like the repository root."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, parse_triton_config
from safetensors.torch import load_file

from runtime.ort import OrtSession


def walkthrough_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = re.search(
        r"<!-- walkthrough:begin -->(.*?)<!-- walkthrough:end -->", readme, flags=re.S
    ).group(1)
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_walkthrough_commands_work_as_written(tmp_path):
    commands = walkthrough_commands()
    assert len(commands) == 3 and "python scripts/compile.py" in commands[-1]
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    out, repo = (
        tmp_path / "walkthrough" / "encoder",
        tmp_path / "walkthrough" / "models" / "encoder",
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.html"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] and manifest["check"]["worst_rel_error"] <= 1e-5
    assert manifest["latency"]["after"]["p50_s"] > 0 and "PASS" in (out / "report.html").read_text()
    ops = manifest["graph"]["after"]["ops"]
    assert (
        ops["com.microsoft.MultiHeadAttention"] == 1
        and ops["com.microsoft.SkipLayerNormalization"] == 2
    )
    assert ops["com.microsoft.Gelu"] == 1
    config = parse_triton_config((repo / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert [i.name for i in config.input] == ["src", "src_key_padding_mask"] and [
        o.name for o in config.output
    ] == ["output"]
    assert (repo / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    # the artifact computes what the trained layer computes (the layer rebuilt from the saved state_dict)
    layer = torch.nn.TransformerEncoderLayer(
        256, 4, dim_feedforward=1024, activation="gelu", batch_first=True
    )
    layer.load_state_dict(load_file(str(tmp_path / "walkthrough" / "encoder.safetensors")))
    layer = layer.double().eval()
    rng = np.random.default_rng(0)
    src = rng.standard_normal((3, 20, 256)).astype(np.float32)
    pad = np.zeros((3, 20), dtype=bool)
    pad[1, 15:] = pad[2, 7:] = True
    got = OrtSession(onnx.load(out / "model.onnx")).run({"src": src, "src_key_padding_mask": pad})[
        "output"
    ]
    with torch.no_grad():
        want = layer(
            torch.from_numpy(src).double(), src_key_padding_mask=torch.from_numpy(pad)
        ).numpy()
    # torch's fast path may leave padded rows as zeros; the contract covers the unpadded ones
    keep = ~pad
    np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=1e-5 * np.abs(want[keep]).max())


def test_from_python_runs_as_written(tmp_path):
    """The README's "From Python" block, run as written (its output folder moved under tmp_path)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### From Python\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "import attention_compiler as ac" in code and "ac.compile(" in code
    out = tmp_path / "mha-py"
    exec(compile(code.replace("/tmp/mha-py", str(out)), "README.md", "exec"), {})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] and manifest["target"] == "ort-cpu"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.html"]


def test_the_serving_commands_run_as_written(tmp_path):
    """The README's PyTriton serving block in bash, its folder and ports moved to free ones; the
    server is stopped by the block itself, or by the test whatever happens."""
    import signal
    import socket

    pytest.importorskip("tritonclient.http", reason="needs tritonclient (pip install -e '.[test]')")
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (pip install -e '.[test]')")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- serving:begin -->\n```bash\n(.*?)```", readme, flags=re.S).group(1)
    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    for default, port in zip(("8000", "8001", "8002"), ports):
        block = block.replace(default, port)
    block = block.replace("/tmp/serve", str(tmp_path / "serve"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.Popen(
        ["bash", "-c", block],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = run.communicate(timeout=300)
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert run.returncode == 0, err[-2000:]
    summary, _ = json.JSONDecoder().raw_decode(out[out.index('{\n  "clients"') :])
    assert summary["answered"] == 1600 and summary["lost"] == summary["wrong"] == 0
