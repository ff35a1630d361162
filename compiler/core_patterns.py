"""The fixed parts of an attention core as onnxscript patterns (pattern / check), so that a refusal
is a ``MatchResult.fail`` reason, which the per-Softmax report quotes.

- ``OwnCore``: the whole core of our own graphs (graphs/mha.py), KV cache and guard included.
- ``ContextEnd`` and ``QueryKeyEnd``: the two ends of a core as exporters write it: the softmax
  through its casts and torch's NaN guard into the context MatMul, and the query-key MatMul with
  its scalings and key layouts. Between the two lie any number of added biases in any order
  (padding, causal, position bias, with casts between), which one fixed pattern cannot state;
  compiler/exported_cores.py walks that stretch.

Patterns match from their output node back, so each is tried at every node of its output's type.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from compiler._ir import constant
from compiler.shape_values import scalar

MatchResult = pattern.MatchResult
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _refused(reason: str) -> MatchResult:
    return MatchResult().fail(reason)


class _CorePattern(pattern.PatternBase):
    """A pattern whose ``found`` keeps a failed check's reason with the match (onnxscript's ``match``
    returns None then, the reason going only to a tracer)."""

    # the softmax's output may also be the need_weights output: uses are checked by hand
    removable = False

    def found(self, graph: ir.Graph, node: ir.Node) -> MatchResult | None:
        """None where the structure differs; else the match, failed with the check's reason if it refuses."""
        if self._compiled_pattern is None:
            self._compiled_pattern = pattern.Pattern(self.pattern, name=self.name)
        match = self._compiled_pattern.match(
            None, graph, node, check_nodes_are_removable=self.removable
        )
        if not match:
            return None
        verdict = self.check(None, **match.bindings)
        if not verdict:
            match.fail(verdict.reason)
        return match


def _used_once(value: ir.Value | None) -> bool:
    return value is not None and not value.is_graph_output() and len(value.uses()) == 1


def _heads(op, x, split, perm):
    return op.Transpose(op.Reshape(x, split), perm=perm)


def _own_keys_values(op, k_in, k_split, past_key, v_in, v_split, past_value):
    """OwnCore's keys (transposed for the scores) and values: the head splits of this step's, or,
    with a KV cache, the past followed by them (tagged ``cached``)."""
    k_t = pattern.OrValue(
        [
            _heads(op, k_in, k_split, [0, 2, 3, 1]),
            op.Transpose(
                op.Concat(
                    past_key,
                    _heads(op, k_in, k_split, [0, 2, 1, 3]),
                    axis=2,
                    _outputs=["present_key"],
                ),
                perm=[0, 1, 3, 2],
            ),
        ],
        tag_var="cached",
        tag_values=[False, True],
    )
    v_heads = _heads(op, v_in, v_split, [0, 2, 1, 3])
    v = pattern.OrValue(
        [
            v_heads,
            op.Concat(
                past_value,
                _heads(op, v_in, v_split, [0, 2, 1, 3]),
                axis=2,
                _outputs=["present_value"],
            ),
        ]
    )
    return k_t, v


class OwnCore(_CorePattern):
    """graphs/mha.py's core: heads split by Reshape(x, [0, 0, H, hd]) and Transpose, MatMul, Mul by
    the scale, [Add the mask], Softmax, [the fully-masked guard], MatMul, head merge. With a KV cache
    the keys and values are Concat(past, this step's heads) on the length axis."""

    def pattern(
        self,
        op,
        q_in,
        k_in,
        v_in,
        q_split,
        k_split,
        v_split,
        past_key,
        past_value,
        scale,
        mask,
        zero,
        merge_shape,
    ):
        k_t, v = _own_keys_values(op, k_in, k_split, past_key, v_in, v_split, past_value)
        product = op.MatMul(_heads(op, q_in, q_split, [0, 2, 1, 3]), k_t, _outputs=["product"])
        scaled = pattern.OrValue(
            [op.Mul(product, scale), product], name="scaled"
        )  # FoldScalePass may take the Mul
        scores = pattern.OrValue(
            [op.Add(scaled, mask), op.Add(mask, scaled), scaled], name="scores"
        )
        probs = op.Softmax(scores, _outputs=["probs"])
        hidden = op.IsInf(op.ReduceMax(scores, pattern.ANY_VALUE), detect_positive=0)
        no_nan = op.Not(op.IsNaN(op.ReduceSum(scores, pattern.ANY_VALUE)))
        guarded = op.Where(op.And(hidden, no_nan), zero, probs)
        read = pattern.OrValue(
            [guarded, probs], name="read", tag_var="guarded", tag_values=[True, False]
        )
        attended = op.MatMul(read, v, _outputs=["attended"])
        return op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), merge_shape)

    def check(
        self, context, q_split, k_split, v_split, scale, scaled, scores, guarded, product, **_
    ) -> MatchResult:
        splits = [constant(x) for x in (q_split, k_split, v_split)]
        if (
            any(
                s is None or s.shape != (4,) or s[:2].tolist() != [0, 0] or min(s[2:]) <= 0
                for s in splits
            )
            or len({tuple(s.tolist()) for s in splits}) != 1
        ):
            return _refused(
                "its heads are not split by Reshape(x, [0, 0, heads, head_dim]) alike for q, k and v"
            )
        factor = constant(scale) if scale is not None else np.ones(1)
        if factor is None or factor.size != 1:
            return _refused("its scale is not a constant scalar")
        if (scaled is not product and not _used_once(product)) or (
            scores is not scaled and not _used_once(scaled)
        ):
            return _refused("an intermediate score tensor is used outside the attention")
        if scores.is_graph_output() or len(scores.uses()) != (
            3 if guarded else 1
        ):  # the guard's ReduceMax and ReduceSum read them
            return _refused("its scores are used outside the attention")
        return MatchResult()


def _is_float(value: ir.Value) -> bool:
    return value.type is not None and value.type.dtype in _FLOATS


def same_float_cast(node: ir.Node | None) -> bool:
    """A Cast between two float types of the same width (a no-op an exporter leaves: float to float)."""
    if node is None or node.op_type != "Cast" or node.domain:
        return False
    x, y = node.inputs[0], node.outputs[0]
    return (
        x.type is not None
        and y.type is not None
        and x.type.dtype == y.type.dtype
        and x.type.dtype in _FLOATS
    )


class ContextEnd(_CorePattern):
    """Softmax, then up to three no-op Casts and torch SDPA's NaN guards Where(IsNaN(p), 0, p) in any
    order (ViT's legacy export casts twice), into the MatMul with the values."""

    def pattern(self, op, scores, v, zero):
        probs = op.Softmax(scores, _outputs=["probs"])
        steps = {"cast": lambda p: op.Cast(p), "guard": lambda p: op.Where(op.IsNaN(p), zero, p)}
        chains = (
            [()]
            + [(a,) for a in steps]
            + [(a, b) for a in steps for b in steps]
            + [(a, b, c) for a in steps for b in steps for c in steps]
        )
        alternatives = []
        for chain in chains:
            value = probs
            for step in chain:
                value = steps[step](value)
            alternatives.append(value)
        read = pattern.OrValue(alternatives, name="read")
        return op.MatMul(read, v, _outputs=["attended"])

    def check(self, context, probs, read, **_) -> MatchResult:
        value = read
        while value is not probs:  # the nodes between, from the MatMul back
            node = value.producer()
            if node.op_type == "Cast" and not same_float_cast(node):
                return _refused("a Cast after its softmax changes the type")
            if node.op_type == "Where":
                zero = constant(node.inputs[1])
                if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
                    return _refused("what replaces NaN after its softmax is not 0")
            value = node.inputs[0] if node.op_type == "Cast" else node.inputs[2]
            readers = 1 if node.op_type == "Cast" else 2  # the guard's IsNaN and Where both read it
            if (
                value.is_graph_output()
                or len(value.uses()) != readers
                or (node.op_type == "Where" and not _used_once(node.inputs[0]))
            ):
                return _refused(
                    "its weights are used outside the attention past a Cast or NaN guard"
                )
        if read is not probs and not _used_once(read):
            return _refused("its weights are used outside the attention past a Cast or NaN guard")
        readers = [
            node
            for node, i in read.uses()
            if node.op_type == "MatMul" and not node.domain and i == 0
        ]
        if len(readers) != 1:
            return _refused("no single MatMul multiplies it with the values")
        return MatchResult()


class QueryKeyEnd(_CorePattern):
    """MatMul(q, K^T), each side perhaps scaled (Mul or Div by a scalar); K^T as it is, as
    Transpose(K, [0, 1, 3, 2]), or through torch's 3-D detour Reshape(Transpose(Reshape(K), [0, 2, 1]))."""

    removable = True  # every value inside is used only here

    def pattern(self, op, q, k, q_scale, k_scale, shape_3d, shape_4d):
        def scaled(x, s, tag):
            return pattern.OrValue(
                [op.Mul(x, s), op.Mul(s, x), op.Div(x, s), x],
                tag_var=tag,
                tag_values=["Mul", "Mul", "Div", None],
            )

        k_t = pattern.OrValue(
            [
                op.Transpose(k, perm=[0, 1, 3, 2]),
                op.Reshape(op.Transpose(op.Reshape(k, shape_3d), perm=[0, 2, 1]), shape_4d),
                k,
            ],
            tag_var="key_form",
            tag_values=["K", "K", "K^T"],
        )
        return op.MatMul(scaled(q, q_scale, "q_scaling"), scaled(k_t, k_scale, "k_scaling"))

    def check(self, context, k, shape_3d, **_) -> MatchResult:
        if shape_3d is not None and (k.shape is None or len(k.shape) != 4):
            return _refused("its keys go through a reshape that is not torch's 3-D detour")
        return MatchResult()


def scaling_factor(value: ir.Value) -> float | None:
    """The nonzero float scalar ``value`` holds, constant or computed from shapes; else None."""
    c = constant(value)
    if c is not None:
        factor = (
            float(c.reshape(())) if c.size == 1 and np.issubdtype(c.dtype, np.floating) else None
        )
    else:
        factor = scalar(value) if _is_float(value) else None
    return factor if factor else None


OWN_CORE = OwnCore()
CONTEXT_END = ContextEnd()
QUERY_KEY_END = QueryKeyEnd()


class RepeatedHeads(_CorePattern):
    """Reshape(Expand(Unsqueeze(x, [2]), (N, kv, r, S, hd)), (N, kv * r, S, hd)): grouped-query attention's
    keys or values repeated to the query heads, as transformers' repeat_kv writes them (head j reads
    x's head j // r). Shapes must state kv and the merged heads; r, where the legacy exporter's
    shape inference leaves it unknown, is their ratio (an Expand grows only axes of 1)."""

    def pattern(self, op, x, axes, expanded_shape, merged_shape):
        return op.Reshape(
            op.Expand(op.Unsqueeze(x, axes), expanded_shape, _outputs=["expanded"]),
            merged_shape,
            _outputs=["merged"],
        )

    def check(self, context, x, axes, expanded, merged, **_) -> MatchResult:
        axis = constant(axes)
        shapes = [v.shape for v in (x, expanded, merged)]
        if (
            axis is None
            or axis.reshape(-1).tolist() != [2]
            or None in shapes
            or [len(s) for s in shapes] != [4, 5, 4]
        ):
            return _refused("not heads repeated along a new axis 2")
        (_, kv, s, d), (_, _, r, _, _), (_, heads, s_m, d_m) = shapes
        if not (isinstance(kv, int) and isinstance(heads, int)) or heads % kv or heads <= kv:
            return _refused("its head counts are not stated, or do not multiply")
        if isinstance(r, int) and r != heads // kv:
            return _refused("its repeat is not the query heads' share")
        if not (isinstance(d, int) and d == d_m) or not same_dim(s, s_m):
            return _refused("its length or head size changes")
        return MatchResult()


REPEATED_HEADS = RepeatedHeads()


def same_dim(a: object, b: object) -> bool:
    """Two dims known to be equal: the same size, or the same named symbolic dim."""
    return a == b and (isinstance(a, int) or getattr(a, "value", None) is not None)


def repeated_heads(value: ir.Value, graph: ir.Graph) -> ir.Value | None:
    """The (N, kv, S, hd) keys or values that ``value`` repeats to more heads, else None."""
    node = value.producer()
    match = (
        REPEATED_HEADS.found(graph, node)
        if node is not None and node.op_type == "Reshape" and not node.domain
        else None
    )
    return match.bindings["x"] if match else None
