"""Registry of the decoder backbones CoreMatching knows how to drive.

The method runs its own layer loop (it removes image tokens half-way through
the decoder and keeps an explicit per-layer KV cache), so it needs to know
where a backbone keeps its embedding, layers, norm, rotary embedding and the
projections of each layer. Every Llama-family decoder in `transformers`
(Llama, Vicuna, Mistral) uses the same module names, so one layout serves all
of them; adding a backbone is one `register(...)` call.

This module imports torch only: it reads `transformers` objects by attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnsupportedBackboneError(ValueError):
    """The checkpoint's text model is not one this project can run."""


@dataclass(frozen=True)
class Backbone:
    """How to reach the parts of one decoder family inside `LlavaForConditionalGeneration`.

    model_type: `text_config.model_type` of the checkpoint (the registry key).
    sliding_window: whether `text_config.sliding_window` is honoured (Mistral).
    examples: the public checkpoints this entry was written for (for messages and docs).
    """

    model_type: str
    sliding_window: bool
    examples: tuple[str, ...]

    # The accessors below are shared by every Llama-family layout; a backbone
    # with other module names subclasses Backbone and overrides them.
    def decoder(self, llava: Any) -> Any:
        """The `*Model` decoder (embed_tokens, layers, norm, rotary_emb)."""
        return llava.model.language_model

    def layers(self, llava: Any) -> Any:
        return self.decoder(llava).layers

    def embed_tokens(self, llava: Any) -> Any:
        return self.decoder(llava).embed_tokens

    def final_norm(self, llava: Any) -> Any:
        return self.decoder(llava).norm

    def rotary_emb(self, llava: Any) -> Any:
        return self.decoder(llava).rotary_emb

    def lm_head(self, llava: Any) -> Any:
        return llava.lm_head

    def window(self, text_config: Any) -> int | None:
        """The attention window in tokens, or None for full causal attention."""
        if not self.sliding_window:
            return None
        return getattr(text_config, "sliding_window", None)


BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    if backbone.model_type in BACKBONES:
        raise ValueError(f"backbone {backbone.model_type!r} is already registered")
    BACKBONES[backbone.model_type] = backbone
    return backbone


def supported_model_types() -> list[str]:
    return sorted(BACKBONES)


def backbone_for(text_model_type: str) -> Backbone:
    """The registered backbone for `text_config.model_type`, or a one-line error naming the supported ones."""
    try:
        return BACKBONES[text_model_type]
    except KeyError:
        raise UnsupportedBackboneError(
            f"text backbone {text_model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


def backbone_of(llava: Any) -> Backbone:
    """The backbone of a `LlavaForConditionalGeneration` instance."""
    return backbone_for(llava.config.text_config.model_type)


# Llama covers LLaVA-1.5 (Vicuna-7B/13B are Llama checkpoints), multi-head and grouped-query.
register(Backbone("llama", sliding_window=False, examples=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf")))
# Mistral: the same layout, grouped-query attention and an optional sliding window.
register(Backbone("mistral", sliding_window=True, examples=("llava-hf/llava-v1.6-mistral-7b-hf (text model)",)))
