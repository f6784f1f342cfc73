"""The model side of the memory plan: the geometry of a preset or of a llava-hf config.json (torch-free).

The plan reads only the checkpoint's config.json, never its weights, so a 7B or 13B model is planned on
a laptop or on the Jetson itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from buildformat.geometry import Geometry
from coreMatching.backbones import UnsupportedBackboneError, backbone_for, supported_model_types
from models.presets import PRESETS, ModelPreset

# Defaults of transformers 5 for the fields a llava-hf config.json may leave out (they equal the
# class defaults, so save_pretrained omits them). No vision_config at all means LlavaConfig's own
# default tower (CLIP ViT-L/14 at 336 px); a vision_config dict falls back to CLIPVisionConfig's.
_LLAVA_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
}
_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
}
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
    },
}


class PlanError(ValueError):
    """A plan cannot be made from what the user gave; the message says what to fix, on one line."""


@dataclass(frozen=True)
class ModelGeometry(Geometry):
    """What the memory plan needs of a LLaVA model: the model's `Geometry` (decoder and image sizes), and
    the sizes of the CLIP vision tower and the projector, whose weights the plan counts."""

    name: str = ""
    source: str = "preset"  # "preset" or the checkpoint directory
    num_channels: int = 3
    vision_hidden_size: int = 0
    vision_intermediate_size: int = 0
    vision_num_layers: int = 0
    vision_num_heads: int = 0
    projector_input_size: int = 0  # vision_hidden_size x the number of feature layers concatenated
    projector_bias: bool = True
    text_model_type: str = "llama"
    max_position_embeddings: int = 4096
    attention_bias: bool = False

    @classmethod
    def from_preset(cls, preset: ModelPreset) -> ModelGeometry:
        return cls(
            **asdict(Geometry.from_preset(preset)),
            name=preset.name,
            source="preset",
            vision_hidden_size=preset.vision_hidden_size,
            vision_intermediate_size=preset.vision_intermediate_size,
            vision_num_layers=preset.vision_num_layers,
            vision_num_heads=preset.vision_num_heads,
            projector_input_size=preset.vision_hidden_size,
            text_model_type=preset.text_model_type,
            max_position_embeddings=preset.max_position_embeddings,
        )

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
        name=name,
        source=source,
        image_size=v("image_size"),
        patch_size=v("patch_size"),
        num_channels=v("num_channels"),
        vision_hidden_size=v("hidden_size"),
        vision_intermediate_size=v("intermediate_size"),
        vision_num_layers=v("num_hidden_layers"),
        vision_num_heads=v("num_attention_heads"),
        num_image_tokens=patches + (1 if strategy == "full" else 0),
        projector_input_size=v("hidden_size") * feature_layers,
        projector_bias=bool(config.get("multimodal_projector_bias", True)),
        text_model_type=str(text_type),
        hidden_size=t("hidden_size"),
        intermediate_size=t("intermediate_size"),
        num_layers=t("num_hidden_layers"),
        num_heads=t("num_attention_heads"),
        num_kv_heads=t("num_key_value_heads"),
        head_dim=t("head_dim"),
        vocab_size=t("vocab_size"),
        max_position_embeddings=t("max_position_embeddings"),
        attention_bias=bool(text.get("attention_bias", False)),
    )


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
