"""The typed manifest of a build (`manifest.json`): what export writes and the runtime reads.

A build directory is the contract between `export/` (which needs torch) and `runtime/` (which
must not): four ONNX graphs, their shared weights file, the tokenizer files and this manifest.
The layout and every field are described in docs/build-format.md. The JSON keeps one field per
dataclass field; `from_json` checks types and names the field that is wrong, so a hand-edited or
truncated manifest fails with one line that says to rebuild.

"Dense" has one representation here: `Manifest.corematching is None` (the JSON keeps
`{"dense": true}` for readers of the file).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

FORMAT_VERSION = 3  # 3: weight-only quantization (int8/int4 weights, the `quantization` record)
MANIFEST = "manifest.json"
GRAPHS = ("vision", "embed", "prefill", "decode")
PRECISIONS = ("float32", "float16")
QUANTIZED = ("int8", "int4")


class ManifestError(ValueError):
    """A build directory is missing, incomplete, tampered with or of an unknown format."""


def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"manifest field {where} {problem}; rebuild the build directory")


def _take(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if key not in data or data[key] is None:
        if optional:
            return None
        raise _fail(f"{where}.{key}", "is missing")
    value = data[key]
    if isinstance(value, bool) and kind is int:  # JSON true is not a count
        raise _fail(f"{where}.{key}", f"should be an integer, not {value!r}")
    if not isinstance(value, kind):
        raise _fail(f"{where}.{key}", f"has the wrong type ({type(value).__name__})")
    return value


def _section(data: Mapping[str, Any], key: str, where: str = "manifest") -> Mapping[str, Any]:
    return _take(data, key, dict, where)


@dataclass(frozen=True)
class ModelInfo:
    """The checkpoint's geometry and special tokens (the decoder's `text_config`, the vision tower's patches)."""

    source: str
    text_model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_size: int
    patch_size: int
    num_image_tokens: int
    image_token_id: int
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None  # HF configs may list several
    pad_token_id: int | None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self.eos_token_id is None:
            return frozenset()
        return frozenset((self.eos_token_id,) if isinstance(self.eos_token_id, int) else self.eos_token_id)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        where = "model"
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "eos_token_id":
                eos = data.get("eos_token_id")
                if isinstance(eos, list):
                    if not all(isinstance(e, int) for e in eos):
                        raise _fail(f"{where}.eos_token_id", "should hold integers")
                    eos = tuple(eos)
                elif eos is not None and not isinstance(eos, int):
                    raise _fail(f"{where}.eos_token_id", "should be an integer or a list of them")
                values[f.name] = eos
            elif f.name in ("source", "text_model_type"):
                values[f.name] = _take(data, f.name, str, where)
            else:
                values[f.name] = _take(data, f.name, int, where, optional=f.name in ("bos_token_id", "pad_token_id"))
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        return out


def _budget(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise _fail("corematching.token_budget", f"should be a positive integer or 'auto', not {value!r}")


@dataclass(frozen=True)
class CoreMatchingInfo:
    """The static budgets a CoreMatching build was traced with (absent for a dense build)."""

    token_budget: int | str  # image tokens kept after the prune layer, or "auto" (the count is data-dependent)
    token_ratio: float
    neuron_ratio: float
    prune_layer: int
    neuron_layers: tuple[int, ...]
    tokens_per_neuron_set: int
    core_neurons: int
    neuron_chunks: int
    auto_range: tuple[int, int]
    token_selector: str
    token_merge: str
    seed: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CoreMatchingInfo:
        where = "corematching"
        number = (int, float)
        return cls(
            token_budget=_budget(data.get("token_budget")),
            token_ratio=float(_take(data, "token_ratio", number, where)),
            neuron_ratio=float(_take(data, "neuron_ratio", number, where)),
            prune_layer=_take(data, "prune_layer", int, where),
            neuron_layers=tuple(_take(data, "neuron_layers", list, where)),
            tokens_per_neuron_set=_take(data, "tokens_per_neuron_set", int, where),
            core_neurons=_take(data, "core_neurons", int, where),
            neuron_chunks=_take(data, "neuron_chunks", int, where),
            auto_range=tuple(_take(data, "auto_range", list, where)),  # type: ignore[arg-type]
            token_selector=_take(data, "token_selector", str, where),
            token_merge=_take(data, "token_merge", str, where),
            seed=_take(data, "seed", int, where),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dense": False}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class Dim:
    """The range of one symbolic dimension of the graphs (TensorRT profiles use min/opt/max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise _fail("dims", f"has a range that is not min <= opt <= max ({self.min}, {self.opt}, {self.max})")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints for static axes, names of `Manifest.dims` for dynamic ones


@dataclass(frozen=True)
class GraphInfo:
    file: str
    external_data: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def files(self) -> list[str]:
        """The .onnx and, where the weights are external, the weights file."""
        return [self.file] + ([self.external_data] if self.external_data else [])

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ManifestError(f"the manifest lists no input {name!r} of {self.file}; rebuild the build directory")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> GraphInfo:
        def specs(key: str) -> tuple[TensorSpec, ...]:
            out = []
            for item in _take(data, key, list, where):
                if not isinstance(item, dict) or not {"name", "dtype", "shape"} <= item.keys():
                    raise _fail(f"{where}.{key}", "holds an entry without name, dtype and shape")
                out.append(TensorSpec(str(item["name"]), str(item["dtype"]), tuple(item["shape"])))
            return tuple(out)

        return cls(
            file=_take(data, "file", str, where),
            external_data=_take(data, "external_data", str, where, optional=True),
            inputs=specs("inputs"),
            outputs=specs("outputs"),
        )

    def to_json(self) -> dict[str, Any]:
        def specs(items: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
            return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in items]

        out: dict[str, Any] = {"file": self.file}
        if self.external_data:
            out["external_data"] = self.external_data
        return out | {"inputs": specs(self.inputs), "outputs": specs(self.outputs)}


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: str  # tokenizer.json
    chat_template: str
    preprocessor: str  # preprocessor_config.json: the image processor's settings
    # The chat template rendered around a marker, so the runtime needs no Jinja: replace `{question}`,
    # then repeat `image_token` num_image_tokens times, then tokenize. None: the runtime's own format.
    prompt: str | None = None
    image_token: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenizerInfo:
        where = "tokenizer"
        return cls(
            tokenizer=_take(data, "tokenizer", str, where),
            chat_template=_take(data, "chat_template", str, where),
            preprocessor=_take(data, "preprocessor", str, where),
            prompt=_take(data, "prompt", str, where, optional=True),
            image_token=_take(data, "image_token", str, where, optional=True),
        )


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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightsIndex:
        graphs: dict[str, dict[str, WeightEntry]] = {}
        for graph, entries in _take(data, "graphs", dict, "weights").items():
            try:
                graphs[graph] = {n: WeightEntry(int(o), str(d), tuple(s)) for n, (o, d, s) in entries.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise _fail(f"weights.graphs.{graph}", f"is not an index of [offset, dtype, shape] ({e})") from e
        return cls(file=_take(data, "file", str, "weights"), graphs=graphs)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "graphs": {
                g: {n: [e.offset, e.dtype, list(e.shape)] for n, e in entries.items()}
                for g, entries in self.graphs.items()
            },
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
            raise _fail("quantization.weights", f"is {self.weights!r}, not one of {', '.join(QUANTIZED)}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Quantization:
        where = "quantization"
        return cls(
            weights=_take(data, "weights", str, where),
            block_size=_take(data, "block_size", int, where, optional=True),
            method=_take(data, "method", str, where),
            quantized=_take(data, "quantized", int, where),
            kept_float=_take(data, "kept_float", int, where),
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
            layers=tuple(_take(data, "layers", list, where)),
            neurons=_take(data, "neurons", int, where),
            intermediate_size=_take(data, "intermediate_size", int, where),
            prompts=_take(data, "prompts", int, where),
            calibration=_take(data, "calibration", str, where),
            file=_take(data, "file", str, where),
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass(frozen=True)
class Engines:
    """TensorRT engines built on one machine (`python -m export engine`): graph -> engine file."""

    tensorrt_version: str
    api: str
    fp16: bool
    workspace_mb: int
    device: Mapping[str, Any]  # the GPU that built them: name, compute capability, memory
    graphs: Mapping[str, str]
    note: str = ""

    @property
    def device_name(self) -> str:
        return str(self.device.get("name"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Engines:
        where = "engines"
        graphs = {}
        for graph, entry in (_take(data, "graphs", dict, where)).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise _fail(f"{where}.graphs.{graph}", "has no engine file")
            graphs[graph] = entry["file"]
        return cls(
            tensorrt_version=str(_take(data, "tensorrt_version", (str, int, float), where)),
            api=_take(data, "api", str, where),
            fp16=bool(_take(data, "fp16", bool, where)),
            workspace_mb=_take(data, "workspace_mb", int, where),
            device=dict(_take(data, "device", dict, where)),
            graphs=graphs,
            note=str(data.get("note", "")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "tensorrt_version": self.tensorrt_version,
            "api": self.api,
            "fp16": self.fp16,
            "workspace_mb": self.workspace_mb,
            "device": dict(self.device),
            "graphs": {g: {"file": f} for g, f in self.graphs.items()},
            "note": self.note,
        }


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
    dims: Mapping[str, Dim]
    graphs: Mapping[str, GraphInfo]
    tokenizer: TokenizerInfo
    tensorrt_compatible: bool = True
    tensorrt_reason: str = ""
    flops: Flops | None = None
    weights: WeightsIndex | None = None
    quantization: Quantization | None = None  # None: float weights at `precision`
    static_neurons: StaticNeuronsInfo | None = None  # None: core neurons per request (or a dense build)
    validation: Mapping[str, Any] | None = None  # the build's validation report (export/validate.py)
    engines: Engines | None = None
    files: Mapping[str, str] = field(default_factory=dict)  # file of the build -> sha256
    versions: Mapping[str, str] = field(default_factory=dict)  # package versions that made the build
    created: str = ""
    build_seconds: float | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise _fail("precision", f"is {self.precision!r}, not one of {', '.join(PRECISIONS)}")

    @property
    def dense(self) -> bool:
        return self.corematching is None

    @property
    def max_sequence(self) -> int:
        """The longest prompt + answer the cache (and the TensorRT profiles) admit."""
        return self.dims["B"].max + 1

    def graph(self, name: str) -> GraphInfo:
        if name not in self.graphs:
            raise ManifestError(f"the build has no {name!r} graph; rebuild it with `python -m export build`")
        return self.graphs[name]

    def dim_range(self, graph: str, tensor: str, axis: int) -> tuple[int, int]:
        """(min, max) of one input axis of a graph, from `dims` where the axis is symbolic."""
        axis_dim = self.graph(graph).input(tensor).shape[axis]
        if isinstance(axis_dim, int):
            return axis_dim, axis_dim
        if axis_dim not in self.dims:
            raise _fail("dims", f"lacks {axis_dim!r}, which {graph}.{tensor} uses")
        return self.dims[axis_dim].min, self.dims[axis_dim].max

    def with_(self, **changes: Any) -> Manifest:
        """A copy with some fields replaced (the manifest is frozen; a build fills it in stages)."""
        return replace(self, **changes)

    # -- JSON -----------------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        cm = _section(data, "corematching")
        trt = data.get("tensorrt") or {}
        flops = data.get("flops")
        try:
            dims = {
                name: Dim(int(d["min"]), int(d["opt"]), int(d["max"])) for name, d in _section(data, "dims").items()
            }
        except (KeyError, TypeError, ValueError) as e:
            raise _fail("dims", f"holds a range without integer min, opt and max ({e})") from e
        return cls(
            model=ModelInfo.from_json(_section(data, "model")),
            corematching=None if cm.get("dense") else CoreMatchingInfo.from_json(cm),
            precision=_take(data, "precision", str, "manifest"),
            opset=_take(data, "opset", int, "manifest"),
            dims=dims,
            graphs={name: GraphInfo.from_json(g, f"graphs.{name}") for name, g in _section(data, "graphs").items()},
            tokenizer=TokenizerInfo.from_json(_section(data, "tokenizer")),
            tensorrt_compatible=bool(trt.get("compatible", True)),
            tensorrt_reason=str(trt.get("reason", "")),
            flops=Flops(**flops) if isinstance(flops, dict) else None,
            weights=WeightsIndex.from_json(data["weights"]) if data.get("weights") else None,
            quantization=Quantization.from_json(data["quantization"]) if data.get("quantization") else None,
            static_neurons=StaticNeuronsInfo.from_json(data["static_neurons"]) if data.get("static_neurons") else None,
            validation=data.get("validation"),
            engines=Engines.from_json(data["engines"]) if data.get("engines") else None,
            files=dict(data.get("files") or {}),
            versions=dict(data.get("versions") or {}),
            created=str(data.get("created", "")),
            build_seconds=data.get("build_seconds"),
            format_version=_take(data, "format_version", int, "manifest"),
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
            "graphs": {name: g.to_json() for name, g in self.graphs.items()},
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
            out["validation"] = dict(self.validation)
        if self.engines is not None:
            out["engines"] = self.engines.to_json()
        out["files"] = dict(self.files)
        out["versions"] = dict(self.versions)
        if self.build_seconds is not None:
            out["build_seconds"] = self.build_seconds
        return out
