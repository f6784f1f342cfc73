"""`python -m planner`: the recommendation per device, the JSON and table output, llava-hf directories, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from plan_figures import D_MODEL, GIB, HEAD_DIM, LAYER, N_CORE, PARAMS_7B, ROOT, L, kv_bytes, run_cli

from planner.devices import DEVICES, device
from planner.plan import PlanConfig, PlanError, plan, plan_build, plan_manifest
from planner.recommend import MARGIN_BYTES, Candidate, rank, recommend

# -- the recommendation ------------------------------------------------------------------------------------


def _candidate(neurons: str, weights: str, act: str, runtime_name: str, headroom: float) -> Candidate:
    e = plan_build("llava-1.5-7b", weights="fp16", activations="fp16", neurons="dense", device_name="agx-orin-64gb")
    return Candidate(runtime_name, weights, act, neurons, replace(e, headroom=int(headroom * GIB)))  # type: ignore[arg-type]


def test_rank_prefers_the_method_then_precision_then_fast_activations_then_runtime_order() -> None:
    titan = device("titan-xp")
    order = [
        _candidate("per-request", "int8", "fp32", "onnxruntime-cuda", 0.6),  # the method, int8, fp32 (fast on Pascal)
        _candidate("per-request", "int8", "fp16", "onnxruntime-cuda", 2.0),
        _candidate("per-request", "int4", "fp32", "onnxruntime-cuda", 3.0),
        _candidate("static", "fp16", "fp16", "tensorrt-8.6", 5.0),  # a static set comes after every per-request one
        _candidate("static", "int8", "fp32", "tensorrt-8.6", 1.0),
        _candidate("static", "int8", "fp32", "onnxruntime-cuda", 4.0),
    ]
    assert sorted(reversed(order), key=lambda c: rank(titan, c)) == order
    # More headroom breaks a tie.
    a, b = (
        _candidate("static", "int4", "fp16", "tensorrt-10", 1.0),
        _candidate("static", "int4", "fp16", "tensorrt-10", 2.0),
    )
    assert min([a, b], key=lambda c: rank(device("orin-nx-16gb"), c)) is b


def test_7b_targets() -> None:
    """llava-1.5-7b, CoreMatching at k = 64, cache for 2048 tokens: what the planner says of the targets, with every
    weight held once (one graph per weight; one session, or one engine with two profiles, per graph)."""
    margin = MARGIN_BYTES
    # Orin Nano 8 GB: int4 weights with a static neuron set on TensorRT 10 fit with >= 0.5 GiB (0.88 GiB).
    nano = recommend("llava-1.5-7b", "orin-nano-8gb")
    c = nano.choice
    assert nano.status == "recommended" and c is not None
    assert (c.runtime, c.weights, c.activations, c.neurons) == ("tensorrt-10", "int4", "fp16", "static")
    assert c.estimate.headroom >= margin
    # The per-request int4 path is refused by the build on every runtime (no fused kernel for gathered int4
    # weights); on the CUDA provider it would also be 0.50 GiB short (the full sparse-layer FFN bound once plus
    # the request's compacted copy, 0.60 GiB).
    config = PlanConfig("llava-1.5-7b", "orin-nano-8gb", weights="int4", activations="fp16")
    assert not plan(config).corematching.runnable
    ort = plan(replace(config, runtime="onnxruntime-cuda")).corematching
    assert not ort.runnable and ort.headroom < 0 and ort.weights == ort.weights_stored
    # Titan Xp 12 GB: int8 weights fit with >= 0.5 GiB on ONNX Runtime's CUDA provider (one device copy), per-request
    # neurons, fp16 activations (1.80 GiB); with the Titan Xp's fast fp32 activations per-request neurons are tight
    # (0.38 GiB: the sessions' arenas and a dequantized bound FFN weight) and a static set fits (3.11 GiB). TensorRT
    # 8.6 folds int8 weights back into fp32 ones, which do not fit.
    titan = recommend("llava-1.5-7b", "titan-xp")
    c = titan.choice
    assert titan.status == "recommended" and c is not None
    assert (c.runtime, c.weights, c.activations, c.neurons) == ("onnxruntime-cuda", "int8", "fp16", "per-request")
    assert c.estimate.headroom >= margin
    fp32 = plan(PlanConfig("llava-1.5-7b", "titan-xp", weights="int8", runtime="onnxruntime-cuda"))
    assert 0 < fp32.corematching.headroom < margin <= fp32.static.headroom
    assert not plan(PlanConfig("llava-1.5-7b", "titan-xp", weights="int8")).corematching.fits  # on tensorrt-8.6
    # Dense fp16 fits neither, on any of their runtimes, however the weights are shared.
    for name in ("titan-xp", "orin-nano-8gb"):
        for rt in device(name).runtimes:
            for sharing in ("runtime", "separate"):
                fp16 = PlanConfig("llava-1.5-7b", name, weights="fp16", activations="fp16", runtime=rt, sharing=sharing)  # type: ignore[arg-type]
                assert not plan(fp16).dense.fits
    # A second copy (separate prefill and decode engines, the opt-in) puts the Orin Nano out of reach.
    assert recommend("llava-1.5-7b", "orin-nano-8gb", sharing="separate").status == "nothing fits"
    nx = recommend("llava-1.5-7b", "orin-nx-16gb")
    c = nx.choice
    assert nx.status == "recommended" and c is not None
    # Per-request int8 runs on ONNX Runtime's CUDA provider only (TensorRT takes constant quantized weights).
    assert (c.weights, c.neurons, c.runtime) == ("int8", "per-request", "onnxruntime-cuda")
    assert c.estimate.headroom >= margin


def test_recommend_view(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "--model", "llava-1.5-7b", "--recommend", "--json")
    assert (rc, err) == (0, "")
    data = json.loads(out)
    assert [d["device"] for d in data["devices"]] == list(DEVICES) and "per-request" in data["rule"]
    status = {d["device"]: d["status"] for d in data["devices"]}
    assert status == dict.fromkeys(DEVICES, "recommended")
    for d in data["devices"]:
        assert d["candidates"] and (d["status"] != "recommended" or d["choice"]["estimate"]["headroom"] >= MARGIN_BYTES)
    rc, out, err = run_cli(capsys, "--model", "llava-1.5-7b", "--device", "all")
    assert (rc, err) == (0, "") and all(name in out for name in DEVICES) and "rule:" in out


# -- output and input --------------------------------------------------------------------------------------


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "--model", "llava-1.5-7b", "--device", "agx-orin-32gb", "--json")
    assert (rc, err) == (0, "")
    data = json.loads(out)
    assert {
        "model",
        "device",
        "runtime",
        "weights",
        "activations",
        "planned_weights",
        "tokens",
        "budgets",
        "memory",
        "static_neuron_saving",
        "recommended",
        "notes",
    } <= set(data)
    assert (data["weights"], data["activations"], data["runtime"]["name"]) == ("fp16", "fp16", "tensorrt-10")
    assert data["model"]["parameters"]["total"] == PARAMS_7B
    assert data["budgets"] == {
        "token_budget": 64,
        "tokens_per_neuron_set": 1101,
        "core_neurons": N_CORE,
        "prune_layer": 2,
        "neuron_layers": [6, 27],
    }
    assert set(data["memory"]) == {"dense", "corematching", "corematching_static"}
    for entry in data["memory"].values():
        assert entry["total"] == sum(
            entry[key] for key in ("weights", "kv_cache", "compacted_ffn", "runtime_overhead")
        ) + max(entry["activations"], entry["load_transient"])
        assert sum(entry["weights_by_part"].values()) == entry["weights"]
        assert isinstance(entry["fits"], bool) and isinstance(entry["decode_ms_first"], float)
    assert data["memory"]["dense"]["fits"] is True
    assert data["recommended"]["precision"] == "fp16" and "10.3" in data["recommended"]["tensorrt"]


def test_table_output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the cells of a narrower table
    rc, out, err = run_cli(capsys, "--model", "llava-1.5-7b", "--device", "titan-xp", "--precision", "fp16")
    assert rc == 0 and "--precision is deprecated" in err
    for text in ("weights", "KV cache", "compacted FFN", "activations", "runtime overhead", "total", "fits"):
        assert text in out, text
    for text in ("dense", "CoreMatching", "short", "--recommend", "Titan Xp", "fp32", "separate engines add"):
        assert text in out, text
    rc, out, err = run_cli(capsys, "--model", "llava-1.5-7b", "--device", "titan-xp", "--sharing", "separate")
    assert (rc, err) == (0, "") and "(separate)" in out and "one copy (the default) would save" in out
    rc, out, err = run_cli(
        capsys, "--model", "llava-7b-width", "--device", "cpu", "--weights", "int4", "--activations", "fp16"
    )
    assert (rc, err) == (0, "") and "no limit checked" in out and "while a session is built" in out


def _hub_config(**text: object) -> dict[str, object]:
    """llava-hf/llava-1.5-7b-hf's config.json: the text model leaves Llama's defaults out."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "vocab_size": 32064,
            **text,
        },
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }


def test_llava_hf_directory_is_planned_from_config_json_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_hub_config()))  # no weights, no tokenizer
    from_dir = plan(PlanConfig(str(tmp_path), "agx-orin-32gb", "fp16"))
    from_preset = plan(PlanConfig("llava-1.5-7b", "agx-orin-32gb", "fp16"))
    assert from_dir.parameters == from_preset.parameters
    assert from_dir.dense == from_preset.dense and from_dir.corematching == from_preset.corematching
    # Neither torch nor transformers is imported to plan a directory (a Jetson has neither).
    code = (
        "import sys; from planner.plan import PlanConfig, plan; from planner.recommend import recommend; "
        f"plan(PlanConfig({str(tmp_path)!r}, 'orin-nano-8gb', weights='int4')); "
        f"recommend({str(tmp_path)!r}, 'titan-xp'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_grouped_query_directory_uses_its_kv_heads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_hub_config(num_key_value_heads=8)))
    p = plan(PlanConfig(str(tmp_path), "agx-orin-64gb", "fp16"))
    assert p.dense.kv_cache == kv_bytes(L, 2048, kv_heads=8)
    assert p.parameters["decoder_layers"] == L * (LAYER - 2 * D_MODEL * D_MODEL + 2 * D_MODEL * 8 * HEAD_DIM)


def test_plan_build_and_plan_manifest() -> None:
    e = plan_build("llava-7b-width", weights="int4", activations="fp16", neurons="per-request", max_sequence=640)
    p = plan(PlanConfig("llava-7b-width", "cpu", weights="int4", activations="fp16", max_sequence=640))
    assert e == p.corematching and p.runtime.name == "onnxruntime-cpu"
    manifest = SimpleNamespace(
        model=SimpleNamespace(source="llava-7b-width"),
        precision="float16",
        quantization=SimpleNamespace(weights="int4", block_size=32),
        corematching=SimpleNamespace(token_budget=64),
        static_neurons=None,
    )
    assert plan_manifest(manifest, max_sequence=640) == e
    # A default-recipe int4 set: ceil(1.25 N) = 5505 neurons in whole blocks of 32.
    static = SimpleNamespace(**{**vars(manifest), "static_neurons": SimpleNamespace(neurons=5536)})
    assert plan_manifest(static, max_sequence=640) == p.static
    # A set built at another width (an older build, or --static-width-ratio 1) is planned at its own width.
    narrow = SimpleNamespace(**{**vars(manifest), "static_neurons": SimpleNamespace(neurons=4416)})
    planned = plan_manifest(narrow, max_sequence=640)
    assert planned.weights_stored < p.static.weights_stored
    assert (
        planned
        == plan(
            PlanConfig(
                "llava-7b-width", "cpu", weights="int4", activations="fp16", max_sequence=640, static_neurons=4416
            )
        ).static
    )
    dense = SimpleNamespace(
        model=manifest.model, precision="float32", quantization=None, corematching=None, static_neurons=None
    )
    assert (
        plan_manifest(dense, max_sequence=640)
        == plan(PlanConfig("llava-7b-width", "cpu", weights="fp32", activations="fp32", max_sequence=640)).dense
    )


def _bad_dirs(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {"empty": empty, "broken": broken, "other": other, "missing": tmp_path / "missing"}


_7B = ["--model", "llava-1.5-7b"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "llava-9b", "--device", "titan-xp"], "neither a model preset"),
        ([*_7B, "--device", "titan"], "known devices: titan-xp"),
        ([*_7B], "--device is required"),
        ([*_7B, "--device", "titan-xp", "--precision", "bf16"], "precision"),
        ([*_7B, "--device", "titan-xp", "--weights", "int3"], "--weights must be one of fp32, fp16, int8, int4"),
        ([*_7B, "--device", "titan-xp", "--activations", "int8"], "--activations must be one of fp32, fp16"),
        ([*_7B, "--device", "titan-xp", "--weights", "fp16", "--activations", "fp32"], "float weights follow"),
        ([*_7B, "--device", "titan-xp", "--precision", "fp16", "--weights", "int8"], "not both"),
        ([*_7B, "--device", "titan-xp", "--runtime", "tensorrt"], "known runtimes: onnxruntime-cpu"),
        ([*_7B, "--device", "titan-xp", "--runtime", "tensorrt-10"], "its runtimes: tensorrt-8.6, onnxruntime-cuda"),
        ([*_7B, "--device", "titan-xp", "--token-budget", "x"], "--token-budget"),
        ([*_7B, "--device", "titan-xp", "--token-budget", "0"], "token-budget"),
        ([*_7B, "--device", "titan-xp", "--token-budget", "600"], "576 image tokens"),
        ([*_7B, "--device", "titan-xp", "--max-sequence", "600"], "no room"),
        ([*_7B, "--device", "titan-xp", "--block-size", "48"], "--block-size must be one of"),
        ([*_7B, "--recommend", "--device", "cpu"], "no memory limit"),
        ([*_7B, "--recommend", "--device", "jetson"], "known devices"),
        ([*_7B, "--device", "titan-xp", "--sharing", "some"], "--sharing must be one of runtime, separate, shared"),
        (["--model", "{missing}", "--device", "titan-xp"], "neither a model preset"),
        (["--model", "{empty}", "--device", "titan-xp"], "no config.json"),
        (["--model", "{broken}", "--device", "titan-xp"], "cannot read"),
        (["--model", "{other}", "--device", "titan-xp"], "model_type 'llama'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    dirs = _bad_dirs(tmp_path)
    argv = [str(dirs[a[1:-1]]) if a.startswith("{") else a for a in argv]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def test_plan_config_validates() -> None:
    with pytest.raises(PlanError, match="precision"):
        PlanConfig("llava-1.5-7b", "titan-xp", "fp8")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="token-budget"):
        PlanConfig("llava-1.5-7b", "titan-xp", token_budget=True)
    with pytest.raises(PlanError, match="known devices"):
        PlanConfig("llava-1.5-7b", "jetson")
    with pytest.raises(PlanError, match="known runtimes"):
        PlanConfig("llava-1.5-7b", "titan-xp", runtime="trt")
