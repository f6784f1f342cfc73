"""The TensorRT backend: runs the engines of `python -m export engine` (engines/{graph}.plan), torch-free.

`tensorrt` and cuda-python are imported when a TrtBackend is made, not with this module. Two TensorRT API
generations are supported, picked from `tensorrt.__version__` and logged (`runtime.trt_io`: 8.6's bindings,
10.x's named tensors). An engine only runs on the GPU model and TensorRT version that built it; the manifest's
`engines` section records both and a mismatch is refused before any engine is loaded.

Per request: vision, embed and prefill run on device buffers; the cache buffers (one per layer, sized once
for the request) receive the prefill's cache with one 2-D copy each; the compacted FFN weights stay where
the prefill wrote them. The decode context is bound to all of those ONCE per request. A step then moves a
token id and two integers to the device, runs the embed and decode engines, writes the token's own cache
entries with one 2-D copy per buffer, and brings back only the logits.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from buildformat import GRAPHS, Manifest, ManifestError
from buildformat.names import (
    IMAGE_FEATURES,
    IMAGE_START,
    INPUT_IDS,
    INPUTS_EMBEDS,
    KEPT_IMAGE_TOKENS,
    LOGITS,
    PIXEL_VALUES,
    STEP_INPUTS,
    is_past,
    is_request_input,
    present_name,
)
from runtime.backend import Backend, BackendError, PrefillResult, activation_dtype
from runtime.cuda_memory import DeviceBuffer, Stream, write_prefix, write_token
from runtime.decode_state import DecodeState
from runtime.trt_io import EngineIO, select_api

log = logging.getLogger(__name__)


# -- what needs no TensorRT: the manifest, the cache sizes -------------------------------


def engine_files(manifest: Manifest, build_dir: Path) -> dict[str, Path]:
    """The engine of every graph; refuses a build whose engines were not built (or are gone)."""
    first = f"run `python -m export engine {build_dir}` on this machine first"
    graphs = manifest.engines.graphs if manifest.engines is not None else {}
    if not graphs:
        raise BackendError(f"{build_dir} has no TensorRT engines: {first}")
    missing = [g for g in GRAPHS if g not in graphs]
    if missing:
        raise BackendError(f"{build_dir} has no TensorRT engine for {', '.join(missing)}: {first}")
    files = {g: build_dir / graphs[g] for g in GRAPHS}
    absent = [str(p) for p in files.values() if not p.is_file()]
    if absent:
        raise BackendError(f"engine file(s) {', '.join(absent)} are missing: {first}")
    return files


def check_target(manifest: Manifest, tensorrt_version: str, gpu_name: str, build_dir: Path) -> None:
    """Refuses engines built by another TensorRT version or on another GPU model."""
    engines = manifest.engines
    assert engines is not None, "engine_files() runs first"
    rebuild = (
        "an engine only runs on the GPU and TensorRT version that built it; "
        f"rebuild them here with `python -m export engine {build_dir} --force`"
    )
    built_with = engines.tensorrt_version
    if built_with != tensorrt_version:
        raise BackendError(
            f"the engines were built with TensorRT {built_with}, this machine has {tensorrt_version}: {rebuild}"
        )
    built_on = engines.device_name
    if built_on != gpu_name:
        raise BackendError(f"the engines were built on {built_on}, this machine has {gpu_name}: {rebuild}")


def dim_range(manifest: Manifest, graph: str, tensor: str, axis: int) -> tuple[int, int]:
    """(min, max) of one input axis: the engine's optimization profile, from the manifest's dims."""
    try:
        return manifest.dim_range(graph, tensor, axis)
    except ManifestError as e:
        raise BackendError(str(e)) from e


def cache_size(name: str, prompt_length: int, answer: int, low: int, high: int) -> int:
    """Positions of one cache buffer: the prompt's and the answer's, clamped into the engine's [low, high].

    The answer's last token is never written to the cache, so `prompt_length + answer - 1` must fit.
    """
    if prompt_length + answer - 1 > high:
        raise BackendError(
            f"{name} needs {prompt_length + answer - 1} cache positions ({prompt_length} of the prompt, "
            f"{answer - 1} of the answer) but the decode engine admits {high}: ask for fewer new tokens, or "
            "export the build with a larger --max-sequence"
        )
    size = max(low, min(prompt_length + answer, high))
    if size != prompt_length + answer:
        log.debug("%s: %d positions (the engine's profile admits %d..%d)", name, size, low, high)
    return size


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as e:  # OSError: the package is there, libnvinfer is not
        raise BackendError(
            f"TensorRT's Python package cannot be imported ({e}): install the TensorRT that built the engines, "
            "or run the build with ONNX Runtime (--backend onnxruntime)"
        ) from e


def current_gpu() -> str:
    """The name of the GPU TensorRT runs on, as `python -m export engine` recorded it."""
    from runtime.gpu import NoGpuError, detect_gpu  # imports cuda-python only when called

    try:
        return detect_gpu().name
    except NoGpuError as e:
        raise BackendError(str(e)) from e


# -- the backend ---------------------------------------------------------------------------------------


@dataclass
class _Request:
    """The device state of one request, freed when the next one starts."""

    state: DecodeState
    cache: dict[str, DeviceBuffer] = field(default_factory=dict)  # past.{i}.key/value
    # Request-long decode inputs: the compacted weights and a merge's kept_bias (from prefill), image_start.
    ffn: dict[str, DeviceBuffer] = field(default_factory=dict)
    outputs: dict[str, DeviceBuffer] = field(default_factory=dict)  # the decode's logits and new.{i}.*

    def free(self) -> None:
        for group in (self.cache, self.ffn, self.outputs):
            for buffer in group.values():
                buffer.free()
            group.clear()


class TrtBackend(Backend):
    def __init__(self, build_dir: str | Path, manifest: Manifest) -> None:
        self.build_dir = Path(build_dir)
        self.manifest = manifest
        files = engine_files(manifest, self.build_dir)
        trt = import_tensorrt()
        io_class = select_api(trt)
        check_target(manifest, str(trt.__version__), current_gpu(), self.build_dir)
        log.info("TensorRT %s: the %s API", trt.__version__, io_class.api)
        self.name = f"tensorrt/{trt.__version__}"
        self.api = io_class.api  # "bindings" (8.6) | "named-tensors" (10.x)
        self.dtype = activation_dtype(manifest)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive its engines (TensorRT 8.x)
        self._engines = {graph: self._load(graph, path) for graph, path in files.items()}
        self._io = {graph: io_class(trt, engine, graph) for graph, engine in self._engines.items()}
        self.stream = Stream()
        self._request: _Request | None = None
        decode = self._io["decode"]
        self._limits = {n: dim_range(manifest, "decode", n, 2) for n in decode.inputs if is_past(n)}
        self._scalars = {n: DeviceBuffer((1,), decode.dtype(n)) for n in STEP_INPUTS if n in decode.inputs}
        self._prepare_step_embed()

    def _load(self, graph: str, path: Path) -> Any:
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(
                f"TensorRT could not load {path} (its messages above say why): an engine only runs on the GPU and "
                f"TensorRT version that built it; rebuild with `python -m export engine {self.build_dir} --force`"
            )
        return engine

    def _prepare_step_embed(self) -> None:
        """Device buffers for the decode steps' token id and its embedding, made once.

        The embed engine shares the prompt's dim S, whose profile may start above one token: a step then embeds
        a row of pad ids with the token first, and decode reads the first row in place. The steps reuse the
        embed engine's one context (TensorRT gives an optimization profile to one context at a time), bound to
        these buffers again only after a prompt was embedded.
        """
        io = self._io["embed"]
        low, self._embed_max = dim_range(self.manifest, "embed", INPUT_IDS, 1)
        self._embed_min = max(1, low)
        if self._embed_min > 1:
            log.info("the embed engine's profile starts at %d ids: each decode step embeds that many", low)
        pad = self.manifest.model.pad_token_id or 0
        self._step_ids = DeviceBuffer.from_numpy(np.full((1, self._embed_min), pad, io.dtype(INPUT_IDS)), self.stream)
        if io.is_dynamic(INPUT_IDS):
            io.set_input_shape(INPUT_IDS, self._step_ids.shape)
        self._step_embeds = DeviceBuffer(io.output_shape(INPUTS_EMBEDS), io.dtype(INPUTS_EMBEDS))
        if self._step_embeds.dtype != self._io["decode"].dtype(INPUTS_EMBEDS):
            raise BackendError("the embed and decode engines disagree on the embeddings' type; rebuild the engines")
        self._embed_bound_for_steps = False

    def _bind_embed_for_steps(self) -> None:
        if self._embed_bound_for_steps:
            return
        io = self._io["embed"]
        if io.is_dynamic(INPUT_IDS):
            io.set_input_shape(INPUT_IDS, self._step_ids.shape)
        io.bind(INPUT_IDS, self._step_ids.ptr)
        io.bind(INPUTS_EMBEDS, self._step_embeds.ptr)
        self._embed_bound_for_steps = True

    # -- launches ----------------------------------------------------------------------------------

    def _bind_outputs(self, io: EngineIO) -> dict[str, DeviceBuffer]:
        """Device buffers for every output, shaped as the engine computes them from the input shapes."""
        outputs: dict[str, DeviceBuffer] = {}
        try:
            for name in io.outputs:
                shape = io.output_shape(name)
                if any(d < 0 for d in shape):
                    raise BackendError(f"{name} of {io.graph} has a data-dependent shape: use ONNX Runtime")
                outputs[name] = DeviceBuffer(shape, io.dtype(name))
                io.bind(name, outputs[name].ptr)
        except BaseException:
            for buffer in outputs.values():
                buffer.free()
            raise
        return outputs

    def _launch(
        self, graph: str, feeds: dict[str, np.ndarray]
    ) -> tuple[dict[str, DeviceBuffer], dict[str, DeviceBuffer]]:
        """Uploads `feeds`, runs `graph`; returns (input buffers, output buffers), both the caller's to free."""
        io = self._io[graph]
        missing = [n for n in io.inputs if n not in feeds]
        if missing:
            raise BackendError(f"the {graph} engine needs {', '.join(missing)}; rebuild the engines")
        inputs: dict[str, DeviceBuffer] = {}
        outputs: dict[str, DeviceBuffer] = {}
        try:
            for name, value in feeds.items():
                inputs[name] = DeviceBuffer.from_numpy(np.asarray(value, io.dtype(name)), self.stream)
                if io.is_dynamic(name):
                    io.set_input_shape(name, inputs[name].shape)
                io.bind(name, inputs[name].ptr)
            outputs = self._bind_outputs(io)
            io.execute(self.stream.handle)
        except BaseException:
            for buffer in [*inputs.values(), *outputs.values()]:
                buffer.free()
            raise
        return inputs, outputs

    def _run_to_host(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs, outputs = self._launch(graph, feeds)
        try:
            return {name: buffer.to_numpy(self.stream) for name, buffer in outputs.items()}
        finally:
            for buffer in [*inputs.values(), *outputs.values()]:
                buffer.free()

    # -- the Backend interface -------------------------------------------------------------------

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._run_to_host("vision", {PIXEL_VALUES: pixel_values})[IMAGE_FEATURES]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        length = ids.shape[1]
        if length > self._embed_max:
            raise BackendError(f"a prompt of {length} tokens is longer than the engines admit ({self._embed_max})")
        if length < self._embed_min:  # below the profile: pad, embed, cut
            pad = self.manifest.model.pad_token_id or 0
            ids = np.concatenate([ids, np.full((1, self._embed_min - length), pad, ids.dtype)], axis=1)
        self._embed_bound_for_steps = False  # the prompt takes the embed context's shape and addresses
        return self._run_to_host("embed", {INPUT_IDS: ids})[INPUTS_EMBEDS][:, :length]

    def prefill(self, inputs_embeds: np.ndarray, image_start: int, capacity: int) -> PrefillResult:
        self.end_request()
        prompt = inputs_embeds.shape[1]
        if capacity < prompt:
            raise BackendError(f"capacity {capacity} is less than the {prompt}-token prompt")
        feeds = {INPUTS_EMBEDS: inputs_embeds}
        if IMAGE_START in self._io["prefill"].inputs:
            feeds[IMAGE_START] = np.array([image_start])
        inputs, outputs = self._launch("prefill", feeds)
        try:
            logits = outputs[LOGITS].to_numpy(self.stream)[0].astype(np.float32)
            kept = outputs.get(KEPT_IMAGE_TOKENS)
            kept_tokens = None if kept is None else [int(i) for i in kept.to_numpy(self.stream)]
            self._request = self._start_request(outputs, prompt, capacity - prompt, image_start)
        finally:
            self.stream.synchronize()  # the cache copies read the prefill's outputs freed below
            for buffer in [*inputs.values(), *outputs.values()]:
                buffer.free()
        return PrefillResult(logits=logits, kept_image_tokens=kept_tokens)

    def _start_request(
        self, outputs: dict[str, DeviceBuffer], prompt: int, answer: int, image_start: int = 0
    ) -> _Request:
        """Cache buffers filled from the prefill, compacted weights taken over, the decode context bound once."""
        decode = self._io["decode"]
        missing = [name for name in self._limits if present_name(name) not in outputs]
        if missing:
            raise BackendError(f"the prefill engine gives no cache for {missing[0]}; rebuild the engines")
        state = DecodeState.start(
            {present_name(name): outputs[present_name(name)].shape[2] for name in self._limits},
            prompt,
            answer,
            image_start,
            size=lambda name, length, more: cache_size(name, length, more, *self._limits[name]),
        )
        request = _Request(state)
        try:
            for name in [n for n in outputs if is_request_input(n)]:
                request.ffn[name] = outputs.pop(name)  # stays on the device for the whole answer
            if IMAGE_START in decode.inputs:
                request.ffn[IMAGE_START] = DeviceBuffer.from_numpy(
                    np.array([image_start], decode.dtype(IMAGE_START)), self.stream
                )
            for name in self._limits:
                present = outputs[present_name(name)]
                num_kv, head_dim = present.shape[1], present.shape[3]
                if decode.dtype(name) != present.dtype:
                    raise BackendError(f"prefill and decode disagree on the type of {name}; rebuild the engines")
                shape = (1, num_kv, state.capacity[name], head_dim)
                buffer = request.cache[name] = DeviceBuffer(shape, present.dtype)
                buffer.zero(self.stream)  # the padding is masked in the graph; zeros keep 0 * padding finite
                write_prefix(buffer, present, self.stream)
            bound = {**request.cache, **request.ffn, **self._scalars, INPUTS_EMBEDS: self._step_embeds}
            unbound = [n for n in decode.inputs if n not in bound]
            if unbound:
                raise BackendError(f"the decode engine takes {', '.join(unbound)}, which prefill did not give")
            for name in decode.inputs:
                if decode.is_dynamic(name):
                    shape = (1, 1, self._step_embeds.shape[2]) if name == INPUTS_EMBEDS else bound[name].shape
                    decode.set_input_shape(name, shape)
                decode.bind(name, bound[name].ptr)  # inputs_embeds: the first row of the step's embeddings
            request.outputs = self._bind_outputs(decode)
        except BaseException:
            request.free()
            raise
        return request

    def decode(self, token_id: int) -> np.ndarray:
        request = self._request
        if request is None:
            raise BackendError("decode before prefill: run a prompt first")
        state = request.state
        state.check_room()
        # Only the first id changes; the padding after it (if any) stays from construction.
        self._step_ids.copy_from_numpy(np.array([token_id]), self.stream)
        self._bind_embed_for_steps()
        self._io["embed"].execute(self.stream.handle)
        for name, value in state.step_inputs(self._scalars.keys()).items():
            self._scalars[name].copy_from_numpy(value, self.stream)
        self._io["decode"].execute(self.stream.handle)
        for past, new, index in state.writes():
            write_token(request.cache[past], request.outputs[new], index, self.stream)
        logits = request.outputs[LOGITS].to_numpy(self.stream)  # waits for the step
        state.advance()
        return logits[0].astype(np.float32)

    # -- lifetime ------------------------------------------------------------------------------------

    def end_request(self) -> None:
        if self._request is not None:
            self.stream.synchronize()
            self._request.free()
            self._request = None

    def close(self) -> None:
        """Frees the device memory now (otherwise it goes with the object); contexts before engines."""
        self.end_request()
        for buffer in [self._step_ids, self._step_embeds, *self._scalars.values()]:
            buffer.free()
        self._io.clear()
        self._engines.clear()
        self.stream.close()

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
