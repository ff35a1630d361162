"""The spec flags that compile.py and bench.py share, so that one spelling means one spec in both."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from graphs import AttentionSpec
from graphs.blocks import ACTIVATIONS, BLOCKS, BlockSpec

T = TypeVar("T")


def add_spec_flags(
    p: argparse.ArgumentParser, *, embed_dim_help: str
) -> list[argparse._ArgumentGroup]:
    """torch.nn.MultiheadAttention's options, the call options and the weights; returns the groups."""
    mha = p.add_argument_group("torch.nn.MultiheadAttention options")
    mha.add_argument("--embed-dim", type=int, default=None, help=embed_dim_help)
    mha.add_argument("--num-heads", type=int, default=None, help=embed_dim_help)
    mha.add_argument("--kdim", type=int, default=None, help="key width (default: embed-dim)")
    mha.add_argument("--vdim", type=int, default=None, help="value width (default: embed-dim)")
    mha.add_argument(
        "--batch-first", action="store_true", help="inputs and outputs are (batch, seq, feature)"
    )
    mha.add_argument("--no-bias", dest="bias", action="store_false", help="bias=False")
    mha.add_argument("--add-bias-kv", action="store_true")
    mha.add_argument("--add-zero-attn", action="store_true")
    mha.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="recorded in the manifest; never applied (inference)",
    )
    call = p.add_argument_group("call options, fixed at compile time")
    _add_call_flags(call)
    w = p.add_argument_group("weights")
    w.add_argument("--weights", default=None, help="state_dict file: .safetensors, .npz or .pt")
    w.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of the random initialisation when --weights is absent",
    )
    return [mha, call, w]


def _add_call_flags(call: argparse._ArgumentGroup) -> None:
    call.add_argument(
        "--self-attention", action="store_true", help="key and value are the query: one input"
    )
    call.add_argument("--key-padding-mask", choices=("bool", "float"), default=None)
    call.add_argument("--attn-mask", choices=("bool", "float"), default=None)
    call.add_argument(
        "--attn-mask-3d",
        action="store_true",
        help="attn_mask is (batch*num_heads, tgt_len, src_len)",
    )
    call.add_argument(
        "--causal", action="store_true", help="built-in causal mask (no attn_mask input needed)"
    )
    call.add_argument("--need-weights", action="store_true", help="also output attn_output_weights")
    call.add_argument(
        "--no-average-attn-weights",
        dest="average_attn_weights",
        action="store_false",
        help="per-head weights (batch, num_heads, tgt_len, src_len)",
    )
    call.add_argument(
        "--kv-cache",
        action="store_true",
        help="autoregressive decoding (needs --causal and --self-attention): inputs past_key/past_value, "
        "outputs present_key/present_value, (batch, num_heads, length, head_dim)",
    )


def seed(text: str) -> int:
    """A seed NumPy takes: a whole number from 0 to 2**64-1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 0 to 2**64-1, got {text[:40]!r}"
        )
    return value


def given_spec_flags(args: argparse.Namespace, groups: list[argparse._ArgumentGroup]) -> list[str]:
    """The spec flags set to something other than their default, spelled as on the command line."""
    return [
        f"--{a.dest.replace('_', '-')}"
        for g in groups
        for a in g._group_actions
        if getattr(args, a.dest) != a.default
    ]


def from_args(cls: type[T], args: argparse.Namespace, **flags: str) -> T:
    """A dataclass (a spec, compile's settings) from the flags of its fields' names; ``flags``
    names the flag of a field whose flag has another name (is_causal: --causal)."""
    return cls(
        **{f.name: getattr(args, flags.get(f.name, f.name)) for f in dataclasses.fields(cls)}
    )


def spec_from_args(args: argparse.Namespace) -> AttentionSpec:
    return from_args(AttentionSpec, args, is_causal="causal")


# Blocks: torch.nn.TransformerEncoderLayer / TransformerDecoderLayer around the attention ------------

MHA_ONLY = (
    "kdim",
    "vdim",
    "add_bias_kv",
    "add_zero_attn",
    "self_attention",
    "attn_mask_3d",
    "need_weights",
    "average_attn_weights",
)


def add_block_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    b = p.add_argument_group("blocks (torch.nn.TransformerEncoderLayer / TransformerDecoderLayer)")
    b.add_argument(
        "--block",
        choices=BLOCKS,
        default="mha",
        help="mha: bare attention; encoder / decoder: the layer, its masks from --key-padding-mask, "
        "--attn-mask and --causal (src_* or tgt_*)",
    )
    b.add_argument("--dim-feedforward", type=int, default=2048)
    b.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    b.add_argument("--layer-norm-eps", type=float, default=1e-5)
    b.add_argument(
        "--norm-first", action="store_true", help="pre-norm: x + f(norm(x)); default post-norm"
    )
    b.add_argument(
        "--memory-key-padding-mask", choices=("bool", "float"), default=None, help="decoder only"
    )
    b.add_argument("--memory-mask", choices=("bool", "float"), default=None, help="decoder only")
    return b


def check_block_flags(
    args: argparse.Namespace,
    block_group: argparse._ArgumentGroup,
    spec_groups: list[argparse._ArgumentGroup],
) -> str | None:
    """The reason the flags do not fit --block, or None."""
    if args.block == "mha":
        given = [f for f in given_spec_flags(args, [block_group]) if f != "--block"]
        verb = "describes" if len(given) == 1 else "describe"
        return (
            f"{', '.join(given)} {verb} a block; add --block encoder or decoder" if given else None
        )
    wrong = [
        f
        for f in given_spec_flags(args, spec_groups)
        if f.lstrip("-").replace("-", "_") in MHA_ONLY
    ]
    if wrong:
        verb = "applies" if len(wrong) == 1 else "apply"
        return f"{', '.join(wrong)} {verb} to bare attention only (--block mha), not to --block {args.block}"
    return None


def block_spec_from_args(args: argparse.Namespace) -> BlockSpec:
    return from_args(BlockSpec, args, is_causal="causal")
