"""References for the encoder and decoder blocks: torch's own layers in float64, and a float64
NumPy composition of the attention reference (runtime/reference.py) with LayerNorm and the
feed-forward written out here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphs.blocks import BlockSpec, BlockWeights
from runtime.reference import mha_reference
from runtime.torch_reference import loaded

_erf = np.vectorize(math.erf, otypes=[np.float64])


def block_reference(
    spec: BlockSpec, weights: BlockWeights, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    p, t = spec.prefix, {k: v.astype(np.float64) for k, v in weights.tensors.items()}
    present: dict[str, np.ndarray] = {}

    def batch_first(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64) if spec.batch_first else x.astype(np.float64).transpose(1, 0, 2)

    def attention(
        module: str, sub: Any, query: np.ndarray, kv: np.ndarray, kpm: str, mask: str
    ) -> np.ndarray:
        feeds = {"query": query}
        if not sub.self_attention:
            feeds |= {"key": kv, "value": kv}
        if kpm in inputs:
            feeds["key_padding_mask"] = inputs[kpm]
        if mask in inputs:
            feeds["attn_mask"] = inputs[mask]
        if sub.kv_cache:
            feeds |= {"past_key": inputs["past_key"], "past_value": inputs["past_value"]}
        out = mha_reference(sub, weights.attention(module), feeds)
        present.update({k: v for k, v in out.items() if k.startswith("present")})
        return out["attn_output"]

    def self_attention(h: np.ndarray) -> np.ndarray:
        kpm, mask = f"{p}_key_padding_mask", f"{p}_mask"
        return attention("self_attn", spec.self_attention_spec(), h, h, kpm, mask)

    def cross_attention(h: np.ndarray) -> np.ndarray:
        kpm, mask = "memory_key_padding_mask", "memory_mask"
        return attention("multihead_attn", spec.cross_attention_spec(), h, memory, kpm, mask)

    x = batch_first(inputs[p])
    sublayers = [("norm1", self_attention)]
    if spec.block == "decoder":
        memory = batch_first(inputs["memory"])
        sublayers.append(("norm2", cross_attention))
    sublayers.append((f"norm{len(sublayers) + 1}", lambda h: _feed_forward(spec, t, h)))
    for name, sublayer in sublayers:
        if spec.norm_first:
            x = x + sublayer(_layer_norm(spec, t, name, x))
        else:
            x = _layer_norm(spec, t, name, x + sublayer(x))
    return {"output": x if spec.batch_first else x.transpose(1, 0, 2), **present}


def _layer_norm(
    spec: BlockSpec, t: Mapping[str, np.ndarray], name: str, x: np.ndarray
) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + spec.layer_norm_eps) * t[f"{name}.weight"]
    return y + t[f"{name}.bias"] if spec.bias else y


def _feed_forward(spec: BlockSpec, t: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = x @ t["linear1.weight"].T + t.get("linear1.bias", 0.0)
    if spec.activation == "relu":
        h = np.maximum(h, 0.0)
    else:  # torch's exact erf form
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    return h @ t["linear2.weight"].T + t.get("linear2.bias", 0.0)


def torch_block(spec: BlockSpec, weights: BlockWeights, *, dtype: Any = None) -> Any:
    """torch's layer with ``weights``, eval mode, float64 unless told otherwise."""
    import torch

    layer = (
        torch.nn.TransformerEncoderLayer
        if spec.block == "encoder"
        else torch.nn.TransformerDecoderLayer
    )
    module = layer(
        spec.embed_dim,
        spec.num_heads,
        dim_feedforward=spec.dim_feedforward,
        dropout=spec.dropout,
        activation=spec.activation,
        layer_norm_eps=spec.layer_norm_eps,
        batch_first=spec.batch_first,
        norm_first=spec.norm_first,
        bias=spec.bias,
        dtype=dtype or torch.float64,
    )
    return loaded(module, weights)


def torch_block_forward(
    spec: BlockSpec, module: Any, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run torch's layer on the graph's inputs. The causal mask is passed as a mask with the
    is_causal hint, and masks of mixed kinds are merged as float, as torch itself does."""
    import torch

    t = {
        k: torch.from_numpy(v.astype(np.float64) if v.dtype != np.bool_ else v)
        for k, v in inputs.items()
    }
    p = spec.prefix
    x = t[p]
    mask, kpm = t.get(f"{p}_mask"), t.get(f"{p}_key_padding_mask")
    if spec.is_causal:
        length = x.shape[1 if spec.batch_first else 0]
        causal = torch.triu(torch.full((length, length), float("-inf"), dtype=torch.float64), 1)
        mask = causal if mask is None else _additive(mask) + causal
    mask, kpm = _same_kind(mask, kpm)
    hint = spec.is_causal and spec.attn_mask is None
    with torch.no_grad():
        if spec.block == "encoder":
            out = module(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=hint)
        else:
            memory_mask, memory_kpm = _same_kind(
                t.get("memory_mask"), t.get("memory_key_padding_mask")
            )
            out = module(
                x,
                t["memory"],
                tgt_mask=mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=kpm,
                memory_key_padding_mask=memory_kpm,
                tgt_is_causal=hint,
            )
    return {"output": out.numpy()}


def _additive(mask: Any) -> Any:
    import torch

    return (
        mask
        if mask.is_floating_point()
        else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))
    )


def _same_kind(a: Any, b: Any) -> tuple[Any, Any]:
    if a is not None and b is not None and a.dtype != b.dtype:
        return _additive(a), _additive(b)
    return a, b
