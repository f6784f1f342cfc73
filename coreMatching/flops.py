"""Analytic FLOPs of dense and CoreMatching inference (one multiply-add = 2 FLOPs).

Counted: the q/k/v/o projections, attention scores and weighted sums (causal:
query i attends to i + 1 keys), the three FFN matrices, the LM head on the
last token only, and the token selection's and the merge's matrix products
(`selection_flops`: a greedy selector's k steps over the image tokens, the
merge's overlaps and weighted sums). Not counted: norms, RoPE, softmax, SiLU
and TopK: each is under 1% of a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from buildformat.geometry import Geometry, patch_count
from buildformat.geometry import kept_length as geometry_kept_length
from coreMatching.config import Budgets


@dataclass(frozen=True)
class VisionGeometry:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_tokens: int  # patches + CLS
    projector_in: int
    projector_out: int

    @classmethod
    def from_llava_config(cls, config: Any) -> VisionGeometry:
        vision = config.vision_config
        return cls(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_layers=vision.num_hidden_layers,
            num_tokens=patch_count(vision.image_size, vision.patch_size) + 1,  # the tower always runs the CLS token
            projector_in=vision.hidden_size,
            projector_out=config.text_config.hidden_size,
        )

    def flops(self, image_tokens: int) -> int:
        t, d = self.num_tokens, self.hidden_size
        per_layer = 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * self.intermediate_size
        projector = 2 * image_tokens * (self.projector_in * self.projector_out + self.projector_out**2)
        return self.num_layers * per_layer + projector


def prefill_flops(geometry: Geometry, prompt_tokens: int, budgets: Budgets | None) -> int:
    """Decoder prefill FLOPs for a prompt of `prompt_tokens` (image tokens included).

    budgets None is the dense model; otherwise layers after the prune layer see
    S - n_img + k tokens, plus a summary token (prefill is dense in neurons), and
    the selection and the merge are counted too.
    """
    total = geometry.lm_head() + (0 if budgets is None else selection_flops(geometry, prompt_tokens, budgets))
    for layer in range(geometry.num_layers):
        tokens = prompt_tokens
        if budgets is not None and layer > budgets.prune_layer:
            tokens = kept_length(prompt_tokens, budgets)
        total += geometry.projections(tokens) + geometry.attention(tokens, 0)
        total += geometry.ffn(tokens, geometry.intermediate_size if budgets is None else budgets.prefill_width(layer))
    return total


def decode_layers(geometry: Geometry, cached_tokens: int, budgets: Budgets | None) -> Iterator[tuple[int, int]]:
    """(cached tokens it attends to, FFN width it computes) of every layer in a decode step."""
    for layer in range(geometry.num_layers):
        past, width = cached_tokens, geometry.intermediate_size
        if budgets is not None:
            if layer > budgets.prune_layer:
                past = kept_length(cached_tokens, budgets)
            width = budgets.decode_width(layer)
        yield past, width


def decode_flops(geometry: Geometry, cached_tokens: int, budgets: Budgets | None) -> int:
    """FLOPs of one decode step after `cached_tokens` (the prompt, plus tokens generated so far)."""
    total = geometry.lm_head()
    for past, width in decode_layers(geometry, cached_tokens, budgets):
        total += geometry.projections(1) + geometry.attention(1, past) + geometry.ffn(1, width)
    return total


def kept_length(prompt_tokens: int, budgets: Budgets) -> int:
    """Tokens that layers after the prune layer compute and cache: S - n_img + k (+1 for a summary)."""
    return geometry_kept_length(prompt_tokens, budgets.num_image_tokens, _k(budgets), budgets.merged_tokens)


def selection_flops(geometry: Geometry, prompt_tokens: int, budgets: Budgets) -> int:
    """The matrix products of the token selector and the merge at the prune layer (static budgets).

    core-coverage: k steps of [n_img, D] @ [D]; max-min: the [n_img, n_img] cosines, then k steps
    of a minimum; the score rules: at most one [n_img, D] product. nearest and mass: the [n_img, k]
    core-neuron overlaps and the [S', S] @ [S, d] weighted sum; summary: the weighted sum.
    """
    n, width, k = budgets.num_image_tokens, geometry.intermediate_size, _k(budgets)
    rules = {
        "core-coverage": 2 * k * n * width,
        "max-min": 2 * n * n * width + k * n,
        # cosines, relevance, kernel; step t projects on the t earlier picks: n * k^2 in all
        "conditional-dpp": 2 * n * n * width + 2 * n * width + 2 * n * n + n * k * k + 6 * k * n,
    }
    total = rules.get(budgets.token_selector, 2 * n * width)
    rows = kept_length(prompt_tokens, budgets)
    if budgets.token_merge in ("nearest", "mass"):
        total += 2 * n * k * width + 2 * rows * prompt_tokens * geometry.hidden_size
    elif budgets.token_merge == "summary":
        total += 2 * rows * prompt_tokens * geometry.hidden_size
    return total


def _k(budgets: Budgets) -> int:
    if budgets.token_budget == "auto":
        raise ValueError("analytic FLOPs need a static token budget, not 'auto'")
    return budgets.token_budget


def decode_bytes(geometry: Geometry, cached_tokens: int, budgets: Budgets | None, itemsize: int = 4) -> int:
    """Bytes a decode step reads: every weight it multiplies by (the FFN of the neuron-sparse layers
    at N neurons) and the KV cache (shorter after the prune layer). A decode step is memory bound,
    so this ratio, not the FLOPs', is what its speedup can reach."""
    d, q_width, kv_width = (
        geometry.hidden_size,
        geometry.num_heads * geometry.head_dim,
        geometry.num_kv_heads * geometry.head_dim,
    )
    total = d * geometry.vocab_size  # LM head
    for past, width in decode_layers(geometry, cached_tokens, budgets):
        total += 2 * d * q_width + 2 * d * kv_width + 3 * d * width + 2 * kv_width * past
    return total * itemsize


@dataclass(frozen=True)
class FlopsComparison:
    """Dense against CoreMatching for one token budget."""

    token_budget: int
    prompt_tokens: int  # S
    kept_tokens: int  # S - n_img + k: what layers after the prune layer see
    prefill_dense: int
    prefill_corematching: int
    decode_dense: int  # first decode step, the whole prompt cached
    decode_corematching: int

    @property
    def prefill_ratio(self) -> float:
        return self.prefill_dense / self.prefill_corematching

    @property
    def decode_ratio(self) -> float:
        return self.decode_dense / self.decode_corematching


def compare(geometry: Geometry, prompt_tokens: int, budgets: list[Budgets]) -> list[FlopsComparison]:
    dense_prefill = prefill_flops(geometry, prompt_tokens, None)
    dense_decode = decode_flops(geometry, prompt_tokens, None)
    return [
        FlopsComparison(
            token_budget=_k(b),
            prompt_tokens=prompt_tokens,
            kept_tokens=kept_length(prompt_tokens, b),
            prefill_dense=dense_prefill,
            prefill_corematching=prefill_flops(geometry, prompt_tokens, b),
            decode_dense=dense_decode,
            decode_corematching=decode_flops(geometry, prompt_tokens, b),
        )
        for b in budgets
    ]
