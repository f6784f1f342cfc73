"""Answer a question about an image with the CoreMatching PyTorch reference on a loaded checkpoint.

This is the reference path end to end (processor, vision, pruned prefill,
neuron-sparse decode, detokenisation); the exported graphs and the runtime are
checked against the same computation.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coreMatching import CoreMatchingConfig, CoreMatchingLlava
from coreMatching.errors import InputError
from runtime.preprocess import ImageError, load_image  # one image loader for the reference and the runtime

__all__ = ["ImageError", "ReferenceAnswer", "answer", "build_prompt", "load_image"]

log = logging.getLogger(__name__)


@dataclass
class ReferenceAnswer:
    text: str
    token_ids: list[int]
    kept_image_tokens: list[int]
    num_image_tokens: int
    prompt_tokens: int
    timings: dict[str, Any] = field(default_factory=dict)  # seconds: vision, prefill, decode (list)


def build_prompt(processor: Any, question: str) -> str:
    """The checkpoint's chat template for one user turn with an image and the question."""
    question = question.strip()
    if not question:
        raise InputError("the question is empty; ask something about the image")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def answer(
    model: Any,
    processor: Any,
    image: Any,
    question: str,
    config: CoreMatchingConfig,
    max_new_tokens: int = 32,
    on_text: Callable[[str], None] | None = None,
) -> ReferenceAnswer:
    """Greedy answer; `on_text` receives the answer's new text as each token arrives."""
    inputs = processor(images=image, text=build_prompt(processor, question), return_tensors="pt")
    reference = CoreMatchingLlava(model, config)
    tokenizer = processor.tokenizer

    start = time.perf_counter()
    features = reference.image_features(inputs["pixel_values"].to(model.dtype))
    vision = time.perf_counter() - start

    tokens: list[int] = []
    stamps: list[float] = []
    text = ""
    kept: list[int] = []
    start = time.perf_counter()
    for token, _logits, state in reference.stream(inputs["input_ids"], None, max_new_tokens, image_features=features):
        stamps.append(time.perf_counter())
        if not tokens:
            kept = state.kept_image_tokens.tolist()
        tokens.append(token)
        new_text = tokenizer.decode(tokens, skip_special_tokens=True)
        if on_text is not None and len(new_text) > len(text):
            on_text(new_text[len(text) :])
        text = new_text
    # stamps[0] is the end of prefill; each later stamp closes one decode step.
    timings = {"vision": vision, "prefill": stamps[0] - start, "decode": [b - a for a, b in itertools.pairwise(stamps)]}
    log.info("answered in %d tokens, kept %d image tokens", len(tokens), len(kept))
    return ReferenceAnswer(
        text=text.strip(),
        token_ids=tokens,
        kept_image_tokens=kept,
        num_image_tokens=features.shape[0],
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        timings=timings,
    )
