"""The spec flags that compile.py and bench.py share, so that one spelling means one spec in both."""

from __future__ import annotations

import argparse

from graphs import AttentionSpec


def add_spec_flags(p: argparse.ArgumentParser, *, embed_dim_help: str) -> list[argparse._ArgumentGroup]:
    """torch.nn.MultiheadAttention's options, the call options and the weights; returns the groups."""
    mha = p.add_argument_group("torch.nn.MultiheadAttention options")
    mha.add_argument("--embed-dim", type=int, default=None, help=embed_dim_help)
    mha.add_argument("--num-heads", type=int, default=None, help=embed_dim_help)
    mha.add_argument("--kdim", type=int, default=None, help="key width (default: embed-dim)")
    mha.add_argument("--vdim", type=int, default=None, help="value width (default: embed-dim)")
    mha.add_argument("--batch-first", action="store_true", help="inputs and outputs are (batch, seq, feature)")
    mha.add_argument("--no-bias", dest="bias", action="store_false", help="bias=False")
    mha.add_argument("--add-bias-kv", action="store_true")
    mha.add_argument("--add-zero-attn", action="store_true")
    mha.add_argument("--dropout", type=float, default=0.0, help="recorded in the manifest; never applied (inference)")
    call = p.add_argument_group("call options, fixed at compile time")
    call.add_argument("--self-attention", action="store_true", help="key and value are the query: one input")
    call.add_argument("--key-padding-mask", choices=("bool", "float"), default=None)
    call.add_argument("--attn-mask", choices=("bool", "float"), default=None)
    call.add_argument("--attn-mask-3d", action="store_true", help="attn_mask is (batch*num_heads, tgt_len, src_len)")
    call.add_argument("--causal", action="store_true", help="built-in causal mask (no attn_mask input needed)")
    call.add_argument("--need-weights", action="store_true", help="also output attn_output_weights")
    call.add_argument("--no-average-attn-weights", dest="average_attn_weights", action="store_false",
                      help="per-head weights (batch, num_heads, tgt_len, src_len)")
    w = p.add_argument_group("weights")
    w.add_argument("--weights", default=None, help="state_dict file: .safetensors, .npz or .pt")
    w.add_argument("--seed", type=int, default=0, help="seed of the random initialisation when --weights is absent")
    return [mha, call, w]


def given_spec_flags(args: argparse.Namespace, groups: list[argparse._ArgumentGroup]) -> list[str]:
    """The spec flags set to something other than their default, spelled as on the command line."""
    return [f"--{a.dest.replace('_', '-')}" for g in groups for a in g._group_actions
            if getattr(args, a.dest) != a.default]


def spec_from_args(args: argparse.Namespace) -> AttentionSpec:
    return AttentionSpec(
        embed_dim=args.embed_dim, num_heads=args.num_heads, dropout=args.dropout, bias=args.bias,
        add_bias_kv=args.add_bias_kv, add_zero_attn=args.add_zero_attn, kdim=args.kdim, vdim=args.vdim,
        batch_first=args.batch_first, self_attention=args.self_attention, key_padding_mask=args.key_padding_mask,
        attn_mask=args.attn_mask, attn_mask_3d=args.attn_mask_3d, is_causal=args.causal,
        need_weights=args.need_weights, average_attn_weights=args.average_attn_weights,
    )
