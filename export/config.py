"""Typed configuration of `python -m export build`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coreMatching.config import CoreMatchingConfig
from coreMatching.errors import ConfigError

# The dynamo exporter of torch 2.13 writes opset 18 and later.
SUPPORTED_OPSETS = range(18, 24)


@dataclass(frozen=True)
class ExportConfig:
    """What `python -m export build` builds.

    model_dir: a local llava-hf directory; None builds the embedded default model.
    out: the build directory (written to a temporary directory next to it, then renamed).
    corematching: the budgets; None builds the dense model (every token, every neuron).
    fp16: weights and activations in float16 (validated with a looser tolerance, docs/architecture.md).
    max_prompt_tokens / max_sequence: the longest prompt and prompt + answer the graphs are
        profiled for (TensorRT optimization profiles; the runtime refuses longer ones).
    tensorrt: keep the static-budget graphs within TensorRT's limits (chunked neuron selection
        where N is beyond TopK's K < 3840).
    """

    out: Path
    model_dir: Path | None = None
    corematching: CoreMatchingConfig | None = field(default_factory=CoreMatchingConfig)
    fp16: bool = False
    opset: int = 18
    force: bool = False
    validate: bool = True
    max_prompt_tokens: int = 1024
    max_sequence: int = 2048
    tensorrt: bool = True

    def __post_init__(self) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise ConfigError(
                f"--opset {self.opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
            )
        if self.max_prompt_tokens < 2:
            raise ConfigError(f"max_prompt_tokens must be at least 2, got {self.max_prompt_tokens}")
        if self.max_sequence <= self.max_prompt_tokens:
            raise ConfigError(
                f"max_sequence ({self.max_sequence}) must be larger than max_prompt_tokens ({self.max_prompt_tokens})"
            )

    @property
    def dense(self) -> bool:
        return self.corematching is None
