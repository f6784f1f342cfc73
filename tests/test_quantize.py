"""Weight-only quantization: the arithmetic, the graph pass on small graphs, the FFN gather of stored weights,
and quantized builds (validated against the fake-quant reference, answered by the runtime)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from conftest import CM

from buildformat import Quantization, read
from buildformat.names import FFN_WEIGHTS, compact_name
from coreMatching import ConfigError
from coreMatching.quant import down_projections, fake_quantize_, quantize
from coreMatching.quant_scheme import Layout, WeightQuant
from export.__main__ import main
from export.bound import bound_parts, bound_values, weight_form
from export.config import ExportConfig
from export.passes import insert_ffn_gather
from export.passes.dequantize import dequantize_input, quantize_weights, stored_form

INT8, INT4 = WeightQuant(8), WeightQuant(4, block_size=32)


def session(graph: gs.Graph, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, path=None) -> ort.InferenceSession:
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if path is not None:
        options.optimized_model_filepath = str(path)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


@pytest.mark.parametrize(
    "layout",
    [Layout(8, axis=1, block_size=None), Layout(4, axis=0, block_size=32), Layout(4, axis=1, block_size=32)],
    ids=["int8", "int4-rows", "int4-cols"],
)
def test_round_to_nearest_is_within_half_a_step(layout):
    w = torch.from_numpy(weight(64, 96))
    q = quantize(w, layout, torch.float32)
    qmax = 2 ** (layout.bits - 1) - 1
    assert q.q.dtype == torch.int8 and int(q.q.abs().max()) == qmax  # every group's largest value hits qmax
    step = q.dequantize() - w
    bound = (q.scale[None, :] if layout.block_size is None else q.scale.repeat_interleave(32, layout.axis)) / 2
    assert bool((step.abs() <= bound + 1e-7).all())
    expected = {None: [96], 0: [2, 96], 1: [64, 3]}[layout.axis if layout.block_size else None]
    assert list(q.scale.shape) == expected


def test_an_all_zero_group_gets_scale_one_and_stays_zero():
    w = torch.zeros(64, 4)
    w[:32, 0] = 1.0
    q = quantize(w, Layout(4, axis=0, block_size=32), torch.float32)
    assert q.scale[1, 0] == 1.0 and q.scale[0, 1] == 1.0
    assert torch.equal(q.dequantize(), w)


def test_scheme_layouts_and_errors():
    assert INT8.layout((100, 7)) == Layout(8, 1, None)
    assert INT4.layout((64, 96)) == Layout(4, 0, 32)
    assert INT4.layout((96, 64), rows_gathered=True) == Layout(4, 1, 32)
    assert INT4.layout((48, 96)) is None  # K not a multiple of the block: stays in floats
    assert INT4.layout((64, 96, 2)) is None
    assert WeightQuant.from_name("fp16") is None and WeightQuant.from_name("int4", 64).block_size == 64
    with pytest.raises(ConfigError, match="--weights must be one of"):
        WeightQuant.from_name("int3")
    with pytest.raises(ConfigError, match="--block-size"):
        WeightQuant(4, block_size=48)


def matmul_graph(w: np.ndarray, name: str = "blk.w") -> gs.Graph:
    x = gs.Variable("x", np.float32, [3, w.shape[0]])
    y = gs.Variable("y", np.float32, [3, w.shape[1]])
    node = gs.Node("MatMul", inputs=[x, gs.Constant(name, w)], outputs=[y])
    return gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=21)


@pytest.mark.parametrize("scheme", [INT8, INT4], ids=["int8", "int4"])
def test_quantize_pass_matches_the_dequantized_weight_and_fuses(scheme, tmp_path):
    w = weight(64, 96)
    graph = matmul_graph(w)
    counts = quantize_weights(graph, scheme, {})
    assert counts == {"quantized": 1, "kept_float": 0}
    assert [n.op for n in graph.nodes] == ["DequantizeLinear", "MatMul"]
    reference = quantize(torch.from_numpy(w), scheme.layout(w.shape), torch.float32).dequantize().numpy()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    exact = session(graph, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    np.testing.assert_allclose(exact, x @ reference, rtol=1e-5, atol=1e-5)
    # ONNX Runtime fuses the weight-only DequantizeLinear + MatMul into its low-bit MatMulNBits kernel.
    fused = session(graph, path=tmp_path / "opt.onnx").run(None, {"x": x})[0]
    assert [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node] == ["MatMulNBits"]
    np.testing.assert_allclose(fused, x @ reference, rtol=1e-4, atol=1e-4)


def test_weights_the_blocks_do_not_divide_stay_in_floats():
    graph = matmul_graph(weight(48, 96))
    assert quantize_weights(graph, INT4, {}) == {"quantized": 0, "kept_float": 1}
    assert [n.op for n in graph.nodes] == ["MatMul"]


def ffn_graph(weights: dict[str, np.ndarray], n: int) -> gs.Graph:
    d = weights["gate_t"].shape[0]
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
    return gs.Graph(nodes=nodes, inputs=[x, core], outputs=[y], opset=21)


@pytest.mark.parametrize("scheme", [INT8, INT4], ids=["int8", "int4"])
def test_ffn_gather_takes_stored_rows_and_scales_that_decode_dequantizes(scheme):
    """The bound weights are stored quantized and neuron-major ([W, d]); the neurons graph gathers the core
    neurons' rows of integers and their scales (never a dequantized matrix); a stack's input replaced by
    `dequantize_input` (its width "W" symbolic) rebuilds the full weight from the full parts and exactly the
    gathered rows from them: the reference's quantization of the traced weight, transposed for gate and up."""
    d, width, n = 64, 96, 7
    # The traced weights, in MatMul layout: gate_t, up_t [d, W] (columns gathered), down_t [W, d] (rows).
    traced = {"gate": weight(d, width, 1), "up": weight(d, width, 2), "down_t": weight(width, d, 3)}
    geometry = SimpleNamespace(hidden_size=d, intermediate_size=width)
    values = bound_values({0: {w: torch.from_numpy(v) for w, v in traced.items()}}, geometry, scheme, np.float32)
    parts = bound_parts(geometry, SimpleNamespace(neuron_sparse_layers=[0]), scheme, np.float32)
    assert [p.name for p in parts] == list(values)
    assert {p.name: p.shape for p in parts if p.name.endswith(".scale")} == (
        {"ffn.0.gate.scale": (width,), "ffn.0.up.scale": (width,), "ffn.0.down_t.scale": (d,)}
        if scheme.bits == 8
        else {f"ffn.0.{w}.scale": (width, d // 32) for w in FFN_WEIGHTS}
    )
    core = gs.Variable("core_neurons.0", np.int64, [n])
    inputs = [gs.Variable(p.name, p.dtype, list(p.shape)) for p in parts]
    neurons = insert_ffn_gather(gs.Graph(inputs=[core, *inputs], outputs=[], opset=21), 0, parts)
    assert not any(node.op == "DequantizeLinear" for node in neurons.nodes)  # gathered as stored
    assert {node.attrs["axis"] for node in neurons.nodes if node.op == "Gather"} == {0}  # whole rows
    idx = np.array([1, 4, 5, 9, 12, 17, 95])
    out = session(neurons).run(None, {"core_neurons.0": idx, **values})
    gathered = dict(zip([o.name for o in neurons.outputs], out, strict=True))
    suffix = "packed" if scheme.bits == 4 else "q"
    assert gathered[f"compact.0.gate.{suffix}"].dtype == (np.uint8 if scheme.bits == 4 else np.int8)

    for w, full in traced.items():
        form = stored_form(scheme, full.shape, 0 if w == "down_t" else 1)  # chosen on the traced weight
        dequantized = quantize(torch.from_numpy(full), form.layout, torch.float32).dequantize().numpy()
        dequantized = dequantized if w == "down_t" else dequantized.T  # [W, d]
        shape = ["W", d]
        old = gs.Variable(f"ffn.0.{w}", np.float32, shape)
        y = gs.Variable("y", np.float32, shape)
        stack = gs.Graph(nodes=[gs.Node("Identity", inputs=[old], outputs=[y])], inputs=[old], outputs=[y], opset=21)
        dequantize_input(stack, old, weight_form(geometry, w, scheme), shape)
        run = session(stack)
        np.testing.assert_array_equal(run.run(None, {t.name: values[t.name] for t in stack.inputs})[0], dequantized)
        compact = {t.name: gathered[compact_name(t.name)] for t in stack.inputs}
        np.testing.assert_array_equal(run.run(None, compact)[0], dequantized[idx])


def test_fake_quantize_gives_the_pass_weights():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"language_model": torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(96, 64, bias=False)])})}
    )
    model.language_model.layers[0].down_proj = torch.nn.Linear(96, 64, bias=False)
    w_t = model.language_model.layers[0].down_proj.weight.detach().t().clone()  # [96, 64]
    summary = fake_quantize_(model, INT4, torch.float32, down_projections(frozenset({0})))
    assert summary["quantized"] == 2
    expected = quantize(w_t, Layout(4, axis=1, block_size=32), torch.float32).dequantize()
    assert torch.equal(model.language_model.layers[0].down_proj.weight.t(), expected)
    assert down_projections(frozenset({0}))("model.language_model.layers.0.mlp.down_proj")
    assert not down_projections(frozenset({0}))("model.language_model.layers.1.mlp.down_proj")
    assert not down_projections(frozenset({0}))("model.vision_tower.encoder.layers.0.mlp.fc2")


def test_export_config_checks_precisions(tmp_path):
    assert ExportConfig(out=tmp_path / "b", weights="int4", static_neurons=True).opset == 21
    assert ExportConfig(out=tmp_path / "b", weights="int4", corematching=None).opset == 21  # dense int4
    with pytest.raises(ConfigError, match="--static-neurons"):  # per-request neurons: no fused int4 kernel
        ExportConfig(out=tmp_path / "b", weights="int4")
    assert ExportConfig(out=tmp_path / "b", fp16=True).weights == "fp16"
    with pytest.raises(ConfigError, match="float weights follow the activations"):
        ExportConfig(out=tmp_path / "b", weights="fp16")
    with pytest.raises(ConfigError, match="needs --opset 21"):
        ExportConfig(out=tmp_path / "b", weights="int4", static_neurons=True, opset=18)


def test_cli_rejects_a_bad_block_size_in_one_line(tmp_path, capsys):
    assert main(["build", "--out", str(tmp_path / "b"), "--weights", "int4", "--block-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "--block-size must be one of" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def quantized_builds(checkpoint, built, tmp_path_factory):
    from export.build import build

    results = {}
    for weights in ("int8",):  # int4 with per-request neurons is refused (test_int4_with_per_request_neurons...)
        out = tmp_path_factory.mktemp("qbuilds") / weights
        config = ExportConfig(
            out=out,
            model_dir=checkpoint("llama"),
            corematching=CM,
            weights=weights,
            max_prompt_tokens=64,
            max_sequence=128,
        )
        results[weights] = build(config)
    return results


@pytest.mark.parametrize("weights", ["int8"])
def test_quantized_builds_validate_against_the_fake_quant_reference(quantized_builds, built, weights):
    result = quantized_builds[weights]
    report = result.validation
    assert report.passed, report.to_json()
    for case in report.cases:
        assert case.equal_tokens == 32 and case.max_logit_diff <= 1e-4 and case.kept_equal and case.core_equal
    distance = report.quantization.distance_to_float
    assert {d.case for d in distance} == {"example", "random"} and all(d.max_logit_diff > 0 for d in distance)
    cases = ["example", "random", "example (portable)", "random (portable)"]  # both forms of the stacks
    assert [c.case for c in report.quantization.fast] == cases
    manifest = read(result.out)
    assert manifest.validation == report  # the typed record, read back from the manifest's JSON
    assert manifest.quantization == Quantization(
        weights, 32 if weights == "int4" else None, "rtn", manifest.quantization.quantized, 0
    )
    assert manifest.quantization.quantized > 10
    float_build = built("llama", "cm").out
    assert (result.out / "weights.bin").stat().st_size < 0.6 * (float_build / "weights.bin").stat().st_size
    upper_inputs = {spec.name: spec.dtype for spec in manifest.graph("upper").inputs}
    suffix, dtype = ("packed", "uint8") if weights == "int4" else ("q", "int8")
    assert upper_inputs[f"ffn.2.gate.{suffix}"] == dtype and "ffn.2.gate" not in upper_inputs
    assert manifest.weights.bound[f"ffn.2.gate.{suffix}"].dtype == dtype  # held once, in its stored form
    # Neuron-major: gate's integers [D, d] with a scale per row, gathered with it; down's scale passes whole.
    bound = manifest.weights.bound
    d, width = manifest.model.hidden_size, manifest.model.intermediate_size
    assert bound["ffn.2.gate.q"].shape == (width, d) and bound["ffn.2.gate.scale"].shape == (width,)
    assert bound["ffn.2.down_t.q"].shape == (width, d) and bound["ffn.2.down_t.scale"].shape == (d,)


def test_int8_build_is_flagged_for_tensorrt_and_answered_by_the_runtime(quantized_builds):
    from runtime import Pipeline

    # int8 weights bound per request are dequantized from graph inputs, which TensorRT's weight-only
    # quantization does not take (a static set keeps them constants: test_static_neurons).
    int8 = read(quantized_builds["int8"].out)
    assert not int8.tensorrt_compatible and "bound per request" in int8.tensorrt_reason
    pipeline = Pipeline.load(quantized_builds["int8"].out, provider="cpu")
    from PIL import Image

    answer = pipeline.answer(Image.new("RGB", (64, 64), "red"), "What colour is it?", max_new_tokens=4)
    assert len(answer.kept_image_tokens) == 5 and len(answer.token_ids) >= 1


def test_int4_with_per_request_neurons_is_refused_in_one_line(tmp_path, capsys):
    """No fused int4 kernel takes per-request gathered weights: the build refuses and names the alternative."""
    assert main(["build", "--out", str(tmp_path / "b"), "--weights", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--static-neurons" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_cuda_sessions_share_one_device_copy_of_each_weight(built):
    """On the CUDA provider each weight is uploaded once and the same device value is added to every session
    (ONNX Runtime uses it in place); checked with a stand-in for onnxruntime, no GPU needed."""
    from runtime.ort_sessions import SharedWeights

    calls = []

    class Value:
        @staticmethod
        def ortvalue_from_numpy(array, *device):
            calls.append(device)
            return ("value", id(array), device)

        ortvalue_from_numpy_with_onnx_type = ortvalue_from_numpy

    class Options:
        def __init__(self):
            self.added = {}

        def add_session_config_entry(self, key, value):
            pass

        def add_initializer(self, name, value):
            self.added[name] = value

    class FakeOrt:
        OrtValue = Value
        SessionOptions = Options

    manifest = read(built("llama", "cm").out)
    weights = SharedWeights(built("llama", "cm").out, manifest, FakeOrt, device="cuda")
    # The CUDA provider reads the portable form of the stacks.
    files = [manifest.graph(name).file for name in manifest.graph_names]
    options = {file: weights.options(file) for file in files}
    bound = weights.bound()
    assert calls and all(device == ("cuda", 0) for device in calls)
    # Each weight is in one graph, so one session holds it; the bound FFN weights are uploaded once more each.
    added = [name for o in options.values() for name in o.added]
    assert len(added) == len(set(added)) and not set(added) & set(bound)
    index = manifest.weights
    offsets = {entry.offset for file in files for entry in index.graphs[file].values()}
    assert len(calls) == len(offsets) + len(index.bound) and len(index.bound) == len(bound) > 0


def test_manifest_quantization_round_trips_and_names_a_bad_field():
    from fake_manifests import manifest_json

    from buildformat import Manifest, ManifestError

    record = {"weights": "int4", "block_size": 32, "method": "rtn", "quantized": 12, "kept_float": 1}
    manifest = Manifest.from_json(manifest_json(quantization=record))
    assert manifest.quantization == Quantization("int4", 32, "rtn", 12, 1)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(manifest_json()).quantization is None
    with pytest.raises(ManifestError, match=r"quantization\.weights is 'int3'"):
        Manifest.from_json(manifest_json(quantization={**record, "weights": "int3"}))
    with pytest.raises(ManifestError, match=r"quantization\.quantized is missing"):
        Manifest.from_json(manifest_json(quantization={k: v for k, v in record.items() if k != "quantized"}))
