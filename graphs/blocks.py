"""Transformer blocks around the attention: torch.nn.TransformerEncoderLayer and
TransformerDecoderLayer, as specs, weights (their state_dict key names) and canonical graphs.

A block's attention is built by the same code as bare attention (graphs/mha.py), under the
scope of its torch sub-module (``self_attn``, ``multihead_attn``), so every fusion that finds
attention in a bare graph finds it inside a block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from graphs.builder import GraphBuilder
from graphs.mha import add_attention, linear, to_batch_first
from graphs.spec import (
    BATCH,
    PAST_LEN,
    SRC_LEN,
    TGT_LEN,
    TOTAL_LEN,
    AttentionSpec,
    MaskKind,
    Spec,
    SpecError,
    TensorSig,
    cache_sigs,
    mask_dtype,
)
from graphs.weights import (
    AttentionWeights,
    Weights,
    expected_shapes,
)

BLOCKS = ("mha", "encoder", "decoder")
ACTIVATIONS = ("relu", "gelu")


@dataclass(frozen=True)
class BlockSpec(Spec):
    """The options of TransformerEncoderLayer / TransformerDecoderLayer (torch's defaults; d_model
    and nhead under the attention's names) and which masks the graph takes as inputs."""

    KIND: ClassVar[str] = "block"
    OPTIONS: ClassVar[str] = "torch.nn.Transformer*Layer"

    block: Literal["encoder", "decoder"]
    embed_dim: int
    num_heads: int
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    batch_first: bool = False
    norm_first: bool = False
    bias: bool = True
    # Mask inputs: the self-attention's (src_* or tgt_*), and the decoder's memory masks.
    key_padding_mask: MaskKind = None
    attn_mask: MaskKind = None
    is_causal: bool = False
    memory_key_padding_mask: MaskKind = None
    memory_mask: MaskKind = None
    # Autoregressive decoding (decoder only): the self-attention's past/present keys and values.
    kv_cache: bool = False

    def __post_init__(self) -> None:
        if self.block not in ("encoder", "decoder"):
            raise SpecError(f"block must be 'encoder' or 'decoder', got {self.block!r}")
        if self.activation not in ACTIVATIONS:
            raise SpecError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if (
            isinstance(self.dim_feedforward, bool)
            or not isinstance(self.dim_feedforward, int)
            or self.dim_feedforward <= 0
        ):
            raise SpecError(
                f"dim_feedforward must be a positive integer, got {self.dim_feedforward!r}"
            )
        if not (
            isinstance(self.layer_norm_eps, (int, float))
            and math.isfinite(self.layer_norm_eps)
            and self.layer_norm_eps > 0
        ):
            raise SpecError(
                f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}"
            )
        if self.block == "encoder":
            for name in ("memory_key_padding_mask", "memory_mask"):
                if getattr(self, name) is not None:
                    raise SpecError(
                        f"{name} belongs to the decoder block; the encoder has no memory"
                    )
        if self.kv_cache and self.block != "decoder":
            raise SpecError(
                "kv_cache belongs to the decoder block: an encoder attends over its whole input"
            )
        self.self_attention_spec()  # validates embed_dim, num_heads, masks, dropout and kv_cache
        self.cross_attention_spec()

    # The attention inside, always batch-first: the block transposes at its edges -----------------

    def self_attention_spec(self) -> AttentionSpec:
        return self._attention(
            self_attention=True,
            key_padding_mask=self.key_padding_mask,
            attn_mask=self.attn_mask,
            is_causal=self.is_causal,
            kv_cache=self.kv_cache,
        )

    def cross_attention_spec(self) -> AttentionSpec:
        return self._attention(
            key_padding_mask=self.memory_key_padding_mask, attn_mask=self.memory_mask
        )

    def _attention(self, **call: Any) -> AttentionSpec:
        return AttentionSpec(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.bias,
            batch_first=True,
            **call,
        )

    @property
    def prefix(self) -> str:
        return "src" if self.block == "encoder" else "tgt"

    # Graph signature (docs/ARCHITECTURE.md contract 2: the names of the layers' forward arguments)

    def inputs(self) -> list[TensorSig]:
        p = self.prefix
        sigs = [self.seq_sig(p, TGT_LEN, self.embed_dim)]
        if self.block == "decoder":
            sigs.append(self.seq_sig("memory", SRC_LEN, self.embed_dim))
        if self.kv_cache:
            sigs += cache_sigs("past", self.self_attention_spec().cache_shape(PAST_LEN))
        if self.attn_mask:
            sigs.append(TensorSig(f"{p}_mask", mask_dtype(self.attn_mask), (TGT_LEN, TGT_LEN)))
        if self.memory_mask:
            sigs.append(TensorSig("memory_mask", mask_dtype(self.memory_mask), (TGT_LEN, SRC_LEN)))
        if self.key_padding_mask:
            keys = TOTAL_LEN if self.kv_cache else TGT_LEN
            sigs.append(
                TensorSig(f"{p}_key_padding_mask", mask_dtype(self.key_padding_mask), (BATCH, keys))
            )
        if self.memory_key_padding_mask:
            sigs.append(
                TensorSig(
                    "memory_key_padding_mask",
                    mask_dtype(self.memory_key_padding_mask),
                    (BATCH, SRC_LEN),
                )
            )
        return sigs

    def outputs(self) -> list[TensorSig]:
        sigs = [self.seq_sig("output", TGT_LEN, self.embed_dim)]
        if self.kv_cache:
            sigs += cache_sigs("present", self.self_attention_spec().cache_shape(TOTAL_LEN))
        return sigs


def block_spec_from_module(layer: Any, **masks: Any) -> BlockSpec:
    """The spec of a live torch.nn.TransformerEncoderLayer or TransformerDecoderLayer, plus the
    mask inputs (``key_padding_mask="bool"``, ``is_causal=True``...) to compile it with."""
    import torch

    if not isinstance(layer, (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)):
        raise SpecError(
            f"expected a TransformerEncoderLayer or TransformerDecoderLayer, got {type(layer).__name__}"
        )
    kind = (
        "TransformerEncoderLayer"
        if isinstance(layer, torch.nn.TransformerEncoderLayer)
        else "TransformerDecoderLayer"
    )
    from graphs.live_modules import check_block_parts

    check_block_parts(layer)
    activation = layer.activation  # F.relu or F.gelu, or a module: nn.ReLU(), nn.GELU()
    name = getattr(activation, "__name__", None) or type(activation).__name__.lower()
    if name not in ACTIVATIONS or getattr(activation, "approximate", "none") != "none":
        raise SpecError(
            f"the layer's activation is {activation!r}; the blocks take relu or gelu (torch's "
            "erf form)"
        )
    attention = layer.self_attn
    return BlockSpec(
        block="encoder" if kind == "TransformerEncoderLayer" else "decoder",
        embed_dim=attention.embed_dim,
        num_heads=attention.num_heads,
        dim_feedforward=layer.linear1.out_features,
        dropout=float(getattr(layer.dropout, "p", 0.0)),  # recorded, never applied
        activation=name,
        layer_norm_eps=float(layer.norm1.eps),
        batch_first=bool(attention.batch_first),
        norm_first=bool(layer.norm_first),
        bias=layer.linear1.bias is not None,
        **masks,
    )


def block_shapes(spec: BlockSpec) -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes torch's layer has for this spec."""
    e, f = spec.embed_dim, spec.dim_feedforward
    shapes = {f"self_attn.{k}": s for k, s in expected_shapes(spec.self_attention_spec()).items()}
    if spec.block == "decoder":
        shapes |= {
            f"multihead_attn.{k}": s
            for k, s in expected_shapes(spec.cross_attention_spec()).items()
        }
    linears = {"linear1": (f, e), "linear2": (e, f)}
    for name, shape in linears.items():
        shapes[f"{name}.weight"] = shape
        if spec.bias:
            shapes[f"{name}.bias"] = (shape[0],)
    for i in range(1, 4 if spec.block == "decoder" else 3):
        shapes[f"norm{i}.weight"] = (e,)
        if spec.bias:
            shapes[f"norm{i}.bias"] = (e,)
    return shapes


BLOCK_HINT = "check --block, --dim-feedforward and bias"


def _owner(spec: BlockSpec) -> str:
    return (
        "torch.nn.TransformerEncoderLayer"
        if spec.block == "encoder"
        else "torch.nn.TransformerDecoderLayer"
    )


@dataclass(frozen=True)
class BlockWeights(Weights):
    """The weights of a torch.nn.TransformerEncoderLayer or TransformerDecoderLayer."""

    @classmethod
    def layout(cls, spec: BlockSpec) -> tuple[dict[str, tuple[int, ...]], str, str]:
        return block_shapes(spec), _owner(spec), BLOCK_HINT

    def attention(self, module: str) -> AttentionWeights:
        prefix = f"{module}."
        return AttentionWeights(
            {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)},
            {"kind": "block", "module": module},
        )


def build_block(spec: BlockSpec, weights: BlockWeights) -> onnx.ModelProto:
    g = GraphBuilder()
    x = to_batch_first(g, spec, spec.prefix)
    for i, (norm, sublayer) in enumerate(_sublayers(g, spec, weights)):
        with g.scope(f"residual{i + 1}"):
            if spec.norm_first:  # x + f(norm(x))
                x = g.op("Add", [x, sublayer(_layer_norm(g, spec, weights, norm, x))], "Add")
            else:  # norm(x + f(x))
                x = _layer_norm(g, spec, weights, norm, g.op("Add", [x, sublayer(x)], "Add"))
    if spec.batch_first:
        g.op("Identity", [x], "output/Identity", outputs=["output"])
    else:
        g.op("Transpose", [x], "output/to_seq_first", outputs=["output"], perm=[1, 0, 2])
    name = "transformer_encoder_layer" if spec.block == "encoder" else "transformer_decoder_layer"
    return g.model(
        name,
        spec.inputs(),
        spec.outputs(),
        doc=f"torch.nn.Transformer{spec.block.capitalize()}Layer, canonical form",
    )


def _sublayers(
    g: GraphBuilder, spec: BlockSpec, weights: BlockWeights
) -> list[tuple[str, Callable[[str], str]]]:
    """(its LayerNorm, the sublayer) in order: self-attention, the decoder's cross-attention over
    the memory, the feed-forward."""
    p = spec.prefix
    memory = to_batch_first(g, spec, "memory") if spec.block == "decoder" else None

    def self_attention(h: str) -> str:
        with g.scope("self_attn"):
            return add_attention(
                g,
                spec.self_attention_spec(),
                weights.attention("self_attn"),
                h,
                h,
                h,
                key_padding_mask=f"{p}_key_padding_mask",
                attn_mask=f"{p}_mask",
            )

    def cross_attention(h: str) -> str:
        with g.scope("multihead_attn"):
            return add_attention(
                g,
                spec.cross_attention_spec(),
                weights.attention("multihead_attn"),
                h,
                memory,
                memory,
                key_padding_mask="memory_key_padding_mask",
                attn_mask="memory_mask",
            )

    sublayers = [("norm1", self_attention)]
    if spec.block == "decoder":
        sublayers.append(("norm2", cross_attention))
    sublayers.append((f"norm{len(sublayers) + 1}", lambda h: _feed_forward(g, spec, weights, h)))
    return sublayers


def _layer_norm(g: GraphBuilder, spec: BlockSpec, weights: BlockWeights, name: str, x: str) -> str:
    scale = g.const(f"{name}/weight", weights.tensors[f"{name}.weight"])
    inputs = [x, scale] + (
        [g.const(f"{name}/bias", weights.tensors[f"{name}.bias"])] if spec.bias else []
    )
    return g.op(
        "LayerNormalization",
        inputs,
        f"{name}/LayerNormalization",
        axis=-1,
        epsilon=float(spec.layer_norm_eps),
    )


def _feed_forward(g: GraphBuilder, spec: BlockSpec, weights: BlockWeights, x: str) -> str:
    """linear2(activation(linear1(x))); GELU is torch's exact (erf) form, 0.5 x (1 + erf(x / sqrt 2))."""
    t = weights.tensors
    h = linear(g, "linear1", x, t["linear1.weight"], t.get("linear1.bias"))
    if spec.activation == "relu":
        h = g.op("Relu", [h], "activation/Relu")
    else:
        erf = g.op(
            "Erf",
            [
                g.op(
                    "Div",
                    [h, g.const("activation/sqrt2", np.float32(math.sqrt(2.0)))],
                    "activation/Div",
                )
            ],
            "activation/Erf",
        )
        half = g.op("Mul", [h, g.const("activation/half", np.float32(0.5))], "activation/Mul_half")
        h = g.op(
            "Mul",
            [
                half,
                g.op(
                    "Add", [erf, g.const("activation/one", np.float32(1.0))], "activation/Add_one"
                ),
            ],
            "activation/Mul",
        )
    return linear(g, "linear2", h, t["linear2.weight"], t.get("linear2.bias"))
