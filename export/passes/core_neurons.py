"""Pass: the prompt's core neurons of one layer, from the traced FFN activation (docs/method.md, docs/architecture.md).

Before: the traced prefill outputs `act.{layer}` [T, D], the layer's FFN activation.
After:  it outputs `core_neurons.{layer}` [N] int64 (ascending) instead.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from buildformat.names import activation_name
from coreMatching.config import Budgets
from export.passes.membership import core_neurons, membership
from export.passes.ops import drop_output, find_tensor


def insert_core_neuron_selection(graph: gs.Graph, layer: int, budgets: Budgets) -> gs.Graph:
    """act.{layer} [S, D] -> core_neurons.{layer} [N]: the prompt's core neurons (k_tok, N and the
    chunks of `budgets`)."""
    # 1. The seam: the layer's activation, exposed by the trace as a graph output.
    act = find_tensor(graph, activation_name(layer))
    # 2. Token-wise core neurons, then the prompt's core neurons (TopK over the counts).
    member = membership(graph, act, layer, budgets.tokens_per_neuron_set)
    core = core_neurons(graph, member, layer, budgets.core_neurons, budgets.intermediate_size, budgets.neuron_chunks)
    # 3. Output the indices instead of the activation.
    drop_output(graph, act.name)
    graph.outputs.append(core)
    return graph.cleanup().toposort()
