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
  among their core neurons (the per-request rule, run by the reference);
- `StaticNeurons.from_counts`: the most frequent ones (ties: lower index), sorted;
- `narrow_ffn_`: cuts a `transformers` model's FFN down to them, in place;
- `per_request_off`: the configuration the narrowed model then runs with (no
  per-request neuron layers), for the reference and the build alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coreMatching.backbones import backbone_of
from coreMatching.config import Budgets, CoreMatchingConfig
from coreMatching.errors import ConfigError
from coreMatching.selection import stable_topk

FILE = "static_neurons.json"  # the set, next to the graphs of a build that bakes one


@dataclass(frozen=True)
class StaticNeurons:
    """The neurons kept in each narrowed layer, and where they were counted.

    neurons: layer -> ascending neuron indices (the same count in every layer);
    counts: layer -> for every neuron of the full FFN, the calibration prompts that had it as a core neuron;
    prompts: how many prompts were counted; calibration: what they were (a file, a split).
    """

    neurons: Mapping[int, tuple[int, ...]]
    intermediate_size: int
    prompts: int
    calibration: str
    counts: Mapping[int, tuple[int, ...]] | None = None

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

    @property
    def layers(self) -> list[int]:
        return sorted(self.neurons)

    @property
    def size(self) -> int:
        return len(next(iter(self.neurons.values())))

    @classmethod
    def from_counts(cls, counts: Mapping[int, Tensor], size: int, prompts: int, calibration: str) -> StaticNeurons:
        """The `size` most frequent core neurons of each layer (ties: the lower index). counts: layer -> [D]"""
        neurons = {layer: tuple(stable_topk(c.float(), size).sort().values.tolist()) for layer, c in counts.items()}
        width = next(iter(counts.values())).numel()
        return cls(
            neurons=neurons,
            intermediate_size=width,
            prompts=prompts,
            calibration=calibration,
            counts={layer: tuple(int(x) for x in c.tolist()) for layer, c in counts.items()},
        )

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
    reference: Any, prompts: Iterable[tuple[Tensor, Tensor]], layers: list[int], size: int, calibration: str
) -> StaticNeurons:
    """Counts the per-request core neurons of `layers` over prompts of (input_ids [1, S], pixel_values
    [1, 3, H, W]), run by `reference` (a per-request `CoreMatchingLlava`), and keeps `size` per layer."""
    counts: dict[int, Tensor] = {}
    seen = 0
    for input_ids, pixel_values in prompts:
        state = reference.prefill(input_ids, pixel_values)
        for layer in layers:
            core = state.core_neurons[layer]  # [N]
            if layer not in counts:
                counts[layer] = torch.zeros(state.budgets.intermediate_size, dtype=torch.int64)
            counts[layer][core.cpu()] += 1
        seen += 1
    if seen == 0:
        raise ConfigError(f"the calibration set {calibration} has no prompts")
    return StaticNeurons.from_counts(counts, size, seen, calibration)


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
