"""The weightless graphs a CoreMatching prefill runs besides the stacks (docs/architecture.md).

- `select` runs between the lower and the upper stack: from the prune layer's hidden states
  [1, S, d] and FFN activation [S, D] (and, for the selectors that read it, the last query's
  attention) to the kept tokens' hidden states and positions, the kept image tokens and a merge's
  kept bias. The graph is written here with its seams (`keep_indices`, or a merge's
  `merge_weights`, `keep_positions` and `key_bias` as inputs), which the token passes fill as they
  filled the traced prefill's.
- `neurons` runs after the upper stack, for the per-request neuron-sparse layers: from their
  activations and their full FFN weights (bound by the runtime) to the prompt's core neurons and the
  compacted weights the decode steps read (the core-neuron and FFN-gather passes).

Neither holds a weight: the stacks hold them all, once.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from buildformat.geometry import Geometry
from buildformat.names import (
    HIDDEN,
    KEEP_INDICES,
    KEEP_POSITIONS,
    KEPT_HIDDEN,
    KEPT_POSITIONS,
    KEY_BIAS,
    MERGE_WEIGHTS,
    activation_name,
    attention_name,
    core_neurons_name,
)
from coreMatching.config import Budgets
from coreMatching.selectors import SELECTORS
from export.bound import BoundPart
from export.passes import (
    insert_core_neuron_selection,
    insert_core_token_selection,
    insert_ffn_gather,
    insert_token_merge,
    insert_token_scores,
)
from export.passes.ops import Ops


def select_graph(geometry: Geometry, budgets: Budgets, dtype: type, opset: int, seed: int) -> gs.Graph:
    """The selection between the stacks, its seams filled by the token passes."""
    d, width = geometry.hidden_size, geometry.intermediate_size
    hidden = gs.Variable(HIDDEN, dtype=dtype, shape=[1, "S", d])
    inputs = [hidden, gs.Variable(activation_name(budgets.prune_layer), dtype=dtype, shape=["S", width])]
    if SELECTORS[budgets.token_selector].needs_attention:
        inputs.append(gs.Variable(attention_name(budgets.prune_layer), dtype=dtype, shape=[geometry.num_heads, "S"]))
    graph = gs.Graph(inputs=inputs, opset=opset)
    ops = Ops(graph, "select")
    if budgets.token_merge == "none":
        # Later layers see the kept tokens, at their own positions (the prompt's positions are its indices).
        keep = gs.Variable(KEEP_INDICES, dtype=np.int64, shape=["S_kept"])
        graph.inputs.append(keep)
        kept = ops("Gather", [hidden, keep], "kept", dtype=dtype, attrs={"axis": 1}, shape=[1, "S_kept", d])
        positions = ops("Identity", [keep], "positions", dtype=np.int64, shape=["S_kept"])
    else:
        # Later layers start from merge_weights @ h: the kept rows, and the merged tokens' means.
        weights = gs.Variable(MERGE_WEIGHTS, dtype=np.float32, shape=["S_kept", "S"])
        keep_positions = gs.Variable(KEEP_POSITIONS, dtype=np.int64, shape=["S_kept"])
        key_bias = gs.Variable(KEY_BIAS, dtype=np.float32, shape=["S_kept"])  # the upper stack derives it
        graph.inputs += [weights, keep_positions, key_bias]
        to = int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        cast = ops("Cast", [weights], "weights", dtype=dtype, attrs={"to": to})
        rows = ops("Squeeze", [hidden, ops.const("axis0", [0], np.int64)], "rows", dtype=dtype)  # [S, d]
        merged = ops("MatMul", [cast, rows], "merged", dtype=dtype)  # [S_kept, d]
        kept = ops("Unsqueeze", [merged, ops.const("axis0", [0], np.int64)], "kept", dtype=dtype)
        positions = ops("Identity", [keep_positions], "positions", dtype=np.int64, shape=["S_kept"])
    kept.name, kept.shape = KEPT_HIDDEN, [1, "S_kept", d]
    positions.name = KEPT_POSITIONS
    graph.outputs = [kept, positions]
    if budgets.prune_layer in budgets.neuron_sparse_layers:
        # The prune layer's core neurons share its token-wise membership with the token scores: computed here
        # once, the neurons graph takes them.
        insert_core_neuron_selection(graph, budgets.prune_layer, budgets)
    scores = insert_token_scores(graph, budgets, seed)
    insert_core_token_selection(graph, budgets, scores)
    if budgets.token_merge != "none":
        insert_token_merge(graph, budgets)
    return graph.cleanup().toposort()


def neurons_graph(geometry: Geometry, budgets: Budgets, parts: list[BoundPart], dtype: type, opset: int) -> gs.Graph:
    """The per-request core neurons and compacted FFN weights of the neuron-sparse layers. `parts`: the bound
    weights in their stored form (`export.bound.bound_parts`)."""
    width = geometry.intermediate_size
    prune = budgets.prune_layer
    # The prune layer's core neurons come from the select graph; the upper layers' from their activations.
    inputs = [
        gs.Variable(core_neurons_name(layer), dtype=np.int64, shape=[budgets.core_neurons])
        if layer == prune
        else gs.Variable(activation_name(layer), dtype=dtype, shape=["S_kept", width])
        for layer in budgets.neuron_sparse_layers
    ]
    inputs += [gs.Variable(p.name, dtype=p.dtype, shape=list(p.shape)) for p in parts]
    graph = gs.Graph(inputs=inputs, opset=opset)
    for layer in budgets.neuron_sparse_layers:
        if layer != prune:
            insert_core_neuron_selection(graph, layer, budgets)
        insert_ffn_gather(graph, layer, [p for p in parts if p.layer == layer])
    return graph.cleanup().toposort()
