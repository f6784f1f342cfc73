"""Shared subgraphs: token-wise core neurons and the prompt's core neurons of one layer (docs/method.md).

Both the core-token pass and the core-neuron pass need them; they are built
once per layer and found again by name.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from buildformat.names import core_neurons_name
from coreMatching.selection import chunk_bounds, chunk_sizes
from export.passes.ops import Ops

# TensorRT's TopK takes K < 3840 (docs/architecture.md).
TOPK_LIMIT = 3839


def membership(graph: gs.Graph, act: gs.Variable, layer: int, tokens_per_set: int) -> gs.Variable:
    """member[i, n] = a[i, n] >= (k_tok-th largest of a[i]) and a[i, n] > 0, as float 0/1.

    act: [T, D] -> [T, D] float32 (a float so that sums and gathers need no further casts).
    """
    name = f"cm.l{layer}.member"
    existing = graph.tensors().get(name)
    if existing is not None:
        return existing
    ops = Ops(graph, f"cm.l{layer}")
    dtype = act.dtype or np.float32
    # 1. The k_tok-th largest activation of every token: the least of its k_tok largest. Unsorted, TopK skips
    # ordering them (the same values, so exactly the same threshold; the indices, which alone could differ
    # on ties, are not read). ONNX Runtime CPU, [623, 2048], medians of 20 with the sorted TopK + Slice:
    # k 52: 8.2 -> 7.3 ms on one thread, 18 -> 14 ms on two; k 205: 27 -> 21 ms, 48 -> 36 ms.
    values, _ = ops(
        "TopK",
        [act, ops.const("k_tok", [tokens_per_set], np.int64)],
        "token_topk",
        attrs={"axis": -1, "largest": 1, "sorted": 0},
        outputs=2,
    )  # [T, k_tok]
    values.dtype = dtype
    threshold = ops(
        "ReduceMin", [values, ops.const("axis1", [1], np.int64)], "threshold", dtype=dtype, attrs={"keepdims": 1}
    )  # [T, 1]
    # 2. At or above the threshold, and positive.
    at_least = ops("GreaterOrEqual", [act, threshold], "at_least", dtype=np.bool_)
    positive = ops("Greater", [act, ops.const("zero", 0.0, dtype)], "positive", dtype=np.bool_)
    both = ops("And", [at_least, positive], "member_bool", dtype=np.bool_)
    member = ops("Cast", [both], "member", dtype=np.float32, attrs={"to": int(onnx.TensorProto.FLOAT)})
    member.name = name
    return member


def core_neurons(
    graph: gs.Graph, member: gs.Variable, layer: int, num_core: int, width: int, chunks: int
) -> gs.Variable:
    """The `num_core` neurons that are core for most tokens, ascending, ties to the lower index.

    member: [T, D] float -> int64 [N]. With chunks > 1 each contiguous chunk keeps its share.
    """
    name = core_neurons_name(layer)
    existing = graph.tensors().get(name)
    if existing is not None:
        return existing
    ops = Ops(graph, f"cm.l{layer}")
    # 1. f(n): for how many tokens each neuron is a core neuron.
    counts = ops(
        "ReduceSum", [member, ops.const("axis0", [0], np.int64)], "counts", dtype=np.float32, attrs={"keepdims": 0}
    )  # [D]
    picked = []
    parts = zip(chunk_bounds(width, chunks), chunk_sizes(num_core, chunks), strict=True)
    for chunk, ((start, stop), share) in enumerate(parts):
        part = counts
        if chunks > 1:
            part = ops(
                "Slice",
                [counts, ops.const("s", [start], np.int64), ops.const("e", [stop], np.int64)],
                f"counts_chunk{chunk}",
                dtype=np.float32,
            )
        # 2. The top counts; ONNX TopK breaks ties by the lower index, as the reference does.
        _, top = ops(
            "TopK",
            [part, ops.const("n", [share], np.int64)],
            f"neuron_topk{chunk}",
            attrs={"axis": -1, "largest": 1, "sorted": 1},
            outputs=2,
        )
        top.dtype = np.int64
        # 3. Ascending order: a second TopK, smallest first (indices are exact in float32 below 2^24).
        as_float = ops("Cast", [top], f"neuron_f{chunk}", dtype=np.float32, attrs={"to": int(onnx.TensorProto.FLOAT)})
        ordered, _ = ops(
            "TopK",
            [as_float, ops.const("n", [share], np.int64)],
            f"neuron_sort{chunk}",
            attrs={"axis": -1, "largest": 0, "sorted": 1},
            outputs=2,
        )
        ordered.dtype = np.float32
        index = ops("Cast", [ordered], f"neuron_i{chunk}", dtype=np.int64, attrs={"to": int(onnx.TensorProto.INT64)})
        if start:
            index = ops("Add", [index, ops.const("offset", [start], np.int64)], f"neuron_off{chunk}", dtype=np.int64)
        picked.append(index)
    result = picked[0] if chunks == 1 else ops("Concat", picked, "core_concat", dtype=np.int64, attrs={"axis": 0})
    result.name = name
    result.shape = [num_core]
    return result
