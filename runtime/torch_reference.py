"""torch.nn.MultiheadAttention itself as the reference, run in float64 in eval mode."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights


def torch_module(spec: AttentionSpec, weights: AttentionWeights) -> Any:
    import torch

    module = torch.nn.MultiheadAttention(
        spec.embed_dim, spec.num_heads, dropout=spec.dropout, bias=spec.bias, add_bias_kv=spec.add_bias_kv,
        add_zero_attn=spec.add_zero_attn, kdim=spec.kdim, vdim=spec.vdim, batch_first=spec.batch_first,
        dtype=torch.float64,
    )
    module.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in weights.tensors.items()})
    return module.eval()


def torch_forward(spec: AttentionSpec, module: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``module`` on the graph's inputs; torch's NaN rows for fully masked queries are left as torch gives them.

    torch treats ``is_causal`` as a hint that needs the causal ``attn_mask`` as well, so the causal
    mask is built here and merged with any ``attn_mask`` input (as a float mask, as torch merges).
    """
    import torch

    def t(x: np.ndarray) -> Any:
        return torch.from_numpy(x.astype(np.float64) if x.dtype != np.bool_ else x)

    query = t(inputs["query"])
    key = query if spec.self_attention else t(inputs["key"])
    value = query if spec.self_attention else t(inputs["value"])
    kpm = t(inputs["key_padding_mask"]) if spec.key_padding_mask is not None else None
    attn_mask = t(inputs["attn_mask"]) if spec.attn_mask is not None else None
    if spec.is_causal:
        seq = 1 if spec.batch_first else 0
        causal = torch.triu(torch.full((query.shape[seq], key.shape[seq]), float("-inf"), dtype=torch.float64), 1)
        attn_mask = causal if attn_mask is None else _additive(attn_mask) + causal
    if kpm is not None and attn_mask is not None and kpm.dtype != attn_mask.dtype:
        kpm, attn_mask = _additive(kpm), _additive(attn_mask)  # what torch does, minus its warning
    # The is_causal hint is honest only without appended keys: with them, torch's SDPA path would
    # apply tril over the extended key axis and mask bias_k / the zero key, while its mask path
    # (need_weights, or a key padding mask) keeps them allowed. We follow the mask.
    hint = spec.is_causal and spec.attn_mask is None and not spec.extra_keys
    with torch.no_grad():
        out, weights = module(
            query, key, value, key_padding_mask=kpm, need_weights=spec.need_weights, attn_mask=attn_mask,
            average_attn_weights=spec.average_attn_weights, is_causal=hint,
        )
    result = {"attn_output": out.numpy()}
    if spec.need_weights:
        result["attn_output_weights"] = weights.numpy()
    return result


def _additive(mask: Any) -> Any:
    import torch

    if mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))
