"""Autoregressive decoding over a KV-cache graph (``kv_cache=True``): present_key/present_value of
one call become past_key/past_value of the next.

On ONNX Runtime the cache never leaves the runtime: each call binds the previous call's present
OrtValues as this call's past (IO binding), so no cache is copied to NumPy and back between steps;
on a CUDA provider the cache stays on the GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort

from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights
from runtime.ort import OrtSession
from runtime.signature import InputError, InputSpec, check_inputs, is_torch


class LoopInUse(RuntimeError):
    """A KvCacheLoop was called from a second thread while one call was running."""


class KvCacheLoop:
    """``prefill(prompt)`` then ``step(token)``, each returning that call's output as NumPy, for a
    KV-cache attention graph (input ``query``) or decoder block (input ``tgt``; ``memory`` and its
    masks go in as keyword arguments, the same at every step). Inputs are NumPy arrays or torch
    tensors, checked as ``Session.run`` checks them, with the cache standing in for past_key/past_value.

    ``key_padding_mask`` follows the graph: True (or -inf) marks a padded key. The loop keeps the
    mask of every key seen so far; a call gives the mask of its new keys only, or nothing when they
    are all real (left-padded prompts of different lengths, then real tokens).

    A loop holds one sequence's cache, so it is not shared: a call while another thread's call runs
    raises LoopInUse (give each thread its own loop; they may share one OrtSession).
    """

    def __init__(self, session: OrtSession, spec: AttentionSpec | Any, device: str = "cpu") -> None:
        if not getattr(spec, "kv_cache", False):
            raise InputError(
                "KvCacheLoop needs a graph compiled with kv_cache=True (compile.py --kv-cache)"
            )
        if not isinstance(session, OrtSession):
            raise InputError(f"KvCacheLoop runs on an OrtSession, not a {type(session).__name__}")
        self.session, self.spec, self.device = session, spec, device
        block = not isinstance(spec, AttentionSpec)
        self._attention = spec.self_attention_spec() if block else spec
        self._input, self._output = ("tgt", "output") if block else ("query", "attn_output")
        self._padding_name = "tgt_key_padding_mask" if block else "key_padding_mask"
        self._check_session_fits()
        self._lock = threading.Lock()
        self.reset()

    def _check_session_fits(self) -> None:
        """InputError unless the session's graph is the one ``spec`` describes (names, heads, widths)."""
        declared = {s.name: s for s in self.session.inputs}
        want = {self._input, "past_key", "past_value"} | (
            {self._padding_name} if self.spec.key_padding_mask else set()
        )
        heads = (self._attention.num_heads, self._attention.head_dim)
        problem = None
        if not want <= declared.keys():
            problem = f"it lacks the input {sorted(want - declared.keys())[0]!r}"
        elif self.spec.key_padding_mask is None and self._padding_name in declared:
            problem = f"it takes a {self._padding_name} that the spec does not"
        elif tuple(declared["past_key"].shape[i] for i in (1, 3)) != heads:
            problem = f"its past_key has shape {declared['past_key'].shape}, not (batch, {heads[0]}, past_len, {heads[1]})"
        elif declared[self._input].shape[-1] != self.spec.embed_dim:
            problem = f"its {self._input!r} is {declared[self._input].shape[-1]} wide, not embed_dim {self.spec.embed_dim}"
        elif not {self._output, "present_key", "present_value"} <= set(self.session.output_names):
            problem = "it lacks present_key/present_value outputs"
        if problem is not None:
            raise InputError(
                f"the session's graph does not match the spec given to KvCacheLoop: {problem}; "
                "give the spec the graph was compiled from"
            )

    def reset(self) -> None:
        self._past: tuple[Any, Any] | None = None
        self._padding: np.ndarray | None = None

    @property
    def past_len(self) -> int:
        return 0 if self._past is None else int(self._past[0].shape()[2])

    def prefill(self, query: Any, key_padding_mask: Any = None, **other: Any) -> np.ndarray:
        with self._held():
            self.reset()
            return self._step(query, key_padding_mask, other)

    def step(self, query: Any, key_padding_mask: Any = None, **other: Any) -> np.ndarray:
        with self._held():
            return self._step(query, key_padding_mask, other)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise LoopInUse(
                "this KvCacheLoop is running a call from another thread; a loop holds one sequence's cache, "
                "so give each thread its own loop (they may share the OrtSession)"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _step(self, query: Any, key_padding_mask: Any, other: dict[str, Any]) -> np.ndarray:
        spec, heads = self.spec, self._attention
        declared = {s.name: s for s in self.session.inputs}
        query = _array(self._input, query, declared[self._input])
        check_inputs([declared[self._input]], {self._input: query})  # rank, dtype, empty axes
        batch = query.shape[0 if spec.batch_first else 1]
        if self._past is not None and self._past[0].shape()[0] != batch:
            raise InputError(
                f"input {self._input!r} has batch={batch}, but the cache holds batch="
                f"{self._past[0].shape()[0]}; call prefill to start a new batch"
            )
        feeds: dict[str, Any] = {
            self._input: query,
            **{k: _array(k, v, declared.get(k)) for k, v in other.items()},
        }
        if spec.key_padding_mask is not None:
            feeds[self._padding_name] = self._extend_padding(
                query, key_padding_mask, declared[self._padding_name]
            )
        elif key_padding_mask is not None:
            raise InputError(
                f"this graph takes no {self._padding_name} (compile it with --key-padding-mask)"
            )
        missing = [name for name in declared if name not in feeds and not name.startswith("past_")]
        if missing:
            raise InputError(
                f"missing input {missing[0]!r}; give it to prefill and step as a keyword argument"
            )
        past_shape = (batch, heads.num_heads, self.past_len, heads.head_dim)
        stand_in = np.broadcast_to(np.float32(0), past_shape)  # no memory
        check_inputs(
            self.session.inputs,
            {**feeds, "past_key": stand_in, "past_value": stand_in},
            self.session.maxima,
        )
        past = self._past or tuple(
            ort.OrtValue.ortvalue_from_numpy(np.zeros(past_shape, np.float32), self.device)
            for _ in range(2)
        )
        outputs = self._run(feeds, past)
        self._past = (outputs["present_key"], outputs["present_value"])
        if spec.key_padding_mask is not None:
            self._padding = feeds[self._padding_name]
        return outputs[self._output].numpy()

    def _run(self, feeds: dict[str, Any], past: tuple[Any, Any]) -> dict[str, Any]:
        """One call with the cache bound where it lives (no copy through the host on a GPU)."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_ortvalue_input("past_key", past[0])
        binding.bind_ortvalue_input("past_value", past[1])
        for name in self.session.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.session.output_names, binding.get_outputs()))

    def _extend_padding(self, query: np.ndarray, new: Any, declared: InputSpec) -> np.ndarray:
        """The mask over past and new keys: the kept mask, then ``new`` (or all real)."""
        spec = self.spec
        batch, length = (
            (query.shape[0], query.shape[1])
            if spec.batch_first
            else (query.shape[1], query.shape[0])
        )
        if new is None:
            new = np.zeros((batch, length), declared.dtype)
        new = _array(self._padding_name, new, declared)
        if new.shape != (batch, length) or new.dtype != declared.dtype:
            raise InputError(
                f"{self._padding_name} for the new keys has shape {new.shape} and dtype {new.dtype}; "
                f"expected ({batch}, {length}) of {declared.dtype}: one entry per new key of each sequence "
                "(the loop keeps the past keys' mask)"
            )
        past = self._padding if self._padding is not None else np.zeros((batch, 0), declared.dtype)
        return np.concatenate([past, new], axis=1)


def _array(name: str, value: Any, declared: InputSpec | None) -> Any:
    """A torch tensor as NumPy (detached: a tensor that requires grad is fine); other values as they are,
    for check_inputs to name."""
    if is_torch(value):
        return value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        expected = f" of {declared.dtype}" if declared is not None else ""
        raise InputError(
            f"input {name!r} is a {type(value).__name__}, expected a numpy.ndarray or torch.Tensor{expected}"
        )
    return value


def cache_of(
    spec: AttentionSpec, weights: AttentionWeights, tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """past_key, past_value (N, H, P, hd) for ``tokens`` in the graph's layout, computed in float64
    from the weights: the cache a prefill of those tokens leaves."""
    x = tokens.astype(np.float64)
    if not spec.batch_first:
        x = x.transpose(1, 0, 2)
    e = spec.embed_dim
    w = weights.tensors["in_proj_weight"].astype(np.float64)
    b = weights.tensors["in_proj_bias"].astype(np.float64) if spec.bias else np.zeros(3 * e)
    n, p, _ = x.shape
    k = (
        (x @ w[e : 2 * e].T + b[e : 2 * e])
        .reshape(n, p, spec.num_heads, spec.head_dim)
        .transpose(0, 2, 1, 3)
    )
    v = (
        (x @ w[2 * e :].T + b[2 * e :])
        .reshape(n, p, spec.num_heads, spec.head_dim)
        .transpose(0, 2, 1, 3)
    )
    return k.astype(np.float32), v.astype(np.float32)
