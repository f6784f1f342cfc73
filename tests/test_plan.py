"""`python -m export plan`: memory plans against hand computations (no model is instantiated)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from export.devices import DEVICES, UnknownDeviceError, device
from export.plan import PlanConfig, PlanError, plan
from export.plan_cli import add_plan_parser, run_plan
from export.plan_model import load_geometry

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]

# llava-1.5-7b: CLIP ViT-L/14 at 336 px + a 2-layer projector + Vicuna-7B (vocabulary 32064).
L, D_MODEL, D_FFN, HEADS, HEAD_DIM, VOCAB, N_IMG = 32, 4096, 11008, 32, 128, 32064, 576
VISION = (
    1024
    + 3 * 14 * 14 * 1024
    + 577 * 1024  # class embedding, patch conv, positions
    + 2 * 2 * 1024  # pre and post layer norms
    + 24 * (4 * (1024 * 1024 + 1024) + 2 * 2 * 1024 + (1024 * 4096 + 4096) + (4096 * 1024 + 1024))
)
PROJECTOR = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
LAYER = 4 * D_MODEL * D_MODEL + 3 * D_MODEL * D_FFN + 2 * D_MODEL  # q k v o, gate up down, two norms
PARAMS_7B = VISION + PROJECTOR + VOCAB * D_MODEL + L * LAYER + D_MODEL + VOCAB * D_MODEL
N_CORE = math.ceil(0.4 * D_FFN)  # 4404
SPARSE_LAYERS = 21  # layers 6..26 of 32
PRUNE_LAYER = 2
# Expected fits of dense llava-1.5-7b at fp16 (weights alone are 13.2 GiB).
FITS_7B_FP16 = {
    "titan-xp": False,
    "orin-nano-8gb": False,
    "orin-nx-16gb": False,
    "agx-orin-32gb": True,
    "agx-orin-64gb": True,
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="python -m export")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    rc = run_plan(parser.parse_args(["plan", *argv]))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _kv(layers: int, tokens: int, kv_heads: int = HEADS, value_bytes: int = 2) -> int:
    return layers * 2 * kv_heads * HEAD_DIM * tokens * value_bytes


def test_devices_table() -> None:
    assert set(DEVICES) == {"titan-xp", "orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb"}
    titan = device("titan-xp")
    assert (titan.compute_capability, titan.memory_gb, titan.shared_memory) == ("6.1", 12, False)
    assert titan.recommended_precision == "fp32" and titan.fp16_speed == 1 / 64 and "8.6" in titan.tensorrt
    assert titan.bandwidth_gbps == 547.7
    for name, memory, bandwidth in [
        ("orin-nano-8gb", 8, 68.0),
        ("orin-nx-16gb", 16, 102.4),
        ("agx-orin-32gb", 32, 204.8),
        ("agx-orin-64gb", 64, 204.8),
    ]:
        board = device(name)
        assert (board.compute_capability, board.memory_gb, board.bandwidth_gbps) == ("8.7", memory, bandwidth)
        assert board.shared_memory and board.recommended_precision == "fp16"
        assert "10.3" in board.tensorrt and "8.6" in board.tensorrt
        assert board.usable_gb < board.memory_gb
    with pytest.raises(UnknownDeviceError, match="titan-xp, orin-nano-8gb"):
        device("titan")


def test_7b_parameters_match_the_geometry() -> None:
    params = load_geometry("llava-1.5-7b").parameters()
    # transformers' LlavaForConditionalGeneration counts the same on the meta device.
    assert params["vision_tower"] == VISION == 303_507_456
    assert params["projector"] == PROJECTOR
    assert params["total"] == PARAMS_7B == 7_063_427_072
    assert plan(PlanConfig("llava-1.5-7b", "titan-xp", "fp16")).dense.weights == pytest.approx(14.1e9, rel=0.01)


@pytest.mark.parametrize("name", sorted(FITS_7B_FP16))
def test_7b_fp16_on_each_device(name: str) -> None:
    p = plan(PlanConfig("llava-1.5-7b", name, "fp16"))
    dev = device(name)
    s, m, k = N_IMG + 40, 2048, 64
    assert (p.prompt_tokens, p.kept_prompt_tokens) == (s, s - N_IMG + k)
    overhead = int((0.75 if name == "titan-xp" else 1.0) * GIB)
    dense, cm, static = p.dense, p.corematching, p.static
    assert dense.weights == cm.weights == 2 * PARAMS_7B
    assert dense.kv_cache == _kv(L, m) == GIB  # 32 x 2 x 4096 x 2048 x 2 B
    assert cm.kv_cache == _kv(PRUNE_LAYER + 1, m) + _kv(L - PRUNE_LAYER - 1, m - N_IMG + k)
    assert (dense.compacted_ffn, static.compacted_ffn) == (0, 0)
    assert cm.compacted_ffn == SPARSE_LAYERS * 3 * N_CORE * D_MODEL * 2  # docs/architecture.md: 2.3 GB
    # The dense prefill ends holding every layer's prompt KV outputs, on top of one layer's working set.
    assert _kv(L, s) < dense.activations < _kv(L, s) + 0.2 * GIB
    assert 0 < cm.activations < dense.activations
    for e in (dense, cm, static):
        assert e.runtime_overhead == overhead
        assert e.total == e.weights + e.kv_cache + e.compacted_ffn + e.activations + e.runtime_overhead
        assert e.headroom == dev.usable_bytes - e.total and e.fits == (e.headroom >= 0)
    assert dense.fits is FITS_7B_FP16[name]
    # Decode reads the decoder weights, the head and one embedding row, then the cache (bandwidth bound).
    head = (D_MODEL + VOCAB * D_MODEL) * 2
    assert dense.decode_bytes_first == (L * LAYER) * 2 + head + D_MODEL * 2 + _kv(L, s)
    assert dense.decode_bytes_last == (L * LAYER) * 2 + head + D_MODEL * 2 + _kv(L, m)
    assert dense.decode_ms_first == pytest.approx(dense.decode_bytes_first / (dev.bandwidth_gbps * 1e9) * 1e3)
    narrowed = SPARSE_LAYERS * 3 * D_MODEL * (D_FFN - N_CORE) * 2
    assert cm.decode_bytes_last == dense.decode_bytes_last - narrowed - (dense.kv_cache - cm.kv_cache)
    assert static.decode_bytes_first == cm.decode_bytes_first


def test_7b_fp16_does_not_fit_titan_xp_or_orin_nano() -> None:
    for name in ("titan-xp", "orin-nano-8gb"):
        p = plan(PlanConfig("llava-1.5-7b", name, "fp16"))
        assert p.dense.weights > device(name).usable_bytes  # the weights alone do not fit
        assert not (p.dense.fits or p.corematching.fits or p.static.fits)


@pytest.mark.parametrize(("k", "precision"), [(64, "fp16"), (32, "fp32"), (192, "fp16"), (576, "int8")])
def test_corematching_kv_is_smaller_by_the_pruned_tokens(k: int, precision: str) -> None:
    p = plan(PlanConfig("llava-1.5-7b", "agx-orin-64gb", precision, token_budget=k))  # type: ignore[arg-type]
    value_bytes = 4 if precision == "fp32" else 2  # int8 keeps an fp16 cache
    saved = (L - PRUNE_LAYER - 1) * 2 * HEADS * HEAD_DIM * (N_IMG - k) * value_bytes
    assert p.dense.kv_cache - p.corematching.kv_cache == saved
    assert p.corematching.kv_cache == p.static.kv_cache


def test_static_neuron_set_saving() -> None:
    p = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", "fp16"))
    assert p.budgets.core_neurons == N_CORE and len(p.budgets.neuron_sparse_layers) == SPARSE_LAYERS
    assert p.static_saving == (D_FFN - N_CORE) * 3 * D_MODEL * SPARSE_LAYERS * 2
    assert p.static.weights == p.dense.weights - p.static_saving
    assert p.static.total < p.dense.total < p.corematching.total  # compacted weights cost a per-request copy
    assert p.static.fits and not p.dense.fits  # 16 GB: only the narrowed weights fit


def test_int8_halves_the_weights_only() -> None:
    fp16 = plan(PlanConfig("llava-1.5-7b", "orin-nano-8gb", "fp16"))
    int8 = plan(PlanConfig("llava-1.5-7b", "orin-nano-8gb", "int8"))
    assert 2 * int8.dense.weights == fp16.dense.weights
    assert 2 * int8.corematching.compacted_ffn == fp16.corematching.compacted_ffn
    assert 2 * int8.static_saving == fp16.static_saving
    assert int8.dense.kv_cache == fp16.dense.kv_cache and int8.dense.activations == fp16.dense.activations
    assert fp16.dense.total - int8.dense.total == PARAMS_7B
    assert any("planning-only" in note for note in int8.notes)


def test_default_precision_is_the_devices() -> None:
    assert plan(PlanConfig("llava-1.5-7b", "titan-xp")).precision == "fp32"
    assert plan(PlanConfig("llava-1.5-7b", "agx-orin-32gb")).weight_bytes == 2


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "--model", "llava-1.5-7b", "--device", "agx-orin-32gb", "--json")
    assert (rc, err) == (0, "")
    data = json.loads(out)
    assert {
        "model",
        "device",
        "precision",
        "tokens",
        "budgets",
        "memory",
        "static_neuron_saving",
        "recommended",
        "notes",
    } <= set(data)
    assert data["precision"] == "fp16" and data["model"]["parameters"]["total"] == PARAMS_7B
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
            entry[key] for key in ("weights", "kv_cache", "compacted_ffn", "activations", "runtime_overhead")
        )
        assert isinstance(entry["fits"], bool) and isinstance(entry["decode_ms_first"], float)
    assert data["memory"]["dense"]["fits"] is True
    assert data["recommended"]["precision"] == "fp16" and "10.3" in data["recommended"]["tensorrt"]


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "--model", "llava-1.5-7b", "--device", "titan-xp", "--precision", "fp16")
    assert (rc, err) == (0, "")
    for text in (
        "weights",
        "KV cache",
        "compacted FFN",
        "peak activations",
        "runtime overhead",
        "total",
        "fits",
        "dense",
        "CoreMatching",
        "short",
        "recommended",
        "Titan Xp",
        "fp32",
    ):
        assert text in out, text


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
        "import sys; from export.plan import PlanConfig, plan; "
        f"plan(PlanConfig({str(tmp_path)!r}, 'orin-nano-8gb')); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_grouped_query_directory_uses_its_kv_heads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_hub_config(num_key_value_heads=8)))
    p = plan(PlanConfig(str(tmp_path), "agx-orin-64gb", "fp16"))
    assert p.dense.kv_cache == _kv(L, 2048, kv_heads=8)
    assert p.parameters["decoder_layers"] == L * (LAYER - 2 * D_MODEL * D_MODEL + 2 * D_MODEL * 8 * HEAD_DIM)


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "llava-9b", "--device", "titan-xp"], "neither a model preset"),
        (["--model", "llava-1.5-7b", "--device", "titan"], "known devices: titan-xp"),
        (["--model", "llava-1.5-7b", "--device", "titan-xp", "--precision", "bf16"], "precision"),
        (["--model", "llava-1.5-7b", "--device", "titan-xp", "--token-budget", "x"], "--token-budget"),
        (["--model", "llava-1.5-7b", "--device", "titan-xp", "--token-budget", "0"], "token-budget"),
        (["--model", "llava-1.5-7b", "--device", "titan-xp", "--token-budget", "600"], "576 image tokens"),
        (["--model", "llava-1.5-7b", "--device", "titan-xp", "--max-sequence", "600"], "no room"),
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
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_plan_config_validates() -> None:
    with pytest.raises(PlanError, match="precision"):
        PlanConfig("llava-1.5-7b", "titan-xp", "fp8")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="token-budget"):
        PlanConfig("llava-1.5-7b", "titan-xp", token_budget=True)
    with pytest.raises(PlanError, match="known devices"):
        PlanConfig("llava-1.5-7b", "jetson")
