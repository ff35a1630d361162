"""The benchmark baselines compute what the spec's graph computes: torch eager, the hand-written
F.scaled_dot_product_attention block and torch.onnx.export's graph, against the float64 NumPy
reference, across mask kinds, layouts, cross-attention and appended keys (1e-5: float32)."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import AttentionSpec, AttentionWeights
from runtime.check import errors
from runtime.reference import mha_reference

torch = pytest.importorskip("torch")

from attention_compiler.benchmark.baselines import SdpaAttention, eager_attention, export_with_torch  # noqa: E402
from runtime.ort import OrtSession  # noqa: E402

SPECS = [
    AttentionSpec(16, 4, self_attention=True, batch_first=True),
    AttentionSpec(
        16, 4, self_attention=True, batch_first=True, key_padding_mask="bool", is_causal=True
    ),
    AttentionSpec(16, 4, kdim=12, vdim=8, key_padding_mask="float", attn_mask="bool"),
    AttentionSpec(16, 4, self_attention=True, attn_mask="float", attn_mask_3d=True, is_causal=True),
    AttentionSpec(
        16, 4, batch_first=True, key_padding_mask="bool", attn_mask="float", add_bias_kv=True
    ),
    AttentionSpec(16, 4, self_attention=True, is_causal=True, add_zero_attn=True, bias=False),
    AttentionSpec(
        16,
        4,
        batch_first=True,
        attn_mask="bool",
        attn_mask_3d=True,
        add_bias_kv=True,
        add_zero_attn=True,
    ),
]


def _inputs(spec, rng):
    from runtime.check import random_inputs

    feeds = random_inputs(spec, (2, 6, 6 if spec.self_attention else 9), rng)
    for name in ("key_padding_mask", "attn_mask"):
        if name in feeds:  # key 0 open: no fully masked row, where torch gives NaN
            feeds[name][..., 0] = False if feeds[name].dtype == np.bool_ else 0.0
    return feeds


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.key_padding_mask}-{s.attn_mask}-{s.is_causal}-{s.extra_keys}"
)
def test_baselines_match_the_reference(spec, tmp_path):
    rng = np.random.default_rng(3)
    weights = AttentionWeights.random(spec, seed=1)
    feeds = _inputs(spec, rng)
    want = mha_reference(spec, weights, feeds)["attn_output"]
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        eager = eager_attention(spec, weights, dtype=torch.float32, device="cpu")(tensors).numpy()
        sdpa = SdpaAttention(spec, weights, dtype=torch.float32, device="cpu")(tensors).numpy()
    export_with_torch(spec, weights, tmp_path / "exported.onnx")
    session = OrtSession(tmp_path / "exported.onnx")
    exported = session._session.run(
        None, dict(zip((i.name for i in session.inputs), feeds.values()))
    )[0]
    for name, got in (("eager", eager), ("sdpa", sdpa), ("exporter", exported)):
        assert errors(got, want)[1] <= 1e-5, name


def test_sdpa_refuses_a_spec_that_wants_weights():
    spec = AttentionSpec(8, 2, need_weights=True)
    with pytest.raises(ValueError, match="returns no attention weights"):
        SdpaAttention(spec, AttentionWeights.random(spec), dtype=torch.float32, device="cpu")
