"""What a TensorRT build accepts (docs/architecture.md): no NonZero, no If/Loop, TopK with a constant K < 3840."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from export.passes.membership import TOPK_LIMIT

FORBIDDEN = {
    "NonZero": "data-dependent shapes (no CUDA graphs)",
    "If": "the If-merged decoder fails to build",
    "Loop": "loops are not supported in engines here",
    # The int4 FFN weights a request gathers are nibble pairs unpacked by bit operations, which
    # TensorRT's ONNX parser does not have (docs/quantization.md).
    "BitShift": "int4 weights gathered per request (TensorRT has no BitShift: use int8 or --static-neurons)",
    "BitwiseAnd": "int4 weights gathered per request (TensorRT has no BitwiseAnd: use int8 or --static-neurons)",
}


def check_tensorrt(graph: gs.Graph) -> list[str]:
    """Reasons the graph would not build as a TensorRT engine; empty when it would."""
    problems = []
    forbidden: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op in FORBIDDEN:
            forbidden.setdefault(node.op, []).append(node.name)
        if node.op == "TopK":
            k = node.inputs[1]
            if isinstance(k, gs.Constant) and int(k.values.max()) > TOPK_LIMIT:
                problems.append(f"TopK {node.name} has K = {int(k.values.max())}, above TensorRT's limit {TOPK_LIMIT}")
    for op, names in forbidden.items():  # one line per operator, however many nodes
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        problems.insert(0, f"{op} node {names[0]}{more}: {FORBIDDEN[op]}")
    return problems
