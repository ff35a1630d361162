"""Property-based hostile files (hypothesis): a valid weights file, ONNX model (with external data) or
config, then a drawn mutation of it: truncated, bytes overwritten in its header or anywhere, declared
sizes (the safetensors header length, a zip member's sizes, an external tensor's offset and length)
set to drawn values, junk appended. compile.py either compiles it (the mutation was harmless) or
refuses it: exit 2 and one line, never a traceback or exit 3, in under 3 s and 200 MiB each.

The 'ci' profile runs a fixed set of 33 examples per test; ``HYPOTHESIS_PROFILE=thorough`` draws 166
fresh ones (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")


from attention_compiler.benchmark.memory import PeakRss  # noqa: E402
from attention_compiler.cli import compile as compile_script  # noqa: E402
from graphs import AttentionSpec, expected_shapes  # noqa: E402
from graphs.weights import random_state  # noqa: E402

SPEC = ["--embed-dim", "8", "--num-heads", "2"]
STATE = {
    k: v.astype(np.float32)
    for k, v in random_state(expected_shapes(AttentionSpec(8, 2)), 0).items()
}
# a third of the profile's examples per test (ci: 33, thorough: 166): three tests share the budget of one
EXAMPLES = settings(max_examples=max(20, settings().max_examples // 3))
SIZES = st.sampled_from([0, 1, 7, 8, 255, 4096, 2**31 - 1, 2**32 + 5, 2**40, 2**62, 2**64 - 1])


def _weights_file(folder: Path, suffix: str) -> Path:
    path = folder / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(STATE, str(path))
    elif suffix == ".npz":
        np.savez_compressed(path, **STATE)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in STATE.items()}, path)
    return path


def _onnx_file(folder: Path) -> Path:
    """x @ W + b with W in external data, as an exporter writes a model past 2 GB."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w"
    )
    b = numpy_helper.from_array(np.ones(8, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w, b],
    )
    path = folder / "m.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
        path,
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    return path


@st.composite
def mutations(draw: st.DrawFn, size: int, header: int) -> list[tuple]:
    """A few edits of a file of ``size`` bytes whose first ``header`` bytes declare its layout."""
    kinds = st.sampled_from(["truncate", "header", "anywhere", "append"])
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(kinds)
        if kind == "truncate":
            edits.append(("truncate", draw(st.integers(0, max(size - 1, 0)))))
        elif kind == "append":
            edits.append(("append", draw(st.binary(min_size=1, max_size=64))))
        else:
            end = max(min(header, size) if kind == "header" else size, 1)
            edits.append(
                ("write", draw(st.integers(0, end - 1)), draw(st.binary(min_size=1, max_size=8)))
            )
    return edits


def _apply(path: Path, edits: list[tuple]) -> None:
    data = bytearray(path.read_bytes())
    for edit in edits:
        if edit[0] == "truncate":
            del data[edit[1] :]
        elif edit[0] == "append":
            data += edit[1]
        elif edit[0] == "write":
            data[edit[1] : edit[1] + len(edit[2])] = edit[2]
        elif edit[0] == "u64":  # a declared length: the safetensors header's
            data[edit[1] : edit[1] + 8] = struct.pack("<Q", edit[2])
        elif (
            edit[0] == "zip_sizes"
        ):  # every central-directory entry's compressed and uncompressed sizes
            start = 0
            while (start := data.find(b"PK\x01\x02", start)) >= 0:
                data[start + 20 : start + 28] = struct.pack("<II", edit[1] % 2**32, edit[2] % 2**32)
                start += 4
    path.write_bytes(bytes(data))


def _compiles_or_refuses_in_one_line(argv: list[str], out: Path) -> None:
    started, stderr = time.monotonic(), io.StringIO()
    with PeakRss(settle=False) as peak, contextlib.redirect_stderr(stderr):
        try:
            status = compile_script.main([*argv, "--quiet", "--out", str(out)])
        except SystemExit as exit_:  # argparse's refusal of a config's value
            status = exit_.code
    seconds = time.monotonic() - started
    err = stderr.getvalue()
    assert status in (0, 2), err
    if status == 2:
        assert (
            err.count("\n") == 1
            and err.startswith("compile.py: error: ")
            and "Traceback" not in err
        ), err
    else:
        assert err == "" and (out / "model.onnx").is_file()
    assert seconds < 3 and peak.growth < 200 * 2**20, (seconds, peak.growth)


@EXAMPLES
@given(suffix=st.sampled_from([".safetensors", ".npz", ".pt"]), data=st.data())
def test_mutated_weights_files_compile_or_are_refused_in_one_line(suffix, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = _weights_file(Path(tmp), suffix)
        size = path.stat().st_size
        edits = data.draw(mutations(size, 256 if suffix == ".safetensors" else size))
        if suffix == ".safetensors" and data.draw(st.booleans()):
            edits.append(("u64", 0, data.draw(SIZES)))
        if suffix != ".safetensors" and data.draw(st.booleans()):
            edits.append(("zip_sizes", data.draw(SIZES), data.draw(SIZES)))
        _apply(path, edits)
        _compiles_or_refuses_in_one_line([*SPEC, "--weights", str(path)], Path(tmp) / "out")


@EXAMPLES
@given(data=st.data())
def test_mutated_onnx_files_and_external_data_compile_or_are_refused_in_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = _onnx_file(Path(tmp))
        target = data.draw(st.sampled_from(["model", "data", "declared"]))
        if (
            target == "declared"
        ):  # the offset and length an initializer declares for its external data
            model = onnx.load(path, load_external_data=False)
            entry = data.draw(st.sampled_from(list(model.graph.initializer)))
            for item in entry.external_data:
                if item.key in ("offset", "length") and data.draw(st.booleans()):
                    item.value = str(data.draw(SIZES | st.integers(-(2**63), 2**63)))
            onnx.save(model, path)
        else:
            victim = path if target == "model" else path.with_name("m.onnx.data")
            _apply(victim, data.draw(mutations(victim.stat().st_size, victim.stat().st_size)))
        target_flag = data.draw(st.sampled_from(["portable", "ort-cpu"]))
        _compiles_or_refuses_in_one_line(
            ["--onnx", str(path), "--target", target_flag], Path(tmp) / "out"
        )


CONFIG = {
    "embed_dim": 8,
    "num_heads": 2,
    "self_attention": True,
    "key_padding_mask": "bool",
    "latency_shape": [1, 4, 4],
    "seed": 3,
}


@EXAMPLES
@given(yaml=st.booleans(), data=st.data())
def test_mutated_config_files_compile_or_are_refused_in_one_line(yaml, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("c.yaml" if yaml else "c.json")
        text = (
            "".join(f"{k}: {json.dumps(v)}\n" for k, v in CONFIG.items())
            if yaml
            else json.dumps(CONFIG)
        )
        path.write_text(text)
        _apply(path, data.draw(mutations(len(text), len(text))))
        _compiles_or_refuses_in_one_line(["--config", str(path)], Path(tmp) / "out")


def test_the_mutations_reach_the_readers(tmp_path):
    """The edits land where they are meant to: a declared size rewritten, a zip's sizes rewritten."""
    path = _weights_file(tmp_path, ".safetensors")
    _apply(path, [("u64", 0, 2**40)])
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] == 2**40
    path = _weights_file(tmp_path, ".npz")
    _apply(path, [("zip_sizes", 7, 2**32 + 5)])
    import zipfile

    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
        assert {(i.compress_size, i.file_size) for i in archive.infolist()} == {(7, 5)}


# Names as an --onnx graph may carry them: quotes, newlines, braces, backslashes, dots, non-ASCII
NAME_TEXT = st.text(
    alphabet=st.sampled_from(list('ab_-.é字"\\{}[]:#\n\t /')) | st.characters(codec="utf-8"),
    min_size=1,
    max_size=24,
)
MODEL_NAMES = (
    st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,20}", fullmatch=True)
    | st.sampled_from([".", "..", "../x", "/tmp/x", "a/b", "", "x" * 201])
    | NAME_TEXT
)


def _identity(path: Path, inputs: list[tuple[str, int, list]], outputs: list[str]) -> Path:
    """Identity from each input to its output, at opset 21 (Identity takes every type there)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [i[0]], [o]) for i, o in zip(inputs, outputs)],
        "g",
        [helper.make_tensor_value_info(n, t, dims) for n, t, dims in inputs],
        [helper.make_tensor_value_info(o, t, dims) for (_, t, dims), o in zip(inputs, outputs)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _model_name_ok(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}", name))


@EXAMPLES
@given(
    names=st.lists(NAME_TEXT, min_size=2, max_size=6, unique=True),
    model=MODEL_NAMES,
    backend=st.sampled_from(["onnxruntime", "python"]),
)
def test_drawn_names_through_a_triton_repository(names, model, backend):
    """Tensor names of every kind are written so that config.pbtxt parses to exactly the graph's
    inputs and outputs (they were written raw: a name could inject configuration); a model name
    is one folder name Triton serves or one line of refusal, and nothing lands outside the
    repository (``..`` wrote into its parent)."""
    from conftest import parse_triton_config

    half = len(names) // 2
    inputs = [(n, TensorProto.FLOAT, ["batch", 3]) for n in names[:half]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "w"
        root.mkdir()
        path = _identity(Path(tmp) / "m.onnx", inputs, names[half : 2 * half])
        argv = [
            "--onnx",
            str(path),
            "--triton-repo",
            str(root / "repo"),
            "--triton-model-name",
            model,
        ]
        _compiles_or_refuses_in_one_line([*argv, "--triton-backend", backend], root / "out")
        if not (root / "out").exists():
            assert not _model_name_ok(model) or sorted(root.iterdir()) == []
            return
        assert _model_name_ok(model)
        assert sorted(p.name for p in root.iterdir()) == ["out", "repo"]
        assert [p.name for p in (root / "repo").iterdir()] == [model]
        config = parse_triton_config((root / "repo" / model / "config.pbtxt").read_text())
        assert (config.name, not config.parameters) == (model, True)
        assert [t.name for t in config.input] == names[:half]
        assert [t.name for t in config.output] == names[half : 2 * half]


TYPES = [
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT64,
    TensorProto.STRING, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN,
]  # fmt: skip
DIMS = st.sampled_from([-3, 0, 1, 5, 2**31, 2**40, 2**62]) | st.sampled_from(
    ["batch", "L", "batch*8", "", "é x"]
)


@EXAMPLES
@given(
    declared=st.lists(
        st.tuples(st.sampled_from(TYPES), st.none() | st.lists(DIMS, max_size=3)),
        min_size=1,
        max_size=3,
    ),
    flags=st.sampled_from([["--check"], ["--latency"], ["--triton-repo"], []]),
)
def test_drawn_graph_input_declarations_compile_or_are_refused_in_one_line(declared, flags):
    """Dims of 2^40 (MemoryError), below 0 (ValueError), scalars (TypeError), types Triton or the
    check lacks (KeyError): each compiles, or is refused in one line, in bounded time and memory."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [(f"x{i}", t, dims) for i, (t, dims) in enumerate(declared)]
        path = _identity(Path(tmp) / "m.onnx", inputs, [f"y{i}" for i in range(len(inputs))])
        if flags == ["--triton-repo"]:
            flags = [*flags, str(Path(tmp) / "repo")]
        _compiles_or_refuses_in_one_line(["--onnx", str(path), *flags], Path(tmp) / "out")


OPTION_VALUES = st.sampled_from(
    [None, True, False, 0, -5, 2.5, 2**70, "big", "16GiB", "1e400", "", [1, 2, 3], (1, -1, 4),
     {"batch": 1}, "portable", "ort-cpu", "fp16", object()]
)  # fmt: skip
OPTIONS = st.sampled_from(
    ["target", "precision", "form", "check", "latency", "latency_shape", "max_batch", "max_len",
     "memory_limit", "external_data", "profile_shapes", "engine_cache", "seed", "self_attention",
     "key_padding_mask", "is_causal", "no_such_option"]
)  # fmt: skip


@EXAMPLES
@given(options=st.dictionaries(OPTIONS, OPTION_VALUES, min_size=1, max_size=3))
def test_drawn_library_options_compile_or_raise_this_projects_errors(options):
    """compile() on a live module with drawn options: an Artifact, or one of this project's
    errors in one line; never a raw TypeError, ValueError or AttributeError from inside."""
    from attention_compiler import USER_ERRORS, artifacts

    module = torch.nn.MultiheadAttention(8, 2)
    options = {k: v for k, v in options.items() if not (k == "latency" and v is True)}
    started = time.monotonic()
    try:
        with artifacts.compile(module, **options):
            pass
    except (*USER_ERRORS, artifacts.CheckFailed, artifacts.NoEngine) as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
    assert time.monotonic() - started < 10
