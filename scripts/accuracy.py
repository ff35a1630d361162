#!/usr/bin/env python
"""Worst error of every target's graph over the core option matrix (attention_compiler/benchmark/matrix.py), per reference."""

from __future__ import annotations

import argparse
import sys

from attention_compiler.benchmark.matrix import SHAPES, option_matrix
from compiler import PRECISIONS, TARGETS, attention_form, compile_model
from graphs import AttentionSpec, AttentionWeights, build_mha
from runtime.check import FP16_TOLERANCE, FP32_TOLERANCE, check_session
from runtime.ort import OrtSession


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="portable", choices=TARGETS)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument(
        "--form", default=None, help="the target's form, where it has several (tensorrt)"
    )
    args = parser.parse_args(argv)
    tolerance = FP32_TOLERANCE if args.precision == "fp32" else FP16_TOLERANCE
    worst: dict[str, tuple[float, str]] = {}
    cases = failed = fused = 0
    for case, options in option_matrix():
        spec = AttentionSpec(**options)
        weights = AttentionWeights.random(spec, seed=7)
        model = compile_model(build_mha(spec, weights), args.target, args.precision, args.form)
        report = check_session(
            OrtSession(model), spec, weights, shapes=SHAPES, seed=1, tolerance=tolerance
        )
        cases += 1
        fused += not attention_form(model).startswith("unfused")
        failed += not report.passed
        for c in report.comparisons:
            if c.max_rel_error > worst.get(c.reference, (-1.0, ""))[0]:
                worst[c.reference] = (c.max_rel_error, f"{case} {c.output} at {c.shape}")
    print(
        f"target {args.target} {args.form or ''} {args.precision}: {cases} graphs x {len(SHAPES)} shapes, {fused} with a fused attention op, "
        f"{failed} over tolerance"
    )
    for reference, (err, where) in sorted(worst.items()):
        print(f"  worst relative error vs {reference}: {err:.3e} ({where})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
