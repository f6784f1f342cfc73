"""What a runtime backend does: run a build's graphs for one request at a time (docs/architecture.md).

The pipeline (`Pipeline.generate`, the one generation loop) drives a backend through one request:

    backend.vision(pixel_values)                          # the image features stay where the graphs run
    result = backend.prefill(input_ids, image_start, capacity)  # PrefillResult: logits [V], kept tokens, core neurons
    logits = backend.decode(token_id)                     # [V], once per generated token after the first
    backend.end_request()                                 # the answer ended, failed or was abandoned

The decoder stacks (`decoder`, or `lower` and `upper` around the prefill-only `select`) serve both
phases, so every weight is held once. The lower stack (or the decoder) embeds the ids and splices
the image features in itself: no sequence-sized tensor crosses between host and device. `prefill`
runs the stacks over the prompt against one-slot past buffers (past_length 0), fills the
backend's KV-cache buffers (one per layer, sized once for `capacity` tokens: prompt + the longest
answer) with the stacks' `new.{i}.*` outputs, and keeps the request's compacted FFN weights (the
`neurons` graph's outputs) where the graphs run; `decode` runs the same stacks on one token
against those buffers, binding the compacted weights to the `ffn.*` inputs the full ones filled
in prefill, and writes only the token's own cache entries. Nothing copies the whole cache per step.

Backends: `OrtBackend` (ONNX Runtime: TensorRT, CUDA or CPU provider) and `TrtBackend`
(TensorRT engines of `python -m export engine`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from buildformat import Manifest


class BackendError(RuntimeError):
    """A backend cannot run here (missing package, provider or GPU); the message says which."""


@dataclass(frozen=True)
class PrefillResult:
    logits: np.ndarray  # [V] float32, the last prompt token's
    kept_image_tokens: list[int] | None  # indices into the image's tokens; None for dense builds
    core_neurons: dict[int, list[int]] = field(default_factory=dict)  # layer -> the prompt's core neurons


def activation_dtype(manifest: Manifest) -> Any:
    """The numpy dtype of the graphs' activations and cache (float32 or float16)."""
    return np.float16 if manifest.precision == "float16" else np.float32


class Backend(ABC):
    """One loaded build; `name` says what runs it (e.g. "onnxruntime/CPUExecutionProvider")."""

    name: str
    # Seconds the last decode step's graph ran, without the Python around it (None: not measured).
    last_run_seconds: float | None = None

    @abstractmethod
    def vision(self, pixel_values: np.ndarray) -> None:
        """pixel_values [1, 3, H, W] float32 -> the request's image features [1, n_img, d], kept where the graphs
        run for the prefill and every decode step (the lower stack splices them by position)."""

    @abstractmethod
    def image_features(self) -> np.ndarray:
        """A host copy of the request's image features [1, n_img, d] (for validation; not on the answer's path)."""

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, image_start: int, capacity: int) -> PrefillResult:
        """Runs the prompt input_ids [1, S] int64, whose image placeholders start at `image_start`; sizes the
        cache buffers for `capacity` tokens (prompt + answer)."""

    @abstractmethod
    def decode(self, token_id: int) -> np.ndarray:
        """Appends one token; returns the next logits [V] float32."""

    @abstractmethod
    def end_request(self) -> None:
        """Frees the request's cache buffers and compacted weights now (the next prefill would anyway)."""
