"""Each graph-surgeon pass on a small hand-made graph, run in ONNX Runtime, against the reference rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from buildformat.names import FFN_WEIGHTS
from coreMatching import Budgets
from coreMatching.merging import prune
from coreMatching.rules import PruneLayerView, dpp_kernel, dpp_relevance, merge_group_scores, token_scores
from coreMatching.selection import elbow_count, keep_indices, prompt_core_neurons, stable_topk, token_core_membership
from coreMatching.selectors import SELECTORS
from export.bound import BoundPart
from export.passes import (
    check_tensorrt,
    insert_core_neuron_selection,
    insert_core_token_selection,
    insert_ffn_gather,
    insert_token_merge,
    insert_token_scores,
)


def run(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def activations(tokens: int, width: int, seed: int) -> np.ndarray:
    # Small integers: many ties, so the tie-breaking rule is exercised too.
    return np.random.default_rng(seed).integers(-4, 6, size=(tokens, width)).astype(np.float32)


def act_graph(width: int, layer: int) -> gs.Graph:
    """x [T, D] -> Identity -> act.{layer}: the seam the trace leaves."""
    x = gs.Variable("x", np.float32, ["T", width])
    act = gs.Variable(f"act.{layer}", np.float32, ["T", width])
    return gs.Graph(nodes=[gs.Node("Identity", inputs=[x], outputs=[act])], inputs=[x], outputs=[act], opset=18)


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_core_neuron_pass_matches_reference(chunks):
    width, k_tok, n = 40, 6, 14
    budgets = Budgets(
        num_layers=4,
        intermediate_size=width,
        num_image_tokens=8,
        token_budget=4,
        auto_range=(1, 8),
        tokens_per_neuron_set=k_tok,
        core_neurons=n,
        prune_layer=0,
        neuron_layers=(1, 4),
        neuron_chunks=chunks,
    )
    graph = insert_core_neuron_selection(act_graph(width, 3), 3, budgets)
    assert [o.name for o in graph.outputs] == ["core_neurons.3"]
    for seed in range(5):
        a = activations(23, width, seed)
        got = run(graph, {"x": a})["core_neurons.3"]
        member = token_core_membership(torch.from_numpy(a), k_tok)
        assert got.tolist() == prompt_core_neurons(member, n, chunks).tolist()


def token_graph(width: int, layer: int, attention: bool = False, heads: int = 2) -> gs.Graph:
    """act_in -> act.{layer}; attn_in -> attn_last.{layer} (selectors that read attention); h [S, 4] gathered
    by the keep_indices input, as layers after the prune layer are."""
    act_in = gs.Variable("act_in", np.float32, ["S", width])
    act = gs.Variable(f"act.{layer}", np.float32, ["S", width])
    attn_in = gs.Variable("attn_in", np.float32, [heads, "S"])
    attn = gs.Variable(f"attn_last.{layer}", np.float32, [heads, "S"])
    h = gs.Variable("h", np.float32, ["S", 4])
    keep = gs.Variable("keep_indices", np.int64, ["S_kept"])
    h_kept = gs.Variable("h_kept", np.float32, ["S_kept", 4])
    nodes = [
        gs.Node("Identity", inputs=[act_in], outputs=[act]),
        gs.Node("Gather", inputs=[h, keep], outputs=[h_kept], attrs={"axis": 0}),
    ]
    if not attention:
        return gs.Graph(nodes=nodes, inputs=[act_in, h, keep], outputs=[h_kept, act], opset=18)
    nodes.append(gs.Node("Identity", inputs=[attn_in], outputs=[attn]))
    return gs.Graph(nodes=nodes, inputs=[act_in, attn_in, h, keep], outputs=[h_kept, act, attn], opset=18)


def budgets_for(selector: str, budget, merge: str = "none", n_img: int = 12, width: int = 32, layer: int = 1):
    return Budgets(
        num_layers=4,
        intermediate_size=width,
        num_image_tokens=n_img,
        token_budget=budget,
        auto_range=(2, 9),
        tokens_per_neuron_set=5,
        core_neurons=12,
        prune_layer=layer,
        neuron_layers=(2, 4),
        token_selector=selector,
        token_merge=merge,
    )


def selection_case(seed: int, before: int, after: int, n_img: int, width: int):
    rng = np.random.default_rng(seed)
    seq = before + n_img + after
    a = activations(seq, width, seed)
    probs = rng.random((2, seq)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    h = rng.standard_normal((seq, 4)).astype(np.float32)
    return seq, a, probs, h


CASES = [
    (name, budget)
    for name in SELECTORS
    for budget in ([1, 5, 12] if SELECTORS[name].kind == "greedy" else [1, 5, 12, "auto"])
    if budget != "auto" or SELECTORS[name].supports_auto
]


@pytest.mark.parametrize(("selector", "budget"), CASES)
def test_token_selection_passes_match_the_reference_rule(selector, budget):
    width, n_img = 32, 12
    b = budgets_for(selector, budget, n_img=n_img, width=width)
    graph = token_graph(width, 1, attention=SELECTORS[selector].needs_attention)
    scores = insert_token_scores(graph, b, seed=3)
    graph = insert_core_token_selection(graph, b, scores)
    assert [t.name for t in graph.inputs if t.name != "attn_in"] == ["act_in", "h", "image_start"]
    assert [t.name for t in graph.outputs] == ["h_kept", "kept_image_tokens"]
    ops = [node.op for node in graph.nodes]
    assert "NonZero" not in ops and "Loop" not in ops
    if budget != "auto":
        assert check_tensorrt(graph) == []
    for seed, (before, after) in enumerate([(3, 5), (0, 7), (6, 0), (1, 1)]):
        seq, a, probs, h = selection_case(seed, before, after, n_img, width)
        feeds = {"act_in": a, "h": h, "image_start": np.array([before])}
        if any(t.name == "attn_in" for t in graph.inputs):
            feeds["attn_in"] = probs
        out = run(graph, feeds)
        view = PruneLayerView(torch.from_numpy(a), (before, before + n_img), b, torch.from_numpy(probs), seed=3)
        k = n_img if budget == "auto" else budget
        ref = token_scores(selector, view, k)
        k = elbow_count(ref, 2, 9) if budget == "auto" else budget
        kept = stable_topk(ref, k).sort().values
        assert out["kept_image_tokens"].tolist() == kept.tolist(), (selector, seed)
        np.testing.assert_array_equal(out["h_kept"], h[keep_indices(before, n_img, seq, kept).numpy()])


def merge_graph(width: int, layer: int) -> gs.Graph:
    """act_in -> act.{layer}; h_next = merge_weights @ h; keep_positions and key_bias as outputs."""
    act_in = gs.Variable("act_in", np.float32, ["S", width])
    act = gs.Variable(f"act.{layer}", np.float32, ["S", width])
    h = gs.Variable("h", np.float32, ["S", 4])
    weights = gs.Variable("merge_weights", np.float32, ["R", "S"])
    positions = gs.Variable("keep_positions", np.int64, ["R"])
    bias = gs.Variable("key_bias", np.float32, ["R"])
    h_next, pos_out, bias_out = (gs.Variable(n, np.float32) for n in ("h_next", "pos_out", "bias_out"))
    pos_out.dtype = np.int64
    nodes = [
        gs.Node("Identity", inputs=[act_in], outputs=[act]),
        gs.Node("MatMul", inputs=[weights, h], outputs=[h_next]),
        gs.Node("Identity", inputs=[positions], outputs=[pos_out]),
        gs.Node("Identity", inputs=[bias], outputs=[bias_out]),
    ]
    return gs.Graph(
        nodes=nodes, inputs=[act_in, h, weights, positions, bias], outputs=[h_next, pos_out, bias_out, act], opset=18
    )


def test_conditional_dpp_pass_builds_the_reference_kernel():
    # Equal picks on small cases could hide a wrong kernel: compare the kernel and the first residuals.
    width, n_img, budget = 32, 12, 4
    b = budgets_for("conditional-dpp", budget, n_img=n_img, width=width)
    graph = token_graph(width, 1)
    graph = insert_core_token_selection(graph, b, insert_token_scores(graph, b))
    tensors = graph.tensors()
    graph.outputs += [tensors["cm.tokens.kernel"], tensors["cm.tokens.residual0"], tensors["cm.tokens.residual1"]]
    for seed, (before, after) in enumerate([(3, 5), (0, 7)]):
        _, a, _, h = selection_case(seed, before, after, n_img, width)
        out = run(graph, {"act_in": a, "h": h, "image_start": np.array([before])})
        view = PruneLayerView(torch.from_numpy(a), (before, before + n_img), b)
        kernel = dpp_kernel(view).numpy()
        np.testing.assert_allclose(out["cm.tokens.kernel"], kernel, rtol=1e-5, atol=1e-6)
        start = (dpp_relevance(view) ** 2).numpy()
        np.testing.assert_array_equal(out["cm.tokens.residual0"], start)  # exactly r^2: ties go to the lower index
        j = int(np.argmax(start))
        np.testing.assert_allclose(out["cm.tokens.residual1"], start - kernel[j] ** 2 / start[j], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge", ["summary", "nearest", "mass"])
@pytest.mark.parametrize("budget", [1, 5, 11])
def test_merge_pass_matches_the_reference_merge(merge, budget):
    width, n_img = 32, 12
    b = budgets_for("core-coverage", budget, merge=merge, n_img=n_img, width=width)
    graph = merge_graph(width, 1)
    graph = insert_core_token_selection(graph, b, insert_token_scores(graph, b))
    graph = insert_token_merge(graph, b)
    assert [t.name for t in graph.inputs] == ["act_in", "h", "image_start"]
    assert [t.name for t in graph.outputs] == ["h_next", "pos_out", "bias_out", "kept_image_tokens", "kept_bias"]
    assert check_tensorrt(graph) == []
    for seed, (before, after) in enumerate([(3, 5), (0, 7), (6, 0)]):
        _, a, _, h = selection_case(seed, before, after, n_img, width)
        out = run(graph, {"act_in": a, "h": h, "image_start": np.array([before])})
        span = (before, before + n_img)
        view = PruneLayerView(torch.from_numpy(a), span, b)
        kept = stable_topk(token_scores("core-coverage", view, budget), budget).sort().values
        groups = merge_group_scores(view, kept) if merge in ("nearest", "mass") else None
        ref = prune(torch.from_numpy(h)[None], span, kept, merge, groups)
        np.testing.assert_allclose(out["h_next"], ref.hidden[0].numpy(), rtol=1e-6, atol=1e-6)
        assert out["pos_out"].tolist() == ref.positions.tolist()
        np.testing.assert_allclose(out["bias_out"], ref.key_bias.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out["kept_bias"], ref.image_bias.numpy(), rtol=1e-6, atol=1e-7)


def test_ffn_gather_pass_gathers_rows_and_their_scales():
    d, width, n = 6, 20, 7
    rng = np.random.default_rng(0)
    # The bound inputs of a neurons graph, neuron-major [W, d] (export.bound): a float weight each, a per-row
    # scale gathered with its rows, and a per-column scale that passes whole.
    weights = {w: rng.standard_normal((width, d)).astype(np.float32) for w in FFN_WEIGHTS}
    parts = [BoundPart(0, w, f"ffn.0.{w}", 0, (width, d), np.float32) for w in FFN_WEIGHTS]
    parts.append(BoundPart(0, "gate", "ffn.0.gate.scale", 0, (width,), np.float32))
    parts.append(BoundPart(0, "down_t", "ffn.0.down_t.scale", None, (d,), np.float32))
    scales = {w: rng.standard_normal(size).astype(np.float32) for w, size in (("gate", width), ("down_t", d))}
    core = gs.Variable("core_neurons.0", np.int64, [n])
    inputs = [gs.Variable(p.name, np.float32, list(p.shape)) for p in parts]
    graph = gs.Graph(inputs=[core, *inputs], outputs=[], opset=18)
    graph = insert_ffn_gather(graph, 0, parts)
    assert {node.attrs["axis"] for node in graph.nodes if node.op == "Gather"} == {0}  # whole rows only
    idx = np.array([1, 4, 5, 9, 12, 17, 19])
    feeds = {"core_neurons.0": idx, **{f"ffn.0.{w}": v for w, v in weights.items()}}
    feeds |= {f"ffn.0.{w}.scale": v for w, v in scales.items()}
    out = run(graph, feeds)
    for w in FFN_WEIGHTS:
        np.testing.assert_array_equal(out[f"compact.0.{w}"], weights[w][idx])
    np.testing.assert_array_equal(out["compact.0.gate.scale"], scales["gate"][idx])
    np.testing.assert_array_equal(out["compact.0.down_t.scale"], scales["down_t"])
    with pytest.raises(KeyError, match="no tensor"):
        insert_ffn_gather(graph, 1, [BoundPart(1, "gate", "ffn.1.gate", 0, (width, d), np.float32)])


def test_tensorrt_check_flags_nonzero_and_large_topk():
    x = gs.Variable("x", np.float32, [5000])
    nz, vals, idx = gs.Variable("nz", np.int64), gs.Variable("v", np.float32), gs.Variable("i", np.int64)
    k = gs.Constant("k", np.array([4000], np.int64))
    graph = gs.Graph(
        nodes=[gs.Node("NonZero", inputs=[x], outputs=[nz]), gs.Node("TopK", inputs=[x, k], outputs=[vals, idx])],
        inputs=[x],
        outputs=[nz, vals],
        opset=18,
    )
    problems = check_tensorrt(graph)
    assert len(problems) == 2 and "NonZero" in problems[0] and "4000" in problems[1]
    assert check_tensorrt(act_graph(8, 0)) == []
