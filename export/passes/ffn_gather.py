"""Pass: compacted FFN weights of one neuron-sparse layer, gathered once per request (docs/architecture.md).

Before: the prefill graph holds the layer's FFN weights as initializers
(`{prefix}.gate_t` [d, D], `{prefix}.up_t` [d, D], `{prefix}.down_t` [D, d])
and outputs `core_neurons.{layer}` [N].
After:  it also outputs `ffn.{layer}.gate_t` [d, N], `ffn.{layer}.up_t` [d, N]
and `ffn.{layer}.down_t` [N, d]: the pruned columns (rows of down), which the
decode graph takes as inputs for the whole answer. The decode step then reads
N of D neurons' weights and never gathers again.

Quantized weights (`export.passes.dequantize`, run before this pass) are gathered in their stored
form, never dequantized whole: the outputs are `ffn.{layer}.{w}.q` (or `.packed`) and
`ffn.{layer}.{w}.scale`, the core neurons' integers and their scales (a per-output-channel scale of
down, whose columns are not gathered, passes through whole).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from buildformat.names import (
    FFN_WEIGHTS,
    QUANT_DATA,
    QUANT_PACKED,
    QUANT_SCALE,
    core_neurons_name,
    ffn_name,
    part_name,
)
from export.passes.ops import Ops, find_tensor

# The gather axis of each weight ([d, D], [d, D], [D, d]): W_gate and W_up lose columns, W_down loses rows.
GATHER_AXES = dict(zip(FFN_WEIGHTS, (1, 1, 0), strict=True))


def insert_ffn_gather(graph: gs.Graph, layer: int, prefix: str) -> gs.Graph:
    ops = Ops(graph, f"cm.ffn{layer}")
    # 1. The layer's core neurons (from the core-neuron pass).
    core = find_tensor(graph, core_neurons_name(layer))
    n = core.shape[0] if core.shape else "N"
    for weight, axis in GATHER_AXES.items():
        # 2. The weight initializer as the trace named it, or the dequantization of its stored form.
        w = find_tensor(graph, f"{prefix}.{weight}")
        compact = ffn_name(layer, weight)
        if isinstance(w, gs.Constant):
            parts = [(w, axis, compact)]
        elif w.inputs and w.inputs[0].op == "DequantizeLinear":
            parts = _stored_parts(graph, w, axis, compact)
        else:
            raise ValueError(f"{w.name} is not an initializer; the FFN-gather pass needs the weights in the graph")
        # 3. Gather the core neurons' columns (or rows) into graph outputs.
        for tensor, gather_axis, name in parts:
            part = weight + name.removeprefix(compact)  # gate_t, or gate_t.q and gate_t.scale
            if gather_axis is None:  # a scale that the gather does not touch
                out = ops("Identity", [tensor], part, dtype=tensor.dtype, shape=list(tensor.shape))
            else:
                shape = list(tensor.shape)
                shape[gather_axis] = n
                attrs = {"axis": gather_axis}
                out = ops("Gather", [tensor, core], part, dtype=tensor.dtype, shape=shape, attrs=attrs)
            out.name = name
            graph.outputs.append(out)
    return graph.cleanup().toposort()


def _stored_parts(graph: gs.Graph, w: gs.Variable, axis: int, out: str) -> list[tuple[gs.Tensor, int | None, str]]:
    """(tensor, gather axis or None, output name) of a quantized weight's data and scale."""
    dq = w.inputs[0]
    scale = dq.inputs[1]
    packed = graph.tensors().get(part_name(w.name, QUANT_PACKED))
    data, suffix = (packed, QUANT_PACKED) if packed is not None else (dq.inputs[0], QUANT_DATA)
    if not isinstance(data, gs.Constant) or not isinstance(scale, gs.Constant):
        raise ValueError(f"{w.name}: the stored weight and its scale must be initializers")
    # A per-output-channel scale [N] follows the columns; blocked scales [K/B, N] / [K, N/B] follow the axis.
    scale_axis = (0 if axis == 1 else None) if len(scale.shape) == 1 else axis
    return [(data, axis, part_name(out, suffix)), (scale, scale_axis, part_name(out, QUANT_SCALE))]
