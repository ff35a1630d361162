"""compile.py's outputs beyond the model: report.html, latency, --json, --quiet, progress, external data,
and the whole-or-nothing folder when a step fails half-way."""

import hashlib
import io
import json
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import run_fresh

from attention_compiler.artifacts import files
from attention_compiler.cli import compile as compile_script  # noqa: E402  (in this process, so it can be patched)
from attention_compiler.cli.console import Console  # noqa: E402
from graphs.blocks import BlockSpec, BlockWeights
from runtime.block_reference import torch_block, torch_block_forward
from runtime.check import block_inputs
from runtime.ort import OrtSession

ENCODER = [
    "--block",
    "encoder",
    "--embed-dim",
    32,
    "--num-heads",
    4,
    "--dim-feedforward",
    64,
    "--batch-first",
    "--key-padding-mask",
    "bool",
    "--activation",
    "gelu",
    "--target",
    "ort-cpu",
]


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def test_report_holds_the_figures_of_the_manifest(run_cli, tmp_path):
    out = tmp_path / "enc"
    result = run_cli(
        "compile.py",
        *ENCODER,
        *"--check --latency --latency-shape 2,16,16 --report --out".split(),
        out,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    page = (out / "report.html").read_text()
    assert manifest["files"]["report.html"]["sha256"] == hashlib.sha256(page.encode()).hexdigest()
    # graph before/after: the counts are the real graph's, and the fused ops appear in the table and the drawing
    after = onnx.load(out / "model.onnx")
    assert manifest["graph"]["after"]["ops"] == dict(_ops(after)) and manifest["graph"]["after"][
        "nodes"
    ] == len(after.graph.node)
    assert (
        manifest["graph"]["before"]["ops"]["Softmax"] == 1
        and "Softmax" not in manifest["graph"]["after"]["ops"]
    )
    for op, n in manifest["graph"]["after"]["ops"].items():
        assert re.search(
            rf"<td>{re.escape(op)}</td><td class=n>{manifest['graph']['before']['ops'].get(op, 0)}</td>"
            rf"<td class=n>{n}</td>",
            page,
        ), op
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 2
    drawn = [
        [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
        for svg in svgs
    ]
    # the padded encoder's core: an If of the padding forms (compiler/lowerings/), Attention on the layer's
    # input for short inputs, MultiHeadAttention per batch entry for long ones
    assert (
        "Softmax" in drawn[0]
        and "If: ms.Attention, ms.MultiHeadAttention" in drawn[1]
        and "Sum" in drawn[1]
    )
    # the check table and the latency figures, as the manifest has them
    assert "PASS" in page and f"{manifest['check']['worst_rel_error']:.3e}" in page
    for c in manifest["check"]["comparisons"]:
        assert f"{c['max_rel_error']:.3e}" in page
    latency = manifest["latency"]
    assert (
        latency["inputs"] == {"src": [2, 16, 32], "src_key_padding_mask": [2, 16]}
        and latency["before"]["runs"] >= 10
        and latency["after"]["runs"] >= 10
    )
    assert latency["ratio_p50"] == pytest.approx(
        latency["after"]["p50_s"] / latency["before"]["p50_s"]
    )
    assert (
        "src 2x16x32, src_key_padding_mask 2x16" in page
        and f"{latency['after']['p50_s'] * 1e3:.3f}" in page
        and f"{latency['ratio_p50']:.2f}x" in page
    )
    # readable offline: nothing fetched, nothing run
    assert not re.search(r"<script|<link|src=|url\((?!#)", page)
    assert f"wrote {out / 'report.html'}" in result.stdout


def test_report_without_check_or_latency_says_how_to_get_them(run_cli, tmp_path):
    out = tmp_path / "mha"
    result = run_cli("compile.py", *"--embed-dim 16 --num-heads 2 --report --out".split(), out)
    assert result.returncode == 0, result.stderr
    page = (out / "report.html").read_text()
    assert (
        "Not run: compile with <code>--check</code>" in page
        and "Not measured: compile with <code>--latency</code>" in page
    )
    assert json.loads((out / "manifest.json").read_text())["latency"] is None


def test_json_summary_is_the_only_thing_on_stdout(tmp_path):
    """In a fresh interpreter: nothing else the process prints (warnings, progress) reaches stdout."""
    out = tmp_path / "enc"
    result = run_fresh("compile.py", *ENCODER, "--check", "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["out"] == str(out) and summary["report"] is None
    assert summary["manifest"] == json.loads((out / "manifest.json").read_text())
    assert (
        "PASS: worst relative error" in result.stderr
        and f"wrote {out / 'model.onnx'}" in result.stderr
    )


def test_json_reports_an_error_with_its_exit_status(run_cli, tmp_path):
    result = run_cli(
        "compile.py", *"--embed-dim 10 --num-heads 4 --json --out".split(), tmp_path / "x"
    )
    assert result.returncode == 2
    assert json.loads(result.stdout) == {
        "ok": False,
        "exit_status": 2,
        "error": "embed_dim (10) must be divisible by num_heads (4)",
    }
    assert not (tmp_path / "x").exists()


def test_quiet_prints_nothing_and_still_writes(run_cli, tmp_path):
    result = run_cli("compile.py", *ENCODER, "--check", "--quiet", "--out", tmp_path / "enc")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert json.loads((tmp_path / "enc" / "manifest.json").read_text())["check"]["passed"]


def test_bad_latency_shape_is_one_line(run_cli, tmp_path):
    result = run_cli(
        "compile.py",
        *"--embed-dim 16 --num-heads 2 --latency-shape 1,0 --out".split(),
        tmp_path / "x",
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert (
        "expected three positive integers BATCH,TGT,SRC such as 1,128,128 (or AXIS=SIZE,... for --onnx), got '1,0'"
        in result.stderr
    )


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty", [False, True])
def test_progress_names_slow_steps_only(tty):
    stream = _Stream(tty)
    console = Console(delay=0.05, tick=0.02, stderr=stream)
    with console.step("quick"):
        pass
    with console.step("slow step"):
        time.sleep(0.2)
    with pytest.raises(RuntimeError), console.step("broken step"):
        time.sleep(0.2)
        raise RuntimeError
    text = stream.getvalue()
    assert "quick" not in text
    assert re.search(r"slow step: done in 0\.[2-9] s", text) and re.search(
        r"broken step: failed in 0\.[2-9] s", text
    )
    assert ("\rslow step... 0 s" in text) == tty and ("slow step...\n" in text) == (not tty)


def test_quiet_console_says_nothing():
    stream = _Stream(False)
    console = Console(quiet=True, delay=0.0, stdout=stream, stderr=stream)
    console.say("hello")
    with console.step("slow"):
        time.sleep(0.05)
    assert stream.getvalue() == ""


def test_external_data_always_writes_checked_data_beside_the_model(run_cli, tmp_path):
    out, repo = tmp_path / "enc", tmp_path / "models"
    result = run_cli(
        "compile.py",
        *ENCODER,
        *"--external-data always --check --out".split(),
        out,
        "--triton-repo",
        repo,
        "--triton-model-name",
        "enc",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("model.onnx", "model.onnx.data"):
        data = (out / name).read_bytes()
        assert manifest["files"][name] == {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        assert (repo / "enc" / "1" / name).read_bytes() == data
    structure = onnx.load(out / "model.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in structure.graph.initializer)
    assert (out / "model.onnx").stat().st_size < 20_000  # the weights left the protobuf
    # the folder is self-contained: ONNX Runtime loads it and computes what torch's layer computes
    spec = BlockSpec(
        "encoder",
        32,
        4,
        dim_feedforward=64,
        batch_first=True,
        key_padding_mask="bool",
        activation="gelu",
    )
    feeds = block_inputs(spec, (2, 9, 9), np.random.default_rng(1))
    want = torch_block_forward(
        spec, torch_block(spec, BlockWeights.random(spec, 0), dtype=torch.float64), feeds
    )["output"]
    got = OrtSession(out / "model.onnx").run(feeds)["output"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_weights_past_the_protobuf_limit_go_to_external_data(tmp_path, monkeypatch, capsys):
    # The real limit needs 2 GB of weights (a 72 s, 12 GB run by hand, E=12288); a lower limit runs the same path.
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 2**20)
    monkeypatch.setattr(files, "GRAPH_HEADROOM", 0)
    small, large = tmp_path / "small", tmp_path / "large"
    assert compile_script.main(["--embed-dim", "8", "--num-heads", "2", "--out", str(small)]) == 0
    assert (
        compile_script.main(
            [*"--embed-dim 512 --num-heads 8 --self-attention --check --out".split(), str(large)]
        )
        == 0
    )
    assert sorted(p.name for p in small.iterdir()) == ["manifest.json", "model.onnx"]
    assert sorted(p.name for p in large.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
    ]
    assert "weights in model.onnx.data" in capsys.readouterr().out


def test_a_failed_check_half_way_leaves_no_folder_and_keeps_the_old_one(
    tmp_path, monkeypatch, capsys
):
    from attention_compiler import artifacts

    out = tmp_path / "mha"
    assert compile_script.main(["--embed-dim", "16", "--num-heads", "2", "--out", str(out)]) == 0
    before = (out / "model.onnx").read_bytes()
    monkeypatch.setattr(
        artifacts.pipeline, "FP32_TOLERANCE", 0.0
    )  # any rounding now fails the check
    fresh = tmp_path / "fresh"
    assert (
        compile_script.main(
            [*"--embed-dim 16 --num-heads 2 --seed 1 --check --out".split(), str(fresh)]
        )
        == 1
    )
    assert (
        compile_script.main(
            [
                *"--embed-dim 16 --num-heads 2 --seed 1 --check --out".split(),
                str(out),
                "--force",
                "--report",
            ]
        )
        == 1
    )
    assert "check failed: worst relative error" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mha"]  # no fresh, no staging folder
    assert (out / "model.onnx").read_bytes() == before and sorted(
        p.name for p in out.iterdir()
    ) == ["manifest.json", "model.onnx"]


def test_onnx_axis_sizes_from_batch_tgt_src_or_names():
    from graphs.spec import SpecError
    from runtime.graph_inputs import onnx_axis_sizes
    from runtime.signature import InputSpec

    inputs = [
        InputSpec("src", np.dtype(np.float32), ("s28", "s25", 512)),
        InputSpec("mask", np.dtype(np.bool_), ("s28", "s25")),
    ]
    assert onnx_axis_sizes(inputs, (2, 64, 9)) == {"s28": 2, "s25": 64}
    seq_first = [InputSpec("query", np.dtype(np.float32), ("tgt_len", "batch", 8))]
    assert onnx_axis_sizes(seq_first, (2, 64, 9)) == {"batch": 2, "tgt_len": 64}
    assert onnx_axis_sizes(seq_first, {"batch": 3, "tgt_len": 5}) == {
        "batch": 3,
        "tgt_len": 5,
    }
    with pytest.raises(SpecError, match="the graph's symbolic axes are tgt_len, batch"):
        onnx_axis_sizes(seq_first, {"batch": 3})
