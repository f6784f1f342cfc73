"""TensorRT engines for a build directory (`python -m export engine BUILD`), torch-free.

An engine is built on the machine that will run it (a Jetson builds its own): it runs only on the GPU
model and TensorRT version that built it. This module imports `tensorrt` only inside `build_engines`, and
never torch or transformers, so that a board with JetPack's TensorRT and the light runtime can use it.

One engine per graph of the build (`manifest.graph_names`). The decoder stacks (decoder, or lower and upper)
serve both phases, so their engines get two optimization profiles, "prefill" (the manifest's `dims`: the prompt's
length, one-slot past buffers, the full FFN width) and "decode" (`decode_dims`: one token, the cache buffers'
range, the core neurons' width): one engine, one copy of the weights, for both (docs/tensorrt.md). The
prefill-only graphs (vision, select, neurons) get the prefill one.

Two TensorRT API generations are supported and reported (`TrtApi.name`, recorded in the manifest; the version
is read by `runtime.trt_io.tensorrt_version`, as the runtime reads it): 8.6 ("bindings": networks need the
EXPLICIT_BATCH flag) and 10.x or later ("named-tensors": explicit batch is implicit). TensorRT 11 removed
`BuilderFlag.FP16` (networks are strongly typed), so there fp16 means a float16 export.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import buildformat
from buildformat import Dim, Engines, Manifest, ManifestError
from buildformat.names import DECODER, LOWER, NEURONS, PROFILES, SELECT, STACKS, UPPER, VISION_GRAPH
from runtime.gpu import DeviceInfo, detect_gpu
from runtime.trt_io import BINDINGS, UnsupportedTensorRT, tensorrt_version

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
ENGINE_NOTE = "an engine runs only on the GPU model and TensorRT version that built it"

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max) shape
# Every graph any build may have (`buildformat.names.graph_set`): which of them a build has, its manifest says.
KNOWN_GRAPHS = (VISION_GRAPH, DECODER, LOWER, SELECT, UPPER, NEURONS)


class EngineError(Exception):
    """An engine build that cannot start or did not finish."""


class TensorRTMissingError(EngineError):
    """The `tensorrt` Python package cannot be imported."""


class UnsupportedTensorRTError(EngineError):
    """TensorRT is importable but too old, or it does not support this GPU."""


class EngineBuildError(EngineError):
    """TensorRT could not parse a graph or build its engine; `errors` lists TensorRT's messages."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


@dataclass(frozen=True)
class EngineConfig:
    build_dir: Path
    fp16: bool = False
    workspace_mb: int = 4096
    graphs: tuple[str, ...] | None = None  # None: every graph of the build
    force: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "build_dir", Path(self.build_dir))
        if self.graphs is not None:
            graphs = (self.graphs,) if isinstance(self.graphs, str) else tuple(self.graphs)
            object.__setattr__(self, "graphs", graphs)
            if not graphs:
                raise ValueError(f"no graphs to build: choose from {', '.join(KNOWN_GRAPHS)}")
            unknown = [g for g in graphs if g not in KNOWN_GRAPHS]
            if unknown:
                raise ValueError(
                    f"unknown graph(s) {', '.join(map(repr, unknown))}: choose from {', '.join(KNOWN_GRAPHS)}"
                )
            if len(set(graphs)) != len(graphs):
                raise ValueError(f"graph listed twice in {', '.join(graphs)}")
        # bool is an int subclass: `workspace_mb=True` would silently mean 1 MiB.
        if isinstance(self.workspace_mb, bool) or not isinstance(self.workspace_mb, int) or self.workspace_mb <= 0:
            raise ValueError(f"workspace must be a positive number of MiB, not {self.workspace_mb!r}")

    def graphs_of(self, manifest: Manifest) -> tuple[str, ...]:
        """The graphs to build, in the build's order; refuses one the build does not have."""
        if self.graphs is None:
            return manifest.graph_names
        absent = [g for g in self.graphs if g not in manifest.graphs]
        if absent:
            raise ManifestError(
                f"the build has no {', '.join(map(repr, absent))} graph; choose from {', '.join(manifest.graph_names)}"
            )
        return tuple(g for g in manifest.graph_names if g in self.graphs)


@dataclass(frozen=True)
class TrtApi:
    """What differs between the TensorRT generations this builder supports."""

    version: str
    major: int
    minor: int
    name: str  # "bindings" (8.6) | "named-tensors" (10.x and later)
    network_flags: int  # for Builder.create_network
    workspace_pool: Any  # trt.MemoryPoolType.WORKSPACE
    fp16_flag: Any | None  # trt.BuilderFlag.FP16; None where removed (TensorRT 11: strong typing)


@dataclass(frozen=True)
class EngineReport:
    build_dir: Path
    tensorrt_version: str
    api: str
    fp16: bool
    workspace_mb: int
    device: DeviceInfo
    engines: dict[str, Path]  # graph -> engine file
    seconds: dict[str, float] = field(default_factory=dict)
    profiles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # graph -> its optimization profiles


def trt_api(trt: Any) -> TrtApi:
    """The API generation of an imported `tensorrt` module, from its `__version__`."""
    try:
        version = tensorrt_version(trt)
    except UnsupportedTensorRT as e:
        raise UnsupportedTensorRTError(str(e)) from e
    pool = trt.MemoryPoolType.WORKSPACE  # set_memory_pool_limit exists in 8.6 and 10.x alike
    fp16_flag = getattr(trt.BuilderFlag, "FP16", None)
    # 8.x still has implicit-batch networks: ONNX needs the explicit-batch one. From 10.x EXPLICIT_BATCH is
    # deprecated and ignored; every network is explicit-batch.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if version.api == BINDINGS else 0
    return TrtApi(version.text, version.major, version.minor, version.api, flags, pool, fp16_flag)


def import_tensorrt() -> ModuleType:
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:  # OSError: the package is there but libnvinfer is not
        raise TensorRTMissingError(
            f"TensorRT's Python package cannot be imported ({e}): install TensorRT 8.6 for Pascal GPUs such as "
            "the Titan Xp (pip install 'tensorrt==8.6.*'), TensorRT 10.x for SM 7.5 and later "
            "(pip install 'tensorrt==10.*'), or on a Jetson the one JetPack ships (apt install nvidia-jetpack)"
        ) from e


def profiles_from_manifest(manifest: Manifest, graph: str, dims: Mapping[str, Dim] | None = None) -> Profile:
    """(min, opt, max) shape of every input of `graph`, symbolic dims taken from `dims` (the manifest's `dims`,
    the prefill ranges, by default)."""
    if graph not in manifest.graphs:
        raise ManifestError(f"the manifest has no {graph!r} graph (it has {', '.join(manifest.graphs) or 'none'})")
    dims = manifest.dims if dims is None else dims
    profile: Profile = {}
    for spec in manifest.graphs[graph].inputs:
        shapes: tuple[list[int], list[int], list[int]] = ([], [], [])
        for d in spec.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise ManifestError(f"input {spec.name!r} of {graph} uses dim {d!r}, which manifest dims lack")
                bounds = [dims[d].min, dims[d].opt, dims[d].max]
            elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
                bounds = [d, d, d]
            else:
                raise ManifestError(f"input {spec.name!r} of {graph} has an invalid dimension {d!r}")
            for shape, bound in zip(shapes, bounds, strict=True):
                shape.append(bound)
        profile[spec.name] = (tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2]))
    return profile


def engine_profiles(manifest: Manifest, graph: str) -> dict[str, Profile]:
    """The optimization profiles of a graph's engine, by name, in the order they are added (TensorRT numbers
    them 0, 1, ...): a stack's "prefill" and "decode", a prefill-only graph's "prefill"."""
    prefill = profiles_from_manifest(manifest, graph)
    if graph not in STACKS:
        return {PROFILES[0]: prefill}
    if not manifest.decode_dims:
        raise ManifestError(f"the manifest has no decode_dims for the decode profile of {graph}; rebuild the build")
    # A dim both phases share may be listed in `dims` alone.
    decode = profiles_from_manifest(manifest, graph, {**manifest.dims, **manifest.decode_dims})
    return dict(zip(PROFILES, (prefill, decode), strict=True))


def _dynamic_inputs(manifest: Manifest, graph: str) -> set[str]:
    return {s.name for s in manifest.graphs[graph].inputs if any(isinstance(d, str) for d in s.shape)}


def engine_file(graph: str) -> str:
    return f"{ENGINE_DIR}/{graph}.plan"


def record_engines(
    build_dir: str | Path,
    manifest: Manifest,
    engine_files: Mapping[str, str],
    *,
    device: DeviceInfo,
    tensorrt_version: str,
    api: str,
    fp16: bool,
    workspace_mb: int,
    profiles: Mapping[str, tuple[str, ...]] | None = None,
) -> Manifest:
    """Writes the manifest's `engines` section and the engines' sha256, atomically; returns the new manifest.

    `engine_files` maps graph -> engine path relative to the build, `profiles` graph -> the names of its engine's
    optimization profiles (in TensorRT's order). Engines of other graphs from an earlier run
    stay listed only if they were built for the same TensorRT, API, precision and GPU; otherwise they are
    unlisted (a runtime must not mix them). Nothing is written when a file cannot be hashed.
    """
    build = Path(build_dir)
    missing = [f for f in engine_files.values() if not (build / f).is_file()]
    if missing:
        raise ManifestError(f"engine file(s) {', '.join(missing)} missing from {build}; manifest left unchanged")
    graphs = dict(engine_files)
    named = dict(profiles or {})
    files = dict(manifest.files)
    previous = manifest.engines
    if previous is not None:
        same_target = (previous.tensorrt_version, previous.api, previous.fp16, dict(previous.device)) == (
            tensorrt_version,
            api,
            fp16,
            device.as_dict(),
        )
        for graph, file in previous.graphs.items():
            if graph in engine_files:
                continue
            if same_target and (build / file).is_file():
                graphs[graph] = file
                if graph in previous.profiles:
                    named[graph] = tuple(previous.profiles[graph])
            else:
                log.warning("%s was built for another TensorRT, GPU or precision: unlisted; rebuild it", file)
                files.pop(file, None)
    section = Engines(
        tensorrt_version=tensorrt_version,
        api=api,
        fp16=fp16,
        workspace_mb=workspace_mb,
        device=device.as_dict(),
        graphs={g: graphs[g] for g in manifest.graph_names if g in graphs},
        note=ENGINE_NOTE,
        profiles={g: named[g] for g in manifest.graph_names if g in graphs and g in named},
    )
    new = buildformat.with_files(build, manifest.with_(engines=section, files=files), list(engine_files.values()))
    buildformat.write(build, new)
    return new


def _check_build(config: EngineConfig) -> tuple[Manifest, tuple[str, ...]]:
    """Everything that needs no TensorRT: the manifest, its files, and engines already there; returns the manifest
    and the graphs to build."""
    manifest = buildformat.read(config.build_dir)
    if not manifest.tensorrt_compatible:
        raise EngineError(
            f"this build cannot run in TensorRT: {manifest.tensorrt_reason or 'no reason given'}; "
            "use ONNX Runtime, or export a TensorRT-compatible build"
        )
    graphs = config.graphs_of(manifest)
    names: list[str] = []
    for graph in graphs:
        names += [f for f in manifest.graphs[graph].files if f not in names]  # weights.bin once, not per graph
        engine_profiles(manifest, graph)  # a bad dims section fails here, before any TensorRT work
    buildformat.verify(config.build_dir, manifest, names)
    existing = [engine_file(g) for g in graphs if (config.build_dir / engine_file(g)).exists()]
    if existing and not config.force:
        raise EngineError(f"{', '.join(existing)} already exist(s) in {config.build_dir}: pass --force to rebuild")
    return manifest, graphs


def _build_one(
    trt: Any,
    api: TrtApi,
    builder: Any,
    logger: Any,
    onnx_path: Path,
    graph: str,
    profiles: dict[str, Profile],
    dynamic: set[str],
    fp16: bool,
    workspace_mb: int,
    out: Path,
) -> None:
    network = builder.create_network(api.network_flags)
    parser = trt.OnnxParser(network, logger)
    # From the file (not from bytes) so that the parser finds external data beside it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name} ({len(errors)} error(s))", errors)
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unlisted = [n for n, s in inputs.items() if any(d < 0 for d in s) and n not in dynamic]
    stale = sorted(dynamic - inputs.keys())
    if unlisted or stale:
        raise EngineBuildError(
            f"{onnx_path.name} and the manifest disagree on the dynamic inputs of {graph} "
            f"(not in the manifest: {unlisted or 'none'}; not in the graph: {stale or 'none'}); rebuild the build"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(api.workspace_pool, workspace_mb << 20)
    if fp16:
        config.set_flag(api.fp16_flag)
    if not dynamic and len(profiles) > 1:  # TensorRT would make its one default profile, not one per phase
        raise EngineBuildError(f"the {graph} stack has no dynamic input, so no decode profile; rebuild the build")
    # Static graphs get TensorRT's default profile. A stack's profiles are added prefill first: the runtime selects
    # them by index (TensorRT numbers them in the order they are added).
    for index, (profile_name, shapes) in enumerate(profiles.items() if dynamic else ()):
        profile = builder.create_optimization_profile()
        for name in sorted(dynamic):
            profile.set_shape(name, *shapes[name])
        if config.add_optimization_profile(profile) != index:
            raise EngineBuildError(f"TensorRT refused the {profile_name} profile of {graph} (its messages say why)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build the {graph} engine (its messages above say why)")
    with out.open("wb") as f:
        f.write(serialized)


def _place(tmp: Path, engines_dir: Path, graphs: tuple[str, ...]) -> None:
    """Moves the finished engines into engines/: one rename of the whole folder where there is none yet."""
    if not engines_dir.exists():
        os.replace(tmp, engines_dir)
        return
    for graph in graphs:
        os.replace(tmp / f"{graph}.plan", engines_dir / f"{graph}.plan")


def build_engines(config: EngineConfig) -> EngineReport:
    """Builds `engines/{graph}.plan` for each graph of `config` and records them in the manifest."""
    manifest, graphs = _check_build(config)
    trt = import_tensorrt()
    device = detect_gpu()
    api = trt_api(trt)
    if api.major >= 10 and device.sm < (7, 0):
        raise UnsupportedTensorRTError(
            f"TensorRT {api.version} does not support {device.name} (SM {device.compute_capability}): "
            "install TensorRT 8.6, the last release for Pascal, or use ONNX Runtime's CUDA provider"
        )
    precision = manifest.precision
    use_fp16 = config.fp16
    if config.fp16 and api.fp16_flag is None:
        if precision != "float16":
            raise EngineError(
                f"TensorRT {api.version} removed the fp16 builder flag (networks are strongly typed): "
                "export a float16 build instead, or build without --fp16"
            )
        log.info("TensorRT %s follows the graphs' own float16 types; the --fp16 flag is not needed", api.version)
        use_fp16 = False
    elif precision == "float16" and not config.fp16 and api.fp16_flag is not None:
        log.warning("the graphs are float16 but --fp16 was not given: TensorRT may run them in fp32 kernels")

    log.info("TensorRT %s (%s API) on %s (SM %s)", api.version, api.name, device.name, device.compute_capability)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if use_fp16 and not getattr(builder, "platform_has_fast_fp16", True):
        log.warning(
            "%s has no fast fp16 (on Pascal, such as the Titan Xp, fp16 runs at a small fraction of fp32 speed): "
            "an fp32 engine (no --fp16) is faster there",
            device.name,
        )

    build, engines_dir = config.build_dir, config.build_dir / ENGINE_DIR
    seconds: dict[str, float] = {}
    built: dict[str, tuple[str, ...]] = {}  # graph -> its engine's profiles
    tmp = Path(tempfile.mkdtemp(prefix=".engines-tmp-", dir=build))
    try:
        for i, graph in enumerate(graphs, 1):
            profiles = engine_profiles(manifest, graph)
            dynamic = _dynamic_inputs(manifest, graph)
            ranges = "; ".join(
                f"{p}: " + ", ".join(f"{n} {shapes[n][0]}..{shapes[n][2]}" for n in sorted(dynamic))
                for p, shapes in profiles.items()
            )
            precision_name = "fp16" if config.fp16 else "fp32"
            log.info("[%d/%d] building %s engine (%s, %s)", i, len(graphs), graph, precision_name, ranges or "static")
            start = time.perf_counter()
            onnx_path = build / manifest.graphs[graph].file
            _build_one(
                trt,
                api,
                builder,
                logger,
                onnx_path,
                graph,
                profiles,
                dynamic,
                use_fp16,
                config.workspace_mb,
                tmp / f"{graph}.plan",
            )
            seconds[graph] = time.perf_counter() - start
            built[graph] = tuple(profiles)
            size = (tmp / f"{graph}.plan").stat().st_size
            log.info("[%d/%d] %s engine built in %.1f s (%.1f MB)", i, len(graphs), graph, seconds[graph], size / 1e6)
        _place(tmp, engines_dir, graphs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    files = {g: engine_file(g) for g in graphs}
    record_engines(
        build,
        manifest,
        files,
        device=device,
        tensorrt_version=api.version,
        api=api.name,
        fp16=config.fp16,
        workspace_mb=config.workspace_mb,
        profiles=built,
    )
    return EngineReport(
        build,
        api.version,
        api.name,
        config.fp16,
        config.workspace_mb,
        device,
        {g: build / f for g, f in files.items()},
        seconds,
        built,
    )
