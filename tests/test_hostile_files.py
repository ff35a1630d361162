"""Hostile and broken input files: refused with one line naming the file and what is wrong, in a few
seconds and well under 1 GB, before their contents are read; and the weights that would make a wrong
graph (a dtype a cast would change, values past fp16's range) refused in every format alike
(docs/RELIABILITY.md)."""

import io
import json
import struct
import sys
import time
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402

from conftest import ROOT  # noqa: E402
from graphs import AttentionSpec, AttentionWeights, WeightsError, expected_shapes  # noqa: E402
from graphs.weights import random_state  # noqa: E402
from runtime.memory import PeakRss  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import compile as compile_script  # noqa: E402

SPEC = AttentionSpec(16, 2)
STATE = {k: v.astype(np.float32) for k, v in random_state(expected_shapes(SPEC), 0).items()}
SECONDS, MEMORY = 3.0, 200 * 2**20  # "a few seconds", "well under 1 GB"


class Bounded:
    """Times and measures the resident-memory growth of the block; asserts both stay bounded."""

    def __enter__(self):
        self.start, self.peak = time.monotonic(), PeakRss().__enter__()
        return self

    def __exit__(self, *exc):
        self.peak.__exit__(*exc)
        seconds = time.monotonic() - self.start
        assert seconds < SECONDS and self.peak.growth < MEMORY, (seconds, self.peak.growth)


def refused(path, message, spec=SPEC):
    with Bounded(), pytest.raises(WeightsError) as info:
        AttentionWeights.from_file(spec, path)
    assert message in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 600, str(info.value)


# npz ------------------------------------------------------------------------------------------

def _npy_header(shape, descr="<f4"):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def _npz_with_a_huge_member(path, others):
    """in_proj_weight declares 2**26 float32 (256 MiB of zeros, past the memory bound), deflated to 1 MB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("in_proj_weight.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((2**26,)))
            zeros = bytes(2**22)
            for _ in range(2**26 * 4 // len(zeros)):
                f.write(zeros)
        for key, value in others.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())


def test_an_npz_declaring_gigabytes_is_refused_before_decompressing(tmp_path):
    alone = tmp_path / "alone.npz"
    _npz_with_a_huge_member(alone, {})
    refused(alone, "weights are missing keys 'in_proj_bias', 'out_proj.weight', 'out_proj.bias'")
    whole = tmp_path / "whole.npz"
    _npz_with_a_huge_member(whole, {k: v for k, v in STATE.items() if k != "in_proj_weight"})
    refused(whole, "member 'in_proj_weight' declares 268435584 bytes, more than a (48, 16) tensor needs")


def test_an_npz_member_whose_zip_size_disagrees_with_its_header_is_refused(tmp_path):
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in STATE.items():
            data = _npy_header(value.shape) + value.tobytes()
            archive.writestr(f"{key}.npy", data + (bytes(4096) if key == "out_proj.bias" else b""))
    refused(path, "member 'out_proj.bias' declares")


# safetensors ----------------------------------------------------------------------------------

def _safetensors(path, header, data_size, sparse=False):
    body = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        if sparse:
            f.truncate(8 + len(body) + data_size)  # a hole: no disk, no memory, until someone reads it
        else:
            f.write(bytes(data_size))


def _header(state, extra=None):
    header, offset = {}, 0
    for key, value in {**state, **(extra or {})}.items():
        shape = list(value) if isinstance(value, tuple) else list(value.shape)
        size = int(np.prod(shape)) * 4
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def test_a_sparse_safetensors_declaring_an_extra_6_gb_tensor_is_refused_from_its_header(tmp_path):
    path = tmp_path / "w.safetensors"
    header, size = _header(STATE, {"extra": (3 * 2**29,)})
    _safetensors(path, header, size, sparse=True)
    assert path.stat().st_size > 6 * 2**30
    refused(path, "weights hold unexpected key 'extra'")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda h, n: (h, n - 4), "declares bytes"),  # the last tensor runs past the end of the file
    (lambda h, n: ({**h, "out_proj.bias": {**h["out_proj.bias"], "shape": [17]}}, n), "has shape (17,), expected (16,)"),
    (lambda h, n: ({**h, "out_proj.bias": {**h["out_proj.bias"], "dtype": "I64"}}, n), "has dtype i64"),
    (lambda h, n: ({**h, "out_proj.bias": {**h["out_proj.bias"], "data_offsets": [0, 64]}}, n),
     "do not cover its 4352 bytes of data exactly once"),
    (lambda h, n: (h, n + 100), "do not cover"),
    (lambda h, n: ({**h, "out_proj.bias": {"dtype": "F32"}}, n), "lacks a dtype, a shape or two data_offsets"),
])
def test_safetensors_declarations_are_checked_against_the_file_and_the_spec(tmp_path, mutate, message):
    path = tmp_path / "w.safetensors"
    _safetensors(path, *mutate(*_header(STATE)))
    refused(path, message)


def test_a_safetensors_header_length_past_the_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    refused(path, "its header declares 4611686018427387904 bytes, more than the file's 2")


# .pt -----------------------------------------------------------------------------------------

def test_a_pt_declaring_more_data_than_the_spec_needs_is_refused_before_torch_load(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save({**{k: torch.from_numpy(v) for k, v in STATE.items()}, "extra": torch.zeros(2**24)}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    refused(path, "declares 67")


@pytest.mark.parametrize(("dtype", "suffix"), [(d, s) for d in ("int8", "bool", "complex64", "float8_e4m3fn")
                                                for s in (".pt", ".safetensors", ".npz") if (d, s) != ("float8_e4m3fn", ".npz")])
def test_one_dtype_rule_for_every_format(tmp_path, dtype, suffix):
    """int8, bool, complex and float8 weights are refused alike: a cast would compute something else."""
    state = {k: torch.from_numpy(v) for k, v in STATE.items()}
    state["in_proj_bias"] = state["in_proj_bias"].to(getattr(torch, dtype))
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file as save_torch

        save_torch(state, str(path))
    else:  # NumPy has no float8 to write into an .npz
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    refused(path, "weight 'in_proj_bias' has dtype")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecation of quantized tensors
@pytest.mark.parametrize(("make", "kind"), [
    (lambda v: v.to_sparse(), "a sparse"),
    (lambda v: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8), "a quantized"),
    (lambda v: torch.empty(v.shape, device="meta"), "a meta (data-less)"),
])
def test_sparse_quantized_and_meta_tensors_in_a_pt_are_refused(tmp_path, make, kind):
    path = tmp_path / "w.pt"
    state = {k: torch.from_numpy(v) for k, v in STATE.items()}
    state["out_proj.weight"] = make(state["out_proj.weight"])
    torch.save(state, path)
    refused(path, f"weight 'out_proj.weight' is {kind} tensor")


# Weights past fp16's range --------------------------------------------------------------------

def test_weights_past_fp16s_range_are_refused_with_precision_fp16(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({**STATE, "out_proj.bias": np.full(16, 1e5, np.float32)}, str(path))
    common = ["--embed-dim", "16", "--num-heads", "2", "--weights", str(path), "--quiet"]
    assert compile_script.main([*common, "--precision", "fp16", "--out", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err
    assert "weight 'out_proj.bias' holds values up to 1e+05, beyond float16's range" in err and err.count("\n") == 1
    assert not (tmp_path / "half").exists()
    assert compile_script.main([*common, "--out", str(tmp_path / "full")]) == 0  # fp32 holds them
    model = tmp_path / "full" / "model.onnx"
    assert compile_script.main(["--onnx", str(model), "--precision", "fp16", "--out", str(tmp_path / "ingested")]) == 2
    assert "holds values up to 1e+05, beyond float16's range" in capsys.readouterr().err
