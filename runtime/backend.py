"""What a runtime backend does: run a build's four graphs for one request at a time (docs/architecture.md).

The pipeline drives a backend through one request:

    features = backend.vision(pixel_values)               # [1, n_img, d]
    embeds   = backend.embed(input_ids)                   # [1, S, d]; the pipeline splices the features in
    logits, kept = backend.prefill(embeds, image_start, capacity)
    logits   = backend.decode(token_id)                   # once per generated token

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
from dataclasses import dataclass
from typing import Any

import numpy as np


class BackendError(RuntimeError):
    """A backend cannot run here (missing package, provider or GPU); the message says which."""


@dataclass
class PrefillResult:
    logits: np.ndarray  # [V] float32, the last prompt token's
    kept_image_tokens: list[int] | None  # indices into the image's tokens; None for dense builds


@dataclass(frozen=True)
class CacheLayout:
    """The geometry of the cache buffers, from the manifest."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    prune_layer: int | None  # layers after it hold only the kept tokens; None for dense builds
    dtype: Any  # numpy dtype of the cache (float32 or float16)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> CacheLayout:
        model, cm = manifest["model"], manifest["corematching"]
        return cls(
            num_layers=model["num_layers"],
            num_kv_heads=model["num_kv_heads"],
            head_dim=model["head_dim"],
            prune_layer=None if cm["dense"] else cm["prune_layer"],
            dtype=np.float16 if manifest["precision"] == "float16" else np.float32,
        )


class Backend(ABC):
    """One loaded build; `name` says what runs it (e.g. "onnxruntime/CPUExecutionProvider")."""

    name: str

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
