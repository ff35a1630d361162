"""The ways a core's masks reach ONNX Runtime's CPU MultiHeadAttention with its flash path kept.

That kernel runs flash attention (linear memory, no (N, H, L, S) score tensor) only when it gets no
mask at all: any key_padding_mask, attention_bias or unidirectional sends it to the path that writes
every score. So a lowering moves the mask out of the op's inputs, each in a module of its own:
- head_padding: padding as one more dimension of each head, q.k + bias = [q, 1].[k, bias];
- padded_rows: padding cut per batch entry after its last visible key;
- causal_blocks: a causal mask in blocks of queries whose visible past is flash attention;
- causal_chunks: a causal mask alone as GroupQueryAttention's chunked prefill;
- query_blocks: any other mask in blocks of queries, for memory.

A lowering says whether it takes a core's mask terms (``applies``) and from what query length it
pays (``start``: below it one op with the whole bias is as fast or faster, docs/BENCHMARKS.md,
"Masks"), and emits its form of the context (``emit``) inside the If branch that takes it;
compiler/fuse_ort_mha.py chooses among them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import onnx_ir as ir

from compiler.attention_core import Core, Emit
from compiler.mask_terms import MaskTerms


@dataclass
class Masked:
    """What a lowering reads: the core, its mask's terms, the key bias (its key terms summed, or
    None), and ``inputs(emit) -> (q, k, v)`` in compiler/mask_ops.op_inputs' form."""

    graph: ir.Graph
    core: Core
    terms: MaskTerms
    raw: ir.Value | None
    inputs: Callable[[Emit], tuple[ir.Value, ir.Value, ir.Value]]

    @property
    def zero_dead(self) -> bool:
        """Whether a form zeroes the rows with no key left itself (the key terms' rows are zeroed
        by the caller, from the key bias alone)."""
        return self.core.zeroes_dead_rows and bool(self.terms.other)


class Lowering(Protocol):
    def applies(self, masked: Masked) -> bool: ...

    def start(self, masked: Masked) -> int: ...

    def emit(self, masked: Masked, emit: Emit, name: str) -> ir.Value: ...
