"""Memory plan of a deployment, dense and CoreMatching, against one device (`python -m export plan`).

Everything is computed from the model's geometry (a preset, or a llava-hf directory's
config.json read as JSON): no weights are loaded and neither torch nor transformers is
imported, so a 7B or 13B model is planned on a laptop or on the Jetson itself.

What is counted, in bytes (docs/method.md, docs/architecture.md):

- weights: vision tower (the whole CLIP tower of the checkpoint) + projector + embedding
  + decoder layers + final norm + LM head, at the precision's bytes per parameter;
- KV cache sized for the longest answer (`max_sequence` tokens): CoreMatching's layers
  after the prune layer hold `max_sequence - n_img + k` tokens;
- compacted FFN weights of one request (CoreMatching: gathered once after prefill and kept
  for the whole answer);
- peak activations: the largest of the vision tower's and the prefill's live tensors
  (one layer's working set plus the prompt's KV outputs, which live until they are copied
  into the cache buffers);
- a runtime overhead per device kind (`export.devices`).

Exact: weights, KV cache, compacted weights. Estimates: activations (unfused attention
assumed, so an upper side) and the runtime overhead. Decode-step times are lower bounds:
the bytes a step must read divided by the DRAM bandwidth (decode is memory bound).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coreMatching.backbones import UnsupportedBackboneError, backbone_for, supported_model_types
from coreMatching.config import Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError
from export.devices import PRECISIONS, Device, Precision, UnknownDeviceError, device
from models.presets import PRESETS, ModelPreset

WEIGHT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
# int8 quantizes the weights only: activations and the KV cache stay fp16 (weight-only int8,
# what a decoder on Orin or a dp4a Pascal would run). Planning-only: no int8 graphs are exported yet.
ACTIVATION_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 2}
PROMPT_TEXT_TOKENS = 40  # the default prompt: the image plus a question and the chat template

# Defaults of transformers 5 for the fields a llava-hf config.json may leave out (they equal the
# class defaults, so save_pretrained omits them). No vision_config at all means LlavaConfig's own
# default tower (CLIP ViT-L/14 at 336 px); a vision_config dict falls back to CLIPVisionConfig's.
_LLAVA_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "num_channels": 3,
}  # fmt: skip
_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 32, "num_channels": 3,
}  # fmt: skip
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32},
}  # fmt: skip


class PlanError(ValueError):
    """A plan cannot be made from what the user gave; the message says what to fix, on one line."""


@dataclass(frozen=True)
class ModelGeometry:
    """What the memory plan needs of a LLaVA model (CLIP tower + projector + Llama-family decoder)."""

    name: str
    source: str  # "preset" or the checkpoint directory
    image_size: int
    patch_size: int
    num_channels: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_layers: int
    vision_num_heads: int
    num_image_tokens: int  # n_img
    projector_input_size: int  # vision_hidden_size x the number of feature layers concatenated
    projector_bias: bool
    text_model_type: str
    hidden_size: int  # d
    intermediate_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # V
    max_position_embeddings: int
    attention_bias: bool = False

    @classmethod
    def from_preset(cls, preset: ModelPreset) -> ModelGeometry:
        return cls(
            name=preset.name, source="preset", image_size=preset.image_size, patch_size=preset.patch_size,
            num_channels=3, vision_hidden_size=preset.vision_hidden_size,
            vision_intermediate_size=preset.vision_intermediate_size, vision_num_layers=preset.vision_num_layers,
            vision_num_heads=preset.vision_num_heads, num_image_tokens=preset.num_image_tokens,
            projector_input_size=preset.vision_hidden_size, projector_bias=True,
            text_model_type=preset.text_model_type, hidden_size=preset.hidden_size,
            intermediate_size=preset.intermediate_size, num_layers=preset.num_hidden_layers,
            num_heads=preset.num_attention_heads, num_kv_heads=preset.num_key_value_heads,
            head_dim=preset.text_head_dim, vocab_size=preset.vocab_size,
            max_position_embeddings=preset.max_position_embeddings,
        )  # fmt: skip

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def attention_parameters(self) -> int:
        """q, k, v, o projections of one decoder layer."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        weights = 2 * self.hidden_size * q_width + 2 * self.hidden_size * kv_width
        biases = q_width + 2 * kv_width + self.hidden_size if self.attention_bias else 0
        return weights + biases

    def layer_parameters(self, ffn_width: int) -> int:
        """One decoder layer with an FFN of `ffn_width` neurons (D dense, N for a compacted FFN)."""
        return self.attention_parameters() + 3 * self.hidden_size * ffn_width + 2 * self.hidden_size

    def parameters(self) -> dict[str, int]:
        """Parameter counts by part, as the checkpoint holds them (the whole CLIP tower included)."""
        vh, vi, d = self.vision_hidden_size, self.vision_intermediate_size, self.hidden_size
        # CLIP: class embedding, patch conv (no bias), positions (CLS + patches), pre/post layer norms.
        embeddings = vh + self.num_channels * self.patch_size**2 * vh + (self.num_patches + 1) * vh
        vision_layer = 4 * (vh * vh + vh) + 2 * 2 * vh + (vh * vi + vi) + (vi * vh + vh)
        bias = 2 * d if self.projector_bias else 0
        parts = {
            "vision_tower": embeddings + 2 * 2 * vh + self.vision_num_layers * vision_layer,
            "projector": self.projector_input_size * d + d * d + bias,
            "embedding": self.vocab_size * d,
            "decoder_layers": self.num_layers * self.layer_parameters(self.intermediate_size),
            "final_norm": d,
            # llava-hf checkpoints keep an untied head; a tied one would still be its own
            # initializer in the exported prefill and decode graphs.
            "lm_head": self.vocab_size * d,
        }
        parts["total"] = sum(parts.values())
        return parts


def _int(section: dict[str, Any], key: str, where: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def geometry_from_config(config: dict[str, Any], name: str, source: str) -> ModelGeometry:
    """The geometry of a llava-hf config.json (already parsed), with transformers' defaults for omitted fields."""
    where = f"{source}/config.json"
    if config.get("model_type") != "llava":
        raise PlanError(f"{where} has model_type {config.get('model_type')!r}; only 'llava' checkpoints are planned")
    vision_raw, text_raw = config.get("vision_config"), config.get("text_config")
    if not isinstance(vision_raw, (dict, type(None))) or not isinstance(text_raw, (dict, type(None))):
        raise PlanError(f"{where}: vision_config and text_config must be JSON objects")
    vision = dict(_LLAVA_VISION_DEFAULTS) if vision_raw is None else {**_CLIP_VISION_DEFAULTS, **vision_raw}
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise PlanError(f"{where}: vision tower {vision['model_type']!r} is not planned; only CLIP towers are")
    text_raw = text_raw or {}
    text_type = text_raw.get("model_type", "llama")  # LlavaConfig's default text model is Llama
    try:
        backbone_for(str(text_type))
    except UnsupportedBackboneError:
        raise PlanError(
            f"{where}: text backbone {text_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None
    if text_type not in _TEXT_DEFAULTS:
        raise PlanError(f"{where}: no planning defaults for text backbone {text_type!r}")
    text = {**_TEXT_DEFAULTS[text_type], **{k: v for k, v in text_raw.items() if v is not None}}
    if "vocab_size" not in text_raw and isinstance(config.get("vocab_size"), int):
        text["vocab_size"] = config["vocab_size"]  # configs from transformers 4.3x kept it at the top level
    if text.get("mlp_bias"):
        raise PlanError(f"{where}: FFN biases (mlp_bias) are refused by the export, so they are not planned")

    image_size = vision["image_size"]
    if isinstance(image_size, list) and len(image_size) == 2 and image_size[0] == image_size[1]:
        vision["image_size"] = image_size[0]  # [n, n] is a square image
    layer = config.get("vision_feature_layer", -2)
    feature_layers = len(layer) if isinstance(layer, list) else 1  # several layers are concatenated
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise PlanError(f"{where}: vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")

    def v(key: str) -> int:
        return _int(vision, key, f"{where} vision_config")

    def t(key: str) -> int:
        return _int(text, key, f"{where} text_config")

    text.setdefault("num_key_value_heads", t("num_attention_heads"))
    text.setdefault("head_dim", t("hidden_size") // t("num_attention_heads"))
    if v("image_size") % v("patch_size"):
        raise PlanError(f"{where}: image_size {v('image_size')} is not a multiple of patch_size {v('patch_size')}")
    patches = (v("image_size") // v("patch_size")) ** 2
    return ModelGeometry(
        name=name, source=source, image_size=v("image_size"), patch_size=v("patch_size"),
        num_channels=v("num_channels"), vision_hidden_size=v("hidden_size"),
        vision_intermediate_size=v("intermediate_size"), vision_num_layers=v("num_hidden_layers"),
        vision_num_heads=v("num_attention_heads"), num_image_tokens=patches + (1 if strategy == "full" else 0),
        projector_input_size=v("hidden_size") * feature_layers,
        projector_bias=bool(config.get("multimodal_projector_bias", True)), text_model_type=str(text_type),
        hidden_size=t("hidden_size"), intermediate_size=t("intermediate_size"), num_layers=t("num_hidden_layers"),
        num_heads=t("num_attention_heads"), num_kv_heads=t("num_key_value_heads"), head_dim=t("head_dim"),
        vocab_size=t("vocab_size"), max_position_embeddings=t("max_position_embeddings"),
        attention_bias=bool(text.get("attention_bias", False)),
    )  # fmt: skip


def load_geometry(model: str | Path) -> ModelGeometry:
    """A preset name, or a llava-hf directory whose config.json is read (never its weights).

    A preset name wins over a directory of the same name; write ./NAME for the directory.
    """
    if isinstance(model, str) and model in PRESETS:
        return ModelGeometry.from_preset(PRESETS[model])
    path = Path(model).expanduser()
    if not path.exists():
        raise PlanError(f"{model!s} is neither a model preset nor an existing directory; presets: {', '.join(PRESETS)}")
    if not path.is_dir():
        raise PlanError(f"{path} is not a directory; pass a llava-hf checkpoint directory or a preset name")
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{path} has no config.json; pass a llava-hf checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read {config_path}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise PlanError(f"{config_path} is not a JSON object")
    return geometry_from_config(config, path.resolve().name, str(path))


@dataclass(frozen=True)
class PlanConfig:
    """What to plan. precision None takes the device's recommended one; prompt_tokens None is n_img + 40."""

    model: str | Path
    device: str
    precision: Precision | None = None
    token_budget: int = 64
    max_sequence: int = 2048  # prompt + the longest answer: what the KV cache is sized for
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path)) or not str(self.model).strip():
            raise PlanError(f"model must be a preset name or a directory, got {self.model!r}")
        try:
            device(self.device)
        except UnknownDeviceError as e:
            raise PlanError(str(e)) from None
        if self.precision is not None and self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("token_budget", "max_sequence", "prompt_tokens"):
            value = getattr(self, name)
            if value is None and name == "prompt_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Estimate:
    """The memory (bytes) of one way to deploy, and what one decode step reads."""

    weights: int
    kv_cache: int
    compacted_ffn: int  # per request: CoreMatching's gathered FFN weights
    activations: int  # peak of the vision tower or the prefill
    runtime_overhead: int
    total: int
    headroom: int  # usable memory of the device - total (negative: does not fit)
    fits: bool
    # The decode graph's own copy of the decoder weights, where prefill and decode are separate
    # sessions or TensorRT engines that do not share initializers (the runtime today); not in total.
    unshared_decode_weights: int
    decode_bytes_first: int  # read by the first decode step (the prompt cached)
    decode_bytes_last: int  # read by the last one (max_sequence cached)
    decode_ms_first: float  # lower bounds: bytes / bandwidth
    decode_ms_last: float

    @property
    def total_unshared(self) -> int:
        return self.total + self.unshared_decode_weights


@dataclass(frozen=True)
class Plan:
    config: PlanConfig
    model: ModelGeometry
    device: Device
    precision: Precision
    weight_bytes: int  # per parameter
    activation_bytes: int  # per activation and KV-cache value
    parameters: dict[str, int]
    budgets: Budgets
    prompt_tokens: int  # S
    kept_prompt_tokens: int  # S - n_img + k
    dense: Estimate
    corematching: Estimate
    static: Estimate  # CoreMatching with a calibrated static neuron set baked into narrower FFN weights
    static_saving: int  # (D - N) x 3 x d x sparse layers x weight bytes
    notes: tuple[str, ...]

    @property
    def estimates(self) -> dict[str, Estimate]:
        return {"dense": self.dense, "corematching": self.corematching, "corematching_static": self.static}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; every memory figure in bytes."""
        b = self.budgets
        return {
            "model": {**asdict(self.model), "parameters": self.parameters},
            "device": {**asdict(self.device), "usable_bytes": self.device.usable_bytes},
            "precision": self.precision,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "tokens": {
                "image_tokens": self.model.num_image_tokens,
                "prompt_tokens": self.prompt_tokens,
                "kept_prompt_tokens": self.kept_prompt_tokens,
                "max_sequence": self.config.max_sequence,
                "answer_tokens": self.config.max_sequence - self.prompt_tokens,
            },
            "budgets": {
                "token_budget": b.token_budget,
                "tokens_per_neuron_set": b.tokens_per_neuron_set,
                "core_neurons": b.core_neurons,
                "prune_layer": b.prune_layer,
                "neuron_layers": list(b.neuron_layers),
            },
            "memory": {name: {**asdict(e), "total_unshared": e.total_unshared} for name, e in self.estimates.items()},
            "static_neuron_saving": self.static_saving,
            "recommended": {
                "precision": self.device.recommended_precision,
                "tensorrt": self.device.recommended_tensorrt,
            },
            "notes": list(self.notes),
        }


def _prefill_layer_bytes(g: ModelGeometry, tokens: int, value_bytes: int) -> int:
    """Largest working set of one decoder layer over `tokens` (unfused attention: scores and probabilities)."""
    t, d = tokens, g.hidden_size
    attention = 2 * t * d + t * (g.num_heads + 2 * g.num_kv_heads) * g.head_dim + 2 * g.num_heads * t * t
    attention += t * g.num_heads * g.head_dim
    ffn = 2 * t * d + 3 * t * g.intermediate_size  # gate, up and their product [T, D]
    return max(attention, ffn) * value_bytes


def _vision_bytes(g: ModelGeometry, value_bytes: int) -> int:
    t, vh = g.num_patches + 1, g.vision_hidden_size  # the tower always runs the CLS token
    attention = 2 * t * vh + 3 * t * vh + 2 * g.vision_num_heads * t * t + t * vh
    mlp = 2 * t * vh + 2 * t * g.vision_intermediate_size
    pixels = g.num_channels * g.image_size**2
    return (max(attention, mlp) + pixels + g.num_image_tokens * g.hidden_size) * value_bytes


def plan(config: PlanConfig) -> Plan:
    """The memory plan of `config`; raises PlanError for what the model or the budgets cannot honour."""
    g = load_geometry(config.model)
    dev = device(config.device)
    precision: Precision = config.precision or dev.recommended_precision
    wb, ab = WEIGHT_BYTES[precision], ACTIVATION_BYTES[precision]
    n_img = g.num_image_tokens
    try:
        budgets = CoreMatchingConfig(token_budget=config.token_budget).resolve(
            num_layers=g.num_layers, intermediate_size=g.intermediate_size, num_image_tokens=n_img
        )
    except ConfigError as e:
        raise PlanError(str(e)) from None
    k = config.token_budget
    s = config.prompt_tokens if config.prompt_tokens is not None else n_img + PROMPT_TEXT_TOKENS
    m = config.max_sequence
    if s < n_img:
        raise PlanError(f"prompt-tokens {s} is shorter than the {n_img} image tokens the prompt contains")
    if m <= s:
        raise PlanError(f"max-sequence {m} leaves no room for an answer after a {s}-token prompt")
    s_kept, m_kept = s - n_img + k, m - n_img + k
    full_layers = budgets.prune_layer + 1  # layers 0..l_p keep every token
    pruned_layers = g.num_layers - full_layers
    sparse = budgets.neuron_sparse_layers
    d, big_d, n = g.hidden_size, g.intermediate_size, budgets.core_neurons

    kv_token = 2 * g.num_kv_heads * g.head_dim * ab  # K and V of one token in one layer

    def kv(tokens: int, kept: int | None) -> int:
        """All layers' cache for `tokens`; with `kept`, the layers after the prune layer hold `kept` instead."""
        if kept is None:
            return g.num_layers * kv_token * tokens
        return kv_token * (full_layers * tokens + pruned_layers * kept)

    params = g.parameters()
    weights = params["total"] * wb
    compacted = 3 * d * n * len(sparse) * wb
    static_saving = 3 * d * (big_d - n) * len(sparse) * wb

    # Prefill: one layer's working set plus the KV outputs of the layers run so far (all of them at the last layer).
    selection = s * big_d + s * budgets.tokens_per_neuron_set * (ab + 8)  # membership mask, TopK values + int64 ids
    dense_prefill = _prefill_layer_bytes(g, s, ab) + kv(s, None)
    cm_prefill = max(
        _prefill_layer_bytes(g, s, ab) + selection + full_layers * kv_token * s,
        _prefill_layer_bytes(g, s_kept, ab) + kv(s, s_kept),
    )
    vision = _vision_bytes(g, ab)

    # Decode reads the decoder weights (sparse layers at N for CoreMatching), the head, one embedding row, the cache.
    # The *_graph figures are what the decode graph holds: a CoreMatching build takes the sparse layers' FFN as
    # inputs (the compacted weights), a static build has them narrowed to N.
    head = (d + g.vocab_size * d) * wb  # final norm + LM head

    def decoder_bytes(sparse_width: int) -> int:
        widths = (sparse_width if budgets.is_neuron_sparse(i) else big_d for i in range(g.num_layers))
        return sum(g.layer_parameters(w) for w in widths) * wb + head

    dense_graph, cm_graph, static_graph = decoder_bytes(big_d), decoder_bytes(0), decoder_bytes(n)
    row = d * wb  # the embedding of the new token
    overhead = dev.runtime_overhead_bytes
    bandwidth = dev.bandwidth_gbps * 1e9

    def estimate(weights: int, kv_cache: int, compacted: int, activations: int, unshared: int, step: int,
                 kv_first: int) -> Estimate:  # fmt: skip
        total = weights + kv_cache + compacted + activations + overhead
        first, last = step + kv_first, step + kv_cache
        return Estimate(
            weights=weights, kv_cache=kv_cache, compacted_ffn=compacted, activations=activations,
            runtime_overhead=overhead, total=total, headroom=dev.usable_bytes - total,
            fits=total <= dev.usable_bytes, unshared_decode_weights=unshared, decode_bytes_first=first,
            decode_bytes_last=last, decode_ms_first=first / bandwidth * 1e3, decode_ms_last=last / bandwidth * 1e3,
        )  # fmt: skip

    cm_activations = max(vision, cm_prefill)
    dense = estimate(weights, kv(m, None), 0, max(vision, dense_prefill), dense_graph, dense_graph + row, kv(s, None))
    corematching = estimate(weights, kv(m, m_kept), compacted, cm_activations, cm_graph, static_graph + row,
                            kv(s, s_kept))  # fmt: skip
    static = estimate(weights - static_saving, kv(m, m_kept), 0, cm_activations, static_graph, static_graph + row,
                      kv(s, s_kept))  # fmt: skip
    return Plan(
        config=config, model=g, device=dev, precision=precision, weight_bytes=wb, activation_bytes=ab,
        parameters=params, budgets=budgets, prompt_tokens=s, kept_prompt_tokens=s_kept, dense=dense,
        corematching=corematching, static=static, static_saving=static_saving,
        notes=_notes(g, dev, budgets, precision, m),
    )  # fmt: skip


def _notes(g: ModelGeometry, dev: Device, budgets: Budgets, precision: Precision, max_sequence: int) -> tuple[str, ...]:
    notes: list[str] = []
    if precision == "int8":
        notes.append("int8 is planning-only: the export does not produce int8 graphs yet (weights at 1 byte, "
                     "activations and KV cache at fp16)")  # fmt: skip
    if precision == "fp16" and dev.fp16_speed < 1:
        notes.append(f"fp16 on {dev.title} halves the bytes, but its fp16 rate is 1/{round(1 / dev.fp16_speed)} of "
                     f"fp32, so compute, not bandwidth, bounds its steps; {dev.recommended_precision} is "
                     "recommended")  # fmt: skip
    if precision == "int8" and not dev.int8:
        notes.append(f"{dev.title} has no int8 kernels")
    if max_sequence > g.max_position_embeddings:
        notes.append(f"max-sequence {max_sequence} is beyond the model's {g.max_position_embeddings} trained "
                     "positions")  # fmt: skip
    if budgets.core_neurons > 3839:
        notes.append("TensorRT: N is beyond TopK's K < 3840, so a TensorRT build selects core neurons per chunk")
    notes.append("a static neuron set is calibrated offline and also narrows the prefill of the sparse layers "
                 "(check its accuracy); the per-request set is the method")  # fmt: skip
    notes.extend(dev.notes)
    return tuple(notes)
