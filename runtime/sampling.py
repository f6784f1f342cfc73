"""Choosing the next token: greedy, or temperature with top-p (nucleus) sampling, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SamplingError(ValueError):
    """A sampling setting is out of range."""


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (ties to the lower token id, as the reference); top_p in (0, 1]."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise SamplingError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        # logits: [V]
        if self.sampling.temperature == 0.0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.sampling.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.sampling.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = order[: int(np.searchsorted(cumulative, self.sampling.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
