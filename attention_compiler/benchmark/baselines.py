"""What a user would run instead of a compiled graph, for benchmarks to compare against: the
same block written with torch.nn.functional.scaled_dot_product_attention, and the graph that
torch.onnx.export(dynamo=True) makes of nn.MultiheadAttention. Both compute what the spec's
graph computes (docs/ARCHITECTURE.md semantics), weights included."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights
from runtime.torch_reference import call_arguments, torch_module


class SdpaAttention:
    """nn.MultiheadAttention's forward as a deployment engineer would hand-write it around
    F.scaled_dot_product_attention: the projections, one combined mask (or ``is_causal`` when the
    causal mask is the only one), and the fused attention kernel torch picks for the device."""

    def __init__(
        self, spec: AttentionSpec, weights: AttentionWeights, *, dtype: Any, device: str
    ) -> None:
        import torch

        if spec.need_weights:
            raise ValueError(
                "scaled_dot_product_attention returns no attention weights; the spec asks for them"
            )
        self.spec = spec

        def t(x: np.ndarray) -> Any:
            return torch.as_tensor(np.asarray(x, np.float32), device=device).to(dtype)

        bias = weights.in_bias(spec) or (None, None, None)
        self.w_in = [t(w) for w in weights.in_proj(spec)]
        self.b_in = [None if b is None else t(b) for b in bias]
        self.w_out = t(weights.tensors["out_proj.weight"])
        self.b_out = t(weights.tensors["out_proj.bias"]) if spec.bias else None
        self.bias_kv = (
            (t(weights.tensors["bias_k"]), t(weights.tensors["bias_v"]))
            if spec.add_bias_kv
            else None
        )

    def __call__(self, inputs: Mapping[str, Any]) -> Any:
        import torch
        import torch.nn.functional as F

        spec = self.spec
        query = inputs["query"]
        key = query if spec.self_attention else inputs["key"]
        value = query if spec.self_attention else inputs["value"]
        if not spec.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), self.w_in, self.b_in))
        batch, tgt, src = q.shape[0], q.shape[1], k.shape[1]
        if self.bias_kv is not None:
            k = torch.cat([k, self.bias_kv[0].expand(batch, 1, -1)], 1)
            v = torch.cat([v, self.bias_kv[1].expand(batch, 1, -1)], 1)
        heads, hd = spec.num_heads, spec.head_dim
        q, k, v = (x.reshape(batch, x.shape[1], heads, hd).transpose(1, 2) for x in (q, k, v))
        if spec.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, hd)], 2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, hd)], 2)
        mask, causal_only = self._mask(inputs, batch, tgt, src, q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal_only)
        out = F.linear(
            out.transpose(1, 2).reshape(batch, tgt, spec.embed_dim), self.w_out, self.b_out
        )
        return out if spec.batch_first else out.transpose(0, 1)

    def _mask(
        self, inputs: Mapping[str, Any], batch: int, tgt: int, src: int, q: Any
    ) -> tuple[Any, bool]:
        """One (batch or 1, heads or 1, tgt, keys) mask, True or 0 where attention is allowed."""
        import torch

        spec = self.spec
        if spec.is_causal and not spec.has_mask_input and not spec.extra_keys:
            return None, True
        blocked = []  # bool (True = blocked) or additive float, broadcastable to (B, H, L, S)
        if "key_padding_mask" in inputs:
            blocked.append(inputs["key_padding_mask"][:, None, None, :])
        if "attn_mask" in inputs:
            mask = inputs["attn_mask"]
            blocked.append(
                mask.reshape(batch, spec.num_heads, tgt, src) if mask.dim() == 3 else mask
            )
        if spec.is_causal:
            blocked.append(torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1))
        if not blocked:
            return None, False
        if all(m.dtype == torch.bool for m in blocked):
            combined = blocked[0]
            for m in blocked[1:]:
                combined = combined | m
            allowed = ~combined
            if spec.extra_keys:  # bias_k and the zero key are never masked
                allowed = torch.cat(
                    [
                        allowed.expand(*allowed.shape[:-1], src),
                        allowed.new_ones(*allowed.shape[:-1], spec.extra_keys),
                    ],
                    -1,
                )
            return allowed, False
        additive = sum(
            m.to(q.dtype)
            if m.is_floating_point()
            else torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf"))
            for m in blocked
        )
        if spec.extra_keys:
            additive = torch.cat(
                [
                    additive.expand(*additive.shape[:-1], src),
                    additive.new_zeros(*additive.shape[:-1], spec.extra_keys),
                ],
                -1,
            )
        return additive, False


def eager_attention(
    spec: AttentionSpec, weights: AttentionWeights, *, dtype: Any, device: str
) -> Callable[[Mapping[str, Any]], Any]:
    """nn.MultiheadAttention in eval mode; call it under torch.no_grad()."""
    module = torch_module(spec, weights, dtype=dtype, device=device)

    def call(inputs: Mapping[str, Any]) -> Any:
        args, kwargs = call_arguments(spec, inputs)
        return module(*args, **kwargs)[0]

    return call


def export_with_torch(
    spec: AttentionSpec,
    weights: AttentionWeights,
    path: str | os.PathLike[str],
    sample_len: int = 17,
) -> None:
    """torch.onnx.export(dynamo=True) of nn.MultiheadAttention called as the spec says, every
    batch and length axis dynamic; inputs in the order and layout of the spec's graph."""
    import torch

    module = torch_module(spec, weights, dtype=torch.float32)
    names = [s.name for s in spec.inputs()]

    class Call(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = module

        def forward(self, *tensors: Any) -> Any:
            args, kwargs = call_arguments(spec, dict(zip(names, tensors)))
            outputs = self.attn(*args, **kwargs)
            return outputs if spec.need_weights else outputs[0]

    args, dims = _sample_inputs(spec, sample_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Call().eval(), tuple(args), dynamo=True, dynamic_shapes=(tuple(dims),), verbose=False
        )
    program.save(os.fspath(path))


def _sample_inputs(spec: AttentionSpec, sample_len: int) -> tuple[list[Any], list[dict[int, Any]]]:
    """torch.export's sample inputs in the spec's order and layout, and each one's dynamic axes."""
    import torch
    from torch.export import Dim

    batch, tgt, src = Dim("batch", min=1), Dim("tgt_len", min=2), Dim("src_len", min=2)
    src = tgt if spec.self_attention else src
    axes = {"batch": batch, "tgt_len": tgt, "src_len": src}
    sizes = {
        "batch": 2,
        "tgt_len": sample_len,
        "src_len": sample_len if spec.self_attention else sample_len + 2,
    }
    args, dims = [], []
    for sig in spec.inputs():
        shape = [
            sizes[d] if d in sizes else (2 * spec.num_heads if isinstance(d, str) else d)
            for d in sig.shape
        ]
        dyn = {i: axes[d] for i, d in enumerate(sig.shape) if d in axes}
        if isinstance(sig.shape[0], str) and sig.shape[0] not in axes:
            dyn[0] = spec.num_heads * batch  # batch*num_heads of a 3-D attn_mask
        args.append(
            torch.zeros(shape, dtype=torch.bool) if sig.dtype == "bool" else torch.randn(shape)
        )
        dims.append(dyn)
    return args, dims
