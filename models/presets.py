"""Named LLaVA geometries: real ones for planning, tiny ones for tests, and the embedded default.

A preset is the smallest description of a LLaVA-1.5-style model that fixes every
shape the exporter and the CoreMatching reference care about (image tokens,
decoder widths, attention heads, vocabulary). The named ones are rows of
`PRESET_TABLE`: a name and the fields it sets, the rest derived (`_preset`).
`hf_config()` turns a preset into a `transformers.LlavaConfig`;
`build_random_model()` instantiates random weights from it, which is how the
tests and the embedded default model get a model without downloading anything.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from buildformat.geometry import SELECT_STRATEGIES, SelectStrategy, image_token_count, patch_count
from coreMatching.backbones import UnsupportedBackboneError, backbone_for

if TYPE_CHECKING:  # transformers and torch are heavy: import them only where a model is built
    from transformers import LlavaConfig, LlavaForConditionalGeneration

logger = logging.getLogger(__name__)


class PresetError(ValueError):
    """A preset's fields are inconsistent (raised from `ModelPreset.__post_init__`)."""


class UnknownPresetError(PresetError):
    """`from_name` was given a name that is not in `PRESETS`."""


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """The geometry of one LLaVA model (CLIP vision tower + projector + Llama-family decoder).

    A field with a default takes LLaVA-1.5's value unless a preset says otherwise (`PRESET_TABLE`).
    """

    name: str
    # Vision tower (CLIP ViT).
    image_size: int
    patch_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_layers: int
    vision_num_heads: int
    # Which hidden state of the vision tower feeds the projector (-2: the penultimate layer, LLaVA-1.5).
    vision_feature_layer: int = -2
    # "default" drops the CLS token, "full" keeps it (one more image token).
    vision_feature_select_strategy: SelectStrategy = "default"
    # Text decoder.
    text_model_type: str = "llama"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    image_token_id: int
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    head_dim: int | None = None  # None: hidden_size / num_attention_heads (`text_head_dim`)
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None  # Mistral only: attention window in tokens
    description: str = ""

    def __post_init__(self) -> None:
        positive = (
            "image_size",
            "patch_size",
            "vision_hidden_size",
            "vision_intermediate_size",
            "vision_num_layers",
            "vision_num_heads",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
        )
        for field in positive:
            value = getattr(self, field)
            # bool is an int subclass; a True width is a typo, not a size.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PresetError(f"preset {self.name!r}: {field} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise PresetError(
                f"preset {self.name!r}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.vision_hidden_size % self.vision_num_heads:
            raise PresetError(
                f"preset {self.name!r}: vision_hidden_size {self.vision_hidden_size} is not divisible by "
                f"vision_num_heads {self.vision_num_heads}"
            )
        # hidden_states of the vision tower has num_layers + 1 entries (embeddings first).
        n_states = self.vision_num_layers + 1
        if not -n_states <= self.vision_feature_layer < n_states:
            raise PresetError(
                f"preset {self.name!r}: vision_feature_layer {self.vision_feature_layer} is out of range "
                f"for {self.vision_num_layers} vision layers (valid: {-n_states}..{n_states - 1})"
            )
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise PresetError(
                f"preset {self.name!r}: vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        try:
            backbone = backbone_for(self.text_model_type)
        except UnsupportedBackboneError as e:
            raise PresetError(f"preset {self.name!r}: {e}") from None
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise PresetError(
                f"preset {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise PresetError(f"preset {self.name!r}: head_dim must be positive, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PresetError(
                f"preset {self.name!r}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.sliding_window is not None:
            if not backbone.sliding_window:
                raise PresetError(
                    f"preset {self.name!r}: sliding_window is only honoured by backbones with a window "
                    f"(e.g. 'mistral'), not {self.text_model_type!r}"
                )
            if self.sliding_window <= 0:
                raise PresetError(f"preset {self.name!r}: sliding_window must be positive")
        for field in ("image_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, field)
            if not 0 <= value < self.vocab_size:
                raise PresetError(
                    f"preset {self.name!r}: {field} {value} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        # The image placeholder must be a token of its own, or text tokens would be replaced by image features.
        if self.image_token_id in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
            raise PresetError(f"preset {self.name!r}: image_token_id {self.image_token_id} collides with bos/eos/pad")

    @property
    def num_patches(self) -> int:
        return patch_count(self.image_size, self.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image contributes to the prompt (the CLS token counts only with strategy "full")."""
        return image_token_count(self.image_size, self.patch_size, self.vision_feature_select_strategy)

    @property
    def text_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def replace(self, **changes: object) -> ModelPreset:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def hf_config(self) -> LlavaConfig:
        """The `transformers.LlavaConfig` of this geometry."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig

        vision = CLIPVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_num_layers,
            num_attention_heads=self.vision_num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            # projection_dim is unused by LLaVA (the projector reads hidden states), kept CLIP-like.
            projection_dim=min(768, self.vision_hidden_size),
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
        text_kwargs: dict[str, object] = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.text_head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
        }
        if self.text_model_type == "mistral":
            text = MistralConfig(**text_kwargs, sliding_window=self.sliding_window)
        elif self.text_model_type == "llama":
            text = LlamaConfig(**text_kwargs)
        else:  # registered in coreMatching.backbones but not wired here yet
            raise PresetError(f"preset {self.name!r}: no config builder for {self.text_model_type!r}")
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=self.image_token_id,
            image_seq_length=self.num_image_tokens,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
            tie_word_embeddings=False,
        )


def llama_ffn_width(hidden_size: int) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4 d rounded up to a multiple of 256 (Vicuna-7B: 11008, 13B: 13824)."""
    return -(-(8 * hidden_size // 3) // 256) * 256


def _preset(name: str, row: dict[str, Any]) -> ModelPreset:
    """A table row with what follows from it filled in; a row states a derived field only to differ from it."""
    derived = {
        "num_key_value_heads": row["num_attention_heads"],  # multi-head attention unless the row says GQA
        "intermediate_size": llama_ffn_width(row["hidden_size"]),
        "vision_intermediate_size": 4 * row["vision_hidden_size"],  # CLIP's MLP ratio
    }
    return ModelPreset(name=name, **{**derived, **row})


# fmt: off
# What rows share. LLaVA-1.5 reads 336 px images in 14 px patches: 576 image tokens.
_LLAVA_336: dict[str, Any] = dict(image_size=336, patch_size=14)
_CLIP_L14_336: dict[str, Any] = dict(**_LLAVA_336, vision_hidden_size=1024, vision_num_layers=24, vision_num_heads=16)
_VICUNA_IDS: dict[str, Any] = dict(vocab_size=32064, image_token_id=32000, pad_token_id=32001)
_PROJECT_IDS: dict[str, Any] = dict(image_token_id=1023, pad_token_id=3)  # the project tokenizer's (default_model)
# 56 px in 14 px patches (16 image tokens) and a 64-wide decoder: runs in milliseconds on a CPU.
_TINY: dict[str, Any] = dict(
    image_size=56, patch_size=14, vision_hidden_size=32, vision_intermediate_size=64, vision_num_layers=2,
    vision_num_heads=2, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    vocab_size=256, image_token_id=255, max_position_embeddings=512)

# One row per preset: its name and the fields it sets (`_preset` derives the rest).
PRESET_TABLE: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": dict(
        **_CLIP_L14_336, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, **_VICUNA_IDS,
        description="llava-hf/llava-1.5-7b-hf geometry (Vicuna-7B); for FLOPs/memory planning"),
    # 7B's widths, vocabulary size and tower with 4 decoder layers (1.4B parameters): the 7B-width graphs (external
    # data, chunked core-neuron TopK, int4 blocks) built and run on a CPU (scripts/bench_7b_width.py).
    "llava-7b-width": dict(
        **_CLIP_L14_336, hidden_size=4096, num_hidden_layers=4, num_attention_heads=32,
        vocab_size=32064, **_PROJECT_IDS,
        description="llava-1.5-7b widths, vocabulary and CLIP-L/336 tower, 4 decoder layers: 7B-width builds on a CPU"),
    "llava-1.5-13b": dict(
        **_CLIP_L14_336, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, **_VICUNA_IDS,
        description="llava-hf/llava-1.5-13b-hf geometry (Vicuna-13B); for FLOPs/memory planning"),
    # The benchmark's model: 7B's token geometry (576 image tokens, 32 layers, multi-head attention) at d = 768,
    # so fp32 fits a small machine and its dense/CoreMatching FLOPs ratios are within 3% (prefill) and 8%
    # (decode) of 7B's (scripts/flops.py --model llava-7b-shape). The FFN width is 2048 (2.67 d; 7B: 2.69 d):
    # int4 blocks of 32 and 64 divide it, as they divide 7B's 11008, so its int4 path is 7B's (the earlier
    # 2064 left llama.cpp's ffn_down in F16 and ours in float).
    "llava-7b-shape": dict(
        **_LLAVA_336, vision_hidden_size=256, vision_num_layers=4, vision_num_heads=4,
        hidden_size=768, intermediate_size=2048, num_hidden_layers=32, num_attention_heads=12,
        vocab_size=1024, **_PROJECT_IDS,
        description="llava-1.5-7b geometry scaled to d=768 (231M parameters): benchmarks on a CPU"),
    "tiny-llama": dict(**_TINY, description="tiny random Llama decoder, multi-head attention (tests)"),
    "tiny-llama-gqa": dict(
        **_TINY, num_key_value_heads=2,
        description="tiny random Llama decoder, grouped-query attention (tests)"),
    # A 12-token window is shorter than a 16-image-token + ~10-text-token prompt: tests see it cut attention.
    "tiny-mistral": dict(
        **_TINY, text_model_type="mistral", num_key_value_heads=2, sliding_window=12,
        description="tiny random Mistral decoder, GQA and a 12-token sliding window (tests)"),
    "tiny-llama-full": dict(
        **_TINY, vision_feature_layer=-1, vision_feature_select_strategy="full",
        description="tiny random Llama decoder, CLS kept (17 image tokens), last vision layer (tests)"),
    # LLaVA-1.5's 576 image tokens at small widths, trained on the shapes dataset (vqadata/). The tower is trained
    # from scratch, so its last layer feeds the projector (-1: LLaVA's -2 skips a CLIP layer tuned for a contrastive
    # loss it never had); 8 decoder layers, so the layers after the prune layer (2) do most of the work, as in a
    # 32-layer LLaVA. The vocabulary is the embedded tokenizer's: 1023 trained tokens + <image>.
    "default-small": dict(
        **_LLAVA_336, vision_hidden_size=128, vision_num_layers=3, vision_num_heads=4, vision_feature_layer=-1,
        hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, **_PROJECT_IDS,
        description="the embedded default model (models/default): LLaVA-1.5 token geometry, trained on shapes"),
}
# fmt: on

PRESETS: dict[str, ModelPreset] = {name: _preset(name, row) for name, row in PRESET_TABLE.items()}


def from_name(name: str) -> ModelPreset:
    """The preset called `name`; an `UnknownPresetError` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise UnknownPresetError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def build_random_model(
    preset_or_name: ModelPreset | str, seed: int = 0, device: str | None = None, dtype: Any = None
) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA of the preset (fp32 on the CPU by default), in eval mode, identical for the same seed.

    device/dtype: where and in what precision to build it; a 7B model is built directly on the GPU
    in bf16 (initialising 7B fp32 weights on the CPU first would take minutes and 28 GB).
    The global torch RNG is forked so that building a model does not change the
    caller's random stream (tests that draw inputs afterwards stay reproducible).
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    preset = from_name(preset_or_name) if isinstance(preset_or_name, str) else preset_or_name
    config = preset.hf_config()
    dtype = dtype or torch.float32
    devices = [torch.device(device).index or 0] if device and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    logger.debug("built random %s (seed %d)", preset.name, seed)
    return model.eval()
