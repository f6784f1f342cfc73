"""Calibration prompts for a static neuron set: a JSONL file of image + question lines, or the shapes
validation split from item `CALIBRATION_START` (never the test split), as the (input_ids, pixel_values) the
reference counts over."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from coreMatching.errors import ConfigError
from vqadata.data import DataError, Item, jsonl_items, shapes_items

CALIBRATION_SPLIT = "validation"
# The default selector and the static recipe are chosen on validation questions 0-999, so the calibration
# prompts start after them: a set counted on the questions it is judged on would flatter itself.
CALIBRATION_START = 1000


def calibration_prompts(processor: Any, dtype: torch.dtype, items: Iterable[Item]) -> Iterator[tuple[Any, Any]]:
    """(input_ids [1, S], pixel_values [1, 3, H, W]) of each item's question about its image."""
    from models.answer import build_prompt, load_image

    for item in items:
        image = load_image(item.load_image())
        inputs = processor(images=image, text=build_prompt(processor, item.question), return_tensors="pt")
        yield inputs["input_ids"], inputs["pixel_values"].to(dtype)


def calibration_items(path: Path | None, count: int) -> tuple[list[Item], str]:
    """The calibration items and a description: the JSONL file's first `count` lines, or `count` items of
    the shapes validation split from `CALIBRATION_START`."""
    if path is None:
        items = list(shapes_items(CALIBRATION_SPLIT, count, start=CALIBRATION_START))
        last = CALIBRATION_START + len(items) - 1
        where = f"shapes {CALIBRATION_SPLIT} split, items {CALIBRATION_START}-{last}"
    else:
        try:
            items = jsonl_items(path, count, require_answers=False)
        except DataError as e:
            raise ConfigError(f"--calibration: {e}") from e
        where = f"{path.name}, first {len(items)}"
    return items, where
