"""A thin layer over onnx.helper that names every node after the part of the model it computes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphs.dtypes import BY_NUMPY
from graphs.spec import MAX_BATCH_KEY, MAX_LEN_KEY, TensorSig

OPSET = 18


def value_info(sig: TensorSig) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        sig.name, BY_NUMPY[np.dtype(sig.dtype)].onnx, list(sig.shape)
    )


class GraphBuilder:
    """Collects nodes and initializers; ``op`` returns the output name(s) of the node it adds."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._prefix = ""

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix the names of the nodes and constants added inside with ``name/`` (a block's sub-module)."""
        outer = self._prefix
        self._prefix = f"{outer}{name}/"
        try:
            yield
        finally:
            self._prefix = outer

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self._names:
            i += 1
            candidate = f"{name}_{i}"
        self._names.add(candidate)
        return candidate

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        *,
        outputs: Sequence[str] | None = None,
        n_outputs: int = 1,
        **attrs: Any,
    ) -> Any:
        """Add ``op_type`` named ``name`` (a scope such as ``q_proj/MatMul``)."""
        node_name = self._unique(self._prefix + name)
        outs = (
            list(outputs)
            if outputs is not None
            else [f"{node_name}:{i}" if n_outputs > 1 else node_name for i in range(n_outputs)]
        )
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, name: str, value: np.ndarray | Sequence[int] | float) -> str:
        """An initializer; equal constants are stored once."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        key = (str(array.dtype), array.tobytes(), array.shape)
        if key not in self._consts:
            unique = self._unique(self._prefix + name)
            self.initializers.append(numpy_helper.from_array(array, unique))
            self._consts[key] = unique
        return self._consts[key]

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))

    def model(
        self,
        graph_name: str,
        inputs: Sequence[TensorSig],
        outputs: Sequence[TensorSig],
        doc: str = "",
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [value_info(s) for s in inputs],
            [value_info(s) for s in outputs],
            self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="attention-compiler",
            doc_string=doc,
        )
        model.ir_version = 9  # opset 18 needs IR 8+; 9 is what ONNX Runtime 1.16+ reads
        return model


def declare_maxima(model: onnx.ModelProto, max_batch: int | None, max_len: int | None) -> None:
    """Record the declared largest batch and length in the model's metadata, where every Session
    reads them and refuses larger inputs (and the ort-cpu passes leave out forms for longer ones)."""
    for key, value in ((MAX_BATCH_KEY, max_batch), (MAX_LEN_KEY, max_len)):
        if value is not None:
            kept = [p for p in model.metadata_props if p.key != key]
            del model.metadata_props[:]
            model.metadata_props.extend(kept)
            model.metadata_props.add(key=key, value=str(value))
