"""Inputs for a graph that came from elsewhere (compile.py --onnx): random ones that mean something to
it, or the user's own from an .npz file.

A text model takes integer token ids and an integer or bool attention mask, not floats. Ids are drawn
inside the embedding table that reads them (the Gather whose indices they are, through Casts and
reshapes), so a check never indexes past a table; masks pad some keys, left-pad one batch entry and
hide every key of another, so a check meets query rows with nothing to attend to: there the compiled
graph must give what the input graph gives (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from graphs.spec import SpecError
from runtime.signature import InputError, InputSpec

# Ops that carry an index tensor to a Gather without changing what its values mean.
_PASS_THROUGH = {
    "Cast",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Identity",
    "Expand",
    "Slice",
    "Concat",
    "Tile",
}
INPUTS_LIMIT = 2**30  # bytes an --inputs file may declare; far past any one call a check makes


def index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer graph input that indexes an embedding table: the table's row count (the
    smallest, where it reaches several)."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            users.setdefault(name, []).append((node, index))
    integer = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    ranges = {}
    for value in model.graph.input:
        if value.type.tensor_type.elem_type not in integer or value.name in tables:
            continue
        rows, seen, frontier = [], {value.name}, [value.name]
        while frontier:
            for node, index in users.get(frontier.pop(), []):
                if (
                    node.op_type == "Gather"
                    and not node.domain
                    and index == 1
                    and node.input[0] in tables
                ):
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    rows.append(tables[node.input[0]][axis])
                elif node.op_type in _PASS_THROUGH and not node.domain and index == 0:
                    fresh = [o for o in node.output if o not in seen]
                    seen.update(fresh)
                    frontier += fresh
        if rows:
            ranges[value.name] = min(rows)
    return ranges


def _looks_like_mask(name: str) -> bool:
    return "mask" in name.lower()


def graph_inputs(
    inputs: list[InputSpec],
    sizes: Mapping[str, int],
    rng: np.random.Generator,
    *,
    ranges: Mapping[str, int] | None = None,
    mask_rate: float = 0.2,
) -> dict[str, np.ndarray]:
    """Random inputs from the graph's declared ``inputs``; each symbolic axis takes its size from
    ``sizes`` (3 when absent).
    - bool inputs, and float or integer inputs named like masks: padded as ``_padding`` says (bool:
      True pads, as torch's key_padding_mask; float: -inf is added; integer: 0 pads, 1 attends, as
      Hugging Face's attention_mask);
    - integer inputs in ``ranges`` (from ``index_ranges``): ids from 0 to the table's rows;
    - float inputs: standard normal.
    Anything else is an InputError naming the input and pointing at --inputs."""
    feeds = {}
    for spec in inputs:
        dims = tuple(d if isinstance(d, int) else sizes.get(d or "", 3) for d in spec.shape)
        _check_drawable(spec, dims)
        kind = spec.dtype.kind
        if spec.dtype == np.bool_ or (kind in "fiu" and _looks_like_mask(spec.name)):
            padded = _padding(dims, rng, mask_rate)
            feeds[spec.name] = (
                padded
                if spec.dtype == np.bool_
                else np.where(padded, -np.inf, 0).astype(spec.dtype)
                if kind == "f"
                else (~padded).astype(spec.dtype)
            )
        elif kind in "iu" and ranges and spec.name in ranges:
            feeds[spec.name] = rng.integers(0, ranges[spec.name], dims).astype(spec.dtype)
        elif kind == "f":
            feeds[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        else:
            what = (
                spec.onnx_type
                if spec.dtype == np.dtype(object)
                else f"{spec.dtype} and reaches no embedding table"
            )
            raise InputError(
                f"input {spec.name!r} is {what}, so --check and --latency cannot make it; give real inputs "
                "with --inputs FILE.npz (one array per input name)"
            )
    return feeds


def _padding(dims: tuple[int, ...], rng: np.random.Generator, rate: float) -> np.ndarray:
    """Which keys a drawn mask hides: about ``rate`` of them, never the first, in the first batch
    entry; the second entry left-padded (its first third hidden: under a causal mask its first rows
    see no key); the third hidden whole. So every check meets rows with nothing to attend to, where
    fused kernels differ from the graphs they replace."""
    padded = np.asarray(rng.random(dims) < rate)  # a scalar flag too
    if padded.ndim:
        padded[..., :1] = False
    if padded.ndim >= 2 and dims[0] >= 2:
        padded[1] = False
        padded[1, ..., : max(1, dims[-1] // 3)] = True
    if padded.ndim >= 2 and dims[0] >= 3:
        padded[2] = True
    return padded


def overridden_initializers(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed for every initializer the graph also lists as an input: float ones scaled element by
    element by 0.5 to 1.5 (so a graph that ignores the feed shows it), others as they are."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    listed = {v.name for v in model.graph.input}
    feeds = {}
    for tensor in model.graph.initializer:
        if tensor.name in listed:
            array = numpy_helper.to_array(tensor)
            if array.dtype.kind == "f":
                array = (array * rng.uniform(0.5, 1.5, array.shape)).astype(array.dtype)
            feeds[tensor.name] = np.asarray(array)
    return feeds


def _check_drawable(spec: InputSpec, dims: tuple[int, ...]) -> None:
    """InputError where the declared shape is more than a drawn input should hold (a fixed size of
    2^40 asked for terabytes) or has a negative size."""
    if any(d < 0 for d in dims):
        raise InputError(f"input {spec.name!r} declares a negative size: {dims}")
    if int(np.prod(dims, dtype=object)) * max(spec.dtype.itemsize, 1) > INPUTS_LIMIT:
        raise InputError(
            f"input {spec.name!r} at shape {dims} would take more than {INPUTS_LIMIT >> 30} GiB, more "
            "than --check and --latency draw for one input; give real inputs with --inputs FILE.npz, "
            "or smaller sizes with --latency-shape"
        )
    if any(d > INPUTS_LIMIT for d in dims):
        raise InputError(
            f"input {spec.name!r} at shape {dims} has an axis past {INPUTS_LIMIT}, more than --check "
            "and --latency draw; give real inputs with --inputs FILE.npz"
        )


def read_inputs(
    path: str | Path, inputs: list[InputSpec], flag: str = "--inputs"
) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, one per graph input, checked (names, dtypes, ranks) against the
    graph and bounded in size before any array is read; pickles are never loaded. ``flag``: the
    option that named the file, for messages."""
    import zipfile

    path = Path(path)
    names = {s.name: s for s in inputs}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {i.filename.removesuffix(".npy"): i for i in archive.infolist()}
            declared = sum(i.file_size for i in archive.infolist())
            if declared > INPUTS_LIMIT:
                raise InputError(
                    f"{flag} {str(path)!r} declares {declared} bytes, more than {INPUTS_LIMIT}"
                )
            missing = [n for n in names if n not in members]
            extra = sorted(m for m in members if m not in names)
            if missing or extra:
                raise InputError(
                    f"{flag} {str(path)!r} holds {_listed(sorted(members)) or 'nothing'}; the graph "
                    f"takes {_listed(list(names))}"
                    + (f" (missing {_listed(missing)})" if missing else "")
                )
            arrays = {}
            for name in names:
                with archive.open(members[name]) as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    except InputError:
        raise
    except Exception as exc:  # zipfile, zlib and NumPy raise several types for a damaged archive
        raise InputError(
            f"{flag} {str(path)!r} is not a readable .npz archive of arrays ({_first_line(exc)})"
        ) from exc
    return arrays


def _listed(names: list[str], most: int = 12) -> str:
    """Names for a one-line message: any that would break the line (a newline) or hide its end
    shown as a Python literal, and at most ``most`` of them."""
    shown = [n if n.isprintable() else repr(n) for n in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def onnx_axis_sizes(
    inputs: list[InputSpec], shape: tuple[int, int, int] | Mapping[str, int]
) -> dict[str, int]:
    """Sizes for an ingested graph's symbolic axes. From BATCH,TGT,SRC: the axes named like batch
    take BATCH, or where none is, the axes first in some input; every other axis TGT. AXIS=SIZE
    names them all."""
    axes = list(dict.fromkeys(d for s in inputs for d in s.shape if isinstance(d, str)))
    if isinstance(shape, Mapping):
        if sorted(shape) != sorted(axes):
            raise SpecError(
                f"--latency-shape names axes {', '.join(sorted(shape))}; the graph's symbolic axes "
                f"are {', '.join(axes)}"
            )
        return dict(shape)
    batch = {d for d in axes if "batch" in d.lower()} or {
        s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)
    }
    return {d: shape[0] if d in batch else shape[1] for d in axes}
