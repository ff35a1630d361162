"""report.html: one self-contained page (no script, no fetch) that says what was compiled, what the
passes did to the graph, and the figures measured, so a reviewer can read it offline."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

import onnx

from attention_compiler.artifacts.graph_picture import attention_nodes, draw_svg, op_counts

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-family:monospace}.pass{color:#176b1a;font-weight:bold}.fail{color:#a11;font-weight:bold}
.graphs{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}figure{margin:0;overflow-x:auto}
code{background:#f4f4f4;padding:0 .2em}"""


def graph_summary(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, Any]:
    """Node and op counts before and after the passes, for the manifest and the report."""
    return {
        "before": {"nodes": len(before.graph.node), "ops": op_counts(before)},
        "after": {"nodes": len(after.graph.node), "ops": op_counts(after)},
    }


def render_report(
    manifest: Mapping[str, Any], before: onnx.ModelProto, after: onnx.ModelProto
) -> str:
    """The page for one artifact; ``manifest`` is the artifact's manifest (check and latency included when measured)."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(_title(manifest))}</title>"
        f"<style>{STYLE}</style></head><body><h1>{_e(_title(manifest))}</h1>"
    ]
    parts.append(_section("What was compiled", _rows(_what(manifest))))
    parts.append(_section("Inputs and outputs", _signature(manifest)))
    parts.append(_section("Graph before and after the passes", _graphs(manifest, before, after)))
    parts.append(_section("Numeric check", _check(manifest.get("check"))))
    parts.append(_section("Latency", _latency(manifest.get("latency"))))
    parts.append(
        _section(
            "Files",
            _table(
                ["file", "bytes", "sha256"],
                [
                    [name, _n(r["bytes"]), _Html(f"<code>{_e(r['sha256'])}</code>")]
                    for name, r in manifest["files"].items()
                ],
            ),
        )
    )
    parts.append(_section("Tools", _rows(manifest["tools"])))
    parts.append("</body></html>\n")
    return "".join(parts)


def _title(manifest: Mapping[str, Any]) -> str:
    spec = manifest.get("spec")
    what = (
        f"{spec.get('block', 'mha')} E={spec['embed_dim']} H={spec['num_heads']}"
        if spec
        else "ONNX graph"
    )
    return f"attention-compiler: {what}, target {manifest['target']}, {manifest['precision']}"


def _what(manifest: Mapping[str, Any]) -> dict[str, Any]:
    rows = {
        "target": f"{manifest['target']} (form {manifest['form']}): {manifest['target_form']}",
        "precision": manifest["precision"],
        "opset": manifest["opset"],
        "attention became": manifest["attention_form"],
    }
    if "spec" in manifest:
        rows.update({f"spec: {k}": v for k, v in manifest["spec"].items()})
        rows["weights"] = json.dumps(manifest.get("weights"))
    else:
        rows["source"] = f"{manifest['source']['onnx']} (sha256 {manifest['source']['sha256']})"
        for finding in manifest.get("fusion", []):
            layer = f" ({finding['layer']})" if finding.get("layer") else ""
            rows[f"Softmax {finding['softmax']}{layer}"] = (
                "fused: " if finding["fused"] else "left alone: "
            ) + finding["detail"]
    if manifest.get("config"):
        rows["config"] = f"{manifest['config']['path']} (sha256 {manifest['config']['sha256']})"
    return rows


def _signature(manifest: Mapping[str, Any]) -> str:
    rows = [
        [kind, s["name"], s["dtype"], " x ".join(str(d) for d in s["shape"])]
        for kind in ("inputs", "outputs")
        for s in manifest[kind]
    ]
    return _table(["", "name", "dtype", "shape"], rows)


def _graphs(manifest: Mapping[str, Any], before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    counts = manifest["graph"]
    ops = sorted(set(counts["before"]["ops"]) | set(counts["after"]["ops"]))
    table = _table(
        ["op", "before", "after"],
        [
            [op, _n(counts["before"]["ops"].get(op, 0)), _n(counts["after"]["ops"].get(op, 0))]
            for op in ops
        ]
        + [
            [_Html("<b>all nodes</b>"), _n(counts["before"]["nodes"]), _n(counts["after"]["nodes"])]
        ],
    )
    figures = []
    for label, model in (("before", before), ("after", after)):
        nodes = attention_nodes(model)
        picture = draw_svg(model, nodes) if nodes else "<p>no attention core in this graph</p>"
        figures.append(
            f"<figure><figcaption>{label}: the {len(nodes)} nodes nearest the attention core</figcaption>"
            f"{picture}</figure>"
        )
    return table + f"<div class='graphs'>{''.join(figures)}</div>"


def _check(check: Mapping[str, Any] | None) -> str:
    if check is None:
        return "<p>Not run: compile with <code>--check</code>.</p>"
    verdict = (
        "<span class='pass'>PASS</span>" if check["passed"] else "<span class='fail'>FAIL</span>"
    )
    rows = [
        [
            c["reference"],
            ",".join(map(str, c["shape"])),
            c["output"],
            _f(c["max_abs_error"]),
            _f(c["max_rel_error"]),
            _n(c.get("rows_excluded", 0)),
            *([f"{c['cosine']:.6f}"] if "min_cosine" in check else []),
        ]
        for c in check["comparisons"]
    ]
    cosine = (
        f" and every output's cosine similarity at least {check['min_cosine']} (worst "
        f"{check['worst_cosine']:.6f})"
        if "min_cosine" in check
        else ""
    )
    skipped = "".join(
        f"<p>{_e(name)} skipped: {_e(why)}</p>" for name, why in check.get("skipped", {}).items()
    )
    return (
        f"<p>{verdict}: worst relative error {_f(check['worst_rel_error'])} against a tolerance of "
        f"{check['tolerance']:.0e} (relative to each reference output's largest magnitude){cosine}.</p>"
        + _table(
            [
                "reference",
                "batch,tgt,src",
                "output",
                "max abs error",
                "max rel error",
                "rows excluded",
                *(["cosine"] if "min_cosine" in check else []),
            ],
            rows,
        )
        + skipped
    )


def _latency(latency: Mapping[str, Any] | None) -> str:
    if latency is None:
        return "<p>Not measured: compile with <code>--latency</code>.</p>"
    rows = [
        [name, *(f"{t[k] * 1e3:.3f}" for k in ("p50_s", "p90_s", "p99_s", "best_s")), _n(t["runs"])]
        for name, t in (
            ("before the passes", latency["before"]),
            ("after the passes", latency["after"]),
        )
    ]
    return (
        f"<p>{_e(latency['where'])}, inputs {_e(input_shapes(latency['inputs']))}. "
        f"After/before at p50: <b>{latency['ratio_p50']:.2f}x</b>.</p>"
        + _table(
            ["graph", "p50 ms", "p90 ms", "p99 ms", "best ms", "runs"],
            [[r[0], *map(_Num, r[1:5]), r[5]] for r in rows],
        )
    )


def input_shapes(inputs: Mapping[str, list[int]]) -> str:
    """``{"src": [1, 128, 256]}`` as ``src 1x128x256``."""
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in inputs.items())


def _section(title: str, body: str) -> str:
    return f"<h2>{_e(title)}</h2>{body}"


def _rows(rows: Mapping[str, Any]) -> str:
    return _table(["", ""], [[k, v] for k, v in rows.items()])


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if isinstance(v, _Num) else ''}>{_cell(v)}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


class _Html(str):
    """Markup made here: not escaped again."""


class _Num(_Html):
    """A formatted number: right-aligned."""


def _cell(value: Any) -> str:
    return value if isinstance(value, _Html) else _e(value)


def _n(value: int) -> _Num:
    return _Num(f"{value:,}")


def _f(value: float) -> _Num:
    return _Num(f"{value:.3e}")


def _e(value: Any) -> str:
    return html.escape(str(value))
