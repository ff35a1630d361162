"""Inputs are checked before ONNX Runtime sees them; each mistake is one sentence."""

import numpy as np
import pytest

from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime import InputError
from runtime.check import random_inputs
from runtime.ort import OrtSession

SPEC = AttentionSpec(
    16, 4, batch_first=True, key_padding_mask="bool", attn_mask="float", attn_mask_3d=True
)


@pytest.fixture(scope="module")
def session():
    return OrtSession(build_mha(SPEC, AttentionWeights.random(SPEC)))


def _feeds():
    return random_inputs(SPEC, (2, 3, 5), np.random.default_rng(0))


def _edit(**changes):
    feeds = _feeds()
    for name, value in changes.items():
        if value is None:
            feeds.pop(name)
        else:
            feeds[name] = value
    return feeds


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"key_padding_mask": None},
            "missing input 'key_padding_mask'; this graph takes query, key, value, key_padding_mask, attn_mask",
        ),
        ({"mask": np.zeros(1)}, "unexpected input 'mask'"),
        (
            {"query": np.zeros((2, 3, 16), np.float64)},
            "input 'query' has dtype float64, expected float32",
        ),
        (
            {"key_padding_mask": np.zeros((2, 5), np.float32)},
            "input 'key_padding_mask' has dtype float32, expected bool",
        ),
        (
            {"query": np.zeros((3, 16), np.float32)},
            "input 'query' has rank 2 (shape (3, 16)), expected rank 3 (batch, tgt_len, 16)",
        ),
        (
            {"query": np.zeros((2, 3, 8), np.float32)},
            "input 'query' has size 8 on axis 2, expected 16",
        ),
        (
            {"key": np.zeros((4, 5, 16), np.float32)},
            "input 'key' has batch=4 on axis 0, but 'query' gave batch=2",
        ),
        (
            {"value": np.zeros((2, 6, 16), np.float32)},
            "input 'value' has src_len=6 on axis 1, but 'key' gave src_len=5",
        ),
        (
            {"key_padding_mask": np.zeros((3, 5), bool)},
            "input 'key_padding_mask' has batch=3 on axis 0, but 'query' gave batch=2",
        ),
        (
            {"attn_mask": np.zeros((4, 3, 5), np.float32)},
            "input 'attn_mask' has size 4 on axis 0, expected batch*4 = 8 (batch=2 from 'query')",
        ),
        (
            {"attn_mask": np.zeros((8, 3, 4), np.float32)},
            "input 'attn_mask' has src_len=4 on axis 2, but 'key' gave src_len=5",
        ),
        (
            {"query": [[1.0]]},
            "input 'query' is a list, expected a numpy.ndarray or torch.Tensor of float32",
        ),
    ],
)
def test_bad_inputs_are_named(session, changes, message):
    with pytest.raises(InputError) as info:
        session.run(_edit(**changes))
    assert message in str(info.value)


def test_good_inputs_run(session):
    out = session.run(_feeds())
    assert out["attn_output"].shape == (2, 3, 16)
