import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from graphs import AttentionSpec, AttentionWeights, WeightsError, expected_shapes

SPEC = AttentionSpec(8, 2)
SEPARATE = AttentionSpec(8, 2, kdim=3, vdim=5, add_bias_kv=True)


def _module(spec):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(
        spec.embed_dim,
        spec.num_heads,
        bias=spec.bias,
        add_bias_kv=spec.add_bias_kv,
        kdim=spec.kdim,
        vdim=spec.vdim,
    )


def _state(spec):
    return {k: v.detach().numpy() for k, v in _module(spec).state_dict().items()}


def _save(spec, path):
    if path.suffix == ".safetensors":
        save_file(_state(spec), str(path))
    elif path.suffix == ".npz":
        np.savez(path, **_state(spec))
    else:
        torch.save(_module(spec).state_dict(), path)


@pytest.mark.parametrize("spec", [SPEC, SEPARATE, AttentionSpec(8, 2, bias=False)])
def test_expected_keys_are_exactly_torchs(spec):
    state = _module(spec).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(spec)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
@pytest.mark.parametrize("spec", [SPEC, SEPARATE])
def test_every_file_format_round_trips(tmp_path, suffix, spec):
    state = _state(spec)
    path = tmp_path / f"w{suffix}"
    _save(spec, path)
    weights = AttentionWeights.from_file(spec, path)
    assert weights.source["format"] == suffix.lstrip(".")
    for key, value in state.items():
        np.testing.assert_array_equal(weights.tensors[key], value.astype(np.float32))


def test_live_module_and_bf16_tensors():
    module = _module(SPEC).to(torch.bfloat16)
    weights = AttentionWeights.from_module(SPEC, module)
    assert weights.tensors["in_proj_weight"].dtype == np.float32
    np.testing.assert_array_equal(
        weights.tensors["out_proj.weight"], module.out_proj.weight.detach().float().numpy()
    )


def test_random_init_is_seeded_with_nonzero_biases():
    a, b, c = (AttentionWeights.random(SPEC, s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.tensors["in_proj_weight"], b.tensors["in_proj_weight"])
    assert not np.array_equal(a.tensors["in_proj_weight"], c.tensors["in_proj_weight"])
    assert np.all(a.tensors["in_proj_bias"] != 0) and np.all(a.tensors["out_proj.bias"] != 0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("in_proj_bias"), "weights are missing key 'in_proj_bias'"),
        (lambda s: s.update(extra=np.zeros(3)), "weights hold unexpected key 'extra'"),
        (lambda s: s.update(bias_k=np.zeros((1, 1, 8))), "weights hold unexpected keys 'bias_k'"),
        (
            lambda s: s.update(in_proj_weight=np.zeros((24, 7))),
            "weight 'in_proj_weight' has shape (24, 7), expected (24, 8)",
        ),
        (
            lambda s: s.update(in_proj_bias=np.zeros(24, np.int64)),
            "weight 'in_proj_bias' has dtype int64, expected a floating-point tensor",
        ),
    ],
)
def test_bad_state_dicts_are_named(mutate, message):
    state = _state(SPEC)
    if "bias_k" in message:
        state["bias_v"] = np.zeros((1, 1, 8))
    mutate(state)
    with pytest.raises(WeightsError) as info:
        AttentionWeights.from_state_dict(SPEC, state)
    assert message in str(info.value)


def test_in_proj_weight_is_refused_where_torch_keeps_separate_weights():
    with pytest.raises(
        WeightsError, match="missing keys 'q_proj_weight', 'k_proj_weight', 'v_proj_weight'"
    ):
        AttentionWeights.from_state_dict(SEPARATE, _state(SPEC))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_truncated_files_give_a_clear_error(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    _save(SPEC, good)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(WeightsError, match=f"weights file '.*bad{suffix}'"):
        AttentionWeights.from_file(SPEC, bad)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(
        WeightsError, match="has an unknown type; expected .safetensors, .npz or .pt"
    ):
        AttentionWeights.from_file(SPEC, tmp_path / "w.bin")
    with pytest.raises(WeightsError, match="does not exist"):
        AttentionWeights.from_file(SPEC, tmp_path / "none.pt")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"in_proj_weight": _Exploit(str(marker))}, path, pickle_module=pickle)
    with pytest.raises(
        WeightsError, match=r"could not be loaded with torch.load\(weights_only=True\)"
    ):
        AttentionWeights.from_file(SPEC, path)
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "obj.npz"
    np.savez(path, **{**_state(SPEC), "in_proj_weight": np.array([{"a": 1}], dtype=object)})
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("the pickle was loaded"))
    with pytest.raises(
        WeightsError,
        match=r"weight 'in_proj_weight' holds Python objects \(a pickle, which is never loaded",
    ):
        AttentionWeights.from_file(SPEC, path)


def test_bf16_safetensors_load_through_torch(tmp_path):
    from safetensors.torch import save_file as save_torch

    module = _module(SPEC).to(torch.bfloat16)
    save_torch(
        {k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    weights = AttentionWeights.from_file(SPEC, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(
        weights.tensors["in_proj_weight"], module.in_proj_weight.detach().float().numpy()
    )
