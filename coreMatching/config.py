"""Typed configuration of CoreMatching (docs/method.md).

`CoreMatchingConfig` holds what the user chooses; `Budgets` is that choice
resolved against one model (number of layers, FFN width, image tokens), with
every static size the method and the exported graphs use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from coreMatching.errors import ConfigError
from coreMatching.selectors import DEFAULT_MERGE, DEFAULT_SELECTOR, MERGES, SELECTORS

# A static neuron set keeps this many times the per-request N neurons per layer (chosen on validation,
# docs/evaluation/selection.md: 1.25 with the fluctuation criterion came closest to the per-request set).
DEFAULT_STATIC_WIDTH_RATIO = 1.25

# The neuron-sparse range of the paper for a 32-layer model: layers 6..26,
# written as the half-open range [6, 27); other depths scale in proportion.
_PAPER_LAYERS = 32
_PAPER_NEURON_RANGE = (6, 27)


@dataclass(frozen=True)
class CoreMatchingConfig:
    """What the user chooses.

    token_budget: image tokens kept after the prune layer (`k`), or "auto" for the
        elbow of the sorted score curve clamped to [auto_min_tokens, auto_max_tokens].
    token_ratio: `rho`; each token's core neurons are its top ceil(rho * D / 2) activations.
    neuron_ratio: `beta`; the prompt's core neurons are the ceil(beta * D) most frequent.
    prune_layer: `l_p`, counted from 0; layers 0..l_p see every token.
    neuron_layers: half-open range (start, stop) of the layers whose decode steps use only
        the core neurons; None scales the paper's [6, 27) of 32 layers to the model's depth; an empty
        range (start == stop) selects no neurons per request (a model with a baked static neuron set,
        `coreMatching.static_neurons`).
    token_selector: the registered rule (`coreMatching.selectors.SELECTORS`) that picks the kept
        image tokens at the prune layer; the default is the project's measured best.
    token_merge: what becomes of the pruned image tokens (`coreMatching.selectors.MERGES`): dropped
        ("none"), one summary token ("summary"), or folded into their nearest kept token ("nearest").
    seed: seed of the "random" selector.
    neuron_chunks: select the prompt's core neurons per contiguous chunk of the FFN, each keeping
        its share of N (1: one global selection, the method). TensorRT builds need chunks when N
        is beyond TopK's limit (K < 3840); the build picks them and records them in the manifest.
    """

    token_budget: int | Literal["auto"] = 64
    token_ratio: float = 0.2
    neuron_ratio: float = 0.4
    prune_layer: int = 2
    neuron_layers: tuple[int, int] | None = None
    token_selector: str = DEFAULT_SELECTOR
    token_merge: str = DEFAULT_MERGE
    auto_min_tokens: int = 16
    auto_max_tokens: int | None = None
    seed: int = 0
    neuron_chunks: int = 1

    def __post_init__(self) -> None:
        if self.token_budget != "auto":
            if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int):
                raise ConfigError(f"token_budget must be a positive integer or 'auto', got {self.token_budget!r}")
            if self.token_budget < 1:
                raise ConfigError(f"token_budget must be at least 1, got {self.token_budget}")
        for name in ("token_ratio", "neuron_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
        if not isinstance(self.prune_layer, int) or self.prune_layer < 0:
            raise ConfigError(f"prune_layer must be a layer index >= 0, got {self.prune_layer!r}")
        if self.neuron_layers is not None:
            start, stop = self.neuron_layers
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
                raise ConfigError(
                    f"neuron_layers must be a half-open range (start, stop) with 0 <= start <= stop, "
                    f"got {self.neuron_layers!r}"
                )
        if self.token_selector not in SELECTORS:
            raise ConfigError(f"token_selector must be one of {', '.join(SELECTORS)}, got {self.token_selector!r}")
        if self.token_merge not in MERGES:
            raise ConfigError(f"token_merge must be one of {', '.join(MERGES)}, got {self.token_merge!r}")
        if self.token_budget == "auto" and not SELECTORS[self.token_selector].supports_auto:
            scoring = ", ".join(name for name, s in SELECTORS.items() if s.supports_auto)
            raise ConfigError(
                f"token_budget 'auto' needs a scoring selector ({scoring}); {self.token_selector!r} picks its "
                "tokens greedily for a fixed budget: give an integer budget or another --token-selector"
            )
        if not isinstance(self.neuron_chunks, int) or self.neuron_chunks < 1:
            raise ConfigError(f"neuron_chunks must be a positive integer, got {self.neuron_chunks!r}")
        if self.auto_min_tokens < 1:
            raise ConfigError(f"auto_min_tokens must be at least 1, got {self.auto_min_tokens}")
        if self.auto_max_tokens is not None and self.auto_max_tokens < self.auto_min_tokens:
            raise ConfigError(
                f"auto_max_tokens ({self.auto_max_tokens}) must be >= auto_min_tokens ({self.auto_min_tokens})"
            )

    @classmethod
    def keep_all(cls, num_image_tokens: int, **overrides: object) -> CoreMatchingConfig:
        """CoreMatching's code path keeping every image token and every neuron: it computes what the dense
        model does (tests check it). Dense itself is no configuration: `corematching=None` everywhere."""
        return cls(token_budget=num_image_tokens, neuron_ratio=1.0, **overrides)  # type: ignore[arg-type]

    @classmethod
    def from_name(cls, name: str) -> CoreMatchingConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown CoreMatching preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None

    def with_(self, **changes: object) -> CoreMatchingConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def resolve(self, *, num_layers: int, intermediate_size: int, num_image_tokens: int) -> Budgets:
        """The static sizes for one model; raises ConfigError where the model cannot honour them."""
        if self.prune_layer >= num_layers:
            raise ConfigError(
                f"prune_layer {self.prune_layer} is outside the decoder: "
                f"it has {num_layers} layers (0..{num_layers - 1})"
            )
        if self.token_budget != "auto" and self.token_budget > num_image_tokens:
            raise ConfigError(
                f"token_budget {self.token_budget} is larger than the {num_image_tokens} image tokens of this model"
            )
        if self.neuron_layers is None:
            start = round(_PAPER_NEURON_RANGE[0] * num_layers / _PAPER_LAYERS)
            stop = round(_PAPER_NEURON_RANGE[1] * num_layers / _PAPER_LAYERS)
            neuron_layers = (start, max(stop, start + 1)) if num_layers > 1 else (0, 1)
        else:
            neuron_layers = self.neuron_layers
            if neuron_layers[1] > num_layers:
                raise ConfigError(
                    f"neuron_layers {neuron_layers[0]}:{neuron_layers[1]} "
                    f"reaches past the decoder's {num_layers} layers"
                )
        if self.neuron_chunks > math.ceil(self.neuron_ratio * intermediate_size):
            raise ConfigError(f"neuron_chunks {self.neuron_chunks} is more than the number of core neurons")
        auto_max = num_image_tokens if self.auto_max_tokens is None else min(self.auto_max_tokens, num_image_tokens)
        # Keeping every image token leaves nothing to merge.
        merge = "none" if self.token_budget == num_image_tokens else self.token_merge
        return Budgets(
            num_layers=num_layers,
            intermediate_size=intermediate_size,
            num_image_tokens=num_image_tokens,
            token_budget=self.token_budget,
            auto_range=(min(self.auto_min_tokens, auto_max), auto_max),
            tokens_per_neuron_set=math.ceil(self.token_ratio * intermediate_size / 2),
            core_neurons=math.ceil(self.neuron_ratio * intermediate_size),
            prune_layer=self.prune_layer,
            neuron_layers=neuron_layers,
            neuron_chunks=self.neuron_chunks,
            token_selector=self.token_selector,
            token_merge=merge,
        )


@dataclass(frozen=True)
class Budgets:
    """`CoreMatchingConfig` resolved for one model: every size fixed at export time."""

    num_layers: int
    intermediate_size: int  # D
    num_image_tokens: int  # n_img
    token_budget: int | Literal["auto"]  # k
    auto_range: tuple[int, int]  # [k_min, k_max] of the adaptive budget
    tokens_per_neuron_set: int  # k_tok = ceil(rho * D / 2)
    core_neurons: int  # N = ceil(beta * D)
    prune_layer: int  # l_p
    neuron_layers: tuple[int, int]  # half-open [start, stop)
    neuron_chunks: int = 1  # core neurons selected per contiguous chunk of the FFN
    token_selector: str = DEFAULT_SELECTOR  # the registered rule that picks the kept image tokens
    token_merge: str = "none"  # what becomes of the pruned ones ("none" when every token is kept)
    static_layers: tuple[int, ...] = ()  # layers narrowed to a baked static neuron set, in both phases
    static_neurons: int = 0  # the FFN width of those layers

    def prefill_width(self, layer: int) -> int:
        """The FFN width a layer computes in prefill: D, or a baked static set's."""
        return self.static_neurons if layer in self.static_layers else self.intermediate_size

    def decode_width(self, layer: int) -> int:
        """The FFN width a layer computes in a decode step: N per request, or its prefill width."""
        return self.core_neurons if self.is_neuron_sparse(layer) else self.prefill_width(layer)

    @property
    def merged_tokens(self) -> int:
        """Extra tokens the merge adds after the kept image tokens (a summary: 1)."""
        return 1 if self.token_merge == "summary" else 0

    @property
    def image_slots(self) -> int:
        """Image tokens later layers hold: k, plus a summary token. Needs a static budget."""
        assert self.token_budget != "auto", "a static budget"
        return self.token_budget + self.merged_tokens

    @property
    def narrowable_layers(self) -> list[int]:
        """The layers a static neuron set narrows: the neuron-sparse ones but the prune layer, whose full
        activations the token selectors read in prefill (`coreMatching.static_neurons`)."""
        return [layer for layer in self.neuron_sparse_layers if layer != self.prune_layer]

    def static_width(self, align: int = 1, ratio: float = DEFAULT_STATIC_WIDTH_RATIO) -> int:
        """A static set's neurons per layer: ceil(N * ratio) (a static recipe's width ratio, >= 1) rounded up
        to a multiple of `align` (int4's block), at most D."""
        # round() first: N * ratio lands a hair above an integer in binary (100 * 1.1), which ceil would bump.
        wanted = math.ceil(round(self.core_neurons * ratio, 9))
        return min(self.intermediate_size, math.ceil(wanted / align) * align)

    def is_neuron_sparse(self, layer: int) -> bool:
        return self.neuron_layers[0] <= layer < self.neuron_layers[1]

    @property
    def neuron_sparse_layers(self) -> list[int]:
        return list(range(*self.neuron_layers))


PRESETS: dict[str, CoreMatchingConfig] = {
    "default": CoreMatchingConfig(),
    "k192": CoreMatchingConfig(token_budget=192),
    "k128": CoreMatchingConfig(token_budget=128),
    "k64": CoreMatchingConfig(token_budget=64),
    "k32": CoreMatchingConfig(token_budget=32),
    # The authors' adaptive form: their overlap rule, with the elbow of its sorted scores.
    "auto": CoreMatchingConfig(token_budget="auto", token_selector="query-overlap", token_merge="none"),
}
