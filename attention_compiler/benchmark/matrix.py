"""The core option matrix: every structural variant of the spec against every mask combination.

Shared by the tests, scripts/accuracy.py and the per-target checks, so that all of them speak of
the same set of graphs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

STRUCTURES: dict[str, dict[str, Any]] = {
    "default": {},
    "batch_first-no_bias": {"batch_first": True, "bias": False},
    "bias_kv-zero_attn": {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True},
    "kdim-vdim": {"kdim": 6, "vdim": 10},
    "kdim-zero_attn-no_bias": {"kdim": 12, "vdim": 20, "add_zero_attn": True, "bias": False},
    "self_attention": {"self_attention": True, "batch_first": True},
    "self_attention-bias_kv-no_bias": {"self_attention": True, "add_bias_kv": True, "bias": False},
}
MASKS: list[dict[str, Any]] = [
    {"key_padding_mask": kpm, "attn_mask": am, "attn_mask_3d": am3, "is_causal": causal}
    for kpm in (None, "bool", "float")
    for am, am3 in (
        (None, False),
        ("bool", False),
        ("float", False),
        ("bool", True),
        ("float", True),
    )
    for causal in (False, True)
]
WEIGHTS: list[dict[str, Any]] = [
    {"need_weights": False},
    {"need_weights": True},
    {"need_weights": True, "average_attn_weights": False},
]
SHAPES = ((2, 5, 7), (3, 9, 4))  # (batch, tgt_len, src_len); tgt < src and tgt > src
EMBED_DIM, NUM_HEADS = 16, 4


def option_matrix() -> Iterator[tuple[str, dict[str, Any]]]:
    """(case id, spec options): 7 structures x 30 mask combinations; weights modes rotate so that
    every structure meets every weights mode."""
    for (name, structure), (i, masks) in itertools.product(STRUCTURES.items(), enumerate(MASKS)):
        weights = WEIGHTS[(i + len(name)) % len(WEIGHTS)]
        mask_id = "-".join(f"{k}={v}" for k, v in masks.items() if v) or "nomask"
        mode = (
            "nw"
            if not weights["need_weights"]
            else ("w" if weights.get("average_attn_weights", True) else "wh")
        )
        yield (
            f"{name}-{mask_id}-{mode}",
            {"embed_dim": EMBED_DIM, "num_heads": NUM_HEADS, **structure, **masks, **weights},
        )
