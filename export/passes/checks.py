"""What a TensorRT build accepts (docs/architecture.md): no NonZero, no If/Loop, TopK with a constant K < 3840."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from export.passes.membership import TOPK_LIMIT

FORBIDDEN = {
    "NonZero": "data-dependent shapes (no CUDA graphs)",
    "If": "the If-merged decoder fails to build",
    "Loop": "loops are not supported in engines here",
}


def check_tensorrt(graph: gs.Graph) -> list[str]:
    """Reasons the graph would not build as a TensorRT engine; empty when it would."""
    problems = []
    for node in graph.nodes:
        if node.op in FORBIDDEN:
            problems.append(f"{node.op} node {node.name}: {FORBIDDEN[node.op]}")
        if node.op == "TopK":
            k = node.inputs[1]
            if isinstance(k, gs.Constant) and int(k.values.max()) > TOPK_LIMIT:
                problems.append(f"TopK {node.name} has K = {int(k.values.max())}, above TensorRT's limit {TOPK_LIMIT}")
    return problems
