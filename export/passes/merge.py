"""Pass: the merge after the selection, in the graph (`coreMatching.merging`, docs/method.md).

Before: the traced prefill takes the inputs `merge_weights` [S'', S], `keep_positions` [S''] and
`key_bias` [S''] (layers after the prune layer start from `merge_weights @ h`, at those position
ids, with `key_bias` added to every attention logit); `insert_core_token_selection` has computed
`cm.keep.keep_indices` [S'] and `kept_image_tokens` [k].
After:  the three inputs are computed in the graph, and a new output `kept_bias` [k'] holds the
key bias of the image slots (the decode graph adds it to the pruned layers' cached keys).

- summary: S'' = S' + 1. The rows are the one-hot rows of the kept positions plus one row of
  1/m over the m pruned image tokens, ordered so that it lands right after the kept image tokens;
  its position id is the floor of the pruned positions' mean, its bias log(m) (a constant: k is).
- nearest: S'' = S'. Every pruned image token joins the kept token whose core neurons it shares
  most (integer overlaps, exact; ties: the lower kept index); a kept slot's row averages its group,
  its bias is log(group size).
- mass: S'' = S'. The same groups, but every row stays the plain one-hot row of its kept position
  (a kept token keeps its own state); only the bias, log(group size), carries the group.

Equal-and-Cast builds the one-hot rows (no OneHot, no NonZero); everything is static given S.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from buildformat.names import (
    IMAGE_START,
    KEEP_POSITIONS,
    KEPT_BIAS,
    KEPT_IMAGE_TOKENS,
    KEY_BIAS,
    MERGE_SEAMS,
    activation_name,
)
from coreMatching.config import Budgets
from export.passes.core_tokens import COMPUTED_KEEP_INDICES
from export.passes.membership import membership
from export.passes.ops import Ops, find_tensor, replace_uses

FLOAT = 1


def insert_token_merge(graph: gs.Graph, budgets: Budgets) -> gs.Graph:
    assert budgets.token_budget != "auto", "merges are exported for static budgets"
    ops = Ops(graph, "cm.merge")
    n_img, k = budgets.num_image_tokens, int(budgets.token_budget)
    # 1. The seams.
    keep = find_tensor(graph, COMPUTED_KEEP_INDICES)  # [S'] ascending positions
    kept = find_tensor(graph, KEPT_IMAGE_TOKENS)  # [k]
    image_start = find_tensor(graph, IMAGE_START)  # [1]
    act = find_tensor(graph, activation_name(budgets.prune_layer))  # [S, D]
    traced = {name: find_tensor(graph, name) for name in MERGE_SEAMS}

    # 2. Where the image is in the sequence, and which image tokens were pruned.
    seq = ops(
        "Gather",
        [ops("Shape", [act], "shape", dtype=np.int64), ops.const("zero", 0, np.int64)],
        "seq",
        dtype=np.int64,
        attrs={"axis": 0},
    )
    positions = ops(
        "Range", [ops.const("r0", 0, np.int64), seq, ops.const("r1", 1, np.int64)], "positions", dtype=np.int64
    )  # [S]
    offset = ops("Sub", [positions, image_start], "offset", dtype=np.int64)  # [S]
    is_image = ops(
        "And",
        [
            ops("GreaterOrEqual", [offset, ops.const("z0", 0, np.int64)], "ge", dtype=np.bool_),
            ops("Less", [offset, ops.const("n", n_img, np.int64)], "lt", dtype=np.bool_),
        ],
        "is_image",
        dtype=np.bool_,
    )  # [S]
    slot = ops(
        "Clip", [offset, ops.const("lo", 0, np.int64), ops.const("hi", n_img - 1, np.int64)], "slot", dtype=np.int64
    )  # [S]
    one_hot = _equal_rows(ops, keep, positions, "rows")  # [S', S]: the plain gather of the kept positions
    image_col = ops(
        "Unsqueeze",
        [ops.const("img", np.arange(n_img), np.int64), ops.const("a1", [1], np.int64)],
        "img_col",
        dtype=np.int64,
    )
    is_kept = ops("Equal", [image_col, kept], "is_kept", dtype=np.bool_)  # [n_img, k]

    if budgets.token_merge == "summary":
        weights, keep_positions, key_bias, kept_bias = _summary(
            ops, keep, image_start, positions, is_image, slot, one_hot, is_kept, n_img, k
        )
    elif budgets.token_merge in ("nearest", "mass"):
        member = membership(graph, act, budgets.prune_layer, budgets.tokens_per_neuron_set)  # [S, D]
        weights, keep_positions, key_bias, kept_bias = _nearest(
            ops,
            member,
            keep,
            kept,
            image_start,
            is_image,
            slot,
            one_hot,
            is_kept,
            n_img,
            k,
            average=budgets.token_merge == "nearest",
        )
    else:
        raise ValueError(f"no merge pass for {budgets.token_merge!r}")

    # 3. The traced inputs are computed now; the decode graph gets the image slots' bias.
    for name, value in zip(MERGE_SEAMS, (weights, keep_positions, key_bias), strict=True):
        replace_uses(graph, traced[name], value)
    graph.inputs = [t for t in graph.inputs if t.name not in traced]
    kept_bias.name = KEPT_BIAS
    kept_bias.shape = [budgets.image_slots]
    graph.outputs.append(kept_bias)
    return graph.cleanup().toposort()


def _equal_rows(ops: Ops, index: gs.Variable, positions: gs.Variable, name: str) -> gs.Variable:
    """One-hot rows: out[i, j] = 1.0 where index[i] == positions[j]. -> [len(index), S] float"""
    column = ops("Unsqueeze", [index, ops.const("a1", [1], np.int64)], f"{name}_col", dtype=np.int64)
    equal = ops("Equal", [column, positions], f"{name}_eq", dtype=np.bool_)
    return ops("Cast", [equal], name, dtype=np.float32, attrs={"to": FLOAT})


def _summary(ops, keep, image_start, positions, is_image, slot, one_hot, is_kept, n_img: int, k: int):
    pruned_count = n_img - k  # static
    kept_any = ops(
        "ReduceMax",
        [ops("Cast", [is_kept], "is_kept_f", dtype=np.float32, attrs={"to": FLOAT}), ops.const("ax1", [1], np.int64)],
        "kept_img",
        dtype=np.float32,
        attrs={"keepdims": 0},
    )  # [n_img] 1.0 where kept
    pruned_img = ops("Sub", [ops.const("one", 1.0, np.float32), kept_any], "pruned_img", dtype=np.float32)
    pruned = ops(
        "Where",
        [
            is_image,
            ops("Gather", [pruned_img, slot], "pruned_spread", dtype=np.float32, attrs={"axis": 0}),
            ops.const("zf", 0.0, np.float32),
        ],
        "pruned",
        dtype=np.float32,
    )  # [S] 1.0 at the pruned image tokens
    # The summary row: 1/m over the pruned tokens; its position: the floor of their mean position.
    row = ops(
        "Unsqueeze",
        [
            ops("Div", [pruned, ops.const("m", float(pruned_count), np.float32)], "mean_row", dtype=np.float32),
            ops.const("a0", [0], np.int64),
        ],
        "summary_row",
        dtype=np.float32,
    )  # [1, S]
    pruned_pos = ops(
        "Mul",
        [positions, ops("Cast", [pruned], "pruned_i", dtype=np.int64, attrs={"to": 7})],
        "pruned_pos",
        dtype=np.int64,
    )
    total = ops(
        "ReduceSum", [pruned_pos, ops.const("ax0", [0], np.int64)], "pos_sum", dtype=np.int64, attrs={"keepdims": 1}
    )  # [1]
    where = ops("Div", [total, ops.const("m_i", [pruned_count], np.int64)], "summary_pos", dtype=np.int64)  # floor
    # Order: the summary goes after the kept image tokens, before the text that follows the image.
    key = ops(
        "Concat",
        [
            ops("Cast", [keep], "keep_f", dtype=np.float32, attrs={"to": FLOAT}),
            ops(
                "Add",
                [
                    ops("Cast", [image_start], "start_f", dtype=np.float32, attrs={"to": FLOAT}),
                    ops.const("after", [n_img - 0.5], np.float32),
                ],
                "summary_key",
                dtype=np.float32,
            ),
        ],
        "order_key",
        dtype=np.float32,
        attrs={"axis": 0},
    )
    count = ops("Shape", [key], "rows_n", dtype=np.int64)  # [1] = S' + 1
    ordered, order = ops("TopK", [key, count], "order", attrs={"axis": 0, "largest": 0, "sorted": 1}, outputs=2)
    ordered.dtype, order.dtype = np.float32, np.int64
    rows = ops("Concat", [one_hot, row], "rows_ext", dtype=np.float32, attrs={"axis": 0})  # [S' + 1, S]
    weights = ops("Gather", [rows, order], "weights", dtype=np.float32, attrs={"axis": 0})
    positions_ext = ops("Concat", [keep, where], "pos_ext", dtype=np.int64, attrs={"axis": 0})
    keep_positions = ops("Gather", [positions_ext, order], KEEP_POSITIONS, dtype=np.int64, attrs={"axis": 0})
    keep_f = ops("Cast", [keep], "keep_float", dtype=np.float32, attrs={"to": FLOAT})
    zeros = ops("Mul", [keep_f, ops.const("z", 0.0, np.float32)], "zeros", dtype=np.float32)  # [S']
    log_m = math.log(pruned_count)
    key_bias = ops(
        "Gather",
        [
            ops(
                "Concat",
                [zeros, ops.const("log_m", [log_m], np.float32)],
                "bias_ext",
                dtype=np.float32,
                attrs={"axis": 0},
            ),
            order,
        ],
        KEY_BIAS,
        dtype=np.float32,
        attrs={"axis": 0},
    )
    kept_bias = ops("Identity", [ops.const("slots", [0.0] * k + [log_m], np.float32)], KEPT_BIAS, dtype=np.float32)
    return weights, keep_positions, key_bias, kept_bias


def _nearest(
    ops, member, keep, kept, image_start, is_image, slot, one_hot, is_kept, n_img: int, k: int, average: bool = True
):
    """The groups of `nearest` and `mass`; average=False (mass): the rows stay one-hot, only the bias groups."""
    # 1. Each image token's owner: the kept token sharing most core neurons (exact integer overlaps).
    image = ops(
        "Gather",
        [member, ops("Add", [ops.const("rng", np.arange(n_img), np.int64), image_start], "img_rows", dtype=np.int64)],
        "img_member",
        dtype=np.float32,
        attrs={"axis": 0},
    )
    heads = ops("Gather", [image, kept], "kept_member", dtype=np.float32, attrs={"axis": 0})  # [k, D]
    overlap = ops(
        "MatMul",
        [image, ops("Transpose", [heads], "kept_t", dtype=np.float32, attrs={"perm": [1, 0]})],
        "overlap",
        dtype=np.float32,
    )  # [n_img, k]
    one = ops.const("k1", [1], np.int64)
    _, best = ops("TopK", [overlap, one], "best", attrs={"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    best.dtype = np.int64  # [n_img, 1] ties: the lower kept index
    kept_f = ops("Cast", [is_kept], "is_kept_f", dtype=np.float32, attrs={"to": FLOAT})  # [n_img, k]
    _, own = ops("TopK", [kept_f, one], "own", attrs={"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    own.dtype = np.int64
    is_head = ops(
        "ReduceMax", [kept_f, ops.const("ax1", [1], np.int64)], "is_head", dtype=np.float32, attrs={"keepdims": 1}
    )  # [n_img, 1]
    owner = ops(
        "Where",
        [ops("Greater", [is_head, ops.const("half", 0.5, np.float32)], "head_b", dtype=np.bool_), own, best],
        "owner",
        dtype=np.int64,
    )  # [n_img, 1]
    # 2. Groups: G [k, n_img] one-hot by owner, averaged; the bias is log(group size).
    groups = ops(
        "Cast",
        [ops("Equal", [owner, ops.const("slots_k", np.arange(k), np.int64)], "owned", dtype=np.bool_)],
        "owned_f",
        dtype=np.float32,
        attrs={"to": FLOAT},
    )
    groups = ops("Transpose", [groups], "groups", dtype=np.float32, attrs={"perm": [1, 0]})  # [k, n_img]
    size = ops(
        "ReduceSum", [groups, ops.const("ax1b", [1], np.int64)], "size", dtype=np.float32, attrs={"keepdims": 1}
    )  # [k, 1] >= 1
    # 3. The kept sequence's image slot rows (image_start .. image_start + k) and their bias.
    image_row, row_slot = _image_rows(ops, keep, image_start, k)  # [S'] bool, [S'] slot
    log_size = ops(
        "Log",
        [ops("Squeeze", [size, ops.const("a1b", [1], np.int64)], "size_k", dtype=np.float32)],
        KEPT_BIAS,
        dtype=np.float32,
    )  # [k]
    key_bias = ops(
        "Where",
        [
            image_row,
            ops("Gather", [log_size, row_slot], "bias_spread", dtype=np.float32, attrs={"axis": 0}),
            ops.const("zb", 0.0, np.float32),
        ],
        KEY_BIAS,
        dtype=np.float32,
    )  # [S']
    if not average:
        return one_hot, keep, key_bias, log_size  # mass: each kept token keeps its own state
    # nearest: an image slot's row averages its group.
    mean = ops("Div", [groups, size], "mean", dtype=np.float32)  # [k, n_img]
    spread = ops("Gather", [mean, slot], "mean_spread", dtype=np.float32, attrs={"axis": 1})  # [k, S]
    merged = ops("Where", [is_image, spread, ops.const("zf", 0.0, np.float32)], "merged", dtype=np.float32)
    picked = ops("Gather", [merged, row_slot], "picked_rows", dtype=np.float32, attrs={"axis": 0})  # [S', S]
    image_row_2d = ops("Unsqueeze", [image_row, ops.const("a1", [1], np.int64)], "image_row_col", dtype=np.bool_)
    weights = ops("Where", [image_row_2d, picked, one_hot], "weights", dtype=np.float32)  # [S', S]
    return weights, keep, key_bias, log_size


def _image_rows(ops: Ops, keep: gs.Variable, image_start: gs.Variable, k: int) -> tuple[gs.Variable, gs.Variable]:
    """Which rows of the kept sequence [S'] are image slots, and each row's slot (clipped to 0..k-1)."""
    rows = ops(
        "Range",
        [
            ops.const("r0", 0, np.int64),
            ops(
                "Squeeze",
                [ops("Shape", [keep], "keep_n", dtype=np.int64), ops.const("a0", [0], np.int64)],
                "keep_len",
                dtype=np.int64,
            ),
            ops.const("r1", 1, np.int64),
        ],
        "row_idx",
        dtype=np.int64,
    )  # [S']
    row_off = ops("Sub", [rows, image_start], "row_off", dtype=np.int64)
    image_row = ops(
        "And",
        [
            ops("GreaterOrEqual", [row_off, ops.const("z0", 0, np.int64)], "rge", dtype=np.bool_),
            ops("Less", [row_off, ops.const("kk", k, np.int64)], "rlt", dtype=np.bool_),
        ],
        "image_row",
        dtype=np.bool_,
    )  # [S']
    row_slot = ops(
        "Clip", [row_off, ops.const("lo", 0, np.int64), ops.const("hi", k - 1, np.int64)], "row_slot", dtype=np.int64
    )
    return image_row, row_slot
