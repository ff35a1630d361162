"""An independent float64 NumPy implementation of the spec's semantics.

It follows torch's ``F.multi_head_attention_forward`` step by step (sequence-first, heads folded
into the batch as (N*H, L, hd)), not the graph builder's batch-first layout, so that the two
implementations share no code path that could hide a common mistake.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights


def combined_mask(
    spec: AttentionSpec, inputs: Mapping[str, np.ndarray], batch: int, tgt: int, src: int
) -> np.ndarray:
    """Float64 additive mask (N*H, L, S + extra keys): 0 allowed, -inf not, float masks added."""
    h = spec.num_heads
    total = np.zeros((batch * h, tgt, src), np.float64)
    if spec.attn_mask is not None:
        m = _to_additive(inputs["attn_mask"])
        total += m if m.ndim == 3 else m[None]
    if spec.is_causal:  # with a KV cache, query i is position past_len + i
        offset = src - tgt if spec.kv_cache else 0
        total += np.where(np.arange(src)[None, :] > np.arange(tgt)[:, None] + offset, -np.inf, 0.0)[
            None
        ]
    if spec.key_padding_mask is not None:
        kpm = _to_additive(inputs["key_padding_mask"])  # (N, S)
        total += np.repeat(kpm, h, axis=0)[:, None, :]
    return np.concatenate([total, np.zeros((batch * h, tgt, spec.extra_keys))], axis=2)


def fully_masked_rows(spec: AttentionSpec, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, H, L) bool: query rows for which every key is masked."""
    q = inputs["query"]
    k = q if spec.self_attention else inputs["key"]
    batch_axis, seq_axis = (0, 1) if spec.batch_first else (1, 0)
    n, tgt, src = q.shape[batch_axis], q.shape[seq_axis], k.shape[seq_axis]
    if spec.kv_cache:
        src += inputs["past_key"].shape[2]
    mask = combined_mask(spec, inputs, n, tgt, src)
    return np.all(np.isneginf(mask), axis=-1).reshape(n, spec.num_heads, tgt)


def mha_reference(
    spec: AttentionSpec, weights: AttentionWeights, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    t = {k: v.astype(np.float64) for k, v in weights.tensors.items()}
    e, h, hd = spec.embed_dim, spec.num_heads, spec.head_dim
    query = inputs["query"].astype(np.float64)
    key = query if spec.self_attention else inputs["key"].astype(np.float64)
    value = query if spec.self_attention else inputs["value"].astype(np.float64)
    if spec.batch_first:  # torch transposes to sequence-first first
        query, key, value = (x.transpose(1, 0, 2) for x in (query, key, value))
    tgt, n, _ = query.shape
    src = key.shape[0]

    q, k, v = _projections(spec, t, query, key, value)

    if spec.add_bias_kv:
        k = np.concatenate([k, np.repeat(t["bias_k"], n, axis=1)])
        v = np.concatenate([v, np.repeat(t["bias_v"], n, axis=1)])
    q = q.reshape(tgt, n * h, hd).transpose(1, 0, 2)
    k = k.reshape(k.shape[0], n * h, hd).transpose(1, 0, 2)
    v = v.reshape(v.shape[0], n * h, hd).transpose(1, 0, 2)
    if spec.add_zero_attn:
        k = np.concatenate([k, np.zeros((n * h, 1, hd))], axis=1)
        v = np.concatenate([v, np.zeros((n * h, 1, hd))], axis=1)
    if spec.kv_cache:  # (N, H, P, hd) -> (N*H, P, hd), the same head order as the fold above
        past = [
            inputs[name].astype(np.float64).reshape(n * h, -1, hd)
            for name in ("past_key", "past_value")
        ]
        k, v = np.concatenate([past[0], k], axis=1), np.concatenate([past[1], v], axis=1)
        src = k.shape[1]

    mask = combined_mask(spec, inputs, n, tgt, src)
    probs = _softmax((q * np.sqrt(1.0 / hd)) @ k.transpose(0, 2, 1) + mask, mask)
    context = (probs @ v).transpose(1, 0, 2).reshape(tgt * n, e)
    out = context @ t["out_proj.weight"].T + (t["out_proj.bias"] if spec.bias else 0.0)
    out = out.reshape(tgt, n, e)
    result = {"attn_output": out.transpose(1, 0, 2) if spec.batch_first else out}
    if spec.need_weights:
        w = probs.reshape(n, h, tgt, -1)
        result["attn_output_weights"] = w.mean(axis=1) if spec.average_attn_weights else w
    if spec.kv_cache:
        result["present_key"], result["present_value"] = (x.reshape(n, h, src, hd) for x in (k, v))
    return result


def _projections(
    spec: AttentionSpec,
    t: Mapping[str, np.ndarray],
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if spec.packed_in_proj:
        w_q, w_k, w_v = np.split(t["in_proj_weight"], 3)
    else:
        w_q, w_k, w_v = t["q_proj_weight"], t["k_proj_weight"], t["v_proj_weight"]
    b_q, b_k, b_v = np.split(t["in_proj_bias"], 3) if spec.bias else (0.0, 0.0, 0.0)
    return query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v


def _softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over keys; a row whose every key is masked is zero (the contract), whatever the data."""
    row_max = scores.max(axis=-1, keepdims=True)
    dead = np.all(np.isneginf(mask), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        exp = np.exp(scores - np.where(dead, 0.0, row_max))
        return np.where(dead, 0.0, exp / np.where(dead, 1.0, exp.sum(axis=-1, keepdims=True)))


def _to_additive(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, -np.inf, 0.0) if mask.dtype == np.bool_ else mask.astype(np.float64)
