"""What a live torch module may hold for its spec to describe it: every part is read for its own
settings, and a part the spec cannot express is refused in one sentence naming it, never compiled
as something else (a norm2 with an eps of its own, a self_attn whose forward is its own).

torch is imported by the caller that holds the module; these checks look at the module's class and
attributes only.
"""

from __future__ import annotations

from typing import Any

from graphs.spec import AttentionSpec, SpecError

# the methods of torch's layers their forward runs; a subclass that replaces one computes
# something else
_LAYER_METHODS = ("forward", "_sa_block", "_mha_block", "_ff_block")


def own_methods(module: Any, base: type) -> list[str]:
    """The methods a subclass of ``base`` replaces among those ``base``'s forward runs."""
    kind = type(module)
    return [
        m for m in _LAYER_METHODS if hasattr(base, m) and getattr(kind, m) is not getattr(base, m)
    ]


def check_attention_module(module: Any, part: str = "") -> None:
    """SpecError unless ``module`` computes what torch.nn.MultiheadAttention computes, on real
    weights."""
    import torch

    where = f"the layer's {part}" if part else "the module"
    if not isinstance(module, torch.nn.MultiheadAttention):
        raise SpecError(
            f"{where} is a {type(module).__name__}, expected a torch.nn.MultiheadAttention"
        )
    _check_own(module, torch.nn.MultiheadAttention, where)


def _check_own(module: Any, base: type, where: str) -> None:
    """SpecError where ``module`` replaces a method ``base``'s forward runs, or has no values."""
    if replaced := own_methods(module, base):
        raise SpecError(
            f"{where} is {type(module).__name__}, a subclass of torch.nn.{base.__name__} with a "
            f"{replaced[0]} of its own, which no spec describes; export it with torch.onnx.export "
            "and compile that with --onnx"
        )
    if any(p.is_meta for p in module.parameters()):
        raise SpecError(
            f"{where} holds its weights on the meta device, which has no values; load them first "
            "(.to_empty(device='cpu'), then load_state_dict)"
        )


def check_block_parts(layer: Any) -> None:
    """SpecError naming the first part of a TransformerEncoderLayer or DecoderLayer that a block
    spec (one layer_norm_eps, one bias setting as linear1 has it, torch's own sub-modules) cannot
    express."""
    import torch

    encoder = isinstance(layer, torch.nn.TransformerEncoderLayer)
    base = torch.nn.TransformerEncoderLayer if encoder else torch.nn.TransformerDecoderLayer
    _check_own(layer, base, "the layer")
    attentions = ["self_attn"] if encoder else ["self_attn", "multihead_attn"]
    norms = ["norm1", "norm2"] if encoder else ["norm1", "norm2", "norm3"]
    _check_part(layer, "linear1", torch.nn.Linear, None)
    bias = layer.linear1.bias is not None
    for name in attentions:
        _check_block_attention(layer, name, bias)
    _check_part(layer, "linear2", torch.nn.Linear, bias)
    for name in norms:
        _check_part(layer, name, torch.nn.LayerNorm, None)
        norm = getattr(layer, name)
        if norm.weight is None:
            raise SpecError(
                f"the layer's {name} has no weight (elementwise_affine=False), which the block "
                "spec's LayerNormalization always applies"
            )
        _check_part(layer, name, torch.nn.LayerNorm, bias)
        if norm.eps != layer.norm1.eps:
            raise SpecError(
                f"the layer's {name}.eps ({norm.eps}) differs from norm1.eps ({layer.norm1.eps}); "
                "a block spec has one layer_norm_eps for every norm, as torch's constructor sets them"
            )


def _check_part(layer: Any, name: str, kind: type, bias: bool | None) -> None:
    """``bias``: whether the part must have one (None: either)."""
    part = getattr(layer, name, None)
    if not isinstance(part, kind) or own_methods(part, kind):
        raise SpecError(
            f"the layer's {name} is {type(part).__name__}, expected torch.nn.{kind.__name__} "
            "(a subclass with a forward of its own computes something no spec describes)"
        )
    if bias is not None and (part.bias is not None) != bias:
        has = "has a bias" if part.bias is not None else "has no bias"
        raise SpecError(
            f"the layer's {name} {has} but linear1 {'has' if bias else 'has no'} bias; a block "
            "spec's bias covers every linear, norm and attention projection, as torch's bias= sets them"
        )


def _check_block_attention(layer: Any, name: str, bias: bool) -> None:
    attention = getattr(layer, name)
    check_attention_module(attention, name)
    first = layer.self_attn
    differs = [
        (option, getattr(attention, option), getattr(first, option))
        for option in ("embed_dim", "num_heads", "batch_first")
        if getattr(attention, option) != getattr(first, option)
    ]
    if differs:
        option, value, expected = differs[0]
        raise SpecError(
            f"the layer's {name}.{option} ({value}) differs from self_attn.{option} ({expected}); "
            "a block spec has one"
        )
    extra = ["add_zero_attn=True"] * bool(attention.add_zero_attn)
    extra += ["add_bias_kv=True"] * (attention.bias_k is not None)
    if extra or attention.kdim != attention.embed_dim or attention.vdim != attention.embed_dim:
        what = extra[0] if extra else f"kdim={attention.kdim}, vdim={attention.vdim}"
        raise SpecError(
            f"the layer's {name} has {what}, which torch's layers never set and a block spec "
            "cannot express"
        )
    if (attention.in_proj_bias is not None) != bias:
        raise SpecError(
            f"the layer's {name} {'has' if attention.in_proj_bias is not None else 'has no'} "
            f"projection bias but linear1 {'has' if bias else 'has no'} bias; a block spec's bias "
            "covers every linear, norm and attention projection, as torch's bias= sets them"
        )


def spec_from_module(module: Any, **call_options: Any) -> AttentionSpec:
    """The spec of a live torch.nn.MultiheadAttention, plus the call options to compile it with."""
    check_attention_module(module)
    return AttentionSpec(
        embed_dim=module.embed_dim,
        num_heads=module.num_heads,
        dropout=float(module.dropout),
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=bool(module.add_zero_attn),
        kdim=None if module.kdim == module.embed_dim else module.kdim,
        vdim=None if module.vdim == module.embed_dim else module.vdim,
        batch_first=bool(module.batch_first),
        **call_options,
    )
