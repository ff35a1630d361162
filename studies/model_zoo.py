"""The exported models compile.py --onnx is measured on (studies/corpus.py) and tested on
(tests/test_real_models.py): what users bring, from both torch exporters.

Hugging Face transformers models (the optional extra ``transformers``) are built from small configs
with random weights, never downloaded (``HF_FAMILIES``: encoders, decoders with grouped-query,
multi-query, sliding-window and ALiBi attention, encoder-decoders, vision and audio encoders), each
with every ``attn_implementation`` transformers has for it; torch's own nn.TransformerEncoder (a key
padding mask), nn.Transformer (a causal target mask) and a DETR-style head on nn.MultiheadAttention.
Both exporters; the legacy one at the opset an entry names (18 unless told). timm and torchvision
are not in it: PyPI's torchvision does not import beside the CPU build of torch this project pins.
Exports are cached on disk under a key of the model, its config and the tool versions. Needs torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TORCH_FAMILIES = ("torch-encoder", "torch-transformer", "detr")  # on nn.MultiheadAttention
IMPLEMENTATIONS = ("sdpa", "eager")
EXPORTERS = ("dynamo", "legacy")


class ExportError(RuntimeError):
    """torch's exporter could not export the entry."""


@dataclass(frozen=True)
class Size:
    """A model's width: hidden size, heads, layers, and the image side for ViT (patches of 16)."""

    hidden: int = 256
    heads: int = 4
    layers: int = 2
    image: int = 64

    def to_json(self) -> dict[str, int]:
        return {
            "hidden": self.hidden,
            "heads": self.heads,
            "layers": self.layers,
            "image": self.image,
        }


@dataclass(frozen=True)
class Entry:
    family: str
    implementation: str | None  # transformers' attn_implementation; None for torch's modules
    exporter: str
    size: Size = field(default_factory=Size)
    opset: int = 18  # the legacy exporter also writes 14 and 17, opsets users' exports carry
    past: bool = False  # a decoder with its KV cache as inputs and outputs (CAUSAL_LMS)

    @property
    def name(self) -> str:
        opset = f"opset{self.opset}" if self.opset != 18 else None
        past = "past" if self.past else None
        parts = (self.family, self.implementation, self.exporter, opset, past)
        return "-".join(p for p in parts if p)

    @property
    def fixed_shapes(self) -> bool:
        """torch's legacy exporter fixes nn.MultiheadAttention's lengths at the traced ones: such an
        export is checked and timed at its example inputs."""
        return self.exporter == "legacy" and self.family in TORCH_FAMILIES

    @property
    def kind(self) -> str:
        """text, image, audio, past (a decoder with its cache), or the torch family's own name."""
        if self.past:
            return "past"
        return HF_FAMILIES[self.family].wrap if self.family in HF_FAMILIES else self.family


def entries(
    size: Size = Size(),
    families: tuple[str, ...] | None = None,
    legacy_opsets: tuple[int, ...] = (18,),
) -> Iterator[Entry]:
    """Every family in each implementation transformers has for it, by both exporters; the legacy
    one at each of ``legacy_opsets``."""
    for family in families or FAMILIES:
        implementations = HF_FAMILIES[family].implementations if family in HF_FAMILIES else (None,)
        for implementation in implementations:
            yield Entry(family, implementation, "dynamo", size)
            for opset in legacy_opsets:
                yield Entry(family, implementation, "legacy", size, opset)


def example_inputs(entry: Entry) -> dict[str, Any]:
    """The inputs the entry is exported with, as NumPy arrays by input name: token ids with the second
    sequence's first three tokens padded, or pixels, or sequences with the second's last four keys padded."""
    torch.manual_seed(1)
    s = entry.size
    if entry.past:
        return _past_inputs(entry)
    if entry.kind == "text":
        mask = torch.ones(2, 16, dtype=torch.int64)
        mask[1, :3] = 0
        inputs = {"input_ids": torch.randint(0, 1000, (2, 16)), "attention_mask": mask}
    elif entry.kind == "image":
        inputs = {"pixel_values": torch.randn(2, 3, s.image, s.image)}
    elif entry.kind == "audio":  # Whisper's encoder takes twice its max_source_positions frames
        inputs = {"input_features": torch.randn(2, 16, 32)}
    elif entry.kind == "detr":
        padding = torch.zeros(2, 16, dtype=torch.bool)
        padding[1, -4:] = True
        inputs = {"memory": torch.randn(2, 16, s.hidden), "memory_mask": padding}
    elif entry.family == "torch-encoder":
        padding = torch.zeros(2, 16, dtype=torch.bool)
        padding[1, -4:] = True
        inputs = {"src": torch.randn(2, 16, s.hidden), "src_key_padding_mask": padding}
    else:
        inputs = {"src": torch.randn(2, 16, s.hidden), "tgt": torch.randn(2, 12, s.hidden)}
    return {name: value.numpy() for name, value in inputs.items()}


_AXES = {
    "text": {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
    },
    "image": {"pixel_values": {0: "batch"}},
    "audio": {"input_features": {0: "batch"}},
    "detr": {"memory": {0: "batch", 1: "sequence"}, "memory_mask": {0: "batch", 1: "sequence"}},
    "torch-encoder": {
        "src": {0: "batch", 1: "sequence"},
        "src_key_padding_mask": {0: "batch", 1: "sequence"},
    },
    "torch-transformer": {"src": {0: "batch", 1: "sequence"}, "tgt": {0: "batch", 1: "target"}},
}


def _module(entry: Entry) -> Any:
    """The module to export, taking its inputs positionally."""
    torch.manual_seed(0)
    s = entry.size
    if entry.past:
        return _WithPast(_transformers_module(entry, CAUSAL_LMS[entry.family]))
    if entry.family in HF_FAMILIES:
        return _transformers_module(entry)
    if entry.family == "detr":
        return _DetrHead(s).eval()
    if entry.family == "torch-encoder":
        layer = torch.nn.TransformerEncoderLayer(s.hidden, s.heads, 2 * s.hidden, batch_first=True)
        return _Encoder(
            torch.nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
        ).eval()
    return _Transformer(
        torch.nn.Transformer(s.hidden, s.heads, s.layers, s.layers, 2 * s.hidden, batch_first=True)
    ).eval()


@dataclass(frozen=True)
class _Hf:
    """A transformers family: its model and config classes, the config at a size, and how it is
    called (``wrap``: the wrapper class, ``options``: what the model is built or called with)."""

    model: str
    config: str
    settings: Any  # Size -> config keyword arguments
    wrap: str = "text"
    built: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the model's constructor
    called: tuple[tuple[str, Any], ...] = ()  # keyword arguments of its call
    implementations: tuple[str, ...] = IMPLEMENTATIONS  # those transformers has for it


# decoders exported with their KV cache (Entry.past): the language-model class of each family
CAUSAL_LMS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt-neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
}


def _bert_like(s: Size) -> dict[str, Any]:
    return {
        "hidden_size": s.hidden,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "intermediate_size": 2 * s.hidden,
        "vocab_size": 1000,
    }


def _decoder(s: Size, kv_heads: int | None = None, **more: Any) -> dict[str, Any]:
    kv = {"num_key_value_heads": kv_heads} if kv_heads else {}
    return {**_bert_like(s), **kv, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **more}


def _seq2seq(s: Size) -> dict[str, Any]:
    """BART's and Whisper's widths: as many encoder as decoder layers and heads."""
    return {
        "d_model": s.hidden,
        **{f"{part}_layers": s.layers for part in ("encoder", "decoder")},
        **{f"{part}_attention_heads": s.heads for part in ("encoder", "decoder")},
        **{f"{part}_ffn_dim": 2 * s.hidden for part in ("encoder", "decoder")},
        "vocab_size": 1000,
    }


_NO_CACHE = (("use_cache", False),)
_EAGER = ("eager",)  # transformers has no sdpa form of it
_NO_POOL = (("add_pooling_layer", False),)
HF_FAMILIES = {
    "bert": _Hf("BertModel", "BertConfig", _bert_like, built=_NO_POOL),
    "roberta": _Hf("RobertaModel", "RobertaConfig", _bert_like, built=_NO_POOL),
    "electra": _Hf(
        "ElectraModel", "ElectraConfig", lambda s: {**_bert_like(s), "embedding_size": s.hidden}
    ),
    "albert": _Hf(
        "AlbertModel",
        "AlbertConfig",
        lambda s: {**_bert_like(s), "embedding_size": s.hidden},
        built=_NO_POOL,
    ),
    "distilbert": _Hf(
        "DistilBertModel",
        "DistilBertConfig",
        lambda s: {
            "dim": s.hidden,
            "n_heads": s.heads,
            "n_layers": s.layers,
            "hidden_dim": 2 * s.hidden,
            "vocab_size": 1000,
        },
    ),
    "modernbert": _Hf(
        "ModernBertModel",
        "ModernBertConfig",
        lambda s: {
            **_decoder(s),
            "local_attention": 8,
            "global_attn_every_n_layers": 2,
            "cls_token_id": 0,
            "sep_token_id": 0,
        },
    ),
    "deberta": _Hf("DebertaV2Model", "DebertaV2Config", _bert_like, implementations=_EAGER),
    "clip-text": _Hf(
        "CLIPTextModel",
        "CLIPTextConfig",
        lambda s: {**_decoder(s), "max_position_embeddings": 4096},
    ),
    "t5-encoder": _Hf(
        "T5EncoderModel",
        "T5Config",
        lambda s: {
            "d_model": s.hidden,
            "d_kv": s.hidden // s.heads,
            "d_ff": 2 * s.hidden,
            "num_layers": s.layers,
            "num_heads": s.heads,
            "vocab_size": 1000,
        },
    ),
    "bart": _Hf(
        "BartModel",
        "BartConfig",
        lambda s: {
            **_seq2seq(s),
            "pad_token_id": 1,
            "decoder_start_token_id": 2,
        },
        called=_NO_CACHE,
    ),
    "gpt2": _Hf(
        "GPT2Model",
        "GPT2Config",
        lambda s: {
            "n_embd": s.hidden,
            "n_head": s.heads,
            "n_layer": s.layers,
            "vocab_size": 1000,
            "n_positions": 4096,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        called=_NO_CACHE,
    ),
    "llama": _Hf(
        "LlamaModel", "LlamaConfig", lambda s: _decoder(s, max(1, s.heads // 2)), called=_NO_CACHE
    ),
    "qwen2": _Hf(
        "Qwen2Model", "Qwen2Config", lambda s: _decoder(s, max(1, s.heads // 2)), called=_NO_CACHE
    ),
    "mistral": _Hf(
        "MistralModel",
        "MistralConfig",
        lambda s: _decoder(s, max(1, s.heads // 2), sliding_window=8),
        called=_NO_CACHE,
    ),
    "phi3": _Hf(
        "Phi3Model", "Phi3Config", lambda s: _decoder(s, max(1, s.heads // 2)), called=_NO_CACHE
    ),
    "gemma2": _Hf(
        "Gemma2Model",
        "Gemma2Config",
        lambda s: _decoder(
            s,
            max(1, s.heads // 2),
            head_dim=s.hidden // s.heads,
            query_pre_attn_scalar=s.hidden // s.heads,
            sliding_window=8,
        ),
        called=_NO_CACHE,
        implementations=_EAGER,
    ),
    "opt": _Hf(
        "OPTModel",
        "OPTConfig",
        lambda s: {
            **_decoder(s),
            "ffn_dim": 2 * s.hidden,
            "word_embed_proj_dim": s.hidden,
            "max_position_embeddings": 4096,
        },
        called=_NO_CACHE,
    ),
    "gpt-neox": _Hf(
        "GPTNeoXModel", "GPTNeoXConfig", lambda s: _decoder(s, rotary_pct=0.25), called=_NO_CACHE
    ),
    "falcon": _Hf(
        "FalconModel",
        "FalconConfig",
        lambda s: {**_decoder(s), "multi_query": True},
        called=_NO_CACHE,
    ),
    "bloom": _Hf(
        "BloomModel",
        "BloomConfig",
        lambda s: {
            "hidden_size": s.hidden,
            "n_head": s.heads,
            "n_layer": s.layers,
            "vocab_size": 1000,
        },
        called=_NO_CACHE,
        implementations=_EAGER,
    ),
    "vit": _Hf(
        "ViTModel",
        "ViTConfig",
        lambda s: {**_bert_like(s), "image_size": s.image, "patch_size": 16},
        wrap="image",
        built=_NO_POOL,
    ),
    "swin": _Hf(
        "SwinModel",
        "SwinConfig",
        lambda s: {
            "image_size": s.image,
            "patch_size": 4,
            "embed_dim": s.hidden // 2,
            "depths": [2, 2],
            "num_heads": [s.heads // 2, s.heads],
            "window_size": 4,
        },
        wrap="image",
    ),
    "whisper": _Hf(
        "WhisperModel",
        "WhisperConfig",
        lambda s: {
            **_seq2seq(s),
            "num_mel_bins": 16,
            "max_source_positions": 16,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "decoder_start_token_id": 0,
        },
        wrap="audio",
    ),
}


FAMILIES = (*HF_FAMILIES, *TORCH_FAMILIES)


def _transformers_module(entry: Entry, model_class: str | None = None) -> Any:
    """A Hugging Face model of the entry's family from a small config (random weights); with
    ``model_class``, that class of it, returned as it is (a causal language model)."""
    import transformers

    family = HF_FAMILIES[entry.family]
    settings = {**family.settings(entry.size), "attn_implementation": entry.implementation}
    config = getattr(transformers, family.config)(**settings)
    if model_class is not None:
        return getattr(transformers, model_class)(config).eval()
    model = getattr(transformers, family.model)(config, **dict(family.built))
    if family.wrap == "image":
        return _Image(model).eval()
    if family.wrap == "audio":
        return _Image(model.get_encoder(), "input_features").eval()
    return _Text(model, **dict(family.called)).eval()


class _Text(torch.nn.Module):
    """A transformers text model taking (input_ids, attention_mask) positionally, giving its last hidden state."""

    def __init__(self, inner: Any, **options: Any) -> None:
        super().__init__()
        self.inner, self.options = inner, options

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, **self.options
        ).last_hidden_state


class _Image(torch.nn.Module):
    """A model taking one float input by keyword (pixels, or an audio encoder's features)."""

    def __init__(self, inner: Any, name: str = "pixel_values") -> None:
        super().__init__()
        self.inner, self.name = inner, name

    def forward(self, values: Any) -> Any:
        return self.inner(**{self.name: values}).last_hidden_state


class _Encoder(torch.nn.Module):
    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, src: Any, src_key_padding_mask: Any) -> Any:
        return self.inner(src, src_key_padding_mask=src_key_padding_mask)


class _Transformer(torch.nn.Module):
    """nn.Transformer with its causal target mask built inside, as a decoder is used."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, src: Any, tgt: Any) -> Any:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.inner(src, tgt, tgt_mask=mask, tgt_is_causal=True)


class _DetrHead(torch.nn.Module):
    """A DETR-style decoder layer as users write it on nn.MultiheadAttention: learned queries attend
    to each other, then to image features under a memory padding mask, each call leaving
    need_weights at torch's default (True)."""

    def __init__(self, s: Size) -> None:
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(10, s.hidden))
        self.self_attn = torch.nn.MultiheadAttention(s.hidden, s.heads, batch_first=True)
        self.cross_attn = torch.nn.MultiheadAttention(s.hidden, s.heads, batch_first=True)
        self.norm1, self.norm2 = torch.nn.LayerNorm(s.hidden), torch.nn.LayerNorm(s.hidden)

    def forward(self, memory: Any, memory_mask: Any) -> Any:
        q = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        x = self.norm1(q + self.self_attn(q, q, q)[0])
        attended = self.cross_attn(x, memory, memory, key_padding_mask=memory_mask)[0]
        return self.norm2(x + attended)


class _WithPast(torch.nn.Module):
    """A causal LM taking (input_ids, attention_mask, past key, past value per layer) and giving
    (logits, present key, present value per layer): the form Optimum's text-generation-with-past
    export has, cache tensors in and out."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: Any, attention_mask: Any, *past: Any) -> Any:
        import transformers

        cache = transformers.DynamicCache(config=self.inner.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def past_names(layers: int) -> tuple[list[str], list[str]]:
    """The cache's input and output names, per layer: past_key_values.i.key/value, present.i.key/value."""
    kinds = ("key", "value")
    return (
        [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in kinds],
        [f"present.{i}.{kv}" for i in range(layers) for kv in kinds],
    )


def _past_inputs(entry: Entry) -> dict[str, Any]:
    """Three new tokens after a cache of five, the second sequence left-padded by two: the cache
    is the model's own, from a prefill of the first five."""
    module = _WithPast(_transformers_module(entry, CAUSAL_LMS[entry.family]))
    ids = torch.randint(1, 1000, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, :2] = 0
    with torch.no_grad():
        cache = module(ids[:, :5], mask[:, :5])[1:]
    names, _ = past_names(entry.size.layers)
    inputs = {"input_ids": ids[:, 5:], "attention_mask": mask, **dict(zip(names, cache))}
    return {name: value.numpy() for name, value in inputs.items()}


@functools.cache
def cache_heads(entry: Entry) -> dict[str, tuple[int, int]]:
    """(key/value heads, head size) of each cache input of a decoder with past, from its example
    (built once per entry: it runs the model)."""
    names, _ = past_names(entry.size.layers)
    example = _past_inputs(entry)
    return {name: (example[name].shape[1], example[name].shape[3]) for name in names}


def greedy_tokens(run: Any, entry: Entry, prompt: Any, mask: Any, steps: int = 32) -> Any:
    """``steps`` tokens of greedy decoding through ``run(feeds) -> outputs`` (an exported or
    compiled decoder with past, as a list in its output order): a prefill over the prompt with an
    empty cache, then one token per call, the cache fed back."""
    import numpy as np

    names, _ = past_names(entry.size.layers)
    n = prompt.shape[0]
    past = {name: np.zeros((n, h, 0, d), np.float32) for name, (h, d) in cache_heads(entry).items()}
    ids, tokens = prompt, []
    for _ in range(steps):
        outputs = run({"input_ids": ids, "attention_mask": mask, **past})
        token = outputs[0][:, -1].argmax(-1)
        tokens.append(token)
        past = dict(zip(names, outputs[1:]))
        ids = token[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], axis=1)
    return np.stack(tokens, axis=1)


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in ("torch", "transformers", "onnx", "onnxscript"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def export(entry: Entry, cache: str | os.PathLike[str]) -> Path:
    """The entry's model.onnx (weights in external data for dynamo exports), exported once per key."""
    key = json.dumps(
        {
            "entry": entry.name,
            "size": entry.size.to_json(),
            "versions": _versions(),
            "exporter": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        },
        sort_keys=True,
    )
    folder = Path(cache) / f"{entry.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    path, complete = folder / "model.onnx", folder / "complete"
    if complete.exists():  # written last: an export stopped half-way is made again
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "partial.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _torch_export(entry, partial)
        except Exception as exc:  # the exporter's failure, recorded as such by the corpus
            raise ExportError(f"{entry.name}: {type(exc).__name__}: {exc}") from exc
    data = folder / "partial.onnx.data"
    if data.exists():  # external data keeps its location inside the model: save both anew
        import onnx

        model = onnx.load(str(partial))
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            location="model.onnx.data",
            all_tensors_to_one_file=True,
        )
        partial.unlink()
        data.unlink()
    else:
        partial.rename(path)
    complete.touch()
    return path


def _axes(entry: Entry) -> tuple[dict[str, dict[int, str]], list[str]]:
    """The dynamic axes of each input (and output, for the legacy exporter), and the output names."""
    if not entry.past:
        return _AXES[entry.kind], ["output"]
    names, presents = past_names(entry.size.layers)
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        **{n: {0: "batch", 2: "past"} for n in names},
        **{n: {0: "batch", 2: "total"} for n in presents},
        "logits": {0: "batch", 1: "sequence"},
    }
    return axes, ["logits", *presents]


def _torch_export(entry: Entry, path: Path) -> None:
    """torch.onnx.export of the entry's module by its exporter, every axis of _AXES dynamic."""
    inputs = example_inputs(entry)
    names = list(inputs)
    args = tuple(torch.from_numpy(value) for value in inputs.values())
    axes, outputs = _axes(entry)
    common = {"input_names": names, "output_names": outputs, "opset_version": entry.opset}
    module = _module(entry)
    if entry.exporter != "dynamo":
        # the legacy exporter needs grad on, or torch's fast encoder path is traced as one
        # unexportable op
        torch.onnx.export(module, args, str(path), dynamo=False, dynamic_axes=axes, **common)
        return
    from torch.export import Dim

    low = 1 if entry.past else 2  # a decode step has one token, a prefill no cache
    dims: dict[str, Any] = {}
    shapes = tuple(
        {a: dims.setdefault(name, Dim(name, min=low, max=4096)) for a, name in axes[n].items()}
        for n in names
    )
    if entry.past:  # the cache's tensors are one positional argument (*past)
        shapes = (*shapes[:2], tuple(shapes[2:]))
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            dynamic_shapes=shapes,
            external_data=True,
            verbose=False,
            **common,
        )
