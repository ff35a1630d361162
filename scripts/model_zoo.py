"""The exported models compile.py --onnx is measured on (scripts/corpus.py) and tested on
(tests/test_real_models.py): what users bring, from both torch exporters.

Hugging Face transformers models (the optional extra ``transformers``) are built from small configs
with random weights, never downloaded: BertModel and GPT2Model (token ids and an attention mask) and
ViTModel (pixels) and LlamaModel (grouped-query attention: half as many key/value heads, and rotary
embeddings), each with ``attn_implementation`` "sdpa" (transformers' default) and "eager"; and
torch's own nn.TransformerEncoder (with a key padding mask) and nn.Transformer (causal target mask).
Exports are cached on disk under a key of the model, its config and the tool versions. Needs torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("bert", "gpt2", "vit", "llama", "torch-encoder", "torch-transformer")
IMPLEMENTATIONS = ("sdpa", "eager")
EXPORTERS = ("dynamo", "legacy")


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

    @property
    def name(self) -> str:
        opset = f"opset{self.opset}" if self.opset != 18 else None
        return "-".join(p for p in (self.family, self.implementation, self.exporter, opset) if p)

    @property
    def kind(self) -> str:
        return (
            "text"
            if self.family in ("bert", "gpt2", "llama")
            else "image"
            if self.family == "vit"
            else "sequence"
        )


def entries(size: Size = Size(), families: tuple[str, ...] = FAMILIES) -> Iterator[Entry]:
    for family in families:
        for implementation in IMPLEMENTATIONS if not family.startswith("torch") else (None,):
            for exporter in EXPORTERS:
                yield Entry(family, implementation, exporter, size)


def example_inputs(entry: Entry) -> dict[str, Any]:
    """The inputs the entry is exported with, as NumPy arrays by input name: token ids with the second
    sequence's first three tokens padded, or pixels, or sequences with the second's last four keys padded."""
    torch.manual_seed(1)
    s = entry.size
    if entry.kind == "text":
        mask = torch.ones(2, 16, dtype=torch.int64)
        mask[1, :3] = 0
        inputs = {"input_ids": torch.randint(0, 1000, (2, 16)), "attention_mask": mask}
    elif entry.kind == "image":
        inputs = {"pixel_values": torch.randn(2, 3, s.image, s.image)}
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
    if entry.family in ("bert", "gpt2", "vit", "llama"):
        return _transformers_module(entry)
    if entry.family == "torch-encoder":
        layer = torch.nn.TransformerEncoderLayer(s.hidden, s.heads, 2 * s.hidden, batch_first=True)
        return _Encoder(
            torch.nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
        ).eval()
    return _Transformer(
        torch.nn.Transformer(s.hidden, s.heads, s.layers, s.layers, 2 * s.hidden, batch_first=True)
    ).eval()


def _transformers_module(entry: Entry) -> Any:
    """A Hugging Face model of the entry's family from a small config (random weights)."""
    s = entry.size
    import transformers

    impl = {"attn_implementation": entry.implementation}
    if entry.family == "bert":
        config = transformers.BertConfig(
            hidden_size=s.hidden,
            num_attention_heads=s.heads,
            num_hidden_layers=s.layers,
            intermediate_size=2 * s.hidden,
            vocab_size=1000,
            **impl,
        )
        return _Text(transformers.BertModel(config, add_pooling_layer=False)).eval()
    if entry.family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=s.hidden,
            n_head=s.heads,
            n_layer=s.layers,
            vocab_size=1000,
            n_positions=4096,
            bos_token_id=0,
            eos_token_id=0,
            **impl,
        )
        return _Text(transformers.GPT2Model(config), use_cache=False).eval()
    if entry.family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=s.hidden,
            num_attention_heads=s.heads,
            num_key_value_heads=max(1, s.heads // 2),
            num_hidden_layers=s.layers,
            intermediate_size=2 * s.hidden,
            vocab_size=1000,
            **impl,
        )
        return _Text(transformers.LlamaModel(config), use_cache=False).eval()
    config = transformers.ViTConfig(
        hidden_size=s.hidden,
        num_attention_heads=s.heads,
        num_hidden_layers=s.layers,
        intermediate_size=2 * s.hidden,
        image_size=s.image,
        patch_size=16,
        **impl,
    )
    return _Image(transformers.ViTModel(config, add_pooling_layer=False)).eval()


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
    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: Any) -> Any:
        return self.inner(pixel_values=pixel_values).last_hidden_state


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
        _torch_export(entry, partial)
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


def _torch_export(entry: Entry, path: Path) -> None:
    """torch.onnx.export of the entry's module by its exporter, every axis of _AXES dynamic."""
    inputs = example_inputs(entry)
    names = list(inputs)
    args = tuple(torch.from_numpy(value) for value in inputs.values())
    axes = _AXES[entry.kind if entry.kind != "sequence" else entry.family]
    common = {"input_names": names, "output_names": ["output"], "opset_version": entry.opset}
    module = _module(entry)
    if entry.exporter != "dynamo":
        # the legacy exporter needs grad on, or torch's fast encoder path is traced as one
        # unexportable op
        torch.onnx.export(module, args, str(path), dynamo=False, dynamic_axes=axes, **common)
        return
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = tuple(
        {axis: dims.setdefault(name, Dim(name, min=2, max=4096)) for axis, name in axes[n].items()}
        for n in names
    )
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
