"""The one geometry of a LLaVA model: the sizes that the graphs, the cache and the analytic costs depend on.

Built from a Hugging Face `LlavaConfig` (duck-typed: this module imports nothing), from a model
preset (`models.presets.ModelPreset`) or from a build's manifest. The formulas that every package
needs (the image tokens of an image, the tokens that layers after the prune layer keep, the KV-cache
bytes, the per-layer FLOPs) live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

# LLaVA's vision_feature_select_strategy: "default" drops the tower's CLS token, "full" keeps it as an image token.
SelectStrategy = Literal["default", "full"]
SELECT_STRATEGIES: tuple[str, ...] = get_args(SelectStrategy)


def patch_count(image_size: int, patch_size: int) -> int:
    """Patches of a square `image_size` image cut in `patch_size` squares (a CLIP tower adds a CLS token)."""
    return (image_size // patch_size) ** 2


def image_token_count(image_size: int, patch_size: int, select_strategy: str = "default") -> int:
    """Tokens one image contributes to the prompt: its patches, plus the CLS token with the "full" select
    strategy ("default" drops it)."""
    if select_strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, got {select_strategy!r}")
    return patch_count(image_size, patch_size) + (1 if select_strategy == "full" else 0)


def kept_length(sequence: int, num_image_tokens: int, kept: int, merged: int = 0) -> int:
    """Tokens that layers after the prune layer hold of a `sequence`: S - n_img + k (+ merged tokens
    that a merge adds, such as the summary token)."""
    return sequence - num_image_tokens + kept + merged


@dataclass(frozen=True)
class Geometry:
    hidden_size: int  # d
    intermediate_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # V
    image_size: int
    patch_size: int
    num_image_tokens: int  # n_img: the patches, plus the CLS token with the "full" select strategy

    @classmethod
    def from_hf_config(cls, config: Any) -> Geometry:
        """From a transformers LlavaConfig (text_config and vision_config inside)."""
        text, vision = config.text_config, config.vision_config
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab_size=text.vocab_size,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_image_tokens=image_token_count(vision.image_size, vision.patch_size, strategy),
        )

    @classmethod
    def from_preset(cls, preset: Any) -> Geometry:
        """From a `models.presets.ModelPreset`."""
        return cls(
            hidden_size=preset.hidden_size,
            intermediate_size=preset.intermediate_size,
            num_layers=preset.num_hidden_layers,
            num_heads=preset.num_attention_heads,
            num_kv_heads=preset.num_key_value_heads,
            head_dim=preset.text_head_dim,
            vocab_size=preset.vocab_size,
            image_size=preset.image_size,
            patch_size=preset.patch_size,
            num_image_tokens=preset.num_image_tokens,
        )

    @classmethod
    def from_manifest(cls, manifest: Any) -> Geometry:
        """From a `buildformat.Manifest` (its model section)."""
        m = manifest.model
        return cls(
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            vocab_size=m.vocab_size,
            image_size=m.image_size,
            patch_size=m.patch_size,
            num_image_tokens=m.num_image_tokens,
        )

    @property
    def num_patches(self) -> int:
        return patch_count(self.image_size, self.patch_size)

    # -- what the pruned layers keep, and what the cache holds ----------------------------------------

    def kept_length(self, sequence: int, kept: int, merged: int = 0) -> int:
        """Tokens that layers after the prune layer hold of a `sequence` (module-level `kept_length`)."""
        return kept_length(sequence, self.num_image_tokens, kept, merged)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * itemsize

    def cache_bytes(
        self, sequence: int, itemsize: int, prune_layer: int | None = None, kept: int = 0, merged: int = 0
    ) -> int:
        """The KV cache of `sequence` tokens: every layer holds them all (prune_layer None: dense), or
        layers 0..prune_layer do and the later ones hold kept_length(sequence, kept, merged)."""
        per_token = self.kv_bytes_per_token(itemsize)
        if prune_layer is None:
            return self.num_layers * sequence * per_token
        full = prune_layer + 1
        pruned = self.num_layers - full
        return per_token * (full * sequence + pruned * self.kept_length(sequence, kept, merged))

    # -- analytic FLOPs of one decoder layer (one multiply-add = 2 FLOPs) -------------------------------

    def projections(self, tokens: int) -> int:
        d, q_width, kv_width = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * tokens * d * (2 * q_width + 2 * kv_width)

    def attention(self, queries: int, past: int) -> int:
        """Scores and weighted sum for `queries` new tokens after `past` cached ones (causal)."""
        q_width = self.num_heads * self.head_dim
        key_reads = queries * past + queries * (queries + 1) // 2
        return 2 * 2 * q_width * key_reads

    def ffn(self, tokens: int, width: int) -> int:
        return 3 * 2 * tokens * self.hidden_size * width

    def lm_head(self) -> int:
        return 2 * self.hidden_size * self.vocab_size
