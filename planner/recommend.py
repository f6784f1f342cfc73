"""Which configuration to deploy on a device (`python -m planner --recommend`): every CoreMatching configuration
the device can run (its runtimes x weight and activation precisions x per-request or static neurons) planned
by `planner.plan`, and the one the rule prefers among those with enough headroom (docs/planning.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from planner.devices import Device, UnknownDeviceError, device
from planner.footprint import Neurons, PlanError, Sharing
from planner.plan import Estimate, PlanConfig, plan
from planner.runtimes import ActivationPrecision, WeightPrecision

_GIB = 2**30
MARGIN_BYTES = _GIB // 2  # headroom a recommendation keeps: allocator slack, a longer prompt, a driver update
# `rank`'s order in words, for the command's output.
RULE = (
    "of the configurations with >= {margin:g} GiB headroom, per-request neurons before a static set, then "
    "the highest weight precision (float, int8, int4), then the device's fast activations, then its runtime order"
)
_CLASS = {"fp32": 0, "fp16": 0, "int8": 1, "int4": 2}  # weight precision, best first (float weights are one class)
# What a build can have: float weights at the activations' precision, quantized ones with either.
_COMBINATIONS: tuple[tuple[WeightPrecision, ActivationPrecision], ...] = (
    ("fp32", "fp32"),
    ("fp16", "fp16"),
    ("int8", "fp32"),
    ("int8", "fp16"),
    ("int4", "fp32"),
    ("int4", "fp16"),
)


@dataclass(frozen=True)
class Candidate:
    """One configuration a device could run: a runtime, the weights' and activations' precisions, the neurons."""

    runtime: str
    weights: WeightPrecision
    activations: ActivationPrecision
    neurons: Neurons
    estimate: Estimate

    @property
    def label(self) -> str:
        return f"{self.weights} weights, {self.activations} activations, {self.neurons} neurons on {self.runtime}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; every memory figure in bytes."""
        estimate = {**asdict(self.estimate), "weights_by_part": dict(self.estimate.weights_by_part)}
        return {
            "runtime": self.runtime,
            "weights": self.weights,
            "activations": self.activations,
            "neurons": self.neurons,
            "estimate": estimate,
        }


@dataclass(frozen=True)
class Recommendation:
    """The configuration `recommend` picks for one device, and every candidate it weighed.

    status: "recommended" (headroom >= margin), "tight" (fits, with less), or "nothing fits" (choice is the
    candidate closest to fitting).
    """

    device: Device
    choice: Candidate | None
    status: str
    candidates: tuple[Candidate, ...]
    sharing: Sharing = "runtime"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; every memory figure in bytes."""
        return {
            "device": self.device.name,
            "sharing": self.sharing,
            "status": self.status,
            "choice": None if self.choice is None else self.choice.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
        }


def rank(dev: Device, c: Candidate) -> tuple[int, int, int, int, int]:
    """The order of preference (docs/planning.md): the method's per-request neurons before a static set, then
    the highest weight precision, then the activations the device computes fast, then the device's runtime
    order; more headroom breaks a tie."""
    return (
        c.neurons != "per-request",
        _CLASS[c.weights],
        c.activations != dev.recommended_precision,
        dev.runtimes.index(c.runtime),
        -(c.estimate.headroom or 0),
    )


def recommend(
    model: str | Path,
    device_name: str,
    token_budget: int = 64,
    max_sequence: int = 2048,
    prompt_tokens: int | None = None,
    margin: int = MARGIN_BYTES,
    sharing: Sharing = "runtime",
) -> Recommendation:
    """Of the CoreMatching configurations of `device_name` (its runtimes x weights x activations x per-request
    or static neurons) that it can run, the one `rank` prefers among those with at least `margin` headroom.

    A precision that falls back on a runtime is not a candidate there (it is the float configuration)."""
    try:
        dev = device(device_name)
    except UnknownDeviceError as e:
        raise PlanError(str(e)) from None
    if dev.usable_bytes is None:
        raise PlanError(f"{dev.name} has no memory limit to recommend against; pick a deployment target")
    candidates: list[Candidate] = []
    for rt in dev.runtimes:
        for weights, act in _COMBINATIONS:
            config = PlanConfig(
                model,
                dev.name,
                token_budget=token_budget,
                max_sequence=max_sequence,
                prompt_tokens=prompt_tokens,
                weights=weights,
                activations=act,
                runtime=rt,
                sharing=sharing,
            )
            p = plan(config)
            if p.planned_weights != weights:
                continue
            for neurons, e in (("per-request", p.corematching), ("static", p.static)):
                if e.runnable:
                    candidates.append(Candidate(rt, weights, act, neurons, e))  # type: ignore[arg-type]
    for status, floor in (("recommended", margin), ("tight", 0)):
        chosen = [c for c in candidates if (c.estimate.headroom or 0) >= floor]
        if chosen:
            best = min(chosen, key=lambda c: rank(dev, c))
            return Recommendation(dev, best, status, tuple(candidates), sharing)
    closest = max(candidates, key=lambda c: c.estimate.headroom or 0, default=None)
    return Recommendation(dev, closest, "nothing fits", tuple(candidates), sharing)
