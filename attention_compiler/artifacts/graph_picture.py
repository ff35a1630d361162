"""What a graph holds, for people: op counts, and an SVG drawing of the nodes around its attention
core, so a report can show the graph before and after the passes without any viewer."""

from __future__ import annotations

import html
from collections import Counter, deque

import onnx

from compiler._ir import module_path

# the fused core if there is one (an If: a masked core in query blocks, compiler/lowerings/), else its Softmax
ANCHORS = ("MultiHeadAttention", "Attention", "If", "Softmax")
NODE_HEIGHT, LAYER_GAP, NODE_GAP, CHAR_WIDTH, MARGIN = 30, 26, 14, 7.2, 12
COLOURS = {
    "MultiHeadAttention": "#f4a259",
    "Attention": "#f4a259",
    "If": "#f4a259",
    "Softmax": "#8ecae6",
    "MatMul": "#d9d9d9",
    "SkipLayerNormalization": "#b5e48c",
    "LayerNormalization": "#b5e48c",
    "Gelu": "#cdb4db",
}


def op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _label(node: onnx.NodeProto) -> str:
    """A node's box: its op, and for an If or Loop the fused attention op it runs (a masked core in
    query blocks, compiler/lowerings/)."""
    inner = {op_name(n) for n in _inside(node) if n.op_type in ("MultiHeadAttention", "Attention")}
    return f"{node.op_type}: {', '.join(sorted(inner))}" if inner else op_name(node)


def _inside(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                yield inner
                yield from _inside(inner)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per operator (``com.microsoft.MultiHeadAttention`` keeps its domain), most frequent first."""
    counts = Counter(op_name(n) for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def attention_nodes(model: onnx.ModelProto, limit: int = 40) -> list[onnx.NodeProto]:
    """Up to ``limit`` nodes nearest the first attention core (by data edges, either way), in graph order;
    empty when the graph has no core. Constant nodes are left out: they are weights, not structure."""
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    anchor = next((i for op in ANCHORS for i, n in enumerate(nodes) if n.op_type == op), None)
    if anchor is None:
        return []
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    seen, queue = {anchor}, deque([anchor])
    while queue and len(seen) < limit:
        i = queue.popleft()
        near = [producer[v] for v in nodes[i].input if v in producer]
        near += [j for v in nodes[i].output for j in consumers.get(v, [])]
        for j in near:
            if j not in seen and len(seen) < limit:
                seen.add(j)
                queue.append(j)
    return [nodes[i] for i in sorted(seen)]


def _boxes(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto]
) -> tuple[list[tuple[str, str, str]], list[tuple[int, int]]]:
    """The boxes (label, tooltip, colour) of ``nodes``, the graph inputs they read and the graph
    outputs they write, in topological order, and the edges between them."""
    weights = {t.name for t in model.graph.initializer}
    graph_inputs = [v.name for v in model.graph.input if v.name not in weights]
    graph_outputs = {v.name for v in model.graph.output}
    boxes: list[tuple[str, str, str]] = []  # (label, tooltip, colour)
    edges: list[tuple[int, int]] = []
    index: dict[str, int] = {}  # value name -> box that produces it
    for name in sorted(
        {v for n in nodes for v in n.input if v in graph_inputs}, key=graph_inputs.index
    ):
        index[name] = len(boxes)
        boxes.append((name, "graph input", "#ffffff"))
    for n in nodes:
        me = len(boxes)
        module = module_path(n.name, {p.key: p.value for p in n.metadata_props})
        tip = (n.name or n.op_type) + (f" ({module})" if module else "")
        boxes.append(
            (_label(n).replace("com.microsoft.", "ms."), tip, COLOURS.get(n.op_type, "#f2f2f2"))
        )
        edges += [(index[v], me) for v in n.input if v in index]
        index.update({v: me for v in n.output if v})
    for n in nodes:
        for v in n.output:
            if v in graph_outputs:
                edges.append((index[v], len(boxes)))
                boxes.append((v, "graph output", "#ffffff"))
    return boxes, edges


def draw_svg(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> str:
    """A top-down layered drawing of ``nodes`` (in graph order) with the graph inputs they read and
    the graph outputs they write; boxes hold the op, the tooltip the node's name and the module it
    came from, where the exporter recorded it."""
    boxes, edges = _boxes(model, nodes)
    width = [len(label) * CHAR_WIDTH + 16 for label, _, _ in boxes]
    layer, centre, total = _layout(boxes, edges, width)
    rows = max(layer, default=-1) + 1
    top = [MARGIN + layer[i] * (NODE_HEIGHT + LAYER_GAP) for i in range(len(boxes))]
    svg_w, svg_h = (
        total + 2 * MARGIN,
        MARGIN * 2 + rows * (NODE_HEIGHT + LAYER_GAP) - LAYER_GAP,
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{svg_w:.0f}" height="{svg_h:.0f}" '
        f'viewBox="0 0 {svg_w:.0f} {svg_h:.0f}" font-family="monospace" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
    ]
    for a, b in edges:
        out.append(
            f'<line x1="{centre[a]:.1f}" y1="{top[a] + NODE_HEIGHT}" x2="{centre[b]:.1f}" y2="{top[b]}" '
            'stroke="#555" marker-end="url(#arrow)"/>'
        )
    for i, (label, tip, colour) in enumerate(boxes):
        x = centre[i] - width[i] / 2
        radius = NODE_HEIGHT / 2 if tip.startswith("graph ") else 4
        out.append(
            f'<g><title>{html.escape(tip)}</title><rect x="{x:.1f}" y="{top[i]}" width="{width[i]:.1f}" '
            f'height="{NODE_HEIGHT}" rx="{radius}" fill="{colour}" stroke="#333"/>'
            f'<text x="{centre[i]:.1f}" y="{top[i] + NODE_HEIGHT / 2 + 4}" text-anchor="middle">'
            f"{html.escape(label)}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _layout(
    boxes: list[tuple[str, str, str]], edges: list[tuple[int, int]], width: list[float]
) -> tuple[list[int], dict[int, float], float]:
    """Each box's layer (its longest path from an input), its centre across (each row ordered
    under its parents and centred), and the widest row's width."""
    layer = [0] * len(boxes)
    for a, b in sorted(edges, key=lambda e: e[1]):  # boxes are in topological order
        layer[b] = max(layer[b], layer[a] + 1)
    rows: list[list[int]] = [[] for _ in range(max(layer, default=-1) + 1)]
    for i, depth in enumerate(layer):
        rows[depth].append(i)
    centre: dict[int, float] = {}
    parents = {b: [a for a, c in edges if c == b] for b in range(len(boxes))}
    for row in rows:  # order each row under its parents, then pack it
        row.sort(
            key=lambda i: sum(centre[p] for p in parents[i]) / len(parents[i]) if parents[i] else -1
        )
        x = 0.0
        for i in row:
            centre[i] = x + width[i] / 2
            x += width[i] + NODE_GAP
    row_width = [sum(width[i] for i in row) + NODE_GAP * (len(row) - 1) for row in rows]
    total = max(row_width, default=0)
    for row, w in zip(rows, row_width):
        for i in row:
            centre[i] += MARGIN + (total - w) / 2
    return layer, centre, total
