"""The typed manifest of a build (`manifest.json`): what export writes and the runtime reads.

A build directory is the contract between `export/` (which needs torch) and `runtime/` (which
must not): four ONNX graphs, their shared weights file, the tokenizer files and this manifest.
The layout and every field are described in docs/build-format.md. The JSON keeps one field per
dataclass field; `from_json` checks types and names the field that is wrong, so a hand-edited or
truncated manifest fails with one line that says to rebuild.

"Dense" has one representation here: `Manifest.corematching is None` (the JSON keeps
`{"dense": true}` for readers of the file).

The records of the sections live by concern in the sibling modules (`model`, `graphs`, `weights`,
`engines`, `validation`); this module holds the manifest that gathers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from buildformat.engines import Engines
from buildformat.graphs import Dim, GraphInfo
from buildformat.jsonfields import ManifestError, fail, section, take
from buildformat.model import CoreMatchingInfo, ModelInfo, TokenizerInfo
from buildformat.validation import Validation, validation_from_json
from buildformat.weights import Quantization, StaticNeuronsInfo, WeightsIndex

FORMAT_VERSION = 4  # 4: decoder stacks that serve both phases, every weight in one graph (`decode_dims`)
MANIFEST = "manifest.json"
PRECISIONS = ("float32", "float16")


@dataclass(frozen=True)
class Flops:
    """Analytic FLOPs of the prompt the build was sized for (docs/flops.md)."""

    prompt_tokens: int
    prefill_dense: float
    decode_dense: float
    prefill_corematching: float | None = None
    decode_corematching: float | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to know about a build, and the sha256 of its files."""

    model: ModelInfo
    corematching: CoreMatchingInfo | None  # None: a dense build (every image token kept, every neuron)
    precision: str  # "float32" | "float16": the graphs' activations and cache
    opset: int
    dims: Mapping[str, Dim]  # every graph's symbolic dims in prefill (the stacks' prefill profile)
    graphs: Mapping[str, GraphInfo]  # in the order a prefill runs them (`buildformat.names.graph_set`)
    tokenizer: TokenizerInfo
    decode_dims: Mapping[str, Dim] = field(default_factory=dict)  # the stacks' dims in decode (their second profile)
    # Stack -> its ONNX Runtime form (fused contrib operators; `buildformat.names.fused_graph`), which the ONNX
    # Runtime CPU provider reads in place of `graphs[stack]`; TensorRT and the GPU providers read `graphs`.
    fused: Mapping[str, GraphInfo] = field(default_factory=dict)
    tensorrt_compatible: bool = True
    tensorrt_reason: str = ""
    flops: Flops | None = None
    weights: WeightsIndex | None = None
    quantization: Quantization | None = None  # None: float weights at `precision`
    static_neurons: StaticNeuronsInfo | None = None  # None: core neurons per request (or a dense build)
    validation: Validation | None = None  # how the build was validated (export/validate.py), or that it was not
    engines: Engines | None = None
    files: Mapping[str, str] = field(default_factory=dict)  # file of the build -> sha256
    versions: Mapping[str, str] = field(default_factory=dict)  # package versions that made the build
    created: str = ""
    build_seconds: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise fail("precision", f"is {self.precision!r}, not one of {', '.join(PRECISIONS)}")

    @property
    def dense(self) -> bool:
        return self.corematching is None

    @property
    def max_sequence(self) -> int:
        """The longest prompt + answer the cache (and the TensorRT profiles) admit."""
        return self.decode_dims["B"].max + 1

    @property
    def graph_names(self) -> tuple[str, ...]:
        """The build's graphs, in the order a prefill runs them."""
        return tuple(self.graphs)

    def graph(self, name: str, fused: bool = False) -> GraphInfo:
        """A graph of the build; with `fused`, a stack's ONNX Runtime form where the build has one."""
        if fused and name in self.fused:
            return self.fused[name]
        if name not in self.graphs:
            raise ManifestError(f"the build has no {name!r} graph; rebuild it with `python -m export build`")
        return self.graphs[name]

    def with_(self, **changes: Any) -> Manifest:
        """A copy with some fields replaced (the manifest is frozen; a build fills it in stages)."""
        return replace(self, **changes)

    # -- JSON -----------------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        cm = section(data, "corematching")
        trt = data.get("tensorrt") or {}
        flops = data.get("flops")
        dims = _dims(section(data, "dims"), "dims")
        return cls(
            model=ModelInfo.from_json(section(data, "model")),
            corematching=None if cm.get("dense") else CoreMatchingInfo.from_json(cm),
            precision=take(data, "precision", str, "manifest"),
            opset=take(data, "opset", int, "manifest"),
            dims=dims,
            decode_dims=_dims(section(data, "decode_dims"), "decode_dims"),
            graphs={name: GraphInfo.from_json(g, f"graphs.{name}") for name, g in section(data, "graphs").items()},
            fused={
                name: GraphInfo.from_json(g, f"fused_graphs.{name}")
                for name, g in (data.get("fused_graphs") or {}).items()
            },
            tokenizer=TokenizerInfo.from_json(section(data, "tokenizer")),
            tensorrt_compatible=bool(trt.get("compatible", True)),
            tensorrt_reason=str(trt.get("reason", "")),
            flops=Flops(**flops) if isinstance(flops, dict) else None,
            weights=WeightsIndex.from_json(data["weights"]) if data.get("weights") else None,
            quantization=Quantization.from_json(data["quantization"]) if data.get("quantization") else None,
            static_neurons=StaticNeuronsInfo.from_json(data["static_neurons"]) if data.get("static_neurons") else None,
            validation=validation_from_json(section(data, "validation")) if data.get("validation") else None,
            engines=Engines.from_json(data["engines"]) if data.get("engines") else None,
            files=dict(data.get("files") or {}),
            versions=dict(data.get("versions") or {}),
            created=str(data.get("created", "")),
            build_seconds=data.get("build_seconds"),
            format_version=take(data, "format_version", int, "manifest"),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of manifest.json, without its `integrity` digest (added when written)."""
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "created": self.created,
            "model": self.model.to_json(),
            "precision": self.precision,
            "opset": self.opset,
            "corematching": {"dense": True} if self.corematching is None else self.corematching.to_json(),
            "dims": {name: {"min": d.min, "opt": d.opt, "max": d.max} for name, d in self.dims.items()},
            "decode_dims": {name: {"min": d.min, "opt": d.opt, "max": d.max} for name, d in self.decode_dims.items()},
            "graphs": {name: g.to_json() for name, g in self.graphs.items()},
            "fused_graphs": {name: g.to_json() for name, g in self.fused.items()},
            "tensorrt": {"compatible": self.tensorrt_compatible, "reason": self.tensorrt_reason},
            "tokenizer": {f.name: getattr(self.tokenizer, f.name) for f in fields(self.tokenizer)},
        }
        if self.flops is not None:
            out["flops"] = {f.name: getattr(self.flops, f.name) for f in fields(self.flops)}
        if self.weights is not None:
            out["weights"] = self.weights.to_json()
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_json()
        if self.static_neurons is not None:
            out["static_neurons"] = self.static_neurons.to_json()
        if self.validation is not None:
            out["validation"] = self.validation.to_json()
        if self.engines is not None:
            out["engines"] = self.engines.to_json()
        out["files"] = dict(self.files)
        out["versions"] = dict(self.versions)
        if self.build_seconds is not None:
            out["build_seconds"] = self.build_seconds
        return out


# The records' names, importable from here as they were before the sections moved to their own modules.


def _dims(data: Mapping[str, Any], where: str) -> dict[str, Dim]:
    try:
        return {name: Dim(int(d["min"]), int(d["opt"]), int(d["max"])) for name, d in data.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise fail(where, f"holds a range without integer min, opt and max ({e})") from e
