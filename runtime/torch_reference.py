"""torch.nn.MultiheadAttention itself as the reference, run in float64 in eval mode."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights


def torch_module(
    spec: AttentionSpec, weights: AttentionWeights, *, dtype: Any = None, device: str = "cpu"
) -> Any:
    """The module with ``weights``, in eval mode; float64 on the CPU unless told otherwise."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    module = torch.nn.MultiheadAttention(
        spec.embed_dim,
        spec.num_heads,
        dropout=spec.dropout,
        bias=spec.bias,
        add_bias_kv=spec.add_bias_kv,
        add_zero_attn=spec.add_zero_attn,
        kdim=spec.kdim,
        vdim=spec.vdim,
        batch_first=spec.batch_first,
        dtype=dtype,
        device=device,
    )
    return loaded(module, weights)


def loaded(module: Any, weights: Any) -> Any:
    """``module`` holding ``weights`` (cast to its dtype), in eval mode."""
    import torch

    module.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in weights.tensors.items()}
    )
    return module.eval()


def torch_forward(
    spec: AttentionSpec, module: Any, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run ``module`` on the graph's inputs; torch's NaN rows for fully masked queries are left as torch gives them."""
    import torch

    tensors = {
        k: torch.from_numpy(x.astype(np.float64) if x.dtype != np.bool_ else x)
        for k, x in inputs.items()
    }
    args, kwargs = call_arguments(spec, tensors)
    with torch.no_grad():
        out, weights = module(*args, **kwargs)
    result = {"attn_output": out.numpy()}
    if spec.need_weights:
        result["attn_output_weights"] = weights.numpy()
    return result


def call_arguments(
    spec: AttentionSpec, inputs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of ``module(...)`` for the graph's inputs as tensors
    (any float dtype, any device), so that the module computes what the graph computes.

    torch treats ``is_causal`` as a hint that needs the causal ``attn_mask`` as well, so the causal
    mask is built here and merged with any ``attn_mask`` input (as a float mask, as torch merges).
    """
    import torch

    query = inputs["query"]
    key = query if spec.self_attention else inputs["key"]
    value = query if spec.self_attention else inputs["value"]
    kpm = inputs.get("key_padding_mask")
    attn_mask = inputs.get("attn_mask")
    if spec.is_causal:
        seq = 1 if spec.batch_first else 0
        causal = torch.triu(
            torch.full(
                (query.shape[seq], key.shape[seq]),
                float("-inf"),
                dtype=query.dtype,
                device=query.device,
            ),
            1,
        )
        attn_mask = causal if attn_mask is None else _additive(attn_mask, query) + causal
    if kpm is not None and attn_mask is not None and kpm.dtype != attn_mask.dtype:
        kpm, attn_mask = (
            _additive(kpm, query),
            _additive(attn_mask, query),
        )  # what torch does, minus its warning
    # The is_causal hint is honest only without appended keys: with them, torch's SDPA path would
    # apply tril over the extended key axis and mask bias_k / the zero key, while its mask path
    # (need_weights, or a key padding mask) keeps them allowed. We follow the mask.
    hint = spec.is_causal and spec.attn_mask is None and not spec.extra_keys
    return (query, key, value), {
        "key_padding_mask": kpm,
        "need_weights": spec.need_weights,
        "attn_mask": attn_mask,
        "average_attn_weights": spec.average_attn_weights,
        "is_causal": hint,
    }


def _additive(mask: Any, like: Any) -> Any:
    """A mask as the additive float mask torch merges it into, in ``like``'s dtype."""
    import torch

    if mask.is_floating_point():
        return mask.to(like.dtype)
    return torch.zeros(mask.shape, dtype=like.dtype, device=mask.device).masked_fill(
        mask, float("-inf")
    )
