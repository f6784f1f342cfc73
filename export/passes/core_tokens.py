"""Pass: core-token selection at the prune layer, as TopK + Gather (SPEC §1, §3).

Before: the traced prefill takes a graph input `keep_indices` [S'] (the sequence
positions that layers after the prune layer see) and outputs `act.{l_p}` [S, D].
After:  `keep_indices` is computed in the graph from the activation, a new input
`image_start` [1] int64 says where the image's `n_img` tokens begin, and a new
output `kept_image_tokens` [k] holds the kept indices into the image's tokens.

Every text token is scored above any image token, so one TopK over the whole
sequence with K = S - n_img + k keeps all text and the k best image tokens
(ties to the lower index, as ONNX TopK specifies); a second TopK puts the
kept positions back in their original order. No NonZero: shapes stay static
given S, which TensorRT needs.

With `token_budget="auto"` the count comes from the elbow of the sorted image
scores instead (data-dependent shapes: ONNX Runtime only).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from export.passes.membership import core_neurons, membership
from export.passes.ops import Ops, drop_output, find_tensor, replace_uses

FLOAT, INT64 = int(onnx.TensorProto.FLOAT), int(onnx.TensorProto.INT64)


def insert_core_token_selection(
    graph: gs.Graph,
    prune_layer: int,
    num_image_tokens: int,
    token_budget: int | str,
    tokens_per_set: int,
    num_core: int,
    width: int,
    chunks: int = 1,
    auto_range: tuple[int, int] = (1, 1),
) -> gs.Graph:
    ops = Ops(graph, "cm.tokens")
    # 1. The seams: the traced keep_indices input and the prune layer's activation [S, D].
    keep_input = find_tensor(graph, "keep_indices")
    act = find_tensor(graph, f"act.{prune_layer}")
    image_start = gs.Variable("image_start", dtype=np.int64, shape=[1])
    graph.inputs.append(image_start)

    # 2. Matching score of every position: |C(j) ∩ C*| = sum over the core neurons of member[j].
    member = membership(graph, act, prune_layer, tokens_per_set)
    core = core_neurons(graph, member, prune_layer, num_core, width, chunks)
    on_core = ops("Gather", [member, core], "member_core", dtype=np.float32, attrs={"axis": 1})  # [S, N]
    score = ops("ReduceSum", [on_core, ops.const("axis1", [1], np.int64)], "score", dtype=np.float32,
                attrs={"keepdims": 0})  # fmt: skip  # [S]

    # 3. Text positions score above any image token (a count is at most D).
    seq = ops("Gather", [ops("Shape", [act], "shape", dtype=np.int64), ops.const("zero", 0, np.int64)], "seq",
              dtype=np.int64, attrs={"axis": 0})  # fmt: skip  # S, a scalar
    positions = ops("Range", [ops.const("r0", 0, np.int64), seq, ops.const("r1", 1, np.int64)], "positions",
                    dtype=np.int64)  # fmt: skip  # [S]
    image_stop = ops("Add", [image_start, ops.const("n_img", [num_image_tokens], np.int64)], "image_stop",
                     dtype=np.int64)  # fmt: skip
    is_image = ops("And", [ops("GreaterOrEqual", [positions, image_start], "ge_start", dtype=np.bool_),
                           ops("Less", [positions, image_stop], "lt_stop", dtype=np.bool_)], "is_image",
                   dtype=np.bool_)  # fmt: skip
    ranked = ops("Where", [is_image, score, ops.const("text_score", [float(width + 1)], np.float32)], "ranked",
                 dtype=np.float32)  # fmt: skip

    # 4. How many image tokens to keep: the static budget, or the elbow (auto).
    if token_budget == "auto":
        kept_count = _elbow_count(ops, score, image_start, num_image_tokens, auto_range)  # [1]
    else:
        kept_count = ops.const("k", [int(token_budget)], np.int64)

    # 5. One TopK over the sequence keeps S - n_img + k positions; a second restores their order.
    keep_len = ops("Add", [ops("Sub", [ops("Unsqueeze", [seq, ops.const("ax", [0], np.int64)], "seq1",
                                           dtype=np.int64),
                                       ops.const("n_img2", [num_image_tokens], np.int64)], "text_len", dtype=np.int64),
                           kept_count], "keep_len", dtype=np.int64)  # fmt: skip  # [1]
    _, top = ops("TopK", [ranked, keep_len], "token_topk", attrs={"axis": 0, "largest": 1, "sorted": 1}, outputs=2)
    top.dtype = np.int64
    as_float = ops("Cast", [top], "keep_f", dtype=np.float32, attrs={"to": FLOAT})
    ordered, _ = ops("TopK", [as_float, keep_len], "token_sort", attrs={"axis": 0, "largest": 0, "sorted": 1},
                     outputs=2)  # fmt: skip
    ordered.dtype = np.float32
    keep = ops("Cast", [ordered], "keep_indices", dtype=np.int64, attrs={"to": INT64})  # [S']

    # 6. Later layers read the computed positions; the input goes away.
    replace_uses(graph, keep_input, keep)
    graph.inputs = [t for t in graph.inputs if t is not keep_input]

    # 7. The kept image tokens: positions image_start .. image_start + k of the ordered keep list.
    span = ops("Range", [ops.const("z", 0, np.int64),
                         ops("Squeeze", [kept_count, ops.const("ax0", [0], np.int64)], "k_scalar", dtype=np.int64),
                         ops.const("one", 1, np.int64)], "k_range", dtype=np.int64)  # fmt: skip
    picked = ops("Gather", [keep, ops("Add", [span, image_start], "k_pos", dtype=np.int64)], "kept_pos",
                 dtype=np.int64, attrs={"axis": 0})  # fmt: skip
    kept = ops("Sub", [picked, image_start], "kept", dtype=np.int64)
    kept.name = "kept_image_tokens"
    kept.shape = ["k"] if token_budget == "auto" else [int(token_budget)]
    graph.outputs.append(kept)
    drop_output(graph, act.name)
    return graph.cleanup().toposort()


def _elbow_count(ops: Ops, score: gs.Variable, image_start: gs.Variable, n_img: int, bounds: tuple[int, int]):
    """The adaptive budget of `coreMatching.selection.elbow_count`, in the graph. -> [1] int64

    Scores are integer counts, exact in float32, so the chord distances and their
    argmax are the reference's exactly.
    """
    idx = ops("Add", [ops.const("img_range", np.arange(n_img), np.int64), image_start], "img_idx", dtype=np.int64)
    image_scores = ops("Gather", [score, idx], "img_scores", dtype=np.float32, attrs={"axis": 0})  # [n_img]
    curve, _ = ops("TopK", [image_scores, ops.const("all", [n_img], np.int64)], "curve",
                   attrs={"axis": 0, "largest": 1, "sorted": 1}, outputs=2)  # fmt: skip
    curve.dtype = np.float32
    first = ops("Slice", [curve, ops.const("s0", [0], np.int64), ops.const("e0", [1], np.int64)], "y0",
                dtype=np.float32)  # fmt: skip
    last = ops("Slice", [curve, ops.const("s1", [-1], np.int64), ops.const("e1", [n_img], np.int64)], "y1",
               dtype=np.float32)  # fmt: skip
    x = ops.const("x", np.arange(n_img), np.float32)
    # cross = (n - 1) * (y0 - y) + x * (y1 - y0): the point's distance from the chord, up to a constant.
    cross = ops("Add", [ops("Mul", [ops.const("n1", [n_img - 1.0], np.float32),
                                    ops("Sub", [first, curve], "drop", dtype=np.float32)], "t1", dtype=np.float32),
                        ops("Mul", [x, ops("Sub", [last, first], "rise", dtype=np.float32)], "t2", dtype=np.float32)],
                "cross", dtype=np.float32)  # fmt: skip
    distance = ops("Abs", [cross], "distance", dtype=np.float32)
    at = ops("ArgMax", [distance], "elbow", dtype=np.int64, attrs={"axis": 0, "keepdims": 1, "select_last_index": 0})
    # A straight or flat curve has no elbow: keep one token (then clamp), as the reference.
    scale = ops("Mul", [ops.const("n1b", [n_img - 1.0], np.float32),
                        ops("Abs", [ops("Sub", [first, last], "span", dtype=np.float32)], "abs_span",
                            dtype=np.float32)], "scale", dtype=np.float32)  # fmt: skip
    peak = ops("ReduceMax", [distance], "peak", dtype=np.float32, attrs={"keepdims": 1})
    flat = ops("LessOrEqual", [peak, ops("Mul", [scale, ops.const("tol", [1e-6], np.float32)], "tol_s",
                                         dtype=np.float32)], "flat", dtype=np.bool_)  # fmt: skip
    one = ops.const("one_k", [1], np.int64)
    count = ops("Where", [flat, one, ops("Max", [at, one], "at_least_one", dtype=np.int64)], "elbow_count",
                dtype=np.int64)  # fmt: skip
    lo, hi = bounds
    return ops("Clip", [count, ops.const("lo", lo, np.int64), ops.const("hi", hi, np.int64)], "kept_count",
               dtype=np.int64)  # fmt: skip
