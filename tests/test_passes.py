"""Each graph-surgeon pass on a small hand-made graph, run in ONNX Runtime, against the reference rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from coreMatching.selection import (
    elbow_count,
    keep_indices,
    matching_scores,
    prompt_core_neurons,
    stable_topk,
    token_core_membership,
)
from export.passes import check_tensorrt, insert_core_neuron_selection, insert_core_token_selection, insert_ffn_gather


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
    graph = insert_core_neuron_selection(act_graph(width, 3), 3, k_tok, n, width, chunks)
    assert [o.name for o in graph.outputs] == ["core_neurons.3"]
    for seed in range(5):
        a = activations(23, width, seed)
        got = run(graph, {"x": a})["core_neurons.3"]
        member = token_core_membership(torch.from_numpy(a), k_tok)
        assert got.tolist() == prompt_core_neurons(member, n, chunks).tolist()


def token_graph(width: int, layer: int) -> gs.Graph:
    """act_in -> act.{layer}; h [S, 4] gathered by the keep_indices input, as layers after the prune layer are."""
    act_in = gs.Variable("act_in", np.float32, ["S", width])
    act = gs.Variable(f"act.{layer}", np.float32, ["S", width])
    h = gs.Variable("h", np.float32, ["S", 4])
    keep = gs.Variable("keep_indices", np.int64, ["S_kept"])
    h_kept = gs.Variable("h_kept", np.float32, ["S_kept", 4])
    nodes = [
        gs.Node("Identity", inputs=[act_in], outputs=[act]),
        gs.Node("Gather", inputs=[h, keep], outputs=[h_kept], attrs={"axis": 0}),
    ]
    return gs.Graph(nodes=nodes, inputs=[act_in, h, keep], outputs=[h_kept, act], opset=18)


@pytest.mark.parametrize("budget", [1, 5, 12, "auto"])
def test_core_token_pass_matches_reference(budget):
    width, k_tok, n, n_img = 32, 5, 12, 12
    graph = insert_core_token_selection(token_graph(width, 1), 1, n_img, budget, k_tok, n, width, 1, (2, 9))
    assert [t.name for t in graph.inputs] == ["act_in", "h", "image_start"]
    assert [t.name for t in graph.outputs] == ["h_kept", "kept_image_tokens"]
    ops = [node.op for node in graph.nodes]
    assert "NonZero" not in ops and ops.count("TopK") >= 4
    for seed, (before, after) in enumerate([(3, 5), (0, 7), (6, 0), (1, 1)]):
        seq = before + n_img + after
        a = activations(seq, width, seed)
        h = np.random.default_rng(seed).standard_normal((seq, 4)).astype(np.float32)
        out = run(graph, {"act_in": a, "h": h, "image_start": np.array([before])})
        member = token_core_membership(torch.from_numpy(a), k_tok)
        core = prompt_core_neurons(member, n)
        scores = matching_scores(member[before : before + n_img], core)
        k = elbow_count(scores, 2, 9) if budget == "auto" else budget
        kept = stable_topk(scores, k).sort().values
        assert out["kept_image_tokens"].tolist() == kept.tolist()
        np.testing.assert_array_equal(out["h_kept"], h[keep_indices(before, n_img, seq, kept).numpy()])


def test_ffn_gather_pass_gathers_columns_and_rows():
    d, width, n = 6, 20, 7
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in (("gate_t", (d, width)), ("up_t", (d, width)), ("down_t", (width, d)))}  # fmt: skip
    consts = {name: gs.Constant(f"blk.{name}", value) for name, value in weights.items()}
    x = gs.Variable("x", np.float32, [1, d])
    core = gs.Variable("core_neurons.0", np.int64, [n])
    g, u, a, y = (gs.Variable(name, np.float32) for name in ("g", "u", "a", "y"))
    nodes = [
        gs.Node("MatMul", inputs=[x, consts["gate_t"]], outputs=[g]),
        gs.Node("MatMul", inputs=[x, consts["up_t"]], outputs=[u]),
        gs.Node("Mul", inputs=[g, u], outputs=[a]),
        gs.Node("MatMul", inputs=[a, consts["down_t"]], outputs=[y]),
    ]
    graph = gs.Graph(nodes=nodes, inputs=[x, core], outputs=[y], opset=18)
    graph = insert_ffn_gather(graph, 0, "blk")
    idx = np.array([1, 4, 5, 9, 12, 17, 19])
    out = run(graph, {"x": np.ones((1, d), np.float32), "core_neurons.0": idx})
    np.testing.assert_array_equal(out["ffn.0.gate_t"], weights["gate_t"][:, idx])
    np.testing.assert_array_equal(out["ffn.0.up_t"], weights["up_t"][:, idx])
    np.testing.assert_array_equal(out["ffn.0.down_t"], weights["down_t"][idx])
    with pytest.raises(KeyError, match="no tensor"):
        insert_ffn_gather(graph, 1, "blk")


def test_tensorrt_check_flags_nonzero_and_large_topk():
    x = gs.Variable("x", np.float32, [5000])
    nz, vals, idx = gs.Variable("nz", np.int64), gs.Variable("v", np.float32), gs.Variable("i", np.int64)
    k = gs.Constant("k", np.array([4000], np.int64))
    graph = gs.Graph(
        nodes=[gs.Node("NonZero", inputs=[x], outputs=[nz]), gs.Node("TopK", inputs=[x, k], outputs=[vals, idx])],
        inputs=[x], outputs=[nz, vals], opset=18,
    )  # fmt: skip
    problems = check_tensorrt(graph)
    assert len(problems) == 2 and "NonZero" in problems[0] and "4000" in problems[1]
    assert check_tensorrt(act_graph(8, 0)) == []
