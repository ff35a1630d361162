"""Autoregressive decoding over a KV-cache graph (``kv_cache=True``): present_key/present_value of
one call become past_key/past_value of the next.

On ONNX Runtime the cache never leaves the runtime: each call binds the previous call's present
OrtValues as this call's past (IO binding), so no cache is copied to NumPy and back between steps;
on a CUDA provider the cache stays on the GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights
from runtime.ort import OrtSession
from runtime.signature import InputError, check_inputs


class KvCacheLoop:
    """``prefill(prompt)`` then ``step(token)``, each returning that call's output as NumPy, for a
    KV-cache attention graph (input ``query``) or decoder block (input ``tgt``; ``memory`` and its
    masks go in as keyword arguments, the same at every step).

    ``key_padding_mask`` follows the graph: True (or -inf) marks a padded key. The loop keeps the
    mask of every key seen so far; a call gives the mask of its new keys only, or nothing when they
    are all real (left-padded prompts of different lengths, then real tokens).
    """

    def __init__(self, session: OrtSession, spec: AttentionSpec | Any, device: str = "cpu") -> None:
        if not spec.kv_cache:
            raise InputError("KvCacheLoop needs a graph compiled with kv_cache=True (compile.py --kv-cache)")
        self.session, self.spec, self.device = session, spec, device
        block = not isinstance(spec, AttentionSpec)
        self._attention = spec.self_attention_spec() if block else spec
        self._input, self._output = ("tgt", "output") if block else ("query", "attn_output")
        self._padding_name = "tgt_key_padding_mask" if block else "key_padding_mask"
        self.reset()

    def reset(self) -> None:
        self._past: tuple[Any, Any] | None = None
        self._padding: np.ndarray | None = None

    @property
    def past_len(self) -> int:
        return 0 if self._past is None else int(self._past[0].shape()[2])

    def prefill(self, query: np.ndarray, key_padding_mask: np.ndarray | None = None, **other: np.ndarray) -> np.ndarray:
        self.reset()
        return self.step(query, key_padding_mask, **other)

    def step(self, query: np.ndarray, key_padding_mask: np.ndarray | None = None, **other: np.ndarray) -> np.ndarray:
        spec, heads = self.spec, self._attention
        batch = query.shape[0 if spec.batch_first else 1] if query.ndim == 3 else 0
        past = self._past or tuple(ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads.num_heads, 0, heads.head_dim),
                                                                            np.float32), self.device) for _ in range(2))
        feeds: dict[str, Any] = {self._input: query, **other}
        if spec.key_padding_mask is not None:
            feeds[self._padding_name] = self._extend_padding(query, key_padding_mask)
        elif key_padding_mask is not None:
            raise InputError(f"this graph takes no {self._padding_name} (compile it with --key-padding-mask)")
        check_inputs([i for i in self.session.inputs if i.name in feeds], feeds)
        missing = [i.name for i in self.session.inputs if i.name not in feeds and not i.name.startswith("past_")]
        if missing:
            raise InputError(f"missing input {missing[0]!r}; give it to prefill and step as a keyword argument")
        if past[0].shape()[0] != batch:
            raise InputError(f"input {self._input!r} has batch={batch}, but the cache holds batch={past[0].shape()[0]}; "
                             "call prefill to start a new batch")
        binding = self.session._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_ortvalue_input("past_key", past[0])
        binding.bind_ortvalue_input("past_value", past[1])
        for name in self.session.output_names:
            binding.bind_output(name, self.device)
        self.session._session.run_with_iobinding(binding)
        outputs = dict(zip(self.session.output_names, binding.get_outputs()))
        self._past = (outputs["present_key"], outputs["present_value"])
        if spec.key_padding_mask is not None:
            self._padding = feeds[self._padding_name]
        return outputs[self._output].numpy()

    def _extend_padding(self, query: np.ndarray, new: np.ndarray | None) -> np.ndarray:
        """The mask over past and new keys: the kept mask, then ``new`` (or all real)."""
        spec = self.spec
        batch, length = (query.shape[0], query.shape[1]) if spec.batch_first else (query.shape[1], query.shape[0])
        dtype = np.bool_ if spec.key_padding_mask == "bool" else np.float32
        if new is None:
            new = np.zeros((batch, length), dtype)
        past = self._padding if self._padding is not None else np.zeros((batch, 0), dtype)
        if past.shape[0] != new.shape[0] or past.dtype != new.dtype:
            raise InputError(f"key_padding_mask for the new keys has shape {new.shape} and dtype {new.dtype}; expected "
                             f"({past.shape[0]}, {length}) of {past.dtype}, the batch of the cache")
        return np.concatenate([past, new], axis=1)


def cache_of(spec: AttentionSpec, weights: AttentionWeights, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """past_key, past_value (N, H, P, hd) for ``tokens`` in the graph's layout, computed in float64
    from the weights: the cache a prefill of those tokens leaves."""
    x = tokens.astype(np.float64)
    if not spec.batch_first:
        x = x.transpose(1, 0, 2)
    e = spec.embed_dim
    w = weights.tensors["in_proj_weight"].astype(np.float64)
    b = weights.tensors["in_proj_bias"].astype(np.float64) if spec.bias else np.zeros(3 * e)
    n, p, _ = x.shape
    k = (x @ w[e:2 * e].T + b[e:2 * e]).reshape(n, p, spec.num_heads, spec.head_dim).transpose(0, 2, 1, 3)
    v = (x @ w[2 * e:].T + b[2 * e:]).reshape(n, p, spec.num_heads, spec.head_dim).transpose(0, 2, 1, 3)
    return k.astype(np.float32), v.astype(np.float32)
