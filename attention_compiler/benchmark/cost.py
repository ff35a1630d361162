"""What one call of a spec's attention costs: the FLOPs it needs and the fewest bytes it must move.

Both are properties of the spec and the shape, not of a graph, so every backend in a benchmark
row shares them and its floor. FLOPs count multiply-adds twice. A causal mask removes the
score and context work of the keys it hides (a kernel that cannot skip them does extra work,
which shows as distance from the floor); padding masks are data and remove nothing.
"""

from __future__ import annotations

import math

from graphs.spec import AttentionSpec
from graphs.weights import expected_shapes


def attended_pairs(spec: AttentionSpec, tgt_len: int, src_len: int) -> int:
    """(query, key) pairs one head scores: every pair, or the causal ones (query i sees keys 0..i),
    plus the appended bias_k / zero keys, which every query sees."""
    if spec.is_causal:
        # rows 0..src_len-1 see i+1 keys; any later rows see all src_len keys
        full = min(tgt_len, src_len)
        pairs = full * (full + 1) // 2 + max(tgt_len - src_len, 0) * src_len
    else:
        pairs = tgt_len * src_len
    return pairs + tgt_len * spec.extra_keys


def attention_flops(
    spec: AttentionSpec, batch: int, tgt_len: int, src_len: int | None = None
) -> int:
    """Projections (query, key, value, output) plus scores and context, over every head."""
    src_len = tgt_len if spec.self_attention or src_len is None else src_len
    e = spec.embed_dim
    macs = tgt_len * e * e + src_len * spec.k_dim * e + src_len * spec.v_dim * e + tgt_len * e * e
    macs += (
        2 * attended_pairs(spec, tgt_len, src_len) * e
    )  # q.k over head_dim, x num_heads; and weights.v
    return 2 * batch * macs


def attention_min_bytes(
    spec: AttentionSpec, batch: int, tgt_len: int, src_len: int | None = None, weight_bytes: int = 4
) -> int:
    """Inputs read once, parameters read once, outputs written once: what a perfectly fused
    kernel moves. Graph inputs and outputs are float32 (masks bool or float32) at every precision;
    ``weight_bytes`` is 2 for fp16 parameters."""
    src_len = tgt_len if spec.self_attention or src_len is None else src_len
    e = spec.embed_dim
    floats = batch * tgt_len * e * 2  # query in, attn_output out
    if not spec.self_attention:
        floats += batch * src_len * (spec.k_dim + spec.v_dim)
    keys = src_len + spec.extra_keys
    if spec.need_weights:
        floats += batch * tgt_len * keys * (1 if spec.average_attn_weights else spec.num_heads)
    mask_bytes = 0
    if spec.key_padding_mask is not None:
        mask_bytes += batch * src_len * (1 if spec.key_padding_mask == "bool" else 4)
    if spec.attn_mask is not None:
        rows = batch * spec.num_heads if spec.attn_mask_3d else 1
        mask_bytes += rows * tgt_len * src_len * (1 if spec.attn_mask == "bool" else 4)
    params = sum(math.prod(shape) for shape in expected_shapes(spec).values())
    return 4 * floats + mask_bytes + weight_bytes * params
