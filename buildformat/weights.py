"""The manifest's records of the weights: where each initializer lies in the shared weights file,
their weight-only quantization, and a static neuron set baked into them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from buildformat.jsonfields import fail, take

QUANTIZED = ("int8", "int4")


@dataclass(frozen=True)
class WeightEntry:
    offset: int  # bytes into the weights file (64-byte aligned)
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightsIndex:
    """Where each graph's initializers lie in the shared weights file (stored once for all graphs)."""

    file: str
    graphs: Mapping[str, Mapping[str, WeightEntry]]  # graph file -> initializer name -> entry
    # Weights no graph holds: the per-request neuron-sparse layers' full FFN weights (in their stored form),
    # which the runtime binds to the stacks' ffn.* inputs in prefill and gathers from (docs/architecture.md).
    bound: Mapping[str, WeightEntry] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightsIndex:
        graphs: dict[str, dict[str, WeightEntry]] = {}
        for graph, entries in take(data, "graphs", dict, "weights").items():
            try:
                graphs[graph] = {n: WeightEntry(int(o), str(d), tuple(s)) for n, (o, d, s) in entries.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise fail(f"weights.graphs.{graph}", f"is not an index of [offset, dtype, shape] ({e})") from e
        bound = {}
        for name, entry in (data.get("bound") or {}).items():
            try:
                offset, dtype, shape = entry
                bound[name] = WeightEntry(int(offset), str(dtype), tuple(shape))
            except (TypeError, ValueError) as e:
                raise fail(f"weights.bound.{name}", f"is not [offset, dtype, shape] ({e})") from e
        return cls(file=take(data, "file", str, "weights"), graphs=graphs, bound=bound)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "graphs": {
                g: {n: [e.offset, e.dtype, list(e.shape)] for n, e in entries.items()}
                for g, entries in self.graphs.items()
            },
            "bound": {n: [e.offset, e.dtype, list(e.shape)] for n, e in self.bound.items()},
        }


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of a build (docs/quantization.md); absent: float weights at `precision`.

    weights: "int8" (symmetric, per output channel) or "int4" (symmetric, blocks of `block_size` along
    the reduction axis; the neuron-sparse layers' down projection along the output axis).
    method: "rtn", round to nearest (calibration-free).
    quantized / kept_float: how many 2-D MatMul weights are stored quantized, and left in floats.
    """

    weights: str
    block_size: int | None
    method: str = "rtn"
    quantized: int = 0
    kept_float: int = 0

    def __post_init__(self) -> None:
        if self.weights not in QUANTIZED:
            raise fail("quantization.weights", f"is {self.weights!r}, not one of {', '.join(QUANTIZED)}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Quantization:
        where = "quantization"
        return cls(
            weights=take(data, "weights", str, where),
            block_size=take(data, "block_size", int, where, optional=True),
            method=take(data, "method", str, where),
            quantized=take(data, "quantized", int, where),
            kept_float=take(data, "kept_float", int, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class StaticNeuronsInfo:
    """A static neuron set baked into the build (docs/method.md); absent: core neurons per request.

    layers: the narrowed layers, whose FFN in both graphs keeps `neurons` of `intermediate_size`;
    prompts / calibration: what the set was counted over; file: the set itself (indices and counts).
    """

    layers: tuple[int, ...]
    neurons: int
    intermediate_size: int
    prompts: int
    calibration: str
    file: str = "static_neurons.json"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StaticNeuronsInfo:
        where = "static_neurons"
        return cls(
            layers=tuple(take(data, "layers", list, where)),
            neurons=take(data, "neurons", int, where),
            intermediate_size=take(data, "intermediate_size", int, where),
            prompts=take(data, "prompts", int, where),
            calibration=take(data, "calibration", str, where),
            file=take(data, "file", str, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}
