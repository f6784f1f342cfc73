"""Pass: core-token selection at the prune layer, as TopK + Gather (docs/method.md, docs/architecture.md).

Before: `cm.tokens.image_scores` [n_img] holds the selector's score of every image token
(`insert_token_scores`), and the traced prefill takes a graph input `keep_indices` [S'] (the
sequence positions that layers after the prune layer see) and outputs `act.{l_p}` [S, D].
After:  `keep_indices` is computed in the graph (named `cm.keep.keep_indices` when a merge pass
takes it from here instead of the traced input) and a new output `kept_image_tokens` [k] holds
the kept indices into the image's tokens.

Every text token is scored above any image token, so one TopK over the whole sequence with
K = S - n_img + k keeps all text and the k best image tokens (ties to the lower index, as ONNX
TopK specifies); a second TopK puts the kept positions back in their original order. No NonZero:
shapes stay static given S, which TensorRT needs.

With `token_budget="auto"` the count comes from the elbow of the sorted image scores instead
(data-dependent shapes: ONNX Runtime only).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from buildformat.names import IMAGE_START, KEEP_INDICES, KEPT_IMAGE_TOKENS, activation_name
from coreMatching.config import Budgets
from export.passes.ops import Ops, drop_output, find_tensor, replace_uses

FLOAT, INT64 = int(onnx.TensorProto.FLOAT), int(onnx.TensorProto.INT64)
PREFIX = "cm.keep"
# The computed keep_indices: a merge pass reads it, since the traced input of that name is gone then.
COMPUTED_KEEP_INDICES = f"{PREFIX}.{KEEP_INDICES}"


def insert_core_token_selection(graph: gs.Graph, budgets: Budgets, scores: gs.Variable) -> gs.Graph:
    ops = Ops(graph, PREFIX)
    n_img = budgets.num_image_tokens
    # 1. The seams: the prune layer's activation [S, D] (for the sequence length) and the image start.
    act = find_tensor(graph, activation_name(budgets.prune_layer))
    image_start = find_tensor(graph, IMAGE_START)

    # 2. Every position's rank score: the image tokens' scores, text positions above any of them.
    seq = ops(
        "Gather",
        [ops("Shape", [act], "shape", dtype=np.int64), ops.const("zero", 0, np.int64)],
        "seq",
        dtype=np.int64,
        attrs={"axis": 0},
    )  # S, a scalar
    positions = ops(
        "Range", [ops.const("r0", 0, np.int64), seq, ops.const("r1", 1, np.int64)], "positions", dtype=np.int64
    )  # [S]
    image_stop = ops("Add", [image_start, ops.const("n_img", [n_img], np.int64)], "image_stop", dtype=np.int64)
    is_image = ops(
        "And",
        [
            ops("GreaterOrEqual", [positions, image_start], "ge_start", dtype=np.bool_),
            ops("Less", [positions, image_stop], "lt_stop", dtype=np.bool_),
        ],
        "is_image",
        dtype=np.bool_,
    )
    slot = ops(
        "Clip",
        [
            ops("Sub", [positions, image_start], "offset", dtype=np.int64),
            ops.const("lo", 0, np.int64),
            ops.const("hi", n_img - 1, np.int64),
        ],
        "slot",
        dtype=np.int64,
    )  # [S] an image index for every position
    spread = ops("Gather", [scores, slot], "spread", dtype=np.float32, attrs={"axis": 0})  # [S]
    top = ops(
        "Add",
        [
            ops("ReduceMax", [scores], "max_score", dtype=np.float32, attrs={"keepdims": 1}),
            ops.const("above", [1.0], np.float32),
        ],
        "text_score",
        dtype=np.float32,
    )  # [1]
    ranked = ops("Where", [is_image, spread, top], "ranked", dtype=np.float32)  # [S]

    # 3. How many image tokens to keep: the static budget, or the elbow (auto).
    if budgets.token_budget == "auto":
        kept_count = _elbow_count(ops, scores, n_img, budgets.auto_range)  # [1]
    else:
        kept_count = ops.const("k", [int(budgets.token_budget)], np.int64)

    # 4. One TopK over the sequence keeps S - n_img + k positions; a second restores their order.
    keep_len = ops(
        "Add",
        [
            ops(
                "Sub",
                [
                    ops("Unsqueeze", [seq, ops.const("ax", [0], np.int64)], "seq1", dtype=np.int64),
                    ops.const("n_img2", [n_img], np.int64),
                ],
                "text_len",
                dtype=np.int64,
            ),
            kept_count,
        ],
        "keep_len",
        dtype=np.int64,
    )  # [1]
    _, top_idx = ops("TopK", [ranked, keep_len], "token_topk", attrs={"axis": 0, "largest": 1, "sorted": 1}, outputs=2)
    top_idx.dtype = np.int64
    as_float = ops("Cast", [top_idx], "keep_f", dtype=np.float32, attrs={"to": FLOAT})
    ordered, _ = ops(
        "TopK", [as_float, keep_len], "token_sort", attrs={"axis": 0, "largest": 0, "sorted": 1}, outputs=2
    )
    ordered.dtype = np.float32
    keep = ops("Cast", [ordered], KEEP_INDICES, dtype=np.int64, attrs={"to": INT64})  # [S']
    keep.shape = ["S_kept"]

    # 5. Later layers read the computed positions; the traced input goes away (a merge pass reads
    #    `cm.keep.keep_indices` instead when the trace has merge inputs).
    traced = graph.tensors().get(KEEP_INDICES)
    if traced is not None and traced in graph.inputs:
        replace_uses(graph, traced, keep)
        graph.inputs = [t for t in graph.inputs if t is not traced]

    # 6. The kept image tokens: positions image_start .. image_start + k of the ordered keep list.
    span = ops(
        "Range",
        [
            ops.const("z", 0, np.int64),
            ops("Squeeze", [kept_count, ops.const("ax0", [0], np.int64)], "k_scalar", dtype=np.int64),
            ops.const("one", 1, np.int64),
        ],
        "k_range",
        dtype=np.int64,
    )
    picked = ops(
        "Gather",
        [keep, ops("Add", [span, image_start], "k_pos", dtype=np.int64)],
        "kept_pos",
        dtype=np.int64,
        attrs={"axis": 0},
    )
    kept = ops("Sub", [picked, image_start], "kept", dtype=np.int64)
    kept.name = KEPT_IMAGE_TOKENS
    kept.shape = ["k"] if budgets.token_budget == "auto" else [int(budgets.token_budget)]
    graph.outputs.append(kept)
    drop_output(graph, act.name)
    return graph.cleanup().toposort()


def _elbow_count(ops: Ops, image_scores: gs.Variable, n_img: int, bounds: tuple[int, int]):
    """The adaptive budget of `coreMatching.selection.elbow_count`, in the graph. -> [1] int64

    For integer-count scores (exact in float32) the chord distances and their argmax are the
    reference's exactly.
    """
    curve, _ = ops(
        "TopK",
        [image_scores, ops.const("all", [n_img], np.int64)],
        "curve",
        attrs={"axis": 0, "largest": 1, "sorted": 1},
        outputs=2,
    )
    curve.dtype = np.float32
    first = ops(
        "Slice", [curve, ops.const("s0", [0], np.int64), ops.const("e0", [1], np.int64)], "y0", dtype=np.float32
    )
    last = ops(
        "Slice", [curve, ops.const("s1", [-1], np.int64), ops.const("e1", [n_img], np.int64)], "y1", dtype=np.float32
    )
    x = ops.const("x", np.arange(n_img), np.float32)
    # cross = (n - 1) * (y0 - y) + x * (y1 - y0): the point's distance from the chord, up to a constant.
    cross = ops(
        "Add",
        [
            ops(
                "Mul",
                [ops.const("n1", [n_img - 1.0], np.float32), ops("Sub", [first, curve], "drop", dtype=np.float32)],
                "t1",
                dtype=np.float32,
            ),
            ops("Mul", [x, ops("Sub", [last, first], "rise", dtype=np.float32)], "t2", dtype=np.float32),
        ],
        "cross",
        dtype=np.float32,
    )
    distance = ops("Abs", [cross], "distance", dtype=np.float32)
    at = ops("ArgMax", [distance], "elbow", dtype=np.int64, attrs={"axis": 0, "keepdims": 1, "select_last_index": 0})
    # A straight or flat curve has no elbow: keep one token (then clamp), as the reference.
    scale = ops(
        "Mul",
        [
            ops.const("n1b", [n_img - 1.0], np.float32),
            ops("Abs", [ops("Sub", [first, last], "span", dtype=np.float32)], "abs_span", dtype=np.float32),
        ],
        "scale",
        dtype=np.float32,
    )
    peak = ops("ReduceMax", [distance], "peak", dtype=np.float32, attrs={"keepdims": 1})
    flat = ops(
        "LessOrEqual",
        [peak, ops("Mul", [scale, ops.const("tol", [1e-6], np.float32)], "tol_s", dtype=np.float32)],
        "flat",
        dtype=np.bool_,
    )
    one = ops.const("one_k", [1], np.int64)
    count = ops(
        "Where", [flat, one, ops("Max", [at, one], "at_least_one", dtype=np.int64)], "elbow_count", dtype=np.int64
    )
    lo, hi = bounds
    return ops(
        "Clip", [count, ops.const("lo", lo, np.int64), ops.const("hi", hi, np.int64)], "kept_count", dtype=np.int64
    )
