"""Pass: compacted FFN weights of one neuron-sparse layer, gathered once per request (docs/architecture.md).

Before: the prefill graph holds the layer's FFN weights as initializers
(`{prefix}.gate_t` [d, D], `{prefix}.up_t` [d, D], `{prefix}.down_t` [D, d])
and outputs `core_neurons.{layer}` [N].
After:  it also outputs `ffn.{layer}.gate_t` [d, N], `ffn.{layer}.up_t` [d, N]
and `ffn.{layer}.down_t` [N, d]: the pruned columns (rows of down), which the
decode graph takes as inputs for the whole answer. The decode step then reads
N of D neurons' weights and never gathers again.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from export.passes.ops import Ops, find_tensor

# (weight name, gather axis): W_gate and W_up lose columns, W_down loses rows.
WEIGHTS = (("gate_t", 1), ("up_t", 1), ("down_t", 0))


def insert_ffn_gather(graph: gs.Graph, layer: int, prefix: str) -> gs.Graph:
    ops = Ops(graph, f"cm.ffn{layer}")
    # 1. The layer's core neurons (from the core-neuron pass).
    core = find_tensor(graph, f"core_neurons.{layer}")
    for weight, axis in WEIGHTS:
        # 2. The weight initializer, as the trace named it.
        w = find_tensor(graph, f"{prefix}.{weight}")
        if not isinstance(w, gs.Constant):
            raise ValueError(f"{w.name} is not an initializer; the FFN-gather pass needs the weights in the graph")
        # 3. Gather the core neurons' columns (or rows) into a graph output.
        out = ops("Gather", [w, core], weight, dtype=w.dtype, attrs={"axis": axis})
        out.name = f"ffn.{layer}.{weight}"
        rows, cols = w.shape
        out.shape = (
            [rows, core.shape[0] if core.shape else "N"] if axis == 1 else [core.shape[0] if core.shape else "N", cols]
        )
        graph.outputs.append(out)
    return graph.cleanup().toposort()
