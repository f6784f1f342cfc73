"""A static neuron set: the core neurons counted over many prompts, baked into narrower FFN weights.

The per-request method (`coreMatching.llava`) picks each prompt's core neurons in
prefill and gathers that layer's FFN rows once per request, so a runtime holds
the full FFN (prefill needs it) plus a compacted copy per request. A static set
trades that adaptivity for memory: every neuron-sparse layer keeps the neurons
that were most often core neurons over a calibration set, in prefill and in
decoding alike, so the build stores only those rows and needs no per-request
compaction (docs/method.md, "Static neuron set").

- `Budgets.narrowable_layers` / `Budgets.static_width`: the layers that are
  narrowed (the neuron-sparse ones but the prune layer, whose full activations
  the token selectors read) and how many neurons each keeps;
- `calibrate`: counts, per layer, how many calibration prompts had each neuron
  among their core neurons (the per-request rule, run by the reference), and
  ranks the neurons by a criterion of `CRITERIA` (`StaticRecipe`): "frequency"
  (those counts) or "fluctuation" (Var(a_n) * ||W_down[:, n]||^2 over every
  calibration prefill token: how much the neuron's contribution to the FFN
  output varies);
- `StaticNeurons.from_scores`: the best `size` of a layer (ties: lower index), sorted;
- `narrow_ffn_`: cuts a `transformers` model's FFN down to them, in place;
- `per_request_off`: the configuration the narrowed model then runs with (no
  per-request neuron layers), for the reference and the build alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coreMatching.backbones import backbone_of
from coreMatching.config import DEFAULT_STATIC_WIDTH_RATIO, Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError
from coreMatching.selection import stable_topk

FILE = "static_neurons.json"  # the set, next to the graphs of a build that bakes one
DEFAULT_STATIC_CRITERION = "fluctuation"  # the one place the default criterion is chosen (docs/evaluation/selection.md)
LEGACY_CRITERION = "frequency"  # what a set written before criteria were recorded was ranked by
MAX_WIDTH_RATIO = 4.0  # a bound on typos: at the default beta (0.4) a ratio of 2.5 already keeps the whole FFN

log = logging.getLogger(__name__)


class ActivationMoments:
    """Running float64 sums of one layer's FFN activation a (the input of `mlp.down_proj`) over every
    prefill token: Var(a_n) without keeping the activations. Fed by a forward pre-hook on down_proj."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sum: Tensor | None = None  # [D]
        self.sum_sq: Tensor | None = None  # [D]

    def hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        a = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [T, D]
        if self.sum is None or self.sum_sq is None:
            self.sum = torch.zeros(a.shape[-1], dtype=torch.float64, device=a.device)
            self.sum_sq = torch.zeros_like(self.sum)
        self.sum += a.sum(dim=0)
        self.sum_sq += a.square().sum(dim=0)
        self.tokens += a.shape[0]

    def variance(self) -> Tensor:
        """The population variance E[a^2] - E[a]^2 of each neuron. -> [D] float64"""
        if self.sum is None or self.sum_sq is None or self.tokens == 0:
            raise ConfigError("no FFN activation was seen; calibrate over at least one prompt")
        mean = self.sum / self.tokens
        return (self.sum_sq / self.tokens - mean.square()).clamp_min(0.0)  # rounding can dip below 0


@dataclass(frozen=True)
class LayerStats:
    """What calibration saw of one narrowed layer.

    counts: [D] prompts that had each neuron among their core neurons; down: W_down [d, D];
    moments: the activation's sums (None unless the criterion needs them).
    """

    counts: Tensor
    down: Tensor
    moments: ActivationMoments | None = None


@dataclass(frozen=True)
class Criterion:
    """How a static set ranks a layer's neurons: score(stats) -> [D], the highest kept."""

    name: str
    needs_activations: bool  # calibration hooks down_proj to sum the FFN activation
    score: Callable[[LayerStats], Tensor]
    help: str


def _frequency(stats: LayerStats) -> Tensor:
    return stats.counts.double()


def _fluctuation(stats: LayerStats) -> Tensor:
    # The neuron's contribution to the FFN output is a_n * W_down[:, n]; its variance over the tokens, summed
    # over the output dimensions, is Var(a_n) * ||W_down[:, n]||^2. A neuron that is often a core neuron
    # but nearly constant moves the output little from token to token; this keeps the ones that move it most.
    assert stats.moments is not None, "fluctuation needs the activation's moments"
    column_norm_sq = stats.down.detach().double().square().sum(dim=0)  # [D]: ||W_down[:, n]||^2
    return stats.moments.variance().cpu() * column_norm_sq.cpu()


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("frequency", False, _frequency, "the neurons most often among a prompt's core neurons"),
        Criterion(
            "fluctuation",
            True,
            _fluctuation,
            "the neurons whose FFN output varies most over the prefill tokens: Var(a_n) * ||W_down[:, n]||^2",
        ),
    )
}


def criterion_of(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise ConfigError(
            f"unknown static criterion {name!r}; use --static-criterion {' or '.join(CRITERIA)}"
        ) from None


@dataclass(frozen=True)
class StaticRecipe:
    """How a static set is chosen: the criterion that ranks each layer's neurons, and how many it keeps as a
    multiple of the per-request N (`Budgets.static_width`; docs/method.md, "Static neuron set")."""

    criterion: str = DEFAULT_STATIC_CRITERION
    width_ratio: float = DEFAULT_STATIC_WIDTH_RATIO

    def __post_init__(self) -> None:
        criterion_of(self.criterion)
        ratio = self.width_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 1.0 <= ratio <= MAX_WIDTH_RATIO:
            raise ConfigError(
                f"static width ratio {ratio!r} is outside [1, {MAX_WIDTH_RATIO:g}]; pass --static-width-ratio "
                f"between 1 (N neurons) and {MAX_WIDTH_RATIO:g}"
            )

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_STATIC_RECIPE


DEFAULT_STATIC_RECIPE = StaticRecipe()


@dataclass(frozen=True)
class StaticNeurons:
    """The neurons kept in each narrowed layer, and where they were counted.

    neurons: layer -> ascending neuron indices (the same count in every layer);
    counts: layer -> for every neuron of the full FFN, the calibration prompts that had it as a core neuron
        (recorded whatever the criterion: `coverage` reads them);
    prompts: how many prompts were counted; calibration: what they were (a file, a split);
    criterion: the `CRITERIA` entry that ranked the neurons.
    """

    neurons: Mapping[int, tuple[int, ...]]
    intermediate_size: int
    prompts: int
    calibration: str
    counts: Mapping[int, tuple[int, ...]] | None = None
    criterion: str = LEGACY_CRITERION

    def __post_init__(self) -> None:
        if not self.neurons:
            raise ConfigError("a static neuron set needs at least one layer")
        sizes = {len(v) for v in self.neurons.values()}
        if len(sizes) != 1:
            raise ConfigError(f"a static neuron set keeps the same count in every layer, got {sorted(sizes)}")
        for layer, kept in self.neurons.items():
            if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= self.intermediate_size:
                raise ConfigError(
                    f"static neurons of layer {layer} must be distinct ascending indices below {self.intermediate_size}"
                )
        if self.prompts < 1:
            raise ConfigError(f"a static neuron set is counted over at least one prompt, got {self.prompts}")
        criterion_of(self.criterion)

    @property
    def layers(self) -> list[int]:
        return sorted(self.neurons)

    @property
    def size(self) -> int:
        return len(next(iter(self.neurons.values())))

    @classmethod
    def from_scores(
        cls,
        scores: Mapping[int, Tensor],
        counts: Mapping[int, Tensor],
        size: int,
        prompts: int,
        calibration: str,
        criterion: str,
    ) -> StaticNeurons:
        """The `size` best-scored neurons of each layer (ties: the lower index), ascending.
        scores, counts: layer -> [D]"""
        neurons = {layer: tuple(stable_topk(s, size).sort().values.tolist()) for layer, s in scores.items()}
        width = next(iter(counts.values())).numel()
        return cls(
            neurons=neurons,
            intermediate_size=width,
            prompts=prompts,
            calibration=calibration,
            counts={layer: tuple(int(x) for x in c.tolist()) for layer, c in counts.items()},
            criterion=criterion,
        )

    @classmethod
    def from_counts(cls, counts: Mapping[int, Tensor], size: int, prompts: int, calibration: str) -> StaticNeurons:
        """The `size` most frequent core neurons of each layer (ties: the lower index). counts: layer -> [D]"""
        scores = {layer: c.float() for layer, c in counts.items()}
        return cls.from_scores(scores, counts, size, prompts, calibration, "frequency")

    def coverage(self) -> dict[int, float]:
        """Per layer, the share of all core-neuron picks over the calibration set that the kept set holds."""
        if self.counts is None:
            return {}
        out = {}
        for layer, kept in self.neurons.items():
            counts = self.counts[layer]
            total = sum(counts)
            out[layer] = sum(counts[i] for i in kept) / total if total else 1.0
        return out

    # -- the file of a build -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "intermediate_size": self.intermediate_size,
            "prompts": self.prompts,
            "calibration": self.calibration,
            "criterion": self.criterion,
            "neurons": {str(layer): list(v) for layer, v in sorted(self.neurons.items())},
        }
        if self.counts is not None:
            out["counts"] = {str(layer): list(v) for layer, v in sorted(self.counts.items())}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StaticNeurons:
        try:
            counts = data.get("counts")
            return cls(
                neurons={int(k): tuple(int(i) for i in v) for k, v in data["neurons"].items()},
                intermediate_size=int(data["intermediate_size"]),
                prompts=int(data["prompts"]),
                calibration=str(data["calibration"]),
                counts=None if counts is None else {int(k): tuple(int(i) for i in v) for k, v in counts.items()},
                criterion=str(data.get("criterion", LEGACY_CRITERION)),  # files written before criteria
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(
                f"not a static neuron set ({e}); write one with `python -m export build --static-neurons`"
            ) from e

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: Path) -> StaticNeurons:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such static neuron set") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read as JSON ({e})") from e
        return cls.from_json(data)


@torch.inference_mode()
def calibrate(
    reference: Any,
    prompts: Iterable[tuple[Tensor, Tensor]],
    layers: list[int],
    size: int,
    calibration: str,
    criterion: str = DEFAULT_STATIC_CRITERION,
) -> StaticNeurons:
    """Runs prompts of (input_ids [1, S], pixel_values [1, 3, H, W]) through the prefill of `reference` (a
    per-request `CoreMatchingLlava`), counts the core neurons of `layers` and, where the criterion needs
    them, sums their FFN activations (layers after the prune layer see only the kept tokens, as the
    reference computes them); keeps the `size` best of each layer by `criterion`."""
    chosen = criterion_of(criterion)
    decoder_layers = backbone_of(reference.model).layers(reference.model)
    moments = {layer: ActivationMoments() for layer in layers} if chosen.needs_activations else {}
    counts: dict[int, Tensor] = {}
    seen = 0
    handles = [decoder_layers[layer].mlp.down_proj.register_forward_pre_hook(m.hook) for layer, m in moments.items()]
    try:
        for input_ids, pixel_values in prompts:
            state = reference.prefill(input_ids, pixel_values)
            for layer in layers:
                core = state.core_neurons[layer]  # [N]
                if layer not in counts:
                    counts[layer] = torch.zeros(state.budgets.intermediate_size, dtype=torch.int64)
                counts[layer][core.cpu()] += 1
            seen += 1
    finally:
        for handle in handles:  # the model is narrowed and traced next: no hook may stay behind
            handle.remove()
    if seen == 0:
        raise ConfigError(f"the calibration set {calibration} has no prompts")
    scores = {
        layer: chosen.score(LayerStats(counts[layer], decoder_layers[layer].mlp.down_proj.weight, moments.get(layer)))
        for layer in layers
    }
    log.debug("static set ranked by %s over %d prompts", chosen.name, seen)
    return StaticNeurons.from_scores(scores, counts, size, seen, calibration, chosen.name)


def _narrow(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).contiguous()  # gate/up: [N_s, d]; down: [d, N_s]
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return out


def narrow_ffn_(model: Any, static: StaticNeurons) -> Any:
    """Cuts the FFN of each layer of `static` to its neurons, in place (gate/up rows, down columns): the
    model then computes exactly what a build that bakes the set computes. -> model"""
    layers = backbone_of(model).layers(model)
    for layer, kept in static.neurons.items():
        mlp = layers[layer].mlp
        if mlp.gate_proj.weight.shape[0] != static.intermediate_size:
            raise ConfigError(f"layer {layer}'s FFN is already narrowed (or the set is for another model)")
        index = torch.tensor(kept, dtype=torch.long, device=mlp.gate_proj.weight.device)
        mlp.gate_proj = _narrow(mlp.gate_proj, index, 0)
        mlp.up_proj = _narrow(mlp.up_proj, index, 0)
        mlp.down_proj = _narrow(mlp.down_proj, index, 1)
        mlp.intermediate_size = len(kept)
    return model


def per_request_off(config: CoreMatchingConfig, budgets: Budgets) -> CoreMatchingConfig:
    """The configuration of a narrowed model: the same token selection, no per-request neuron layers
    (an empty range), so prefill counts no core neurons and decoding gathers nothing."""
    start = budgets.neuron_layers[0]
    return config.with_(neuron_layers=(start, start))
