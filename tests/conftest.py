"""Shared fixtures: tiny random-weight LLaVA models built from presets, and prompts for them."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

TINY_PRESETS = ("tiny-llama", "tiny-llama-gqa", "tiny-mistral", "tiny-llama-full")


@functools.cache
def tiny_model(name: str):
    from models.presets import build_random_model

    return build_random_model(name, seed=0)


def num_image_tokens(model) -> int:
    from models import num_image_tokens as count

    return count(model.config)


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


# -- tiny llava-hf checkpoints and builds (session-cached) -----------------------------------------

# Tiny presets resized to the project tokenizer's vocabulary (1024 ids, <image> = 1023).
BACKBONES = {
    "llama": ("tiny-llama", {}),
    "llama-gqa": ("tiny-llama-gqa", {}),
    "mistral-gqa": ("tiny-mistral", {"sliding_window": None}),
    "llama-cls": ("tiny-llama-full", {}),
}


def _cm():
    from coreMatching import CoreMatchingConfig

    return CoreMatchingConfig(token_budget=5, prune_layer=1)


CM = _cm()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, **preset changes) -> a llava-hf directory with the project tokenizer."""
    from models.default_model import write_checkpoint
    from models.presets import from_name

    made: dict[str, Path] = {}

    def make(name: str, **changes) -> Path:
        key = name + json.dumps(changes, sort_keys=True)
        if key not in made:
            preset_name, defaults = BACKBONES[name]
            preset = from_name(preset_name).replace(
                vocab_size=1024, image_token_id=1023, pad_token_id=3, **{**defaults, **changes}
            )
            made[key] = write_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), preset, seed=1)
        return made[key]

    return make


@pytest.fixture(scope="session")
def built(checkpoint, tmp_path_factory):
    """built(backbone, "dense" | "cm") -> BuildResult, built and validated once per session."""
    from export.build import build
    from export.config import ExportConfig

    results = {}

    def get(name: str, mode: str):
        if (name, mode) not in results:
            out = tmp_path_factory.mktemp("builds") / f"{name}-{mode}"
            config = ExportConfig(
                out=out,
                model_dir=checkpoint(name),
                corematching=None if mode == "dense" else CM,
                max_prompt_tokens=64,
                max_sequence=128,
            )
            results[name, mode] = build(config)
        return results[name, mode]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked `heavy` (7B-width builds: minutes and ~20 GB) run only when asked for, with `-m heavy`."""
    if "heavy" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="builds 7B-width graphs (minutes, ~20 GB of memory): run with `pytest -m heavy`")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_build(tmp_path_factory) -> Path:
    """The embedded default model built as `python -m export build` makes it, once per session.

    --no-validate: the graphs' agreement with PyTorch is test_export's and test_readme's subject; the
    server's tests only need a build that answers like the shipped one.
    """
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("default-build") / "default"
    done = subprocess.run(
        [sys.executable, "-m", "export", "build", "--out", str(out), "--no-validate"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out
