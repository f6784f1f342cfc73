"""What a runtime backend does: run a build's four graphs for one request at a time (docs/architecture.md).

The pipeline (`Pipeline.generate`, the one generation loop) drives a backend through one request:

    features = backend.vision(pixel_values)               # [1, n_img, d]
    embeds   = backend.embed(input_ids)                   # [1, S, d]; the pipeline splices the features in
    result   = backend.prefill(embeds, image_start, capacity)  # PrefillResult: logits [V], kept tokens, core neurons
    logits   = backend.decode(token_id)                   # [V], once per generated token after the first
    backend.end_request()                                 # the answer ended, failed or was abandoned

`prefill` fills the backend's KV-cache buffers (one per layer, sized once for `capacity`
tokens: prompt + the longest answer) and keeps the compacted FFN weights of the request
on the device; `decode` runs one step against those buffers and writes only the new
token's cache entries (the decode graph outputs `new.{i}.key/value` [1, n_kv, 1, hd]).
Nothing copies the whole cache per step.

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
    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [1, 3, H, W] float32 -> image_features [1, n_img, d]"""

    @abstractmethod
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [1, S] int64 -> inputs_embeds [1, S, d]"""

    @abstractmethod
    def prefill(self, inputs_embeds: np.ndarray, image_start: int, capacity: int) -> PrefillResult:
        """Runs the prompt; sizes the cache buffers for `capacity` tokens (prompt + answer)."""

    @abstractmethod
    def decode(self, token_id: int) -> np.ndarray:
        """Appends one token; returns the next logits [V] float32."""

    @abstractmethod
    def end_request(self) -> None:
        """Frees the request's cache buffers and compacted weights now (the next prefill would anyway)."""
