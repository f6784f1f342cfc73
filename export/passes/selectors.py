"""Pass: the token selector's scores at the prune layer, in the graph (docs/method.md, docs/architecture.md).

Before: the traced prefill outputs `act.{l_p}` [S, D] (and `attn_last.{l_p}` [H, S] for selectors
that read attention).
After:  a new input `image_start` [1] int64 says where the image's `n_img` tokens begin, and the
tensor `cm.tokens.image_scores` [n_img] float holds the selector's score of every image token:
its `k` highest, ties to the lower index, are the kept tokens (`insert_core_token_selection` then
turns them into TopK + Gather). The attention seam is consumed here.

One graph rule per registered selector (`GRAPH_RULES`, keyed like `coreMatching.rules.RULES`),
each the torch rule's arithmetic with ONNX operators TensorRT builds: greedy rules are unrolled
for `k` steps, no NonZero and no Loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from buildformat.names import IMAGE_START, activation_name, attention_name
from coreMatching.config import Budgets
from coreMatching.rules import COVERAGE_FLOOR_HALVINGS, COVERAGE_QUERY_WEIGHT, DPP_RELEVANCE
from coreMatching.selection import random_scores
from export.passes.membership import core_neurons, membership
from export.passes.ops import Ops, drop_output, find_tensor


@dataclass
class PruneLayer:
    """The prune layer's tensors in the graph, and the budgets they are selected with."""

    graph: gs.Graph
    ops: Ops
    budgets: Budgets
    act: gs.Variable  # [S, D] the FFN activation of every prompt token
    image_start: gs.Variable  # [1] int64 graph input
    image_rows: gs.Variable  # [n_img] int64: image_start + 0..n_img-1
    last_row: gs.Variable  # scalar int64: S - 1, the last prompt token
    seed: int

    def member(self) -> gs.Variable:
        """Token-wise core neurons of every prompt token, float 0/1 [S, D] (built once per layer)."""
        return membership(self.graph, self.act, self.budgets.prune_layer, self.budgets.tokens_per_neuron_set)

    def image(self, rows: gs.Variable, name: str) -> gs.Variable:
        """rows [S, ...] -> the image tokens' rows [n_img, ...]"""
        return self.ops("Gather", [rows, self.image_rows], name, dtype=np.float32, attrs={"axis": 0})

    def last(self, rows: gs.Variable, name: str) -> gs.Variable:
        """rows [S, D] -> the last prompt token's row [D]"""
        return self.ops("Gather", [rows, self.last_row], name, dtype=np.float32, attrs={"axis": 0})


GraphRule = Callable[[PruneLayer], gs.Variable]
GRAPH_RULES: dict[str, GraphRule] = {}


def graph_rule(name: str) -> Callable[[GraphRule], GraphRule]:
    def add(fn: GraphRule) -> GraphRule:
        GRAPH_RULES[name] = fn
        return fn

    return add


def insert_token_scores(graph: gs.Graph, budgets: Budgets, seed: int = 0) -> gs.Variable:
    """Adds the `image_start` input and the selector's scores; returns `cm.tokens.image_scores` [n_img]."""
    ops = Ops(graph, "cm.tokens")
    act = find_tensor(graph, activation_name(budgets.prune_layer))
    image_start = gs.Variable(IMAGE_START, dtype=np.int64, shape=[1])
    graph.inputs.append(image_start)
    n_img = budgets.num_image_tokens
    shape = ops("Shape", [act], "shape", dtype=np.int64)
    seq = ops("Gather", [shape, ops.const("zero", 0, np.int64)], "seq", dtype=np.int64, attrs={"axis": 0})  # S
    last = ops("Sub", [seq, ops.const("one", 1, np.int64)], "last", dtype=np.int64)  # S - 1, a scalar
    rows = ops("Add", [ops.const("img_range", np.arange(n_img), np.int64), image_start], "img_idx", dtype=np.int64)
    layer = PruneLayer(graph, ops, budgets, act, image_start, rows, last, seed)
    try:
        rule = GRAPH_RULES[budgets.token_selector]
    except KeyError:
        raise KeyError(f"no graph rule for token selector {budgets.token_selector!r}") from None
    scores = rule(layer)
    scores.name = "cm.tokens.image_scores"
    scores.shape = [n_img]
    return scores


@graph_rule("prompt-frequency")
def prompt_frequency(layer: PruneLayer) -> gs.Variable:
    """|C(j) ∩ C*|: the sum of member[j] over the prompt's core neurons."""
    b, ops = layer.budgets, layer.ops
    member = layer.member()  # [S, D]
    core = core_neurons(layer.graph, member, b.prune_layer, b.core_neurons, b.intermediate_size, b.neuron_chunks)
    on_core = ops(
        "Gather", [layer.image(member, "img_member"), core], "member_core", dtype=np.float32, attrs={"axis": 1}
    )  # [n_img, N]
    axis = ops.const("axis1", [1], np.int64)
    return ops("ReduceSum", [on_core, axis], "score", dtype=np.float32, attrs={"keepdims": 0})  # [n_img]


@graph_rule("query-overlap")
def query_overlap(layer: PruneLayer) -> gs.Variable:
    """|{a_j > 0} ∩ {a_q > 0}|, q the last prompt token: a MatMul of 0/1 rows (exact integer sums)."""
    ops = layer.ops
    positive = ops("Greater", [layer.act, ops.const("zero_f", 0.0, np.float32)], "active_b", dtype=np.bool_)
    active = ops("Cast", [positive], "active", dtype=np.float32, attrs={"to": 1})  # [S, D]
    query = layer.last(active, "query_active")  # [D]
    return ops("MatMul", [layer.image(active, "img_active"), query], "score", dtype=np.float32)  # [n_img]


@graph_rule("fastv")
def fastv(layer: PruneLayer) -> gs.Variable:
    """The last prompt token's attention to each image token, mean over heads (the attention seam)."""
    ops = layer.ops
    name = attention_name(layer.budgets.prune_layer)
    probs = find_tensor(layer.graph, name)  # [H, S]
    mean = ops(
        "ReduceMean", [probs, ops.const("axis0", [0], np.int64)], "head_mean", dtype=np.float32, attrs={"keepdims": 0}
    )  # [S]
    drop_output(layer.graph, name)
    return ops("Gather", [mean, layer.image_rows], "score", dtype=np.float32, attrs={"axis": 0})  # [n_img]


@graph_rule("random")
def random(layer: PruneLayer) -> gs.Variable:
    """A constant: the reference's seeded permutation, baked into the graph."""
    values = random_scores(layer.budgets.num_image_tokens, layer.seed).numpy().astype(np.float32)
    return layer.ops("Identity", [layer.ops.const("random", values, np.float32)], "score", dtype=np.float32)


def _pick(ops: Ops, gain: gs.Variable, taken: gs.Variable, step: int) -> gs.Variable:
    """The first maximum of `gain` among the tokens not taken yet. -> scalar int64"""
    masked = ops("Where", [taken, ops.const("minus_one", -1.0, np.float32), gain], f"masked{step}", dtype=np.float32)
    _, index = ops(
        "TopK",
        [masked, ops.const("k1", [1], np.int64)],
        f"pick{step}",
        attrs={"axis": 0, "largest": 1, "sorted": 1},
        outputs=2,
    )  # ties: the lower index
    index.dtype = np.int64
    return ops("Squeeze", [index, ops.const("ax0", [0], np.int64)], f"picked{step}", dtype=np.int64)


def _record(ops: Ops, picked: gs.Variable, taken: gs.Variable, scores: gs.Variable, step: int, k: int, n: int):
    """Marks the pick taken and scores it k - step. -> (taken [n] bool, scores [n] float)"""
    hit = ops("Equal", [ops.const("range", np.arange(n), np.int64), picked], f"hit{step}", dtype=np.bool_)
    taken = ops("Or", [taken, hit], f"taken{step}", dtype=np.bool_)
    scores = ops(
        "Where", [hit, ops.const("rank", float(k - step), np.float32), scores], f"scores{step}", dtype=np.float32
    )
    return taken, scores


@graph_rule("core-coverage")
def core_coverage(layer: PruneLayer) -> gs.Variable:
    """`coreMatching.rules.core_coverage` unrolled for k steps (weights halve where a pick covers)."""
    ops, b = layer.ops, layer.budgets
    assert b.token_budget != "auto", "greedy selectors take a static budget"
    k, n, width = int(b.token_budget), b.num_image_tokens, b.intermediate_size
    member = layer.member()  # [S, D] 0/1
    image = layer.image(member, "img_member")  # [n_img, D]
    query = layer.last(member, "query_member")  # [D]
    weight = ops(
        "Add",
        [
            ops.const("base", 1.0, np.float32),
            ops("Mul", [query, ops.const("qw", COVERAGE_QUERY_WEIGHT, np.float32)], "query_weight", dtype=np.float32),
        ],
        "weight0",
        dtype=np.float32,
    )  # [D]
    halvings = ops.const("halvings0", np.zeros(width), np.float32)
    taken = ops.const("taken0", np.zeros(n, dtype=bool), np.bool_)
    scores = ops.const("scores0", np.zeros(n), np.float32)
    for step in range(k):
        gain = ops("MatMul", [image, weight], f"gain{step}", dtype=np.float32)  # [n_img]
        picked = _pick(ops, gain, taken, step)
        taken, scores = _record(ops, picked, taken, scores, step, k, n)
        if step == k - 1:
            break
        row = ops("Gather", [image, picked], f"row{step}", dtype=np.float32, attrs={"axis": 0})  # [D]
        covered = ops("Greater", [row, ops.const("zero_f", 0.0, np.float32)], f"covered{step}", dtype=np.bool_)
        room = ops(
            "Less",
            [halvings, ops.const("floor", float(COVERAGE_FLOOR_HALVINGS), np.float32)],
            f"room{step}",
            dtype=np.bool_,
        )
        halve = ops("And", [covered, room], f"halve{step}", dtype=np.bool_)
        factor = ops(
            "Where",
            [halve, ops.const("half", 0.5, np.float32), ops.const("whole", 1.0, np.float32)],
            f"factor{step}",
            dtype=np.float32,
        )
        weight = ops("Mul", [weight, factor], f"weight{step + 1}", dtype=np.float32)
        halvings = ops(
            "Add",
            [halvings, ops("Cast", [halve], f"halved{step}", dtype=np.float32, attrs={"to": 1})],
            f"halvings{step + 1}",
            dtype=np.float32,
        )
    return scores


@graph_rule("max-min")
def max_min(layer: PruneLayer) -> gs.Variable:
    """`coreMatching.rules.max_min` unrolled for k steps over the cosine distances [n_img, n_img]."""
    ops, b = layer.ops, layer.budgets
    assert b.token_budget != "auto", "greedy selectors take a static budget"
    k, n = int(b.token_budget), b.num_image_tokens
    cos = _cosines(layer)  # [n_img, n_img]
    dist = ops("Sub", [ops.const("one_f", 1.0, np.float32), cos], "dist", dtype=np.float32)
    off = ops(
        "Where",
        [ops.const("eye", np.eye(n, dtype=bool), np.bool_), ops.const("inf", np.inf, np.float32), dist],
        "off_diag",
        dtype=np.float32,
    )
    nearest = ops(
        "ReduceMin", [off, ops.const("ax1b", [1], np.int64)], "nearest", dtype=np.float32, attrs={"keepdims": 0}
    )  # [n_img]
    taken = ops.const("taken0", np.zeros(n, dtype=bool), np.bool_)
    scores = ops.const("scores0", np.zeros(n), np.float32)
    closest = None
    for step in range(k):
        picked = _pick(ops, nearest if closest is None else closest, taken, step)
        taken, scores = _record(ops, picked, taken, scores, step, k, n)
        if step == k - 1:
            break
        row = ops("Gather", [dist, picked], f"dist_row{step}", dtype=np.float32, attrs={"axis": 0})  # [n_img]
        closest = row if closest is None else ops("Min", [closest, row], f"closest{step}", dtype=np.float32)
    return scores


def _cosines(layer: PruneLayer) -> gs.Variable:
    """The cosines of the image tokens' FFN activations (`coreMatching.rules.cosine_distance`). -> [n_img, n_img]"""
    ops = layer.ops
    # A float16 build's activations are cast first: the cosines (and every rule on them) run in float32.
    act = ops("Cast", [layer.act], "act_f32", dtype=np.float32, attrs={"to": 1})
    x = layer.image(act, "img_act")  # [n_img, D]
    square = ops(
        "ReduceSum",
        [ops("Mul", [x, x], "sq", dtype=np.float32), ops.const("ax1", [1], np.int64)],
        "sq_sum",
        dtype=np.float32,
        attrs={"keepdims": 1},
    )  # [n_img, 1]
    norm = ops(
        "Max",
        [ops("Sqrt", [square], "norm_raw", dtype=np.float32), ops.const("eps", 1e-12, np.float32)],
        "norm",
        dtype=np.float32,
    )
    unit = ops("Div", [x, norm], "unit", dtype=np.float32)
    return ops(
        "MatMul",
        [unit, ops("Transpose", [unit], "unit_t", dtype=np.float32, attrs={"perm": [1, 0]})],
        "cos",
        dtype=np.float32,
    )


@graph_rule("conditional-dpp")
def conditional_dpp(layer: PruneLayer) -> gs.Variable:
    """`coreMatching.rules.conditional_dpp` unrolled for k steps: the kernel L = r cos^2 r, then each step
    the largest residual, its Cholesky column e = (L[j] - B B[j]) / sqrt(d_j^2), and d^2 -= e^2."""
    ops, b = layer.ops, layer.budgets
    assert b.token_budget != "auto", "greedy selectors take a static budget"
    k, n = int(b.token_budget), b.num_image_tokens
    member = layer.member()  # [S, D] 0/1
    overlap = ops(
        "MatMul", [layer.image(member, "img_member"), layer.last(member, "query_member")], "overlap", dtype=np.float32
    )  # [n_img] integer counts
    scaled = ops("Mul", [ops.const("dpp_scale", DPP_RELEVANCE, np.float32), overlap], "rel_scaled", dtype=np.float32)
    relevance = ops(
        "Exp",
        [
            ops(
                "Div",
                [scaled, ops.const("k_tok", float(b.tokens_per_neuron_set), np.float32)],
                "rel_share",
                dtype=np.float32,
            )
        ],
        "relevance",
        dtype=np.float32,
    )  # [n_img]
    column = ops("Unsqueeze", [relevance, ops.const("a1", [1], np.int64)], "rel_col", dtype=np.float32)  # [n, 1]
    cos = _cosines(layer)
    similarity = ops("Mul", [cos, cos], "cos_sq", dtype=np.float32)  # [n, n]
    kernel = ops(
        "Mul", [ops("Mul", [column, similarity], "rel_sim", dtype=np.float32), relevance], "kernel", dtype=np.float32
    )  # [n, n]
    residual = ops("Mul", [relevance, relevance], "residual0", dtype=np.float32)  # [n] d^2 = L_jj = r_j^2 exactly
    taken = ops.const("taken0", np.zeros(n, dtype=bool), np.bool_)
    scores = ops.const("scores0", np.zeros(n), np.float32)
    basis = None  # [n, step] the Cholesky columns of the picks so far
    for step in range(k):
        picked = _pick(ops, residual, taken, step)
        taken, scores = _record(ops, picked, taken, scores, step, k, n)
        if step == k - 1:
            break
        row = ops("Gather", [kernel, picked], f"kernel_row{step}", dtype=np.float32, attrs={"axis": 0})  # [n]
        if basis is not None:
            mine = ops("Gather", [basis, picked], f"basis_row{step}", dtype=np.float32, attrs={"axis": 0})  # [step]
            projected = ops("MatMul", [basis, mine], f"projected{step}", dtype=np.float32)  # [n]
            row = ops("Sub", [row, projected], f"off_span{step}", dtype=np.float32)
        pivot = ops("Gather", [residual, picked], f"pivot{step}", dtype=np.float32, attrs={"axis": 0})  # scalar
        scale = ops(
            "Sqrt",
            [ops("Max", [pivot, ops.const("tiny", 1e-12, np.float32)], f"pivot_floor{step}", dtype=np.float32)],
            f"pivot_sqrt{step}",
            dtype=np.float32,
        )
        e = ops("Div", [row, scale], f"e{step}", dtype=np.float32)  # [n]
        e_col = ops("Unsqueeze", [e, ops.const("a1", [1], np.int64)], f"e_col{step}", dtype=np.float32)
        basis = (
            e_col
            if basis is None
            else ops("Concat", [basis, e_col], f"basis{step}", dtype=np.float32, attrs={"axis": 1})
        )
        residual = ops(
            "Sub",
            [residual, ops("Mul", [e, e], f"e_sq{step}", dtype=np.float32)],
            f"residual{step + 1}",
            dtype=np.float32,
        )
    return scores
