"""Query rows with no key left keep what the input graph gives them on every target (issue 28):
ONNX Runtime's CPU Attention op gives such a row a zero context, counting float32's lowest as -inf,
where an exported graph gives the mean of the values (Hugging Face's masks fill with the lowest
float) or NaN (an all -inf row, unguarded). A hand-written attention layer with a float mask,
exported by both exporters, is fed rows of all lowest and all -inf beside ordinary ones."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from compiler import compile_model
from graphs.onnx_files import load_onnx
from runtime.check import FP32_TOLERANCE, errors
from runtime.ort import OrtSession

torch = pytest.importorskip("torch")

E, H = 32, 4
LOWEST = float(np.finfo(np.float32).min)


class _Layer(torch.nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v with no guard, as eager Hugging Face attention writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(E, 3 * E)
        self.out = torch.nn.Linear(E, E)

    def forward(self, x, mask):  # mask: (N, 1, L, S), added
        n, length, _ = x.shape
        q, k, v = (
            t.reshape(n, length, H, E // H).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)
        )
        scores = q @ k.transpose(-1, -2) / (E // H) ** 0.5 + mask
        context = torch.softmax(scores, dim=-1) @ v
        return self.out(context.transpose(1, 2).reshape(n, length, E))


def _export(folder, dynamo: bool):
    torch.manual_seed(0)
    args = (torch.randn(2, 6, E), torch.zeros(2, 1, 6, 6))
    options = {"input_names": ["x", "mask"], "output_names": ["y"]}
    if dynamo:
        seq = torch.export.Dim("seq", min=2, max=64)
        options.update(dynamic_shapes=({1: seq}, {2: seq, 3: seq}))
    else:
        options.update(dynamic_axes={"x": {1: "seq"}, "mask": {2: "seq", 3: "seq"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Layer().eval(), args, folder / "m.onnx", dynamo=dynamo, **options)
    return load_onnx(folder / "m.onnx")


def _feeds(length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(length)
    mask = np.zeros((2, 1, length, length), np.float32)
    mask[0, 0, :, length // 2 :] = LOWEST  # ordinary rows: half the keys hidden
    mask[0, 0, 1, :] = LOWEST  # every key at the lowest float: the mean of the values
    mask[1, 0, 2, :] = -np.inf  # every key -inf: NaN
    mask[1, 0, 3, :] = [LOWEST if i % 2 else -np.inf for i in range(length)]  # the mean of some
    return {"x": rng.standard_normal((2, length, E)).astype(np.float32), "mask": mask}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize(
    "target, form",
    [
        ("onnx-attention", None),
        ("onnx-attention", "attention-op-blocks"),
        ("ort-cpu", None),
        ("portable", None),
    ],
)
def test_rows_with_no_key_left_get_what_the_export_gives(tmp_path, dynamo, target, form):
    original = _export(tmp_path, dynamo)
    compiled = compile_model(original, target, form=form)
    assert (
        any(
            n.op_type in ("Attention", "MultiHeadAttention", "Loop", "If")
            for n in compiled.graph.node
        )
        or target == "portable"
    )
    for length in (6, 9):
        feeds = _feeds(length)
        want = OrtSession(original, maxima=False).run(feeds)["y"]
        got = OrtSession(compiled, maxima=False).run(feeds)["y"]
        assert np.isnan(want[1, 2]).all() and not np.isnan(want[0, 1]).any()  # the export's rows
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert errors(got, want)[1] <= FP32_TOLERANCE
