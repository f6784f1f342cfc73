"""`python -m planner`: memory plans against hand computations (no model is instantiated, no weights loaded)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from plan_figures import (
    D_FFN,
    D_MODEL,
    FITS_7B_FP16,
    GIB,
    HEAD_DIM,
    HEADS,
    LAYER,
    N_CORE,
    N_IMG,
    PARAMS_7B,
    PROJECTOR,
    PRUNE_LAYER,
    SPARSE_LAYERS,
    VISION,
    VOCAB,
    L,
    kv_bytes,
)

from planner.devices import DEVICES, HOST, UnknownDeviceError, device
from planner.footprint import load_geometry
from planner.plan import Estimate, PlanConfig, plan, plan_build
from planner.runtimes import RUNTIMES, UnknownRuntimeError, matmul_bytes, runtime

# A static set keeps ceil(1.25 N) neurons per layer (the default recipe's width ratio), int4 in whole blocks.
STATIC_RATIO = 1.25
N_STATIC = math.ceil(STATIC_RATIO * N_CORE)  # 5505 of llava-1.5-7b's 11008 (fp16: no blocks)

# -- the byte formulas of the storage scheme ---------------------------------------------------------------


def test_matmul_bytes_by_hand() -> None:
    # [K, N] = [64, 8]: 512 values.
    assert matmul_bytes(64, 8, "fp32", "fp32") == 2048
    assert matmul_bytes(64, 8, "fp16", "fp16") == 1024
    assert matmul_bytes(64, 8, "int8", "fp16") == 512 + 8 * 2  # + N scales
    assert matmul_bytes(64, 8, "int8", "fp32") == 512 + 8 * 4
    assert matmul_bytes(64, 8, "int8", "fp16", shared_scales=True) == 512
    assert matmul_bytes(64, 8, "int4", "fp16") == 256 + 2 * 8 * 2  # K/32 x N scales
    assert matmul_bytes(8, 64, "int4", "fp32", rows_gathered=True) == 256 + 8 * 2 * 4  # blocks along N
    assert matmul_bytes(64, 8, "int4", "fp16", block_size=64) == 256 + 1 * 8 * 2
    # A side the blocks do not divide stays in floats at the activations' precision, as the pass keeps it.
    assert matmul_bytes(48, 8, "int4", "fp16") == 48 * 8 * 2
    assert matmul_bytes(48, 8, "int4", "fp16", rows_gathered=True) == 48 * 8 * 2


def _tiny_config(tmp_path: Path) -> Path:
    """CLIP 32-wide, 1 layer, 4 patches; Llama d = 64, D = 160, 4 layers, 4 heads; vocabulary 96."""
    config = {
        "model_type": "llava",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 160,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "vocab_size": 96,
            "max_position_embeddings": 512,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_tiny_geometry_int4_bytes_by_hand(tmp_path: Path) -> None:
    model = str(_tiny_config(tmp_path))
    p = plan(PlanConfig(model, "orin-nano-8gb", weights="int4", activations="fp16", token_budget=2, max_sequence=64))
    b = p.budgets
    assert (b.core_neurons, b.neuron_layers, b.prune_layer) == (64, (1, 3), 2)  # N = 64, 2 sparse layers
    # int4 [K, N]: K*N/2 bytes + (K/32)*N fp16 scales; floats at 2 bytes.
    vision = 4 * (512 + 1 * 32 * 2) + (1024 + 1 * 64 * 2) + (1024 + 2 * 32 * 2)
    vision += 2 * (32 + 3 * 14 * 14 * 32 + 5 * 32 + 4 * 32 + (4 * 32 + 64 + 32) + 4 * 32)  # embeddings, biases, norms
    projector = (1024 + 1 * 64 * 2) + (2048 + 2 * 64 * 2) + 2 * 128
    embedding = 2 * 96 * 64
    attention = 4 * (2048 + 2 * 64 * 2)
    ffn = 3 * (5120 + 5 * 64 * 2)  # gate, up [64, 160] and down [160, 64] (blocks along 160; or along 64: the same)
    layer = attention + ffn + 2 * 128
    head = 2 * 64 + (3072 + 2 * 96 * 2)
    dense = vision + projector + embedding + 4 * layer + head
    assert dense == 170176
    assert p.dense.weights_stored == p.corematching.weights_stored == dense
    # A static set keeps ceil(1.25 N) = 80 neurons, in whole int4 blocks of 32: 96 (at most D = 160).
    n_static = min(160, math.ceil(math.ceil(STATIC_RATIO * 64) / 32) * 32)
    assert n_static == 96
    static_ffn = 3 * (64 * n_static // 2 + 2 * n_static * 2)  # gate, up [64, 96], down [96, 64]
    # A static set narrows the sparse layers but the prune layer (2): layer 1 only.
    assert b.narrowable_layers == [1]
    assert p.static.weights_stored == dense - 1 * (ffn - static_ffn) == 163264
    assert p.static_saving == ffn - static_ffn == 6912
    # Per request, per sparse layer: 3*d*N/2 bytes + 3*(d/32)*N scales.
    assert p.corematching.compacted_ffn == 2 * (3 * 64 * 64 // 2 + 3 * 2 * 64 * 2) == 13824
    # KV: 256 bytes per token and layer; layers 0..2 hold 64 tokens, layer 3 holds 64 - 4 + 2.
    assert p.dense.kv_cache == 4 * 64 * 256
    assert p.corematching.kv_cache == 256 * (3 * 64 + 62)
    # TensorRT 10 holds one copy: the decoder is one engine with a prefill and a decode profile, whose two
    # execution contexts share its weights; separate prefill and decode engines (an opt-in) hold it twice.
    decoder = embedding + 4 * layer + head
    assert p.runtime.name == "tensorrt-10" and p.dense.weights == dense
    assert p.dense.shared_saving == 0 and p.dense.unshared_decode_weights == decoder
    separate = plan(replace(p.config, sharing="separate"))
    assert separate.dense.weights == dense + decoder and separate.dense.shared_saving == decoder
    shared = plan(replace(p.config, sharing="shared")).dense
    assert replace(shared, sharing="runtime") == p.dense  # the old spelling of one copy
    # Per-request neurons: the sparse layers' full FFN (layers 1 and 2) is bound, held once in its stored
    # form whatever the sharing; lower (layers 0..2 with the embedding) and upper (layer 3 with the head).
    bound = 2 * ffn
    assert p.corematching.weights == dense
    assert separate.corematching.weights == dense + decoder - bound
    groups = load_geometry(model).weight_groups("per-request", b.neuron_sparse_layers, prune_layer=b.prune_layer)
    assert {g.graph for g in groups} == {"vision", "lower", "upper"}
    assert sum(g.count for g in groups if g.bound) == 3 * 2 and all(g.graph == "lower" for g in groups if g.bound)
    # TensorRT's contexts each hold their engine's largest profile: two per stack, one for vision and select.
    assert p.corematching.activations > p.static.activations
    int8 = plan(PlanConfig(model, "orin-nano-8gb", weights="int8", activations="fp16", token_budget=2, max_sequence=64))
    # int8: 3*d*N bytes + 2*N gathered scales (down's per-output-channel scales are the model's).
    assert int8.corematching.compacted_ffn == 2 * (3 * 64 * 64 + 2 * 64 * 2) == 25088


def test_7b_stored_bytes_match_the_scheme() -> None:
    vision_linear = 24 * (4 * 1024 * 1024 + 2 * 1024 * 4096)
    linear = vision_linear + 1024 * 4096 + 4096 * 4096 + L * (4 * D_MODEL**2 + 3 * D_MODEL * D_FFN) + D_MODEL * VOCAB
    floats = PARAMS_7B - linear  # embedding table, norms, biases, patch conv, positions, class embedding
    columns = 24 * (4 * 1024 + 4096 + 1024) + 4096 + 4096 + L * (4 * D_MODEL + 2 * D_FFN + D_MODEL) + VOCAB
    int8 = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", weights="int8", activations="fp16"))
    int4 = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", weights="int4", activations="fp16"))
    assert int8.dense.weights_stored == linear + 2 * columns + 2 * floats
    assert int4.dense.weights_stored == linear // 2 + linear // 32 * 2 + 2 * floats
    assert int8.corematching.compacted_ffn == SPARSE_LAYERS * (3 * D_MODEL * N_CORE + 2 * N_CORE * 2)
    assert int4.corematching.compacted_ffn == SPARSE_LAYERS * (3 * D_MODEL * N_CORE // 2 + 3 * 128 * N_CORE * 2)


# -- devices and runtimes ----------------------------------------------------------------------------------


def test_devices_table() -> None:
    assert set(DEVICES) == {"titan-xp", "orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb"}
    titan = device("titan-xp")
    assert (titan.compute_capability, titan.memory_gb, titan.shared_memory) == ("6.1", 12, False)
    assert titan.recommended_precision == "fp32" and titan.fp16_speed == 1 / 64 and "8.6" in titan.tensorrt
    assert titan.bandwidth_gbps == 547.7 and titan.runtimes == ("tensorrt-8.6", "onnxruntime-cuda")
    for name, memory, bandwidth in [
        ("orin-nano-8gb", 8, 68.0),
        ("orin-nx-16gb", 16, 102.4),
        ("agx-orin-32gb", 32, 204.8),
        ("agx-orin-64gb", 64, 204.8),
    ]:
        board = device(name)
        assert (board.compute_capability, board.memory_gb, board.bandwidth_gbps) == ("8.7", memory, bandwidth)
        assert board.shared_memory and board.recommended_precision == "fp16"
        assert "10.3" in board.tensorrt and "8.6" in board.tensorrt and board.recommended_runtime == "tensorrt-10"
        assert board.usable_gb < board.memory_gb
    for dev in DEVICES.values():
        assert all(runtime(r).runs_on(dev.compute_capability) for r in dev.runtimes)
    assert not runtime("tensorrt-10").runs_on("6.1")  # TensorRT 10 is built for SM 7.0+
    assert device("cpu") is HOST and HOST.usable_bytes is None and HOST.runtimes == ("onnxruntime-cpu",)
    with pytest.raises(UnknownDeviceError, match="titan-xp, orin-nano-8gb"):
        device("titan")
    with pytest.raises(UnknownRuntimeError, match=r"onnxruntime-cpu, onnxruntime-cuda, tensorrt-8\.6, tensorrt-10"):
        runtime("tensorrt")


def test_every_runtime_fact_has_a_source() -> None:
    for rt in RUNTIMES.values():
        for form, handling in rt.weights.items():
            assert handling.source.strip() and handling.kernel.strip(), (rt.name, form)
        assert rt.sharing.source.strip() and all(f.source.strip() for f in rt.facts)


def test_fallback_is_planned_at_what_it_runs_at() -> None:
    # TensorRT 8.6 has no INT4 and folds weight-only int8 back into floats: planned at the activations' precision.
    fp16 = plan(PlanConfig("llava-1.5-7b", "orin-nano-8gb", weights="fp16", activations="fp16", runtime="tensorrt-8.6"))
    for weights in ("int4", "int8"):
        p = plan(
            PlanConfig("llava-1.5-7b", "orin-nano-8gb", weights=weights, activations="fp16", runtime="tensorrt-8.6")
        )
        assert p.planned_weights == "fp16" and p.dense.weights == fp16.dense.weights
        assert p.dense.weights_stored < fp16.dense.weights_stored  # what the build holds is still smaller
        assert p.corematching.compacted_ffn == fp16.corematching.compacted_ffn
        assert any(n.startswith(f"{weights} weights fall back on tensorrt-8.6: planned at fp16") for n in p.notes)
    titan = plan(PlanConfig("llava-1.5-7b", "titan-xp", weights="int8"))  # fp32 activations: planned at fp32
    assert titan.planned_weights == "fp32" and any("onnxruntime-cuda runs them as int8" in n for n in titan.notes)
    trt10 = plan(PlanConfig("llava-1.5-7b", "orin-nano-8gb", weights="int4", activations="fp16"))
    assert trt10.planned_weights == "int4" and not any("fall back" in n for n in trt10.notes)


def test_per_request_quantized_weights_need_a_runtime_that_dequantizes_inputs() -> None:
    for name in ("tensorrt-10", "tensorrt-8.6"):
        assert not runtime(name).per_request_quantized
    for weights, reason in (("int4", "refused by the build"), ("int8", "constant weights")):
        p = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", weights=weights, activations="fp16", runtime="tensorrt-10"))
        assert not p.corematching.runnable and reason in p.corematching.reason
        assert p.static.runnable and p.dense.runnable
    # int4 with per-request neurons is refused on every runtime (the build refuses it).
    cuda_int4 = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", weights="int4", runtime="onnxruntime-cuda"))
    assert not cuda_int4.corematching.runnable and "static neurons" in cuda_int4.corematching.reason
    fp16 = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", weights="fp16", activations="fp16", runtime="tensorrt-10"))
    assert fp16.corematching.runnable
    cuda = plan(
        PlanConfig("llava-1.5-7b", "orin-nx-16gb", weights="int8", activations="fp16", runtime="onnxruntime-cuda")
    )
    assert cuda.corematching.runnable


def test_onnxruntime_cpu_holds_what_was_measured() -> None:
    fp32 = plan_build("llava-7b-width", weights="fp32", activations="fp32", neurons="dense")
    assert fp32.weights == fp32.weights_stored  # views of one mapped file
    assert fp32.headroom is None and fp32.fits is None and fp32.runtime_overhead == int(0.1 * GIB)
    fp16 = plan_build("llava-7b-width", weights="fp16", activations="fp16", neurons="dense")
    # fp16 MatMul weights become one fp32 copy in the one session that reads them.
    g = load_geometry("llava-7b-width")
    groups = g.weight_groups("dense")
    assert fp16.weights == sum(gr.parameters * (4 if gr.matmul else 2) for gr in groups) and fp16.load_transient == 0
    # Per-request neurons: the sparse layers' fp16 FFN is bound as stored (no fp32 copy); a prefill casts one.
    cm16 = plan_build("llava-7b-width", weights="fp16", activations="fp16", neurons="per-request")
    b = plan(PlanConfig("llava-7b-width", "cpu", weights="fp16", activations="fp16")).budgets
    cm_groups = g.weight_groups("per-request", b.neuron_sparse_layers, prune_layer=b.prune_layer)
    bound = sum(gr.parameters for gr in cm_groups if gr.bound)
    assert bound > 0
    assert cm16.weights == fp16.weights - 2 * bound
    int4 = plan_build("llava-7b-width", weights="int4", activations="fp16", neurons="per-request")
    assert int4.weights > int4.weights_stored and int4.load_transient > 0
    # One pre-packed copy of each constant int4 weight (1.17x), the bound ones as stored (nothing folded).
    assert int4.weights < 1.17 * int4.weights_stored
    assert (
        int4.total
        == int4.weights
        + int4.kv_cache
        + int4.compacted_ffn
        + max(int4.activations, int4.load_transient)
        + int4.runtime_overhead
    )


# -- the 7B plans ------------------------------------------------------------------------------------------


def test_7b_parameters_match_the_geometry() -> None:
    params = load_geometry("llava-1.5-7b").parameters()
    # transformers' LlavaForConditionalGeneration counts the same on the meta device.
    assert params["vision_tower"] == VISION == 303_507_456
    assert params["projector"] == PROJECTOR
    assert params["total"] == PARAMS_7B == 7_063_427_072
    assert plan(PlanConfig("llava-1.5-7b", "titan-xp", "fp16")).dense.weights_stored == pytest.approx(14.1e9, rel=0.01)
    g = load_geometry("llava-1.5-7b")
    for neurons in ("dense", "per-request"):
        groups = g.weight_groups(neurons, range(6, 27), N_CORE, PRUNE_LAYER)  # type: ignore[arg-type]
        assert sum(gr.parameters for gr in groups) == PARAMS_7B


@pytest.mark.parametrize("name", sorted(FITS_7B_FP16))
def test_7b_fp16_on_each_device(name: str) -> None:
    # One shared copy of the weights (`sharing="shared"`), so that every figure is the hand computation's.
    config = PlanConfig("llava-1.5-7b", name, weights="fp16", activations="fp16", sharing="shared")
    p = plan(config)
    dev = device(name)
    s, m, k = N_IMG + 40, 2048, 64
    assert (p.prompt_tokens, p.kept_prompt_tokens) == (s, s - N_IMG + k)
    overhead = int((0.75 if name == "titan-xp" else 1.0) * GIB)
    dense, cm, static = p.dense, p.corematching, p.static
    assert dense.weights == cm.weights == 2 * PARAMS_7B
    assert dense.kv_cache == kv_bytes(L, m) == GIB  # 32 x 2 x 4096 x 2048 x 2 B
    assert cm.kv_cache == kv_bytes(PRUNE_LAYER + 1, m) + kv_bytes(L - PRUNE_LAYER - 1, m - N_IMG + k)
    assert (dense.compacted_ffn, static.compacted_ffn) == (0, 0)
    assert cm.compacted_ffn == SPARSE_LAYERS * 3 * N_CORE * D_MODEL * 2  # docs/architecture.md: 2.3 GB
    # The dense prefill ends holding every layer's prompt KV outputs, on top of one layer's working set; TensorRT
    # keeps it twice (the decoder engine's prefill and decode contexts, each sized for the prefill profile).
    assert 2 * kv_bytes(L, s) < dense.activations < 2 * kv_bytes(L, s) + 0.4 * GIB
    assert 0 < cm.activations < dense.activations
    for e in (dense, cm, static):
        assert e.runtime_overhead == overhead and e.load_transient == 0
        assert e.total == e.weights + e.kv_cache + e.compacted_ffn + e.activations + e.runtime_overhead
        assert e.headroom == dev.usable_bytes - e.total and e.fits == (e.headroom >= 0)
    assert dense.fits is FITS_7B_FP16[name]
    # Decode reads the decoder weights, the head and one embedding row, then the cache (bandwidth bound).
    head = (D_MODEL + VOCAB * D_MODEL) * 2
    assert dense.decode_bytes_first == (L * LAYER) * 2 + head + D_MODEL * 2 + kv_bytes(L, s)
    assert dense.decode_bytes_last == (L * LAYER) * 2 + head + D_MODEL * 2 + kv_bytes(L, m)
    assert dense.decode_ms_first == pytest.approx(dense.decode_bytes_first / (dev.bandwidth_gbps * 1e9) * 1e3)
    narrowed = SPARSE_LAYERS * 3 * D_MODEL * (D_FFN - N_CORE) * 2
    assert cm.decode_bytes_last == dense.decode_bytes_last - narrowed - (dense.kv_cache - cm.kv_cache)
    # The static set reads its ceil(1.25 N) neurons in each sparse layer where a request reads its N.
    wider = SPARSE_LAYERS * 3 * D_MODEL * (N_STATIC - N_CORE) * 2
    assert static.decode_bytes_first == cm.decode_bytes_first + wider
    # As TensorRT holds them: one copy (one engine per stack, two profiles); separate engines hold the decoder
    # (its layers, head and embedding table) twice.
    assert plan(replace(config, sharing="runtime")).dense.weights == dense.weights
    engines = plan(replace(config, sharing="separate")).dense
    assert engines.weights == dense.weights + (L * LAYER + D_MODEL + 2 * VOCAB * D_MODEL) * 2


def test_sharing_of_the_prefill_and_decode_weights() -> None:
    decoder = (L * LAYER + D_MODEL + 2 * VOCAB * D_MODEL) * 2  # layers, head and embedding table
    config = PlanConfig("llava-1.5-7b", "agx-orin-64gb", weights="fp16", activations="fp16")

    def dense(runtime_name: str, sharing: str = "runtime") -> Estimate:
        return plan(replace(config, runtime=runtime_name, sharing=sharing)).dense  # type: ignore[arg-type]

    # Every runtime holds one copy: one session, or one engine with two profiles, per graph; separate prefill and
    # decode sessions or engines are an opt-in that holds the decoder twice.
    for name in ("onnxruntime-cuda", "tensorrt-8.6", "tensorrt-10"):
        one, apart = dense(name), dense(name, "separate")
        assert one.weights == 2 * PARAMS_7B and one.unshared_decode_weights == decoder and one.shared_saving == 0
        assert apart.weights == one.weights + decoder and apart.shared_saving == decoder
        # (TensorRT's separate decode engine holds a decode-sized context, not a second prefill-sized one.)
        assert apart.total <= one.total_unshared
        assert replace(dense(name, "shared"), sharing="runtime") == one
    # int4 on the CUDA provider: the one session that reads them copies them to the device, once.
    int4 = plan(replace(config, weights="int4", runtime="onnxruntime-cuda"))
    assert int4.dense.weights == int4.dense.weights_stored and int4.dense.shared_saving == 0
    # The per-request layers' bound FFN weights are held once whatever the sharing.
    cm = int4.corematching
    apart = plan(replace(config, weights="int4", runtime="onnxruntime-cuda", sharing="separate")).corematching
    assert apart.weights == cm.weights + cm.unshared_decode_weights
    bound = SPARSE_LAYERS * 3 * (D_MODEL * D_FFN // 2 + D_MODEL * D_FFN // 32 * 2)  # int4, fp16 scales
    assert int4.dense.unshared_decode_weights - cm.unshared_decode_weights == bound


def test_7b_fp16_does_not_fit_titan_xp_or_orin_nano() -> None:
    for name in ("titan-xp", "orin-nano-8gb"):
        for rt in device(name).runtimes:
            p = plan(PlanConfig("llava-1.5-7b", name, weights="fp16", activations="fp16", runtime=rt))
            assert p.dense.weights > device(name).usable_bytes  # the weights alone do not fit
            assert not (p.dense.fits or p.corematching.fits or p.static.fits)


@pytest.mark.parametrize(("k", "precision"), [(64, "fp16"), (32, "fp32"), (192, "fp16"), (576, "int8")])
def test_corematching_kv_is_smaller_by_the_pruned_tokens(k: int, precision: str) -> None:
    p = plan(PlanConfig("llava-1.5-7b", "agx-orin-64gb", precision, token_budget=k))  # type: ignore[arg-type]
    value_bytes = 4 if precision == "fp32" else 2  # --precision int8 keeps an fp16 cache
    saved = (L - PRUNE_LAYER - 1) * 2 * HEADS * HEAD_DIM * (N_IMG - k) * value_bytes
    assert p.dense.kv_cache - p.corematching.kv_cache == saved
    assert p.corematching.kv_cache == p.static.kv_cache


def test_static_neuron_set_saving() -> None:
    p = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", "fp16", sharing="shared"))
    assert p.budgets.core_neurons == N_CORE and len(p.budgets.neuron_sparse_layers) == SPARSE_LAYERS
    assert p.static_saving == (D_FFN - N_STATIC) * 3 * D_MODEL * SPARSE_LAYERS * 2
    assert p.static.weights == p.dense.weights - p.static_saving
    assert p.static.total < p.dense.total < p.corematching.total  # compacted weights cost a per-request copy
    assert p.static.fits and not p.dense.fits  # 16 GB: only the narrowed weights fit


def test_defaults_are_the_devices() -> None:
    titan = plan(PlanConfig("llava-1.5-7b", "titan-xp"))
    assert (titan.weights, titan.activations, titan.runtime.name) == ("fp32", "fp32", "tensorrt-8.6")
    orin = plan(PlanConfig("llava-1.5-7b", "agx-orin-32gb"))
    assert (orin.weights, orin.activations, orin.runtime.name, orin.activation_bytes) == (
        "fp16",
        "fp16",
        "tensorrt-10",
        2,
    )
    assert plan(PlanConfig("llava-1.5-7b", "titan-xp", weights="int4")).activations == "fp32"
    legacy = plan(PlanConfig("llava-1.5-7b", "orin-nx-16gb", "int8"))  # --precision int8: int8 weights, fp16 rest
    assert (legacy.weights, legacy.activations) == ("int8", "fp16")
