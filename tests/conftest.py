"""Shared fixtures: tiny random-weight LLaVA models built from presets, and prompts for them."""

from __future__ import annotations

import functools

import pytest
import torch

TINY_PRESETS = ("tiny-llama", "tiny-llama-gqa", "tiny-mistral", "tiny-llama-full")


@functools.cache
def tiny_model(name: str):
    from models.presets import build_random_model

    return build_random_model(name, seed=0)


def num_image_tokens(model) -> int:
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if model.config.vision_feature_select_strategy == "full" else 0)


def make_inputs(model, before: int = 3, after: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt `<s> text <image>*n_img text` of random ids and a random image.

    -> input_ids [1, S], pixel_values [1, 3, H, W]
    """
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    # Text ids avoid the special ids at both ends of the vocabulary (pad/bos/eos, image).
    text = torch.randint(3, vocab - 2, (before + after,), generator=generator)
    ids = torch.cat(
        [text[:before], torch.full((num_image_tokens(model),), cfg.image_token_id), text[before:]]
    ).unsqueeze(0)
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    return ids, pixels


@pytest.fixture(params=TINY_PRESETS)
def tiny(request):
    """(preset name, model) for every tiny backbone."""
    return request.param, tiny_model(request.param)
