"""Greedy generation through the runtime's own ONNX Runtime backend, for validation and tests.

Validation runs the path that ships: `runtime.OrtBackend` on the CPU provider (its prefill, its
cache buffers, its decode steps; docs/architecture.md), with the pipeline's flow of vision ->
embed -> splice the image features at `image_start` -> prefill -> decode steps, and no stop at
the end of sequence (validation compares a fixed number of tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from buildformat import Manifest
from runtime.backend import Backend
from runtime.ort_backend import OrtBackend


@dataclass
class OrtGeneration:
    tokens: list[int]
    logits: np.ndarray  # [steps, V]: the logits each token was chosen from (row 0: prefill)
    image_features: np.ndarray  # [n_img, d]
    kept_image_tokens: list[int] | None  # None for dense builds
    core_neurons: dict[int, list[int]] = field(default_factory=dict)


def greedy(backend: Backend, image_token_id: int, input_ids: np.ndarray, pixel_values: np.ndarray, steps: int):
    """`steps` greedy tokens of one prompt (input_ids [1, S] with the image tokens in place)."""
    features = backend.vision(pixel_values)  # [1, n_img, d]
    embeds = backend.embed(input_ids.astype(np.int64))  # [1, S, d]
    image_start = int(np.flatnonzero(input_ids[0] == image_token_id)[0])
    embeds[0, image_start : image_start + features.shape[1]] = features[0]
    result = backend.prefill(embeds, image_start, input_ids.shape[1] + steps)
    logits = [result.logits]
    tokens = [int(np.argmax(logits[-1]))]  # first maximum, as torch.argmax
    for _ in range(steps - 1):
        logits.append(backend.decode(tokens[-1]))
        tokens.append(int(np.argmax(logits[-1])))
    return OrtGeneration(
        tokens=tokens,
        logits=np.stack(logits).astype(np.float32),
        image_features=features[0],
        kept_image_tokens=result.kept_image_tokens,
        core_neurons=result.core_neurons,
    )


class OrtBuild:
    """A build on the runtime's ONNX Runtime backend, CPU provider."""

    def __init__(self, build_dir: str | Path, manifest: Manifest, level: Any = None, accuracy_level: int = 1) -> None:
        self.manifest = manifest
        self.backend = OrtBackend(
            build_dir, manifest, provider="cpu", optimization_level=level, accuracy_level=accuracy_level
        )

    def greedy(self, input_ids: np.ndarray, pixel_values: np.ndarray, steps: int) -> OrtGeneration:
        return greedy(self.backend, self.manifest.model.image_token_id, input_ids, pixel_values, steps)
