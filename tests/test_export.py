"""`python -m export build` / `validate` on tiny checkpoints of every supported backbone."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import BACKBONES, CM

from buildformat import read
from buildformat.graphs import Dim
from buildformat.names import KEPT_BIAS
from coreMatching import ConfigError, CoreMatchingConfig
from coreMatching.selectors import MERGES, SELECTORS
from export.__main__ import main
from export.build import BuildError, build
from export.config import ExportConfig
from export.validate import greedy_trace, runtime_pipeline
from runtime.backend import PrefillResult
from runtime.pipeline import GenerationTrace, Prompt

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["dense", "cm"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_builds_pass_validation(built, name, mode):
    result = built(name, mode)
    report = result.validation
    assert report.passed, report.to_json()
    assert report.reference == ("transformers" if mode == "dense" else "coreMatching")
    for case in report.cases:
        assert case.equal_tokens == 32 and case.max_logit_diff <= 1e-4
        if mode == "cm":
            assert case.kept_equal and case.core_equal and case.kept_image_tokens == 5
    manifest = read(result.out)
    assert manifest.validation == report and manifest.validation.passed is True
    assert manifest.tensorrt_compatible, manifest.tensorrt_reason
    graphs = ["decoder"] if mode == "dense" else ["lower", "select", "upper", "neurons"]
    assert manifest.graph_names == ("vision", *graphs)
    assert set(manifest.files) >= {
        *(f"{name}.onnx" for name in manifest.graph_names),
        "tokenizer.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    }


# The flags of a small CoreMatching build of the tiny checkpoints.
SMALL_BUILD = ["--token-budget", "5", "--prune-layer", "1", "--max-prompt-tokens", "64", "--max-sequence", "128"]


def test_select_holds_core_token_topk_and_gather(built):
    result = built("llama-gqa", "cm")
    graph = onnx.load(result.out / "select.onnx").graph
    nodes = list(graph.node)
    assert not {"NonZero", "If", "Loop"} & {n.op_type for n in nodes}
    assert not graph.initializer or all(np.prod(t.dims) < 4096 for t in graph.initializer)  # no weight
    keep_topk = [n for n in nodes if n.op_type == "TopK" and n.name.startswith("cm.keep")]
    assert len(keep_topk) == 2  # select, then restore the order
    # The default selector is greedy: one TopK(1) per kept token, unrolled.
    picks = [n for n in nodes if n.op_type == "TopK" and n.name.startswith("cm.tokens.pick")]
    assert len(picks) == CM.token_budget
    # The upper stack starts from the kept rows (the default merge, mass, keeps each kept state its own) and the
    # key bias that weighs each kept token as its group.
    assert any("cm.merge.rows" in n.input for n in nodes), "nothing reads the kept rows"
    assert any(n.op_type == "Log" and n.name.startswith("cm.merge") and KEPT_BIAS in n.output for n in nodes)
    assert [i.name for i in graph.input] == ["hidden", "act.1", "image_start"]
    outputs = [o.name for o in graph.output]
    assert outputs[:2] == ["kept_hidden", "kept_positions"]
    # The prune layer's core neurons share the token selection's membership: select gives them.
    assert {"kept_image_tokens", "kept_bias", "core_neurons.1"} <= set(outputs)
    neurons = onnx.load(result.out / "neurons.onnx").graph
    assert "core_neurons.1" in [i.name for i in neurons.input] and "act.1" not in [i.name for i in neurons.input]
    assert {"core_neurons.2", "compact.1.gate", "compact.1.down_t"} <= {o.name for o in neurons.output}
    upper_inputs = [i.name for i in onnx.load(result.out / "upper.onnx").graph.input]
    assert upper_inputs[:5] == ["hidden", "position_ids", "past_length", "image_start", "kept_bias"]


# Every selector and every merge, each in one build (a build takes seconds on a tiny checkpoint).
SELECTOR_BUILDS = [
    ("prompt-frequency", "nearest"),
    ("query-overlap", "none"),
    ("fastv", "summary"),
    ("random", "none"),
    ("max-min", "nearest"),
    ("core-coverage", "summary"),
    ("conditional-dpp", "mass"),
]


def test_the_builds_cover_every_selector_and_merge():
    assert {s for s, _ in SELECTOR_BUILDS} == set(SELECTORS)
    assert {m for _, m in SELECTOR_BUILDS} == set(MERGES)


@pytest.mark.parametrize(("selector", "merge"), SELECTOR_BUILDS)
def test_every_selector_builds_and_validates(checkpoint, tmp_path, selector, merge):
    config = ExportConfig(
        out=tmp_path / "b",
        model_dir=checkpoint("llama"),
        max_prompt_tokens=64,
        max_sequence=128,
        corematching=CM.with_(token_selector=selector, token_merge=merge),
    )
    result = build(config)
    assert result.validation.passed, result.validation.to_json()
    for case in result.validation.cases:
        assert case.kept_equal and case.equal_tokens == 32 and case.max_logit_diff <= 1e-4
    section = result.manifest.corematching
    assert (section.token_selector, section.token_merge) == (selector, merge)
    assert result.manifest.tensorrt_compatible, result.manifest.tensorrt_reason


def test_auto_budget_with_a_merge_is_refused(checkpoint, tmp_path):
    auto = CoreMatchingConfig(token_budget="auto", prune_layer=1, token_selector="query-overlap", token_merge="nearest")
    config = ExportConfig(out=tmp_path / "auto", model_dir=checkpoint("llama"), corematching=auto)
    with pytest.raises(ConfigError, match="--token-merge none"):
        build(config)
    assert not (tmp_path / "auto").exists()


def test_every_graph_passes_the_full_checker(built):
    result = built("mistral-gqa", "cm")
    for name in result.manifest.graph_names:
        onnx.checker.check_model(str(result.out / f"{name}.onnx"), full_check=True)


def test_sparse_ffn_weights_are_bound_inputs_and_gathered_once(built):
    result = built("llama", "cm")
    manifest = result.manifest
    n, d, width = manifest.corematching.core_neurons, manifest.model.hidden_size, manifest.model.intermediate_size
    sparse = range(*manifest.corematching.neuron_layers)
    assert n < width
    initializers: set[str] = set()
    for stack in ("lower", "upper"):
        graph = onnx.load(result.out / f"{stack}.onnx").graph
        initializers |= {i.name for i in graph.initializer}
        shapes = {i.name: [x.dim_param or x.dim_value for x in i.type.tensor_type.shape.dim] for i in graph.input}
        matmul_inputs = {name for node in graph.node if node.op_type == "MatMul" for name in node.input}
        transposed = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Transpose"}  # x @ gate^T
        for layer in [layer for layer in sparse if f"ffn.{layer}.gate" in shapes]:
            # The FFN MatMuls read the bound weights, neuron-major: all in prefill, the compacted ones in decode.
            names = [f"ffn.{layer}.{w}" for w in ("gate", "up", "down_t")]
            assert all(shapes[n] == ["W", d] for n in names) and {transposed.get(n, n) for n in names} <= matmul_inputs
        assert not any(node.op_type == "Gather" and "ffn." in " ".join(node.input) for node in graph.node)
    assert manifest.decode_dims["W"] == Dim(n, n, n) and manifest.dims["W"] == Dim(width, width, width)
    neurons = onnx.load(result.out / "neurons.onnx").graph
    outputs = {o.name: [x.dim_value for x in o.type.tensor_type.shape.dim] for o in neurons.output}
    bound = manifest.weights.bound
    for layer in sparse:
        # The full weights are in no graph: the runtime holds them once, from the weights file.
        assert f"decoder.layers.{layer}.mlp.gate_t" not in initializers
        assert bound[f"ffn.{layer}.gate"].shape == (width, d) and bound[f"ffn.{layer}.down_t"].shape == (width, d)
        assert outputs[f"compact.{layer}.gate"] == [n, d] and outputs[f"compact.{layer}.down_t"] == [n, d]


@pytest.mark.parametrize("mode", ["dense", "cm"])
def test_no_initializer_is_in_two_graphs(built, mode):
    """Every weight is held by one graph: no weight's name, and no weight's bytes, appear in two graphs (the
    exporter's own small constants, shapes and scalars under names like val_12, may)."""
    result = built("llama-gqa", mode)
    names: dict[str, str] = {}
    contents: dict[str, str] = {}
    for name in result.manifest.graph_names:
        graph = onnx.load(result.out / f"{name}.onnx").graph
        for tensor in graph.initializer:
            data = onnx.numpy_helper.to_array(tensor).tobytes()
            if len(data) < 1024:  # not a weight: weights.bin takes everything from 1 KiB
                continue
            digest = hashlib.sha256(data).hexdigest()
            assert tensor.name not in names, f"{tensor.name} is in {names.get(tensor.name)} and {name}"
            assert digest not in contents, f"{tensor.name} of {name} holds the bytes of {contents.get(digest)}"
            names[tensor.name], contents[digest] = name, f"{name}: {tensor.name}"
    assert any(n.startswith("decoder.layers.") for n in names) and "embed_tokens" in names
    # Each form's graphs read each stored weight once: test_fused.test_the_fused_form_reads_...


def test_every_ort_optimization_level_gives_the_same_outputs(built):
    result = built("llama-gqa", "cm")
    ids = np.array([[1, 50, 60] + [1023] * 16 + [70, 80, 90, 100]])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 56, 56)).astype(np.float32)
    levels = [
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ]
    prompt = Prompt(pixel_values=pixels, input_ids=ids, image_start=3, max_new_tokens=8)
    runs = [greedy_trace(runtime_pipeline(result.out, result.manifest, level), prompt) for level in levels]
    for other in runs[1:]:
        assert other.tokens == runs[0].tokens
        assert other.kept_image_tokens == runs[0].kept_image_tokens
        assert other.core_neurons == runs[0].core_neurons
        np.testing.assert_allclose(other.step_logits, runs[0].step_logits, atol=1e-5, rtol=0)


def test_auto_budget_build_is_ort_only(checkpoint, tmp_path):
    auto = CoreMatchingConfig(
        token_budget="auto", prune_layer=1, auto_min_tokens=2, token_selector="query-overlap", token_merge="none"
    )
    config = ExportConfig(
        out=tmp_path / "auto", model_dir=checkpoint("llama"), max_prompt_tokens=64, max_sequence=128, corematching=auto
    )
    result = build(config)
    assert result.validation.passed, result.validation.to_json()
    assert not result.manifest.tensorrt_compatible
    assert "auto" in result.manifest.tensorrt_reason


def test_chunked_neuron_selection_build(checkpoint, tmp_path):
    config = ExportConfig(
        out=tmp_path / "chunks",
        model_dir=checkpoint("llama-gqa"),
        max_prompt_tokens=64,
        max_sequence=128,
        corematching=CM.with_(neuron_chunks=2),
    )
    result = build(config)
    assert result.validation.passed, result.validation.to_json()
    assert result.manifest.corematching.neuron_chunks == 2
    graph = onnx.load(result.out / "neurons.onnx").graph
    assert sum(n.op_type == "TopK" and n.name.startswith("cm.l2.neuron_topk") for n in graph.node) == 2


def test_exception_half_way_leaves_no_directory(checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while tracing a stack")

    monkeypatch.setattr("export.build.trace_stack", broken)
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated"):
        build(
            ExportConfig(
                out=out, model_dir=checkpoint("llama"), corematching=CM, max_prompt_tokens=64, max_sequence=128
            )
        )
    assert list(tmp_path.iterdir()) == []


def test_a_killed_build_leaves_a_partial_that_the_next_build_removes(checkpoint, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "b"
    argv = [
        sys.executable,
        "-m",
        "export",
        "build",
        "--model",
        str(checkpoint("llama")),
        "--out",
        str(out),
        *SMALL_BUILD,
    ]
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".b.*.partial/vision.onnx")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)  # no cleanup runs
    child.wait()
    (partial,) = tmp_path.glob(".b.*.partial")
    assert (partial / ".owner").read_text().strip() == str(child.pid)
    # A running build's directory is not touched: an owner that is alive (this process) keeps it.
    alive = tmp_path / ".b.alive.partial"
    alive.mkdir()
    (alive / ".owner").write_text(str(os.getpid()))
    result = build(
        ExportConfig(out=out, model_dir=checkpoint("llama"), corematching=CM, max_prompt_tokens=64, max_sequence=128)
    )
    assert result.validation.passed and out.is_dir() and not (out / ".owner").exists()
    assert sorted(p.name for p in tmp_path.glob(".b.*")) == [".b.alive.partial"]


def test_failed_validation_exits_1_writes_report_and_no_build(checkpoint, tmp_path, monkeypatch, capsys):
    from export.validate import CRITERIA, Criteria

    monkeypatch.setitem(CRITERIA, "float32", Criteria(absolute=0.0, relative=0.0, min_overlap=1.0, near_ties=False))
    out = tmp_path / "b"
    code = main(
        [
            "build",
            "--model",
            str(checkpoint("llama")),
            "--out",
            str(out),
            *SMALL_BUILD,
        ]
    )
    assert code == 1
    assert not out.exists() and not list(tmp_path.glob(".b.*"))
    report = json.loads((tmp_path / "b.validation-failed.json").read_text())
    assert report["passed"] is False and "logits differ" in report["cases"][0]["problems"][0]
    assert "validation failed" in capsys.readouterr().err


def test_existing_out_is_refused_without_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = [
        "build",
        "--model",
        str(checkpoint("llama")),
        "--out",
        str(out),
        "--no-validate",
        "--token-budget",
        "5",
        "--max-prompt-tokens",
        "64",
        "--max-sequence",
        "128",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --force" in err[0]
    assert (out / "mine.txt").read_text() == "keep me"
    assert main([*args, "--force"]) == 0
    assert (out / "manifest.json").exists() and not (out / "mine.txt").exists()


def test_validate_command_passes_and_catches_tampering(built, tmp_path, capsys):
    good = built("llama", "cm").out
    assert main(["validate", str(good)]) == 0
    graph = tmp_path / "graph"
    shutil.copytree(good, graph)
    data = bytearray((graph / "upper.onnx").read_bytes())
    data[-10] ^= 0xFF
    (graph / "upper.onnx").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["validate", str(graph)]) == 2
    assert "upper.onnx does not match its sha256" in capsys.readouterr().err
    manifest_dir = tmp_path / "manifest"
    shutil.copytree(good, manifest_dir)
    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    manifest["corematching"]["token_budget"] = 6
    (manifest_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["validate", str(manifest_dir)]) == 2
    assert "manifest.json was edited" in capsys.readouterr().err


def test_sliding_window_shorter_than_the_sequence_is_refused(checkpoint, tmp_path):
    with pytest.raises(BuildError, match="sliding window of 12 tokens"):
        build(
            ExportConfig(
                out=tmp_path / "w",
                model_dir=checkpoint("mistral-gqa", sliding_window=12),
                corematching=CM,
                max_prompt_tokens=64,
                max_sequence=128,
            )
        )
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--token-budget", "0"], "token_budget must be at least 1"),
        (["--token-budget", "700"], "larger than the 576 image tokens"),
        (["--neuron-ratio", "1.5"], "neuron_ratio must be in (0, 1]"),
        (["--prune-layer", "99"], "outside the decoder"),
        (["--opset", "11"], "--opset 11 is not supported"),
        (["--model", "/nonexistent/llava"], "does not exist"),
        (["--token-budget", "many"], "token budget must be an integer or 'auto'"),
    ],
)
def test_bad_input_is_one_line_and_exits_2(args, message, tmp_path):
    done = _cli("build", "--out", str(tmp_path / "b"), *args)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_engine_command_imports_no_torch_and_explains_a_missing_tensorrt(built):
    """`python -m export engine` runs on a Jetson without torch; without TensorRT it says so in one line."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['export', 'engine', {str(built('llama', 'cm').out)!r}]\n"
        "try:\n    runpy.run_module('export', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    if "TensorRT" not in done.stderr:
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be shown")
    assert done.stdout.split() == ["False", "False", "2"], done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_fp16_build_validates_with_its_criteria(checkpoint, tmp_path):
    result = build(
        ExportConfig(
            out=tmp_path / "fp16",
            model_dir=checkpoint("llama-gqa"),
            corematching=CM,
            fp16=True,
            max_prompt_tokens=64,
            max_sequence=128,
        )
    )
    report = result.validation
    assert report.passed, report.to_json()
    assert report.precision == "float16" and report.criteria.relative > 0
    graph = onnx.load(result.out / "lower.onnx").graph
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input}["image_features"] == onnx.TensorProto.FLOAT16


def test_weights_are_stored_once_for_all_graphs(checkpoint, tmp_path, monkeypatch):
    # Even graphs the tracer had to split into <graph>.onnx.data (over 2 GB) end in the one weights.bin.
    monkeypatch.setattr("export.trace.EXTERNAL_DATA_THRESHOLD", 1000)
    result = build(
        ExportConfig(
            out=tmp_path / "ext", model_dir=checkpoint("llama"), corematching=CM, max_prompt_tokens=64, max_sequence=128
        )
    )
    assert result.validation.passed
    assert not list(result.out.glob("*.onnx.data")) and "weights.bin" in result.manifest.files
    index = result.manifest.weights.graphs
    blob = (result.out / "weights.bin").read_bytes()
    unique = {entry.offset: entry for entries in index.values() for entry in entries.values()}
    unique |= {entry.offset: entry for entry in result.manifest.weights.bound.values()}
    stored = sum(np.prod(e.shape) * np.dtype(e.dtype).itemsize for e in unique.values())
    assert len(blob) < 1.05 * stored  # each weight once (and the alignment)
    for name in result.manifest.graph_names:
        assert result.manifest.graphs[name].external_data == "weights.bin"
        assert (result.out / f"{name}.onnx").stat().st_size < 1_000_000  # the graph and its small constants


def test_fp16_selection_overlap_counts_swaps_at_the_cut_as_ties():
    from export.validate import CRITERIA, selection_overlap

    scores = np.array([50.0, 49.0, 48.0, 47.9, 47.8, 10.0, 0.0])  # range 50: the fp16 band is 2.5
    ref = [0, 1, 2]  # k = 3: the cut is 48
    assert selection_overlap([0, 1, 3], ref, scores, CRITERIA["float16"].score_band) == 1.0  # 47.9: a near-tie
    assert selection_overlap([0, 1, 5], ref, scores, CRITERIA["float16"].score_band) == 2 / 3  # 10: a wrong pick
    assert selection_overlap([0, 1, 3], ref, scores, CRITERIA["float32"].score_band) == 2 / 3  # fp32: exact
    assert selection_overlap([0, 1, 3], ref, None, 0.05) == 2 / 3  # no scores: exact


def _trace(tokens, logits, kept=None, core=None) -> GenerationTrace:
    """What the generation loop records for a case, made by hand."""
    return GenerationTrace(
        image_features=np.zeros((2, 2), np.float32),
        prefill=PrefillResult(logits[0], kept, core or {}),
        tokens=tokens,
        logits=list(logits),
    )


def test_fp16_criteria_accept_divergence_only_at_a_near_tie():
    from export.validate import CRITERIA, _compare

    ref_logits = np.zeros((4, 5), np.float32)
    ref_logits[:, 1] = 10.0
    ref_logits[2, 3] = 9.9999  # step 2: tokens 1 and 3 nearly tie in the reference
    got_logits = ref_logits.copy()
    got_logits[2, 3] = 10.0001
    got = _trace([1, 1, 3, 1], got_logits)
    ref = ([1, 1, 1, 1], ref_logits, np.zeros((2, 2), np.float32), None, None, None)
    assert _compare("c", "q", 10, 4, CRITERIA["float16"], got, ref).passed
    assert not _compare("c", "q", 10, 4, CRITERIA["float32"], got, ref).passed
    ref_logits[2, 3] = 5.0  # a clear winner: parting there is a failure whatever the precision
    assert not _compare("c", "q", 10, 4, CRITERIA["float16"], got, ref).passed


def test_fp16_tolerance_doubles_only_where_selections_differ():
    """A near-tie swap of core neurons runs a slightly different sparse FFN: float16 allows twice the
    logit tolerance for that case, and only for it; float32 never (its selections must be equal)."""
    from export.validate import CRITERIA, _compare

    ref_logits = np.zeros((3, 4), np.float32)
    ref_logits[:, 1] = 10.0  # tolerance 1e-3 + 2e-2 * 10 = 0.201
    got_logits = ref_logits.copy()
    got_logits[1, 2] = 0.3  # a decode step off by 0.3: over the bound, under twice it
    scores = np.arange(8.0)[::-1].copy()
    ref = ([1, 1, 1], ref_logits, np.zeros((2, 2), np.float32), [0, 1], {3: list(range(20))}, scores)

    def case(core: list[int], criteria: str):
        got = _trace([1, 1, 1], got_logits, kept=[0, 1], core={3: core})
        return _compare("c", "q", 10, 3, CRITERIA[criteria], got, ref)

    same = case(list(range(20)), "float16")
    assert not same.passed and same.tolerance == pytest.approx(0.201)
    swapped = case([*range(19), 25], "float16")  # 95% shared: within min_overlap
    assert swapped.passed and swapped.tolerance == pytest.approx(0.402)
    assert not case([*range(19), 25], "float32").passed
    got_logits[1, 2] = 0.5  # over twice the bound: fails even with the swap
    assert not case([*range(19), 25], "float16").passed
