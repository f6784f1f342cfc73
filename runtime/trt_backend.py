"""The TensorRT backend: runs the engines of `python -m export engine` (engines/{graph}.plan), torch-free.

`tensorrt` and cuda-python are imported when a TrtBackend is made, not with this module. Two TensorRT API
generations are supported, picked from `tensorrt.__version__` and logged (`runtime.trt_io`: 8.6's bindings,
10.x's named tensors). An engine only runs on the GPU model and TensorRT version that built it; the manifest's
`engines` section records both and a mismatch is refused before any engine is loaded.

One engine per graph of the build (`manifest.graph_names`), each weight held once: the decoder stacks'
engines (decoder, or lower and upper) have a prefill and a decode optimization profile, and the backend
makes one execution context per profile from the same engine (docs/tensorrt.md). The full FFN weights of
the per-request neuron-sparse layers, which no engine holds, are uploaded once from weights.bin.

Everything stays on the device from the image to the logits. `vision` keeps the image features there;
`prefill` uploads the prompt's ids and positions, runs the stacks (and select, neurons) through device
buffers, fills the request's cache buffers (one per layer, sized once) with one 2-D copy each, keeps the
compacted FFN weights and a merge's kept_bias, and binds the decode contexts to all of those ONCE per request.
A step then moves a token id and a few integers to the device, runs the stacks, writes the token's own cache
entries with one 2-D copy per buffer, and brings back only the logits.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from buildformat import Manifest
from buildformat.names import (
    HIDDEN,
    IMAGE_FEATURES,
    IMAGE_START,
    INPUT_IDS,
    KEPT_BIAS,
    KEPT_HIDDEN,
    KEPT_IMAGE_TOKENS,
    KEPT_POSITIONS,
    LOGITS,
    PAST_LENGTH,
    PIXEL_VALUES,
    POSITION_IDS,
    STACKS,
    STEP_INPUTS,
    UPPER,
    VISION_GRAPH,
    bound_name,
    core_neurons_layer,
    is_compact,
    is_past,
    new_name,
)
from runtime.backend import Backend, BackendError, PrefillResult
from runtime.cuda_memory import DeviceBuffer, Stream, write_prefix, write_token
from runtime.decode_state import DecodeState
from runtime.trt_io import EngineIO, select_api

log = logging.getLogger(__name__)

PREFILL, DECODE = 0, 1  # the stacks' optimization profiles, in the order `python -m export engine` adds them
# The upper stack's prefill reads the kept tokens that select gives, under its own input names.
UPPER_PREFILL_INPUTS = {HIDDEN: KEPT_HIDDEN, POSITION_IDS: KEPT_POSITIONS}


# -- what needs no TensorRT: the manifest, the cache sizes -------------------------------


def engine_files(manifest: Manifest, build_dir: Path) -> dict[str, Path]:
    """The engine of every graph; refuses a build whose engines were not built (or are gone)."""
    first = f"run `python -m export engine {build_dir}` on this machine first"
    graphs = manifest.engines.graphs if manifest.engines is not None else {}
    if not graphs:
        raise BackendError(f"{build_dir} has no TensorRT engines: {first}")
    missing = [g for g in manifest.graph_names if g not in graphs]
    if missing:
        raise BackendError(f"{build_dir} has no TensorRT engine for {', '.join(missing)}: {first}")
    files = {g: build_dir / graphs[g] for g in manifest.graph_names}
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


def cache_size(name: str, prompt_length: int, answer: int, low: int, high: int) -> int:
    """Positions of one cache buffer: the prompt's and the answer's, clamped into the decode profile's [low, high].

    The answer's last token is never written to the cache, so `prompt_length + answer - 1` must fit.
    """
    if prompt_length + answer - 1 > high:
        raise BackendError(
            f"{name} needs {prompt_length + answer - 1} cache positions ({prompt_length} of the prompt, "
            f"{answer - 1} of the answer) but the decode profile admits {high}: ask for fewer new tokens, or "
            "export the build with a larger --max-sequence"
        )
    size = max(low, min(prompt_length + answer, high))
    if size != prompt_length + answer:
        log.debug("%s: %d positions (the decode profile admits %d..%d)", name, size, low, high)
    return size


def axis_range(io: EngineIO, name: str, axis: int) -> tuple[int, int]:
    """(min, max) of one axis of an input in the context's profile (the engine's own, not the manifest's)."""
    if not io.is_dynamic(name):
        size = io.engine_shape(name)[axis]
        return size, size
    low, _, high = io.profile_shape(name)
    return low[axis], high[axis]


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


def free_all(*groups: Mapping[str, DeviceBuffer] | list[DeviceBuffer]) -> None:
    for group in groups:
        for buffer in group.values() if isinstance(group, Mapping) else group:
            buffer.free()


# -- the backend ---------------------------------------------------------------------------------------


@dataclass
class _Request:
    """The device state of one request, freed when it ends (or the next one starts)."""

    state: DecodeState
    cache: dict[str, DeviceBuffer] = field(default_factory=dict)  # past.{i}.key/value [1, n_kv, capacity, hd]
    # Request-long decode inputs: the compacted FFN weights (by the ffn.* input they fill), kept_bias, image_start.
    held: dict[str, DeviceBuffer] = field(default_factory=dict)
    outputs: dict[str, DeviceBuffer] = field(default_factory=dict)  # every decode output (logits, hidden, new.*)

    def free(self) -> None:
        free_all(self.cache, self.held, self.outputs)
        self.cache, self.held, self.outputs = {}, {}, {}


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
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive its engines (TensorRT 8.x)
        self.stream = Stream()
        self._engines = {graph: self._load(graph, path) for graph, path in files.items()}
        self.stacks = [g for g in manifest.graph_names if g in STACKS]  # decoder, or lower then upper
        # The prefill context of each engine is made first (TensorRT gives the first context profile 0), then the
        # stacks' decode contexts on profile 1 of the same engines: the weights stay the engine's, held once.
        self.prefill_io = {g: io_class(trt, e, g, PREFILL, self.stream.handle) for g, e in self._engines.items()}
        self.decode_io = {g: io_class(trt, self._engines[g], g, DECODE, self.stream.handle) for g in self.stacks}
        self.stream.synchronize()  # the profile switches are enqueued on the stream
        self._pasts = {g: [n for n in io.inputs if is_past(n)] for g, io in self.decode_io.items()}
        self._limits = {n: axis_range(io, n, 2) for g, io in self.decode_io.items() for n in self._pasts[g]}
        # Each stack's step inputs (token, position, past length), written before every decode step.
        self._steps = {
            g: {n: DeviceBuffer((1, 1) if n == INPUT_IDS else (1,), io.dtype(n)) for n in STEP_INPUTS if n in io.inputs}
            for g, io in self.decode_io.items()
        }
        self._zeros: dict[tuple[tuple[int, ...], str], DeviceBuffer] = {}  # the prefill's one-slot past buffers
        self._bound = self._upload_bound()
        self._features: DeviceBuffer | None = None  # the request's image features [1, n_img, d]
        self._request: _Request | None = None

    def _load(self, graph: str, path: Path) -> Any:
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(
                f"TensorRT could not load {path} (its messages above say why): an engine only runs on the GPU and "
                f"TensorRT version that built it; rebuild with `python -m export engine {self.build_dir} --force`"
            )
        return engine

    def _upload_bound(self) -> dict[str, DeviceBuffer]:
        """The full FFN weights of the per-request neuron-sparse layers (weights.bin's `bound` section), on the
        device once: the stacks read them in prefill, the neurons graph gathers the request's from them."""
        index = self.manifest.weights
        wanted = {n for io in self.prefill_io.values() for n in io.inputs}
        entries = {} if index is None else {n: e for n, e in index.bound.items() if n in wanted}
        if not entries:
            return {}
        assert index is not None
        mapped = np.memmap(self.build_dir / index.file, dtype=np.uint8, mode="r")
        bound: dict[str, DeviceBuffer] = {}
        try:
            for name, entry in entries.items():
                if entry.dtype == "int4":  # no numpy type, and no TensorRT engine input takes one
                    raise BackendError(f"{name} is stored as int4, which TensorRT engines cannot take as an input")
                view = np.ndarray(entry.shape, np.dtype(entry.dtype), buffer=mapped, offset=entry.offset)
                bound[name] = DeviceBuffer.from_numpy(view, self.stream)
            self.stream.synchronize()
        except BaseException:
            free_all(bound)
            raise
        size = sum(b.nbytes for b in bound.values())
        log.info("%d bound FFN weights on the device (%.1f MB)", len(bound), size / 1e6)
        return bound

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
            free_all(outputs)
            raise
        return outputs

    def _bind(self, io: EngineIO, inputs: Mapping[str, DeviceBuffer]) -> dict[str, DeviceBuffer]:
        """Sets the shapes and addresses of every input of `io` and gives its outputs buffers (the caller's)."""
        missing = [n for n in io.inputs if n not in inputs]
        if missing:
            raise BackendError(f"nothing gives {', '.join(missing)} to the {io.graph} engine; rebuild the engines")
        for name in io.inputs:
            buffer = inputs[name]
            if buffer.dtype != io.dtype(name):
                raise BackendError(
                    f"{name} is {buffer.dtype} but the {io.graph} engine takes {io.dtype(name)}; rebuild the engines"
                )
            if io.is_dynamic(name):
                io.set_input_shape(name, buffer.shape)
            io.bind(name, buffer.ptr)
        return self._bind_outputs(io)

    def _upload(self, io: EngineIO, name: str, value: np.ndarray) -> DeviceBuffer:
        return DeviceBuffer.from_numpy(np.asarray(value, io.dtype(name)), self.stream)

    def _one_slot(self, io: EngineIO, name: str) -> DeviceBuffer:
        """A zeroed past buffer of one position [1, n_kv, 1, hd]: the prefill's (masked: past_length is 0)."""
        shape = (*io.engine_shape(name)[:2], 1, io.engine_shape(name)[3])
        key = (shape, io.dtype(name).str)
        if key not in self._zeros:
            self._zeros[key] = DeviceBuffer(shape, io.dtype(name))
            self._zeros[key].zero(self.stream)
        return self._zeros[key]

    # -- the Backend interface -------------------------------------------------------------------

    def vision(self, pixel_values: np.ndarray) -> None:
        self.end_request()  # the last request's decode contexts read the features this replaces
        io = self.prefill_io[VISION_GRAPH]
        pixels = self._upload(io, PIXEL_VALUES, pixel_values)
        outputs: dict[str, DeviceBuffer] = {}
        try:
            outputs = self._bind(io, {PIXEL_VALUES: pixels})
            io.execute(self.stream.handle)
            self.stream.synchronize()
        except BaseException:
            free_all(outputs)
            raise
        finally:
            pixels.free()
        if self._features is not None:
            self._features.free()
        self._features = outputs.pop(IMAGE_FEATURES)
        free_all(outputs)

    def image_features(self) -> np.ndarray:
        if self._features is None:
            raise BackendError("no image features: run vision first")
        return self._features.to_numpy(self.stream)

    def prefill(self, input_ids: np.ndarray, image_start: int, capacity: int) -> PrefillResult:
        self.end_request()
        if self._features is None:
            raise BackendError("prefill before vision: run the image first")
        prompt = input_ids.shape[1]
        if capacity < prompt:
            raise BackendError(f"capacity {capacity} is less than the {prompt}-token prompt")
        host = {
            INPUT_IDS: input_ids,
            IMAGE_START: np.array([image_start]),
            POSITION_IDS: np.arange(prompt),
            PAST_LENGTH: np.zeros(1),
        }
        values: dict[str, DeviceBuffer] = {IMAGE_FEATURES: self._features, **self._bound}
        made: list[DeviceBuffer] = []  # this prefill's own buffers: freed at its end, unless a request takes them
        try:
            for graph in self.manifest.graph_names[1:]:  # vision ran already
                io = self.prefill_io[graph]
                inputs = {}
                for name in io.inputs:
                    if is_past(name):
                        inputs[name] = self._one_slot(io, name)
                    elif graph == UPPER and name in UPPER_PREFILL_INPUTS:
                        inputs[name] = values[UPPER_PREFILL_INPUTS[name]]
                    elif name in values:
                        inputs[name] = values[name]
                    elif name in host:
                        inputs[name] = self._upload(io, name, host[name])
                        made.append(inputs[name])
                outputs = self._bind(io, inputs)
                made += outputs.values()
                io.execute(self.stream.handle)
                values.update(outputs)
            result = self._result(values)
            self._request = self._start_request(values, made, prompt, capacity - prompt, image_start)
        finally:
            self.stream.synchronize()  # the cache copies read the outputs freed here
            free_all(made)
        return result

    def _result(self, values: Mapping[str, DeviceBuffer]) -> PrefillResult:
        kept = values.get(KEPT_IMAGE_TOKENS)
        layers = {name: core_neurons_layer(name) for name in values}
        return PrefillResult(
            logits=values[LOGITS].to_numpy(self.stream)[0].astype(np.float32),
            kept_image_tokens=None if kept is None else [int(i) for i in kept.to_numpy(self.stream)],
            core_neurons={
                layer: [int(i) for i in values[name].to_numpy(self.stream)]
                for name, layer in layers.items()
                if layer is not None
            },
        )

    def _start_request(
        self, values: dict[str, DeviceBuffer], made: list[DeviceBuffer], prompt: int, answer: int, image_start: int
    ) -> _Request:
        """Cache buffers filled from the prefill, its request-long outputs taken over, the decode contexts bound."""
        missing = [name for name in self._limits if new_name(name) not in values]
        if missing:
            raise BackendError(f"the prefill engines give no cache for {missing[0]}; rebuild the engines")
        state = DecodeState.start(
            {new_name(name): values[new_name(name)].shape[2] for name in self._limits},
            prompt,
            answer,
            image_start,
            size=lambda name, length, more: cache_size(name, length, more, *self._limits[name]),
        )
        request = _Request(state)
        try:
            for name, buffer in values.items():  # stay on the device for the whole answer
                if is_compact(name) or name == KEPT_BIAS:
                    made.remove(buffer)
                    request.held[bound_name(name) if is_compact(name) else name] = buffer
            for name in self._limits:
                new = values[new_name(name)]
                shape = (1, new.shape[1], state.capacity[name], new.shape[3])
                buffer = request.cache[name] = DeviceBuffer(shape, new.dtype)
                buffer.zero(self.stream)  # the padding is masked in the graph; zeros keep 0 * padding finite
                write_prefix(buffer, new, self.stream)
            for graph in self.stacks:  # lower before upper: upper reads lower's hidden output
                io = self.decode_io[graph]
                if IMAGE_START in io.inputs:
                    request.held[f"{graph}.{IMAGE_START}"] = self._upload(io, IMAGE_START, np.array([image_start]))
                inputs = {
                    **{n: b for n, b in request.held.items() if n in io.inputs},
                    IMAGE_START: request.held.get(f"{graph}.{IMAGE_START}"),
                    IMAGE_FEATURES: self._features,
                    HIDDEN: request.outputs.get(HIDDEN),
                    **request.cache,
                    **self._steps[graph],
                }
                outputs = self._bind(io, {n: b for n, b in inputs.items() if b is not None})
                request.outputs.update(outputs)
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
        for graph in self.stacks:
            steps = self._steps[graph]
            for name, value in state.step_inputs(token_id, self._pasts[graph], steps).items():
                steps[name].copy_from_numpy(value, self.stream)
            self.decode_io[graph].execute(self.stream.handle)
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
        free_all(self._bound, self._zeros, *self._steps.values())
        if self._features is not None:
            self._features.free()
            self._features = None
        self.prefill_io.clear()
        self.decode_io.clear()
        self._engines.clear()
        self.stream.close()

    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
