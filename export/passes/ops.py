"""A small node builder for the graph-surgeon passes: named variables, typed constants."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


class Ops:
    """Adds nodes to `graph`, naming every node and tensor `{prefix}.{name}` so passes stay readable."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self._ids = itertools.count()

    def name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def const(self, name: str, value: Any, dtype: Any = None) -> gs.Constant:
        return gs.Constant(self.name(f"{name}_{next(self._ids)}"), np.asarray(value, dtype=dtype))

    def __call__(
        self,
        op: str,
        inputs: list[gs.Tensor],
        name: str,
        dtype: Any = None,
        shape: list[Any] | None = None,
        attrs: dict[str, Any] | None = None,
        outputs: int = 1,
    ) -> Any:
        """One node; returns its output variable (or a list of them when outputs > 1)."""
        outs = [
            gs.Variable(self.name(name if outputs == 1 else f"{name}.{i}"), dtype=dtype, shape=shape)
            for i in range(outputs)
        ]
        self.graph.nodes.append(
            gs.Node(op=op, name=self.name(f"{name}_node"), inputs=list(inputs), outputs=outs, attrs=attrs or {})
        )
        return outs[0] if outputs == 1 else outs


def find_tensor(graph: gs.Graph, name: str) -> gs.Variable:
    tensors = graph.tensors()
    if name not in tensors:
        raise KeyError(f"the graph has no tensor {name!r}")
    return tensors[name]


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node that reads `old` reads `new` instead."""
    for node in graph.nodes:
        node.inputs = [new if t is old else t for t in node.inputs]


def drop_output(graph: gs.Graph, name: str) -> None:
    graph.outputs = [t for t in graph.outputs if t.name != name]
