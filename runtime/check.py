"""The numeric check: a compiled graph against torch and against the float64 NumPy reference.

Error is reported as max absolute error and as that divided by the reference output's largest
magnitude (its scale), per output, per reference, per shape. Query rows in which some head has
every key masked are compared with the NumPy reference only: torch returns NaN there, where the
contract (docs/ARCHITECTURE.md) asks for a zero context.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from graphs.spec import AttentionSpec
from graphs.weights import AttentionWeights
from runtime.reference import fully_masked_rows, mha_reference
from runtime.session import Session
from runtime.signature import InputError, evaluate


class Shape(NamedTuple):
    """The sizes one call of an attention or block graph runs at (a KV cache: src_len is its past)."""

    batch: int
    tgt_len: int
    src_len: int

    def __str__(self) -> str:
        return f"batch {self.batch}, tgt_len {self.tgt_len}, src_len {self.src_len}"


DEFAULT_SHAPES: tuple[Shape, ...] = ((2, 5, 7), (3, 11, 4))
# float32 rounding through two projections and a softmax stays near 1e-6 of scale
FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 1e-2  # float16 has an 11-bit significand (epsilon 9.8e-4); a few roundings in a chain stay well inside
# int8: weights in 7 bits and activations in 8, per call; a layer's output moves by about 1% of its
# scale (docs/BENCHMARKS.md, "int8"), so the bound leaves room for a few layers, and the cosine
# similarity catches an error spread over every entry that the largest one would not show
INT8_TOLERANCE = 5e-2
INT8_MIN_COSINE = 0.999


def random_inputs(
    spec: AttentionSpec, shape: Shape, rng: np.random.Generator, mask_rate: float = 0.2
) -> dict[str, np.ndarray]:
    """Inputs in the graph's layout; masks block about ``mask_rate`` of the keys, key 0 included (so
    some rows may be fully masked). With a KV cache, shape's SRC is the past's length and the cache
    is random."""
    batch, tgt, src = shape
    sizes = {
        "batch": batch,
        "tgt_len": tgt,
        "src_len": tgt if spec.self_attention else src,
        "past_len": src,
    }
    return signature_inputs(spec.inputs(), sizes, rng, mask_rate, keep_first_key=False)


def signature_inputs(
    signature: Sequence[Any],
    sizes: Mapping[str, int],
    rng: np.random.Generator,
    mask_rate: float = 0.2,
    *,
    keep_first_key: bool,
) -> dict[str, np.ndarray]:
    """Random inputs for a graph signature (TensorSig list) at ``sizes`` of its symbolic axes: floats
    from a standard normal; masks (inputs named *mask) blocking about ``mask_rate`` of their entries,
    bool as True, float as -inf among N(0, 0.5) biases. ``keep_first_key``: key 0 is never blocked,
    so no query row is fully masked."""
    feeds = {}
    for sig in signature:
        dims = tuple(evaluate(d, sizes) if isinstance(d, str) else d for d in sig.shape)
        if "mask" in sig.name:
            blocked = rng.random(dims) < mask_rate
            if keep_first_key:
                blocked[..., 0] = False
            feeds[sig.name] = (
                blocked
                if sig.dtype == "bool"
                else np.where(blocked, -np.inf, rng.normal(0.0, 0.5, dims)).astype(np.float32)
            )
        else:
            feeds[sig.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@dataclass
class Comparison:
    reference: str
    shape: Shape
    output: str
    max_abs_error: float
    max_rel_error: float
    rows_excluded: int = 0
    cosine: float = 1.0  # of the compared entries, as two vectors


@dataclass
class CheckReport:
    """The comparisons, against a bound: relative error at most ``tolerance`` and, where
    ``min_cosine`` is set (int8), every output's cosine similarity at least that."""

    tolerance: float
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    min_cosine: float | None = None

    @property
    def worst_rel_error(self) -> float:
        return max((c.max_rel_error for c in self.comparisons), default=float("nan"))

    @property
    def worst_cosine(self) -> float:
        return min((c.cosine for c in self.comparisons), default=float("nan"))

    @property
    def passed(self) -> bool:
        close = bool(self.worst_rel_error <= self.tolerance)
        aligned = self.min_cosine is None or bool(self.worst_cosine >= self.min_cosine)
        return bool(self.comparisons) and close and aligned

    def failure(self) -> str:
        """What broke the bound, naming the worst output: one clause."""
        if not self.comparisons:
            return "nothing was compared"
        worst = max(self.comparisons, key=lambda c: c.max_rel_error)
        if not worst.max_rel_error <= self.tolerance:
            return (
                f"worst relative error {worst.max_rel_error:.3e} (output {worst.output!r}) "
                f"exceeds {self.tolerance:.0e}"
            )
        worst = min(self.comparisons, key=lambda c: c.cosine)
        return (
            f"worst cosine similarity {worst.cosine:.6f} (output {worst.output!r}) is below "
            f"{self.min_cosine}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "worst_rel_error": self.worst_rel_error,
            **({"min_cosine": self.min_cosine} if self.min_cosine is not None else {}),
            "worst_cosine": self.worst_cosine,
            "comparisons": [asdict(c) for c in self.comparisons],
            "skipped": self.skipped,
        }

    def table(self) -> str:
        cosine = self.min_cosine is not None
        lines = [
            f"{'reference':<10} {'batch,tgt,src':<14} {'output':<20} {'max abs err':>12} {'max rel err':>12}"
            + (f" {'cosine':>10}" if cosine else "")
        ]
        for c in self.comparisons:
            shape = ",".join(map(str, c.shape))
            lines.append(
                f"{c.reference:<10} {shape:<14} {c.output:<20} {c.max_abs_error:>12.3e} {c.max_rel_error:>12.3e}"
                + (f" {c.cosine:>10.6f}" if cosine else "")
            )
        for name, why in self.skipped.items():
            lines.append(f"{name:<10} skipped: {why}")
        verdict = "PASS" if self.passed else "FAIL"
        bound = f"tolerance {self.tolerance:.0e}"
        if cosine:
            bound += f"; worst cosine {self.worst_cosine:.6f}, at least {self.min_cosine}"
        lines.append(f"{verdict}: worst relative error {self.worst_rel_error:.3e} ({bound})")
        return "\n".join(lines)


def cosine(actual: np.ndarray, expected: np.ndarray) -> float:
    """The cosine similarity of two outputs as vectors, over the entries finite in both: 1 where both
    are zero there, 0 where one is."""
    both = np.isfinite(actual) & np.isfinite(expected)
    a, e = actual[both].astype(np.float64), expected[both].astype(np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(e))
    if norms == 0.0:
        return 1.0 if not a.any() and not e.any() else 0.0
    return float(np.dot(a, e) / norms)


def errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs error / max |expected|); NaN must sit where the reference has NaN."""
    if actual.shape != expected.shape:
        raise ValueError(
            f"output shape {actual.shape} differs from the reference's {expected.shape}"
        )
    if actual.size == 0:
        return 0.0, 0.0
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if np.any(nan_a != nan_e):
        return float("inf"), float("inf")
    a, e = actual[~nan_e].astype(np.float64), expected[~nan_e]
    if a.size == 0:
        return 0.0, 0.0
    same = a == e  # equal infinities have no error
    abs_err = float(np.max(np.where(same, 0.0, np.abs(a - e))))
    finite = np.abs(e[np.isfinite(e)])
    scale = float(finite.max()) if finite.size else 1.0
    return abs_err, float(abs_err / max(scale, np.finfo(np.float64).tiny))


def check_session(
    session: Session,
    spec: Any,
    weights: Any,
    *,
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    seed: int = 0,
    tolerance: float = FP32_TOLERANCE,
    min_cosine: float | None = None,
    use_torch: bool = True,
    mask_rate: float = 0.2,
    module: Any = None,
) -> CheckReport:
    """``session`` against the float64 NumPy reference and torch at each shape, on random inputs:
    bare attention (an AttentionSpec) or an encoder or decoder block (a BlockSpec), with or
    without a KV cache. ``module``: the user's own torch module, which torch's side then runs (a
    float64 copy in eval mode) instead of one built from the spec."""
    cases = reference_cases(
        spec,
        weights,
        shapes=shapes,
        seed=seed,
        use_torch=use_torch,
        mask_rate=mask_rate,
        module=module,
    )
    return compare_cases(session, spec, cases, tolerance, min_cosine)


@dataclass
class ReferenceCase:
    """Inputs at one shape and what each reference computes from them; one set serves every
    session compiled from the same spec and weights."""

    shape: Shape
    feeds: dict[str, np.ndarray]
    expected: dict[str, dict[str, np.ndarray]]  # reference ("numpy", "torch") -> outputs
    dead: np.ndarray | None  # (N, L): query rows some head sees no key of (torch gives NaN there)
    skipped: dict[str, str] = field(default_factory=dict)


def reference_cases(
    spec: Any,
    weights: Any,
    *,
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    seed: int = 0,
    use_torch: bool = True,
    mask_rate: float = 0.2,
    module: Any = None,
) -> list[ReferenceCase]:
    """Random inputs at each shape for an attention or block spec (a KV cache filled as a prefill
    of random tokens leaves it), and what the float64 NumPy reference and torch compute from them."""
    rng = np.random.default_rng(seed)
    skipped: dict[str, str] = {}
    module = _torch_module(spec, weights, skipped, module) if use_torch else None
    block = not isinstance(spec, AttentionSpec)
    cases = []
    for shape in shapes:
        feeds, tokens = _case_inputs(spec, weights, shape, rng, mask_rate)
        if block:
            from runtime.block_reference import block_reference

            expected = {"numpy": block_reference(spec, weights, feeds)}
        else:
            expected = {"numpy": mha_reference(spec, weights, feeds)}
        if module is not None:
            expected["torch"] = _torch_outputs(spec, weights, module, feeds, tokens)
        dead = None if block else fully_masked_rows(spec, feeds).any(axis=1)
        cases.append(ReferenceCase(tuple(shape), feeds, expected, dead, skipped))
    return cases


def _case_inputs(
    spec: Any, weights: Any, shape: Shape, rng: np.random.Generator, mask_rate: float
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs at ``shape``; with a KV cache, the tokens whose prefill left the cache too."""
    if isinstance(spec, AttentionSpec):
        feeds = random_inputs(spec, shape, rng, mask_rate)
        if not spec.kv_cache:
            return feeds, None
        from runtime.generation import cache_of

        return _with_cache(
            spec, feeds, "query", shape[2], rng, lambda t: cache_of(spec, weights, t)
        )
    feeds = block_inputs(spec, shape, rng, mask_rate)
    if not spec.kv_cache:
        return feeds, None
    return _with_cache(
        spec, feeds, spec.prefix, shape[2], rng, lambda t: _block_cache(spec, weights, t)
    )


def _torch_outputs(
    spec: Any,
    weights: Any,
    module: Any,
    feeds: Mapping[str, np.ndarray],
    tokens: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """torch's outputs; with a KV cache, of one causal pass over the past tokens and the new."""
    if isinstance(spec, AttentionSpec):
        from runtime.torch_reference import torch_forward

        if tokens is None:
            return torch_forward(spec, module, feeds)
        return _torch_cached(spec, weights, module, feeds, tokens)
    from runtime.block_reference import torch_block_forward

    if tokens is None:
        return torch_block_forward(spec, module, feeds)
    return _torch_block_cached(spec, weights, module, feeds, tokens)


def compare_cases(
    session: Session,
    spec: Any,
    cases: Sequence[ReferenceCase],
    tolerance: float,
    min_cosine: float | None = None,
) -> CheckReport:
    """``session`` on each case's inputs against each of its references."""
    report = CheckReport(tolerance, min_cosine=min_cosine)
    for case in cases:
        report.skipped.update(case.skipped)
        got = session.run(case.feeds)
        for reference, expected in case.expected.items():
            dead = case.dead if reference == "torch" else None
            _compare(report, spec, reference, case.shape, got, expected, dead)
    return report


def _with_cache(
    spec: Any,
    feeds: dict[str, np.ndarray],
    name: str,
    past_len: int,
    rng: np.random.Generator,
    cache: Any,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``feeds`` with past_key/past_value replaced by ``cache`` (tokens -> keys, values) of ``past_len``
    random tokens laid out as input ``name``; those tokens."""
    batch = feeds[name].shape[0 if spec.batch_first else 1]
    dims = (
        (batch, past_len, spec.embed_dim) if spec.batch_first else (past_len, batch, spec.embed_dim)
    )
    tokens = rng.standard_normal(dims).astype(np.float32)
    past_key, past_value = cache(tokens)
    return {**feeds, "past_key": past_key, "past_value": past_value}, tokens


def _torch_cached(
    spec: AttentionSpec,
    weights: AttentionWeights,
    module: Any,
    feeds: Mapping[str, np.ndarray],
    past_tokens: np.ndarray,
) -> dict[str, np.ndarray]:
    """torch's one causal pass over past and new tokens: the new tokens' rows of attn_output, and
    the whole sequence's keys and values (from the weights, as torch projects them) as present."""
    from runtime.generation import cache_of
    from runtime.torch_reference import torch_forward

    axis = 1 if spec.batch_first else 0
    full_spec = dataclasses.replace(spec, kv_cache=False)
    tokens = np.concatenate([past_tokens, feeds["query"]], axis=axis)
    inputs = {"query": tokens, **{k: v for k, v in feeds.items() if k == "key_padding_mask"}}
    out = torch_forward(full_spec, module, inputs)["attn_output"]
    new = np.arange(past_tokens.shape[axis], tokens.shape[axis])
    present_key, present_value = cache_of(spec, weights, tokens)
    return {
        "attn_output": np.take(out, new, axis=axis),
        "present_key": present_key,
        "present_value": present_value,
    }


def _torch_module(spec: Any, weights: Any, skipped: dict[str, str], own: Any = None) -> Any:
    if own is not None:
        import copy

        import torch

        return copy.deepcopy(own).to(torch.float64).eval()
    try:
        if isinstance(spec, AttentionSpec):
            from runtime.torch_reference import torch_module

            return torch_module(spec, weights)
        from runtime.block_reference import torch_block

        return torch_block(spec, weights)
    except ImportError:
        skipped["torch"] = "torch is not installed (pip install -e '.[torch]')"
        return None


def _compare(
    report: CheckReport,
    spec: AttentionSpec,
    reference: str,
    shape: Shape,
    got: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    dead: np.ndarray | None,
) -> None:
    for name, want in expected.items():
        actual = got[name]
        excluded = 0
        if (
            dead is not None and dead.any() and not name.startswith("present")
        ):  # the cache has no query rows
            keep = ~dead  # (N, L)
            excluded = int(dead.sum())
            actual, want = _rows(spec, name, actual, keep), _rows(spec, name, want, keep)
        abs_err, rel_err = errors(actual, want)
        report.comparisons.append(
            Comparison(
                reference, tuple(shape), name, abs_err, rel_err, excluded, cosine(actual, want)
            )
        )


def _rows(spec: AttentionSpec, output: str, array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The (batch, query) rows of an output selected by ``keep`` (N, L), whatever the output's layout."""
    if output == "attn_output_weights":
        return array[keep] if array.ndim == 3 else array.transpose(0, 2, 1, 3)[keep]
    if spec.batch_first:
        return array[keep]
    return array.transpose(1, 0, 2)[keep]


def block_inputs(
    spec: Any, shape: Shape, rng: np.random.Generator, mask_rate: float = 0.2
) -> dict[str, np.ndarray]:
    """Random inputs for a block's graph; masks never block key 0, so no query row is fully masked
    (torch gives NaN there; docs/ARCHITECTURE.md a zero context). A cache is as long as the memory."""
    batch, tgt, src = shape
    sizes = {"batch": batch, "tgt_len": tgt, "src_len": src, "past_len": src}
    return signature_inputs(spec.inputs(), sizes, rng, mask_rate, keep_first_key=True)


def _block_cache(spec: Any, weights: Any, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The self-attention cache a decoder block leaves for ``tokens`` (its input, the graph's layout):
    the keys and values of what its self-attention reads, the input or (pre-norm) norm1 of it."""
    from runtime.generation import cache_of

    x = (
        tokens.astype(np.float64)
        if spec.batch_first
        else tokens.astype(np.float64).transpose(1, 0, 2)
    )
    if spec.norm_first:
        t = weights.tensors
        x = (
            (x - x.mean(-1, keepdims=True))
            / np.sqrt(x.var(-1, keepdims=True) + spec.layer_norm_eps)
            * t["norm1.weight"]
        )
        x = x + t["norm1.bias"] if spec.bias else x
    sub = spec.self_attention_spec()  # batch-first
    return cache_of(sub, weights.attention("self_attn"), x)


def _torch_block_cached(
    spec: Any, weights: Any, module: Any, feeds: Mapping[str, np.ndarray], past_tokens: np.ndarray
) -> dict[str, np.ndarray]:
    """torch's layer over past and new tokens in one causal pass: the new tokens' rows, and the cache."""
    from runtime.block_reference import torch_block_forward

    axis = 1 if spec.batch_first else 0
    tokens = np.concatenate([past_tokens, feeds[spec.prefix]], axis=axis)
    inputs = {k: v for k, v in feeds.items() if not k.startswith("past")} | {spec.prefix: tokens}
    if (
        "memory_mask" in inputs
    ):  # (tgt_len, S) covers the new rows; the past rows' masks cannot reach them
        mask = inputs["memory_mask"]
        past_rows = np.zeros((past_tokens.shape[axis], *mask.shape[1:]), mask.dtype)
        inputs["memory_mask"] = np.concatenate([past_rows, mask], axis=0)
    out = torch_block_forward(dataclasses.replace(spec, kv_cache=False), module, inputs)["output"]
    present_key, present_value = _block_cache(spec, weights, tokens)
    new = np.arange(past_tokens.shape[axis], tokens.shape[axis])
    return {
        "output": np.take(out, new, axis=axis),
        "present_key": present_key,
        "present_value": present_value,
    }


def _run_original(original: Session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The input graph's outputs; an InputError (the input graph's fault, not ours) where ONNX Runtime
    cannot run it on these inputs: an export that fixed a dynamic axis at its traced size, say."""
    try:
        return original.run(feeds)
    except InputError:
        raise
    except Exception as exc:  # onnxruntime raises Fail, RuntimeException, InvalidArgument...
        shapes = ", ".join(
            f"{name} {'x'.join(map(str, value.shape))}" for name, value in feeds.items()
        )
        detail = re.sub(
            r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).strip().splitlines()[0]
        )[:200]
        raise InputError(
            f"the input graph itself fails in ONNX Runtime on inputs of {shapes}: {detail}; give inputs it "
            "takes with --inputs FILE.npz (or --latency-shape for --latency)"
        ) from exc


def _case(
    original: Session, feeds: dict[str, np.ndarray], overrides: Mapping[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    feeds = {**feeds, **(overrides or {})}
    return feeds, _run_original(original, feeds)


def drawn_case(
    original: Session,
    size: int,
    rng: np.random.Generator,
    ranges: Mapping[str, int] | None,
    overrides: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs drawn at ``size`` (+ 0, 1, 2... per symbolic axis) and the input graph's outputs on
    them. Where the graph refuses them, an axis the graph computes from two others (a decoder's
    mask spanning its cache and the new tokens: total = past + sequence) is tried at their sum,
    each axis and pair in turn; the first the graph takes is used, else the first refusal stands."""
    from runtime.graph_inputs import graph_inputs

    symbols = sorted({d for s in original.inputs for d in s.shape if isinstance(d, str)})
    sizes = {name: size + i for i, name in enumerate(symbols)}
    sums = [
        {**sizes, total: sizes[a] + sizes[b]}
        for total in symbols
        for a, b in itertools.combinations([s for s in symbols if s != total], 2)
    ]
    first: InputError | None = None
    for tried in [sizes, *sums]:
        feeds = graph_inputs(original.inputs, tried, rng, ranges=ranges)  # its errors stand
        try:
            return _case(original, feeds, overrides)
        except InputError as exc:
            first = first or exc
    raise first


def check_against_graph(
    session: Session,
    original: Session,
    *,
    tolerance: float = FP32_TOLERANCE,
    min_cosine: float | None = None,
    seed: int = 0,
    ranges: Mapping[str, int] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    overrides: Mapping[str, np.ndarray] | None = None,
) -> CheckReport:
    """A compiled graph against the graph it came from: on ``inputs`` where given, else on random
    inputs (runtime/graph_inputs.py; token ids within ``ranges``) at two sizes of every symbolic axis,
    with ``overrides`` fed to the initializers the graph also lists as inputs (a graph that baked
    one in differs). Entries the original leaves NaN (torch's fully masked rows) are not compared;
    outputs that are not floats must be equal."""
    report = CheckReport(tolerance, min_cosine=min_cosine)
    rng = np.random.default_rng(seed)
    if inputs is not None:
        cases = [_case(original, dict(inputs), overrides)]
    else:
        cases = [drawn_case(original, size, rng, ranges, overrides) for size in (5, 11)]
    takes = {s.name for s in session.inputs + session.overridable}
    for feeds, want in cases:
        got = session.run({n: v for n, v in feeds.items() if n in takes})
        shape = tuple(feeds[original.inputs[0].name].shape)
        for name, expected in want.items():
            report.comparisons.append(_against_graph(shape, name, got[name], expected))
    return report


def _against_graph(
    shape: tuple[int, ...], name: str, actual: np.ndarray, expected: np.ndarray
) -> Comparison:
    """Floats within tolerance where the input graph is not NaN; anything else exactly equal."""
    if expected.dtype.kind != "f":
        same = actual.shape == expected.shape and bool(np.array_equal(actual, expected))
        error = 0.0 if same else float("inf")
        return Comparison("input graph", shape, name, error, error)
    nan = np.isnan(expected)
    actual, expected = np.where(nan, 0, actual), np.where(nan, 0, expected)
    abs_err, rel_err = errors(actual, expected)
    return Comparison(
        "input graph", shape, name, abs_err, rel_err, int(nan.sum()), cosine(actual, expected)
    )
