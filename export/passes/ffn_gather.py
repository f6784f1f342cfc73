"""Pass: compacted FFN weights of one neuron-sparse layer, gathered once per request (docs/architecture.md).

Before: the `neurons` graph takes the layer's full FFN weights as inputs, each neuron-major (`ffn.{layer}.gate`,
`ffn.{layer}.up`, `ffn.{layer}.down_t`, all [D, d], bound by the runtime) and outputs `core_neurons.{layer}`
[N].
After:  it also outputs `compact.{layer}.gate`, `.up` and `.down_t` [N, d]: the core neurons' rows (whole
contiguous rows: a Gather along axis 0 copies N blocks of d values), which decode binds to the stacks'
`ffn.{layer}.*` inputs for the whole answer. A decode step then reads N of D neurons' weights and never
gathers again.

Quantized weights are gathered in their stored form, never dequantized: the inputs are
`ffn.{layer}.{w}.q` (or `.packed`) and `.scale`, and the outputs the core neurons' integers and
their scales (gate's and up's per-row scales [D] gathered with their rows; down's per-output-channel
scale [d], whose channels are not gathered, passes whole).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from buildformat.names import compact_name, core_neurons_name
from export.passes.ops import Ops, find_tensor

if TYPE_CHECKING:
    from export.bound import BoundPart


def insert_ffn_gather(graph: gs.Graph, layer: int, parts: list[BoundPart]) -> gs.Graph:
    ops = Ops(graph, f"cm.ffn{layer}")
    # 1. The layer's core neurons (from the core-neuron pass).
    core = find_tensor(graph, core_neurons_name(layer))
    n = core.shape[0] if core.shape else "N"
    for part in parts:
        # 2. The bound input: a float weight, or a stored weight's data or scale.
        tensor = find_tensor(graph, part.name)
        if tensor not in graph.inputs:
            raise ValueError(f"{part.name} is not a graph input; the FFN-gather pass gathers the bound weights")
        # 3. Gather the core neurons' rows (or their scales) into graph outputs.
        short = part.name.split(".", 2)[2]  # gate, or gate.q and gate.scale
        if part.axis is None:  # a scale that the gather does not touch
            out = ops("Identity", [tensor], short, dtype=tensor.dtype, shape=list(tensor.shape))
        else:
            shape = list(tensor.shape)
            shape[part.axis] = n
            out = ops("Gather", [tensor, core], short, dtype=tensor.dtype, shape=shape, attrs={"axis": part.axis})
        out.name = compact_name(part.name)
        graph.outputs.append(out)
    return graph.cleanup().toposort()
