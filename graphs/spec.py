"""The attention spec: torch.nn.MultiheadAttention's options plus the call options fixed at compile time.

Names and defaults follow torch so that a spec reads like the module it describes. One deliberate
difference: ``need_weights`` defaults to False (a deployment graph rarely wants the weights),
where torch's forward defaults it to True.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

MaskKind = Literal["bool", "float"] | None
MASK_KINDS = ("bool", "float")

# Symbolic axis names of docs/ARCHITECTURE.md contract 2; past_len is a KV cache's length, and may be 0.
BATCH, TGT_LEN, SRC_LEN, PAST_LEN = "batch", "tgt_len", "src_len", "past_len"
TOTAL_LEN = f"{PAST_LEN}+{TGT_LEN}"  # the keys a cached step attends to: the past, then this step's
# The largest shape a graph was compiled for (compile.py --max-batch/--max-len), kept in the model's
# metadata_props so that every Session over it refuses larger inputs: batch, and every sequence axis.
MAX_BATCH_KEY, MAX_LEN_KEY = "attention_compiler.max_batch", "attention_compiler.max_len"
LENGTH_AXES = (TGT_LEN, SRC_LEN, PAST_LEN, TOTAL_LEN)


class SpecError(ValueError):
    """A spec option breaks a rule; the message names the option and the rule."""


@dataclass(frozen=True)
class TensorSig:
    """Name, element type and shape (ints or symbolic names) of one graph input or output."""

    name: str
    dtype: Literal["float32", "bool"]
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class Spec:
    """What the attention and block specs share: their options as a dict and back, and the
    signatures of their sequences and KV caches."""

    KIND: ClassVar[str]  # "spec", "block": for the unknown-option message
    OPTIONS: ClassVar[str]  # whose options they are
    batch_first: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> Any:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        unknown = sorted(set(options) - {f.name for f in fields})
        if unknown:
            raise SpecError(
                f"unknown {cls.KIND} option {unknown[0]!r}; the options are those of {cls.OPTIONS}"
            )
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in options]
        if missing:
            raise SpecError(f"{missing[0]} is required")
        return cls(**options)

    def seq_sig(self, name: str, length: str, width: int) -> TensorSig:
        shape = (BATCH, length, width) if self.batch_first else (length, BATCH, width)
        return TensorSig(name, "float32", shape)


def cache_sigs(kind: str, shape: tuple[int | str, ...]) -> list[TensorSig]:
    """past_key and past_value, or present_key and present_value, of one shape."""
    return [TensorSig(f"{kind}_{name}", "float32", shape) for name in ("key", "value")]


@dataclass(frozen=True)
class AttentionSpec(Spec):
    KIND: ClassVar[str] = "spec"
    OPTIONS: ClassVar[str] = "torch.nn.MultiheadAttention and its call"

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    kdim: int | None = None
    vdim: int | None = None
    batch_first: bool = False
    # Call options, fixed at compile time.
    self_attention: bool = False
    key_padding_mask: MaskKind = None
    attn_mask: MaskKind = None
    attn_mask_3d: bool = False
    is_causal: bool = False
    need_weights: bool = False
    average_attn_weights: bool = True
    # Autoregressive decoding: past_key/past_value in, present_key/present_value out.
    kv_cache: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    # Derived quantities ---------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def k_dim(self) -> int:
        return self.embed_dim if self.kdim is None else self.kdim

    @property
    def v_dim(self) -> int:
        return self.embed_dim if self.vdim is None else self.vdim

    @property
    def packed_in_proj(self) -> bool:
        """torch keeps one ``in_proj_weight`` exactly when key and value widths equal embed_dim."""
        return self.k_dim == self.embed_dim and self.v_dim == self.embed_dim

    @property
    def extra_keys(self) -> int:
        """Key columns torch appends after the real keys: one for bias_k, one for the zero key."""
        return int(self.add_bias_kv) + int(self.add_zero_attn)

    @property
    def has_mask_input(self) -> bool:
        return self.key_padding_mask is not None or self.attn_mask is not None

    @property
    def src_axis(self) -> str:
        if self.kv_cache:
            return TOTAL_LEN
        return TGT_LEN if self.self_attention else SRC_LEN

    def cache_shape(self, length: str) -> tuple[int | str, ...]:
        """(batch, num_heads, length, head_dim): ONNX Runtime's and the Attention op's past/present layout."""
        return (BATCH, self.num_heads, length, self.head_dim)

    # Graph signature (docs/ARCHITECTURE.md contract 2) ------------------------------------

    def inputs(self) -> list[TensorSig]:
        sigs = [self.seq_sig("query", TGT_LEN, self.embed_dim)]
        if not self.self_attention:
            sigs.append(self.seq_sig("key", SRC_LEN, self.k_dim))
            sigs.append(self.seq_sig("value", SRC_LEN, self.v_dim))
        if self.kv_cache:
            sigs += cache_sigs("past", self.cache_shape(PAST_LEN))
        if self.key_padding_mask is not None:
            sigs.append(
                TensorSig(
                    "key_padding_mask", mask_dtype(self.key_padding_mask), (BATCH, self.src_axis)
                )
            )
        if self.attn_mask is not None:
            shape: tuple[int | str, ...] = (TGT_LEN, self.src_axis)
            if self.attn_mask_3d:
                shape = (f"{BATCH}*{self.num_heads}", *shape)
            sigs.append(TensorSig("attn_mask", mask_dtype(self.attn_mask), shape))
        return sigs

    def outputs(self) -> list[TensorSig]:
        sigs = [self.seq_sig("attn_output", TGT_LEN, self.embed_dim)]
        if self.need_weights:
            keys = self.src_axis if not self.extra_keys else f"{self.src_axis}+{self.extra_keys}"
            shape: tuple[int | str, ...] = (BATCH, TGT_LEN, keys)
            if not self.average_attn_weights:
                shape = (BATCH, self.num_heads, TGT_LEN, keys)
            sigs.append(TensorSig("attn_output_weights", "float32", shape))
        if self.kv_cache:
            sigs += cache_sigs("present", self.cache_shape(TOTAL_LEN))
        return sigs


def mask_dtype(kind: str) -> Literal["float32", "bool"]:
    return "bool" if kind == "bool" else "float32"


def _require_int(spec: AttentionSpec, name: str, *, optional: bool = False) -> None:
    value = getattr(spec, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{name} must be a positive integer, got {value!r}")


def _validate(spec: AttentionSpec) -> None:
    _require_int(spec, "embed_dim")
    _require_int(spec, "num_heads")
    _require_int(spec, "kdim", optional=True)
    _require_int(spec, "vdim", optional=True)
    if spec.embed_dim % spec.num_heads:
        raise SpecError(
            f"embed_dim ({spec.embed_dim}) must be divisible by num_heads ({spec.num_heads})"
        )
    for name in (
        "bias",
        "add_bias_kv",
        "add_zero_attn",
        "batch_first",
        "self_attention",
        "attn_mask_3d",
        "is_causal",
        "need_weights",
        "average_attn_weights",
        "kv_cache",
    ):
        if not isinstance(getattr(spec, name), bool):
            raise SpecError(f"{name} must be True or False, got {getattr(spec, name)!r}")
    if (
        isinstance(spec.dropout, bool)
        or not isinstance(spec.dropout, (int, float))
        or not 0.0 <= spec.dropout <= 1.0
    ):
        raise SpecError(f"dropout must be a probability between 0 and 1, got {spec.dropout!r}")
    for name in ("key_padding_mask", "attn_mask"):
        kind = getattr(spec, name)
        if kind is not None and kind not in MASK_KINDS:
            raise SpecError(f"{name} must be 'bool', 'float' or None, got {kind!r}")
    if spec.attn_mask_3d and spec.attn_mask is None:
        raise SpecError(
            "attn_mask_3d needs an attn_mask input (set attn_mask to 'bool' or 'float')"
        )
    if spec.self_attention:
        for name in ("kdim", "vdim"):
            value = getattr(spec, name)
            if value is not None and value != spec.embed_dim:
                raise SpecError(
                    f"self_attention uses the query as key and value, so {name} ({value}) must equal embed_dim ({spec.embed_dim}) or be unset"
                )
    if not spec.average_attn_weights and not spec.need_weights:
        raise SpecError("average_attn_weights=False only applies with need_weights=True")
    if spec.kv_cache:
        _validate_cache(spec)


def _validate_cache(spec: AttentionSpec) -> None:
    """A KV cache carries causal self-attention forward, and nothing appended after the sequence."""
    if not (spec.self_attention and spec.is_causal):
        raise SpecError(
            "kv_cache needs self_attention=True and is_causal=True: a cache carries one sequence's keys "
            "forward, and only causal attention leaves earlier outputs unchanged by later tokens"
        )
    for name, why in (
        ("add_bias_kv", "torch appends bias_k after the whole sequence"),
        ("add_zero_attn", "torch appends the zero key after the whole sequence"),
        (
            "attn_mask",
            "the causal mask is built in and key_padding_mask covers past and new keys",
        ),
        ("need_weights", "a cached step returns attn_output and the cache only"),
    ):
        if getattr(spec, name):
            raise SpecError(f"kv_cache does not combine with {name} ({why})")
